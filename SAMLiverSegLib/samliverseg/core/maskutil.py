"""Small mask helpers: bounding boxes, representative slices, interior points.

Conventions: a 3D mask is ``array[k, j, i]``; a 2D mask is ``array[row, col]``. For the slice of
a 3D mask across ``axis`` (``"k"``/0, ``"j"``/1 or ``"i"``/2; see :func:`get_slice`) the 2D
helpers return coordinates as ``(col, row)`` pairs, which are IJK coordinates in IJK order:
an axial slice ``mask[k]`` (rows ``j``, cols ``i``) gives ``(i, j)``; a coronal slice
``mask[:, j, :]`` (rows ``k``, cols ``i``) gives ``(i, k)``; a sagittal slice ``mask[:, :, i]``
(rows ``k``, cols ``j``) gives ``(j, k)``. Box corners are inclusive. Non-zero is foreground.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import numpy as np
from scipy import ndimage

__all__ = [
    "axis_index", "get_slice", "bbox_2d", "bbox_3d", "slice_areas", "nonempty_slices",
    "largest_slice", "middle_slice", "interior_point", "slice_box", "bbox_window", "dilate", "dilate_rect",
]

Axis = Union[int, str]
_AXES = {"k": 0, "j": 1, "i": 2, 0: 0, 1: 1, 2: 2}


def axis_index(axis: Axis) -> int:
    """Array axis of ``axis``: ``"k"``/0, ``"j"``/1, ``"i"``/2 (the array is [k, j, i])."""
    try:
        return _AXES[axis]
    except (KeyError, TypeError):
        raise ValueError(f"axis must be 'k', 'j', 'i' or 0, 1, 2, got {axis!r}") from None


def get_slice(array3d: np.ndarray, axis: Axis, index: int) -> np.ndarray:
    """The 2D view of ``array3d[k, j, i]`` at ``index`` across ``axis`` (rows, cols as documented above)."""
    a = axis_index(axis)
    sl = [slice(None)] * 3
    sl[a] = int(index)
    return array3d[tuple(sl)]


def bbox_2d(mask2d: np.ndarray) -> Optional[Tuple[int, int, int, int]]:
    """``(c0, r0, c1, r1)`` inclusive of the non-zero pixels (``(i0, j0, i1, j1)`` on an axial slice); None if empty."""
    m = np.asarray(mask2d)
    if m.ndim != 2:
        raise ValueError(f"bbox_2d needs a 2D mask, got shape {m.shape}")
    rows = np.flatnonzero(m.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(m.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def bbox_3d(mask3d: np.ndarray) -> Optional[Tuple[int, int, int, int, int, int]]:
    """``(i0, j0, k0, i1, j1, k1)`` inclusive (the order of :class:`samliverseg.core.prompts.Roi3D`); None if empty."""
    m = np.asarray(mask3d)
    if m.ndim != 3:
        raise ValueError(f"bbox_3d needs a 3D mask [k, j, i], got shape {m.shape}")
    ks = np.flatnonzero(m.any(axis=(1, 2)))
    if ks.size == 0:
        return None
    js = np.flatnonzero(m.any(axis=(0, 2)))
    is_ = np.flatnonzero(m.any(axis=(0, 1)))
    return int(is_[0]), int(js[0]), int(ks[0]), int(is_[-1]), int(js[-1]), int(ks[-1])


def bbox_window(mask: np.ndarray, pad: int = 0) -> Optional[Tuple[slice, ...]]:
    """Index slices (one per axis, any number of axes) of the non-zero elements' bounding box
    grown by ``pad`` on every side and clipped to the array; None if empty. Morphology of a
    bounded reach gives the whole array's result when computed in such a window (see
    :func:`dilate`), at the cost of the object rather than of the array."""
    m = np.asarray(mask)
    out = []
    for a in range(m.ndim):
        idx = np.flatnonzero(m.any(axis=tuple(b for b in range(m.ndim) if b != a)))
        if idx.size == 0:
            return None
        out.append(slice(max(0, int(idx[0]) - pad), min(m.shape[a], int(idx[-1]) + pad + 1)))
    return tuple(out)


def dilate(mask: np.ndarray, iterations: int = 1, structure: Optional[np.ndarray] = None) -> np.ndarray:
    """``scipy.ndimage.binary_dilation(mask, structure, iterations)`` (bool, same shape), computed
    in the mask's bounding box grown by the dilation's reach: the same result, faster for an
    object much smaller than its array. ``structure`` must reach one element (3 wide on every axis)."""
    m = np.asarray(mask) != 0
    out = np.zeros(m.shape, dtype=bool)
    it = max(1, int(iterations))
    win = bbox_window(m, it)
    if win is not None:
        out[win] = ndimage.binary_dilation(m[win], structure=structure, iterations=it)
    return out


def dilate_rect(mask: np.ndarray, reach: Sequence[int]) -> np.ndarray:
    """``mask`` (bool, same shape) dilated by a rectangle that reaches ``reach[a]`` elements along
    each axis ``a`` (separably, in the mask's bounding box grown by the largest reach). A reach in
    mm is a different count of pixels along each axis of an anisotropic slice (a coronal or sagittal
    slice of a volume with thick slices); with equal reaches it is :func:`dilate` with the full
    3 x 3 structure iterated that many times (the same square)."""
    m = np.asarray(mask) != 0
    if len(reach) != m.ndim:
        raise ValueError(f"reach has {len(reach)} entries for a {m.ndim}-D mask")
    out = np.zeros(m.shape, dtype=bool)
    win = bbox_window(m, max(int(r) for r in reach))
    if win is None:
        return out
    w = m[win]
    for a, r in enumerate(reach):
        if int(r) > 0:
            shape = [1] * m.ndim
            shape[a] = 2 * int(r) + 1
            w = ndimage.binary_dilation(w, structure=np.ones(shape, dtype=bool))
    out[win] = w
    return out


def slice_areas(mask3d: np.ndarray, axis: Axis = "k") -> np.ndarray:
    """Number of foreground voxels on each slice across ``axis``."""
    a = axis_index(axis)
    m = np.asarray(mask3d) != 0
    return m.sum(axis=tuple(x for x in range(3) if x != a))


def nonempty_slices(mask3d: np.ndarray, axis: Axis = "k") -> np.ndarray:
    """Indices of the slices across ``axis`` that contain foreground, ascending."""
    return np.flatnonzero(slice_areas(mask3d, axis))


def largest_slice(mask3d: np.ndarray, axis: Axis = "k") -> Optional[int]:
    """The slice with the most foreground (the lowest index on ties); None if empty."""
    areas = slice_areas(mask3d, axis)
    if not areas.any():
        return None
    return int(np.argmax(areas))


def middle_slice(mask3d: np.ndarray, axis: Axis = "k", mode: str = "median") -> Optional[int]:
    """A representative slice of the object across ``axis``; None if the mask is empty.

    ``mode="median"`` (default): the median index among the non-empty slices (the lower middle
    one for an even count) — the middle of the object's extent, always a non-empty slice even
    for an object in several pieces. ``mode="largest"``: :func:`largest_slice`.
    """
    if mode == "largest":
        return largest_slice(mask3d, axis)
    if mode != "median":
        raise ValueError(f"mode must be 'median' or 'largest', got {mode!r}")
    idx = nonempty_slices(mask3d, axis)
    if idx.size == 0:
        return None
    return int(idx[(idx.size - 1) // 2])


def interior_point(mask2d: np.ndarray, spacing: Optional[Sequence[float]] = None) -> Optional[Tuple[int, int]]:
    """``(col, row)`` of the pixel farthest from the background (``(i, j)`` on an axial slice); None if empty.

    The distance is the Euclidean distance transform of the mask with the image border counted
    as background (a mask that fills the image still has a well-defined centre). ``spacing`` is
    the pixel size ``(col, row)`` in mm for anisotropic slices (e.g. ``(si, sk)`` on a coronal
    slice); ties go to the first pixel in row-major order.
    """
    m = np.asarray(mask2d) != 0
    if m.ndim != 2:
        raise ValueError(f"interior_point needs a 2D mask, got shape {m.shape}")
    if not m.any():
        return None
    padded = np.pad(m, 1, constant_values=False)
    sampling = None if spacing is None else (float(spacing[1]), float(spacing[0]))
    dist = ndimage.distance_transform_edt(padded, sampling=sampling)[1:-1, 1:-1]
    r, c = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return int(c), int(r)


def slice_box(mask3d: np.ndarray, axis: Axis = "k", index: Optional[int] = None, margin: int = 0):
    """A :class:`samliverseg.core.prompts.SliceBox` around the object on one slice; None if that slice is empty.

    ``index`` defaults to :func:`middle_slice`. ``margin`` voxels are added on each side and the
    box is clipped to the volume.
    """
    from samliverseg.core.prompts import SliceBox

    a = axis_index(axis)
    if index is None:
        index = middle_slice(mask3d, a)
        if index is None:
            return None
    box = bbox_2d(get_slice(np.asarray(mask3d), a, index))
    if box is None:
        return None
    c0, r0, c1, r1 = box
    shape = np.asarray(mask3d).shape
    rows_n, cols_n = [shape[x] for x in range(3) if x != a]
    c0, r0 = max(0, c0 - margin), max(0, r0 - margin)
    c1, r1 = min(cols_n - 1, c1 + margin), min(rows_n - 1, r1 + margin)
    # in-plane IJK axes in IJK order: the column axis has the lower IJK index
    ijk_axis = {0: 2, 1: 1, 2: 0}[a]  # array axis -> IJK position
    lo, hi = [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]
    in_plane = [p for p in range(3) if p != ijk_axis]  # IJK positions, ascending: col, row
    lo[in_plane[0]], lo[in_plane[1]] = float(c0), float(r0)
    hi[in_plane[0]], hi[in_plane[1]] = float(c1), float(r1)
    lo[ijk_axis] = hi[ijk_axis] = float(index)
    return SliceBox(tuple(lo), tuple(hi))  # type: ignore[arg-type]
