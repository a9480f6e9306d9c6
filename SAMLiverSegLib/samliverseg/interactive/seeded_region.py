"""From clicked points to a box, for models that were trained with box prompts only.

LiteMedSAM was distilled and fine-tuned with boxes; given a lone point it returns an almost empty
mask. A clinician's click is still the quickest prompt, so for such models the engine turns the
clicks on a slice into a box first: a region is grown from each positive point over the pixels
whose HU is close to the HU around the click (on a lightly smoothed slice), thin bridges to
neighbouring structures of similar density are cut with a morphological opening, the part
connected to the click is kept, and pixels of regions grown from negative points are removed.
The bounding box of what remains is the box prompt.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

#: HU tolerance around the click's local mean (at least this, more in noisy tissue).
MIN_TOLERANCE_HU = 30.0
#: Radius (mm) of the opening that cuts thin bridges to neighbouring tissue.
OPENING_MM = 3.0
#: A region never extends farther than this from its click (mm).
MAX_RADIUS_MM = 150.0


def _disk(radius_px: int) -> np.ndarray:
    r = max(1, int(radius_px))
    y, x = np.ogrid[-r : r + 1, -r : r + 1]
    return (x * x + y * y) <= r * r


def grow_region(hu2d: np.ndarray, seed_xy: Tuple[float, float], pixel_spacing: Sequence[float] = (1.0, 1.0),
                tolerance_hu: Optional[float] = None) -> np.ndarray:
    """The region of similar HU connected to ``seed_xy`` (x = column, y = row); bool (rows, cols)."""
    rows, cols = hu2d.shape
    sr, sc = (float(s) for s in pixel_spacing)
    x, y = int(round(seed_xy[0])), int(round(seed_xy[1]))
    x, y = min(max(x, 0), cols - 1), min(max(y, 0), rows - 1)
    smooth = ndimage.gaussian_filter(hu2d.astype(np.float32), sigma=(1.0 / sr, 1.0 / sc))
    r_r, r_c = max(1, int(round(2.0 / sr))), max(1, int(round(2.0 / sc)))
    patch = hu2d[max(0, y - r_r) : y + r_r + 1, max(0, x - r_c) : x + r_c + 1].astype(np.float64)
    centre = float(np.median(patch))
    tol = tolerance_hu if tolerance_hu is not None else max(MIN_TOLERANCE_HU, 2.5 * float(patch.std()))
    inside = np.abs(smooth - centre) <= tol
    # Limit the reach of the region (an ellipse of MAX_RADIUS_MM in physical units).
    yy, xx = np.ogrid[:rows, :cols]
    inside &= ((yy - y) * sr) ** 2 + ((xx - x) * sc) ** 2 <= MAX_RADIUS_MM ** 2
    if not inside[y, x]:
        return np.zeros_like(inside)
    opened = ndimage.binary_opening(inside, structure=_disk(int(round(OPENING_MM / min(sr, sc)))))
    region = opened if opened[y, x] else inside
    lab, _ = ndimage.label(region)
    out = lab == lab[y, x]
    return ndimage.binary_fill_holes(out)


def box_from_points(hu2d: np.ndarray, positive_xy: Sequence[Tuple[float, float]],
                    negative_xy: Sequence[Tuple[float, float]] = (),
                    pixel_spacing: Sequence[float] = (1.0, 1.0)) -> Optional[Tuple[float, float, float, float]]:
    """A box (x0, y0, x1, y1) around the regions grown from the positive clicks, without the
    regions grown from the negative ones; None when nothing grew."""
    if not positive_xy:
        return None
    region = np.zeros(hu2d.shape, dtype=bool)
    for p in positive_xy:
        region |= grow_region(hu2d, p, pixel_spacing)
    for n in negative_xy:
        neg = grow_region(hu2d, n, pixel_spacing)
        keep_pos = np.zeros_like(region)
        for p in positive_xy:  # never remove the clicked pixels themselves
            keep_pos[int(round(p[1])), int(round(p[0]))] = True
        region &= ~(neg & ~keep_pos)
    if not region.any():
        return None
    rows = np.flatnonzero(region.any(axis=1))
    cols = np.flatnonzero(region.any(axis=0))
    x0, x1, y0, y1 = float(cols[0]), float(cols[-1]), float(rows[0]), float(rows[-1])
    # Every positive click lies inside the box.
    for px, py in positive_xy:
        x0, x1, y0, y1 = min(x0, px), max(x1, px), min(y0, py), max(y1, py)
    return x0, y0, x1, y1
