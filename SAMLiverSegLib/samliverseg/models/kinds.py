"""The one table of trained-model kinds: what each ``kind`` trains, whether its models need prompts,
and which classes and functions implement it.

Everything that lists or dispatches on kinds (``samliverseg train``, the config parser, the user
models folder, ``samliverseg models``, the Slicer training panel) reads this table; nothing else
spells the list. It holds dotted names only, so importing it costs nothing and imports no layer
above ``models``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple


@dataclass(frozen=True)
class Kind:
    name: str
    #: True: prompt-free (segments a whole volume); False: promptable (a SAM-family model).
    automatic: bool
    #: ``module:Class`` of the trainer (``samliverseg train``).
    trainer: str
    #: ``module:Class`` of its config section (``None``: no section of its own).
    options: Optional[str]
    #: ``module:function`` that turns an exported ``model.pth`` into something that segments.
    inference: str
    #: One line for ``train --help`` and ``samliverseg models``.
    summary: str


KINDS: Dict[str, Kind] = {k.name: k for k in (
    Kind("decoder", False, "samliverseg.training.decoder:DecoderTrainer", None,
         "samliverseg.models.build_sam:build_model",
         "SAM/MedSAM/LiteMedSAM mask decoder (± prompt encoder) on precomputed embeddings (MedSAM fine-tuning)"),
    Kind("adapter", False, "samliverseg.training.adapter:AdapterTrainer", "samliverseg.training.adapter:AdapterOptions",
         "samliverseg.models.adapters:load_adapted_model",
         "Med-SA bottleneck adapters in the image encoder (SD-Trans, HyP-Adpt); the base stays frozen"),
    Kind("unet", True, "samliverseg.training.unet:UNetTrainer", "samliverseg.training.unet:UNetOptions",
         "samliverseg.automatic.unet:segment_volume",
         "MONAI residual 3D U-Net baseline, prompt-free (optionally two-stage coarse-to-fine)"),
    Kind("student", True, "samliverseg.training.student:StudentTrainer", "samliverseg.training.student:StudentOptions",
         "samliverseg.automatic.student:segment_volume",
         "slicing-SAM3D student: frozen 2D encoder + trainable 3D CNN over slabs, prompt-free"),
    Kind("semi", True, "samliverseg.training.semi.trainer:SemiTrainer", "samliverseg.training.semi.trainer:SemiOptions",
         "samliverseg.automatic.student:segment_volume",
         "Semi-SAM+: student + SAM teachers, variance-filtered pseudo-labels, consistency ramps, EMA teacher"),
)}

#: Kind names in the order users see them.
KIND_NAMES: Tuple[str, ...] = tuple(KINDS)
INTERACTIVE_KINDS: Tuple[str, ...] = tuple(k for k, v in KINDS.items() if not v.automatic)
AUTOMATIC_KINDS: Tuple[str, ...] = tuple(k for k, v in KINDS.items() if v.automatic)


def get_kind(name: str) -> Kind:
    """The kind called ``name`` (KeyError with the known names otherwise)."""
    try:
        return KINDS[name]
    except KeyError:
        raise KeyError(f"unknown model kind {name!r}; known: {', '.join(KIND_NAMES)}") from None


def resolve(dotted: str) -> Any:
    """The object a ``module:attribute`` name points at (imported on demand)."""
    module, _, attr = dotted.partition(":")
    return getattr(importlib.import_module(module), attr)


#: Automatic kinds -> ``module:Class`` whose ``Class.load(model_path, device)`` reads a ``model.pth``
#: once into an object with ``segment_volume(volume) -> uint8 mask [k, j, i]`` for any number of
#: volumes (``samliverseg.api.open_model`` opens automatic models with it).
SEGMENTERS: Dict[str, str] = {
    "unet": "samliverseg.automatic.unet:UNetSegmenter",
    "student": "samliverseg.automatic.student:StudentSegmenter",
    "semi": "samliverseg.automatic.student:StudentSegmenter",
}
