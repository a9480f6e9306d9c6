"""Clicks in a slice view: XY -> RAS (real vtkMRMLSliceNode) -> IJK -> prompts."""

import numpy as np
import pytest

import slicer
from slicer_test_helpers import GEOMETRIES, add_ct, centre_view_on, slice_node_for

from samliverseg.core.errors import PromptError
from SAMLiverSegLogic import effect_logic, geometry, slice_clicks, volume_nodes

SHAPE = (24, 40, 48)  # k, j, i
VOXEL = (30, 17, 11)  # i, j, k inside the body


def slicer_xy_to_ijk(slice_node, volume_node, xy):
    """Slicer's own XY -> IJK (the segment editor logic's static XyToIjk), for cross-checking."""
    image = volume_nodes.oriented_image_from_mask(np.zeros(SHAPE, np.uint8), geometry.world_ijk_to_ras(volume_node))
    out = [0, 0, 0]
    slicer.vtkSlicerSegmentEditorLogic.XyToIjk([float(xy[0]), float(xy[1])], out, slice_node, image)
    return out


@pytest.mark.parametrize("orientation,expected_axis", [("Axial", "k"), ("Coronal", "j"), ("Sagittal", "i")])
@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_click_on_voxel_centre_maps_back_to_it(scene, name, orientation, expected_axis):
    m = GEOMETRIES[name]
    vol = add_ct(scene, m, SHAPE)
    # oblique volumes: the view is rotated to the volume plane, as Slicer does for a volume shown
    sn = slice_node_for(scene, orientation, vol if name == "oblique" else None)
    ras = geometry.ijk_to_ras_point(vol, VOXEL)
    centre_view_on(sn, ras)
    xyz = slice_clicks.ras_to_xy(sn, ras)
    assert abs(xyz[2]) < 1e-6  # the voxel centre is on the slice plane
    np.testing.assert_allclose(slice_clicks.xy_to_ras(sn, xyz[:2]), ras, atol=1e-6)

    target = slice_clicks.map_click(sn, vol, xyz[:2])
    np.testing.assert_allclose(target.ijk, VOXEL, atol=1e-6)
    axis_of_view = {"identity": expected_axis, "anisotropic": expected_axis, "flipped": expected_axis}.get(name)
    if axis_of_view is not None:
        assert target.slice_axis == axis_of_view
    assert target.slice_index == VOXEL["ijk".index(target.slice_axis)]
    assert target.view_angle_deg < 1e-3  # view aligned with the volume
    assert slicer_xy_to_ijk(sn, vol, xyz[:2]) == list(VOXEL)


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_click_between_voxels_keeps_in_plane_fraction_and_snaps_slice(scene, name):
    vol = add_ct(scene, GEOMETRIES[name], SHAPE)
    sn = slice_node_for(scene, "Axial", vol if name == "oblique" else None)
    centre_view_on(sn, geometry.ijk_to_ras_point(vol, VOXEL))
    # a point a third of a voxel off in-plane, and 0.3 voxel off the slice plane
    target_axis, _ = slice_clicks.slice_axis_for_view(sn, vol)
    c = "ijk".index(target_axis)
    off = np.array([1 / 3, 1 / 3, 1 / 3])
    off[c] = 0.3
    ijk_true = np.array(VOXEL, float) + off
    xy = slice_clicks.ras_to_xy(sn, geometry.ijk_to_ras_point(vol, ijk_true))[:2]
    t = slice_clicks.map_click(sn, vol, xy)
    # the in-plane coordinates are those of the point projected onto the slice plane
    plane_point = slice_clicks.xy_to_ras(sn, xy)
    np.testing.assert_allclose(np.delete(np.array(t.ijk), c),
                               np.delete(geometry.ras_to_ijk_point(vol, plane_point), c), atol=1e-6)
    assert t.ijk[c] == float(VOXEL[c]) and t.slice_index == VOXEL[c]


def test_view_axis_choice_for_a_permuted_volume(scene):
    """A volume acquired sagittally (k along R): the axial view cuts it across j."""
    m = np.eye(4)
    m[:3, :3] = np.array([[0, 0, 1.0], [1.0, 0, 0], [0, 1.0, 0]]) @ np.diag([0.8, 0.8, 2.0])
    vol = add_ct(scene, m, SHAPE)
    for orientation, axis in (("Axial", "j"), ("Coronal", "i"), ("Sagittal", "k")):
        sn = slice_node_for(scene, orientation)
        assert slice_clicks.slice_axis_for_view(sn, vol)[0] == axis


def test_oblique_volume_in_an_unrotated_view_uses_nearest_axis_and_warns(scene):
    vol = add_ct(scene, GEOMETRIES["oblique"], SHAPE)
    sn = slice_node_for(scene, "Axial")  # not rotated to the volume plane
    centre_view_on(sn, geometry.ijk_to_ras_point(vol, VOXEL))
    axis, angle = slice_clicks.slice_axis_for_view(sn, vol)
    assert axis == "k" and 10 < angle < 20  # 12 degrees tilt about R
    t = slice_clicks.map_click(sn, vol, slice_clicks.ras_to_xy(sn, geometry.ijk_to_ras_point(vol, VOXEL))[:2])
    assert t.slice_index == VOXEL[2]
    np.testing.assert_allclose(t.ijk, VOXEL, atol=1e-6)
    assert t.note() == ""  # 12 degrees: below the warning threshold
    sn2 = slice_node_for(scene, "Axial")
    rot = geometry.array_from_vtk_matrix(sn2.GetSliceToRAS())
    tilt = np.eye(4)
    a = np.radians(-25)  # 37 degrees from the volume, which is tilted +12
    tilt[:3, :3] = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    sn2.GetSliceToRAS().DeepCopy(geometry.vtk_matrix_from_array(tilt @ rot))
    sn2.UpdateMatrices()
    centre_view_on(sn2, geometry.ijk_to_ras_point(vol, VOXEL))
    t2 = slice_clicks.map_click(sn2, vol, slice_clicks.ras_to_xy(sn2, geometry.ijk_to_ras_point(vol, VOXEL))[:2])
    assert t2.slice_axis == "k" and "oblique" in t2.note()


def test_click_outside_volume_is_a_message(scene):
    vol = add_ct(scene, GEOMETRIES["anisotropic"], SHAPE)
    sn = slice_node_for(scene, "Axial", fov_mm=800)
    centre_view_on(sn, geometry.ijk_to_ras_point(vol, VOXEL))
    with pytest.raises(PromptError, match="outside the volume"):
        slice_clicks.map_click(sn, vol, (2, 2))


def test_click_on_air_only_slice_is_a_message(scene):
    arr = np.full(SHAPE, -1000, np.int16)
    arr[5:20, 10:30, 10:40] = 40
    vol = volume_nodes.add_volume_node(scene, arr, GEOMETRIES["identity"], "CT")
    sn = slice_node_for(scene, "Axial")
    builder = slice_clicks.PromptBuilder(SHAPE, arr)
    centre_view_on(sn, geometry.ijk_to_ras_point(vol, (20, 20, 2)))  # slice k=2: air only
    t = slice_clicks.map_click(sn, vol, slice_clicks.ras_to_xy(sn, geometry.ijk_to_ras_point(vol, (20, 20, 2)))[:2])
    with pytest.raises(PromptError, match="only air"):
        builder.add_point(t)
    assert builder.is_empty()
    arr2 = arr.copy()
    arr2[2] = 0  # constant padding slice
    with pytest.raises(PromptError, match="empty"):
        slice_clicks.check_slice_not_empty(arr2, "k", 2)


def test_session_click_errors_come_back_as_messages_and_leave_scene_unchanged(scene):
    """Through the effect logic: no exception leaks, nothing is added to the scene."""
    arr = np.full(SHAPE, -1000, np.int16)
    arr[5:20, 10:30, 10:40] = 40
    vol = volume_nodes.add_volume_node(scene, arr, GEOMETRIES["identity"], "CT")
    sn = slice_node_for(scene, "Axial", fov_mm=800)
    session = effect_logic.SegmentAnythingSession(scene=scene, client_factory=lambda s: pytest.fail("no worker needed"))
    n_nodes = scene.GetNumberOfNodes()
    out = session.click(sn, (5, 5))
    assert not out.ok and "no source volume" in out.message
    assert session.set_volume_node(vol).ok
    centre_view_on(sn, geometry.ijk_to_ras_point(vol, (20, 20, 2)))
    out = session.click(sn, (2, 2))
    assert not out.ok and "outside the volume" in out.message
    out = session.click(sn, slice_clicks.ras_to_xy(sn, geometry.ijk_to_ras_point(vol, (20, 20, 2)))[:2])
    assert not out.ok and "only air" in out.message
    assert not session.has_prompts()
    assert scene.GetNumberOfNodes() == n_nodes
    bad = volume_nodes.add_volume_node(scene, np.zeros((1, 8, 8), np.int16), np.eye(4), "2D")
    out = session.set_volume_node(bad)
    assert not out.ok and "2D" in out.message
    assert session.volume_node is vol  # the previous source volume is kept


@pytest.mark.parametrize("orientation", ["Axial", "Coronal", "Sagittal"])
@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_drag_box_and_points_build_prompts(scene, name, orientation):
    vol = add_ct(scene, GEOMETRIES[name], SHAPE)
    sn = slice_node_for(scene, orientation, vol if name == "oblique" else None)
    centre_view_on(sn, geometry.ijk_to_ras_point(vol, VOXEL))
    axis, _ = slice_clicks.slice_axis_for_view(sn, vol)
    c = "ijk".index(axis)
    corner_a = np.array(VOXEL, float)
    corner_b = np.array(VOXEL, float)
    in_plane = [n for n in range(3) if n != c]
    corner_a[in_plane] -= 4
    corner_b[in_plane] += 5
    xy_a = slice_clicks.ras_to_xy(sn, geometry.ijk_to_ras_point(vol, corner_a))[:2]
    xy_b = slice_clicks.ras_to_xy(sn, geometry.ijk_to_ras_point(vol, corner_b))[:2]
    builder = slice_clicks.PromptBuilder(SHAPE, volume_nodes.array_from_volume_node(vol))
    a = slice_clicks.map_click(sn, vol, xy_a)
    b = slice_clicks.map_click(sn, vol, xy_b, slice_axis=a.slice_axis)
    builder.set_box(a, b)
    builder.add_point(slice_clicks.map_click(sn, vol, slice_clicks.ras_to_xy(sn, geometry.ijk_to_ras_point(vol, VOXEL))[:2]))
    neg = np.array(VOXEL, float)
    neg[in_plane[0]] += 3
    builder.add_point(slice_clicks.map_click(sn, vol, slice_clicks.ras_to_xy(sn, geometry.ijk_to_ras_point(vol, neg))[:2]),
                      positive=False)
    p = builder.prompts_on_slice()
    assert p.slice_axis == axis
    np.testing.assert_allclose(p.box.lo(), np.minimum(corner_a, corner_b), atol=1e-6)
    np.testing.assert_allclose(p.box.hi(), np.maximum(corner_a, corner_b), atol=1e-6)
    np.testing.assert_allclose(p.positive[0], VOXEL, atol=1e-6)
    np.testing.assert_allclose(p.negative[0], neg, atol=1e-6)
    assert p.slice_indices() == [VOXEL[c]]


def test_new_view_orientation_starts_over(scene):
    vol = add_ct(scene, GEOMETRIES["identity"], SHAPE)
    builder = slice_clicks.PromptBuilder(SHAPE, volume_nodes.array_from_volume_node(vol))
    ras = geometry.ijk_to_ras_point(vol, VOXEL)
    for orientation in ("Axial", "Coronal"):
        sn = slice_node_for(scene, orientation)
        centre_view_on(sn, ras)
        note = builder.add_point(slice_clicks.map_click(sn, vol, slice_clicks.ras_to_xy(sn, ras)[:2]))
    assert "started over" in note
    assert builder.slice_axis == "j" and len(builder.positive) == 1


def test_a_correction_point_in_another_view_joins_the_prompts(scene):
    """A point clicked in another view to correct a 3D result keeps the prompts (and their axis); on
    no prompts it starts them, as a point does; on an empty slice it is a message."""
    arr = np.full(SHAPE, -1000, np.int16)
    arr[5:20, 10:30, 10:40] = 40  # tissue; coronal slice j=2 is air only
    vol = volume_nodes.add_volume_node(scene, arr, GEOMETRIES["identity"], "CT")
    builder = slice_clicks.PromptBuilder(SHAPE, arr)
    ras = geometry.ijk_to_ras_point(vol, VOXEL)
    axial, coronal = slice_node_for(scene, "Axial"), slice_node_for(scene, "Coronal")
    for sn in (axial, coronal):
        centre_view_on(sn, ras)
    target = slice_clicks.map_click(coronal, vol, slice_clicks.ras_to_xy(coronal, ras)[:2])
    assert builder.add_correction_point(target) == "" and builder.slice_axis == "j"  # nothing to join: a start
    builder.clear()
    builder.add_point(slice_clicks.map_click(axial, vol, slice_clicks.ras_to_xy(axial, ras)[:2]))
    note = builder.add_correction_point(target, positive=False)
    assert "started over" not in note and builder.slice_axis == "k"
    assert len(builder.positive) == 1 and len(builder.negative) == 1
    np.testing.assert_allclose(builder.negative[0], VOXEL, atol=1e-6)
    air = geometry.ijk_to_ras_point(vol, (VOXEL[0], 2, VOXEL[2]))
    centre_view_on(coronal, air)
    with pytest.raises(PromptError, match="only air"):
        builder.add_correction_point(slice_clicks.map_click(coronal, vol, slice_clicks.ras_to_xy(coronal, air)[:2]))
    assert len(builder.negative) == 1


def test_tiny_box_is_a_message(scene):
    vol = add_ct(scene, GEOMETRIES["identity"], SHAPE)
    sn = slice_node_for(scene, "Axial")
    ras = geometry.ijk_to_ras_point(vol, VOXEL)
    centre_view_on(sn, ras)
    xy = slice_clicks.ras_to_xy(sn, ras)[:2]
    a = slice_clicks.map_click(sn, vol, xy)
    b = slice_clicks.map_click(sn, vol, xy + 0.5)
    with pytest.raises(PromptError, match="too small"):
        slice_clicks.PromptBuilder(SHAPE).set_box(a, b)


# -- the effect's mouse mapping (slice_clicks.ClickTracker) ------------------------------------------

def events(tracker, sequence, view="red"):
    """Feed (event name, xy, modifiers) to the tracker; the actions."""
    return [tracker.event(name, xy, view, **mods) for name, xy, mods in sequence]


def test_a_quick_second_click_arrives_as_a_double_click_and_is_a_point():
    """Qt sends press, release, double-click (instead of the 2nd press), release: both are points,
    and the double-click is consumed (Slicer would maximize or restore the view on it)."""
    t = slice_clicks.ClickTracker()
    acts = events(t, [("LeftButtonPressEvent", (100, 100), {}), ("LeftButtonReleaseEvent", (101, 100), {}),
                      ("LeftButtonDoubleClickEvent", (140, 120), {}), ("LeftButtonReleaseEvent", (140, 121), {})])
    assert [a.consume for a in acts] == [True, True, True, True]
    clicks = [a for a in acts if a.kind == "click"]
    assert [(c.start, c.positive) for c in clicks] == [((100, 100), True), ((140, 120), True)]


def test_drag_is_a_box_with_a_rubber_band_and_everything_consumed():
    t = slice_clicks.ClickTracker()
    acts = events(t, [("LeftButtonPressEvent", (10, 10), {}), ("MouseMoveEvent", (30, 12), {}),
                      ("MouseMoveEvent", (60, 50), {}), ("LeftButtonReleaseEvent", (60, 50), {})])
    assert all(a.consume for a in acts)
    assert [a.kind for a in acts] == ["", "rubber_band", "rubber_band", "box"]
    assert acts[-1].start == (10, 10) and acts[-1].end == (60, 50)


def test_shift_drag_stays_slicers_pan_and_shift_move_its_crosshair():
    t = slice_clicks.ClickTracker()
    acts = events(t, [("MouseMoveEvent", (5, 5), {"shift": True}),
                      ("LeftButtonPressEvent", (10, 10), {"shift": True}), ("MouseMoveEvent", (60, 50), {"shift": True}),
                      ("LeftButtonReleaseEvent", (60, 50), {"shift": True}),
                      ("LeftButtonPressEvent", (10, 10), {"shift": True}),
                      ("LeftButtonReleaseEvent", (10, 10), {"shift": True})])
    assert not any(a.consume for a in acts) and not any(a.kind for a in acts)


def test_ctrl_click_is_a_negative_point_and_ctrl_drag_stays_slicers_blend():
    t = slice_clicks.ClickTracker()
    click = events(t, [("LeftButtonPressEvent", (20, 20), {"ctrl": True}),
                       ("LeftButtonReleaseEvent", (21, 19), {"ctrl": True})])
    assert not any(a.consume for a in click)  # Slicer sees the press and release too (a blend of zero motion)
    assert click[-1].kind == "click" and not click[-1].positive and click[-1].start == (20, 20)
    drag = events(t, [("LeftButtonPressEvent", (20, 20), {"ctrl": True}), ("MouseMoveEvent", (80, 20), {"ctrl": True}),
                      ("MouseMoveEvent", (22, 20), {"ctrl": True}), ("LeftButtonReleaseEvent", (22, 20), {"ctrl": True})])
    assert not any(a.consume for a in drag) and not any(a.kind for a in drag)
    quick = events(t, [("LeftButtonDoubleClickEvent", (50, 50), {"ctrl": True}),
                       ("LeftButtonReleaseEvent", (50, 50), {"ctrl": True})])
    assert quick[-1].kind == "click" and not quick[-1].positive and not any(a.consume for a in quick)


def test_alt_and_other_combinations_are_left_alone():
    t = slice_clicks.ClickTracker()
    for mods in ({"alt": True}, {"ctrl": True, "alt": True}, {"ctrl": True, "shift": True},
                 {"shift": True, "alt": True}):
        acts = events(t, [("LeftButtonPressEvent", (20, 20), mods), ("MouseMoveEvent", (40, 40), mods),
                          ("LeftButtonReleaseEvent", (20, 20), mods)])
        assert not any(a.consume for a in acts) and not any(a.kind for a in acts), mods


def test_events_of_another_view_or_without_a_press_are_not_taken():
    t = slice_clicks.ClickTracker()
    assert not t.event("MouseMoveEvent", (1, 1), "red").consume
    assert not t.event("LeftButtonReleaseEvent", (1, 1), "red").consume
    assert t.event("LeftButtonPressEvent", (10, 10), "red").consume
    assert not t.event("MouseMoveEvent", (50, 50), "green").consume
    assert t.event("LeftButtonReleaseEvent", (10, 10), "red").kind == "click"
    assert not t.event("RightButtonPressEvent", (10, 10), "red").consume


def test_event_names_are_vtks():
    import vtk

    for name in ("LeftButtonPressEvent", "LeftButtonDoubleClickEvent", "LeftButtonReleaseEvent", "MouseMoveEvent"):
        assert vtk.vtkCommand.GetStringFromEventId(getattr(vtk.vtkCommand, name)) == name
