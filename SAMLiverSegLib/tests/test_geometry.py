"""core.geometry: the one grid type (IJK <-> LPS/RAS) and the one resampling function.

The resampler must give, bit for bit, what the five resampling helpers it replaced gave (their
code is copied here as the reference): the training cache (``prepare --spacing``) and the U-Net
inference rely on resampling exactly alike, and the SAM-Med3D engine's masks must not change.
"""

import math

import numpy as np
import pytest
import SimpleITK as sitk

from libtest_helpers import rot
from samliverseg.core.errors import InputError
from samliverseg.core.geometry import LPS_TO_RAS, Grid, resample
from samliverseg.io.volume import Volume

DIRECTION = rot("z", 30) @ rot("x", 15) @ np.diag([1.0, -1.0, 1.0])  # oblique and flipped


def oblique_volume(shape_kji=(23, 31, 37), spacing=(0.7, 0.9, 2.5), seed=0):
    rng = np.random.default_rng(seed)
    hu = rng.normal(0, 300, shape_kji).astype(np.float32) - 200.0
    labels = np.zeros(shape_kji, np.uint8)
    labels[4:18, 6:25, 5:30] = 1
    labels[8:12, 10:16, 12:20] = 2
    labels[17, 24, 29] = 2  # an asymmetric voxel: catches axis swaps and flips
    return Volume(hu, spacing, (12.5, -40.25, 101.0), DIRECTION), labels


# -- the old code, verbatim (the reference) --------------------------------------------------------
def old_prepare_resample(image, spacing, interpolator, default):  # training/prepare.py::_resample
    size = [max(1, int(round(n * s / t))) for n, s, t in zip(image.GetSize(), image.GetSpacing(), spacing)]
    return sitk.Resample(image, size, sitk.Transform(), interpolator, image.GetOrigin(),
                         tuple(float(s) for s in spacing), image.GetDirection(), float(default), image.GetPixelID())


def old_student_resample_to_spacing(image, spacing):  # automatic/student.py::resample_to_spacing
    size = [max(1, int(round(n * s / t))) for n, s, t in zip(image.GetSize(), image.GetSpacing(), spacing)]
    return sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(),
                         tuple(float(s) for s in spacing), image.GetDirection(), 0.0, sitk.sitkFloat32)


def old_student_to_input_grid(prob, volume):  # automatic/student.py::to_input_grid
    ref = volume.to_sitk(np.zeros(volume.array.shape, dtype=np.float32))
    out = sitk.Resample(prob, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out).astype(np.float32)


def old_unet_to_input_grid(mask, grid, volume):  # automatic/unet.py::_to_input_grid
    src = sitk.GetImageFromArray(np.ascontiguousarray(mask.astype(np.uint8)))
    src.CopyInformation(grid)
    ref = sitk.Image([int(v) for v in volume.shape_ijk], sitk.sitkUInt8)
    ref.SetSpacing(tuple(float(v) for v in volume.spacing))
    ref.SetOrigin(tuple(float(v) for v in volume.origin))
    ref.SetDirection(tuple(float(v) for v in np.asarray(volume.direction, dtype=float).ravel()))
    out = sitk.Resample(src, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(out).astype(np.uint8, copy=False)


def old_engine3d_reference(shape_kji, spacing, origin, direction):  # engine3d.Grid.reference_image
    k, j, i = shape_kji
    ref = sitk.Image([int(i), int(j), int(k)], sitk.sitkFloat32)
    ref.SetSpacing([float(s) for s in spacing])
    ref.SetOrigin([float(o) for o in origin])
    ref.SetDirection([float(v) for v in np.asarray(direction, dtype=float).ravel()])
    return ref


def old_engine3d_resampled_shape(shape_kji, spacing, t):  # engine3d.resampled_grid
    sizes = [max(1, int(math.floor((n - 0.5) * s / t + 1e-6)) + 1) for n, s in zip(shape_kji[::-1], spacing)]
    return sizes[2], sizes[1], sizes[0]


def old_engine3d_resample_to_grid(volume, ref):  # engine3d.resample_to_grid
    img = volume.to_sitk()
    if img.GetPixelID() != sitk.sitkFloat32:
        img = sitk.Cast(img, sitk.sitkFloat32)
    default = float(np.min(volume.array))
    out = sitk.Resample(img, ref, sitk.Transform(), sitk.sitkLinear, default, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out).astype(np.float32, copy=False)


def old_engine3d_grid_to_input(values, work_ref, input_ref):  # engine3d.grid_to_input
    img = sitk.GetImageFromArray(np.ascontiguousarray(values, dtype=np.float32))
    img.SetSpacing(work_ref.GetSpacing())
    img.SetOrigin(work_ref.GetOrigin())
    img.SetDirection(work_ref.GetDirection())
    out = sitk.Resample(img, input_ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


def same_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# -- bit-identical to the old helpers --------------------------------------------------------------
@pytest.mark.parametrize("spacing", [(1.5, 1.5, 1.5), (2.0, 2.5, 4.0), (0.5, 0.6, 1.1)])
def test_prepare_and_unet_resampling_is_bit_identical_to_the_old_code(spacing):
    vol, labels = oblique_volume()
    old_hu = old_prepare_resample(vol.to_sitk(), spacing, sitk.sitkLinear, float(vol.array.min()))
    old_lab = old_prepare_resample(vol.to_sitk(labels), spacing, sitk.sitkNearestNeighbor, 0)
    hu, grid = resample(vol.array, vol.grid, spacing, interpolator="linear", default_value=float(vol.array.min()))
    lab = resample(labels, vol.grid, grid, interpolator="nearest", default_value=0).array
    assert same_bits(hu, sitk.GetArrayFromImage(old_hu)) and hu.dtype == np.float32
    assert same_bits(lab, sitk.GetArrayFromImage(old_lab)) and lab.dtype == np.uint8 and lab.any()
    assert grid == Grid.of_sitk(old_hu)  # the cache stores this grid's spacing, origin and direction
    assert grid.spacing == old_hu.GetSpacing() and grid.origin == old_hu.GetOrigin()
    assert tuple(grid.direction_matrix.ravel()) == old_hu.GetDirection()
    # the U-Net's way back: nearest onto the input grid
    mask = (sitk.GetArrayFromImage(old_lab) > 0).astype(np.uint8)
    assert same_bits(resample(mask, grid, vol.grid, interpolator="nearest", default_value=0).array,
                     old_unet_to_input_grid(mask, old_lab, vol))


def test_student_resampling_is_bit_identical_to_the_old_code():
    vol, _ = oblique_volume(seed=1)
    grey = np.clip(vol.array + 500.0, 0, 255).astype(np.float32)
    spacing = (2.0, 2.5, 4.0)
    old = old_student_resample_to_spacing(vol.to_sitk(grey), spacing)
    new, grid = resample(grey, vol.grid, spacing, interpolator="linear", default_value=0.0)
    assert same_bits(new, sitk.GetArrayFromImage(old))
    prob = (np.random.default_rng(2).random(new.shape)).astype(np.float32)
    p_img = sitk.GetImageFromArray(prob)
    p_img.CopyInformation(old)
    back = resample(prob, grid, vol.grid, interpolator="linear", default_value=0.0).array
    assert same_bits(back, old_student_to_input_grid(p_img, vol))


def test_engine3d_resampling_is_bit_identical_to_the_old_code():
    vol, _ = oblique_volume((40, 50, 30), (0.8, 1.1, 2.0), seed=3)
    t = 1.5
    work = vol.grid.resampled((t, t, t), extent="cover")
    assert work.shape_kji == old_engine3d_resampled_shape(vol.shape, vol.spacing, t)
    work_ref = old_engine3d_reference(work.shape_kji, (t, t, t), vol.origin, vol.direction)
    new = resample(vol.array, vol.grid, work, default_value=float(vol.array.min())).array
    assert same_bits(new, old_engine3d_resample_to_grid(vol, work_ref))
    # probabilities back onto the input grid, and onto a sub-box of it (the engine's shortcut)
    prob = np.random.default_rng(4).random(work.shape_kji).astype(np.float32)
    in_ref = old_engine3d_reference(vol.shape, vol.spacing, vol.origin, vol.direction)
    assert same_bits(resample(prob, work, vol.grid).array, old_engine3d_grid_to_input(prob, work_ref, in_ref))
    lo = np.array([3, 5, 7])
    size = np.array([20, 30, 25])
    sub = vol.grid.sub_grid(lo, size)
    sub_origin = np.asarray(vol.origin) + vol.direction @ (np.asarray(vol.spacing) * lo)
    sub_ref = old_engine3d_reference(tuple(size[::-1]), vol.spacing, sub_origin, vol.direction)
    assert same_bits(resample(prob, work, sub).array, old_engine3d_grid_to_input(prob, work_ref, sub_ref))


# -- the grid ------------------------------------------------------------------------------------
def test_ijk_lps_ras_round_trips_and_matrices():
    g = Grid((37, 31, 23), (0.7, 0.9, 2.5), (12.5, -40.25, 101.0), DIRECTION)
    assert g.shape_kji == (23, 31, 37)
    pts = np.array([[0, 0, 0], [36, 30, 22], [3.25, 17.5, 9.75]])
    lps = g.ijk_to_lps(pts)
    # lps = origin + direction @ (spacing * ijk), per point
    for p, q in zip(pts, lps):
        np.testing.assert_allclose(q, np.asarray(g.origin) + DIRECTION @ (np.asarray(g.spacing) * p), atol=1e-9)
    np.testing.assert_allclose(g.lps_to_ijk(lps), pts, atol=1e-9)
    ras = g.ijk_to_ras(pts)
    np.testing.assert_allclose(ras, lps * [-1, -1, 1], atol=1e-9)
    np.testing.assert_allclose(g.ras_to_ijk(ras), pts, atol=1e-9)
    np.testing.assert_allclose(g.ijk_to_lps(pts[2]), lps[2])  # a single point stays a 3-vector
    m = g.ijk_to_ras_matrix()
    np.testing.assert_allclose((m @ np.append(pts[2], 1.0))[:3], ras[2], atol=1e-9)
    np.testing.assert_allclose(m[:3, :4], LPS_TO_RAS @ g.ijk_to_lps_matrix()[:3, :4])
    np.testing.assert_allclose(g.ras_to_ijk_matrix() @ m, np.eye(4), atol=1e-12)
    np.testing.assert_allclose(g.lps_to_ijk_matrix() @ g.ijk_to_lps_matrix(), np.eye(4), atol=1e-12)
    # Slicer's IJKToRAS gives the grid back
    back = Grid.from_ijk_to_ras(m, g.shape_ijk)
    assert back.shape_ijk == g.shape_ijk
    np.testing.assert_allclose(back.spacing, g.spacing, atol=1e-12)
    np.testing.assert_allclose(back.origin, g.origin, atol=1e-12)
    np.testing.assert_allclose(back.direction_matrix, DIRECTION, atol=1e-12)
    # SimpleITK agrees about where a voxel is
    img = g.to_sitk(np.zeros(g.shape_kji, np.uint8))
    assert Grid.of_sitk(img) == g
    np.testing.assert_allclose(img.TransformContinuousIndexToPhysicalPoint(tuple(pts[2])), lps[2], atol=1e-9)


def test_volume_exposes_its_grid():
    vol, _ = oblique_volume()
    g = vol.grid
    assert g.shape_ijk == vol.shape_ijk and g.spacing == vol.spacing and g.origin == vol.origin
    np.testing.assert_array_equal(g.direction_matrix, vol.direction)
    pts = np.array([[1.0, 2.0, 3.0], [30.0, 20.0, 10.0]])
    np.testing.assert_array_equal(vol.ijk_to_lps(pts), g.ijk_to_lps(pts))
    np.testing.assert_array_equal(vol.ijk_to_ras_matrix(), g.ijk_to_ras_matrix())


def test_resampled_extent_rules_and_option_errors():
    g = Grid((10, 11, 7), (1.0, 0.75, 3.0))
    assert g.resampled((1.5, 1.5, 1.5)).shape_ijk == (7, 6, 14)  # round(n s / t)
    assert g.resampled((1.5, 1.5, 1.5), extent="cover").shape_ijk == (7, 6, 14)  # floor((n - 1/2) s / t) + 1
    assert g.resampled((4.0, 4.0, 4.0)).shape_ijk == (2, 2, 5)
    assert g.resampled((4.0, 4.0, 4.0), extent="cover").shape_ijk == (3, 2, 5)  # i: floor(9.5 / 4) + 1
    assert g.resampled((100.0, 100.0, 100.0)).shape_ijk == (1, 1, 1)
    with pytest.raises(ValueError, match="extent"):
        g.resampled((1, 1, 1), extent="grow")
    with pytest.raises(InputError, match="positive"):
        g.resampled((1, 0, 1))
    with pytest.raises(ValueError, match="interpolator"):
        resample(np.zeros(g.shape_kji, np.float32), g, (2, 2, 2), interpolator="cubic")
    with pytest.raises(InputError, match="singular"):
        Grid((2, 2, 2), direction=np.zeros((3, 3)))
    with pytest.raises(InputError, match="does not match"):
        g.to_sitk(np.zeros((7, 11, 11)))


def test_resample_interpolators_and_default_value():
    g = Grid((12, 10, 8), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), DIRECTION)
    kk, jj, ii = np.meshgrid(*[np.arange(n) for n in g.shape_kji], indexing="ij")
    lps = g.ijk_to_lps(np.stack([ii, jj, kk], -1).reshape(-1, 3))
    ramp = lps[:, 0].reshape(g.shape_kji).astype(np.float32)  # linear in physical space
    target = Grid((6, 4, 3), (1.2, 1.3, 1.4), g.ijk_to_lps([2.0, 2.0, 2.0]), DIRECTION)  # inside, off the edges
    expect = target.ijk_to_lps(np.stack(np.meshgrid(*[np.arange(n) for n in target.shape_ijk], indexing="ij"),
                                        -1).reshape(-1, 3))[:, 0].reshape(target.shape_ijk).transpose(2, 1, 0)
    for interp in ("linear", "bspline"):
        out = resample(ramp, g, target, interpolator=interp, default_value=-1.0).array
        assert out.dtype == np.float32 and out.shape == target.shape_kji
        np.testing.assert_allclose(out, expect, atol=2e-3 if interp == "linear" else 0.05)
    labels = (ramp > ramp.mean()).astype(np.uint8)
    near = resample(labels, g, target, interpolator="nearest").array
    assert near.dtype == np.uint8 and set(np.unique(near)) <= {0, 1}
    # a target grid beyond the source gets default_value
    far = Grid((3, 3, 3), (1.0, 1.0, 1.0), (500.0, 500.0, 500.0))
    assert (resample(ramp, g, far, default_value=-7.0).array == -7.0).all()


def test_mismatch_descriptions():
    g = Grid((10, 11, 7), (1.0, 0.75, 3.0), (1.0, 2.0, 3.0))
    assert g.mismatch(Grid(g.shape_ijk, g.spacing, np.add(g.origin, 1e-4), g.direction)) is None
    assert "size 10×11×8" in g.mismatch(Grid((10, 11, 8), g.spacing, g.origin, g.direction))
    assert "spacing" in g.mismatch(Grid(g.shape_ijk, (1.0, 0.8, 3.0), g.origin, g.direction))
    assert "origin" in g.mismatch(Grid(g.shape_ijk, g.spacing, (1.0, 2.0, 3.1), g.direction))
    assert "direction" in g.mismatch(Grid(g.shape_ijk, g.spacing, g.origin, DIRECTION))
