"""Prompts in voxel index space (IJK), and their validation against a volume.

Conventions (used everywhere in samliverseg):

* IJK is ITK/Slicer index order: ``i`` along columns (x), ``j`` along rows (y), ``k`` along
  slices (z); 0-based; box corners are inclusive.
* The numpy array of a volume is indexed ``array[k, j, i]``.
* 2D prompts lie on one slice across ``slice_axis``: ``"k"`` (the acquisition plane, axial for
  an axial CT, the default), ``"j"`` or ``"i"``. A box is given by two opposite corners in IJK
  that share the slice coordinate; the CLI's ``--box-ijk I0 J0 I1 J1 K`` is the box with corners
  (I0, J0, K) and (I1, J1, K) on slice_axis ``"k"``.
* Boxes may lie on several slices (one box per slice): ``Prompts.box`` is the first and
  ``Prompts.boxes`` holds the others; :meth:`Prompts.all_boxes` gives them all. Positive and
  negative points may lie on any slice.
* A 3D ROI is ``(i0, j0, k0, i1, j1, k1)``.

Points may carry fractional coordinates (a click between voxel centres, a markups point); they
are kept as floats and rounded only where a voxel must be chosen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np

from samliverseg.core.errors import PromptError

Point = Tuple[float, float, float]

#: Position of each IJK axis in an IJK tuple and in the numpy array [k, j, i].
IJK_INDEX = {"i": 0, "j": 1, "k": 2}
ARRAY_AXIS = {"k": 0, "j": 1, "i": 2}


@dataclass
class SliceBox:
    """A box on one slice: two opposite corners in IJK that share the slice coordinate."""

    corner_a: Point
    corner_b: Point

    @classmethod
    def axial(cls, i0: float, j0: float, i1: float, j1: float, k: float) -> "SliceBox":
        return cls((float(i0), float(j0), float(k)), (float(i1), float(j1), float(k)))

    def lo(self) -> Point:
        return tuple(min(a, b) for a, b in zip(self.corner_a, self.corner_b))  # type: ignore[return-value]

    def hi(self) -> Point:
        return tuple(max(a, b) for a, b in zip(self.corner_a, self.corner_b))  # type: ignore[return-value]


@dataclass
class Roi3D:
    """An axis-aligned voxel box: (i0, j0, k0) to (i1, j1, k1), inclusive."""

    i0: float
    j0: float
    k0: float
    i1: float
    j1: float
    k1: float

    def normalized(self) -> "Roi3D":
        return Roi3D(
            min(self.i0, self.i1), min(self.j0, self.j1), min(self.k0, self.k1),
            max(self.i0, self.i1), max(self.j0, self.j1), max(self.k0, self.k1),
        )


@dataclass
class Prompts:
    """Everything a user can give for one object, in IJK.

    ``box`` is a box on one slice; ``boxes`` are more boxes, each on another slice (the old
    single-``box`` API keeps working: :meth:`add_box` fills ``box`` first).
    """

    positive: List[Point] = field(default_factory=list)
    negative: List[Point] = field(default_factory=list)
    box: Optional[SliceBox] = None
    roi: Optional[Roi3D] = None
    slice_axis: str = "k"
    boxes: List[SliceBox] = field(default_factory=list)

    def all_boxes(self) -> List[SliceBox]:
        """Every box: ``box`` (if any), then ``boxes``."""
        return ([self.box] if self.box is not None else []) + list(self.boxes)

    def add_box(self, box: SliceBox) -> None:
        if self.box is None:
            self.box = box
        else:
            self.boxes.append(box)

    def box_slice(self, box: SliceBox) -> int:
        """The slice (across ``slice_axis``) that ``box`` lies on."""
        return int(round(box.corner_a[IJK_INDEX[self.slice_axis]]))

    def is_empty(self) -> bool:
        return not self.positive and not self.negative and not self.all_boxes() and self.roi is None

    def slice_indices(self) -> List[int]:
        """The slices (across ``slice_axis``) that the 2D prompts lie on."""
        c = IJK_INDEX[self.slice_axis]
        ks = {int(round(p[c])) for p in self.positive + self.negative}
        ks.update(self.box_slice(b) for b in self.all_boxes())
        return sorted(ks)

    def on_slice(self, index: int) -> "Prompts":
        """The 2D prompts that lie on slice ``index`` (across ``slice_axis``); no ROI."""
        c = IJK_INDEX[self.slice_axis]
        boxes = [b for b in self.all_boxes() if self.box_slice(b) == int(index)]
        return Prompts(positive=[p for p in self.positive if int(round(p[c])) == int(index)],
                       negative=[p for p in self.negative if int(round(p[c])) == int(index)],
                       box=boxes[0] if boxes else None, boxes=boxes[1:], slice_axis=self.slice_axis)

    def describe(self) -> dict:
        """A JSON-friendly description (for reports)."""
        out: dict = {
            "slice_axis": self.slice_axis,
            "positive_ijk": [[float(v) for v in p] for p in self.positive],
            "negative_ijk": [[float(v) for v in p] for p in self.negative],
        }
        if self.box is not None:
            out["box_corners_ijk"] = [[float(v) for v in self.box.corner_a], [float(v) for v in self.box.corner_b]]
        if self.boxes:
            out["more_boxes_corners_ijk"] = [[[float(v) for v in b.corner_a], [float(v) for v in b.corner_b]]
                                             for b in self.boxes]
        if self.roi is not None:
            r = self.roi
            out["roi_ijk"] = [r.i0, r.j0, r.k0, r.i1, r.j1, r.k1]
        return out


def _inside(value: float, size: int) -> bool:
    # Voxel centres are at integer indices; a voxel extends half a voxel each side.
    return -0.5 <= value <= size - 0.5


def _fmt(p: Sequence[float]) -> str:
    return f"(i={p[0]:g}, j={p[1]:g}, k={p[2]:g})"


def validate_prompts(prompts: Prompts, shape_kji: Sequence[int]) -> Prompts:
    """Check prompts against a volume of numpy shape ``(K, J, I)``; return them normalised.

    Raises :class:`PromptError` with a one-line message for a point or box outside the volume,
    an empty box (zero width or height), a box whose corners are on different slices, two boxes
    on one slice, or no prompt at all (negative points alone pass: they may be corrections of a
    result that exists; the engine refuses them where there is none). Boxes and ROIs that stick out of the volume are clipped to it.
    """
    nk, nj, ni = (int(s) for s in shape_kji)
    sizes = (ni, nj, nk)
    valid = f"valid i 0..{ni - 1}, j 0..{nj - 1}, k 0..{nk - 1}"
    if prompts.slice_axis not in IJK_INDEX:
        raise PromptError(f"unknown slice axis {prompts.slice_axis!r}: use 'i', 'j' or 'k'")
    if prompts.is_empty():
        raise PromptError("no prompt given: give a box, an ROI or at least one positive point")
    for kind, pts in (("point", prompts.positive), ("negative point", prompts.negative)):
        for p in pts:
            if len(p) != 3 or not np.isfinite(p).all() or not all(_inside(v, n) for v, n in zip(p, sizes)):
                raise PromptError(f"{kind} {_fmt(p)} is outside the volume ({valid})")
    boxes = [_validated_box(b, prompts.slice_axis, sizes, valid) for b in prompts.all_boxes()]
    seen: dict = {}
    for b in boxes:
        k = prompts.box_slice(b)
        if k in seen:
            raise PromptError(f"two boxes on slice {prompts.slice_axis}={k}: give at most one box per slice")
        seen[k] = b
    roi = prompts.roi.normalized() if prompts.roi is not None else None
    if roi is not None:
        lo_r, hi_r = [roi.i0, roi.j0, roi.k0], [roi.i1, roi.j1, roi.k1]
        if not (np.isfinite(lo_r).all() and np.isfinite(hi_r).all()):
            raise PromptError("ROI has non-finite corners")
        if any(h < 0 or l > n - 1 for l, h, n in zip(lo_r, hi_r, sizes)):
            raise PromptError(f"ROI {_fmt(lo_r)}-{_fmt(hi_r)} is outside the volume ({valid})")
        lo_r = [max(v, 0.0) for v in lo_r]
        hi_r = [min(v, n - 1.0) for v, n in zip(hi_r, sizes)]
        if any(h - l < 1 for l, h in zip(lo_r, hi_r)):
            raise PromptError("ROI is empty: it needs at least two voxels along each axis")
        roi = Roi3D(*lo_r, *hi_r)
    return Prompts(positive=[tuple(map(float, p)) for p in prompts.positive],
                   negative=[tuple(map(float, p)) for p in prompts.negative],
                   box=boxes[0] if boxes else None, boxes=boxes[1:], roi=roi, slice_axis=prompts.slice_axis)


def _validated_box(box: SliceBox, axis: str, sizes: Sequence[int], valid: str) -> SliceBox:
    """One box checked against a volume of IJK ``sizes``; clipped to it, its slice rounded."""
    c = IJK_INDEX[axis]
    lo, hi = list(box.lo()), list(box.hi())
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        raise PromptError("box has non-finite corners")
    if round(lo[c]) != round(hi[c]):
        raise PromptError(f"box corners {_fmt(lo)} and {_fmt(hi)} are not on the same {axis} slice")
    if not _inside(lo[c], sizes[c]):
        raise PromptError(f"box slice {axis}={lo[c]:g} is outside the volume ({valid})")
    in_plane = [a for a in range(3) if a != c]
    for a in in_plane:
        if hi[a] < 0 or lo[a] > sizes[a] - 1:
            raise PromptError(f"box {_fmt(lo)}-{_fmt(hi)} is outside the volume ({valid})")
    for a in in_plane:
        if hi[a] - lo[a] < 1:
            raise PromptError(
                f"box {_fmt(lo)}-{_fmt(hi)} is empty: it needs a width and a height of at least one voxel"
            )
    for a in in_plane:
        lo[a], hi[a] = max(lo[a], 0.0), min(hi[a], sizes[a] - 1.0)
    lo[c] = hi[c] = float(round(lo[c]))
    return SliceBox(tuple(lo), tuple(hi))  # type: ignore[arg-type]
