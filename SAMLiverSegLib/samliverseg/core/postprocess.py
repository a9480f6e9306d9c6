"""Mask clean-up: connected components and hole filling (scipy.ndimage).

Every function takes a 2D or 3D mask (non-zero is foreground), leaves its input untouched and
returns a new ``uint8`` array of 0/1 of the same shape; an empty input gives an empty output.
``connectivity`` is scipy's: 1 = faces (6-neighbourhood in 3D, 4 in 2D, the default),
``ndim`` = faces, edges and corners (26 in 3D, 8 in 2D).
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import numpy as np
from scipy import ndimage

from samliverseg.core.maskutil import bbox_window

__all__ = ["label_components", "largest_connected_component", "remove_small_components",
           "keep_components_touching", "fill_holes"]


def _as_bool(mask: np.ndarray) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim not in (2, 3):
        raise ValueError(f"expected a 2D or 3D mask, got shape {m.shape}")
    return m != 0


def _structure(ndim: int, connectivity: int) -> np.ndarray:
    if not 1 <= int(connectivity) <= ndim:
        raise ValueError(f"connectivity must be 1..{ndim} for a {ndim}D mask, got {connectivity}")
    return ndimage.generate_binary_structure(ndim, int(connectivity))


def label_components(mask: np.ndarray, connectivity: int = 1) -> Tuple[np.ndarray, int]:
    """``(labels, n)``: the connected components of ``mask`` numbered 1..n in raster order."""
    m = _as_bool(mask)
    lab, n = ndimage.label(m, structure=_structure(m.ndim, connectivity))
    return lab, int(n)


def largest_connected_component(mask: np.ndarray, connectivity: int = 1) -> np.ndarray:
    """The largest connected component (on a tie, the first in raster order)."""
    lab, n = label_components(mask, connectivity)
    if n == 0:
        return np.zeros(lab.shape, dtype=np.uint8)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return (lab == int(np.argmax(sizes))).astype(np.uint8)


def remove_small_components(mask: np.ndarray, min_voxels: int, connectivity: int = 1) -> np.ndarray:
    """Drop the components with fewer than ``min_voxels`` voxels."""
    lab, n = label_components(mask, connectivity)
    if n == 0:
        return np.zeros(lab.shape, dtype=np.uint8)
    sizes = np.bincount(lab.ravel())
    keep = sizes >= int(min_voxels)
    keep[0] = False
    return keep[lab].astype(np.uint8)


def keep_components_touching(mask: np.ndarray, seed_mask: np.ndarray, connectivity: int = 1,
                             fallback_largest: bool = False) -> np.ndarray:
    """Keep the components of ``mask`` that overlap ``seed_mask`` (e.g. the prompted slice's mask,
    or a mask of the prompt points).

    When no component overlaps the seed the result is empty, or the largest component with
    ``fallback_largest=True``.
    """
    m = _as_bool(mask)
    seed = np.asarray(seed_mask) != 0
    if seed.shape != m.shape:
        raise ValueError(f"seed_mask shape {seed.shape} differs from mask shape {m.shape}")
    out = np.zeros(m.shape, dtype=np.uint8)
    win = bbox_window(m)  # components lie within the mask's bounding box (the same labels, in raster order)
    if win is None:
        return out
    lab, n = label_components(m[win], connectivity)
    ids = np.unique(lab[seed[win] & m[win]])
    ids = ids[ids > 0]
    if ids.size == 0:
        if fallback_largest:
            out[win] = largest_connected_component(m[win], connectivity)
        return out
    keep = np.zeros(n + 1, dtype=bool)
    keep[ids] = True
    out[win] = keep[lab]
    return out


def fill_holes(mask: np.ndarray, per_slice: bool = False, axis: Union[int, str] = 0,
               structure: Optional[np.ndarray] = None) -> np.ndarray:
    """Fill the holes of ``mask``: background regions not connected to the array border.

    ``per_slice=False`` fills in 3D (a cavity must be closed in all directions);
    ``per_slice=True`` fills each 2D slice across ``axis`` (0/"k" axial by default, 1/"j",
    2/"i"), which also closes vessels or tubes that cross the slices. A 2D mask is filled in 2D
    either way. Holes are found with face connectivity of the background (scipy's default).
    """
    m = _as_bool(mask)
    if not m.any():
        return np.zeros(m.shape, dtype=np.uint8)
    if m.ndim == 2 or not per_slice:
        return _fill_in_box(m, structure).astype(np.uint8)
    a = {"k": 0, "j": 1, "i": 2}.get(axis, axis) if isinstance(axis, str) else int(axis)
    if a not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1, 2 or 'k', 'j', 'i', got {axis!r}")
    out = np.moveaxis(m.copy(), a, 0)
    for s in np.flatnonzero(out.any(axis=(1, 2))):
        out[s] = _fill_in_box(out[s], structure)
    return np.ascontiguousarray(np.moveaxis(out, 0, a)).astype(np.uint8)


def _fill_in_box(m: np.ndarray, structure: Optional[np.ndarray]) -> np.ndarray:
    """``binary_fill_holes`` computed in the mask's bounding box plus one element: outside the box
    all is background connected to the array's border, so the holes are the same."""
    out = m.copy()
    win = bbox_window(m, 1)
    if win is not None:
        out[win] = ndimage.binary_fill_holes(m[win], structure=structure)
    return out
