"""What a negative click removes (``interactive.mask_edits.negative_region``), without a model, on
a synthetic volume where propagation leaked past the object's end into another tissue."""

from __future__ import annotations

import numpy as np

from samliverseg.interactive.mask_edits import BLOB_MAX_MM, negative_region

PIXEL_MM = (1.5, 1.5)  # (row, column)
SLICE_MM = 3.0


def disk(shape, centre_ji, radius):
    jj, ii = np.ogrid[: shape[0], : shape[1]]
    return (jj - centre_ji[0]) ** 2 + (ii - centre_ji[1]) ** 2 <= radius ** 2


def leaked_scene(rim: bool = False):
    """The object (60 HU) on slices 12..29; a leak into another tissue (15 HU) on slices 3..16,
    touching the object on 12..16 and alone below it, where the mask also holds fat (-40 HU)
    beside it: on slices 3..11 the mask holds no object at all. With ``rim``, slices 20..26 also
    hold a ring of 25 HU tissue around the object (returned in ``fat``), 40 % of their mask."""
    rng = np.random.default_rng(0)
    shape = (32, 64, 64)
    hu = np.full(shape, -100.0) + rng.normal(0.0, 5.0, shape)
    obj, leak, fat = (np.zeros(shape, bool) for _ in range(3))
    for k in range(12, 30):
        obj[k] = disk(shape[1:], (32, 22), 14)
    for k in range(3, 17):
        leak[k] = disk(shape[1:], (32, 43), 7) & ~obj[k]
    for k in range(3, 12):
        fat[k] = disk(shape[1:], (32, 52), 5) & ~leak[k]
    if rim:
        for k in range(20, 27):
            fat[k] = disk(shape[1:], (32, 22), 18) & ~obj[k] & ~leak[k]
    hu[obj] = 60.0 + rng.normal(0.0, 5.0, int(obj.sum()))
    hu[leak] = 15.0 + rng.normal(0.0, 5.0, int(leak.sum()))
    ring = fat & (np.arange(shape[0]) >= 20)[:, None, None]
    hu[fat & ~ring] = -40.0 + rng.normal(0.0, 5.0, int((fat & ~ring).sum()))
    hu[ring] = 25.0 + rng.normal(0.0, 5.0, int(ring.sum()))
    return hu.astype(np.float32), obj, leak, fat


def test_a_click_where_the_mask_holds_no_object_takes_the_leak_away_in_3d():
    hu, obj, leak, fat = leaked_scene()
    mask = (obj | leak | fat).astype(np.uint8)
    out = negative_region(mask, hu, "k", 6, (43.0, 32.0), PIXEL_MM, frozen=[20], slice_mm=SLICE_MM)
    below = np.arange(mask.shape[0]) < 12
    # the clicked slice loses its whole mask (the fat beside the leak too), the slices below the
    # object's end almost all of theirs (the HU-connected continuation), ...
    assert out[6].sum() == mask[6].sum()
    assert out[below].sum() >= 0.97 * mask[below].sum(), (out[below].sum(), mask[below].sum())
    # ... the leak goes on the slices where it touches the object, and the object stays
    assert out[12:17][leak[12:17]].mean() > 0.9, out[12:17][leak[12:17]].mean()
    assert out[obj].sum() < 0.005 * obj.sum()  # a few border pixels whose smoothed HU is a blend


def test_a_click_in_the_object_itself_stays_a_small_blob_on_its_slice():
    hu, obj, leak, fat = leaked_scene()
    mask = (obj | leak | fat).astype(np.uint8)
    out = negative_region(mask, hu, "k", 22, (22.0, 32.0), PIXEL_MM, frozen=[20], slice_mm=SLICE_MM)
    assert set(np.flatnonzero(out.any(axis=(1, 2)))) == {22}
    assert 0 < out.sum() <= np.pi * (BLOB_MAX_MM / PIXEL_MM[0] + 1) ** 2 < obj[22].sum()


def test_a_click_that_grows_into_the_object_is_not_carried_through_it():
    """A click whose region is most of its slice's mask, of another HU than the rest of that slice
    (a rim of wrong tissue) but of the object's HU elsewhere, is the object: it stays a blob on its
    slice and is not walked through the object's other slices."""
    hu, obj, leak, fat = leaked_scene(rim=True)
    mask = (obj | leak | fat).astype(np.uint8)
    assert obj[23].sum() > 0.5 * mask[23].sum()
    out = negative_region(mask, hu, "k", 23, (22.0, 32.0), PIXEL_MM, frozen=[16], slice_mm=SLICE_MM)
    assert set(np.flatnonzero(out.any(axis=(1, 2)))) == {23}
    assert 0 < out.sum() <= np.pi * (BLOB_MAX_MM / PIXEL_MM[0] + 1) ** 2


def test_without_the_object_elsewhere_a_whole_slice_click_stays_on_its_slice():
    """A mask that is the leak alone (no object anywhere to compare with) is never cut in 3D."""
    hu, obj, leak, fat = leaked_scene()
    mask = leak.astype(np.uint8)
    out = negative_region(mask, hu, "k", 6, (43.0, 32.0), PIXEL_MM, slice_mm=SLICE_MM)
    assert set(np.flatnonzero(out.any(axis=(1, 2)))) <= {6}


def darker_part_scene():
    """The object (60 HU, a disk on slices 12..29) whose part right of column 25 is darker (0 HU)
    on slices 18..25, and there a 3-pixel rim of wrong tissue of that HU beside it, in the mask
    (``rim``): 40 % of those slices' mask, a fifth of the mask as a whole."""
    rng = np.random.default_rng(1)
    shape = (32, 64, 64)
    hu = np.full(shape, -100.0) + rng.normal(0.0, 5.0, shape)
    obj, rim = np.zeros(shape, bool), np.zeros(shape, bool)
    right = (np.arange(shape[2]) > 25)[None, :]
    for k in range(12, 30):
        obj[k] = disk(shape[1:], (32, 22), 14)
    for k in range(18, 26):
        rim[k] = disk(shape[1:], (32, 22), 17) & ~obj[k] & right
    dark = obj & (np.arange(shape[0]) >= 18)[:, None, None] & (np.arange(shape[0]) <= 25)[:, None, None] & right[None]
    hu[obj] = 60.0 + rng.normal(0.0, 10.0, int(obj.sum()))
    hu[dark | rim] = 0.0 + rng.normal(0.0, 5.0, int((dark | rim).sum()))
    return hu.astype(np.float32), obj, dark, rim


def test_a_click_on_a_rim_at_the_masks_edge_takes_a_blob_not_the_darker_part_it_grows_into():
    """A negative click on a rim of wrong tissue at the mask's edge whose region grows into a
    darker part of the object (more than ``max_frac`` of its slice's mask) takes only its blob, on
    its slice (before: the darker part and the rim went on all 18 of the object's slices, with 253
    px of the object beyond); a click in the middle of that darker part says the part is wrong, and
    it goes in 3D."""
    hu, obj, dark, rim = darker_part_scene()
    mask = (obj | rim).astype(np.uint8)
    wrong = dark | rim
    frac = 0.3
    assert wrong[22].sum() > frac * mask[22].sum() and wrong.sum() < 0.25 * mask.sum()
    edge = negative_region(mask, hu, "k", 22, (37.0, 32.0), PIXEL_MM, max_frac=frac, slice_mm=SLICE_MM)
    assert set(np.flatnonzero(edge.any(axis=(1, 2)))) == {22}
    assert 0 < edge.sum() < 0.2 * wrong[22].sum(), (int(edge.sum()), int(wrong[22].sum()))
    middle = negative_region(mask, hu, "k", 22, (31.0, 32.0), PIXEL_MM, max_frac=frac, slice_mm=SLICE_MM)
    assert set(np.flatnonzero(middle.any(axis=(1, 2)))) >= set(range(19, 25))
    assert (middle & wrong).sum() > 0.8 * wrong.sum()
    # (and the footprint on the slice where the darker part ends, where the walk stops, and border pixels)
    assert (middle & ~wrong).sum() < 0.15 * middle.sum(), (int((middle & ~wrong).sum()), int(middle.sum()))


def two_tissues(seed, obj_slices, obj_disk, wrong_slices, wrong_disk):
    """(rng, HU of fat at -100, the object, the wrong tissue): disks ((row, column) centre, radius)
    on the given slices of a 32x64x64 volume; the wrong tissue leaves out the object."""
    rng = np.random.default_rng(seed)
    shape = (32, 64, 64)
    hu = np.full(shape, -100.0) + rng.normal(0.0, 5.0, shape)
    obj, wrong = np.zeros(shape, bool), np.zeros(shape, bool)
    for k in obj_slices:
        obj[k] = disk(shape[1:], *obj_disk)
    for k in wrong_slices:
        wrong[k] = disk(shape[1:], *wrong_disk) & ~obj[k]
    return rng, hu, obj, wrong

def test_in_a_low_contrast_scan_a_cut_whose_hu_band_holds_the_objects_darker_part_stays_on_its_slice():
    """A non-contrast scan (the totalseg example: liver 35..53 HU interquartile, a wrong region at
    26 HU beside it). The cut's HU band reaches midway to the object's median, and a quarter of the
    object's pixels lie in it: a walk by HU took the object's darker pixels with the wrong tissue on
    every slice (here 222 voxels of the object on 21 slices; on the totalseg liver cropped at its
    top, 848 of the 1,245 voxels a click removed were liver). HU cannot carry that cut: only the
    clicked slice's region goes (a ``CorrectionSession`` then follows it with the model)."""
    rng, hu, obj, wrong = two_tissues(2, range(6, 27), ((32, 22), 14), range(10, 21), ((32, 41), 6))
    hu[obj] = 44.0 + rng.normal(0.0, 13.0, int(obj.sum()))
    hu[wrong] = 26.0 + rng.normal(0.0, 6.0, int(wrong.sum()))
    mask = (obj | wrong).astype(np.uint8)
    out = negative_region(mask, hu.astype(np.float32), "k", 15, (42.0, 32.0), (3.0, 3.0), slice_mm=3.0)
    assert set(np.flatnonzero(out.any(axis=(1, 2)))) == {15}
    assert out.sum() >= 0.5 * wrong[15].sum() and not (out & obj).any(), (int(out.sum()), int((out & obj).sum()))
    # with the object's HU well apart from the band (a contrast scan), the same cut walks in 3D
    hu[obj] += 40.0
    out = negative_region(mask, hu.astype(np.float32), "k", 15, (42.0, 32.0), (3.0, 3.0), slice_mm=3.0)
    assert set(np.flatnonzero(out.any(axis=(1, 2)))) >= set(range(11, 20))
    assert (out & wrong).sum() > 0.8 * wrong.sum() and (out & obj).sum() < 0.01 * obj.sum()


def test_a_cut_from_a_slice_with_no_object_whose_band_holds_the_objects_end_stays_on_its_slice():
    """A tumour (90 HU) whose mask runs on past its end into the liver (120 HU) below it, and whose
    last slices are nearly as bright as that liver (108 HU). A negative click in the liver on a
    slice that holds no tumour: there is no object on its slice to test the cut's HU band against,
    and the walk by HU went on up into the tumour's end (ircadb-1.1 tumour 5: 1,684 tumour voxels on
    5 slices, Dice 0.821 -> 0.774). The band is tested against the object's interior on the nearest
    slice each way that holds it, outside the clicked region's footprint: half of it lies in the
    band, and only the clicked slice's region goes. Where the tumour's end is as dark as the rest of
    it, the same cut takes the liver away on every slice below the tumour."""
    rng, hu, obj, wrong = two_tissues(3, range(10, 25), ((32, 30), 14), range(3, 10), ((32, 36), 8))
    mask = (obj | wrong).astype(np.uint8)
    end = obj & (np.arange(hu.shape[0]) <= 13)[:, None, None]
    hu[wrong] = 120.0 + rng.normal(0.0, 8.0, int(wrong.sum()))
    hu[obj] = 90.0 + rng.normal(0.0, 10.0, int(obj.sum()))
    bright_end = hu.copy()
    bright_end[end] = 108.0 + rng.normal(0.0, 10.0, int(end.sum()))
    out = negative_region(mask, bright_end.astype(np.float32), "k", 6, (36.0, 32.0), PIXEL_MM, slice_mm=SLICE_MM)
    assert set(np.flatnonzero(out.any(axis=(1, 2)))) == {6}
    assert out[6].sum() == mask[6].sum()
    out = negative_region(mask, hu.astype(np.float32), "k", 6, (36.0, 32.0), PIXEL_MM, slice_mm=SLICE_MM)
    assert set(np.flatnonzero(out.any(axis=(1, 2)))) >= set(range(3, 10))
    # (less the border pixels of the small disk, whose smoothed HU blends with the fat around it)
    assert (out & wrong).sum() > 0.75 * wrong.sum() and (out & obj).sum() < 0.01 * obj.sum()


def test_a_click_whose_region_grew_over_its_slice_stays_a_blob_on_that_slice():
    """A dark object (90 HU) with a thin brighter border on every slice (2 px of 118 HU: partial
    volume with the liver around it), and on slice 8 some liver beside it in the mask (135 HU, noisy:
    the region grown from a click there has a wide tolerance). The region grown from a negative
    click in that liver takes all of the slice's mask: HU cannot tell the wrong tissue from the
    object on that slice, so only the blob around the click goes, on its slice (``session3d``'s
    model-followed cut may carry it). Before (session 27), the blob's HU band, which holds the
    object's bright border, was carried to the next slices and took that border on each
    (livertumor05 of ircadb-1.1 from 65 %: 3,779 px over 10 slices, Dice 0.853 -> 0.815)."""
    rng = np.random.default_rng(1)
    shape = (16, 80, 80)
    hu = np.full(shape, -100.0)
    obj = np.zeros(shape, bool)
    for k in range(3, 14):
        obj[k] = disk(shape[1:], (40, 42), 24)
        hu[k][obj[k]] = 118.0  # the border
        hu[k][disk(shape[1:], (40, 42), 22)] = 90.0
    liver = disk(shape[1:], (40, 10), 10) & ~obj[8]
    hu[8][liver] = 135.0 + rng.normal(0.0, 40.0, int(liver.sum()))
    hu += rng.normal(0.0, 4.0, shape)
    mask = obj.astype(np.uint8)
    mask[8][liver] = 1
    click = (9.0, 40.0)  # (x, y): in the liver, 9 px inside the mask's border
    out = negative_region(mask, hu.astype(np.float32), "k", 8, click, PIXEL_MM, slice_mm=SLICE_MM)
    assert out[8, 40, 9], "the click's pixel goes"
    assert not np.delete(out, 8, axis=0).any(), np.flatnonzero(out.any(axis=(1, 2)))
    assert out[8].sum() <= 0.25 * mask[8].sum(), (int(out[8].sum()), int(mask[8].sum()))


def rimmed_tumour_scene():
    """A dark tumour (70 HU, a disk of radius 20 px on slices 3..13) at the edge of the liver
    (125 HU, left of column 44; fat right of it): where it lies in the liver its outermost 2 px are
    brighter on every slice (110 HU: partial volume with the liver); on slice 8 the mask also holds
    a 3 px crescent of that liver on its left."""
    rng = np.random.default_rng(2)
    shape = (16, 64, 64)
    left = (np.arange(shape[2]) < 44)[None, :]
    hu = np.full(shape, -100.0)
    hu[:, :, :44] = 125.0
    obj, crescent = np.zeros(shape, bool), np.zeros(shape, bool)
    for k in range(3, 14):
        obj[k] = disk(shape[1:], (32, 32), 20)
        hu[k][obj[k] & left] = 110.0
        hu[k][disk(shape[1:], (32, 32), 18) | (obj[k] & ~left)] = 70.0
    crescent[8] = disk(shape[1:], (32, 29), 23) & ~obj[8] & (np.arange(shape[2]) < 24)[None, :]
    hu += rng.normal(0.0, 5.0, shape)
    return hu.astype(np.float32), obj, crescent


def test_a_click_whose_region_grew_around_the_object_along_its_border_stays_a_blob_on_its_slice():
    """A negative click in a crescent of liver beside a tumour: the region grown from it takes the
    tumour's bright border (partial volume, the liver's HU nearly) along the part of the tumour that
    lies in the liver. It is another tissue than the tumour's dark core by HU, and under half of the
    slice's mask, but it lies around the rest of the mask (more than ``WRAP_FRAC`` of the pixels
    just outside the rest are in it): only the blob around the click goes, on its slice. Before (session 28), its HU band was carried to the next slices and took
    the tumour's border on each (livertumor05 of ircadb-1.1 from 80 %: 3,057 tumour voxels over 7
    slices, Dice 0.870 -> 0.795)."""
    hu, obj, crescent = rimmed_tumour_scene()
    mask = (obj | crescent).astype(np.uint8)
    click = (10.0, 32.0)  # (x, y): in the crescent, 4 px inside the mask's border (not at its region's edge)
    assert crescent[8, 32, 10]
    out = negative_region(mask, hu, "k", 8, click, PIXEL_MM, slice_mm=SLICE_MM)
    assert out[8, 32, 10], "the click's pixel goes"
    assert not np.delete(out, 8, axis=0).any(), np.flatnonzero(out.any(axis=(1, 2)))
    # the blob (twice the click's depth) reaches 2 px into the tumour's border and core
    assert (out & obj).sum() < 0.5 * (out & crescent).sum(), (int((out & obj).sum()), int((out & crescent).sum()))


def faint_end_scene():
    """A dark tumour (70 HU, a disk of radius 14 px on slices 4..12) inside liver (125 HU); on
    slice 3 its end, faint by partial volume across slices (110 HU: a quarter tumour); the mask
    holds the tumour with a 1 px rim of liver on slices 3..12 and, on slice 2, a blob of liver
    alone (no tumour: a leak past the tumour's end)."""
    rng = np.random.default_rng(3)
    shape = (16, 64, 64)
    hu = np.full(shape, 125.0)
    obj, mask = np.zeros(shape, bool), np.zeros(shape, bool)
    for k in range(3, 13):
        obj[k] = disk(shape[1:], (32, 32), 14)
        hu[k][obj[k]] = 70.0 if k > 3 else 110.0
        mask[k] = disk(shape[1:], (32, 32), 15)
    mask[2] = disk(shape[1:], (32, 30), 9)
    hu += rng.normal(0.0, 5.0, shape)
    return hu.astype(np.float32), obj, mask


def test_a_dark_objects_faint_end_slice_is_not_taken_for_a_slice_with_no_object():
    """The end slice of a dark tumour, faint by partial volume (110 HU against 70 elsewhere, and
    none of it in the tumour's interquartile range), is still darker than the liver around it: it
    holds the tumour. A negative click on its rim of liver takes a blob there, not the whole slice
    (before, session 28: all of it; livertumor05 of ircadb-1.1 from 80 %, 661 tumour pixels, and
    the HU band walked on into the tumour's bright border, 1,838 in all). The slice past the end,
    whose mask is the liver's HU, is still judged to hold no object and goes whole."""
    hu, obj, mask = faint_end_scene()
    m = mask.astype(np.uint8)
    rim_click = (17.0, 32.0)  # (x, y): in the liver rim on slice 3
    assert mask[3, 32, 17] and not obj[3, 32, 17]
    out = negative_region(m, hu, "k", 3, rim_click, PIXEL_MM, slice_mm=SLICE_MM)
    assert out[3, 32, 17]
    assert (out & obj).sum() < 0.1 * obj[3].sum(), int((out & obj).sum())
    leak = negative_region(m, hu, "k", 2, (30.0, 32.0), PIXEL_MM, slice_mm=SLICE_MM)
    assert leak[2].sum() == mask[2].sum()
    assert (leak & obj).sum() < 0.1 * obj[3].sum(), int((leak & obj).sum())
