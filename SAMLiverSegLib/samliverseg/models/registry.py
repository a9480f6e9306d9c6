"""The one model registry: every model a user can name, through one listing and one lookup.

* the SAM family (``build_sam.py``: LiteMedSAM, SAM ViT-B/L/H, MedSAM; family ``"sam2d"``),
* SAM-Med3D (``build_sam3d.py``: ``sam_med3d``, ``sam_med3d_turbo``; family ``"sam3d"``;
  ``sam_med3d_tiny`` is a hidden configuration for tests),
* the trained models of the user models folder (``user_models.py``; family = their kind,
  ``models.kinds``).

:func:`list_models` gives a :class:`~samliverseg.models.specs.ModelEntry` for each (built-in ones
first, in registration order, then the trained ones by name); ``samliverseg models``, the Slicer
module panel and the effect's model list read it. :func:`find_model` is the lookup by name that
``samliverseg.api.open_model`` dispatches on. :func:`download_model` fetches (or locates) the
weights of a built-in model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Optional

from samliverseg.core.errors import CheckpointError, InputError
from samliverseg.models import build_sam, build_sam3d, user_models
from samliverseg.models.specs import SAM2D, SAM3D, ModelEntry, builtin_specs, is_builtin

#: Family of built-in models -> the module that builds them (each has ``model_entry(spec)``).
_FAMILIES = {SAM2D: build_sam, SAM3D: build_sam3d}


def builtin_entry(name: str) -> ModelEntry:
    """The entry of a built-in model (InputError when ``name`` is not one)."""
    for spec in builtin_specs():
        if spec.name == name:
            return _FAMILIES[spec.family].model_entry(spec)
    raise InputError(f"unknown built-in model {name!r}; built-in models: {', '.join(builtin_names())}")


def builtin_names(include_hidden: bool = False) -> List[str]:
    return [s.name for s in builtin_specs() if include_hidden or not getattr(s, "test_only", False)]


def list_models(include_hidden: bool = False, trained: bool = True) -> List[ModelEntry]:
    """Every model: the built-in ones (with their weights' status), then the trained ones."""
    rows = [_FAMILIES[s.family].model_entry(s) for s in builtin_specs()]
    rows = [r for r in rows if include_hidden or not r.hidden]
    if trained:
        rows += [user_models.model_entry(m) for m in user_models.list_user_models()]
    return rows


def find_model(name: str, usable: bool = False) -> ModelEntry:
    """The entry of the model called ``name`` (built-in or trained). An unknown name: InputError
    listing the built-in and the trained models. ``usable=True``: a trained model that cannot be
    used (unreadable file, unknown kind) is a CheckpointError saying why."""
    if is_builtin(name):
        return builtin_entry(name)
    if not user_models.is_user_model(name):
        trained = [m.name for m in user_models.list_user_models()]
        raise InputError(f"unknown model {name!r}; built-in models: {', '.join(builtin_names())}; trained models: "
                         f"{', '.join(trained) if trained else f'none (folder {user_models.models_dir()})'}")
    entry = user_models.model_entry(user_models.get_user_model(name))
    if usable and not entry.present:
        raise CheckpointError(entry.info.get("error") or f"{entry.path}: {entry.description}")
    return entry


def download_model(name: str, progress: Optional[Callable[[int, Optional[int]], None]] = None) -> Path:
    """The weights of a built-in model, downloaded into the cache when it has an official URL
    (SHA-256 checked); WeightsMissingError saying where to get them otherwise."""
    entry = find_model(name)
    if entry.trained:
        raise InputError(f"{name!r} is a trained model: its weights are its model.pth ({entry.path}); "
                         f"there is nothing to download")
    if entry.family == SAM3D:
        return build_sam3d.download_model3d(name)
    return build_sam.download_model(name, progress=progress)


__all__ = ["builtin_entry", "builtin_names", "download_model", "find_model", "list_models"]
