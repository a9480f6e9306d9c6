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
    model_name: null         # name under which the finished model is registered (default: the
                             # run folder's name); see `samliverseg models`

Kind-specific options live in a section named after the kind (``unet:``, ``adapter:``,
``student:``, ``semi:``), a mapping validated against that trainer's options dataclass
(``models.kinds``: ``Kind.options``, e.g. ``UNetOptions`` in ``training/unet.py``) with the same rules::

    kind: unet
    unet:
      patch_size: [128, 128, 128]

Unknown keys are rejected (:class:`~samliverseg.core.errors.InputError` naming the key), as are
values of the wrong type or out of range. Relative ``cache``/``output``/``checkpoint`` paths are
resolved against the config file's folder.

``describe_keys()`` (the text of ``samliverseg train --help``) and ``example_config(kind)``
(``samliverseg train --example-config KIND``) are generated from these dataclasses and from
``models.kinds``, so they cannot drift from what the loader accepts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import yaml

from samliverseg.core.errors import InputError
from samliverseg.models.kinds import KIND_NAMES, KINDS, resolve

#: The kinds with a config section of their own (validated by ``Kind.options``, imported lazily
#: so that a config load imports one trainer only).
SECTION_KINDS = tuple(k for k in KIND_NAMES if KINDS[k].options)
TARGETS = {"liver": "label > 0 (liver including tumour)", "tumor": "label == 2 (tumour)"}
SCHEDULERS = ("constant", "cosine")


@dataclass
class TrainConfig:
    cache: str = ""  # the folder written by `samliverseg prepare` (required)
    output: str = ""  # the run folder: checkpoints, embeddings, train.log, model.pth (required)
    kind: str = "decoder"  # the trainer kind (listed above)
    base_model: str = "lite_medsam"  # a registered SAM-family model (`samliverseg models`); not unet
    checkpoint: Optional[str] = None  # base weights (default: the registry's lookup); unet: a unet model.pth to start from
    target: str = "liver"  # liver: label > 0 (liver incl. tumour); tumor: label == 2
    epochs: int = 10
    batch_size: int = 4  # samples per process and micro-batch (unet: see unet.batch_cases)
    lr: float = 1e-4  # Adam learning rate (unet: unet.lr; semi: the base of the poly schedule)
    weight_decay: float = 0.0
    scheduler: str = "constant"  # constant | cosine (over all optimiser steps); not unet/semi
    train_prompt_encoder: bool = False  # decoder/adapter: also train the prompt encoder
    box_jitter_px: int = 5  # decoder/adapter: max random shift of each box side (model-input pixels)
    points_per_slice: int = 0  # decoder/adapter: positive points sampled from the label, added to the box
    grad_accum: int = 1  # micro-batches per optimiser step
    seed: int = 0
    device: str = "auto"  # auto (CUDA > MPS > CPU) | cpu | cuda | cuda:1 | mps
    amp: bool = False  # mixed precision, CUDA only
    max_slices_per_case: int = 16  # decoder/adapter: slices per case; semi: the block of slices per case
    model_name: Optional[str] = None  # name under which the finished model is registered (default: the run folder's)
    unet: Dict[str, Any] = field(default_factory=dict)
    adapter: Dict[str, Any] = field(default_factory=dict)
    student: Dict[str, Any] = field(default_factory=dict)
    semi: Dict[str, Any] = field(default_factory=dict)

    def options(self, kind: Optional[str] = None) -> Any:
        """The validated options dataclass of ``kind``'s section (default: this run's kind)."""
        kind = kind or self.kind
        return options_from_dict(_options_class(kind), getattr(self, kind) or {}, kind)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def label_meaning(self) -> str:
        return TARGETS[self.target]


_TYPES = {f.name: f.type for f in fields(TrainConfig)}


def _number(name: str, value: Any, integer: bool) -> Any:
    if integer:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"config key {name!r} must be an integer, got {value!r}")
        return value
    if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"config key {name!r} must be a number, got {value!r}")
    return float(value)


def _check(name: str, value: Any, t: Any = None) -> Any:
    t = _TYPES[name] if t is None else t
    t = getattr(t, "__name__", t) if isinstance(t, type) else str(t).replace("typing.", "")
    if t.startswith("Optional[") and value is None:
        return None
    if t in ("Optional[int]", "Optional[float]", "Optional[bool]"):
        t = t[len("Optional["):-1]
    if t in ("List[int]", "List[float]", "Optional[List[int]]", "Optional[List[float]]"):
        if not isinstance(value, (list, tuple)):
            raise InputError(f"config key {name!r} must be a list, got {value!r}")
        return [_number(name, v, "int" in t) for v in value]
    if t in ("Dict[str, Any]",):
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise InputError(f"config key {name!r} must be a mapping (indented key: value lines), got {value!r}")
        return dict(value)
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
        value = _number(name, value, True)
    elif t in ("float", float):
        value = _number(name, value, False)
    return value


def _options_class(kind: str) -> type:
    target = KINDS[kind].options if kind in KINDS else None
    if target is None:
        raise InputError(f"trainer kind {kind!r} has no options section")
    try:
        return resolve(target)
    except (ImportError, AttributeError):
        raise InputError(f"trainer kind {kind!r} is not available in this installation") from None


def options_from_dict(cls: type, data: Mapping[str, Any], section: str) -> Any:
    """Validate ``data`` against the dataclass ``cls`` (unknown keys and bad types rejected)."""
    if not isinstance(data, Mapping):
        raise InputError(f"config section {section!r} must be a mapping")
    types = {f.name: f.type for f in fields(cls)}
    unknown = [k for k in data if k not in types]
    if unknown:
        raise InputError(f"unknown config key {section}.{unknown[0]} (known keys of {section!r}: "
                         f"{', '.join(sorted(types)) or 'none'})")
    values = {k: _check(f"{section}.{k}", v, types[k]) for k, v in data.items()}
    opts = cls(**values)
    check = getattr(opts, "validate", None)
    if callable(check):
        check()  # raises InputError naming the key
    return opts


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
        raise InputError(f"config key 'kind' must be one of {', '.join(KIND_NAMES)}, got {cfg.kind!r}")
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
    for kind in SECTION_KINDS:  # a section is validated when present or when it is the run's kind
        if getattr(cfg, kind) or kind == cfg.kind:
            cfg.options(kind)
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


# ---------------------------------------------------------------------------- generated help
#: Common keys a kind does not use (left out of its example config; the trainers say why).
UNUSED_KEYS = {
    "unet": ("base_model", "lr", "batch_size", "scheduler", "train_prompt_encoder", "box_jitter_px",
             "points_per_slice", "max_slices_per_case"),
    "student": ("train_prompt_encoder", "box_jitter_px", "points_per_slice", "max_slices_per_case"),
    "semi": ("scheduler", "train_prompt_encoder", "box_jitter_px", "points_per_slice"),
}
_REQUIRED = {"cache": "/path/to/cache", "output": "runs/{kind}1"}


def _field_comments(cls: type) -> Dict[str, str]:
    """``name -> comment`` from the ``name: type = default  # comment`` lines of a dataclass (and
    its bases): the one place a key is described is beside its definition."""
    import inspect
    import re
    out: Dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):
            continue
        for line in lines:
            m = re.match(r"\s+(\w+)\s*:[^=#]*=.*?#\s*(.+)$", line)
            if m:
                out[m.group(1)] = m.group(2).strip()
    return out


def _defaults(cls: type) -> List[tuple]:
    """``(name, type text, default)`` of a dataclass's fields (sections left out)."""
    rows = []
    for f in fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        if isinstance(default, dict):
            continue
        t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        rows.append((f.name, str(t).replace("typing.", ""), default))
    return rows


def _yaml_value(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    return text[:-4].strip() if text.endswith("\n...") else text.replace("\n...", "")


def describe_keys() -> str:
    """The text of ``samliverseg train --help``: the kinds and every config key with its default."""
    lines = ["trainer kinds (config key `kind`):"]
    for name in KIND_NAMES:
        lines.append(f"  {name:<9} {KINDS[name].summary}")
    lines += ["", "common config keys (key: type = default  # meaning):"]
    notes = _field_comments(TrainConfig)
    for name, t, default in _defaults(TrainConfig):
        note = f"  # {notes[name]}" if name in notes else ""
        lines.append(f"  {name}: {t} = {_yaml_value(default)}{note}")
    for kind in SECTION_KINDS:
        try:
            cls = _options_class(kind)
        except InputError:
            lines += ["", f"section `{kind}:` (not available in this installation)"]
            continue
        notes = _field_comments(cls)
        lines += ["", f"section `{kind}:` (kind {kind} only):"]
        for name, t, default in _defaults(cls):
            note = f"  # {notes[name]}" if name in notes else ""
            lines.append(f"  {kind}.{name}: {t} = {_yaml_value(default)}{note}")
    lines += ["", "Unknown keys are rejected by name. `--example-config KIND` prints a commented config."]
    return "\n".join(lines)


def example_config(kind: str) -> str:
    """A commented YAML config of ``kind`` with every key it uses at its default; it runs as is
    once ``cache`` (and ``output``) name real folders."""
    if kind not in KINDS:
        raise InputError(f"unknown trainer kind {kind!r}; known: {', '.join(KIND_NAMES)}")
    out = [f"# samliverseg train --config THIS.yaml: trainer kind {kind!r}",
           f"# {KINDS[kind].summary}", "# every key is optional except cache and output; shown at its default", ""]
    notes = _field_comments(TrainConfig)
    unused = set(UNUSED_KEYS.get(kind, ()))
    for name, _, default in _defaults(TrainConfig):
        if name in unused:
            continue
        value = kind if name == "kind" else _REQUIRED[name].format(kind=kind) if name in _REQUIRED else default
        note = f"  # {notes[name]}" if name in notes else ""
        out.append(f"{name}: {_yaml_value(value)}{note}")
    if KINDS[kind].options:
        cls = _options_class(kind)
        notes = _field_comments(cls)
        out.append(f"{kind}:")
        for name, _, default in _defaults(cls):
            note = f"  # {notes[name]}" if name in notes else ""
            out.append(f"  {name}: {_yaml_value(default)}{note}")
    return "\n".join(out) + "\n"
