"""Training checkpoints: written atomically, checked on resume.

A checkpoint is a ``torch.save`` dict (loadable with ``weights_only=True``)::

    {"format": "samliverseg-train-checkpoint", "version": 1,
     "kind": "decoder", "model": {trainable state: "mask_decoder.*" (+ "prompt_encoder.*")},
     "trainable_keys": [...], "optimizer": ..., "scheduler": ..., "scaler": ... | None,
     "epoch": int, "batch_in_epoch": int, "step": int, "best_dice": float | None,
     "rng": {"torch": ByteTensor, "numpy": (...), "python": (...), "trainer": ByteTensor, "cuda": [...]},
     "config": {config as a dict}, "metadata": {"base_model", "window", "spacing", "label_meaning",
     "target", "image_size", ...}, "history": [...]}

``save_checkpoint`` writes to a temporary file in the target's folder, flushes and fsyncs it and
renames it over the target (``os.replace``); on any failure (a full disk: ``ENOSPC``, a read-only
folder) the temporary file is removed, the previous checkpoint is left as it was and a
:class:`~samliverseg.core.errors.CheckpointError` says what happened. ``writer(obj, file)`` is the
function that serialises into the open temporary file (``torch.save`` by default); it is a
parameter so that a test can point it at ``/dev/full``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, Mapping, Optional, Union

import numpy as np
import torch

from samliverseg.core.atomic import atomic_path
from samliverseg.core.errors import CheckpointError, DiskFullError, SAMLiverSegError
from samliverseg.io import torchfile

FORMAT = "samliverseg-train-checkpoint"
VERSION = 1
LAST_NAME = "last.pt"
BEST_NAME = "best.pt"
MODEL_NAME = "model.pth"

#: Config keys that must match for a resume (the run would be another run otherwise).
RESUME_KEYS = ("kind", "base_model", "target", "train_prompt_encoder")


def _torch_writer(obj: Any, f: BinaryIO) -> None:
    torch.save(obj, f)


def save_checkpoint(obj: Mapping[str, Any], path: Union[str, os.PathLike],
                    writer: Callable[[Any, BinaryIO], None] = _torch_writer) -> Path:
    """Write ``obj`` to ``path`` through the one atomic writer (``core.atomic.atomic_path``: a
    temporary file beside it, fsync, rename). Any failure is a one-line CheckpointError (exit 3, a
    full disk included) and leaves the previous checkpoint as it was."""
    target = Path(path)
    try:
        with atomic_path(target) as tmp:
            with open(tmp, "wb") as f:
                writer(obj, f)
    except DiskFullError:
        raise CheckpointError(f"disk full: cannot write {target} (the disk is full); the previous checkpoint "
                              f"(if any) is unchanged: free some space and continue with --resume") from None
    except (SAMLiverSegError, OSError, RuntimeError) as exc:  # torch.save re-raises a failed write as a RuntimeError
        if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            why = f"no permission to write in {target.parent}"
        elif isinstance(exc, OSError):
            why = exc.strerror or str(exc)
        else:
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"cannot write the checkpoint {target}: {why}; the previous checkpoint "
                              f"(if any) is unchanged") from None
    return target


def load_checkpoint(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Read a training checkpoint (weights_only, :mod:`samliverseg.io.torchfile`); CheckpointError
    when missing/corrupt/foreign."""
    p = Path(path)
    obj = torchfile.load(p, what="training checkpoint")
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{p} is not a samliverseg training checkpoint")
    if int(obj.get("version", 0)) > VERSION:
        raise CheckpointError(f"{p} was written by a newer samliverseg (checkpoint version {obj.get('version')})")
    return obj


def check_resume(ckpt: Mapping[str, Any], path: Union[str, os.PathLike], expected_config: Mapping[str, Any],
                 expected_trainable_keys: Optional[Any] = None) -> None:
    """Check that the loaded ``ckpt`` belongs to a run of ``expected_config``.

    Raises CheckpointError naming the first difference: trainer kind, base model, target,
    trained parts, or the set of trainable parameter names.
    """
    cfg = ckpt.get("config") or {}
    for key in RESUME_KEYS:
        if key in expected_config and cfg.get(key) != expected_config.get(key):
            raise CheckpointError(f"cannot resume from {path}: it was made with {key}={cfg.get(key)!r}, "
                                  f"the config says {key}={expected_config.get(key)!r}")
    if expected_trainable_keys is not None:
        have, want = set(ckpt.get("trainable_keys") or []), set(expected_trainable_keys)
        if have != want:
            diff = sorted(have ^ want)
            raise CheckpointError(f"cannot resume from {path}: its trainable parameters differ from this model's "
                                  f"({len(diff)} differ, e.g. {', '.join(diff[:3])})")


def load_for_resume(path: Union[str, os.PathLike], expected_config: Mapping[str, Any],
                    expected_trainable_keys: Optional[Any] = None) -> Dict[str, Any]:
    """:func:`load_checkpoint` + :func:`check_resume`."""
    ckpt = load_checkpoint(path)
    check_resume(ckpt, path, expected_config, expected_trainable_keys)
    return ckpt


# ---------------------------------------------------------------------------- RNG states
def rng_state(trainer_generator: Optional[torch.Generator] = None) -> Dict[str, Any]:
    """torch/numpy/python (+ trainer generator, CUDA) RNG states in a weights_only-safe form."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    py = random.getstate()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [str(name), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": [int(py[0]), list(py[1]), py[2]],
    }
    if trainer_generator is not None:
        state["trainer"] = trainer_generator.get_state()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any], trainer_generator: Optional[torch.Generator] = None) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if trainer_generator is not None and "trainer" in state:
        trainer_generator.set_state(state["trainer"])
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError):
            torch.cuda.set_rng_state_all(state["cuda"])
