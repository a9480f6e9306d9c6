"""Open any model by name: the one dispatch from a model name to the object that segments with it.

``open_model(name)`` looks the name up in the one registry (``models.registry.find_model``) and
returns, by the model's family:

* a 2D SAM-family model (``lite_medsam``, ``sam_vit_b``, ``medsam``, ...) or a trained
  interactive model (kinds ``decoder``, ``adapter``): an
  :class:`~samliverseg.interactive.engine.PromptEngine` (a trained model with its own weights and,
  unless ``window`` is given, its training cache's CT window);
* a SAM-Med3D model (``sam_med3d``, ``sam_med3d_turbo``): an
  :class:`~samliverseg.interactive.engine3d.Sam3DEngine`;
* a trained automatic model (kinds ``unet``, ``student``, ``semi``): its segmenter
  (``models.kinds.SEGMENTERS``: ``UNetSegmenter`` / ``StudentSegmenter``), whose
  ``segment_volume(volume)`` segments a whole volume without prompts.

The CLI (``samliverseg segment``), the Slicer module panel and the Segment Editor effect all open
models through it.

Out of GPU memory: :func:`call_with_cpu_fallback` runs a job on the chosen device and, when a GPU
runs out of memory (``core.errors.is_out_of_memory``), once more on the CPU, with a one-line note.
``open_model`` opens through it; callers wrap the first use (open + segment) in it too.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, List, Optional, TypeVar, Union

import torch

from samliverseg.core.errors import InputError, is_out_of_memory, out_of_memory_kind
from samliverseg.interactive.engine import PromptEngine
from samliverseg.interactive.engine3d import Sam3DEngine
from samliverseg.models.kinds import SEGMENTERS, resolve
from samliverseg.models.registry import find_model
from samliverseg.models.specs import SAM3D
from samliverseg.models.user_models import describe_user_model, load_user_model

T = TypeVar("T")

#: The note left when a job moved from the GPU to the CPU.
CPU_FALLBACK_NOTE = "the GPU ran out of memory: switched to CPU (slower); close other GPU programs to use it again"

_log = logging.getLogger("samliverseg")


def _is_gpu(device: Union[str, torch.device, None]) -> bool:
    name = str(device or "auto").lower()
    if name == "auto":
        return torch.cuda.is_available() or bool(getattr(torch.backends, "mps", None)
                                                 and torch.backends.mps.is_available())
    return name.startswith(("cuda", "mps"))


def cpu_fallback_note(exc: BaseException, device: Union[str, torch.device, None]) -> Optional[str]:
    """The note to leave when ``exc``, raised by a job on ``device``, should be retried on the CPU
    (a GPU out of memory), else None (any other error; a job already on the CPU; the CPU's own
    memory exhausted)."""
    if not _is_gpu(device) or not is_out_of_memory(exc) or out_of_memory_kind(exc) == "cpu":
        return None
    return CPU_FALLBACK_NOTE


def call_with_cpu_fallback(job: Callable[[str], T], device: Union[str, torch.device, None] = "auto",
                           notes: Optional[List[str]] = None) -> T:
    """``job(device)``; when a GPU runs out of memory, ``job("cpu")`` once more. The note goes to
    ``notes`` (else to the ``samliverseg`` logger)."""
    try:
        return job(str(device or "auto"))
    except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled, the rest re-raised
        note = cpu_fallback_note(exc, device)
        if note is None:
            raise
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if notes is not None:
        notes.append(note)
    else:
        _log.warning(note)
    return job("cpu")


def open_model(name: str, checkpoint: Optional[str] = None, device: Union[str, torch.device] = "auto",
               window: Optional[str] = None, *, precision: str = "fp32", cache_mb: Optional[float] = None,
               notes: Optional[List[str]] = None, decoder_precision: str = "fp32", **engine_options: Any):
    """The object that segments with the model called ``name`` (see the module docstring).

    checkpoint: weights for a built-in model (a trained model has its own: InputError).
    window: the CT window of a 2D model (None: the model's own, or its training cache's); SAM-Med3D
    z-scores each patch itself and an automatic model windows as its training cache did, so a
    window for them is an InputError, as is a precision or decoder_precision other than fp32.
    cache_mb: the 2D engine's embedding cache (the other families have none). engine_options go to
    the engine (``PromptEngine``: ``settings``, ...; ``Sam3DEngine``: ``settings``).
    Out of GPU memory while opening: opened on the CPU instead (:func:`call_with_cpu_fallback`).
    """
    entry = find_model(name, usable=True)
    if entry.trained and checkpoint:
        raise InputError(f"--checkpoint goes with a built-in model; {name!r} is a trained model with its own weights")
    if entry.trained:
        described = describe_user_model(name)
        if described.automatic:
            _refuse(name, f"an automatic {described.kind} model that windows the CT as its training cache did",
                    window, precision, engine_options, decoder_precision)
            loader = resolve(SEGMENTERS[described.kind])
            return call_with_cpu_fallback(lambda d: loader.load(described.path, d), device, notes)

        def open_trained(d: str) -> PromptEngine:
            loaded = load_user_model(described, device=d)
            return PromptEngine(model=loaded.model, device=d, window=window or loaded.window, precision=precision,
                                decoder_precision=decoder_precision, **_cache(cache_mb), **engine_options)

        return call_with_cpu_fallback(open_trained, device, notes)
    if entry.family == SAM3D:
        _refuse(name, "a 3D model that z-scores the HU of each patch itself", window, precision, {}, decoder_precision)
        return call_with_cpu_fallback(lambda d: Sam3DEngine(name, checkpoint=checkpoint, device=d, **engine_options),
                                      device, notes)
    return call_with_cpu_fallback(
        lambda d: PromptEngine(model=name, checkpoint=checkpoint, device=d, window=window, precision=precision,
                               decoder_precision=decoder_precision, **_cache(cache_mb), **engine_options), device, notes)


def _cache(cache_mb: Optional[float]) -> dict:
    return {} if cache_mb is None else {"cache_mb": cache_mb}


def _refuse(name: str, what: str, window: Optional[str], precision: str, options: dict,
            decoder_precision: str = "fp32") -> None:
    if window:
        raise InputError(f"--window does not apply to {name}: it is {what}")
    for flag, value in (("--precision", precision), ("--decoder-precision", decoder_precision)):
        if value != "fp32":
            raise InputError(f"{flag} {value} is not supported by {name}; leave it at fp32")
    if options:
        raise InputError(f"{name} is {what}; it takes no {', '.join(sorted(options))}")


__all__ = ["CPU_FALLBACK_NOTE", "call_with_cpu_fallback", "cpu_fallback_note", "open_model"]
