"""Variants of a real case and the prompts a user would give, for benchmarks (not a test).

A *case* is a :class:`Case`: a name, a :class:`~samliverseg.io.volume.Volume` and its truth mask
(uint8 ``[k, j, i]`` on the volume's grid). From one case :func:`make_variants` makes the
variants of issue 13, each with its own truth on its own grid:

* ``original``;
* ``flip_i`` / ``flip_j`` / ``flip_k``: the array flipped along i, j or k *and* the geometry with
  it (the direction column negated, the origin moved to the old last voxel): the same patient in
  LPS/RAS, only stored in another voxel order;
* ``mirror_i``: the array flipped along i *without* a geometry change: a left-right mirrored
  patient (the liver on the patient's left);
* ``crop_liver``: a box around the truth plus ``margin_mm`` on every side;
* ``crop_top``: the same box, but cutting off the cranial ``top_frac`` of the truth's slices (the
  liver's top touches the volume's end);
* ``resample_3mm`` / ``resample_5mm``: slices resampled to 3 and 5 mm (in-plane spacing kept) with
  ``core.geometry.resample`` (linear for the CT, nearest for the truth).

Prompts: :func:`prompt_slice` is the slice at a fraction of the truth's extent *from its caudal
end* (lowest S in LPS, so 0.2 is caudal on every variant whose geometry is right; on
``flip_k`` it is the same anatomical slice as on ``original``); :func:`box_prompt` the truth's
bounding box on a slice plus a margin in voxels (what a user drags).

Load the shared cases with :func:`load_cases` (``samliverseg.demo.sample_data``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from samliverseg.core.geometry import resample
from samliverseg.core.maskutil import bbox_2d
from samliverseg.core.prompts import Prompts, SliceBox
from samliverseg.io.volume import Volume

#: The prompted slices, as fractions of the truth's k-extent from its caudal end.
PROMPT_FRACTIONS = (0.20, 0.35, 0.50, 0.65, 0.80)
#: Every variant :func:`make_variants` knows, in the order of the tables.
VARIANTS = ("original", "flip_i", "flip_j", "flip_k", "mirror_i", "crop_liver", "crop_top",
            "resample_3mm", "resample_5mm")


@dataclass
class Case:
    """A CT volume and the truth mask of one object on its grid; ``margin`` is the box margin
    in voxels that a user would leave around it."""

    name: str
    volume: Volume
    truth: np.ndarray  # uint8 [k, j, i]
    margin: int = 5


#: Seeds of the island-lobe phantoms that ``load_cases(["phantom"])`` makes (the noise and
#: texture differ, the geometry does not).
PHANTOM_SEEDS = (0, 1, 2, 3)


def with_overrides(settings, items: Sequence[str]):
    """A copy of ``settings`` (a ``PropagationSettings``) with ``NAME=VALUE`` overrides (the
    benchmarks' ``--set``): None, True/False for a bool field, text for a text field, else a number. An unknown name
    raises AttributeError."""
    out = copy.copy(settings)
    for item in items:
        name, _, value = item.partition("=")
        old = getattr(out, name)
        if value == "None":
            setattr(out, name, None)
        elif isinstance(old, bool):
            if value not in ("True", "False"):
                raise ValueError(f"{name} takes True or False, not {value!r}")
            setattr(out, name, value == "True")
        elif isinstance(old, str):
            setattr(out, name, value)
        else:
            setattr(out, name, float(value))
    return out


def needs_shared_data(names: Sequence[str]) -> bool:
    """Whether :func:`load_cases` of ``names`` reads ``../shared/data`` (the phantoms do not)."""
    return bool({"ircadb", "totalseg"} & set(names))


def load_cases(names: Sequence[str] = ("ircadb", "totalseg")) -> List[Case]:
    """The liver of the shared cases: ``ircadb`` (3D-IRCADb-01 patient 1, manual mask) and
    ``totalseg`` (the TotalSegmentator example, its model's liver), which need ``../shared/data``;
    ``phantom``: the synthetic island-lobe phantoms of ``PHANTOM_SEEDS`` (a left lobe that appears
    caudally as an island and joins cranially, a kidney of liver HU on a thin bridge; 3 mm slices)."""
    from samliverseg.demo import sample_data
    from samliverseg.demo.phantom import make_island_lobe_phantom

    cases = []
    for n in names:
        if n == "ircadb":
            vol, masks = sample_data.load_ircadb(structures=("liver",))
            cases.append(Case("ircadb-1.1", vol, masks["liver"].astype(np.uint8), margin=5))
        elif n == "totalseg":
            vol, liver = sample_data.load_totalseg_example()
            cases.append(Case("totalseg", vol, liver.astype(np.uint8), margin=2))
        elif n == "phantom":
            for seed in PHANTOM_SEEDS:
                ph = make_island_lobe_phantom(seed=seed)
                cases.append(Case(f"phantom-s{seed}", ph.to_volume(), ph.liver_mask.astype(np.uint8), margin=3))
        else:
            raise ValueError(f"unknown case {n!r}: use 'ircadb', 'totalseg' or 'phantom'")
    return cases


# -- geometry-preserving and mirroring flips ---------------------------------------------------

_AXIS = {"i": (2, 0), "j": (1, 1), "k": (0, 2)}  # IJK axis -> (numpy axis of [k, j, i], IJK index)


def flipped(volume: Volume, truth: np.ndarray, axis: str, keep_geometry: bool = True) -> Tuple[Volume, np.ndarray]:
    """``volume`` and ``truth`` with the array reversed along IJK ``axis``.

    ``keep_geometry=True``: the direction's ``axis`` column is negated and the origin moved to
    the old last voxel along it, so every voxel keeps its LPS position (the same patient).
    ``False``: the old geometry is kept (a mirrored patient)."""
    np_axis, c = _AXIS[axis]
    arr = np.flip(volume.array, axis=np_axis).copy()
    tru = np.flip(truth, axis=np_axis).copy()
    if not keep_geometry:
        return Volume(arr, volume.spacing, volume.origin, volume.direction), tru
    last = [0.0, 0.0, 0.0]
    last[c] = volume.shape_ijk[c] - 1
    origin = volume.ijk_to_lps(last)
    direction = np.array(volume.direction, dtype=float)
    direction[:, c] *= -1.0
    return Volume(arr, volume.spacing, tuple(origin), direction), tru


def cropped(volume: Volume, truth: np.ndarray, lo_ijk: Sequence[int], hi_ijk: Sequence[int]) -> Tuple[Volume, np.ndarray]:
    """The sub-volume of voxels ``lo_ijk..hi_ijk`` (inclusive, clipped to the volume), geometry kept."""
    lo = [max(0, int(v)) for v in lo_ijk]
    hi = [min(n - 1, int(v)) for n, v in zip(volume.shape_ijk, hi_ijk)]
    sl = (slice(lo[2], hi[2] + 1), slice(lo[1], hi[1] + 1), slice(lo[0], hi[0] + 1))
    grid = volume.grid.sub_grid(lo, [h - l + 1 for l, h in zip(lo, hi)])
    return (Volume(volume.array[sl].copy(), grid.spacing, grid.origin, grid.direction_matrix),
            truth[sl].copy())


def truth_box_ijk(truth: np.ndarray) -> Tuple[List[int], List[int]]:
    """The truth's bounding box (lo, hi), IJK, inclusive."""
    idx = [np.flatnonzero(truth.any(axis=tuple(a for a in range(3) if a != ax))) for ax in (2, 1, 0)]
    return [int(v[0]) for v in idx], [int(v[-1]) for v in idx]


def caudal_is_low_k(volume: Volume) -> bool:
    """True when k grows towards the head (S, the LPS z of the k direction, is positive)."""
    return float(np.asarray(volume.direction)[2, 2]) >= 0.0


def cropped_around(volume: Volume, truth: np.ndarray, margin_mm: float = 20.0,
                   top_frac: float = 0.0) -> Tuple[Volume, np.ndarray]:
    """A crop of the truth's bounding box plus ``margin_mm``; ``top_frac`` > 0 also cuts off that
    fraction of the truth's slices at its cranial end."""
    lo, hi = truth_box_ijk(truth)
    m = [int(np.ceil(margin_mm / s)) for s in volume.spacing]
    lo = [l - mm for l, mm in zip(lo, m)]
    hi = [h + mm for h, mm in zip(hi, m)]
    if top_frac > 0:
        k_lo, k_hi = truth_box_ijk(truth)[0][2], truth_box_ijk(truth)[1][2]
        cut = int(round(top_frac * (k_hi - k_lo + 1)))
        if caudal_is_low_k(volume):
            hi[2] = k_hi - cut
        else:
            lo[2] = k_lo + cut
    return cropped(volume, truth, lo, hi)


def resampled_slices(volume: Volume, truth: np.ndarray, slice_mm: float) -> Tuple[Volume, np.ndarray]:
    """Slices of ``slice_mm`` (k spacing), in-plane spacing kept; CT linear, truth nearest."""
    si, sj, _ = volume.spacing
    ct = resample(volume.array.astype(np.float32), volume.grid, (si, sj, slice_mm), interpolator="linear",
                  default_value=-1024.0)
    lab = resample(truth.astype(np.uint8), volume.grid, ct.grid, interpolator="nearest")
    g = ct.grid
    return Volume(ct.array, g.spacing, g.origin, g.direction_matrix), lab.array.astype(np.uint8)


def make_variant(case: Case, variant: str) -> Case:
    """One variant (a name of :data:`VARIANTS`) of ``case``, with its truth on its grid."""
    v, t = case.volume, case.truth
    if variant == "original":
        out = (v, t)
    elif variant in ("flip_i", "flip_j", "flip_k"):
        out = flipped(v, t, variant[-1], keep_geometry=True)
    elif variant == "mirror_i":
        out = flipped(v, t, "i", keep_geometry=False)
    elif variant == "crop_liver":
        out = cropped_around(v, t, 20.0)
    elif variant == "crop_top":
        out = cropped_around(v, t, 20.0, top_frac=0.15)
    elif variant == "resample_3mm":
        out = resampled_slices(v, t, 3.0)
    elif variant == "resample_5mm":
        out = resampled_slices(v, t, 5.0)
    else:
        raise ValueError(f"unknown variant {variant!r}: use one of {', '.join(VARIANTS)}")
    return Case(f"{case.name}/{variant}", out[0], out[1], case.margin)


def make_variants(case: Case, names: Sequence[str] = VARIANTS) -> Dict[str, Case]:
    """``{variant name: Case}`` for ``names`` (default: all of :data:`VARIANTS`)."""
    return {n: make_variant(case, n) for n in names}


# -- prompts -------------------------------------------------------------------------------------

def prompt_slice(volume: Volume, truth: np.ndarray, fraction: float) -> int:
    """The k index at ``fraction`` of the truth's k-extent, counted from its caudal end (lowest
    S), moved to the nearest slice where the truth is not empty."""
    ks = np.flatnonzero(truth.any(axis=(1, 2)))
    if ks.size == 0:
        raise ValueError("the truth is empty")
    lo, hi = int(ks[0]), int(ks[-1])
    f = fraction if caudal_is_low_k(volume) else 1.0 - fraction
    k = int(round(lo + f * (hi - lo)))
    return int(ks[np.argmin(np.abs(ks - k))])


def box_on_slice(truth: np.ndarray, k: int, margin: int) -> Tuple[int, int, int, int]:
    """The truth's bounding box on axial slice ``k`` plus ``margin`` voxels: (i0, j0, i1, j1),
    clipped to the slice."""
    i0, j0, i1, j1 = bbox_2d(truth[k])
    nj, ni = truth.shape[1:]
    return max(0, i0 - margin), max(0, j0 - margin), min(ni - 1, i1 + margin), min(nj - 1, j1 + margin)


def box_prompt(truth: np.ndarray, k: int, margin: int) -> Prompts:
    """A box prompt on axial slice ``k``: :func:`box_on_slice`."""
    i0, j0, i1, j1 = box_on_slice(truth, k, margin)
    return Prompts(box=SliceBox.axial(i0, j0, i1, j1, k))


def box_prompt_at(case: Case, fraction: float, margin: Optional[int] = None) -> Prompts:
    """The box prompt on :func:`prompt_slice` of ``case`` at ``fraction``."""
    k = prompt_slice(case.volume, case.truth, fraction)
    return box_prompt(case.truth, k, case.margin if margin is None else margin)


#: The views a box can be drawn in (Slicer's names) and the IJK axis their slices cross.
VIEW_AXES = {"axial": "k", "coronal": "j", "sagittal": "i"}


def view_box_prompt(case: Case, axis: str, fraction: float, margin: Optional[int] = None) -> Prompts:
    """A box on the slice across IJK ``axis`` (``"j"`` coronal, ``"i"`` sagittal, ``"k"`` axial)
    at ``fraction`` of the truth's extent along that axis in index order (the nearest slice where
    the truth is not empty): the truth's bounding box on that slice plus the case's margin (or
    ``margin``) voxels, clipped to the volume; its corners in IJK."""
    a, c = _AXIS[axis]
    t = case.truth > 0
    idx = np.flatnonzero(t.any(axis=tuple(b for b in range(3) if b != a)))
    if idx.size == 0:
        raise ValueError("the truth is empty")
    s = int(round(idx[0] + fraction * (idx[-1] - idx[0])))
    s = int(idx[np.argmin(np.abs(idx - s))])
    m = case.margin if margin is None else margin
    lo: List[float] = [0.0, 0.0, 0.0]  # IJK
    hi: List[float] = [0.0, 0.0, 0.0]
    lo[c] = hi[c] = float(s)
    on = np.take(t, s, axis=a)  # the other two numpy axes, in order
    for b2, b in enumerate(x for x in range(3) if x != a):
        nz = np.flatnonzero(on.any(axis=1 - b2))
        ijk = 2 - b  # numpy axis 0 is k, 1 is j, 2 is i
        lo[ijk] = float(max(0, int(nz[0]) - m))
        hi[ijk] = float(min(t.shape[b] - 1, int(nz[-1]) + m))
    return Prompts(box=SliceBox(tuple(lo), tuple(hi)), slice_axis=axis)


__all__ = ["Case", "PHANTOM_SEEDS", "needs_shared_data", "PROMPT_FRACTIONS", "VARIANTS", "box_on_slice", "box_prompt", "box_prompt_at", "caudal_is_low_k",
           "cropped", "cropped_around", "flipped", "load_cases", "make_variant", "make_variants", "prompt_slice",
           "resampled_slices", "truth_box_ijk", "VIEW_AXES", "view_box_prompt"]
