"""The one reader of trained-model exports: the ``model.pth`` that ``samliverseg train`` writes,
``{"model": state_dict, "metadata": {"kind": ..., ...}}``.

Every loader of a trained kind (``models.adapters``, ``automatic.unet``, ``automatic.student``,
``user_models``) reads the file through :func:`read_model_file` (``io.torchfile.load``:
``weights_only=True``; one-line CheckpointError for anything unreadable or of another kind).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

from samliverseg.core.errors import CheckpointError
from samliverseg.io import torchfile

PathLike = Union[str, os.PathLike]


def infer_kind(meta: Mapping[str, Any], path: PathLike) -> str:
    """The kind of an export's metadata (decoder exports written before ``kind`` existed have a ``base_model``)."""
    kind = meta.get("kind")
    if kind is None and meta.get("base_model"):
        kind = "decoder"
    if not isinstance(kind, str) or not kind:
        raise CheckpointError(f"{path} has no model kind in its metadata; it is not a model exported by "
                              f"`samliverseg train`")
    return kind


def read_model_file(path: PathLike, kinds: Optional[Sequence[str]] = None, mmap: bool = False) -> Dict[str, Any]:
    """``{"model": state_dict, "metadata": {...}}`` of an exported ``model.pth``.

    ``kinds``: the kinds the caller can use (CheckpointError naming them for another kind; None:
    any). ``mmap=True`` maps the tensors instead of reading them (cheap when only the metadata is
    wanted). A missing file, an unreadable one or one that is not an export: CheckpointError.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise CheckpointError(f"{p} is a folder, not a model file" if p.is_dir() else f"model file {p} does not exist")
    obj = torchfile.load(p, mmap=mmap, what="model file")
    if not isinstance(obj, Mapping) or not isinstance(obj.get("metadata"), Mapping) \
            or not isinstance(obj.get("model"), Mapping):
        want = f" of kind {' or '.join(repr(k) for k in kinds)}" if kinds else ""
        raise CheckpointError(f"{p} is a PyTorch file but not a trained model export (expected a model{want}: "
                              f"{{'model': state_dict, 'metadata': {{...}}}}, as `samliverseg train` writes)")
    obj = dict(obj)
    obj["metadata"] = dict(obj["metadata"])
    kind = infer_kind(obj["metadata"], p)
    if kinds and kind not in kinds:
        raise CheckpointError(f"{p} is a model of kind {kind!r}, expected kind {' or '.join(repr(k) for k in kinds)}: "
                              f"use it with its own segmenter, or give the model.pth of a {kinds[0]} training run")
    obj["metadata"].setdefault("kind", kind)
    return obj


__all__ = ["infer_kind", "read_model_file"]
