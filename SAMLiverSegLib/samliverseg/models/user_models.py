"""Trained models usable by name: the user models folder.

``samliverseg train`` registers each finished model here, so that ``samliverseg segment --model
NAME`` (and the Slicer module) can use it like a built-in model.

Layout::

    $SAMLIVERSEG_MODELS            (default: <weights cache>/models, see weights.cache_dir())
        NAME/model.pth             the trainer's export: {"model": state_dict, "metadata": {...}}
        NAME/model.json            {"name", "kind", "metadata", "source", "registered",
                                    "model_size", "model_mtime_ns"}: for fast listing only

``model.json`` is a cache of ``model.pth``'s metadata: it is trusted only while the recorded size
and modification time match ``model.pth``; otherwise (missing, stale, unreadable) the metadata is
read from ``model.pth`` itself (memory-mapped, so listing does not read the weights). A folder
whose ``model.pth`` cannot be read is still listed, with its error.

Names: letters, digits, ``-``, ``_`` and ``.``, starting with a letter or digit, at most 100
characters, and not the name of a built-in model (``build_sam.MODEL_REGISTRY``), so that
``--model NAME`` is never ambiguous.

Registration (:func:`register_trained_model`) copies ``model.pth`` and writes ``model.json`` in
a hidden temporary folder beside the target, then renames the folder into place (one
``os.rename``): a reader sees the whole model or nothing. ``replace=True`` moves the old folder
aside first and deletes it after the rename.

Kinds (``metadata["kind"]``, written by each trainer) and what :func:`load_user_model` gives:

* ``decoder`` (MedSAM-style decoder fine-tune): the base SAM (``metadata["base_model"]``) with
  the full state of ``model.pth`` loaded strictly (``build_model(base_model, checkpoint=...)``);
  an interactive (promptable) model for :class:`~samliverseg.interactive.engine.PromptEngine`;
* ``adapter``: ``samliverseg.modeling.adapters.load_adapted_model(path, device)``; interactive;
* ``unet``, ``student``, ``semi`` (:data:`AUTOMATIC_KINDS`): automatic models, no prompts;
  ``segment_volume(model_path, volume, device) -> uint8 mask [k, j, i]`` on the input grid.

The window of an interactive model is the one its training cache was made with
(``metadata["window"]``, else ``metadata["window_hu"]``): the engine must window the CT as the
training images were.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

from samliverseg.core.errors import CheckpointError, InputError

MODELS_ENV = "SAMLIVERSEG_MODELS"
MODEL_FILE = "model.pth"
INFO_FILE = "model.json"

#: Automatic (prompt-free) kinds -> the ``module:function`` that segments a whole volume.
AUTOMATIC_KINDS: Dict[str, str] = {
    "unet": "samliverseg.automatic.unet:segment_volume",
    "student": "samliverseg.automatic.student:segment_volume",
    "semi": "samliverseg.automatic.student:segment_volume",  # a Semi-SAM+ student (semi_trainer.py)
}
#: Interactive (promptable) kinds -> what builds the model (documentation; see load_user_model).
INTERACTIVE_KINDS: Dict[str, str] = {
    "decoder": "samliverseg.models.build_sam:build_model",
    "adapter": "samliverseg.modeling.adapters:load_adapted_model",
}
KINDS = tuple(INTERACTIVE_KINDS) + tuple(AUTOMATIC_KINDS)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")

PathLike = Union[str, os.PathLike]


def models_dir() -> Path:
    """The user models folder: ``$SAMLIVERSEG_MODELS`` or ``<weights cache>/models`` (not created here)."""
    env = os.environ.get(MODELS_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    from samliverseg.models.weights import cache_dir

    return cache_dir() / "models"


def validate_name(name: str) -> str:
    """``name`` if it can name a user model, else InputError saying why."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InputError(f"invalid model name {name!r}: use letters, digits, '-', '_' and '.' (starting with a "
                         f"letter or digit, at most 100 characters)")
    from samliverseg.models.build_sam import MODEL_REGISTRY

    if name in MODEL_REGISTRY:
        raise InputError(f"{name!r} is the name of a built-in model; choose another name for the trained model")
    return name


# ------------------------------------------------------------------------------- metadata
def _json_safe(value: Any) -> Any:
    """Metadata as plain JSON (tensors/arrays -> lists, NaN/inf -> null, paths -> str)."""
    if hasattr(value, "tolist") and callable(value.tolist):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _infer_kind(meta: Mapping[str, Any], path: Path) -> str:
    kind = meta.get("kind")
    if kind is None and meta.get("base_model"):
        kind = "decoder"  # decoder exports written before "kind" was added to the metadata
    if not isinstance(kind, str) or not kind:
        raise CheckpointError(f"{path} has no model kind in its metadata; it is not a model exported by "
                              f"`samliverseg train`")
    return kind


def read_model_metadata(model_path: PathLike) -> Dict[str, Any]:
    """``{"kind": ..., "metadata": {...}}`` of an exported ``model.pth`` (CheckpointError when unreadable)."""
    import torch

    from samliverseg.io.torchfile import first_sentence as _first_sentence

    p = Path(model_path)
    if not p.is_file():
        raise CheckpointError(f"model file {p} does not exist")
    try:
        try:  # memory-mapped: the weights are not read
            obj = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            obj = torch.load(p, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as exc:  # noqa: BLE001 - any failure to read is a checkpoint problem
        reason = _first_sentence(str(exc)) or type(exc).__name__
        raise CheckpointError(f"{p} is not a readable model file (corrupt, truncated or not a PyTorch file: "
                              f"{reason}); train it again or register another file") from None
    if not isinstance(obj, Mapping) or not isinstance(obj.get("metadata"), Mapping) \
            or not isinstance(obj.get("model"), Mapping):
        raise CheckpointError(f"{p} is a PyTorch file but not a trained model export "
                              f"(expected {{'model': state_dict, 'metadata': {{...}}}})")
    meta = _json_safe(dict(obj["metadata"]))
    return {"kind": _infer_kind(meta, p), "metadata": meta}


# ------------------------------------------------------------------------------- listing
@dataclass
class UserModel:
    """One entry of the user models folder."""

    name: str
    folder: Path
    kind: Optional[str] = None
    metadata: Dict[str, Any] = field(default_factory=dict)
    source: Optional[str] = None
    registered: Optional[float] = None
    error: Optional[str] = None  # why model.pth could not be read (the entry is listed anyway)

    @property
    def path(self) -> Path:
        return self.folder / MODEL_FILE

    @property
    def automatic(self) -> bool:
        return self.kind in AUTOMATIC_KINDS

    @property
    def base_model(self) -> Optional[str]:
        return self.metadata.get("base_model")

    @property
    def target(self) -> Optional[str]:
        return self.metadata.get("target")

    @property
    def best_dice(self) -> Optional[float]:
        v = self.metadata.get("best_dice")
        return float(v) if isinstance(v, (int, float)) else None

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "automatic": self.automatic, "base_model": self.base_model,
                "target": self.target, "best_dice": self.best_dice, "path": str(self.path), "source": self.source,
                "registered": self.registered, "error": self.error, "metadata": self.metadata}


def _stamp(path: Path) -> tuple:
    st = path.stat()
    return int(st.st_size), int(st.st_mtime_ns)


def _read_entry(folder: Path) -> UserModel:
    entry = UserModel(name=folder.name, folder=folder)
    model = folder / MODEL_FILE
    info_path = folder / INFO_FILE
    try:
        stamp = _stamp(model)
    except OSError as exc:
        entry.error = f"cannot read {model}: {exc.strerror or exc}"
        return entry
    info: Optional[dict] = None
    with contextlib.suppress(OSError, ValueError):
        info = json.loads(info_path.read_text(encoding="utf-8"))
    if isinstance(info, dict):
        entry.source, entry.registered = info.get("source"), info.get("registered")
        fresh = [info.get("model_size"), info.get("model_mtime_ns")] == list(stamp)
        if fresh and isinstance(info.get("kind"), str) and isinstance(info.get("metadata"), dict):
            entry.kind, entry.metadata = info["kind"], info["metadata"]
            return entry
    try:  # no usable model.json: the metadata from model.pth itself
        read = read_model_metadata(model)
        entry.kind, entry.metadata = read["kind"], read["metadata"]
    except CheckpointError as exc:
        entry.error = str(exc)
    return entry


#: Public name of the folder reader (``samliverseg train`` checks what a name holds).
read_entry = _read_entry


def list_user_models() -> List[UserModel]:
    """Every ``NAME/model.pth`` in the user models folder, sorted by name (hidden folders skipped)."""
    root = models_dir()
    if not root.is_dir():
        return []
    out = []
    for folder in sorted(root.iterdir(), key=lambda p: p.name.lower()):
        if folder.name.startswith(".") or not folder.is_dir() or not (folder / MODEL_FILE).exists():
            continue
        out.append(_read_entry(folder))
    return out


def _available() -> str:
    names = [m.name for m in list_user_models()]
    return ", ".join(names) if names else f"none (train one with `samliverseg train`; folder {models_dir()})"


def user_model_path(name: str) -> Path:
    """``<models>/NAME/model.pth`` of a registered model; InputError listing the names otherwise."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InputError(f"unknown trained model {name!r}; trained models: {_available()}")
    path = models_dir() / name / MODEL_FILE
    if not path.is_file():
        from samliverseg.models.build_sam import MODEL_REGISTRY

        raise InputError(f"unknown model {name!r}; built-in models: {', '.join(MODEL_REGISTRY)}; "
                         f"trained models: {_available()}")
    return path


def get_user_model(name: str) -> UserModel:
    """The listing entry of a registered model (InputError when unknown)."""
    return _read_entry(user_model_path(name).parent)


def is_user_model(name: str) -> bool:
    return isinstance(name, str) and bool(_NAME_RE.match(name)) and (models_dir() / name / MODEL_FILE).is_file()


# ------------------------------------------------------------------------------- registration
def register_trained_model(model_path: PathLike, name: Optional[str] = None, replace: bool = False) -> UserModel:
    """Copy an exported ``model.pth`` into the user models folder as ``NAME`` (atomically).

    ``name`` defaults to the name of the folder holding ``model_path`` (the run folder). An
    existing model of that name is an InputError unless ``replace``. The file is checked first
    (CheckpointError when it is not a readable model export).
    """
    src = Path(model_path).expanduser().resolve()
    read = read_model_metadata(src)
    name = validate_name(name if name is not None else src.parent.name)
    root = models_dir()
    dest = root / name
    if dest.exists() and not replace:
        raise InputError(f"a trained model named {name!r} already exists ({dest}); choose another name or replace it")
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=root))
    except OSError as exc:
        raise CheckpointError(f"cannot write in the user models folder {root}: {exc.strerror or exc} "
                              f"(set {MODELS_ENV} to another folder)") from None
    old: Optional[Path] = None
    try:
        shutil.copyfile(src, tmp / MODEL_FILE)
        with open(tmp / MODEL_FILE, "rb+") as f:
            os.fsync(f.fileno())
        size, mtime = _stamp(tmp / MODEL_FILE)
        info = {"name": name, "kind": read["kind"], "metadata": read["metadata"], "source": str(src),
                "registered": round(time.time(), 3), "model_size": size, "model_mtime_ns": mtime}
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2), encoding="utf-8")
        os.chmod(tmp, 0o755 & ~_umask())
        if dest.exists():  # replace: move the old folder aside, then rename the new one in
            old = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".old", dir=root))
            os.replace(dest, old / name)
        os.rename(tmp, dest)
    except OSError as exc:
        if old is not None and (old / name).exists() and not dest.exists():
            with contextlib.suppress(OSError):
                os.rename(old / name, dest)  # put the previous model back
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise CheckpointError(f"cannot register {src} as {name!r} in {root}: {exc.strerror or exc}; "
                              f"nothing was changed") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return _read_entry(dest)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def name_from(text: str) -> str:
    """A valid model name made from free text (a run folder's name): other characters -> ``-``."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-._")[:100] or "model"
    from samliverseg.models.build_sam import MODEL_REGISTRY

    return f"{name}-trained" if name in MODEL_REGISTRY else name


def unique_name(name: str) -> str:
    """``name``, or ``name-2``, ``name-3``, ... : the first that is not taken in the models folder."""
    name = validate_name(name)
    if not (models_dir() / name).exists():
        return name
    i = 2
    while (models_dir() / f"{name}-{i}").exists():
        i += 1
    return validate_name(f"{name}-{i}")


# ------------------------------------------------------------------------------- loading
@dataclass
class LoadedUserModel:
    """A trained model ready to use.

    Interactive kinds (``decoder``, ``adapter``): ``model`` is a SamModel-like module with
    ``.spec``, for :class:`~samliverseg.interactive.engine.PromptEngine` (use :meth:`engine`). Automatic kinds
    (``unet``, ``student``): ``segment_volume(volume, device)`` runs the kind's inference.
    """

    name: str
    path: Path
    kind: str
    metadata: Dict[str, Any]
    model: Any = None
    _segment: Optional[Callable[..., Any]] = field(default=None, repr=False)

    @property
    def automatic(self) -> bool:
        return self.kind in AUTOMATIC_KINDS

    @property
    def window(self) -> Optional[str]:
        """The CT window of the training cache (a windowing spec), or None when unknown."""
        w = self.metadata.get("window")
        if isinstance(w, str) and w:
            return w
        hu = self.metadata.get("window_hu")
        if isinstance(hu, (list, tuple)) and len(hu) == 2:
            return f"{float(hu[0]):g},{float(hu[1]):g}"
        return None

    def engine(self, device: str = "auto", window: Optional[str] = None, **kwargs: Any):
        """A PromptEngine on this model, windowing as the training cache did (unless ``window``)."""
        if self.automatic:
            raise InputError(f"model {self.name!r} ({self.kind}) is automatic: it takes no prompts; "
                             f"use segment_volume()")
        from samliverseg.interactive.engine import PromptEngine

        return PromptEngine(model=self.model, device=device, window=window or self.window, **kwargs)

    def segment_volume(self, volume, device: str = "auto"):
        """Automatic kinds: the uint8 0/1 mask [k, j, i] of ``volume`` on its grid."""
        if not self.automatic:
            raise InputError(f"model {self.name!r} ({self.kind}) needs prompts; use engine()")
        return self._segment(self.path, volume, device=device)


def _import_target(target: str, kind: str, name: str) -> Callable[..., Any]:
    module, _, attr = target.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise InputError(f"model {name!r} is a {kind!r} model, but this installation cannot run it "
                         f"({target} is not available: {exc})") from None


def describe_user_model(name_or_path: Union[str, PathLike]) -> LoadedUserModel:
    """Name, path, kind and metadata of a registered model (by name) or a ``model.pth`` (by path),
    without building anything (cheap: the weights are not read). Unknown names: InputError listing
    the models; an unreadable file: CheckpointError."""
    candidate = Path(str(name_or_path)).expanduser()
    looks_like_path = isinstance(name_or_path, os.PathLike) or os.sep in str(name_or_path) \
        or str(name_or_path).endswith((".pth", ".pt"))
    if looks_like_path or (candidate.is_file() and not is_user_model(str(name_or_path))):
        path, name = candidate, candidate.parent.name
        if not path.is_file():
            raise InputError(f"model file {path} does not exist")
    else:
        name = str(name_or_path)
        path = user_model_path(name)
    read = read_model_metadata(path)
    return LoadedUserModel(name=name, path=path, kind=read["kind"], metadata=read["metadata"])


def load_user_model(name_or_path: Union[str, PathLike, LoadedUserModel], device: str = "cpu") -> LoadedUserModel:
    """Load a registered model by name, or an exported ``model.pth`` by path; dispatch on its kind.

    ``decoder``: the base model with the full state loaded strictly; ``adapter``:
    ``load_adapted_model``; automatic kinds: their ``segment_volume`` (imported here, so that a
    missing module is reported now). Also accepts what :func:`describe_user_model` returned.
    """
    loaded = name_or_path if isinstance(name_or_path, LoadedUserModel) else describe_user_model(name_or_path)
    name, path, kind, meta = loaded.name, loaded.path, loaded.kind, loaded.metadata
    if kind in AUTOMATIC_KINDS:
        loaded._segment = _import_target(AUTOMATIC_KINDS[kind], kind, name)
    elif kind == "decoder":
        from samliverseg.models.build_sam import MODEL_REGISTRY, build_model

        base = meta.get("base_model")
        if base not in MODEL_REGISTRY:
            raise InputError(f"model {name!r} was fine-tuned from {base!r}, which is not a model of this "
                             f"installation (built-in: {', '.join(MODEL_REGISTRY)})")
        loaded.model = build_model(base, checkpoint=path, device=device)
    elif kind == "adapter":
        load = _import_target(INTERACTIVE_KINDS["adapter"], kind, name)
        loaded.model = load(path, device)
    else:
        raise CheckpointError(f"{path} is a model of kind {kind!r}, which this version of samliverseg does not "
                              f"know (known kinds: {', '.join(KINDS)})")
    return loaded


__all__ = [
    "AUTOMATIC_KINDS", "INTERACTIVE_KINDS", "KINDS", "LoadedUserModel", "MODELS_ENV", "UserModel",
    "describe_user_model", "get_user_model", "is_user_model", "list_user_models", "load_user_model", "models_dir",
    "name_from", "read_model_metadata",
    "register_trained_model", "unique_name", "user_model_path", "validate_name",
]
