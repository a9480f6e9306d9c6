"""DICOM SEG with the highdicom / pydicom that Slicer 5.8-5.10 can have (highdicom 0.22.0 on
the bundled pydicom 2.4.4) and with the newest (this venv): each writes and reads, each reads
what the other wrote, and both read the dcmqi fixture's SEG the same.

The old pair is installed once (``pip install --no-deps --target``) into ``<venv>/dicom-old``
and put first on ``PYTHONPATH`` of a real subprocess that runs this file as a script
(``old-side``). Skipped, with the reason, only where pip cannot install it (offline, no mirror).

Geometry: the phantom series is oblique, its rows run towards the patient's right (-L) and its
files lie along minus the slice normal, so the volume's IJK -> LPS is neither axis-aligned nor
in the file order; every SEG frame is checked against ``volume.ijk_to_lps`` directly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

OLD_PINS = ("highdicom==0.22.0", "pydicom==2.4.4")
OLD_VERSIONS = {"highdicom": "0.22.0", "pydicom": "2.4.4"}
LIB = Path(__file__).resolve().parents[1]  # SAMLiverSegLib


# ---------------------------------------------------------------------------------------------
# the old highdicom / pydicom, installed once under the venv
# ---------------------------------------------------------------------------------------------
def _old_dicom_dir() -> Path:
    """``<venv>/dicom-old`` with highdicom 0.22.0 + pydicom 2.4.4 (their other needs, numpy and
    pillow, come from the venv); installed into a temporary folder then renamed into place."""
    target = Path(sys.prefix) / "dicom-old"
    wanted = [target / f"{pin.replace('==', '-')}.dist-info" for pin in OLD_PINS]
    if all(p.is_dir() for p in wanted):
        return target
    tmp = Path(sys.prefix) / f"dicom-old.tmp{os.getpid()}"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile",
                           "--disable-pip-version-check", "--target", str(tmp), *OLD_PINS],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or not all((tmp / p.name).is_dir() for p in wanted):
        subprocess.run(["rm", "-rf", str(tmp)], check=False)
        lines = (proc.stderr or proc.stdout).strip().splitlines() or ["no output"]
        pytest.skip(f"cannot install {' '.join(OLD_PINS)} with pip: {lines[-1][:200]}")
    if target.exists():  # a partial earlier install
        subprocess.run(["rm", "-rf", str(target)], check=True)
    try:
        os.replace(tmp, target)
    except OSError:  # another test process installed it meanwhile
        subprocess.run(["rm", "-rf", str(tmp)], check=False)
    return target


@pytest.fixture(scope="module")
def old_dicom():
    return _old_dicom_dir()


def run_old_side(old_dir: Path, work: Path, dcmqi: str = "") -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(old_dir), str(LIB)] + [p for p in [env.get("PYTHONPATH", "")] if p])
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "old-side", str(work), dcmqi],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads((work / "old_side.json").read_text())


# ---------------------------------------------------------------------------------------------
# an oblique, flipped phantom CT series (written with the newest pydicom)
# ---------------------------------------------------------------------------------------------
def _rotation(axis, deg: float) -> np.ndarray:
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    t = np.radians(deg)
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def write_phantom_series(folder: Path, n_slices: int = 7, rows: int = 20, cols: int = 24) -> None:
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True)
    r = _rotation((1.0, 2.0, 0.5), 25.0)
    along_row = r @ (-1.0, 0.0, 0.0)  # LPS direction of a row (column index +1): towards the patient's right
    along_col = r @ (0.0, 0.0, -1.0)  # LPS direction of a column (row index +1): downwards, coronal-like
    normal = np.cross(along_row, along_col)
    spacing_rc, thickness = (0.9, 0.8), 2.5  # PixelSpacing (between rows, between columns)
    origin = np.array([-40.0, 12.5, 80.0])
    study, series, frame_of_ref = generate_uid(), generate_uid(), generate_uid()
    rng = np.random.default_rng(3)
    for n in range(n_slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_ref
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Oblique", "PH001", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", ""
        ds.ReferringPhysicianName = ""
        ds.Modality, ds.Manufacturer, ds.SeriesNumber, ds.InstanceNumber = "CT", "samliverseg-test", 3, n + 1
        # files along minus the slice normal: the volume's k runs against the file order
        ds.ImagePositionPatient = [round(float(v), 6) for v in origin - n * thickness * normal]
        ds.ImageOrientationPatient = [round(float(v), 8) for v in (*along_row, *along_col)]
        ds.PixelSpacing = list(spacing_rc)
        ds.SliceThickness = thickness
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = rng.integers(0, 1500, (rows, cols)).astype("<i2").tobytes()
        pydicom.dcmwrite(str(folder / f"slice{n:03d}.dcm"), ds, enforce_file_format=True)


def phantom_labels(shape) -> np.ndarray:
    """Two overlapping-free segments [k, j, i], an empty slice between, a lone corner voxel."""
    labels = np.zeros(shape, np.uint8)
    labels[1:5, 3:15, 4:20] = 1
    labels[2:4, 6:10, 8:13] = 2
    labels[4, 2:5, 1:3] = 2  # a tumour touching the liver at its last slice
    labels[-1, -1, -1] = 2  # a lone voxel at the far corner (slice 5 is empty)
    return labels


def frames_of(path: Path, volume):
    """{(k, segment number): frame pixels} of a SEG, each frame placed with the volume's
    LPS -> IJK only (plain pydicom, independent of read_dicom_seg), and its IOP / spacing."""
    import pydicom

    ds = pydicom.dcmread(str(path))
    pixels = ds.pixel_array.reshape(int(ds.NumberOfFrames), int(ds.Rows), int(ds.Columns))
    shared = ds.SharedFunctionalGroupsSequence[0]
    out = {}
    for f, fg in enumerate(ds.PerFrameFunctionalGroupsSequence):
        ipp = [float(v) for v in fg.PlanePositionSequence[0].ImagePositionPatient]
        ijk = volume.grid.lps_to_ijk(np.array(ipp))
        np.testing.assert_allclose(ijk[:2], 0.0, atol=1e-3)
        assert abs(ijk[2] - round(ijk[2])) < 1e-3
        sid = fg.get("SegmentIdentificationSequence") or shared.SegmentIdentificationSequence
        out[(int(round(ijk[2])), int(sid[0].ReferencedSegmentNumber))] = pixels[f]
    iop = [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient]
    spacing = [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing]
    return out, iop, spacing, ds


# ---------------------------------------------------------------------------------------------
# the subprocess side (old highdicom / pydicom first on PYTHONPATH)
# ---------------------------------------------------------------------------------------------
def old_side(work: Path, dcmqi: str) -> None:
    import highdicom
    import pydicom

    from samliverseg.io.export import read_dicom_seg, read_labelmap, write_dicom_seg
    from samliverseg.io.volume import read_volume

    ct = read_volume(work / "series")
    labels = np.load(work / "labels.npy")
    write_dicom_seg(labels, ct, work / "old.dcm")
    result = {"highdicom": highdicom.__version__, "pydicom": pydicom.__version__,
              "pydicom_file": pydicom.__file__,
              "geometry": {"origin": list(ct.origin), "spacing": list(ct.spacing),
                           "direction": np.asarray(ct.direction).tolist(), "files": [str(f) for f in ct.dicom_files]}}
    arrays = {}
    for name in ("old", "new"):
        back, segs = read_dicom_seg(work / f"{name}.dcm", ct, with_segments=True)
        arrays[f"read_{name}"] = back
        result[f"segments_{name}"] = [[n, label, list(info.color), list(info.type)] for n, label, info in segs]
    if dcmqi:
        d = Path(dcmqi)
        ct3 = read_volume(d / "ct-3slice")
        arrays["dcmqi_liver"] = read_dicom_seg(d / "liver.dcm", ct3)
        arrays["dcmqi_nrrd"] = read_labelmap(d / "liver_seg.nrrd", ct3)
    np.savez(work / "old_side.npz", **arrays)
    (work / "old_side.json").write_text(json.dumps(result))


if __name__ == "__main__" and len(sys.argv) >= 3 and sys.argv[1] == "old-side":
    old_side(Path(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "")
    sys.exit(0)


# ---------------------------------------------------------------------------------------------
# tests (this process: the newest highdicom / pydicom)
# ---------------------------------------------------------------------------------------------
from samliverseg.io.export import (  # noqa: E402
    DEFAULT_SEGMENTS, LIVER, LIVER_TUMOR, dicom_lab_to_rgb, read_dicom_seg, read_labelmap, rgb_to_dicom_lab,
    write_dicom_seg)
from samliverseg.io.volume import read_volume  # noqa: E402

from libtest_helpers import SHARED, needs_shared  # noqa: E402


def _newest():
    import highdicom
    import pydicom

    if int(pydicom.__version__.split(".")[0]) < 3:
        pytest.skip(f"this process has pydicom {pydicom.__version__}; the comparison needs the newest (3.x)")
    return highdicom, pydicom


def test_cielab_matches_highdicom_and_round_trips():
    hd, _ = _newest()
    rng = np.random.default_rng(0)
    colours = [(0, 0, 0), (1, 1, 1), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (0.5, 0.5, 0.5),
               LIVER.color, LIVER_TUMOR.color] + [tuple(c) for c in rng.random((60, 3))]
    assert rgb_to_dicom_lab((1, 1, 1)) == (65535, 32896, 32896)  # L* 100, a* = b* = 0 (D65 white)
    assert rgb_to_dicom_lab((0, 0, 0)) == (0, 32896, 32896)
    for c in colours:
        mine = np.array(rgb_to_dicom_lab(c))
        rgb255 = [int(round(v * 255)) for v in c]
        theirs = np.array(hd.color.CIELabColor.from_rgb(*rgb255).value)
        mine255 = np.array(rgb_to_dicom_lab([v / 255 for v in rgb255]))
        # highdicom's sRGB matrix is rounded to 4 digits: a few units of 65535 (< 0.05 L*, a*, b*)
        assert np.abs(mine255 - theirs).max() <= 12, (c, mine255, theirs)
        back = np.array(dicom_lab_to_rgb(mine))
        np.testing.assert_allclose(back, c, atol=1e-3)  # the 16-bit scaling loses < 0.001
        hd_back = np.array(hd.color.CIELabColor.from_dicom_value(tuple(int(v) for v in mine)).to_rgb())
        assert np.abs(back * 255 - hd_back).max() <= 1.0
    with pytest.raises(ValueError):
        dicom_lab_to_rgb((1, 2))


def test_seg_old_and_new_write_and_cross_read(tmp_path, old_dicom):
    highdicom, pydicom = _newest()
    work = tmp_path
    write_phantom_series(work / "series")
    ct = read_volume(work / "series")
    # the phantom really is oblique and flipped: rows along -L (rotated), k against the file order
    d = np.asarray(ct.direction, float)
    assert np.abs(d - np.round(d)).max() > 0.1
    assert d[0, 0] < 0
    first = [float(v) for v in pydicom.dcmread(str(work / "series" / "slice000.dcm")).ImagePositionPatient]
    np.testing.assert_allclose(ct.ijk_to_lps(np.array([0.0, 0.0, ct.shape[0] - 1.0])), first, atol=1e-3)
    labels = phantom_labels(ct.shape)
    np.save(work / "labels.npy", labels)
    write_dicom_seg(labels, ct, work / "new.dcm")
    new_new, new_segs = read_dicom_seg(work / "new.dcm", ct, with_segments=True)

    res = run_old_side(old_dicom, work)
    assert {k: res[k] for k in OLD_VERSIONS} == OLD_VERSIONS, res
    assert str(old_dicom) in res["pydicom_file"]
    assert highdicom.__version__ != OLD_VERSIONS["highdicom"]
    # the old side read the same volume geometry (IJK -> LPS) from the series
    np.testing.assert_allclose(res["geometry"]["origin"], ct.origin, atol=1e-6)
    np.testing.assert_allclose(res["geometry"]["spacing"], ct.spacing, atol=1e-9)
    np.testing.assert_allclose(res["geometry"]["direction"], np.asarray(ct.direction), atol=1e-9)
    assert res["geometry"]["files"] == [str(f) for f in ct.dicom_files]
    old = np.load(work / "old_side.npz")
    new_old, old_segs = read_dicom_seg(work / "old.dcm", ct, with_segments=True)
    for name, got in (("new->new", new_new), ("old->old", old["read_old"]), ("new->old", old["read_new"]),
                      ("old->new", new_old)):
        np.testing.assert_array_equal(got, labels, err_msg=name)
    # the same segments, names, terminology and colours whoever wrote or read them
    mine = [[n, label, list(info.color), list(info.type)] for n, label, info in new_segs]
    assert [[n, label] for n, label, _, _ in mine] == [[1, "Liver"], [2, "Liver tumor"]]
    for other in (res["segments_new"], res["segments_old"],
                  [[n, label, list(info.color), list(info.type)] for n, label, info in old_segs]):
        assert [s[:2] + [s[3]] for s in other] == [s[:2] + [s[3]] for s in mine]
        np.testing.assert_allclose([s[2] for s in other], [list(s.color) for s in DEFAULT_SEGMENTS], atol=1e-3)
    # both files: frames on the same slices with the same pixels, checked against the volume's
    # IJK -> LPS with plain pydicom; rows / columns along the volume's i / j
    f_new, iop_new, sp_new, ds_new = frames_of(work / "new.dcm", ct)
    f_old, iop_old, sp_old, ds_old = frames_of(work / "old.dcm", ct)
    assert sorted(f_new) == sorted(f_old) == sorted(
        (k, n) for n in (1, 2) for k in range(ct.shape[0]) if (labels[k] == n).any())
    for key, pix in f_new.items():
        np.testing.assert_array_equal(pix, labels[key[0]] == key[1])
        np.testing.assert_array_equal(f_old[key], pix)
    np.testing.assert_allclose(iop_new, np.concatenate([d[:, 0], d[:, 1]]), atol=1e-6)
    np.testing.assert_allclose(iop_old, iop_new, atol=1e-6)
    np.testing.assert_allclose(sp_old, sp_new)
    np.testing.assert_allclose(sp_new, (ct.spacing[1], ct.spacing[0]), atol=1e-6)
    for ds in (ds_new, ds_old):
        assert ds.FrameOfReferenceUID == ct.metadata["frame_of_reference_uid"]
        assert [list(s.RecommendedDisplayCIELabValue) for s in ds.SegmentSequence] == \
            [list(rgb_to_dicom_lab(s.color)) for s in DEFAULT_SEGMENTS]


@needs_shared
def test_dcmqi_seg_read_the_same_by_old_and_new(tmp_path, old_dicom):
    _newest()
    d = SHARED / "dcmqi-liver-3slice"
    res = run_old_side_dcmqi(old_dicom, tmp_path, d)
    assert {k: res[k] for k in OLD_VERSIONS} == OLD_VERSIONS
    old = np.load(tmp_path / "old_side.npz")
    ct = read_volume(d / "ct-3slice")
    new = read_dicom_seg(d / "liver.dcm", ct)
    nrrd = read_labelmap(d / "liver_seg.nrrd", ct)
    assert new.sum() == 107098
    np.testing.assert_array_equal(old["dcmqi_liver"], new)
    np.testing.assert_array_equal(old["dcmqi_nrrd"], nrrd)
    np.testing.assert_array_equal(new, nrrd)


def run_old_side_dcmqi(old_dir: Path, work: Path, dcmqi: Path) -> dict:
    """The old side on a tiny phantom series plus the dcmqi fixture."""
    write_phantom_series(work / "series", n_slices=2, rows=4, cols=5)
    ct = read_volume(work / "series")
    labels = np.zeros(ct.shape, np.uint8)
    labels[0, 1, 1] = 1
    np.save(work / "labels.npy", labels)
    write_dicom_seg(labels, ct, work / "new.dcm")
    return run_old_side(old_dir, work, str(dcmqi))


@pytest.mark.parametrize("kind", ["FRACTIONAL", "LABELMAP"])
def test_fractional_and_labelmap_segs_land_on_their_slices(tmp_path, kind):
    """SEGs the project does not write (highdicom's own, newest): fractions >= 0.5 are in; a
    LABELMAP SEG's pixel values are the segment numbers."""
    hd, pydicom = _newest()
    if not hasattr(hd.seg.SegmentationTypeValues, kind):
        pytest.skip(f"highdicom {hd.__version__} cannot write a {kind} SEG")
    write_phantom_series(tmp_path / "series")
    ct = read_volume(tmp_path / "series")
    labels = phantom_labels(ct.shape)
    sources = [pydicom.dcmread(str(f)) for f in ct.dicom_files]
    descriptions = [hd.seg.SegmentDescription(
        segment_number=n, segment_label=s.name,
        segmented_property_category=hd.sr.CodedConcept(s.category.value, s.category.scheme, s.category.meaning),
        segmented_property_type=hd.sr.CodedConcept(s.type.value, s.type.scheme, s.type.meaning),
        algorithm_type="MANUAL") for n, s in enumerate(DEFAULT_SEGMENTS, start=1)]
    if kind == "FRACTIONAL":
        # per segment: 0.7 inside, 0.3 in a one-voxel rim that must stay out
        pixel_array = np.zeros(labels.shape + (2,), np.float32)
        for n in (1, 2):
            inside = labels == n
            rim = np.zeros_like(inside)
            rim[:, 1:, :] |= inside[:, :-1, :]
            pixel_array[..., n - 1] = np.where(inside, 0.7, np.where(rim & (labels == 0), 0.3, 0.0))
    else:
        pixel_array = labels
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=pixel_array, segmentation_type=kind,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=5,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="test", manufacturer_model_name="test",
        software_versions="0", device_serial_number="0")
    seg.save_as(str(tmp_path / "seg.dcm"))
    np.testing.assert_array_equal(read_dicom_seg(tmp_path / "seg.dcm", ct), labels)
