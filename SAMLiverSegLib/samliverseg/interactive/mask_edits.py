"""What a negative click removes from a 3D mask: the wrong region it lies in, across slices.

A negative click is given on one slice (across ``axis`` of the array ``[k, j, i]``, at pixel
``(x = column, y = row)`` of that slice). The wrong region is found without a model:

* on the clicked slice, the region of similar HU grown from the click (``seeded_region``) inside
  the mask, the part connected to the click. Where it would take more than ``max_frac`` of the
  slice's mask and its median HU is within ``MIN_CONTRAST_HU`` of the rest's or of the object's
  elsewhere (the wrong tissue looks like the object; a click at the object's border grew into
  it), or where the click lies at the edge of what grew (``EDGE_FRAC``, at any size), or where what
  grew lies around the rest of the slice's mask (``WRAP_FRAC``: the object's own border, bright by
  partial volume with the tissue beside it), or where it would take more than ``DISTINCT_MAX_FRAC``
  of it (almost all of it: the rest is too small to compare), only the blob around the click is
  taken: the pixels within twice the click's depth
  (its distance to the mask border) of the click, at most ``BLOB_MAX_MM``; and the removal stays on
  the clicked slice (HU could not tell the wrong tissue from the object there, so its band would
  take the object's bright border on the next slices; ``session3d`` may follow the cut with the
  model). Neither
  limit holds on a slice with no object: where the median HU of the slice's mask lies
  ``MIN_CONTRAST_HU`` or more from the object's elsewhere (the mask on the other slices) and fewer
  than ``NO_OBJECT_OVERLAP`` of its pixels lie in the object's interquartile HU range there (a leak
  past the liver's caudal end into bowel), unless the object is darker than the tissue around it
  (a tumour in the liver) and this slice's mask still is too, by a fraction of that (``FAINT_FRAC``:
  the object's end, faint by partial volume across slices). There all of the slice's mask goes
  (when the click's region is at least ``max_frac`` of it) and the object's HU is the one elsewhere;
* on the next slices, up and down (and on the clicked slice, to pick up what the grown region's
  opening left): the pixels of the mask whose (lightly smoothed) HU lies in the removed region's
  HU range (its 5th..95th percentile, +-``margin_hu``) and is nearer the removed region's median
  HU than the object's (the median of the rest of the clicked slice's mask), connected on that
  slice to what was removed on the slice before. Where those two medians differ by less than
  ``MIN_CONTRAST_HU``, or the removed region's median is that close to the object's elsewhere,
  or that HU range holds more than ``MAX_BAND_SHARE`` of the object's interior on the clicked
  slice (a scan without contrast, where the object's darker part lies in it; where the clicked
  slice holds no object or too little of it, on the nearest slice each way that holds it), the
  wrong tissue looks like the object and only the clicked slice's region is removed. A
  continuation may take up to ``DISTINCT_MAX_FRAC`` of a slice's mask, or all of it where that
  slice holds no object (the same test); the walk stops where nothing is left, at a ``frozen``
  slice (one that carries the user's own prompts), or where the region would take more than that
  or more than double its previous area (the wrong tissue merges with the object there): that
  slice loses only the previous slice's footprint, and the walk ends. It also ends, with nothing
  taken there, where what the band holds on a slice lies around the rest of its mask
  (``WRAP_FRAC``): the object's bright border, not a leak.

A removal of more than ``MAX_VOLUME_FRAC`` of the whole mask is kept to the clicked slice. The
result is a bool array on the volume grid; nothing outside the mask is ever included.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable, Collection, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from samliverseg.core.maskutil import axis_index, get_slice
from samliverseg.interactive.seeded_region import grow_region

#: HU added on both sides of the removed region's percentile range.
MARGIN_HU = 15.0
#: A removal may take at most this fraction of a slice's mask (else it is limited, see above).
MAX_FRAC = 0.5
#: Below this difference (HU) between the medians of the removed region and the rest of the
#: clicked slice's mask, the removal stays on the clicked slice.
MIN_CONTRAST_HU = 15.0
#: Where the removed tissue is distinct by HU, it may take up to this fraction of a slice's mask
#: (a leak into the heart at the dome can be larger than the liver there).
DISTINCT_MAX_FRAC = 0.9
#: A slice's mask holds no object where fewer than this fraction of its pixels lie in the object's
#: interquartile HU range elsewhere (and its median is ``MIN_CONTRAST_HU`` away).
NO_OBJECT_OVERLAP = 0.4
#: A slice judged to hold no object by its HU still holds a dark object (darker than the tissue
#: around it: a tumour in the liver) where its mask is darker than its ring (``RING_MM`` outside it)
#: by at least this fraction of what the object is darker than the tissue around it on the nearest
#: slices, and by at least ``FAINT_MIN_HU``: the object's end, faint by partial volume across
#: slices (livertumor05 and livertumor06 of ircadb-1.1: 23 %-64 % of it). A leak from a tumour goes
#: into the liver around it, of the ring's HU. A bright object (the liver) is never judged so: a
#: leak past its end (bowel) lies between it and the fat around it too.
FAINT_FRAC = 0.2
#: ... (HU).
FAINT_MIN_HU = 5.0
#: The ring around a slice's mask whose HU is the tissue around the object (mm).
RING_MM = 3.0
#: The object's contrast with the tissue around it is measured on up to this many mask slices each way.
AROUND_SLICES = 3
#: A removal across slices may take at most this fraction of the whole mask (else only its slice).
MAX_VOLUME_FRAC = 0.25
#: ... and that blob's radius is at most this (mm): a click deep inside the mask (a vessel the
#: reference leaves out) must not take a large disk of the object with it.
BLOB_MAX_MM = 15.0
#: A click within this fraction of its grown region's equivalent radius of that region's border
#: lay on a rim of wrong tissue at the mask's edge and may have grown from there into the object (a
#: darker part of the liver): only its blob goes, on its slice. A click in the middle of a leak lies
#: deeper than this (a slice with no object is not limited).
EDGE_FRAC = 0.2
#: A click whose grown region touches more than this fraction of the border of the rest of its
#: slice's mask grew around the object, along its border (a tumour's rim, bright by partial volume
#: with the liver beside it, and a rim of liver outside it): only its blob goes, on its slice.
#: Before session 28 such a region carried its HU band to the next slices and took the tumour's
#: rim on each (livertumor05 of ircadb-1.1 from 80 %: 3,057 tumour voxels over 7 slices). The walk
#: across slices stops, too, where the band's continuation lies so around the rest of a slice.
WRAP_FRAC = 0.5
#: The walk goes at most this many times the clicked region's equivalent diameter each way.
TALL = 2.0
#: HU carries a cut beyond its slice only where its band (the removed region's HU range, up to
#: midway to the object's) holds at most this fraction of the object's interior on the clicked
#: slice (the rest of its mask deeper than ``CORE_MM``); else the object's own pixels of that HU
#: would go too, and only the clicked slice's region is removed here (``session3d`` then follows
#: the cut with the model).
MAX_BAND_SHARE = 0.1
#: ... the interior: deeper than this (mm) inside the rest of the slice's mask, whose border pixels
#: mix the object with what lies beside it (partial volume) and are not the object's HU.
CORE_MM = 3.0


def _depth_mm(mask2d: np.ndarray, pixel_spacing: Sequence[float]) -> np.ndarray:
    """Each pixel's distance (mm) to the border of ``mask2d`` (0 outside it)."""
    d = ndimage.distance_transform_edt(np.pad(mask2d, 1), sampling=tuple(float(s) for s in pixel_spacing))
    return d[1:-1, 1:-1]


def _depth_px(mask2d: np.ndarray, x: int, y: int, pixel_spacing: Sequence[float]) -> float:
    """Distance (mm) from pixel (x, y) to the border of ``mask2d``."""
    return float(_depth_mm(mask2d, pixel_spacing)[y, x])


def _disk_mm(shape: Tuple[int, int], x: int, y: int, radius_mm: float, pixel_spacing: Sequence[float]) -> np.ndarray:
    sr, sc = (float(s) for s in pixel_spacing)
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return ((yy - y) * sr) ** 2 + ((xx - x) * sc) ** 2 <= radius_mm ** 2


def clicked_region(mask2d: np.ndarray, hu2d: np.ndarray, xy: Tuple[float, float], pixel_spacing: Sequence[float],
                   max_frac: float = MAX_FRAC, elsewhere: Optional[np.ndarray] = None,
                   around: Optional[float] = None) -> np.ndarray:
    """The part of ``mask2d`` a negative click at ``xy`` removes on its own slice (bool; empty when
    the click lies outside the mask). ``elsewhere``: the quartiles of the object's HU on the
    other slices (``_object_hu_elsewhere``), to tell a slice with no object and a click that grew
    into the object; ``around``: the HU of the tissue around a dark object (``_dark_object_around``)."""
    return _clicked(mask2d, hu2d, xy, pixel_spacing, max_frac, elsewhere, lambda: around)[0]


def _clicked(mask2d: np.ndarray, hu2d: np.ndarray, xy: Tuple[float, float], pixel_spacing: Sequence[float],
             max_frac: float, elsewhere: Optional[np.ndarray],
             around: Around = None) -> Tuple[np.ndarray, bool]:
    """:func:`clicked_region`, and whether it was kept to the blob around the click (the click lay
    at the edge of what grew from it, ``EDGE_FRAC``, or what grew took almost all of the slice's
    mask or looked like the object): then the removal stays on the clicked slice. Before session
    27 only the edge kept it there; a blob whose region had grown over its slice carried its HU
    band, the object's bright border in it, to the next slices (livertumor05 of ircadb-1.1)."""
    m = np.asarray(mask2d) > 0
    rows, cols = m.shape
    x, y = min(max(int(round(xy[0])), 0), cols - 1), min(max(int(round(xy[1])), 0), rows - 1)
    if not m[y, x]:
        return np.zeros_like(m), False
    region = grow_region(hu2d, (x, y), pixel_spacing) & m
    if not region[y, x]:
        region = m.copy()
    smooth = _smoothed(hu2d, pixel_spacing)
    if _holds_no_object(m, smooth, pixel_spacing, elsewhere, around):
        limit = False  # no object on this slice: its mask is all wrong tissue
    elif region.sum() > DISTINCT_MAX_FRAC * m.sum():
        limit = True
    else:
        # The click lies at the edge of what grew from it, or that grew around the rest of the
        # slice's mask, or is more than max_frac of it and looks like the rest or like the object
        # elsewhere.
        rest = m & ~region
        limit = _at_edge(region, x, y, pixel_spacing) or _wraps(region, rest) or (
            region.sum() > max_frac * m.sum() and (
                not _distinct(region, rest, smooth)
                or (elsewhere is not None and not _far(smooth[region], elsewhere[1]))))
    if limit:
        radius = min(2.0 * _depth_px(m, x, y, pixel_spacing), BLOB_MAX_MM)
        region &= _disk_mm(m.shape, x, y, radius, pixel_spacing)
    lab, _ = ndimage.label(region)
    return lab == lab[y, x], limit


def _at_edge(region: np.ndarray, x: int, y: int, pixel_spacing: Sequence[float]) -> bool:
    """Whether pixel (x, y) lies within ``EDGE_FRAC`` of ``region``'s equivalent radius of its border."""
    area_mm2 = float(region.sum()) * float(pixel_spacing[0]) * float(pixel_spacing[1])
    return _depth_px(region, x, y, pixel_spacing) < EDGE_FRAC * np.sqrt(area_mm2 / np.pi)


def _wraps(region: np.ndarray, rest: np.ndarray) -> bool:
    """Whether ``region`` lies around ``rest`` on its slice: more than ``WRAP_FRAC`` of the pixels
    just outside the largest part of ``rest`` (its 4-connected outer ring) are in it. A leak lies
    on one side of the object; what grew around it is the object's own border (partial volume with
    the tissue beside it, whose HU the click's region shares) with, at most, a rim of wrong tissue
    outside it."""
    lab, n = ndimage.label(rest)
    if n == 0:
        return False
    sizes = np.bincount(lab.ravel())[1:]
    if sizes.max() < 10:
        return False
    part = lab == 1 + int(np.argmax(sizes))
    ring = ndimage.binary_dilation(part) & ~part
    return float(np.count_nonzero(ring & region)) > WRAP_FRAC * float(np.count_nonzero(ring))


def _far(values: np.ndarray, object_hu: float) -> bool:
    """Whether the median of ``values`` lies ``MIN_CONTRAST_HU`` or more from ``object_hu``."""
    return values.size >= 10 and abs(float(np.median(values)) - float(object_hu)) >= MIN_CONTRAST_HU


def _no_object(values: np.ndarray, elsewhere: Optional[np.ndarray]) -> bool:
    """Whether a slice's mask (its smoothed HU ``values``) holds no object: its median lies
    ``MIN_CONTRAST_HU`` or more from the object's elsewhere and fewer than ``NO_OBJECT_OVERLAP`` of
    its pixels lie in the object's interquartile range there (half of an object's would)."""
    if elsewhere is None or not _far(values, elsewhere[1]):
        return False
    q25, _, q75 = (float(v) for v in elsewhere)
    return float(np.mean((values >= q25) & (values <= q75))) < NO_OBJECT_OVERLAP


#: What gives the HU of the tissue around a dark object when first asked (None: not dark), so that
#: it is measured only where a slice is judged to hold no object.
Around = Optional[Callable[[], Optional[float]]]


def _holds_no_object(m: np.ndarray, smooth: np.ndarray, pixel_spacing: Sequence[float],
                     elsewhere: Optional[np.ndarray], around: Around) -> bool:
    """Whether a slice's mask ``m`` (``smooth``: the slice's smoothed HU) holds no object: by its HU
    (``_no_object``), unless the object is dark (``around``: the HU of the tissue around it, see
    ``_dark_object_around``) and this mask is still darker than its ring (``FAINT_FRAC``)."""
    if not _no_object(smooth[m], elsewhere):
        return False
    around_hu = around() if around is not None else None
    if around_hu is None or elsewhere is None:
        return True
    ring = _ring(m, pixel_spacing)
    if ring.sum() < 10:
        return True
    faint = float(np.median(smooth[ring])) - float(np.median(smooth[m]))
    return not (faint >= FAINT_MIN_HU and faint >= FAINT_FRAC * (around_hu - float(elsewhere[1])))


def _crop_around(m: np.ndarray, pad_mm: float, pixel_spacing: Sequence[float]) -> Tuple[slice, slice]:
    """The bounding box of ``m`` widened by ``pad_mm`` (clipped to the slice), as two slices."""
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    pr, pc = (int(np.ceil(pad_mm / float(v))) + 1 for v in pixel_spacing)
    return (slice(max(0, rows[0] - pr), rows[-1] + pr + 1), slice(max(0, cols[0] - pc), cols[-1] + pc + 1))


def _ring(m: np.ndarray, pixel_spacing: Sequence[float]) -> np.ndarray:
    """The pixels outside ``m`` within ``RING_MM`` of it (computed on its bounding box)."""
    out = np.zeros_like(m, dtype=bool)
    if not m.any():
        return out
    box = _crop_around(m, RING_MM, pixel_spacing)
    d = ndimage.distance_transform_edt(~m[box], sampling=tuple(float(v) for v in pixel_spacing))
    out[box] = (d > 0) & (d <= RING_MM)
    return out


def _dark_object_around(mask3d: np.ndarray, hu3d: np.ndarray, axis: str, index: int,
                        pixel_spacing: Sequence[float], elsewhere: Optional[np.ndarray]) -> Optional[float]:
    """The median smoothed HU of the ring (``RING_MM``) around the mask on the nearest
    ``AROUND_SLICES`` mask slices each way from ``index``, where the object is darker than that
    by ``FAINT_MIN_HU`` or more (its median elsewhere); None otherwise (a bright object, or none)."""
    if elsewhere is None:
        return None
    a = axis_index(axis)
    vals = []
    for direction in (-1, +1):
        t, n = index + direction, 0
        while 0 <= t < mask3d.shape[a] and n < AROUND_SLICES:
            m = get_slice(mask3d, axis, t) > 0
            if not m.any():
                break
            box = _crop_around(m, RING_MM + 4.0, pixel_spacing)  # + 4 sigma of the smoothing
            ring = _ring(m[box], pixel_spacing)
            vals.append(_smoothed(get_slice(hu3d, axis, t)[box], pixel_spacing)[ring])
            t, n = t + direction, n + 1
    if not vals:
        return None
    around = float(np.median(np.concatenate(vals)))
    return around if around - float(elsewhere[1]) >= FAINT_MIN_HU else None


def _distinct(region: np.ndarray, rest: np.ndarray, smooth_hu: np.ndarray) -> bool:
    """Whether ``region`` is another tissue than ``rest`` by HU (medians ``MIN_CONTRAST_HU`` apart)."""
    if region.sum() < 10 or rest.sum() < 10:
        return False
    return abs(float(np.median(smooth_hu[region])) - float(np.median(smooth_hu[rest]))) >= MIN_CONTRAST_HU


def _interior(mask2d: np.ndarray, pixel_spacing: Sequence[float], depth_mm: float) -> np.ndarray:
    """The pixels of ``mask2d`` deeper than ``depth_mm`` from its border."""
    return _depth_mm(mask2d, pixel_spacing) > depth_mm


def _share_in_band(values: np.ndarray, band: Tuple[float, float]) -> float:
    """The fraction of ``values`` (HU) that lie in ``band`` (lo, hi)."""
    return float(np.mean((values >= band[0]) & (values <= band[1]))) if values.size else 0.0


def _smoothed(hu2d: np.ndarray, pixel_spacing: Sequence[float]) -> np.ndarray:
    sr, sc = (float(s) for s in pixel_spacing)
    return ndimage.gaussian_filter(hu2d.astype(np.float32), sigma=(1.0 / sr, 1.0 / sc))


def negative_region(mask3d: np.ndarray, hu3d: np.ndarray, axis: str, index: int, xy: Tuple[float, float],
                    pixel_spacing: Sequence[float], frozen: Collection[int] = (),
                    max_frac: float = MAX_FRAC, margin_hu: float = MARGIN_HU,
                    max_slices: Optional[int] = None, slice_mm: Optional[float] = None) -> np.ndarray:
    """The 3D wrong region a negative click at ``xy`` on slice ``index`` lies in (bool, volume grid).

    ``pixel_spacing`` is the (row, column) spacing of a slice across ``axis``; ``frozen`` slices
    are never changed (except the clicked one); ``max_slices`` bounds the walk each way. With the
    spacing across slices ``slice_mm`` and no ``max_slices``, the walk goes at most ``TALL`` times as
    far each way as the clicked slice's region is wide (its equivalent diameter): a wrong organ is
    not much taller than it is wide (a kidney about twice), and the walk does not follow vessels of
    the wrong tissue's HU far into the object.
    """
    out = np.zeros(mask3d.shape, dtype=bool)
    m0 = get_slice(mask3d, axis, index) > 0
    if not m0.any():
        return out
    elsewhere = _object_hu_elsewhere(mask3d, hu3d, axis, index)
    around = lru_cache(maxsize=None)(lambda: _dark_object_around(mask3d, hu3d, axis, index, pixel_spacing, elsewhere))
    first, blob = _clicked(m0, get_slice(hu3d, axis, index), xy, pixel_spacing, max_frac, elsewhere, around)
    if not first.any():
        return out
    if blob:  # HU could not tell the click's tissue from the object: its blob, on its slice
        get_slice(out, axis, index)[...] = first
        return out
    hu0 = _smoothed(get_slice(hu3d, axis, index), pixel_spacing)
    no_object = _holds_no_object(m0, hu0, pixel_spacing, elsewhere, around)
    if no_object and first.sum() >= max_frac * m0.sum():
        first = m0.copy()  # no object on this slice and the click's tissue is most of it: all of it goes
    rest = m0 & ~first
    # The object's HU: the rest of the clicked slice's mask, or the mask's elsewhere where this
    # slice holds no object or too little of the rest to compare.
    if elsewhere is None:
        object_hu = float(np.median(hu0[rest])) if rest.sum() >= 10 else None
    elif no_object or rest.sum() < max(10, (1.0 - DISTINCT_MAX_FRAC) * m0.sum()):
        object_hu = float(elsewhere[1])
    else:
        object_hu = float(np.median(hu0[rest]))
    wrong_hu = float(np.median(hu0[first])) if first.sum() >= 10 else None
    if (object_hu is None or wrong_hu is None or abs(wrong_hu - object_hu) < MIN_CONTRAST_HU
            or (elsewhere is not None and not _far(hu0[first], elsewhere[1]))):
        # The wrong tissue looks like the object (the rest of its slice, or the mask elsewhere, where
        # a click at the object's border grew into the object): HU cannot tell them apart.
        get_slice(out, axis, index)[...] = first
        return out
    vals = hu0[first]
    band = (float(np.percentile(vals, 5)) - margin_hu, float(np.percentile(vals, 95)) + margin_hu)
    mid = (wrong_hu + object_hu) / 2  # a pixel is wrong tissue if nearer the wrong region's HU than the object's
    band = (max(band[0], mid), band[1]) if wrong_hu > object_hu else (band[0], min(band[1], mid))
    core = _interior(rest, pixel_spacing, CORE_MM)
    core_hu = hu0[core] if not no_object and core.sum() >= 10 else _core_hu_nearby(
        mask3d, hu3d, axis, index, first, pixel_spacing, elsewhere, around)
    if core_hu.size >= 10 and _share_in_band(core_hu, band) > MAX_BAND_SHARE:
        # The band holds much of the object's own HU on this slice (a scan without contrast: the
        # object's darker part lies in it), or on the nearest slices that hold the object where
        # this one holds none or too little (past a tumour's end, the liver around it): a walk by
        # HU would take the object on every slice.
        get_slice(out, axis, index)[...] = first
        return out
    # On the clicked slice too, the HU-connected continuation of what grew from the click (the
    # grown region's opening may have left pieces of the wrong tissue).
    region = _continuation(m0, get_slice(hu3d, axis, index), first, band, pixel_spacing, DISTINCT_MAX_FRAC, 1.0,
                           elsewhere, around)
    get_slice(out, axis, index)[...] = first if region is None else (region | first)
    first = get_slice(out, axis, index).copy()
    if max_slices is None and slice_mm is not None:
        area_mm2 = float(first.sum()) * float(pixel_spacing[0]) * float(pixel_spacing[1])
        max_slices = int(np.ceil(TALL * 2.0 * np.sqrt(area_mm2 / np.pi) / float(slice_mm)))
    n = out.shape[axis_index(axis)]
    frozen = set(int(f) for f in frozen)
    for direction in (+1, -1):
        prev = first
        t = index + direction
        steps = 0
        while 0 <= t < n and t not in frozen and (max_slices is None or steps < max_slices):
            m = get_slice(mask3d, axis, t) > 0
            if not m.any():
                break
            region = _continuation(m, get_slice(hu3d, axis, t), prev, band, pixel_spacing, DISTINCT_MAX_FRAC, 2.0,
                                   elsewhere, around)
            last = region is None
            if last:
                region = m & prev  # the wrong tissue merges with the object here: only the footprint
            elif region.any() and _wraps(region, m & ~region) and not _holds_no_object(
                    m, _smoothed(get_slice(hu3d, axis, t), pixel_spacing), pixel_spacing, elsewhere, around):
                break  # what the band holds here lies around the object: its border, not a leak
            get_slice(out, axis, t)[...] = region
            if last or not region.any():
                break
            prev = region
            t += direction
            steps += 1
    if out.sum() > MAX_VOLUME_FRAC * np.count_nonzero(mask3d):
        # More than that is no leak but the object itself: keep the removal to the clicked slice.
        only = np.zeros_like(out)
        get_slice(only, axis, index)[...] = get_slice(out, axis, index)
        return only
    return out


def _core_hu_nearby(mask3d: np.ndarray, hu3d: np.ndarray, axis: str, index: int, first: np.ndarray,
                    pixel_spacing: Sequence[float], elsewhere: Optional[np.ndarray],
                    around: Around = None) -> np.ndarray:
    """The smoothed HU of the object's interior on the nearest slice each way from ``index`` whose
    mask holds the object (not ``_holds_no_object``): the rest of that slice's mask outside the clicked
    region ``first`` (where the wrong tissue goes on: a leak touches the object on its last slices),
    deeper than ``CORE_MM``. Empty if there is none."""
    a = axis_index(axis)
    vals = []
    for direction in (-1, +1):
        t = index + direction
        while 0 <= t < mask3d.shape[a]:
            m = get_slice(mask3d, axis, t) > 0
            if not m.any():
                break
            smooth = _smoothed(get_slice(hu3d, axis, t), pixel_spacing)
            if not _holds_no_object(m, smooth, pixel_spacing, elsewhere, around):
                core = _interior(m & ~first, pixel_spacing, CORE_MM)
                if core.any():
                    vals.append(smooth[core])
                break
            t += direction
    return np.concatenate(vals) if vals else np.zeros(0, dtype=np.float32)


def _object_hu_elsewhere(mask3d: np.ndarray, hu3d: np.ndarray, axis: str, index: int) -> Optional[np.ndarray]:
    """The quartiles (25th, 50th, 75th percentiles) of the HU of the mask on every slice but
    ``index`` (None when it has fewer than 10 voxels there)."""
    a = axis_index(axis)
    sl = [slice(None)] * 3
    vals = []
    for part in (slice(0, index), slice(index + 1, None)):
        sl[a] = part
        m = np.asarray(mask3d[tuple(sl)]) > 0
        if m.any():
            vals.append(np.asarray(hu3d[tuple(sl)])[m])
    vals = np.concatenate(vals) if vals else np.zeros(0)
    return np.percentile(vals, [25.0, 50.0, 75.0]) if vals.size >= 10 else None


def _continuation(m: np.ndarray, hu2d: np.ndarray, prev: np.ndarray, band: Tuple[float, float],
                  pixel_spacing: Sequence[float], max_frac: float, max_growth: float,
                  elsewhere: Optional[np.ndarray] = None, around: Around = None) -> Optional[np.ndarray]:
    """The pixels of ``m`` in the HU ``band`` connected to ``prev``; None where that is more than
    ``max_growth`` times ``prev`` (+16 px), or more than ``max_frac`` of ``m`` unless ``m`` as a
    whole holds no object (``_holds_no_object``; ``elsewhere``: the object's HU quartiles elsewhere;
    ``around``: the HU around a dark object)."""
    lo, hi = band
    smooth = _smoothed(hu2d, pixel_spacing)
    inside = m & (np.abs(smooth - (lo + hi) / 2) <= (hi - lo) / 2)
    lab, _ = ndimage.label(inside)
    ids = np.unique(lab[ndimage.binary_dilation(prev, structure=np.ones((3, 3), dtype=bool)) & inside])
    region = np.isin(lab, ids[ids > 0])
    if region.sum() > max_growth * prev.sum() + 16:
        return None
    if region.sum() > max_frac * m.sum() and not _holds_no_object(m, smooth, pixel_spacing, elsewhere, around):
        return None
    return region
