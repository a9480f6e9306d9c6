"""Adapter models on disk: writing and loading the ``model.pth`` of trainer kind ``adapter``.

The adapters themselves (modules, ``apply_adapters``, ``adapter_state``) are in
``samliverseg.modeling.adapters``; this module adds what needs files and the registry:

* :func:`save_adapted_model` writes ``{"model": adapter keys (+ trained base parts), "metadata":
  {"kind": "adapter", "base_model", "base_checkpoint", "base_checkpoint_sha256", "adapter",
  "trained_prefixes", "adapter_keys", ...}}`` atomically;
* :func:`load_adapted_model` builds the base model by name (``build_sam``), finds base weights
  whose SHA-256 is the recorded one, inserts the adapters and loads them strictly.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from samliverseg.core.atomic import atomic_path
from samliverseg.core.devices import resolve_device
from samliverseg.core.errors import CheckpointError, InputError, WeightsMissingError
from samliverseg.core.windowing import get_window
from samliverseg.io import torchfile
from samliverseg.modeling.adapters import ADAPTER_KIND, AdapterConfig, adapter_state, apply_adapters, is_adapter_key
from samliverseg.models.build_sam import build_model, find_model_checkpoint, get_spec
from samliverseg.models.exports import read_model_file
from samliverseg.models.weights import sha256_of, verify_file

PathLike = Union[str, os.PathLike]


def save_adapted_model(model: nn.Module, path: PathLike, *, base_model: str, base_checkpoint: Optional[PathLike],
                       trained_prefixes: Sequence[str] = (), state: Optional[Mapping[str, torch.Tensor]] = None,
                       metadata: Optional[Mapping[str, Any]] = None, base_sha256: Optional[str] = None) -> Path:
    """Write an adapter ``model.pth`` atomically: adapter (+ trained base parts) state + metadata.

    ``state`` defaults to ``adapter_state(model, trained_prefixes)``; ``metadata`` adds fields
    (window, target, ...); ``base_sha256`` is computed from ``base_checkpoint`` if absent.
    """
    cfg = getattr(model, "adapter_config", None)
    if cfg is None:
        raise ValueError("the model has no adapters (apply_adapters first)")
    st = dict(state) if state is not None else adapter_state(model, trained_prefixes)
    ckpt = Path(base_checkpoint).expanduser().resolve() if base_checkpoint else None
    if base_sha256 is None and ckpt is not None and ckpt.is_file():
        base_sha256 = sha256_of(ckpt)
    meta = dict(metadata or {})
    meta.update({"kind": ADAPTER_KIND, "base_model": str(base_model),
                 "base_checkpoint": str(ckpt) if ckpt is not None else None,
                 "base_checkpoint_sha256": base_sha256, "adapter": dict(cfg),
                 "trained_prefixes": list(trained_prefixes), "adapter_keys": sorted(k for k in st if is_adapter_key(k))})
    target = Path(path)
    try:
        with atomic_path(target) as tmp:
            torch.save({"model": st, "metadata": meta}, tmp)
    except OSError as exc:
        raise CheckpointError(f"could not write {target}: {exc.strerror or exc}") from None
    return target


def _base_checkpoint(spec, meta: Mapping[str, Any], explicit: Optional[PathLike], source: Path) -> Path:
    """The base weights to build on: an explicit path (only it), else the registry's lookup, then
    the recorded path; the first whose SHA-256 matches the recorded one."""
    candidates: List[Path] = []
    if explicit:  # only what the caller names
        candidates.append(Path(explicit).expanduser())
    else:
        try:
            found = find_model_checkpoint(spec)
        except WeightsMissingError:
            found = None
        if found is not None:
            candidates.append(Path(found))
        if meta.get("base_checkpoint"):
            candidates.append(Path(str(meta["base_checkpoint"])))
    existing: List[Path] = []
    for c in candidates:
        if c.is_file() and all(c.resolve() != e.resolve() for e in existing):
            existing.append(c)
    if not existing:
        raise WeightsMissingError(
            f"the base weights of the adapter model {source} are missing: it adapts {spec.name!r}"
            + (f", trained on {meta['base_checkpoint']}" if meta.get("base_checkpoint") else "")
            + f"; put that checkpoint where `samliverseg models` looks for {spec.name} or set {spec.env_var}")
    want = meta.get("base_checkpoint_sha256")
    if not want:
        return existing[0]
    for c in existing:
        try:
            verify_file(c, sha256=str(want), use_cache=True)
            return c
        except CheckpointError:
            continue
    raise CheckpointError(
        f"the adapter model {source} was trained on {spec.name} weights with SHA-256 {str(want)[:16]}..., but "
        f"{', '.join(str(c) for c in existing)} {'has' if len(existing) == 1 else 'have'} other contents; "
        f"adapters only fit the weights they were trained on")


def load_adapted_model(path: PathLike, device: Union[str, torch.device] = "cpu",
                       base_checkpoint: Optional[PathLike] = None) -> nn.Module:
    """Build an adapter ``model.pth``'s base model, insert its adapters and load them strictly.

    Returns a SamModel (eval mode, on ``device``; ``"auto"`` allowed) that works in
    ``PromptEngine`` / ``SlicePredictor``; ``model.spec`` is the base's spec with its ``window``
    set to the training cache's window, ``model.adapter_metadata`` the file's metadata. A file of
    another kind, unknown keys, missing adapter keys or other shapes raise CheckpointError.
    """
    src = Path(path).expanduser()
    obj = read_model_file(src, kinds=(ADAPTER_KIND,))
    meta = obj["metadata"]
    try:
        cfg = AdapterConfig.from_any(meta.get("adapter") or {})
        spec = get_spec(str(meta.get("base_model")))
    except InputError as exc:
        raise CheckpointError(f"{src}: {exc}") from None
    ckpt = _base_checkpoint(spec, meta, base_checkpoint, src)
    model = build_model(spec, checkpoint=ckpt, device="cpu")
    apply_adapters(model, cfg)
    state = dict(obj["model"])
    prefixes = tuple(str(p) for p in meta.get("trained_prefixes") or ())
    full = model.state_dict()
    expected = [k for k in full if is_adapter_key(k) or (prefixes and k.startswith(prefixes))]
    missing = [k for k in expected if k not in state]
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:  # the file must hold exactly the adapter (+ trained) keys
        raise CheckpointError(f"{src} does not fit {spec.name} with its adapter config: {len(missing)} missing keys "
                              f"({', '.join(missing[:3])}), {len(unexpected)} unexpected keys ({', '.join(unexpected[:3])})")
    torchfile.load_strict(model, {**full, **state}, f"{spec.name} with its adapter config", "the shapes of that config",
                          src)
    window = meta.get("window")
    if isinstance(window, str):
        try:
            get_window(window)
            spec = dataclasses.replace(spec, window=window)
        except InputError:
            pass
    model.spec = spec
    model.adapter_metadata = meta
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(resolve_device(device)).eval()


__all__ = ["load_adapted_model", "save_adapted_model"]
