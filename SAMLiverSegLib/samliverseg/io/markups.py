"""Slicer markups files (``.mrk.json``; legacy ``.fcsv``) -> prompts in IJK, and back.

Reading follows Slicer's markups JSON schema (v1.0.3/v1.0.4) and Slicer's own reader
(``vtkMRMLMarkupsJsonStorageNode``):

* ``coordinateSystem`` is per markup, ``"LPS"`` or ``"RAS"``; when it is absent it is **LPS**
  (the schema's default, and what Slicer assumes). Slicer ≥ 4.11 writes LPS by default.
* ``coordinateUnits`` ``"mm"`` (default) or ``"um"`` (scaled to mm).
* A point list has ``type`` ``"Fiducial"`` (``"PointList"`` is also accepted); its
  ``controlPoints`` carry ``position``; points whose ``positionStatus`` is ``"undefined"`` or
  ``"preview"`` are skipped.
* An ROI (``type`` ``"ROI"``) has ``center``, ``size`` (full edge lengths, mm) and
  ``orientation``: 9 numbers, row-major; column c is the ROI's c-th axis in the file's
  coordinate system (for LPS files Slicer negates the first two rows). The ROI's single
  control point is its centre and is not a prompt. ``"insideOut": true`` ROIs are rejected.

Positive or negative: a point list whose name contains ``neg``, ``exclude`` or ``background``
(case-insensitive) holds negative points; within any list, a point whose label starts with
``-`` or whose description is ``negative`` is negative, and one whose description is
``positive`` is positive. Slicer does not store the node name in the file (it names the node
after the file), so a markup without ``name`` takes the file name without ``.mrk.json``:
``background.mrk.json`` holds negative points.

An ROI becomes a :class:`~samliverseg.core.prompts.Roi3D`: the IJK bounding box of its 8 corners,
rounded outward (floor of the minimum, ceil of the maximum, with a 1e-3 voxel tolerance so
that an ROI whose faces pass through voxel centres keeps exactly those voxels, even after
Slicer's float32 storage of positions).
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, List, Optional, Sequence, Union

import numpy as np

from samliverseg.core.atomic import write_text
from samliverseg.core.errors import InputError
from samliverseg.core.prompts import Prompts, Roi3D
from samliverseg.core.geometry import LPS_TO_RAS
from samliverseg.io.volume import Volume

PathLike = Union[str, os.PathLike]

SCHEMA_URL = ("https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/"
              "Resources/Schema/markups-schema-v1.0.3.json#")

POINT_LIST_TYPES = ("Fiducial", "PointList", "Point")
NEGATIVE_LIST_WORDS = ("neg", "exclude", "background")
_SKIPPED_STATUS = ("undefined", "preview")


@dataclass
class ControlPoint:
    position: np.ndarray  # LPS mm
    label: str = ""
    description: str = ""

    def is_negative(self, list_negative: bool) -> bool:
        desc = self.description.strip().lower()
        if self.label.strip().startswith("-") or desc == "negative":
            return True
        if desc == "positive":
            return False
        return list_negative


@dataclass
class Markup:
    """One markup of a file, with every position converted to LPS mm.

    For an ROI, ``center`` (LPS), ``size`` (mm, full edge lengths) and ``orientation``
    (3×3, columns = the ROI axes in LPS) are set.
    """

    type: str
    name: str = ""
    control_points: List[ControlPoint] = field(default_factory=list)
    center: Optional[np.ndarray] = None
    size: Optional[np.ndarray] = None
    orientation: Optional[np.ndarray] = None
    coordinate_system: str = "LPS"  # as found in the file (informational)

    @property
    def is_point_list(self) -> bool:
        return self.type in POINT_LIST_TYPES

    @property
    def is_roi(self) -> bool:
        return self.type == "ROI"

    @property
    def is_negative_list(self) -> bool:
        n = self.name.lower()
        return any(w in n for w in NEGATIVE_LIST_WORDS)

    def roi_corners(self) -> np.ndarray:
        """The 8 corners of an ROI, 8×3 LPS."""
        if self.center is None or self.size is None:
            raise InputError(f"ROI {self.name!r} has no center/size")
        axes = np.eye(3) if self.orientation is None else self.orientation
        half = np.asarray(self.size, dtype=float) / 2.0
        signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=float)
        return np.asarray(self.center, dtype=float) + (signs * half) @ axes.T


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
def _default_name(path: Path) -> str:
    name = path.name
    for suffix in (".mrk.json", ".json", ".fcsv"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def read_markups(path: PathLike) -> List[Markup]:
    """All markups of a ``.mrk.json`` (or legacy ``.fcsv``) file, positions in LPS."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"markups file {p} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read markups file {p}: {exc}") from None
    if p.name.lower().endswith(".fcsv") or text.lstrip().startswith("# Markups fiducial file"):
        return [_read_fcsv(text, p)]
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{p} is not a valid markups JSON file ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("markups"), list):
        raise InputError(f"{p} is not a Slicer markups file (no 'markups' list)")
    return [_parse_markup(m, p, i) for i, m in enumerate(doc["markups"])]


def _vector(value: Any, n: int, what: str, where: str) -> np.ndarray:
    try:
        v = np.asarray(value, dtype=float).reshape(-1)
    except (TypeError, ValueError):
        v = np.empty(0)
    if v.shape != (n,) or not np.isfinite(v).all():
        raise InputError(f"{where}: {what} must be {n} finite numbers, got {value!r}")
    return v


def _parse_markup(m: Any, path: Path, index: int) -> Markup:
    where = f"{path.name}, markup {index}"
    if not isinstance(m, dict) or "type" not in m:
        raise InputError(f"{where}: a markup needs a 'type'")
    mtype = str(m["type"])
    cs = str(m.get("coordinateSystem", "LPS") or "LPS").upper()
    if cs not in ("LPS", "RAS"):
        raise InputError(f"{where}: unknown coordinateSystem {m.get('coordinateSystem')!r} (expected LPS or RAS)")
    units = m.get("coordinateUnits", "mm")
    if isinstance(units, (list, tuple)):
        units = units[0] if units else "mm"
    scale = {"mm": 1.0, "um": 1e-3}.get(str(units))
    if scale is None:
        raise InputError(f"{where}: unsupported coordinateUnits {units!r} (expected mm or um)")
    to_lps = np.eye(3) if cs == "LPS" else LPS_TO_RAS  # RAS->LPS is the same flip
    name = str(m.get("name") or _default_name(path))
    out = Markup(type=mtype, name=name, coordinate_system=cs)
    cps = m.get("controlPoints", []) or []
    if not isinstance(cps, list):
        raise InputError(f"{where}: controlPoints must be a list")
    for j, cp in enumerate(cps):
        if not isinstance(cp, dict):
            raise InputError(f"{where}: control point {j} is not an object")
        if str(cp.get("positionStatus", "defined")) in _SKIPPED_STATUS or "position" not in cp:
            continue
        pos = _vector(cp["position"], 3, f"control point {j} position", where) * scale
        out.control_points.append(ControlPoint(to_lps @ pos, str(cp.get("label", "")), str(cp.get("description", ""))))
    if mtype == "ROI":
        if m.get("insideOut"):
            raise InputError(f"{where}: an inside-out ROI cannot be used as a region")
        if "center" in m and "size" in m:
            out.center = to_lps @ (_vector(m["center"], 3, "ROI center", where) * scale)
            out.size = np.abs(_vector(m["size"], 3, "ROI size", where) * scale)
            if "orientation" in m:
                rot = _vector(m["orientation"], 9, "ROI orientation", where).reshape(3, 3)
            else:
                rot = np.eye(3)
            out.orientation = to_lps @ rot
        elif len(out.control_points) >= 2:  # a bounding-box ROI given by its points only
            pts = np.array([c.position for c in out.control_points])
            out.center = (pts.min(0) + pts.max(0)) / 2.0
            out.size = pts.max(0) - pts.min(0)
            out.orientation = np.eye(3)
        else:
            raise InputError(f"{where}: ROI has no center and size")
    return out


def _read_fcsv(text: str, path: Path) -> Markup:
    """Slicer's legacy CSV point list (``# CoordinateSystem = LPS|RAS|0|1``; 0 = RAS)."""
    cs = "RAS"  # files before Slicer 4.11 had no such line and were RAS
    columns = ["id", "x", "y", "z", "ow", "ox", "oy", "oz", "vis", "sel", "lock", "label", "desc", "associatedNodeID"]
    rows = []
    for line in text.splitlines():
        if line.startswith("#"):
            key, _, value = line[1:].partition("=")
            key, value = key.strip().lower(), value.strip()
            if key == "coordinatesystem":
                cs = {"0": "RAS", "1": "LPS", "ras": "RAS", "lps": "LPS"}.get(value.lower(), value.upper())
            elif key == "columns":
                columns = [c.strip() for c in value.split(",")]
        elif line.strip():
            rows.append(line)
    if cs not in ("LPS", "RAS"):
        raise InputError(f"{path.name}: unknown CoordinateSystem {cs!r}")
    out = Markup(type="Fiducial", name=_default_name(path), coordinate_system=cs)
    to_lps = np.eye(3) if cs == "LPS" else LPS_TO_RAS
    for rec in csv.reader(io.StringIO("\n".join(rows))):
        d = dict(zip(columns, rec))
        try:
            pos = np.array([float(d["x"]), float(d["y"]), float(d["z"])])
        except (KeyError, ValueError):
            raise InputError(f"{path.name}: bad point row {','.join(rec)!r}") from None
        out.control_points.append(ControlPoint(to_lps @ pos, d.get("label", ""), d.get("desc", "")))
    return out


# ---------------------------------------------------------------------------------------------
# to prompts
# ---------------------------------------------------------------------------------------------
#: Tolerance (in voxels) of the outward rounding of ROI faces. Slicer keeps control points in
#: float32, so a face placed on a voxel centre comes back a few 1e-6 voxel off; 1e-3 keeps
#: such a face on its voxel (the Slicer module's ``markups_prompts`` uses the same value).
ROUND_TOLERANCE_VOXELS = 1e-3


def roi_to_ijk_box(markup: Markup, volume: Volume) -> Roi3D:
    """The IJK bounding box of an ROI's corners, rounded outward (1e-3 voxel tolerance)."""
    ijk = volume.lps_to_ijk(markup.roi_corners())
    lo = np.floor(ijk.min(axis=0) + ROUND_TOLERANCE_VOXELS)
    hi = np.ceil(ijk.max(axis=0) - ROUND_TOLERANCE_VOXELS)
    return Roi3D(*(float(v) for v in lo), *(float(v) for v in hi))


def markups_to_prompts(source: Union[PathLike, Sequence[Markup]], volume: Volume, slice_axis: str = "k") -> Prompts:
    """Prompts in the IJK of ``volume`` from a markups file (or parsed markups).

    Points keep fractional IJK coordinates. Raises :class:`InputError` when there is no point
    and no ROI, or more than one ROI. Prompts are not checked against the volume's extent here
    (``prompts.validate_prompts`` does that, with a message that names the bad point).
    """
    if isinstance(source, (str, os.PathLike)):
        markups = read_markups(source)
        label = str(source)
    else:
        markups = list(source)
        label = "the markups"
    positive: List[tuple] = []
    negative: List[tuple] = []
    rois = [m for m in markups if m.is_roi]
    if len(rois) > 1:
        raise InputError(f"{label} holds {len(rois)} ROIs; give one")
    for m in markups:
        if not m.is_point_list:
            continue
        neg_list = m.is_negative_list
        for cp in m.control_points:
            ijk = tuple(float(v) for v in volume.lps_to_ijk(cp.position))
            (negative if cp.is_negative(neg_list) else positive).append(ijk)
    roi = roi_to_ijk_box(rois[0], volume) if rois else None
    prompts = Prompts(positive=positive, negative=negative, roi=roi, slice_axis=slice_axis)
    if prompts.is_empty():
        raise InputError(f"{label} holds no control point and no ROI")
    return prompts


#: Alias (the CLI's name for it).
prompts_from_markups = markups_to_prompts


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------
def point_list(name: str, points_lps: Iterable[Sequence[float]], labels: Optional[Sequence[str]] = None,
               descriptions: Optional[Sequence[str]] = None) -> Markup:
    pts = [np.asarray(p, dtype=float).reshape(3) for p in points_lps]
    labels = list(labels) if labels is not None else [f"{name}-{i + 1}" for i in range(len(pts))]
    descriptions = list(descriptions) if descriptions is not None else [""] * len(pts)
    return Markup(type="Fiducial", name=name,
                  control_points=[ControlPoint(p, lb, d) for p, lb, d in zip(pts, labels, descriptions)])


def roi_markup(name: str, center_lps: Sequence[float], size_mm: Sequence[float],
               orientation_lps: Optional[np.ndarray] = None) -> Markup:
    """An ROI; ``orientation_lps`` columns are its axes in LPS (default: the LPS axes)."""
    rot = np.eye(3) if orientation_lps is None else np.asarray(orientation_lps, dtype=float).reshape(3, 3)
    return Markup(type="ROI", name=name, center=np.asarray(center_lps, dtype=float).reshape(3),
                  size=np.asarray(size_mm, dtype=float).reshape(3), orientation=rot)


def roi_from_ijk(roi: Roi3D, volume: Volume, name: str = "ROI") -> Markup:
    """An ROI aligned with the volume's axes whose faces pass through the centres of the
    first and last voxels of ``roi`` (so reading it back gives exactly ``roi``)."""
    r = roi.normalized()
    lo = np.array([r.i0, r.j0, r.k0], dtype=float)
    hi = np.array([r.i1, r.j1, r.k1], dtype=float)
    center = volume.ijk_to_lps((lo + hi) / 2.0)
    size = (hi - lo) * np.asarray(volume.spacing)
    return roi_markup(name, center, size, volume.direction)


def prompts_to_markups(prompts: Prompts, volume: Volume) -> List[Markup]:
    """Point lists ``positive`` / ``negative`` and the ROI of ``prompts`` (IJK) as markups (LPS)."""
    out: List[Markup] = []
    if prompts.positive:
        out.append(point_list("positive", volume.ijk_to_lps(np.array(prompts.positive, dtype=float))))
    if prompts.negative:
        out.append(point_list("negative", volume.ijk_to_lps(np.array(prompts.negative, dtype=float))))
    if prompts.roi is not None:
        out.append(roi_from_ijk(prompts.roi, volume))
    return out


def _num(v: float) -> float:
    v = float(v)
    return 0.0 if v == 0 else v


def _markup_json(m: Markup, coordinate_system: str) -> dict:
    flip = np.eye(3) if coordinate_system == "LPS" else LPS_TO_RAS
    d: dict = {
        "type": "Fiducial" if m.is_point_list else m.type,
        "name": m.name,
        "coordinateSystem": coordinate_system,
        "coordinateUnits": "mm",
        "locked": False,
        "fixedNumberOfControlPoints": False,
        "labelFormat": "%N-%d",
        "lastUsedControlPointNumber": len(m.control_points),
    }
    if m.is_roi:
        if m.center is None or m.size is None:
            raise InputError(f"ROI {m.name!r} needs a center and a size")
        rot = flip @ (np.eye(3) if m.orientation is None else np.asarray(m.orientation, dtype=float))
        d["roiType"] = "Box"
        d["center"] = [_num(v) for v in flip @ np.asarray(m.center, dtype=float)]
        d["orientation"] = [_num(v) for v in rot.reshape(-1)]  # row-major, columns = axes
        d["size"] = [_num(v) for v in m.size]
        d["insideOut"] = False
        cps = [ControlPoint(np.asarray(m.center, dtype=float), f"{m.name}-1", "")]
    else:
        cps = m.control_points
    point_orientation = [_num(v) for v in flip.reshape(-1)]  # identity in RAS, as Slicer writes
    d["controlPoints"] = [
        {
            "id": str(i + 1),
            "label": cp.label,
            "description": cp.description,
            "associatedNodeID": "",
            "position": [_num(v) for v in flip @ np.asarray(cp.position, dtype=float)],
            "orientation": point_orientation,
            "selected": True,
            "locked": False,
            "visibility": True,
            "positionStatus": "defined",
        }
        for i, cp in enumerate(cps)
    ]
    d["measurements"] = []
    return d


def write_markups(path: PathLike, markups: Union[Markup, Sequence[Markup]], coordinate_system: str = "LPS") -> Path:
    """Write markups (positions in LPS in memory) as a Slicer ``.mrk.json`` in LPS or RAS.

    Slicer loads one node per file and names it after the file; the ``name`` key is written
    too (this library reads it; Slicer ignores it).
    """
    cs = coordinate_system.upper()
    if cs not in ("LPS", "RAS"):
        raise InputError(f"coordinate system must be LPS or RAS, got {coordinate_system!r}")
    items = [markups] if isinstance(markups, Markup) else list(markups)
    for m in items:
        for cp in m.control_points:
            if not np.isfinite(np.asarray(cp.position, dtype=float)).all():
                raise InputError(f"markup {m.name!r} has a non-finite point")
    doc = {"@schema": SCHEMA_URL, "markups": [_markup_json(m, cs) for m in items]}
    text = json.dumps(doc, indent=2, allow_nan=False)
    target = Path(path)
    return write_text(target, text + "\n")


__all__ = [
    "ControlPoint", "Markup", "read_markups", "markups_to_prompts", "prompts_from_markups", "roi_to_ijk_box",
    "point_list", "roi_markup", "roi_from_ijk", "prompts_to_markups", "write_markups",
    "SCHEMA_URL",
]
