"""The 3D (SAM-Med3D) models: configurations, checkpoints, strict loading. Their specs live in
the one store of built-in models (``specs.py``, family ``"sam3d"``); ``MODEL3D_REGISTRY`` is the
live view of this family, and ``registry.list_models()`` lists them with every other model.

``build_model3d(name)`` finds the checkpoint (explicit path > ``$SAMLIVERSEG_<NAME>_CHECKPOINT``
> ``cache_dir()/<filename>``, as for the 2D models in ``build_sam.py``), reads it with
``torch.load(weights_only=True)``, takes the state dict from ``"model_state_dict"`` (the
published files), ``"model"`` or ``"state_dict"`` or the top level, and loads it strictly into
a freshly built :class:`~samliverseg.modeling3d.Sam3DModel`; any other architecture (a 2D SAM,
another size) is rejected with a one-line :class:`CheckpointError` naming the architecture
expected and the one found.

Configurations (from the published SAM-Med3D code, ``build_sam3D_vit_b_ori`` / MedIM's
``SAM-Med3D``):

* ``sam_med3d`` / ``sam_med3d_turbo``: 128^3 input, 16^3 patches (8^3 tokens), ViT-B encoder
  (768 dims, 12 blocks, 12 heads, global attention in blocks 2, 5, 8, 11, the others in a single
  zero-padded 14^3 window), 384-channel embedding (8^3), prompt encoder with 16 mask channels,
  decoder depth 2 / MLP 2048 / 8 heads, IoU head 256; about 101 M parameters. Same
  architecture, two files: ``sam_med3d.pth`` (the original) and ``sam_med3d_turbo.pth``
  (fine-tuned on 44 datasets, including LiTS, MSD liver, SLIVER07, CHAOS, FLARE, WORD,
  TotalSegmentator; the one to use for the liver).
* ``sam_med3d_tiny``: a small configuration (64^3 input, 48-channel embedding) with no published
  weights, for tests and CPU smoke runs (save random weights and pass them as the checkpoint).

Published training checkpoints also hold the optimiser state and the training arguments (an
``argparse.Namespace``); a file whose only non-tensor objects are such plain records
(``argparse.Namespace``, numpy scalars and dtypes) is read with those few classes allowed, still
under ``weights_only=True``. Anything else pickled is refused.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch

from samliverseg.models import weights
from samliverseg.models.specs import SAM3D, FamilyView, ModelEntry, register_spec, unregister_spec
from samliverseg.io import torchfile
from samliverseg.io.torchfile import describe_state_dict

describe_state_dict3d = describe_state_dict  # one diagnosis for 2D and 3D files
from samliverseg.core.devices import resolve_device
from samliverseg.core.errors import InputError, WeightsMissingError
from samliverseg.modeling3d import ImageEncoderViT3D, MaskDecoder3D, PromptEncoder3D, Sam3DModel

#: Where the published weights come from (they are never downloaded by this library).
SAM_MED3D_SOURCE = ("the SAM-Med3D authors publish it at huggingface.co/blueyo0/SAM-Med3D "
                    "(see github.com/uni-medical/SAM-Med3D)")

LAYOUTS = ("ras", "kji")


@dataclass(frozen=True)
class Model3DSpec:
    """How to build a 3D model, where its weights are and how the engine feeds it.

    target_spacing_mm: the isotropic voxel size patches are resampled to (1.5 mm for SAM-Med3D).
    layout: the order of the patient axes in the model's input cube: ``"ras"`` (dims 2, 3, 4 =
    the volume axes closest to R, A, S: the (x, y, z) order of SAM-Med3D's torchio training
    pipeline, whose random flips make each axis' direction immaterial) or ``"kji"`` (the array
    order [k, j, i] as stored, as the authors' inference helpers read SimpleITK arrays).
    clip_hu: CT intensities are clipped to this range before the z-score (training did so).
    """

    name: str
    description: str
    builder: Callable[[], Sam3DModel] = field(repr=False, compare=False)
    checkpoint_filename: str
    architecture: str
    checkpoint_size: Optional[int] = None
    checkpoint_sha256: Optional[str] = None
    source_hint: str = SAM_MED3D_SOURCE
    image_size: int = 128
    target_spacing_mm: float = 1.5
    layout: str = "ras"
    clip_hu: Optional[Tuple[float, float]] = (-1000.0, 1000.0)
    family: str = SAM3D
    test_only: bool = False

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")

    @property
    def env_var(self) -> str:
        return weights.checkpoint_env_var(self.name)


# --------------------------------------------------------------------------- builders

def build_sam3d(
    encoder_embed_dim: int,
    encoder_depth: int,
    encoder_num_heads: int,
    encoder_global_attn_indexes: Sequence[int],
    *,
    image_size: int = 128,
    patch_size: int = 16,
    window_size: int = 14,
    prompt_embed_dim: int = 384,
    mask_in_chans: int = 16,
    decoder_depth: int = 2,
    decoder_mlp_dim: int = 2048,
    decoder_num_heads: int = 8,
    iou_head_hidden_dim: int = 256,
) -> Sam3DModel:
    """An untrained SAM-Med3D-style model (the defaults are SAM-Med3D's; shrink them for tests)."""
    grid = image_size // patch_size
    model = Sam3DModel(
        image_encoder=ImageEncoderViT3D(
            img_size=image_size, patch_size=patch_size, in_chans=1, embed_dim=encoder_embed_dim,
            depth=encoder_depth, num_heads=encoder_num_heads, mlp_ratio=4.0, out_chans=prompt_embed_dim,
            qkv_bias=True, use_abs_pos=True, use_rel_pos=True, window_size=window_size,
            global_attn_indexes=tuple(encoder_global_attn_indexes),
        ),
        prompt_encoder=PromptEncoder3D(
            embed_dim=prompt_embed_dim, image_embedding_size=(grid, grid, grid),
            input_image_size=(image_size, image_size, image_size), mask_in_chans=mask_in_chans,
        ),
        mask_decoder=MaskDecoder3D(
            transformer_dim=prompt_embed_dim, num_multimask_outputs=3, iou_head_depth=3,
            iou_head_hidden_dim=iou_head_hidden_dim, transformer_depth=decoder_depth,
            transformer_mlp_dim=decoder_mlp_dim, transformer_num_heads=decoder_num_heads,
        ),
    )
    return model.eval()


def build_sam_med3d_vit_b() -> Sam3DModel:
    """SAM-Med3D's published architecture (ViT-B, 128^3 input, 384-channel 8^3 embedding)."""
    return build_sam3d(768, 12, 12, (2, 5, 8, 11))


def build_sam_med3d_tiny() -> Sam3DModel:
    """A small SAM-Med3D-shaped model (64^3 input, 4^3 tokens in one padded 6^3 window)."""
    return build_sam3d(32, 2, 2, (1,), image_size=64, window_size=6, prompt_embed_dim=48, mask_in_chans=8,
                       decoder_mlp_dim=64, decoder_num_heads=4, iou_head_hidden_dim=32)


# --------------------------------------------------------------------------- registry

#: The registered 3D models (a live, read-only view of the one store, ``specs.py``).
MODEL3D_REGISTRY = FamilyView(SAM3D)

SAM_MED3D_ARCH = "SAM-Med3D ViT-B (768 dims, 12 blocks, 128^3 input, 384-channel 8^3 embedding)"


def register_model3d(spec: Model3DSpec, replace: bool = False) -> Model3DSpec:
    """Add a 3D model to the one registry."""
    if not isinstance(spec, Model3DSpec):
        raise TypeError(f"register_model3d takes a Model3DSpec, got {type(spec).__name__}")
    return register_spec(spec, replace=replace)


def unregister_model3d(name: str) -> None:
    if name in MODEL3D_REGISTRY:
        unregister_spec(name)


register_model3d(Model3DSpec(
    name="sam_med3d",
    description="SAM-Med3D (native 3D SAM, 128^3 patches at 1.5 mm; the original weights)",
    builder=build_sam_med3d_vit_b,
    checkpoint_filename="sam_med3d.pth",
    architecture=SAM_MED3D_ARCH,
))
register_model3d(Model3DSpec(
    name="sam_med3d_turbo",
    description="SAM-Med3D-turbo (SAM-Med3D fine-tuned on 44 datasets incl. liver CT; recommended)",
    builder=build_sam_med3d_vit_b,
    checkpoint_filename="sam_med3d_turbo.pth",
    architecture=SAM_MED3D_ARCH,
))
register_model3d(Model3DSpec(
    name="sam_med3d_tiny",
    description="a small SAM-Med3D-shaped configuration without published weights (tests, smoke runs)",
    builder=build_sam_med3d_tiny,
    checkpoint_filename="sam_med3d_tiny.pth",
    architecture="SAM-Med3D tiny (32 dims, 2 blocks, 64^3 input, 48-channel 4^3 embedding)",
    source_hint="it has no published weights: save the state dict of build_sam_med3d_tiny() (random or "
                "trained) and pass it",
    image_size=64,
    test_only=True,
))


def is_model3d(name) -> bool:
    """True when ``name`` is a registered 3D model (or a Model3DSpec)."""
    return isinstance(name, Model3DSpec) or (isinstance(name, str) and name in MODEL3D_REGISTRY)


def get_spec3d(name: Union[str, Model3DSpec]) -> Model3DSpec:
    if isinstance(name, Model3DSpec):
        return name
    try:
        return MODEL3D_REGISTRY[name]
    except KeyError:
        raise InputError(f"unknown 3D model {name!r}; choose one of: {', '.join(MODEL3D_REGISTRY)}") from None


# --------------------------------------------------------------------------- checkpoints

def _how_to_get3d(spec: Model3DSpec) -> str:
    return (f"they are not downloaded automatically; get {spec.checkpoint_filename} ({spec.source_hint}) and put it "
            f"in {weights.cache_dir()} as {spec.checkpoint_filename}, set {spec.env_var} to its path, "
            f"or pass --checkpoint FILE")


def missing_message3d(spec: Model3DSpec) -> str:
    return f"the weights of {spec.name} ({spec.architecture}) are missing: {_how_to_get3d(spec)}"


def find_checkpoint3d(name: Union[str, Model3DSpec], checkpoint: Optional[Union[str, os.PathLike]] = None) -> Optional[Path]:
    spec = get_spec3d(name)
    return weights.find_checkpoint(spec.name, spec.checkpoint_filename, checkpoint)


def resolve_checkpoint3d(name: Union[str, Model3DSpec], checkpoint: Optional[Union[str, os.PathLike]] = None) -> Path:
    """The checkpoint path of a 3D model; raises WeightsMissingError saying where to get it."""
    spec = get_spec3d(name)
    path = find_checkpoint3d(spec, checkpoint)
    if path is None:
        raise WeightsMissingError(missing_message3d(spec))
    if spec.checkpoint_sha256 and path.name == spec.checkpoint_filename:
        weights.verify_file(path, spec.checkpoint_size, spec.checkpoint_sha256, None, use_cache=True,
                            what=spec.checkpoint_filename, remedy="get the file again")
    return path


def load_state3d(path: Union[str, os.PathLike]) -> Dict[str, torch.Tensor]:
    """Read a SAM-Med3D checkpoint safely -> its state dict (CheckpointError when unusable)."""
    return torchfile.load_state_dict(path, plain_records=True)


def load_state_strict3d(model: Sam3DModel, state: Mapping, spec: Model3DSpec,
                        source: Union[str, os.PathLike] = "checkpoint") -> None:
    """Load strictly; any missing/unexpected key or shape mismatch -> one-line CheckpointError."""
    torchfile.load_strict(model, state, spec.name, spec.architecture, source)


def build_model3d(name: Union[str, Model3DSpec] = "sam_med3d_turbo",
                  checkpoint: Optional[Union[str, os.PathLike]] = None,
                  device: Union[str, torch.device, None] = "cpu") -> Sam3DModel:
    """Build a registered 3D model, load its weights strictly, attach ``.spec``; eval mode."""
    spec = get_spec3d(name)
    path = resolve_checkpoint3d(spec, checkpoint)
    state = load_state3d(path)
    model = spec.builder()
    load_state_strict3d(model, state, spec, source=path)
    del state
    model.spec = spec
    return model.to(resolve_device(device)).eval()


def count_parameters(model: torch.nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def download_model3d(name: Union[str, Model3DSpec]) -> Path:
    """The weights of a 3D model where they are found; they are never downloaded (WeightsMissingError
    saying where to get them)."""
    return resolve_checkpoint3d(name)


def model_entry(spec: Model3DSpec) -> ModelEntry:
    """The ``samliverseg models`` row of a 3D model: are its weights where build_model3d looks (no loading)?"""
    note = ""
    try:
        path = find_checkpoint3d(spec)
    except WeightsMissingError as exc:
        path, note = None, str(exc)
    return ModelEntry(
        name=spec.name, family=spec.family, interactive=True, description=spec.description,
        present=path is not None, path=str(path) if path is not None else None,
        where="" if path is not None else _how_to_get3d(spec), filename=spec.checkpoint_filename,
        size=spec.checkpoint_size, env_var=spec.env_var, hidden=spec.test_only, note=note)


__all__ = [
    "LAYOUTS", "MODEL3D_REGISTRY", "Model3DSpec", "SAM_MED3D_ARCH", "build_model3d", "build_sam3d",
    "build_sam_med3d_tiny", "build_sam_med3d_vit_b", "count_parameters", "describe_state_dict3d", "download_model3d",
    "find_checkpoint3d", "get_spec3d", "is_model3d", "load_state3d", "load_state_strict3d", "missing_message3d",
    "model_entry",
    "register_model3d", "resolve_checkpoint3d", "unregister_model3d",
]
