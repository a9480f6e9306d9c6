"""SAM-Med3D's prompt encoder: 3D points and a low-resolution mask -> prompt embeddings.

* **Random-Fourier positions** (``PositionEmbeddingRandom3D``): a fixed Gaussian matrix
  G (3 x F, F = embed_dim // 3) maps a position u in [0, 1]^3 to
  ``[sin(2 pi (2u - 1) G), cos(2 pi (2u - 1) G), sin(2 pi (2u - 1) G)]`` (3F = embed_dim
  values; the repeated sine is how the published model was trained, so it is kept).
* **Points**: coordinates (B, N, 3) in voxels of the model's input cube, in the order of the
  input tensor's dims 2, 3, 4, are shifted by half a voxel, divided by the cube side and encoded;
  the learned embedding of the label is added: ``point_embeddings[0]`` negative (label 0),
  ``point_embeddings[1]`` positive (label 1). Without a box, a padding point (label -1) is
  appended whose encoding is replaced by ``not_a_point_embed``.
* **Dense positions** (``get_dense_pe``): the same encoding on the G^3 embedding grid, for the
  token at grid index (a, b, c) of the position ((b + 1/2)/G, (a + 1/2)/G, (c + 1/2)/G). Note
  that the first two coordinates are swapped with respect to the points' convention; the
  published weights were trained with exactly this, so it is reproduced and not "fixed".
* **Mask prompt**: the previous low-res logits (B, 1, 4G, 4G, 4G) go through
  ``Conv3d(1, m/4, 2, stride 2)``, LayerNorm3d, GELU, ``Conv3d(m/4, m, 2, stride 2)``,
  LayerNorm3d, GELU, ``Conv3d(m, embed_dim, 1)`` -> (B, embed_dim, G, G, G); without a mask
  the learned ``no_mask_embed`` is broadcast over the grid. SAM-Med3D was trained with a mask
  prompt at every step (all zeros before the first prediction).

Parameter names and shapes are those of the published checkpoints (``prompt_encoder.*``).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Type

import torch
from torch import nn

from samliverseg.modeling3d.image_encoder3d import LayerNorm3d

Size3 = Tuple[int, int, int]


class PositionEmbeddingRandom3D(nn.Module):
    """Random-Fourier features of 3D positions (a fixed, saved Gaussian matrix)."""

    def __init__(self, num_pos_feats: int = 128, scale: Optional[float] = None) -> None:
        super().__init__()
        scale = 1.0 if scale is None or scale <= 0.0 else float(scale)
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn((3, num_pos_feats)))

    def _encode(self, coords: torch.Tensor) -> torch.Tensor:
        """Positions in [0, 1]^3 (..., 3) -> (..., 3F)."""
        matrix = self.positional_encoding_gaussian_matrix
        proj = 2.0 * math.pi * ((2.0 * coords - 1.0).to(matrix.dtype) @ matrix)
        s = torch.sin(proj)
        return torch.cat([s, torch.cos(proj), s], dim=-1)

    def forward(self, size: Size3) -> torch.Tensor:
        """The encoding of every token of a grid of ``size``: (3F, size0, size1, size2)."""
        n0, n1, n2 = (int(s) for s in size)
        dev = self.positional_encoding_gaussian_matrix.device
        a = (torch.arange(n0, device=dev, dtype=torch.float32) + 0.5)[:, None, None].expand(n0, n1, n2)
        b = (torch.arange(n1, device=dev, dtype=torch.float32) + 0.5)[None, :, None].expand(n0, n1, n2)
        c = (torch.arange(n2, device=dev, dtype=torch.float32) + 0.5)[None, None, :].expand(n0, n1, n2)
        # as published: first coordinate from the grid's second axis (over size0), second from
        # its first axis (over size1)
        coords = torch.stack([b / n0, a / n1, c / n2], dim=-1)
        return self._encode(coords).permute(3, 0, 1, 2)

    def forward_with_coords(self, coords: torch.Tensor, image_size: Size3) -> torch.Tensor:
        """Voxel coordinates (B, N, 3) in a cube of ``image_size`` -> (B, N, 3F)."""
        scale = torch.tensor([float(s) for s in image_size], device=coords.device)
        return self._encode(coords.float() / scale)


class PromptEncoder3D(nn.Module):
    """Points and masks -> (sparse (B, N, C), dense (B, C, G, G, G)); see the module docstring."""

    def __init__(self, embed_dim: int, image_embedding_size: Size3, input_image_size: Size3, mask_in_chans: int,
                 activation: Type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        if embed_dim % 3:
            raise ValueError(f"embed_dim must be a multiple of 3, got {embed_dim}")
        self.embed_dim = embed_dim
        self.input_image_size = tuple(int(s) for s in input_image_size)
        self.image_embedding_size = tuple(int(s) for s in image_embedding_size)
        self.pe_layer = PositionEmbeddingRandom3D(embed_dim // 3)
        self.num_point_embeddings = 2  # 0: negative, 1: positive
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(self.num_point_embeddings))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = tuple(4 * s for s in self.image_embedding_size)
        self.mask_downscaling = nn.Sequential(
            nn.Conv3d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm3d(mask_in_chans // 4),
            activation(),
            nn.Conv3d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm3d(mask_in_chans),
            activation(),
            nn.Conv3d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """(1, C, G, G, G): the positional encoding of the image embedding's tokens."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        coords = coords.float() + 0.5
        labels = labels.to(coords.device)
        if pad:
            coords = torch.cat([coords, torch.zeros(coords.shape[0], 1, 3, device=coords.device)], dim=1)
            labels = torch.cat([labels, -torch.ones(labels.shape[0], 1, device=labels.device, dtype=labels.dtype)], dim=1)
        emb = self.pe_layer.forward_with_coords(coords, self.input_image_size)
        pad_mask = (labels == -1).unsqueeze(-1)
        emb = torch.where(pad_mask, self.not_a_point_embed.weight.to(emb.dtype), emb)
        emb = emb + (labels == 0).unsqueeze(-1).to(emb.dtype) * self.point_embeddings[0].weight
        emb = emb + (labels == 1).unsqueeze(-1).to(emb.dtype) * self.point_embeddings[1].weight
        return emb

    def forward(self, points: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, boxes: Optional[torch.Tensor] = None,
                masks: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """points: (coords (B, N, 3), labels (B, N) with 1/0/-1); masks: (B, 1, 4G, 4G, 4G) logits.

        Boxes are not supported by SAM-Med3D (it has no box-corner embeddings).
        """
        if boxes is not None:
            raise ValueError("SAM-Med3D takes points and masks only, not boxes")
        if points is not None:
            bs = points[0].shape[0]
        elif masks is not None:
            bs = masks.shape[0]
        else:
            bs = 1
        dev = self.no_mask_embed.weight.device
        sparse = torch.empty((bs, 0, self.embed_dim), device=dev)
        if points is not None:
            sparse = torch.cat([sparse, self._embed_points(points[0].to(dev), points[1].to(dev), pad=True)], dim=1)
        if masks is not None:
            if tuple(masks.shape[-3:]) != self.mask_input_size:
                raise ValueError(f"mask prompt must be (B, 1, {', '.join(map(str, self.mask_input_size))}), "
                                 f"got {tuple(masks.shape)}")
            dense = self.mask_downscaling(masks.to(dev))
        else:
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1, 1).expand(bs, -1, *self.image_embedding_size)
        return sparse, dense

