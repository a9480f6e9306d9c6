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
characters, and not the name of a built-in model of any family (``specs.is_builtin``: the SAM
family and SAM-Med3D), so that ``--model NAME`` is never ambiguous.

Registration (:func:`register_trained_model`) copies ``model.pth`` and writes ``model.json`` in
a hidden temporary folder beside the target, then renames the folder into place (one
``os.rename``): a reader sees the whole model or nothing. ``replace=True`` moves the old folder
aside first and deletes it after the rename.

Kinds (``metadata["kind"]``, written by each trainer; the table is ``models.kinds``) and what
:func:`load_user_model` gives for the interactive ones:

* ``decoder`` (MedSAM-style decoder fine-tune): the base SAM (``metadata["base_model"]``) with
  the full state of ``model.pth`` loaded strictly (``build_model(base_model, checkpoint=...)``);
* ``adapter``: ``models.adapters.load_adapted_model(path, device)``.

Automatic kinds (``unet``, ``student``, ``semi``) are loaded by ``automatic/`` (a layer above);
``samliverseg.api.open_model(name)`` opens any model, trained or built-in, as the object that
segments with it.

The window of an interactive model is the one its training cache was made with
(``metadata["window"]``, else ``metadata["window_hu"]``): the engine must window the CT as the
training images were.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from samliverseg.core.errors import CheckpointError, InputError
from samliverseg.core.jsonutil import json_safe
from samliverseg.models import build_sam3d  # noqa: F401  (registers the 3D family: their names are taken)
from samliverseg.models.adapters import load_adapted_model
from samliverseg.models.build_sam import build_model, get_spec
from samliverseg.models.exports import read_model_file
from samliverseg.models.kinds import AUTOMATIC_KINDS, INTERACTIVE_KINDS, KIND_NAMES, KINDS
from samliverseg.models.specs import SAM2D, ModelEntry, builtin_specs, is_builtin
from samliverseg.models.weights import cache_dir

MODELS_ENV = "SAMLIVERSEG_MODELS"
MODEL_FILE = "model.pth"
INFO_FILE = "model.json"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")

PathLike = Union[str, os.PathLike]


def models_dir() -> Path:
    """The user models folder: ``$SAMLIVERSEG_MODELS`` or ``<weights cache>/models`` (not created here)."""
    env = os.environ.get(MODELS_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    return cache_dir() / "models"


def validate_name(name: str) -> str:
    """``name`` if it can name a user model, else InputError saying why."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InputError(f"invalid model name {name!r}: use letters, digits, '-', '_' and '.' (starting with a "
                         f"letter or digit, at most 100 characters)")
    if is_builtin(name):
        raise InputError(f"{name!r} is the name of a built-in model; choose another name for the trained model")
    return name


# ------------------------------------------------------------------------------- metadata
def read_model_metadata(model_path: PathLike) -> Dict[str, Any]:
    """``{"kind": ..., "metadata": {...}}`` of an exported ``model.pth``, read memory-mapped (the
    weights are not read); CheckpointError when unreadable."""
    obj = read_model_file(model_path, mmap=True)
    meta = json_safe(obj["metadata"])
    return {"kind": meta["kind"], "metadata": meta}


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


def read_entry(folder: PathLike) -> UserModel:
    """The listing entry of one model folder (``NAME/model.pth``): from ``model.json`` while it is
    fresh, else from ``model.pth``; an unreadable model gives an entry with ``error`` set."""
    folder = Path(folder)
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


def list_user_models() -> List[UserModel]:
    """Every ``NAME/model.pth`` in the user models folder, sorted by name (hidden folders skipped)."""
    root = models_dir()
    if not root.is_dir():
        return []
    out = []
    for folder in sorted(root.iterdir(), key=lambda p: p.name.lower()):
        if folder.name.startswith(".") or not folder.is_dir() or not (folder / MODEL_FILE).exists():
            continue
        out.append(read_entry(folder))
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
        builtin = ", ".join(s.name for s in builtin_specs() if not getattr(s, "test_only", False))
        raise InputError(f"unknown model {name!r}; built-in models: {builtin}; trained models: {_available()}")
    return path


def get_user_model(name: str) -> UserModel:
    """The listing entry of a registered model (InputError when unknown)."""
    return read_entry(user_model_path(name).parent)


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
    return read_entry(dest)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def name_from(text: str) -> str:
    """A valid model name made from free text (a run folder's name): other characters -> ``-``."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-._")[:100] or "model"
    return f"{name}-trained" if is_builtin(name) else name


def unique_name(name: str) -> str:
    """``name``, or ``name-2``, ``name-3``, ... : the first that is not taken in the models folder."""
    name = validate_name(name)
    if not (models_dir() / name).exists():
        return name
    i = 2
    while (models_dir() / f"{name}-{i}").exists():
        i += 1
    return validate_name(f"{name}-{i}")


# ------------------------------------------------------------------------------- listing rows
def model_entry(m: UserModel) -> ModelEntry:
    """The ``samliverseg models`` row of a trained model."""
    kind = KINDS.get(m.kind) if m.kind else None
    if m.error:
        description = f"unusable: {m.error}"
    elif kind is None:
        description = f"a model of kind {m.kind!r}, which this version of samliverseg does not know"
    else:
        description = kind.summary
    return ModelEntry(
        name=m.name, family=m.kind or "unknown", interactive=m.kind in INTERACTIVE_KINDS, description=description,
        present=m.error is None and kind is not None, path=str(m.path), trained=True,
        where="" if m.error is None else "train it again or register another file (samliverseg models --register)",
        info={"kind": m.kind, "automatic": m.automatic, "base_model": m.base_model, "target": m.target,
              "best_dice": m.best_dice, "source": m.source, "registered": m.registered, "error": m.error,
              "metadata": m.metadata})


# ------------------------------------------------------------------------------- loading
@dataclass
class LoadedUserModel:
    """A trained model: what its file says (:func:`describe_user_model`) and, once loaded by
    :func:`load_user_model` (interactive kinds), ``model``: a SamModel-like module with ``.spec``
    for :class:`~samliverseg.interactive.engine.PromptEngine`."""

    name: str
    path: Path
    kind: str
    metadata: Dict[str, Any]
    model: Any = None

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
    """Load an interactive trained model (registered name, ``model.pth`` path, or what
    :func:`describe_user_model` returned): ``decoder``: the base model with the full state loaded
    strictly; ``adapter``: ``models.adapters.load_adapted_model``. An automatic kind is an
    InputError (``api.open_model`` opens those); an unknown kind a CheckpointError."""
    loaded = name_or_path if isinstance(name_or_path, LoadedUserModel) else describe_user_model(name_or_path)
    name, path, kind, meta = loaded.name, loaded.path, loaded.kind, loaded.metadata
    if kind in AUTOMATIC_KINDS:
        raise InputError(f"model {name!r} ({kind}) is automatic: it takes no prompts; open it with "
                         f"samliverseg.api.open_model({name!r})")
    if kind == "decoder":
        base = meta.get("base_model")
        try:
            spec = get_spec(str(base))
        except InputError:
            raise InputError(f"model {name!r} was fine-tuned from {base!r}, which is not a model of this installation "
                             f"(built-in: {', '.join(s.name for s in builtin_specs(SAM2D))})") from None
        loaded.model = build_model(spec, checkpoint=path, device=device)
    elif kind == "adapter":
        loaded.model = load_adapted_model(path, device)
    else:
        raise CheckpointError(f"{path} is a model of kind {kind!r}, which this version of samliverseg does not "
                              f"know (known kinds: {', '.join(KIND_NAMES)})")
    return loaded


__all__ = [
    "LoadedUserModel", "MODELS_ENV", "UserModel", "describe_user_model", "get_user_model", "is_user_model",
    "list_user_models", "load_user_model", "model_entry", "models_dir", "name_from", "read_entry",
    "read_model_metadata", "register_trained_model", "unique_name", "user_model_path", "validate_name",
]
