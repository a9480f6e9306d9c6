"""SAM-Med3D-style 3D modules whose state dicts match the published SAM-Med3D checkpoints."""

from samliverseg.modeling3d.image_encoder3d import Attention3D, Block3D, ImageEncoderViT3D, LayerNorm3d, PatchEmbed3D
from samliverseg.modeling3d.mask_decoder3d import MaskDecoder3D
from samliverseg.modeling3d.prompt_encoder3d import PositionEmbeddingRandom3D, PromptEncoder3D
from samliverseg.modeling3d.sam3d import Sam3DModel

__all__ = [
    "Attention3D",
    "Block3D",
    "ImageEncoderViT3D",
    "LayerNorm3d",
    "MaskDecoder3D",
    "PatchEmbed3D",
    "PositionEmbeddingRandom3D",
    "PromptEncoder3D",
    "Sam3DModel",
]
