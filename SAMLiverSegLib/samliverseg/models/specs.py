"""The store of built-in model specifications, shared by every family of built-in models.

``build_sam.py`` (family ``"sam2d"``: SAM, MedSAM, LiteMedSAM) and ``build_sam3d.py`` (family
``"sam3d"``: SAM-Med3D) register their specs here with :func:`register_spec`; a name is unique
across families (a 2D and a 3D model never share one, nor does a trained model:
``user_models.validate_name`` asks :func:`is_builtin`). Each family module keeps the view of its
own specs (:class:`FamilyView`, e.g. ``build_sam.MODEL_REGISTRY``) and knows nothing of the other.

:class:`ModelEntry` is one row of ``samliverseg models`` for any model, built-in or trained
(``registry.list_models()``). This module imports no family module and no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterator, List, Optional

from samliverseg.core.jsonutil import json_safe

#: Family names of the built-in models (a trained model's family is its kind, ``models.kinds``).
SAM2D, SAM3D = "sam2d", "sam3d"

_SPECS: Dict[str, Any] = {}


def register_spec(spec: Any, replace: bool = False) -> Any:
    """Add a built-in model spec (anything with ``.name`` and ``.family``); names are unique across families."""
    old = _SPECS.get(spec.name)
    if old is not None and not replace:
        raise ValueError(f"model {spec.name!r} is already registered ({old.family})")
    if old is not None and old.family != spec.family:
        raise ValueError(f"model {spec.name!r} is a {old.family} model; it cannot be replaced by a {spec.family} one")
    _SPECS[spec.name] = spec
    return spec


def unregister_spec(name: str) -> None:
    _SPECS.pop(name, None)


def is_builtin(name: Any) -> bool:
    """True when ``name`` is a registered built-in model of any family."""
    return isinstance(name, str) and name in _SPECS


def builtin_specs(family: Optional[str] = None) -> List[Any]:
    """The registered specs (of one family), in registration order."""
    return [s for s in _SPECS.values() if family is None or s.family == family]


class FamilyView(Mapping):
    """A read-only, live ``name -> spec`` mapping of one family's registered specs."""

    def __init__(self, family: str) -> None:
        self.family = family

    def __getitem__(self, name: str) -> Any:
        spec = _SPECS.get(name)
        if spec is None or spec.family != self.family:
            raise KeyError(name)
        return spec

    def __iter__(self) -> Iterator[str]:
        return iter([s.name for s in builtin_specs(self.family)])

    def __len__(self) -> int:
        return len(builtin_specs(self.family))

    def __repr__(self) -> str:
        return f"FamilyView({self.family!r}: {', '.join(self)})"


@dataclass(frozen=True)
class ModelEntry:
    """One model a user can name: a built-in one (its weights present or not) or a trained one.

    family: ``"sam2d"``, ``"sam3d"``, or the trained kind (``decoder``, ``adapter``, ``unet``, ...).
    interactive: it takes prompts (False: it segments a whole volume by itself).
    present: usable now (built-in: the weights were found; trained: its ``model.pth`` is readable).
    where: when not present, what to do (where to put which file, how to get it); else "".
    hidden: a configuration for tests (``samliverseg models`` leaves it out).
    """

    name: str
    family: str
    interactive: bool
    description: str
    present: bool
    path: Optional[str]
    where: str = ""
    trained: bool = False
    filename: Optional[str] = None
    size: Optional[int] = None
    download_url: Optional[str] = None
    env_var: Optional[str] = None
    default: bool = False
    hidden: bool = False
    note: str = ""
    #: Trained models: base_model, target, best_dice, metadata, source, ...
    info: Dict[str, Any] = field(default_factory=dict, compare=False)

    def to_dict(self) -> Dict[str, Any]:
        return json_safe(asdict(self))


__all__ = ["FamilyView", "ModelEntry", "SAM2D", "SAM3D", "builtin_specs", "is_builtin", "register_spec",
           "unregister_spec"]
