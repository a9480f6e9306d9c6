"""The one module that reads torch files: safe loading, state-dict unwrapping, strict loading with
a diagnosis of what a file is.

* :func:`load` is ``torch.load(map_location="cpu", weights_only=True)`` with every failure turned
  into a one-line :class:`CheckpointError` (:class:`WeightsMissingError` for a missing file).
  ``plain_records=True`` also admits the few plain-data classes that published training
  checkpoints carry (``argparse.Namespace``, numpy scalars and dtypes), still under
  ``weights_only``; anything else pickled is refused.
* :func:`state_dict_of` takes the tensors out of a loaded object (top level, or under
  ``model_state_dict`` / ``model`` / ``state_dict``; a ``module.`` prefix from (Distributed)
  DataParallel is removed).
* :func:`load_strict` loads a state dict strictly into a model; a mismatch raises a one-line
  CheckpointError naming what the file looks like (:func:`describe_state_dict`).
"""

from __future__ import annotations

import argparse
import os
import pickle
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Dict, List, Sequence, Union

import torch

from samliverseg.core.errors import CheckpointError, WeightsMissingError

PathLike = Union[str, os.PathLike]

#: What torch.load raises on a file that is not a readable torch file.
READ_ERRORS = (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, AttributeError, TypeError,
               IndexError, KeyError, UnicodeDecodeError, MemoryError)
STATE_KEYS = ("model_state_dict", "model", "state_dict")


def first_sentence(text: str, limit: int = 120) -> str:
    """The first sentence of an exception text (torch's are long), without terminal colours."""
    text = text.replace("\x1b[1m", "").replace("\x1b[0m", "")
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    text = lines[0] if lines else ""
    for stop in (". ", "; "):
        if stop in text:
            text = text.split(stop, 1)[0]
    return text[:limit]


def plain_record_globals() -> List[Any]:
    """Classes that published training checkpoints carry besides tensors and that hold plain data."""
    import numpy as np

    allowed: List[Any] = [argparse.Namespace, np.dtype]
    for module_name in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            module = __import__(module_name, fromlist=["scalar"])
            allowed.append(getattr(module, "scalar"))
        except (ImportError, AttributeError):
            pass
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, n) for n in ("Float64DType", "Float32DType", "Int64DType", "Int32DType", "BoolDType")
                    if hasattr(dtypes, n)]
    return allowed


def global_name(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', getattr(obj, '__name__', ''))}"


def _load_with_plain_records(p: Path, mmap: bool) -> Any:
    try:
        return torch.load(p, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as first:
        try:
            needed = set(torch.serialization.get_unsafe_globals_in_checkpoint(p))
        except Exception:  # not a zip checkpoint: report the first error
            raise first from None
        allowed = plain_record_globals()
        names = {global_name(a) for a in allowed}
        aliases = ({n.replace("numpy._core", "numpy.core") for n in names}
                   | {n.replace("numpy.core", "numpy._core") for n in names})
        if not needed or not needed <= (names | aliases):
            raise first from None
        with torch.serialization.safe_globals(allowed):
            return torch.load(p, map_location="cpu", weights_only=True, mmap=mmap)


def load(path: PathLike, *, plain_records: bool = False, mmap: bool = False, what: str = "PyTorch checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; failures -> one-line CheckpointError.

    ``mmap=True`` maps the tensors instead of reading them (zip files only; a legacy file is read
    normally). ``what`` names the file in messages ("training checkpoint", ...). The warnings
    torch gives while reading a file it then cannot read (e.g. "Detected pickle protocol 7" for
    a file that starts with byte 0x80) are dropped: the error's one line says it; those of a file
    that loads are given as they came."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        obj = _load(Path(path), plain_records, mmap, what)
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return obj


def _load(p: Path, plain_records: bool, mmap: bool, what: str) -> Any:
    try:
        try:
            return _load_with_plain_records(p, mmap) if plain_records else torch.load(
                p, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as exc:
            if mmap and "mmap" in str(exc):  # a legacy (non-zip) file cannot be mapped
                return _load(p, plain_records, False, what)
            raise
    except FileNotFoundError:
        raise WeightsMissingError(f"{what} file {p} does not exist") from None
    except IsADirectoryError:
        raise CheckpointError(f"{p} is a folder, not a {what} file") from None
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "can still be loaded" in text or "Unsupported global" in text:
            reason = ("it holds pickled Python objects (a whole model?), which are not loaded for safety; "
                      "save model.state_dict() instead")
        else:
            reason = f"corrupt, truncated or not a PyTorch file: {first_sentence(text)}"
        raise CheckpointError(f"{p} is not a readable {what} ({reason})") from None
    except READ_ERRORS as exc:
        raise CheckpointError(f"{p} is not a readable {what} (corrupt, truncated or not a PyTorch file: "
                              f"{first_sentence(str(exc)) or type(exc).__name__})") from None


def state_dict_of(obj: Any, source: PathLike = "checkpoint", keys: Sequence[str] = STATE_KEYS) -> Dict[str, torch.Tensor]:
    """The state dict inside a loaded object (CheckpointError when it holds none)."""
    state = obj
    if isinstance(obj, Mapping):
        for key in keys:
            if isinstance(obj.get(key), Mapping):
                state = obj[key]
                break
    if not isinstance(state, Mapping) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{source} is a PyTorch file but holds no model state dict")
    state = dict(state)
    if all(k.startswith("module.") for k in state):  # saved from (Distributed)DataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_state_dict(path: PathLike, *, plain_records: bool = False, keys: Sequence[str] = STATE_KEYS) -> Dict[str, torch.Tensor]:
    """:func:`load` then :func:`state_dict_of`."""
    return state_dict_of(load(path, plain_records=plain_records), path, keys)


def describe_state_dict(state: Mapping) -> str:
    """A guess of what architecture a state dict belongs to (for error messages)."""
    keys = list(state)
    if any(k.startswith("image_encoder.layers.") for k in keys):
        return "a LiteMedSAM/TinyViT checkpoint"
    pos = state.get("image_encoder.pos_embed")
    if pos is not None and getattr(pos, "ndim", 0) == 4:
        depth = len({k.split(".")[2] for k in keys if k.startswith("image_encoder.blocks.")})
        names = {768: "ViT-B", 1024: "ViT-L", 1280: "ViT-H"}
        return f"a SAM {names.get(int(pos.shape[-1]), 'ViT')} checkpoint (embed {int(pos.shape[-1])}, {depth} blocks)"
    if pos is not None and getattr(pos, "ndim", 0) == 5:
        depth = len({k.split(".")[2] for k in keys if k.startswith("image_encoder.blocks.")})
        grid = int(pos.shape[1])
        patch = state.get("image_encoder.patch_embed.proj.weight")
        side = grid * int(patch.shape[-1]) if patch is not None and patch.ndim == 5 else None
        emb = state.get("prompt_encoder.no_mask_embed.weight")
        out = f", {int(emb.shape[-1])}-channel embedding" if emb is not None else ""
        cube = f", {side}^3 input" if side else ""
        return f"a SAM-Med3D-style checkpoint ({int(pos.shape[-1])} dims, {depth} blocks{cube}{out})"
    if any(k.startswith("image_encoder.trunk.") for k in keys):
        return "a SAM 2 checkpoint"
    if not any(k.startswith(("image_encoder.", "prompt_encoder.", "mask_decoder.")) for k in keys):
        return "not a Segment-Anything-style checkpoint"
    return "an unknown Segment-Anything-style checkpoint"


def _examples(items: List[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")


def load_strict(model: torch.nn.Module, state: Mapping, name: str, expected: str,
                source: PathLike = "checkpoint") -> None:
    """Load ``state`` strictly into ``model``; any missing/unexpected key or shape mismatch raises a
    one-line CheckpointError: ``<source> does not fit <name>, which expects <expected>: it looks
    like <describe_state_dict>; <problems>``."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                  for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys ({_examples(missing)})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys ({_examples(unexpected)})")
        if mismatched:
            problems.append(f"{len(mismatched)} shape mismatches (checkpoint vs model: {_examples(mismatched, 2)})")
        raise CheckpointError(f"{source} does not fit {name}, which expects {expected}: it looks like "
                              f"{describe_state_dict(state)}; {'; '.join(problems)}")
    model.load_state_dict(state, strict=True)
