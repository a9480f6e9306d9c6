"""`Sam3DModel`: SAM-Med3D's image encoder, prompt encoder and mask decoder in one module.

Its state dict has exactly the keys of the published SAM-Med3D checkpoints
(``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``; the checkpoint files keep them
under ``"model_state_dict"``). Preprocessing (resampling, patch cropping, z-score
normalisation, axis order) is the caller's (``engine3d.py``); the attached
:class:`~samliverseg.models.build_sam3d.Model3DSpec` (``model.spec``) describes it.

Frames: the model works in its input cube: a tensor (B, 1, S, S, S) whose dims 2, 3, 4 are the
cube's axes 0, 1, 2; point coordinates are voxel indices along those axes, in that order.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from samliverseg.modeling3d.image_encoder3d import ImageEncoderViT3D
from samliverseg.modeling3d.mask_decoder3d import MaskDecoder3D
from samliverseg.modeling3d.prompt_encoder3d import PromptEncoder3D


class Sam3DModel(nn.Module):
    """image_encoder (B,1,S,S,S) -> (B,C,G,G,G); prompt_encoder; mask_decoder -> (B,1,4G,4G,4G) logits."""

    mask_threshold: float = 0.0

    def __init__(self, image_encoder: ImageEncoderViT3D, prompt_encoder: PromptEncoder3D,
                 mask_decoder: MaskDecoder3D) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.spec = None  # the Model3DSpec, attached by build_sam3d.build_model3d

    @property
    def image_size(self) -> int:
        """S: the side of the input cube (128 for SAM-Med3D)."""
        return int(self.prompt_encoder.input_image_size[0])

    @property
    def embedding_size(self) -> int:
        """G: the side of the embedding grid (S / 16)."""
        return int(self.prompt_encoder.image_embedding_size[0])

    @property
    def low_res_size(self) -> int:
        """4G: the side of the low-res logits and of the mask prompt."""
        return 4 * self.embedding_size

    @property
    def device(self) -> torch.device:
        return self.prompt_encoder.no_mask_embed.weight.device

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S, S) z-scored intensities -> (B, C, G, G, G)."""
        s = self.image_size
        if images.ndim != 5 or images.shape[1] != 1 or tuple(images.shape[-3:]) != (s, s, s):
            raise ValueError(f"expected images of shape (B, 1, {s}, {s}, {s}), got {tuple(images.shape)}")
        return self.image_encoder(images)

    def decode(self, image_embeddings: torch.Tensor, points: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
               masks: Optional[torch.Tensor] = None, multimask_output: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """Points (coords (B,N,3) in cube voxels, labels (B,N)) and/or a mask prompt (B,1,4G,4G,4G)
        -> (low-res logits (B, M, 4G, 4G, 4G), IoU predictions (B, M))."""
        sparse, dense = self.prompt_encoder(points=points, masks=masks)
        return self.mask_decoder(image_embeddings, self.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output)

    def forward(self, images: torch.Tensor, points: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                masks: Optional[torch.Tensor] = None, multimask_output: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.decode(self.encode(images), points, masks, multimask_output)
