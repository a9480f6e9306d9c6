"""Slicer markups (.mrk.json) -> prompts in IJK, RAS/LPS handling, ROIs, and Slicer interop."""

import json

import numpy as np
import pytest

from samliverseg.core.errors import InputError
from samliverseg.io.markups import (
    SCHEMA_URL,
    markups_to_prompts,
    point_list,
    prompts_to_markups,
    read_markups,
    roi_from_ijk,
    roi_markup,
    write_markups,
)
from samliverseg.core.prompts import Prompts, Roi3D, validate_prompts
from samliverseg.io.volume import Volume


def rot(axis, deg):
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    m = {"x": [[1, 0, 0], [0, c, -s], [0, s, c]], "y": [[c, 0, s], [0, 1, 0], [-s, 0, c]],
         "z": [[c, -s, 0], [s, c, 0], [0, 0, 1]]}[axis]
    return np.array(m, dtype=float)


@pytest.fixture
def oblique():
    """An oblique (20° about x and z), flipped (j, k), anisotropic volume."""
    d = rot("x", 20) @ rot("z", 20) @ np.diag([1.0, -1.0, -1.0])
    return Volume(np.zeros((12, 20, 24), np.float32), spacing=(0.7, 0.8, 2.5), origin=(-30.0, 55.5, -120.0), direction=d)


def raw_file(path, markups, schema=SCHEMA_URL):
    path.write_text(json.dumps({"@schema": schema, "markups": markups}))
    return path


def fiducial(positions, cs=None, name=None, labels=None, descriptions=None, statuses=None):
    m = {"type": "Fiducial", "controlPoints": []}
    if cs:
        m["coordinateSystem"] = cs
    if name is not None:
        m["name"] = name
    for n, p in enumerate(positions):
        cp = {"id": str(n + 1), "label": (labels or [f"F-{n + 1}"] * len(positions))[n], "position": list(map(float, p))}
        if descriptions:
            cp["description"] = descriptions[n]
        if statuses:
            cp["positionStatus"] = statuses[n]
        m["controlPoints"].append(cp)
    return m


# ---------------------------------------------------------------------------------------------
# points
# ---------------------------------------------------------------------------------------------
def test_same_point_in_ras_and_lps_files(tmp_path, oblique):
    ijk = np.array([3.0, 4.0, 2.0])  # a voxel centre
    lps = oblique.ijk_to_lps(ijk)
    ras = lps * np.array([-1, -1, 1])
    f_ras = raw_file(tmp_path / "ras.mrk.json", [fiducial([ras], cs="RAS")])
    f_lps = raw_file(tmp_path / "lps.mrk.json", [fiducial([lps], cs="LPS")])
    f_default = raw_file(tmp_path / "nocs.mrk.json", [fiducial([lps])])  # no coordinateSystem: LPS
    results = [markups_to_prompts(f, oblique).positive[0] for f in (f_ras, f_lps, f_default)]
    for r in results:
        np.testing.assert_allclose(r, ijk, atol=1e-9)
    # it maps back to exactly that voxel
    assert tuple(int(round(v)) for v in results[0]) == (3, 4, 2)
    # and the RAS file really holds other numbers than the LPS one
    assert json.loads(f_ras.read_text())["markups"][0]["controlPoints"][0]["position"][0] == pytest.approx(-lps[0])


@pytest.mark.parametrize("cs", ["RAS", "LPS"])
def test_write_read_round_trip_every_voxel_centre(tmp_path, oblique, cs):
    rng = np.random.default_rng(3)
    ijk = np.c_[rng.integers(0, 24, 30), rng.integers(0, 20, 30), rng.integers(0, 12, 30)].astype(float)
    f = write_markups(tmp_path / f"p_{cs}.mrk.json", point_list("clicks", oblique.ijk_to_lps(ijk)), coordinate_system=cs)
    assert json.loads(f.read_text())["markups"][0]["coordinateSystem"] == cs
    p = markups_to_prompts(f, oblique)
    np.testing.assert_allclose(np.array(p.positive), ijk, atol=1e-9)
    assert p.negative == [] and p.roi is None
    validate_prompts(p, oblique.shape)


def test_fractional_points_are_kept(tmp_path, oblique):
    ijk = np.array([[2.25, 7.5, 3.75]])
    f = write_markups(tmp_path / "f.mrk.json", point_list("p", oblique.ijk_to_lps(ijk)), "RAS")
    np.testing.assert_allclose(markups_to_prompts(f, oblique).positive, ijk, atol=1e-9)


def test_negative_rules(tmp_path, oblique):
    a, b, c, d = (oblique.ijk_to_lps(np.array(p, float)) for p in ([1, 1, 1], [2, 2, 2], [3, 3, 3], [4, 4, 4]))
    f = raw_file(tmp_path / "mixed.mrk.json", [
        fiducial([a, b, c, d], cs="LPS", name="clicks", labels=["p", "-n", "x", "y"],
                 descriptions=["", "", "negative", "Positive"]),
        fiducial([a], cs="LPS", name="Negative points"),
        fiducial([b], cs="LPS", name="exclude-vessels"),
        fiducial([c], cs="LPS", name="Background", descriptions=["positive"]),  # point overrides its list
    ])
    p = markups_to_prompts(f, oblique)
    rnd = lambda pts: sorted(tuple(int(round(v)) for v in q) for q in pts)  # noqa: E731
    assert rnd(p.positive) == [(1, 1, 1), (3, 3, 3), (4, 4, 4)]
    assert rnd(p.negative) == [(1, 1, 1), (2, 2, 2), (2, 2, 2), (3, 3, 3)]


def test_file_name_names_a_nameless_list(tmp_path, oblique):
    # Slicer does not store the node name in the file; it names the node after the file.
    a = oblique.ijk_to_lps(np.array([5.0, 5.0, 5.0]))
    f = raw_file(tmp_path / "background.mrk.json", [fiducial([a], cs="LPS")])
    assert read_markups(f)[0].name == "background"
    p = markups_to_prompts(f, oblique)
    assert p.positive == [] and len(p.negative) == 1


def test_undefined_points_are_skipped(tmp_path, oblique):
    a = oblique.ijk_to_lps(np.array([5.0, 5.0, 5.0]))
    f = raw_file(tmp_path / "u.mrk.json", [fiducial([a, a, a], cs="LPS", statuses=["defined", "undefined", "preview"])])
    assert len(markups_to_prompts(f, oblique).positive) == 1


def test_micrometre_units(tmp_path):
    v = Volume(np.zeros((4, 4, 4), np.float32))
    m = fiducial([[-2000.0, -1000.0, 3000.0]], cs="RAS")
    m["coordinateUnits"] = ["um", "UCUM", "micrometer"]
    p = markups_to_prompts(raw_file(tmp_path / "um.mrk.json", [m]), v)
    np.testing.assert_allclose(p.positive[0], (2.0, 1.0, 3.0))


def test_legacy_fcsv(tmp_path, oblique):
    ijk = np.array([6.0, 7.0, 8.0])
    ras = [float(v) for v in oblique.ijk_to_ras(ijk)]
    f = tmp_path / "old.fcsv"
    f.write_text("# Markups fiducial file version = 4.10\n# CoordinateSystem = 0\n"
                 "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
                 f"vtkMRMLMarkupsFiducialNode_0,{ras[0]!r},{ras[1]!r},{ras[2]!r},0,0,0,1,1,1,0,F-1,,\n"
                 f"vtkMRMLMarkupsFiducialNode_1,{ras[0]!r},{ras[1]!r},{ras[2]!r},0,0,0,1,1,1,0,F-2,negative,\n")
    p = markups_to_prompts(f, oblique)
    np.testing.assert_allclose(p.positive[0], ijk, atol=1e-9)
    np.testing.assert_allclose(p.negative[0], ijk, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# ROI
# ---------------------------------------------------------------------------------------------
def test_roi_axis_aligned_by_hand(tmp_path):
    # identity volume, 1 mm voxels, origin 0: LPS = IJK. An ROI in RAS centred at RAS (-10,-20,5)
    # = LPS (10, 20, 5), size 6 x 4.5 x 3 -> LPS box [7,13] x [17.75,22.25] x [3.5,6.5]
    v = Volume(np.zeros((10, 40, 40), np.float32))
    roi = {"type": "ROI", "coordinateSystem": "RAS", "center": [-10.0, -20.0, 5.0], "size": [6.0, 4.5, 3.0],
           "orientation": [1, 0, 0, 0, 1, 0, 0, 0, 1], "controlPoints": [{"position": [-10.0, -20.0, 5.0]}]}
    p = markups_to_prompts(raw_file(tmp_path / "roi.mrk.json", [roi]), v)
    assert p.roi == Roi3D(7, 17, 3, 13, 23, 7)  # rounded outward
    assert p.positive == []  # the ROI's centre point is not a click


@pytest.mark.parametrize("cs", ["RAS", "LPS"])
def test_roi_from_ijk_round_trip(tmp_path, oblique, cs):
    box = Roi3D(3, 4, 2, 15, 12, 9)
    f = write_markups(tmp_path / "roi.mrk.json", roi_from_ijk(box, oblique), cs)
    p = markups_to_prompts(f, oblique)
    assert p.roi == box
    validate_prompts(p, oblique.shape)


def test_roi_faces_on_voxel_centres_survive_float32_positions(tmp_path, oblique):
    """Slicer keeps positions in float32: a face on a voxel centre must not round outward."""
    box = Roi3D(3, 4, 2, 15, 12, 9)
    m = roi_from_ijk(box, oblique)
    m.center = m.center.astype(np.float32).astype(float)
    m.size = m.size.astype(np.float32).astype(float)
    m.orientation = m.orientation.astype(np.float32).astype(float)
    f = write_markups(tmp_path / "f32.mrk.json", m, "RAS")
    assert markups_to_prompts(f, oblique).roi == box


def test_rotated_roi_is_the_bounding_box_of_its_corners(tmp_path, oblique):
    center_ijk = np.array([10.0, 9.0, 5.0])
    rotation = rot("z", 35) @ rot("y", 10)
    m = roi_markup("r", oblique.ijk_to_lps(center_ijk), (6.0, 4.0, 5.0), rotation)
    f = write_markups(tmp_path / "r.mrk.json", m, "RAS")
    got = markups_to_prompts(f, oblique).roi
    corners = oblique.lps_to_ijk(m.roi_corners())
    assert (got.i0, got.j0, got.k0) == tuple(np.floor(corners.min(0)))
    assert (got.i1, got.j1, got.k1) == tuple(np.ceil(corners.max(0)))
    # every corner inside the box
    assert np.all(corners >= [got.i0, got.j0, got.k0]) and np.all(corners <= [got.i1, got.j1, got.k1])


def test_prompts_to_markups_round_trip(tmp_path, oblique):
    prompts = Prompts(positive=[(1.0, 2.0, 3.0), (4.5, 5.0, 6.0)], negative=[(7.0, 8.0, 9.0)], roi=Roi3D(1, 1, 1, 9, 9, 9))
    f = write_markups(tmp_path / "all.mrk.json", prompts_to_markups(prompts, oblique), "RAS")
    back = markups_to_prompts(f, oblique)
    np.testing.assert_allclose(back.positive, prompts.positive, atol=1e-9)
    np.testing.assert_allclose(back.negative, prompts.negative, atol=1e-9)
    assert back.roi == prompts.roi


# ---------------------------------------------------------------------------------------------
# bad files
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content, match", [
    ("{not json", "not a valid markups JSON"),
    ('{"foo": 1}', "no 'markups' list"),
    ('{"markups": [{"controlPoints": []}]}', "needs a 'type'"),
    ('{"markups": [{"type": "Fiducial", "coordinateSystem": "XYZ", "controlPoints": []}]}', "coordinateSystem"),
    ('{"markups": [{"type": "Fiducial", "controlPoints": [{"position": [1, 2]}]}]}', "3 finite numbers"),
    ('{"markups": [{"type": "Fiducial", "controlPoints": []}]}', "no control point"),
    ('{"markups": [{"type": "ROI", "center": [0,0,0], "size": [1,1,1]}, {"type": "ROI", "center": [0,0,0], "size": [1,1,1]}]}', "2 ROIs"),
    ('{"markups": [{"type": "ROI", "controlPoints": []}]}', "no center"),
    ('{"markups": [{"type": "ROI", "center": [0,0,0], "size": [1,1,1], "insideOut": true}]}', "inside-out"),
])
def test_bad_files(tmp_path, content, match):
    f = tmp_path / "bad.mrk.json"
    f.write_text(content)
    with pytest.raises(InputError, match=match) as e:
        markups_to_prompts(f, Volume(np.zeros((4, 4, 4), np.float32)))
    assert "\n" not in str(e.value)


def test_missing_file_and_bad_writes(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_markups(tmp_path / "none.mrk.json")
    with pytest.raises(InputError):
        write_markups(tmp_path / "x.mrk.json", point_list("p", [[0, 0, 0]]), "XYZ")
    with pytest.raises(InputError):
        write_markups(tmp_path / "y.mrk.json", point_list("p", [[0, np.nan, 0]]))
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Slicer (slicer-core MRML) interop
# ---------------------------------------------------------------------------------------------
def _slicer():
    return pytest.importorskip("slicer", reason="slicer-core (MRML without Qt) is not installed")


def _scene(slicer):
    scene = slicer.vtkMRMLScene()
    scene.AddNode(slicer.vtkMRMLSelectionNode())  # markups look up their length unit through it
    return scene


@pytest.mark.parametrize("cs_flag, cs", [(0, "RAS"), (1, "LPS")])
def test_reads_slicer_written_point_list(tmp_path, oblique, cs_flag, cs):
    slicer = _slicer()
    import vtk

    ijk = np.array([7.0, 11.0, 4.0])
    ras = oblique.ijk_to_ras(ijk)
    scene = _scene(slicer)
    node = slicer.vtkMRMLMarkupsFiducialNode()
    scene.AddNode(node)
    node.AddControlPoint(vtk.vtkVector3d(*ras), "F-1")
    node.AddControlPoint(vtk.vtkVector3d(*ras), "F-2")
    node.SetNthControlPointDescription(1, "negative")
    storage = slicer.vtkMRMLMarkupsJsonStorageNode()
    scene.AddNode(storage)
    storage.SetCoordinateSystem(cs_flag)
    f = tmp_path / f"slicer_{cs}.mrk.json"
    storage.SetFileName(str(f))
    assert storage.WriteData(node)
    assert json.loads(f.read_text())["markups"][0]["coordinateSystem"] == cs
    p = markups_to_prompts(f, oblique)
    np.testing.assert_allclose(p.positive[0], ijk, atol=1e-9)
    np.testing.assert_allclose(p.negative[0], ijk, atol=1e-9)


@pytest.mark.parametrize("cs", ["RAS", "LPS"])
def test_slicer_reads_our_files(tmp_path, oblique, cs):
    slicer = _slicer()
    ijk = np.array([[2.0, 3.0, 4.0], [10.0, 12.0, 6.0]])
    f = write_markups(tmp_path / "ours.mrk.json", point_list("clicks", oblique.ijk_to_lps(ijk)), cs)
    scene = _scene(slicer)
    node = slicer.vtkMRMLMarkupsFiducialNode()
    scene.AddNode(node)
    storage = slicer.vtkMRMLMarkupsJsonStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(f))
    assert storage.ReadData(node)
    assert node.GetNumberOfControlPoints() == 2
    for n in range(2):
        got = [0.0, 0.0, 0.0]
        node.GetNthControlPointPosition(n, got)  # RAS
        np.testing.assert_allclose(got, oblique.ijk_to_ras(ijk[n]), atol=1e-6)


@pytest.mark.parametrize("cs_flag", [0, 1])
def test_slicer_roi_corners_and_bounds(tmp_path, cs_flag):
    slicer = _slicer()
    import vtk

    scene = _scene(slicer)
    roi = slicer.vtkMRMLMarkupsROINode()
    scene.AddNode(roi)
    t = vtk.vtkTransform()
    t.Translate(1, 2, 3)
    t.RotateZ(30)
    t.RotateX(20)
    roi.SetAndObserveObjectToNodeMatrix(t.GetMatrix())
    roi.SetSize(10, 20, 30)
    storage = slicer.vtkMRMLMarkupsROIJsonStorageNode()
    scene.AddNode(storage)
    storage.SetCoordinateSystem(cs_flag)
    f = tmp_path / "roi.mrk.json"
    storage.SetFileName(str(f))
    assert storage.WriteData(roi)
    bounds = [0.0] * 6
    roi.GetRASBounds(bounds)
    m = read_markups(f)[0]
    ras = m.roi_corners() * np.array([-1, -1, 1])
    np.testing.assert_allclose(ras.min(0), bounds[0::2], atol=1e-6)
    np.testing.assert_allclose(ras.max(0), bounds[1::2], atol=1e-6)
    # on a 1 mm identity grid centred so the ROI lies inside, the box is the rounded bounds (LPS = IJK - 40)
    v = Volume(np.zeros((80, 80, 80), np.float32), origin=(-40.0, -40.0, -40.0))
    r = markups_to_prompts(f, v).roi
    lps = m.roi_corners()
    assert (r.i0, r.j0, r.k0) == tuple(np.floor(lps.min(0) + 40))
    assert (r.i1, r.j1, r.k1) == tuple(np.ceil(lps.max(0) + 40))
