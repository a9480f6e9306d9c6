"""Segment-Anything-style modules whose state dicts match the SAM / MedSAM / LiteMedSAM checkpoints."""

from .common import LayerNorm2d, MLPBlock
from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .sam import SamModel
from .tiny_vit import TinyViT
from .transformer import TwoWayTransformer

__all__ = [
    "ImageEncoderViT",
    "LayerNorm2d",
    "MLPBlock",
    "MaskDecoder",
    "PromptEncoder",
    "SamModel",
    "TinyViT",
    "TwoWayTransformer",
]
