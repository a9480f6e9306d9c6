"""Segment-Anything-style modules whose state dicts match the SAM / MedSAM / LiteMedSAM checkpoints."""

from samliverseg.modeling.common import LayerNorm2d, MLPBlock
from samliverseg.modeling.image_encoder import ImageEncoderViT
from samliverseg.modeling.mask_decoder import MaskDecoder
from samliverseg.modeling.prompt_encoder import PromptEncoder
from samliverseg.modeling.sam import SamModel
from samliverseg.modeling.tiny_vit import TinyViT
from samliverseg.modeling.transformer import TwoWayTransformer

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
