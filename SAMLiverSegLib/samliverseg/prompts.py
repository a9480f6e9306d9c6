"""Prompts in voxel index space (IJK), and their validation against a volume.

Conventions (used everywhere in samliverseg):

* IJK is ITK/Slicer index order: ``i`` along columns (x), ``j`` along rows (y), ``k`` along
  slices (z); 0-based; box corners are inclusive.
* The numpy array of a volume is indexed ``array[k, j, i]``.
* A 2D box ``(i0, j0, i1, j1, k)`` lies on axial slice ``k``; a 3D ROI is
  ``(i0, j0, k0, i1, j1, k1)``.

Points may carry fractional coordinates (a click between voxel centres, a markups point); they
are kept as floats and rounded only where a voxel must be chosen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .errors import PromptError

Point = Tuple[float, float, float]


@dataclass
class Box2D:
    """An axis-aligned box on slice ``k``: corners (i0, j0) and (i1, j1), inclusive."""

    i0: float
    j0: float
    i1: float
    j1: float
    k: int

    def normalized(self) -> "Box2D":
        return Box2D(min(self.i0, self.i1), min(self.j0, self.j1), max(self.i0, self.i1), max(self.j0, self.j1), int(self.k))


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
    """Everything a user can give for one object, in IJK."""

    positive: List[Point] = field(default_factory=list)
    negative: List[Point] = field(default_factory=list)
    box: Optional[Box2D] = None
    roi: Optional[Roi3D] = None

    def is_empty(self) -> bool:
        return not self.positive and not self.negative and self.box is None and self.roi is None

    def slices(self) -> List[int]:
        """The axial slices the 2D prompts lie on (rounded k of points and the box)."""
        ks = {int(round(p[2])) for p in self.positive + self.negative}
        if self.box is not None:
            ks.add(int(self.box.k))
        return sorted(ks)

    def describe(self) -> dict:
        """A JSON-friendly description (for reports)."""
        out = {"positive_ijk": [list(map(float, p)) for p in self.positive],
               "negative_ijk": [list(map(float, p)) for p in self.negative]}
        if self.box is not None:
            b = self.box
            out["box_ijk"] = [b.i0, b.j0, b.i1, b.j1, b.k]
        if self.roi is not None:
            r = self.roi
            out["roi_ijk"] = [r.i0, r.j0, r.k0, r.i1, r.j1, r.k1]
        return out


def _inside(value: float, size: int) -> bool:
    # Voxel centres are at integer indices; a voxel extends half a voxel each side.
    return -0.5 <= value <= size - 0.5


def validate_prompts(prompts: Prompts, shape_kji: Sequence[int]) -> Prompts:
    """Check prompts against a volume of numpy shape ``(K, J, I)``; return them normalised.

    Raises :class:`PromptError` with a one-line message for a point or box outside the volume,
    an empty box (zero width or height), or no prompt at all.
    """
    nk, nj, ni = (int(s) for s in shape_kji)
    if prompts.is_empty():
        raise PromptError("no prompt given: give a box, an ROI or at least one positive point")
    for kind, pts in (("point", prompts.positive), ("negative point", prompts.negative)):
        for p in pts:
            i, j, k = p
            if not (np.isfinite([i, j, k]).all() and _inside(i, ni) and _inside(j, nj) and _inside(k, nk)):
                raise PromptError(
                    f"{kind} (i={i:g}, j={j:g}, k={k:g}) is outside the volume "
                    f"(valid i 0..{ni - 1}, j 0..{nj - 1}, k 0..{nk - 1})"
                )
    box = prompts.box.normalized() if prompts.box is not None else None
    if box is not None:
        if not (0 <= box.k < nk):
            raise PromptError(f"box slice k={box.k} is outside the volume (valid k 0..{nk - 1})")
        if box.i1 < 0 or box.j1 < 0 or box.i0 > ni - 1 or box.j0 > nj - 1:
            raise PromptError(
                f"box ({box.i0:g},{box.j0:g})-({box.i1:g},{box.j1:g}) is outside the slice "
                f"(valid i 0..{ni - 1}, j 0..{nj - 1})"
            )
        if box.i1 - box.i0 < 1 or box.j1 - box.j0 < 1:
            raise PromptError(
                f"box ({box.i0:g},{box.j0:g})-({box.i1:g},{box.j1:g}) is empty: it needs a width and a height of at least one voxel"
            )
        box = Box2D(max(box.i0, 0), max(box.j0, 0), min(box.i1, ni - 1), min(box.j1, nj - 1), box.k)
    roi = prompts.roi.normalized() if prompts.roi is not None else None
    if roi is not None:
        if roi.i1 < 0 or roi.j1 < 0 or roi.k1 < 0 or roi.i0 > ni - 1 or roi.j0 > nj - 1 or roi.k0 > nk - 1:
            raise PromptError("ROI is outside the volume")
        roi = Roi3D(max(roi.i0, 0), max(roi.j0, 0), max(roi.k0, 0),
                    min(roi.i1, ni - 1), min(roi.j1, nj - 1), min(roi.k1, nk - 1))
        if roi.i1 - roi.i0 < 1 or roi.j1 - roi.j0 < 1:
            raise PromptError("ROI is empty: it needs a width and a height of at least one voxel")
    return Prompts(positive=list(prompts.positive), negative=list(prompts.negative), box=box, roi=roi)
