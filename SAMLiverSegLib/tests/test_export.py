"""Label maps, Slicer .seg.nrrd and DICOM SEG on the exact input grid; atomic writes."""

import os
import time

import numpy as np
import pytest
import SimpleITK as sitk

from samliverseg.io import export
from samliverseg.core.errors import InputError
from samliverseg.core.evaluation import dice
from samliverseg.io.export import (
    LIVER,
    LIVER_TUMOR,
    SegmentInfo,
    read_dicom_seg,
    read_labelmap,
    read_seg_nrrd_segments,
    write_dicom_seg,
    write_labelmap,
    write_seg_nrrd,
)
from samliverseg.io.volume import Volume, read_volume

from libtest_helpers import SHARED, needs_shared, rot


DIRECTIONS = {
    "identity": np.eye(3),
    "flipped": np.diag([-1.0, 1.0, -1.0]),
    "oblique": rot("x", 20) @ rot("z", 20),
    "oblique_flipped": rot("y", 20) @ rot("x", 20) @ np.diag([1.0, -1.0, -1.0]),
}


def make_case(direction, shape=(7, 10, 12)):
    v = Volume(np.zeros(shape, np.float32), spacing=(0.7, 0.8, 2.5), origin=(12.5, -40.25, 101.0), direction=direction)
    labels = np.zeros(shape, np.uint8)
    labels[1:6, 2:8, 3:10] = 1
    labels[2:4, 3:5, 4:6] = 2
    labels[5, 7, 9] = 2  # an asymmetric voxel: catches any axis swap or flip
    return v, labels


def assert_same_geometry(img, v, atol):
    assert img.GetSize() == v.shape_ijk
    np.testing.assert_allclose(img.GetSpacing(), v.spacing, atol=atol)
    np.testing.assert_allclose(img.GetOrigin(), v.origin, atol=atol)
    np.testing.assert_allclose(np.reshape(img.GetDirection(), (3, 3)), v.direction, atol=atol)


# ---------------------------------------------------------------------------------------------
# geometry round trips
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
@pytest.mark.parametrize("name", list(DIRECTIONS))
def test_write_labelmap_round_trip(tmp_path, name, suffix):
    v, labels = make_case(DIRECTIONS[name])
    f = write_labelmap(labels, v, tmp_path / f"mask{suffix}")
    img = sitk.ReadImage(str(f))
    assert img.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), labels)
    assert_same_geometry(img, v, atol=1e-5 if suffix.startswith(".nii") else 1e-12)
    np.testing.assert_array_equal(read_labelmap(f, v), labels)
    assert [p.name for p in tmp_path.iterdir()] == [f.name]  # no temporary file left


@pytest.mark.parametrize("name", list(DIRECTIONS))
def test_write_seg_nrrd_round_trip(tmp_path, name):
    v, labels = make_case(DIRECTIONS[name])
    f = write_seg_nrrd(labels, v, tmp_path / "seg.seg.nrrd")
    img = sitk.ReadImage(str(f))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), labels)
    assert_same_geometry(img, v, atol=1e-12)
    np.testing.assert_array_equal(read_labelmap(f, v), labels)
    # the header carries the segments
    assert img.GetMetaData("Segment0_Name") == "Liver"
    assert img.GetMetaData("Segment1_Name") == "Liver tumor"
    assert img.GetMetaData("Segmentation_MasterRepresentation") == "Binary labelmap"
    segs = read_seg_nrrd_segments(f)
    assert [(s.label_value, s.name, s.category, s.type, s.anatomic_region) for s in segs] == [
        (1, "Liver", LIVER.category, LIVER.type, None),
        (2, "Liver tumor", LIVER_TUMOR.category, LIVER_TUMOR.type, LIVER_TUMOR.anatomic_region)]
    np.testing.assert_allclose(segs[0].color, LIVER.color, atol=1e-5)


def test_segment_info_with_label():
    s = LIVER_TUMOR.with_label(5, name="Lesion 1")
    assert (s.label_value, s.name, s.slicer_id) == (5, "Lesion 1", "Segment_5")
    assert s.type == LIVER_TUMOR.type and s.color == LIVER_TUMOR.color
    assert LIVER.with_label(3).name == "Liver"


def test_seg_nrrd_header_fields(tmp_path):
    v, labels = make_case(np.eye(3))
    header = export.seg_nrrd_header(labels, v, [LIVER, LIVER_TUMOR])
    assert "space: left-posterior-superior" in header
    assert "Segment0_Extent:=3 9 2 7 1 5" in header  # i0 i1 j0 j1 k0 k1 of label 1
    assert "Segment1_Extent:=4 9 3 7 2 5" in header
    assert ("TerminologyEntry:Segmentation category and type - 3D Slicer General Anatomy list"
            "~SCT^123037004^Anatomical Structure~SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^|") in header
    assert "~SCT^49755003^Morphologically Altered Structure~SCT^108369006^Neoplasm~^^~" in header
    assert "~SCT^10200004^Liver~^^|" in header.split("Segment1_Tags:=")[1]
    assert "Segmentation_ReferenceImageExtentOffset:=0 0 0" in header


# ---------------------------------------------------------------------------------------------
# Slicer opens it (slicer-core MRML, no Qt)
# ---------------------------------------------------------------------------------------------
_CONVERTERS: list = []


def _slicer_load_segmentation(path):
    slicer = pytest.importorskip("slicer", reason="slicer-core (MRML without Qt) is not installed")
    if not _CONVERTERS:
        # What the Segmentations module registers when the Slicer application starts; without
        # them a segmentation node cannot hold a binary labelmap.
        factory = slicer.vtkSegmentationConverterFactory.GetInstance()
        factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
        factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())
        _CONVERTERS.append(True)
    scene = slicer.vtkMRMLScene()
    node = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(node)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    node.SetAndObserveStorageNodeID(storage.GetID())
    storage.SetFileName(str(path))
    assert storage.ReadData(node), f"Slicer could not read {path}"
    return slicer, scene, node


def _slicer_segments(node, shape_kji):
    """{name: (label value, terminology, uint8 mask [k,j,i] on the full grid, image-to-RAS 4x4)}"""
    import vtk
    from vtk.util import numpy_support

    seg = node.GetSegmentation()
    out = {}
    for n in range(seg.GetNumberOfSegments()):
        sid = seg.GetNthSegmentID(n)
        s = seg.GetSegment(sid)
        term = vtk.reference("")
        s.GetTag("TerminologyEntry", term)
        im = s.GetRepresentation("Binary labelmap")
        x0, x1, y0, y1, z0, z1 = im.GetExtent()
        mask = np.zeros(shape_kji, np.uint8)
        if x1 >= x0 and y1 >= y0 and z1 >= z0:
            a = numpy_support.vtk_to_numpy(im.GetPointData().GetScalars()).reshape(z1 - z0 + 1, y1 - y0 + 1, x1 - x0 + 1)
            mask[z0:z1 + 1, y0:y1 + 1, x0:x1 + 1] = a == s.GetLabelValue()
        m = vtk.vtkMatrix4x4()
        im.GetImageToWorldMatrix(m)
        out[s.GetName()] = (s.GetLabelValue(), str(term), mask, np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)]),
                            tuple(s.GetColor()), sid)
    return out


@pytest.mark.parametrize("name", ["flipped", "oblique_flipped"])
def test_slicer_opens_seg_nrrd(tmp_path, name):
    v, labels = make_case(DIRECTIONS[name])
    f = write_seg_nrrd(labels, v, tmp_path / "case.seg.nrrd")
    _, _, node = _slicer_load_segmentation(f)
    segs = _slicer_segments(node, v.shape)
    assert set(segs) == {"Liver", "Liver tumor"}
    for info in (LIVER, LIVER_TUMOR):
        value, term, mask, ijk_to_ras, color, sid = segs[info.name]
        assert value == info.label_value and sid == info.slicer_id
        assert term == info.terminology_entry()
        np.testing.assert_allclose(color, info.color, atol=1e-5)
        np.testing.assert_array_equal(mask, labels == info.label_value)
        np.testing.assert_allclose(ijk_to_ras, v.ijk_to_ras_matrix(), atol=1e-9)


def test_slicer_opens_seg_nrrd_with_an_empty_segment(tmp_path):
    v, labels = make_case(DIRECTIONS["oblique"])
    labels[labels == 2] = 1
    f = write_seg_nrrd(labels, v, tmp_path / "liver_only.seg.nrrd")
    _, _, node = _slicer_load_segmentation(f)
    segs = _slicer_segments(node, v.shape)
    assert set(segs) == {"Liver", "Liver tumor"}
    np.testing.assert_array_equal(segs["Liver"][2], labels == 1)
    assert segs["Liver tumor"][2].sum() == 0


def test_slicer_written_cropped_seg_nrrd_reads_back_on_the_grid(tmp_path):
    """Slicer crops the labelmap it saves; read_labelmap puts it back on the volume's grid."""
    v, labels = make_case(DIRECTIONS["oblique_flipped"], shape=(9, 14, 16))
    f = write_seg_nrrd(labels, v, tmp_path / "ours.seg.nrrd")
    slicer, scene, node = _slicer_load_segmentation(f)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    out = tmp_path / "slicer.seg.nrrd"
    storage.SetFileName(str(out))
    assert storage.WriteData(node)
    cropped = sitk.ReadImage(str(out))
    assert cropped.GetSize() != v.shape_ijk  # Slicer cropped it
    np.testing.assert_array_equal(read_labelmap(out, v), labels)
    assert [s.name for s in read_seg_nrrd_segments(out)] == ["Liver", "Liver tumor"]


# ---------------------------------------------------------------------------------------------
# label checks and reading label maps
# ---------------------------------------------------------------------------------------------
def test_label_checks(tmp_path):
    v, labels = make_case(np.eye(3))
    with pytest.raises(InputError, match="do not match"):
        write_labelmap(labels[:, :, :-1], v, tmp_path / "a.nii.gz")
    with pytest.raises(InputError, match="whole numbers"):
        write_labelmap(labels * 0.5, v, tmp_path / "a.nii.gz")
    with pytest.raises(InputError, match="0..255"):
        write_labelmap(labels.astype(np.int16) * 200, v, tmp_path / "a.nii.gz")
    with pytest.raises(InputError, match=r"\[2\] have no segment"):
        write_seg_nrrd(labels, v, tmp_path / "a.seg.nrrd", [LIVER])
    with pytest.raises(InputError, match="share a label value"):
        write_seg_nrrd(labels, v, tmp_path / "a.seg.nrrd", [LIVER, SegmentInfo(1, "x", (1, 0, 0), LIVER.category, LIVER.type)])
    with pytest.raises(InputError, match=".seg.nrrd"):
        write_seg_nrrd(labels, v, tmp_path / "a.nii.gz")
    # bool masks are fine
    write_labelmap(labels > 0, v, tmp_path / "b.nrrd")
    assert list(p.name for p in tmp_path.iterdir()) == ["b.nrrd"]


def test_read_labelmap_grid_checks(tmp_path):
    v, labels = make_case(DIRECTIONS["oblique"])
    other = Volume(v.array, spacing=(0.7, 0.8, 2.0), origin=v.origin, direction=v.direction)
    f = write_labelmap(labels, other, tmp_path / "other.nrrd")
    with pytest.raises(InputError, match="not on the volume's grid: spacing"):
        read_labelmap(f, v)
    shifted = Volume(v.array, spacing=v.spacing, origin=np.add(v.origin, (0.3, 0, 0)), direction=v.direction)
    with pytest.raises(InputError, match="origin"):
        read_labelmap(write_labelmap(labels, shifted, tmp_path / "shifted.nrrd"), v)
    turned = Volume(v.array, spacing=v.spacing, origin=v.origin, direction=rot("z", 1) @ v.direction)
    with pytest.raises(InputError, match="direction"):
        read_labelmap(write_labelmap(labels, turned, tmp_path / "turned.nrrd"), v)
    small = Volume(v.array[:-1], spacing=v.spacing, origin=v.origin, direction=v.direction)
    np.testing.assert_array_equal(read_labelmap(write_labelmap(labels[:-1], small, tmp_path / "small.nrrd"), v)[:-1], labels[:-1])
    prob = tmp_path / "prob.nrrd"
    sitk.WriteImage(v.to_sitk(labels * 0.4), str(prob))
    with pytest.raises(InputError, match="non-integer"):
        read_labelmap(prob, v)
    with pytest.raises(InputError, match="does not exist"):
        read_labelmap(tmp_path / "none.nrrd", v)
    txt = tmp_path / "x.nrrd"
    txt.write_text("hello")
    with pytest.raises(InputError, match="cannot read"):
        read_labelmap(txt, v)


# ---------------------------------------------------------------------------------------------
# atomic writes
# ---------------------------------------------------------------------------------------------
def test_unsupported_extension_leaves_nothing(tmp_path):
    v, labels = make_case(np.eye(3))
    for name in ("mask.xyz", "mask.png", "mask.mhd", "mask.nhdr"):
        with pytest.raises(InputError, match="cannot write a label map"):
            write_labelmap(labels, v, tmp_path / name)
    assert list(tmp_path.iterdir()) == []


_WRITE_ON_SMALL_DISK = """
import sys
import numpy as np
from samliverseg.core.errors import SAMLiverSegError
from samliverseg.io.export import write_segmentation
from samliverseg.io.volume import Volume
rng = np.random.default_rng(0)
volume = Volume(rng.normal(0, 300, (40, 128, 128)).astype(np.float32), (1.0, 1.0, 2.0))
labels = rng.integers(0, 2, (40, 128, 128)).astype(np.uint8)  # noise: does not compress
try:
    write_segmentation(labels, volume, sys.argv[1])
except SAMLiverSegError as exc:
    print(type(exc).__name__, exc, file=sys.stderr)
    sys.exit(exc.exit_code)
"""


@pytest.mark.parametrize("name", ["mask.nii.gz", "mask.nii", "mask.mha", "mask.seg.nrrd"])
def test_full_disk_keeps_the_previous_file(tmp_path, name):
    """A real full disk (a 96 KiB tmpfs): the writer reports it (ITK's NIfTI writer does not;
    the read-back check does), the previous file survives byte for byte, no temporary is left."""
    import sys

    from libtest_helpers import run_on_small_disk

    seed = tmp_path / "seed"
    seed.mkdir()
    (seed / name).write_bytes(b"previous result")
    disk = tmp_path / "disk"
    done, after = run_on_small_disk([sys.executable, "-c", _WRITE_ON_SMALL_DISK, str(disk / name)], disk, 96,
                                    seed=seed, timeout=120)
    assert done.returncode == 5, (done.returncode, done.stderr)
    assert "DiskFullError" in done.stderr and "disk full" in done.stderr, done.stderr
    assert (after / name).read_bytes() == b"previous result"
    assert sorted(p.name for p in after.iterdir()) == [name]


def test_failed_check_keeps_the_previous_file(tmp_path):
    """A write whose read-back check fails: WriteError, the old file as it was, no temporary."""
    from samliverseg.core.atomic import atomic_path
    from samliverseg.core.errors import WriteError

    target = tmp_path / "mask.nii.gz"
    target.write_bytes(b"previous result")

    def bad(tmp):
        raise ValueError("does not read back")

    with pytest.raises(WriteError, match="does not read back"):
        with atomic_path(target, check=bad) as tmp:
            tmp.write_bytes(b"new")
    assert target.read_bytes() == b"previous result"
    assert [p.name for p in tmp_path.iterdir()] == ["mask.nii.gz"]


def test_written_files_get_the_umask_permissions(tmp_path):
    v, labels = make_case(np.eye(3))
    old = os.umask(0o027)
    try:
        write_labelmap(labels, v, tmp_path / "a.nii.gz")
    finally:
        os.umask(old)
    assert (tmp_path / "a.nii.gz").stat().st_mode & 0o777 == 0o640


def test_dicom_seg_needs_a_dicom_series(tmp_path):
    v, labels = make_case(np.eye(3))
    with pytest.raises(InputError, match="DICOM SEG needs a DICOM series as input"):
        write_dicom_seg(labels, v, tmp_path / "seg.dcm")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# DICOM SEG on real series
# ---------------------------------------------------------------------------------------------
def _check_references(seg_path, volume):
    import pydicom

    seg = pydicom.dcmread(str(seg_path))
    src = [pydicom.dcmread(f, stop_before_pixels=True) for f in volume.dicom_files]
    assert seg.SOPClassUID == export.SEG_SOP_CLASS_UID
    assert seg.SegmentationType == "BINARY"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == src[0].SeriesInstanceUID
    assert seg.StudyInstanceUID == src[0].StudyInstanceUID
    assert seg.PatientID == src[0].PatientID
    refs = {r.ReferencedSOPInstanceUID for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    # (the TotalSegmentator example's anonymiser blanked SOPInstanceUID in the data sets; it is
    # still in the file meta information, which the export falls back to)
    by_uid = {(d.SOPInstanceUID or d.file_meta.MediaStorageSOPInstanceUID): d for d in src}
    assert refs and refs <= set(by_uid)
    # every frame's source image is the CT slice at the frame's position
    for fg in seg.PerFrameFunctionalGroupsSequence:
        uid = fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        np.testing.assert_allclose([float(x) for x in fg.PlanePositionSequence[0].ImagePositionPatient],
                                   [float(x) for x in by_uid[uid].ImagePositionPatient], atol=1e-3)
    return seg, src


@needs_shared
def test_dcmqi_dicom_seg_round_trip(tmp_path):
    d = SHARED / "dcmqi-liver-3slice"
    ct = read_volume(d / "ct-3slice")
    # liver_seg.nrrd is on the CT's grid up to float noise (origin -235.2 vs -235.199997,
    # spacing 1.0 vs 0.99999999999999), which read_labelmap accepts (tolerance 1e-3 mm).
    img = sitk.ReadImage(str(d / "liver_seg.nrrd"))
    assert img.GetSize() == ct.shape_ijk
    assert np.abs(np.subtract(img.GetOrigin(), ct.origin)).max() < 1e-5
    labels = read_labelmap(d / "liver_seg.nrrd", ct)
    assert set(np.unique(labels)) == {0, 1} and labels.sum() == 107098
    out = write_dicom_seg(labels, ct, tmp_path / "liver_seg.dcm", [LIVER])
    back, segs = read_dicom_seg(out, ct, with_segments=True)
    np.testing.assert_array_equal(back, labels)
    assert [(n, name) for n, name, _ in segs] == [(1, "Liver")]
    assert segs[0][2].type == LIVER.type and segs[0][2].category == LIVER.category
    seg, src = _check_references(out, ct)
    assert seg.FrameOfReferenceUID == src[0].FrameOfReferenceUID == ct.metadata["frame_of_reference_uid"]
    # the SEG that ships with the fixture: same liver
    ref = read_dicom_seg(d / "liver.dcm", ct)
    assert dice(ref, labels) == pytest.approx(1.0)
    assert (ref == labels).all()


@needs_shared
def test_totalseg_dicom_seg_two_segments(tmp_path):
    from samliverseg.demo.sample_data import totalseg_dicom_dir

    ct = read_volume(totalseg_dicom_dir())
    labels = np.zeros(ct.shape, np.uint8)
    labels[3:15, 200:320, 150:300] = 1
    labels[6:9, 240:260, 200:230] = 2
    labels[14, 319, 299] = 2  # a lone voxel at a corner of the box
    out = write_dicom_seg(labels, ct, tmp_path / "two.dcm")
    back, segs = read_dicom_seg(out, ct, with_segments=True)
    np.testing.assert_array_equal(back, labels)
    assert [name for _, name, _ in segs] == ["Liver", "Liver tumor"]
    assert segs[1][2].anatomic_region == LIVER_TUMOR.anatomic_region
    seg, src = _check_references(out, ct)
    assert seg.FrameOfReferenceUID == src[0].FrameOfReferenceUID
    assert int(seg.NumberOfFrames) == 12 + 4  # only non-empty frames: 12 liver slices, 4 tumour slices
    # label values follow the segment names when asked
    swapped = [SegmentInfo(7, "Liver", LIVER.color, LIVER.category, LIVER.type),
               SegmentInfo(9, "Liver tumor", LIVER_TUMOR.color, LIVER_TUMOR.category, LIVER_TUMOR.type)]
    remapped = read_dicom_seg(out, ct, segments=swapped)
    np.testing.assert_array_equal(remapped, np.select([labels == 1, labels == 2], [7, 9], 0))
    # an empty result still makes a valid SEG
    empty = write_dicom_seg(np.zeros_like(labels), ct, tmp_path / "empty.dcm")
    assert read_dicom_seg(empty, ct).sum() == 0
    # frames on a few far-apart slices (the empty ones in between are not stored) land on their slices
    sparse = np.zeros_like(labels)
    sparse[3, 10:20, 10:30] = 1
    sparse[9, 40:50, 5:8] = 1
    sparse[9, 60:62, 60:63] = 2
    sparse[0, 0, 0] = 2
    np.testing.assert_array_equal(read_dicom_seg(write_dicom_seg(sparse, ct, tmp_path / "sparse.dcm"), ct), sparse)


@needs_shared
def test_read_dicom_seg_rejects_other_grids_and_files(tmp_path):
    d = SHARED / "dcmqi-liver-3slice"
    ct = read_volume(d / "ct-3slice")
    with pytest.raises(InputError, match="not a DICOM Segmentation"):
        read_dicom_seg(ct.dicom_files[0], ct)
    shifted = Volume(ct.array, spacing=ct.spacing, origin=np.add(ct.origin, (0, 0, 0.5)), direction=ct.direction)
    with pytest.raises(InputError, match="not on a slice"):
        read_dicom_seg(d / "liver.dcm", shifted)
    small = Volume(ct.array[:, :256, :256], spacing=ct.spacing, origin=ct.origin)
    with pytest.raises(InputError, match="frames are 512×512"):
        read_dicom_seg(d / "liver.dcm", small)
    flipped = Volume(ct.array, spacing=ct.spacing, origin=ct.origin, direction=ct.direction @ np.diag([-1.0, 1, 1]))
    with pytest.raises(InputError, match="not parallel"):
        read_dicom_seg(d / "liver.dcm", flipped)
    wider = Volume(ct.array, spacing=np.multiply(ct.spacing, (1.1, 1, 1)), origin=ct.origin, direction=ct.direction)
    with pytest.raises(InputError, match="pixel spacing"):
        read_dicom_seg(d / "liver.dcm", wider)
    # a volume whose grid no longer matches its files cannot be exported to DICOM SEG
    moved = Volume(ct.array, spacing=ct.spacing, origin=np.add(ct.origin, (0, 0, 5.0)), direction=ct.direction,
                   dicom_files=ct.dicom_files)
    with pytest.raises(InputError, match="no longer matches"):
        write_dicom_seg(np.zeros(ct.shape, np.uint8), moved, tmp_path / "x.dcm")
    assert list(tmp_path.iterdir()) == []


@needs_shared
def test_ircadb_dicom_seg_and_seg_nrrd(tmp_path, caplog, capsys):
    """The full 129-slice case: liver + tumours exported both ways and read back exactly."""
    from samliverseg.demo.sample_data import load_ircadb, tumor_union

    ct, masks = load_ircadb()
    labels = masks["liver"].copy()
    labels[tumor_union(masks) > 0] = 2
    t = time.perf_counter()
    f = write_seg_nrrd(labels, ct, tmp_path / "ircadb.seg.nrrd")
    t_nrrd = time.perf_counter() - t
    np.testing.assert_array_equal(read_labelmap(f, ct), labels)
    t = time.perf_counter()
    with caplog.at_level("WARNING"):
        out = write_dicom_seg(labels, ct, tmp_path / "ircadb_seg.dcm")
    t_seg = time.perf_counter() - t
    # 3D-IRCADb's anonymised series has no FrameOfReferenceUID: one is derived, with a warning
    assert "FrameOfReferenceUID" in caplog.text
    t = time.perf_counter()
    back = read_dicom_seg(out, ct)
    t_read = time.perf_counter() - t
    np.testing.assert_array_equal(back, labels)
    _check_references(out, ct)
    with capsys.disabled():
        print(f"\n[ircadb export] seg.nrrd {t_nrrd:.2f} s ({f.stat().st_size / 1e3:.0f} kB); DICOM SEG write "
              f"{t_seg:.2f} s ({out.stat().st_size / 1e6:.1f} MB), read {t_read:.2f} s")
