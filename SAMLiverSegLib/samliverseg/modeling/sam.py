"""`SamModel`: the container of an image encoder, a prompt encoder and a mask decoder.

Its state dict has exactly the keys of the segment-anything / LiteMedSAM checkpoints
(``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``); preprocessing (resize,
normalisation) is described by the attached :class:`~samliverseg.models.build_sam.ModelSpec`
(``model.spec``) and done by the caller.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from samliverseg.modeling.mask_decoder import MaskDecoder
from samliverseg.modeling.prompt_encoder import PromptEncoder


class SamModel(nn.Module):
    """image_encoder: (B,3,S,S) -> (B,256,E,E); prompt_encoder; mask_decoder (see ARCHITECTURE.md)."""

    mask_threshold: float = 0.0

    def __init__(self, image_encoder: nn.Module, prompt_encoder: PromptEncoder, mask_decoder: MaskDecoder) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.spec = None  # the ModelSpec, attached by build_model

    @property
    def image_size(self) -> int:
        """S: the side of the square image the encoder takes."""
        return int(self.prompt_encoder.input_image_size[0])

    @property
    def embedding_size(self) -> int:
        """E: the side of the image embedding grid (low-res masks are 4E)."""
        return int(self.prompt_encoder.image_embedding_size[0])

    @property
    def device(self) -> torch.device:
        return self.prompt_encoder.point_embeddings[0].weight.device

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised float -> image embeddings (B, 256, E, E)."""
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"expected images of shape (B, 3, {self.image_size}, {self.image_size}), got {tuple(images.shape)}"
            )
        return self.image_encoder(images)

    def decode(
        self,
        image_embeddings: torch.Tensor,
        points: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        boxes: Optional[torch.Tensor] = None,
        masks: Optional[torch.Tensor] = None,
        multimask_output: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Prompts in the S-pixel frame -> (low-res logits (B, C, 4E, 4E), IoU predictions (B, C))."""
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=masks)
        return self.mask_decoder(
            image_embeddings=image_embeddings,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )

    def forward(
        self,
        images: torch.Tensor,
        points: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        boxes: Optional[torch.Tensor] = None,
        masks: Optional[torch.Tensor] = None,
        multimask_output: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.decode(self.encode(images), points, boxes, masks, multimask_output)
