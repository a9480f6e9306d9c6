"""Training configuration: a YAML file -> :class:`TrainConfig`.

Example (every key optional except ``cache`` and ``output``)::

    kind: decoder            # the trainer; "decoder" (MedSAM-style mask-decoder fine-tuning)
    cache: /data/cache       # the folder written by `samliverseg prepare`
    output: runs/decoder1    # the run folder: checkpoints, embeddings, log, model.pth
    base_model: lite_medsam  # a registered model (`samliverseg models`)
    checkpoint: null         # base weights (default: the registry's lookup)
    target: liver            # liver: label > 0 (liver incl. tumour); tumor: label == 2
    epochs: 10
    batch_size: 4
    lr: 1.0e-4
    weight_decay: 0.0
    scheduler: constant      # constant | cosine (over all optimiser steps)
    train_prompt_encoder: false
    box_jitter_px: 5         # max random shift of each box side, in model-input pixels
    points_per_slice: 0      # positive points sampled from the label, added to the box
    grad_accum: 1
    seed: 0
    device: auto             # auto (CUDA > MPS > CPU) | cpu | cuda | cuda:1 | mps
    amp: false               # mixed precision, CUDA only
    max_slices_per_case: 16  # cap on the training/validation slices taken from one case

Unknown keys are rejected (:class:`~samliverseg.errors.InputError` naming the key), as are
values of the wrong type or out of range. Relative ``cache``/``output``/``checkpoint`` paths are
resolved against the config file's folder.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import yaml

from ..errors import InputError

KINDS = ("decoder",)
TARGETS = {"liver": "label > 0 (liver including tumour)", "tumor": "label == 2 (tumour)"}
SCHEDULERS = ("constant", "cosine")


@dataclass
class TrainConfig:
    cache: str = ""
    output: str = ""
    kind: str = "decoder"
    base_model: str = "lite_medsam"
    checkpoint: Optional[str] = None
    target: str = "liver"
    epochs: int = 10
    batch_size: int = 4
    lr: float = 1e-4
    weight_decay: float = 0.0
    scheduler: str = "constant"
    train_prompt_encoder: bool = False
    box_jitter_px: int = 5
    points_per_slice: int = 0
    grad_accum: int = 1
    seed: int = 0
    device: str = "auto"
    amp: bool = False
    max_slices_per_case: int = 16

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def label_meaning(self) -> str:
        return TARGETS[self.target]


_TYPES = {f.name: f.type for f in fields(TrainConfig)}


def _check(name: str, value: Any) -> Any:
    t = _TYPES[name]
    if t in ("str", str):
        if not isinstance(value, str) or (name in ("cache", "output") and not value):
            raise InputError(f"config key {name!r} must be a non-empty string, got {value!r}")
    elif t in ("Optional[str]",):
        if value is not None and not isinstance(value, str):
            raise InputError(f"config key {name!r} must be a string or null, got {value!r}")
    elif t in ("bool", bool):
        if not isinstance(value, bool):
            raise InputError(f"config key {name!r} must be true or false, got {value!r}")
    elif t in ("int", int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"config key {name!r} must be an integer, got {value!r}")
    elif t in ("float", float):
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"config key {name!r} must be a number, got {value!r}")
        value = float(value)
    return value


def config_from_dict(data: Mapping[str, Any], base_dir: Optional[Path] = None) -> TrainConfig:
    if not isinstance(data, Mapping):
        raise InputError("the training config must be a YAML mapping (key: value lines)")
    unknown = [k for k in data if k not in _TYPES]
    if unknown:
        raise InputError(f"unknown config key {unknown[0]!r} (known keys: {', '.join(sorted(_TYPES))})")
    values = {k: _check(k, v) for k, v in data.items()}
    cfg = TrainConfig(**values)
    for key in ("cache", "output"):
        if not getattr(cfg, key):
            raise InputError(f"config key {key!r} is required")
    if cfg.kind not in KINDS:
        raise InputError(f"config key 'kind' must be one of {', '.join(KINDS)}, got {cfg.kind!r}")
    if cfg.target not in TARGETS:
        raise InputError(f"config key 'target' must be one of {', '.join(TARGETS)}, got {cfg.target!r}")
    if cfg.scheduler not in SCHEDULERS:
        raise InputError(f"config key 'scheduler' must be one of {', '.join(SCHEDULERS)}, got {cfg.scheduler!r}")
    for key in ("epochs", "batch_size", "grad_accum", "max_slices_per_case"):
        if getattr(cfg, key) < 1:
            raise InputError(f"config key {key!r} must be at least 1, got {getattr(cfg, key)}")
    for key in ("box_jitter_px", "points_per_slice", "weight_decay"):
        if getattr(cfg, key) < 0:
            raise InputError(f"config key {key!r} must not be negative, got {getattr(cfg, key)}")
    if cfg.device != "auto":
        import torch
        try:
            torch.device(cfg.device)
        except (RuntimeError, ValueError):
            raise InputError(f"config key 'device' must be auto, cpu, cuda, cuda:N or mps, got {cfg.device!r}") from None
    if not cfg.lr > 0:
        raise InputError(f"config key 'lr' must be positive, got {cfg.lr}")
    if base_dir is not None:
        for key in ("cache", "output", "checkpoint"):
            v = getattr(cfg, key)
            if v and not Path(v).expanduser().is_absolute():
                setattr(cfg, key, str((base_dir / Path(v)).resolve()))
    return cfg


def load_config(path: Union[str, Path], overrides: Optional[Mapping[str, Any]] = None) -> TrainConfig:
    """Read a YAML config; ``overrides`` (e.g. ``{"output": ...}`` from the CLI) replace its keys."""
    p = Path(path).expanduser()
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"config file {p} not found") from None
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"cannot read the config {p}: {str(exc).splitlines()[0]}") from None
    data = dict(data or {}) if isinstance(data, Mapping) or data is None else data
    if isinstance(data, dict) and overrides:
        data.update({k: v for k, v in overrides.items() if v is not None})
    return config_from_dict(data, base_dir=p.resolve().parent)
