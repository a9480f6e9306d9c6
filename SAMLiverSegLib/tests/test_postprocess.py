"""Mask clean-up (postprocess.py) and mask helpers for prompts (maskutil.py)."""

import numpy as np
import pytest

from scipy import ndimage

from samliverseg.core.maskutil import (bbox_2d, bbox_3d, bbox_window, dilate, dilate_rect, get_slice, interior_point, largest_slice,
                                       middle_slice, nonempty_slices, slice_box)
from samliverseg.core.postprocess import (fill_holes, keep_components_touching, label_components,
                                     largest_connected_component, remove_small_components)


def _two_blobs_3d():
    m = np.zeros((10, 12, 14), dtype=np.uint8)
    m[1:4, 1:4, 1:4] = 1      # 27 voxels
    m[5:9, 6:10, 7:12] = 1    # 80 voxels
    return m


# -- postprocess ----------------------------------------------------------------------------------

def test_largest_connected_component_3d_and_2d():
    m = _two_blobs_3d()
    before = m.copy()
    out = largest_connected_component(m)
    assert out.dtype == np.uint8 and out.shape == m.shape
    assert out.sum() == 80 and out[6, 7, 8] == 1 and out[2, 2, 2] == 0
    np.testing.assert_array_equal(m, before)  # input untouched
    m2 = np.zeros((8, 8), bool)
    m2[0:2, 0:2] = True
    m2[4:8, 4:7] = True
    assert largest_connected_component(m2).sum() == 12


def test_connectivity_and_ties():
    m = np.zeros((3, 3, 3), dtype=np.uint8)
    m[0, 0, 0] = m[1, 1, 1] = 1  # touching at a corner only
    assert label_components(m, 1)[1] == 2
    assert label_components(m, 3)[1] == 1
    assert largest_connected_component(m, connectivity=3).sum() == 2
    tie = largest_connected_component(m, connectivity=1)
    assert tie.sum() == 1 and tie[0, 0, 0] == 1  # the first in raster order
    with pytest.raises(ValueError):
        largest_connected_component(m, connectivity=4)


def test_empty_stays_empty():
    for shape in ((5, 6), (4, 5, 6)):
        empty = np.zeros(shape, dtype=bool)
        for out in (largest_connected_component(empty), fill_holes(empty), fill_holes(empty, per_slice=True),
                    keep_components_touching(empty, np.ones(shape)), remove_small_components(empty, 3)):
            assert out.dtype == np.uint8 and out.shape == shape and not out.any()


def test_remove_small_components():
    out = remove_small_components(_two_blobs_3d(), min_voxels=28)
    assert out.sum() == 80
    assert remove_small_components(_two_blobs_3d(), min_voxels=27).sum() == 107


def test_keep_components_touching():
    m = _two_blobs_3d()
    seed = np.zeros_like(m)
    seed[2, 2, 2] = 1  # in the small blob
    out = keep_components_touching(m, seed)
    assert out.sum() == 27 and out[2, 2, 2] == 1
    seed[6, 7, 8] = 1  # and in the big one
    assert keep_components_touching(m, seed).sum() == 107
    nowhere = np.zeros_like(m)
    nowhere[0, 11, 0] = 1
    assert keep_components_touching(m, nowhere).sum() == 0
    assert keep_components_touching(m, nowhere, fallback_largest=True).sum() == 80
    with pytest.raises(ValueError):
        keep_components_touching(m, np.ones((2, 2, 2)))


def test_fill_holes_3d_versus_per_slice():
    # a closed hollow box: 3D filling fills the cavity
    box = np.zeros((9, 9, 9), dtype=np.uint8)
    box[1:8, 1:8, 1:8] = 1
    box[3:6, 3:6, 3:6] = 0
    assert fill_holes(box).sum() == 7 ** 3
    # a tube along k (open at both ends): not a 3D hole, but a hole on every axial slice
    tube = np.zeros((6, 9, 9), dtype=np.uint8)
    tube[:, 2:7, 2:7] = 1
    tube[:, 4, 4] = 0
    assert fill_holes(tube, per_slice=False).sum() == tube.sum()
    filled = fill_holes(tube, per_slice=True)
    assert filled.dtype == np.uint8 and filled.sum() == 6 * 25
    # slices across i cut the tube lengthwise: the bore is open to the border there
    assert fill_holes(tube, per_slice=True, axis="i").sum() == tube.sum()
    ring = np.zeros((7, 7), dtype=bool)
    ring[1:6, 1:6] = True
    ring[3, 3] = False
    assert fill_holes(ring).sum() == 25


def _random_masks(shape, n=12, seed=0):
    """Blobs of random size and place, some cut by the array's border, some with holes, and empty."""
    rng = np.random.default_rng(seed)
    yield np.zeros(shape, dtype=bool)
    for _ in range(n):
        noise = ndimage.gaussian_filter(rng.random(shape), 1.5)
        m = noise > np.quantile(noise, rng.uniform(0.6, 0.97))
        if rng.random() < 0.5:  # keep one corner's part: objects small against their array
            m[tuple(slice(int(rng.integers(d // 3, d)), None) for d in shape)] = False
        yield m


@pytest.mark.parametrize("shape", [(23, 31), (9, 17, 21)])
def test_work_in_the_bounding_box_gives_the_whole_arrays_result(shape):
    """dilate, fill_holes and keep_components_touching work in the mask's bounding box (for speed):
    their results equal scipy's on the whole array, for objects cut by the border, with holes,
    and empty ones."""
    full = np.ones((3,) * len(shape), dtype=bool)
    for i, m in enumerate(_random_masks(shape, seed=len(shape))):
        for it in (1, 2, 4):
            for st in (None, full):
                assert np.array_equal(dilate(m, it, st), ndimage.binary_dilation(m, st, iterations=it)), (i, it)
        assert np.array_equal(fill_holes(m).astype(bool), ndimage.binary_fill_holes(m))
        if m.ndim == 3:
            ref = np.stack([ndimage.binary_fill_holes(s) for s in m])
            assert np.array_equal(fill_holes(m, per_slice=True).astype(bool), ref)
        seed = np.zeros_like(m)
        seed.flat[::37] = True
        for conn in range(1, m.ndim + 1):
            lab, _ = ndimage.label(m, ndimage.generate_binary_structure(m.ndim, conn))
            ids = np.unique(lab[seed & m])
            ref = np.isin(lab, ids[ids > 0])
            assert np.array_equal(keep_components_touching(m, seed, conn).astype(bool), ref)
        nowhere = np.zeros_like(m)
        sizes = np.bincount(lab.ravel())[1:]
        ref = lab == 1 + int(np.argmax(sizes)) if sizes.size else np.zeros_like(m)
        assert np.array_equal(keep_components_touching(m, nowhere, m.ndim, fallback_largest=True).astype(bool), ref)


@pytest.mark.parametrize("shape", [(23, 31), (9, 17, 21)])
def test_a_rectangle_dilation_reaches_its_own_count_along_each_axis(shape):
    """dilate_rect: with one reach on every axis, the full 3 x 3 (x 3) structure iterated that many
    times (what propagation used before); with different reaches, exactly the box of those
    half-widths around every pixel."""
    full = np.ones((3,) * len(shape), dtype=bool)
    for i, m in enumerate(_random_masks(shape, seed=10 + len(shape))):
        for r in (1, 2, 3):
            ref = ndimage.binary_dilation(m, full, iterations=r)
            assert np.array_equal(dilate_rect(m, (r,) * m.ndim), ref), (i, r)
        reach = (1, 4) if m.ndim == 2 else (0, 1, 3)
        box = np.ones(tuple(2 * r + 1 for r in reach), dtype=bool)
        assert np.array_equal(dilate_rect(m, reach), ndimage.binary_dilation(m, box)), i
    one = np.zeros(shape, dtype=bool)
    one[tuple(d // 2 for d in shape)] = True  # away from the border
    reach = (1, 4) if len(shape) == 2 else (0, 1, 3)
    assert dilate_rect(one, reach).sum() == np.prod([2 * r + 1 for r in reach])
    with pytest.raises(ValueError, match="reach has"):
        dilate_rect(one, (1,) * (len(shape) + 1))


def test_bbox_window():
    m = np.zeros((10, 20), dtype=bool)
    assert bbox_window(m) is None
    m[2:4, 5:9] = True
    assert bbox_window(m) == (slice(2, 4), slice(5, 9))
    assert bbox_window(m, 3) == (slice(0, 7), slice(2, 12))  # clipped at the border
    assert bbox_window(m[None], 1) == (slice(0, 1), slice(1, 5), slice(4, 10))


# -- maskutil --------------------------------------------------------------------------------------

def test_bboxes():
    m2 = np.zeros((10, 20), dtype=np.uint8)  # rows j, cols i
    m2[2:5, 7:15] = 1
    assert bbox_2d(m2) == (7, 2, 14, 4)
    assert bbox_2d(np.zeros((3, 3))) is None
    m3 = np.zeros((6, 10, 20), dtype=bool)
    m3[1:4, 2:5, 7:15] = True
    assert bbox_3d(m3) == (7, 2, 1, 14, 4, 3)  # (i0, j0, k0, i1, j1, k1)
    assert bbox_3d(np.zeros((2, 2, 2))) is None
    with pytest.raises(ValueError):
        bbox_2d(m3)


def test_slices():
    m = np.zeros((10, 8, 8), dtype=np.uint8)
    m[2, 3:5, 3:5] = 1        # area 4
    m[3, 1:7, 1:7] = 1        # area 36
    m[7, 2:4, 2:4] = 1        # area 4
    assert list(nonempty_slices(m)) == [2, 3, 7]
    assert largest_slice(m) == 3
    assert middle_slice(m) == 3               # median of [2, 3, 7]
    assert middle_slice(m, mode="largest") == 3
    m[9, 0, 0] = 1
    assert middle_slice(m) == 3               # lower middle of [2, 3, 7, 9]
    assert middle_slice(np.zeros((3, 3, 3))) is None and largest_slice(np.zeros((3, 3, 3))) is None
    assert largest_slice(m, axis="j") == 3 and largest_slice(m, axis=1) == 3
    assert get_slice(m, "j", 3).shape == (10, 8) and get_slice(m, "i", 3).shape == (10, 8)
    with pytest.raises(ValueError):
        middle_slice(m, axis="x")


def test_interior_point_is_inside():
    # a C shape: its centroid lies outside it, the interior point must not
    c = np.zeros((30, 30), dtype=bool)
    c[5:25, 5:25] = True
    c[10:20, 12:25] = False
    i, j = interior_point(c)
    assert c[j, i]
    # a thick and a thin part: the point lies in the thick part (a 9x9 square at cols 20..28)
    m = np.zeros((20, 40), dtype=bool)
    m[9:11, 0:20] = True
    m[6:15, 20:29] = True
    assert interior_point(m) == (24, 10)
    assert interior_point(np.zeros((4, 4))) is None
    # a mask that fills the image still has a centre
    assert interior_point(np.ones((5, 5))) == (2, 2)
    # anisotropy: 3 rows x 9 cols with 3 mm rows and 1 mm cols is a square in mm -> centre
    assert interior_point(np.ones((3, 9)), spacing=(1.0, 3.0)) == (4, 1)


def test_slice_box_on_each_axis():
    m = np.zeros((10, 20, 30), dtype=np.uint8)  # [k, j, i]
    m[3:7, 5:9, 10:20] = 1
    b = slice_box(m, "k")
    assert b.corner_a == (10.0, 5.0, 4.0) and b.corner_b == (19.0, 8.0, 4.0)   # middle of k 3..6 is 4
    b = slice_box(m, "j", index=6, margin=2)
    assert b.corner_a == (8.0, 6.0, 1.0) and b.corner_b == (21.0, 6.0, 8.0)
    b = slice_box(m, "i", index=15, margin=100)  # clipped to the volume
    assert b.corner_a == (15.0, 0.0, 0.0) and b.corner_b == (15.0, 19.0, 9.0)
    assert slice_box(m, "k", index=0) is None
