"""Volume geometry, reading images and DICOM series, and rejecting bad input."""

import os
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from samliverseg.core.errors import InputError
from samliverseg.io.volume import LPS_TO_RAS, Volume, check_ct_range, read_volume

from libtest_helpers import SHARED, needs_shared, rot


DIRECTIONS = {
    "identity": np.eye(3),
    "flipped_ik": np.diag([-1.0, 1.0, -1.0]),
    "flipped_j": np.diag([1.0, -1.0, 1.0]),
    "oblique": rot("x", 20) @ rot("z", 20),
    "oblique_flipped": rot("y", 20) @ rot("x", 20) @ np.diag([1.0, -1.0, -1.0]),
}
SPACING = (0.7, 0.8, 2.5)
ORIGIN = (12.5, -40.25, 101.0)


def make_volume(direction, shape_kji=(6, 9, 11), seed=0):
    rng = np.random.default_rng(seed)
    arr = rng.integers(-1000, 1500, size=shape_kji).astype(np.float32)
    return Volume(arr, spacing=SPACING, origin=ORIGIN, direction=direction)


# ---------------------------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(DIRECTIONS))
def test_ijk_lps_matches_simpleitk(name):
    v = make_volume(DIRECTIONS[name])
    img = v.to_sitk()
    rng = np.random.default_rng(1)
    ijk = rng.uniform(-1, 10, size=(20, 3))
    expected = np.array([img.TransformContinuousIndexToPhysicalPoint(tuple(map(float, p))) for p in ijk])
    np.testing.assert_allclose(v.ijk_to_lps(ijk), expected, atol=1e-9)
    np.testing.assert_allclose(v.lps_to_ijk(v.ijk_to_lps(ijk)), ijk, atol=1e-9)
    # 4x4 matrix agrees with the point functions
    h = np.c_[ijk, np.ones(len(ijk))] @ v.ijk_to_lps_matrix().T
    np.testing.assert_allclose(h[:, :3], expected, atol=1e-9)
    # RAS is diag(-1,-1,1) of LPS, both ways
    np.testing.assert_allclose(v.ijk_to_ras(ijk), expected * np.array([-1, -1, 1]), atol=1e-9)
    np.testing.assert_allclose(v.ras_to_ijk(v.ijk_to_ras(ijk)), ijk, atol=1e-9)
    np.testing.assert_allclose(v.ijk_to_ras_matrix(), np.diag([-1, -1, 1, 1]) @ v.ijk_to_lps_matrix(), atol=1e-12)
    # a single point in, a single point out
    assert v.ijk_to_lps([1, 2, 3]).shape == (3,)
    # voxel (i, j, k) is array[k, j, i]
    assert v.shape_ijk == (11, 9, 6) and v.shape == (6, 9, 11)
    assert img.GetSize() == v.shape_ijk
    assert img.GetPixel(10, 8, 5) == v.array[5, 8, 10]
    assert np.allclose(LPS_TO_RAS @ LPS_TO_RAS, np.eye(3))


@pytest.mark.parametrize("name", list(DIRECTIONS))
def test_from_sitk_to_sitk_round_trip(name):
    v = make_volume(DIRECTIONS[name])
    back = Volume.from_sitk(v.to_sitk())
    np.testing.assert_array_equal(back.array, v.array)
    assert back.array.dtype == np.float32
    np.testing.assert_allclose(back.spacing, v.spacing)
    np.testing.assert_allclose(back.origin, v.origin)
    np.testing.assert_allclose(back.direction, v.direction)
    mask = (v.array > 0).astype(np.uint8)
    m = v.to_sitk(mask)
    assert m.GetPixelIDValue() == sitk.sitkUInt8
    with pytest.raises(InputError):
        v.to_sitk(mask[:-1])
    w = v.with_array(mask.astype(np.float32), modality="CT")
    assert w.modality == "CT" and w.spacing == v.spacing and w.array is not v.array
    assert v.same_grid(w)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
@pytest.mark.parametrize("name", ["flipped_ik", "oblique_flipped"])
def test_read_volume_files(tmp_path, suffix, name):
    v = make_volume(DIRECTIONS[name])
    img = sitk.Cast(v.to_sitk(), sitk.sitkInt16)
    f = tmp_path / f"ct{suffix}"
    sitk.WriteImage(img, str(f))
    r = read_volume(f)
    np.testing.assert_array_equal(r.array, v.array)
    tol = 1e-4 if suffix == ".nii.gz" else 1e-9  # NIfTI stores the geometry as float32
    np.testing.assert_allclose(r.spacing, v.spacing, atol=tol)
    np.testing.assert_allclose(r.origin, v.origin, atol=tol)
    np.testing.assert_allclose(r.direction, v.direction, atol=tol)
    assert r.dicom_files is None and r.source_path == str(f)


# ---------------------------------------------------------------------------------------------
# real data
# ---------------------------------------------------------------------------------------------
def _dicom_positions(files):
    import pydicom

    return np.array([[float(x) for x in pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient] for f in files])


def _check_series_order(v):
    """File k of ``dicom_files`` is slice k: its ImagePositionPatient is voxel (0, 0, k)."""
    pos = _dicom_positions(v.dicom_files)
    expected = v.ijk_to_lps(np.c_[np.zeros(v.shape[0]), np.zeros(v.shape[0]), np.arange(v.shape[0])])
    np.testing.assert_allclose(pos, expected, atol=1e-3)


@needs_shared
def test_totalseg_dicom_series():
    from samliverseg.demo.sample_data import totalseg_dicom_dir

    d = totalseg_dicom_dir()
    v = read_volume(d)
    assert v.shape_ijk == (512, 512, 20)
    np.testing.assert_allclose(v.spacing, (0.9765625, 0.9765625, 2.0), atol=1e-6)
    assert v.modality == "CT"
    assert len(v.dicom_files) == 20
    _check_series_order(v)
    assert check_ct_range(v) is None
    assert v.array.min() < -900 and v.array.max() > 500  # HU (rescale applied)
    # one file of the series reads the whole series
    one = read_volume(v.dicom_files[7])
    assert one.dicom_files == v.dicom_files


@needs_shared
def test_dcmqi_three_slice_ct():
    v = read_volume(SHARED / "dcmqi-liver-3slice" / "ct-3slice")
    assert v.shape_ijk == (512, 512, 3)
    np.testing.assert_allclose(v.spacing, (0.810547, 0.810547, 1.0), atol=1e-5)
    assert [Path(f).name for f in v.dicom_files] == ["03.dcm", "02.dcm", "01.dcm"]  # sorted by position
    _check_series_order(v)
    assert v.metadata["frame_of_reference_uid"].startswith("1.2.392.")
    # the study folder (CT in a sub-folder, a SEG beside it) reads the CT
    assert read_volume(SHARED / "dcmqi-liver-3slice").dicom_files == v.dicom_files
    with pytest.raises(InputError, match="Segmentation"):
        read_volume(SHARED / "dcmqi-liver-3slice" / "liver.dcm")


@needs_shared
def test_totalseg_nifti():
    from samliverseg.demo.sample_data import load_totalseg_example

    v, liver = load_totalseg_example()
    assert v.shape_ijk == (122, 101, 112)
    np.testing.assert_allclose(v.spacing, (3.0, 3.0, 3.0))
    assert not np.allclose(v.direction, np.eye(3))  # a real, flipped patient geometry
    assert liver.shape == v.shape and set(np.unique(liver)) == {0, 1}
    assert check_ct_range(v) is None


@needs_shared
def test_ircadb_load(capsys):
    from samliverseg.demo.sample_data import load_ircadb, tumor_union

    load_ircadb()  # warm the cache (first run unzips ~35 MB)
    t = time.perf_counter()
    v, masks = load_ircadb()
    elapsed = time.perf_counter() - t
    assert v.shape_ijk == (512, 512, 129)
    np.testing.assert_allclose(v.spacing, (0.57, 0.57, 1.6), atol=1e-6)
    assert v.array.min() == -1024 and v.array.max() == 1023
    assert len(v.dicom_files) == 129
    _check_series_order(v)
    assert set(masks) == {"liver"} | {f"livertumor{i:02d}" for i in range(1, 8)}
    sizes = {n: int(m.sum()) for n, m in masks.items()}
    assert min(sizes[n] for n in masks if n != "liver") == 766
    assert max(sizes[n] for n in masks if n != "liver") == 162337
    tumors = tumor_union(masks)
    assert np.all(masks["liver"][tumors > 0] == 1)  # the liver mask includes the tumours
    ml = tumors.sum() * np.prod(v.spacing) / 1000.0
    assert 105 < ml < 115  # ~111 ml per the data README
    liver_hu = float(np.median(v.array[(masks["liver"] > 0) & (tumors == 0)]))
    assert 80 < liver_hu < 140
    with capsys.disabled():
        print(f"\n[ircadb] warm load (CT series + 8 masks) {elapsed:.2f} s; tumours {ml:.1f} ml; "
              f"median liver {liver_hu:.0f} HU")


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def _one_line_error(path, **kw):
    with pytest.raises(InputError) as e:
        read_volume(path, **kw)
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


def test_missing_path(tmp_path):
    assert "does not exist" in _one_line_error(tmp_path / "nope.nii.gz")


def test_text_files(tmp_path):
    t = tmp_path / "notes.txt"
    t.write_text("hello\n")
    assert "not a readable image" in _one_line_error(t)
    fake = tmp_path / "fake.nii.gz"
    fake.write_text("not really nifti\n")
    assert "cannot read" in _one_line_error(fake)
    empty = tmp_path / "empty.nrrd"
    empty.write_bytes(b"")
    assert "empty" in _one_line_error(empty)


def test_folder_without_dicom(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    assert "no DICOM series" in _one_line_error(tmp_path)


def test_2d_images(tmp_path):
    png = tmp_path / "slice.png"
    sitk.WriteImage(sitk.Image(32, 32, sitk.sitkUInt8), str(png))
    assert "2D image; a 3D CT volume is needed" in _one_line_error(png)
    nii = tmp_path / "slice.nii.gz"
    sitk.WriteImage(sitk.Image(32, 32, sitk.sitkInt16), str(nii))
    assert "2D image" in _one_line_error(nii)


def test_single_slice_volume(tmp_path):
    f = tmp_path / "one.nii.gz"
    sitk.WriteImage(sitk.Image(16, 16, 1, sitk.sitkInt16), str(f))
    assert "single slice" in _one_line_error(f)
    assert read_volume(f, allow_single_slice=True).shape_ijk == (16, 16, 1)


def test_rgb_images(tmp_path):
    png = tmp_path / "rgb.png"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((16, 16, 3), np.uint8), isVector=True), str(png))
    assert sitk.ReadImage(str(png)).GetNumberOfComponentsPerPixel() == 3
    assert "colour/vector" in _one_line_error(png)
    mha = tmp_path / "rgb3d.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 8, 8, 3), np.uint8), isVector=True), str(mha))
    assert "colour/vector" in _one_line_error(mha)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_and_inf(tmp_path, bad):
    # NRRD: ITK's NIfTI reader silently turns NaN into 0, so a .nii.gz cannot show the check.
    a = np.zeros((4, 8, 8), np.float32)
    a[2, 3, 3] = bad
    f = tmp_path / "bad.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(a), str(f))
    msg = _one_line_error(f)
    assert ("NaN" if np.isnan(bad) else "infinite") in msg
    with pytest.raises(InputError):
        Volume.from_sitk(sitk.GetImageFromArray(a))


def test_bad_volume_constructor():
    with pytest.raises(InputError):
        Volume(np.zeros((4, 4)))
    with pytest.raises(InputError):
        Volume(np.zeros((2, 2, 2)), spacing=(1, 0, 1))
    with pytest.raises(InputError):
        Volume(np.zeros((2, 2, 2)), direction=np.zeros((3, 3)))


def test_check_ct_range():
    def vol(a):
        return Volume(np.asarray(a, np.float32).reshape(1, 1, -1))

    assert check_ct_range(vol([-1024, 0, 40, 1500])) is None
    assert check_ct_range(vol([-3024, 0, 3000])) is None  # padding value of some scanners
    assert "8-bit" in check_ct_range(vol([0, 12, 255]))
    assert "0..1" in check_ct_range(vol([0, 0.2, 1.0]))
    assert "intercept" in check_ct_range(vol([0, 1024, 3000]))
    assert "constant" in check_ct_range(vol([5, 5, 5]))
    assert "far outside" in check_ct_range(vol([-50000, 0, 100]))


# -- input sanity (issue 12): not a CT, not HU, implausible grids, cut files --------------------------

def test_check_ct_input_refuses_what_is_not_a_ct_in_hu():
    from samliverseg.io.volume import check_ct_input

    rng = np.random.default_rng(0)
    ct = Volume(rng.normal(0, 300, (8, 32, 32)).astype(np.float32) - 200, (0.8, 0.8, 2.0))
    check_ct_input(ct)  # a CT: nothing to say
    labels = Volume((rng.random((8, 32, 32)) > 0.5).astype(np.float32) * 255, (0.8, 0.8, 2.0))
    with pytest.raises(InputError, match="label map or mask .values 0, 255."):
        check_ct_input(labels)
    stored = ct.with_array(np.clip(ct.array + 1024, 0, None))
    with pytest.raises(InputError, match="intercept.*--accept-non-hu"):
        check_ct_input(stored)
    check_ct_input(stored, accept_non_hu=True)
    with pytest.raises(InputError, match="constant"):
        check_ct_input(ct.with_array(np.zeros_like(ct.array)), accept_non_hu=True)
    with pytest.raises(InputError, match="spacing"):
        check_ct_input(Volume(ct.array, (0.8, 0.8, 21.0)))
    with pytest.raises(InputError, match=r"L \("):
        check_ct_input(Volume(np.tile(ct.array, (30, 8, 8)), (20.0, 20.0, 20.0)))


@pytest.mark.parametrize("name", ["v.nii.gz", "v.nii"])
def test_cut_nifti_is_refused_not_zero_filled(tmp_path, name):
    from samliverseg.io.volume import check_nifti_complete

    img = sitk.GetImageFromArray(np.random.default_rng(1).normal(0, 200, (6, 40, 40)).astype(np.float32))
    path = tmp_path / name
    sitk.WriteImage(img, str(path), name.endswith(".gz"))
    check_nifti_complete(path)
    assert read_volume(path).shape == (6, 40, 40)
    path.write_bytes(path.read_bytes()[:-500])
    with pytest.raises(InputError, match="truncated"):
        read_volume(path)


def test_segmentation_file_is_not_a_ct(tmp_path):
    from samliverseg.io.export import write_seg_nrrd

    v = Volume(np.zeros((3, 8, 8), np.float32))
    seg = write_seg_nrrd(np.ones((3, 8, 8), np.uint8), v, tmp_path / "a.seg.nrrd")
    renamed = tmp_path / "a.nrrd"
    renamed.write_bytes(seg.read_bytes())
    for p in (seg, renamed):
        with pytest.raises(InputError, match="segmentation .* not a CT"):
            read_volume(p)


def test_is_disk_full_follows_wrapped_errors():
    import errno

    from samliverseg.core.errors import is_disk_full

    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert is_disk_full(OSError(errno.EFBIG, "File too large"))
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("[enforce fail at inline_container.cc] file write failed") from inner
    except RuntimeError as wrapped:
        assert is_disk_full(wrapped)
    assert is_disk_full(RuntimeError("PytorchStreamWriter failed writing file data/0: No space left on device"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(ValueError("no space left on device"))
