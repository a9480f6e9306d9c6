"""What a negative click removes from a 3D mask: the wrong region it lies in, across slices.

A negative click is given on one slice (across ``axis`` of the array ``[k, j, i]``, at pixel
``(x = column, y = row)`` of that slice). The wrong region is found without a model:

* on the clicked slice, the region of similar HU grown from the click (``seeded_region``) inside
  the mask, the part connected to the click. Where it would take more than ``max_frac`` of the
  slice's mask (the wrong tissue looks like the object), only the blob around the click is taken:
  the pixels within twice the click's depth (its distance to the mask border) of the click;
* on the next slices, up and down: the pixels of the mask whose (lightly smoothed) HU lies in the
  removed region's HU range (its 5th..95th percentile, +-``margin_hu``), connected on that slice
  to what was removed on the slice before. The walk stops where nothing is left, at a ``frozen``
  slice (one that carries the user's own prompts), or where the region would take more than
  ``max_frac`` of that slice's mask or more than double its previous area (the wrong tissue merges
  with the object there): that slice loses only the previous slice's footprint, and the walk ends.

The result is a bool array on the volume grid; nothing outside the mask is ever included.
"""

from __future__ import annotations

from typing import Collection, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from samliverseg.core.maskutil import axis_index, get_slice
from samliverseg.interactive.seeded_region import grow_region

#: HU added on both sides of the removed region's percentile range.
MARGIN_HU = 15.0
#: A removal may take at most this fraction of a slice's mask (else it is limited, see above).
MAX_FRAC = 0.5


def _depth_px(mask2d: np.ndarray, x: int, y: int, pixel_spacing: Sequence[float]) -> float:
    """Distance (mm) from pixel (x, y) to the border of ``mask2d``."""
    d = ndimage.distance_transform_edt(np.pad(mask2d, 1), sampling=tuple(float(s) for s in pixel_spacing))
    return float(d[y + 1, x + 1])


def _disk_mm(shape: Tuple[int, int], x: int, y: int, radius_mm: float, pixel_spacing: Sequence[float]) -> np.ndarray:
    sr, sc = (float(s) for s in pixel_spacing)
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return ((yy - y) * sr) ** 2 + ((xx - x) * sc) ** 2 <= radius_mm ** 2


def clicked_region(mask2d: np.ndarray, hu2d: np.ndarray, xy: Tuple[float, float], pixel_spacing: Sequence[float],
                   max_frac: float = MAX_FRAC) -> np.ndarray:
    """The part of ``mask2d`` a negative click at ``xy`` removes on its own slice (bool; empty when
    the click lies outside the mask)."""
    m = np.asarray(mask2d) > 0
    rows, cols = m.shape
    x, y = min(max(int(round(xy[0])), 0), cols - 1), min(max(int(round(xy[1])), 0), rows - 1)
    if not m[y, x]:
        return np.zeros_like(m)
    region = grow_region(hu2d, (x, y), pixel_spacing) & m
    if not region[y, x]:
        region = m.copy()
    if region.sum() > max_frac * m.sum():
        region &= _disk_mm(m.shape, x, y, 2.0 * _depth_px(m, x, y, pixel_spacing), pixel_spacing)
    lab, _ = ndimage.label(region)
    return lab == lab[y, x]


def _smoothed(hu2d: np.ndarray, pixel_spacing: Sequence[float]) -> np.ndarray:
    sr, sc = (float(s) for s in pixel_spacing)
    return ndimage.gaussian_filter(hu2d.astype(np.float32), sigma=(1.0 / sr, 1.0 / sc))


def negative_region(mask3d: np.ndarray, hu3d: np.ndarray, axis: str, index: int, xy: Tuple[float, float],
                    pixel_spacing: Sequence[float], frozen: Collection[int] = (),
                    max_frac: float = MAX_FRAC, margin_hu: float = MARGIN_HU,
                    max_slices: Optional[int] = None) -> np.ndarray:
    """The 3D wrong region a negative click at ``xy`` on slice ``index`` lies in (bool, volume grid).

    ``pixel_spacing`` is the (row, column) spacing of a slice across ``axis``; ``frozen`` slices
    are never changed (except the clicked one); ``max_slices`` bounds the walk each way.
    """
    out = np.zeros(mask3d.shape, dtype=bool)
    first = clicked_region(get_slice(mask3d, axis, index), get_slice(hu3d, axis, index), xy, pixel_spacing, max_frac)
    if not first.any():
        return out
    get_slice(out, axis, index)[...] = first
    vals = _smoothed(get_slice(hu3d, axis, index), pixel_spacing)[first]
    lo = float(np.percentile(vals, 5)) - margin_hu
    hi = float(np.percentile(vals, 95)) + margin_hu
    n = out.shape[axis_index(axis)]
    frozen = set(int(f) for f in frozen)
    cross = np.ones((3, 3), dtype=bool)
    for direction in (+1, -1):
        prev = first
        t = index + direction
        steps = 0
        while 0 <= t < n and t not in frozen and (max_slices is None or steps < max_slices):
            m = get_slice(mask3d, axis, t) > 0
            if not m.any():
                break
            band = m & (np.abs(_smoothed(get_slice(hu3d, axis, t), pixel_spacing) - (lo + hi) / 2) <= (hi - lo) / 2)
            lab, _ = ndimage.label(band)
            ids = np.unique(lab[ndimage.binary_dilation(prev, structure=cross) & band])
            region = np.isin(lab, ids[ids > 0])
            if not region.any():
                break
            last = region.sum() > max_frac * m.sum() or region.sum() > 2 * prev.sum() + 16
            if last:
                region = m & prev
            get_slice(out, axis, t)[...] = region
            if last or not region.any():
                break
            prev = region
            t += direction
            steps += 1
    return out
