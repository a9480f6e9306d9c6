"""SAM-Med3D's mask decoder: SAM's two-way transformer on 3D tokens, 3D transposed-conv upscaling.

Tokens = [IoU token, 4 mask tokens, prompt tokens]. The image embedding (B, C, G, G, G) plus the
dense prompt embedding is flattened to G^3 image tokens; the two-way transformer
(``modeling/transformer.py``, shared with the 2D models: its layers only see token sequences,
so one class serves both) lets tokens and image tokens attend to each other. The image tokens
are then upscaled 4x by ``ConvTranspose3d(C, C/4, 2, stride 2)``, LayerNorm3d, GELU,
``ConvTranspose3d(C/4, C/8, 2, stride 2)``, GELU; each mask token goes through its own 3-layer
MLP (``output_hypernetworks_mlps``) to C/8 weights, and its mask is the dot product of those
weights with the upscaled features at every voxel: low-res logits (B, 4, 4G, 4G, 4G) (32^3 for a
128^3 input). The IoU head (3-layer MLP on the IoU token) predicts each mask's quality.
Single-mask output is mask 0, multimask output masks 1..3 (SAM-Med3D uses mask 0).

Parameter names and shapes are those of the published checkpoints (``mask_decoder.*``):
``transformer.layers.N.*`` with depth 2, MLP width 2048 and 8 heads in the published model.
"""

from __future__ import annotations

from typing import Tuple, Type

import torch
from torch import nn

from samliverseg.modeling.mask_decoder import MLP
from samliverseg.modeling.transformer import TwoWayTransformer
from samliverseg.modeling3d.image_encoder3d import LayerNorm3d


class MaskDecoder3D(nn.Module):
    def __init__(
        self,
        *,
        transformer_dim: int = 384,
        num_multimask_outputs: int = 3,
        activation: Type[nn.Module] = nn.GELU,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        transformer_depth: int = 2,
        transformer_mlp_dim: int = 2048,
        transformer_num_heads: int = 8,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = TwoWayTransformer(depth=transformer_depth, embedding_dim=transformer_dim,
                                             num_heads=transformer_num_heads, mlp_dim=transformer_mlp_dim)
        self.num_multimask_outputs = num_multimask_outputs
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose3d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm3d(transformer_dim // 4),
            activation(),
            nn.ConvTranspose3d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            activation(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def forward(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, sparse_prompt_embeddings: torch.Tensor,
                dense_prompt_embeddings: torch.Tensor, multimask_output: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """Low-res logits (B, M, 4G, 4G, 4G) and IoU predictions (B, M); M = 3 or 1."""
        masks, iou = self.predict_masks(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings)
        chosen = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, chosen], iou[:, chosen]

    def predict_masks(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, sparse_prompt_embeddings: torch.Tensor,
                      dense_prompt_embeddings: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        n = sparse_prompt_embeddings.shape[0]
        out_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        out_tokens = out_tokens.unsqueeze(0).expand(n, -1, -1).to(sparse_prompt_embeddings.dtype)
        tokens = torch.cat([out_tokens, sparse_prompt_embeddings], dim=1)
        src = image_embeddings if image_embeddings.shape[0] == n else torch.repeat_interleave(image_embeddings, n, dim=0)
        src = src + dense_prompt_embeddings
        pos = image_pe if image_pe.shape[0] == n else image_pe.expand(n, *image_pe.shape[1:])
        b, c, d, h, w = src.shape
        hs, src = self.transformer(src, pos, tokens)
        iou_out = hs[:, 0, :]
        mask_out = hs[:, 1:1 + self.num_mask_tokens, :]
        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, d, h, w))
        hyper = torch.stack([mlp(mask_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
        b, c, d, h, w = upscaled.shape
        masks = (hyper @ upscaled.reshape(b, c, d * h * w)).reshape(b, -1, d, h, w)
        return masks, self.iou_prediction_head(iou_out)
