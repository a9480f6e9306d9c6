"""Markups point lists and ROIs in the scene -> IJK prompts of a volume."""

import json

import numpy as np
import pytest
import vtk

import slicer
from slicer_test_helpers import GEOMETRIES, add_ct, roi_in_volume_axes

from samliverseg.core.errors import PromptError
from samliverseg.core.prompts import Roi3D
from SAMLiverSegLogic import geometry, markups_prompts, volume_nodes

SHAPE = (24, 40, 48)


def point_list(scene, vol, ijk_points, name="points", labels=None):
    node = slicer.vtkMRMLMarkupsFiducialNode()
    node.SetName(name)
    scene.AddNode(node)
    for n, ijk in enumerate(ijk_points):
        idx = node.AddControlPointWorld(vtk.vtkVector3d(*geometry.ijk_to_ras_point(vol, ijk)))
        if labels:
            node.SetNthControlPointLabel(idx, labels[n])
    return node


def test_point_lists_to_prompts(scene, geometry_case):
    name, m = geometry_case
    vol = add_ct(scene, m, SHAPE)
    pos = point_list(scene, vol, [(30, 17, 11), (28.5, 16.25, 11), (10, 10, 5)], labels=["a", "b", "-c"])
    neg = point_list(scene, vol, [(33, 20, 11)], name="extra")
    p = markups_prompts.prompts_from_point_lists(vol, pos, neg)
    np.testing.assert_allclose(p.positive, [(30, 17, 11), (28.5, 16.25, 11)], atol=1e-6)
    np.testing.assert_allclose(p.negative, [(10, 10, 5), (33, 20, 11)], atol=1e-6)


def test_negative_list_by_name_and_description(scene):
    vol = add_ct(scene, GEOMETRIES["identity"], SHAPE)
    bg = point_list(scene, vol, [(5, 5, 5), (6, 6, 6)], name="background")
    bg.SetNthControlPointDescription(1, "positive")
    p = markups_prompts.prompts_from_point_lists(vol, bg)
    np.testing.assert_allclose(p.negative, [(5, 5, 5)])
    np.testing.assert_allclose(p.positive, [(6, 6, 6)])


def test_points_under_a_transform(scene):
    vol = add_ct(scene, GEOMETRIES["oblique"], SHAPE)
    t = slicer.vtkMRMLLinearTransformNode()
    scene.AddNode(t)
    t.SetMatrixTransformToParent(geometry.vtk_matrix_from_array(
        np.array([[0, -1, 0, 5.0], [1, 0, 0, 0], [0, 0, 1, -3.0], [0, 0, 0, 1]])))
    pts = point_list(scene, vol, [])
    pts.SetAndObserveTransformNodeID(t.GetID())
    # place the point so that its *world* position is voxel (20, 15, 9)
    world = geometry.ijk_to_ras_point(vol, (20, 15, 9))
    local = np.linalg.inv(geometry.node_to_world(pts)) @ np.array([*world, 1.0])
    pts.AddControlPoint(vtk.vtkVector3d(*local[:3]))
    p = markups_prompts.prompts_from_point_lists(vol, pts)
    np.testing.assert_allclose(p.positive[0], (20, 15, 9), atol=1e-6)


def test_point_outside_volume_is_a_message(scene):
    vol = add_ct(scene, GEOMETRIES["anisotropic"], SHAPE)
    pts = point_list(scene, vol, [(30, 17, 11), (30, 17, 40)])
    with pytest.raises(PromptError, match="outside the volume"):
        markups_prompts.prompts_from_point_lists(vol, pts)


def test_empty_point_list_is_a_message(scene):
    vol = add_ct(scene, GEOMETRIES["identity"], SHAPE)
    with pytest.raises(PromptError, match="no placed points"):
        markups_prompts.prompts_from_point_lists(vol, point_list(scene, vol, []))
    with pytest.raises(PromptError, match="no prompt"):
        markups_prompts.prompts_from_markups(vol)


def test_roi_to_roi3d(scene, geometry_case):
    name, m = geometry_case
    vol = add_ct(scene, m, SHAPE)
    roi = roi_in_volume_axes(scene, vol, (10, 8, 4), (30, 25, 16))
    p = markups_prompts.prompts_from_roi(roi, vol)
    assert p.roi == Roi3D(10, 8, 4, 30, 25, 16)
    assert p.box is None


def test_axis_aligned_roi_on_oblique_volume_is_the_box_around_it(scene):
    vol = add_ct(scene, GEOMETRIES["oblique"], SHAPE)
    centre = geometry.ijk_to_ras_point(vol, (24, 20, 12))
    roi = slicer.vtkMRMLMarkupsROINode()
    scene.AddNode(roi)
    roi.SetCenter(*centre)
    roi.SetSize(10, 10, 10)
    p = markups_prompts.prompts_from_roi(roi, vol)
    lo, hi = markups_prompts.roi_ijk_bounds(roi, vol)
    assert p.roi == Roi3D(*np.floor(lo + 1e-3), *np.ceil(hi - 1e-3))
    # the rotated cube's voxel box is larger than the cube's own 10 mm / spacing
    assert (p.roi.i1 - p.roi.i0) > 10 / 0.9


def save_roi(scene, roi, path):
    storage = slicer.vtkMRMLMarkupsROIJsonStorageNode()  # the storage node Slicer saves ROIs with
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.WriteData(roi)
    return str(path)


def test_roi_matches_the_core_library_reading_the_same_roi_from_a_file(scene, tmp_path, geometry_case):
    """The module (scene ROI) and the CLI (--prompts roi.mrk.json) give the same Roi3D."""
    from samliverseg.io import markups as core_markups

    name, m = geometry_case
    vol_node = add_ct(scene, m, SHAPE)
    roi = roi_in_volume_axes(scene, vol_node, (10.3, 8.2, 4.4), (30.4, 25.6, 15.7))
    core = core_markups.markups_to_prompts(save_roi(scene, roi, tmp_path / "roi.mrk.json"),
                                           volume_nodes.volume_from_node(vol_node))
    assert markups_prompts.prompts_from_roi(roi, vol_node).roi == core.roi == Roi3D(10, 8, 4, 31, 26, 16)


def test_roi_faces_on_voxel_centres_survive_float32_storage(scene, tmp_path, geometry_case):
    """Slicer stores control points as float32: a face placed on a voxel centre comes back ~4e-6
    voxel off. The module and the core library's reading of the saved file (both with a 1e-3
    voxel tolerance) keep exactly the voxels meant, not one more."""
    from samliverseg.io import markups as core_markups

    name, m = geometry_case
    vol_node = add_ct(scene, m, SHAPE)
    roi = roi_in_volume_axes(scene, vol_node, (10, 8, 4), (30, 25, 16))
    assert markups_prompts.prompts_from_roi(roi, vol_node).roi == Roi3D(10, 8, 4, 30, 25, 16)
    core = core_markups.markups_to_prompts(save_roi(scene, roi, tmp_path / "roi.mrk.json"),
                                           volume_nodes.volume_from_node(vol_node)).roi
    assert core == Roi3D(10, 8, 4, 30, 25, 16)


def test_flat_roi_is_a_box_on_that_slice(scene):
    vol = add_ct(scene, GEOMETRIES["anisotropic"], SHAPE)
    roi = roi_in_volume_axes(scene, vol, (10, 8, 11), (30, 25, 11))
    p = markups_prompts.prompts_from_roi(roi, vol)
    assert p.roi is None and p.slice_axis == "k"
    assert p.box.lo() == (10.0, 8.0, 11.0) and p.box.hi() == (30.0, 25.0, 11.0)


def test_roi_outside_or_unplaced_is_a_message(scene):
    vol = add_ct(scene, GEOMETRIES["identity"], SHAPE)
    roi = roi_in_volume_axes(scene, vol, (100, 100, 100), (120, 120, 120))
    with pytest.raises(PromptError, match="outside the volume"):
        markups_prompts.prompts_from_roi(roi, vol)
    empty = slicer.vtkMRMLMarkupsROINode()
    scene.AddNode(empty)
    with pytest.raises(PromptError, match="not placed"):
        markups_prompts.prompts_from_roi(empty, vol)


def test_roi_and_points_combined(scene):
    vol = add_ct(scene, GEOMETRIES["identity"], SHAPE)
    roi = roi_in_volume_axes(scene, vol, (10, 8, 4), (30, 25, 16))
    neg = point_list(scene, vol, [(12, 10, 10)], name="exclude")
    p = markups_prompts.prompts_from_markups(vol, roi_node=roi, positive_node=neg)
    assert p.roi == Roi3D(10, 8, 4, 30, 25, 16)
    np.testing.assert_allclose(p.negative, [(12, 10, 10)])


def test_prompt_points_shown_as_markups(scene):
    vol = add_ct(scene, GEOMETRIES["oblique"], SHAPE)
    node = slicer.vtkMRMLMarkupsFiducialNode()
    scene.AddNode(node)
    markups_prompts.add_points_to_markups(node, vol, [(30, 17, 11), (3.5, 4, 5)], "+")
    assert node.GetNumberOfControlPoints() == 2 and node.GetNthControlPointLabel(1) == "+2"
    p = markups_prompts.prompts_from_point_lists(vol, node)
    np.testing.assert_allclose(p.positive, [(30, 17, 11), (3.5, 4, 5)], atol=1e-6)


def scene_with_markups_logic(scene):
    """A scene as Slicer's has it: the selection and interaction singletons, and the real Markups
    logic observing the scene (it makes every added markups node the active place node)."""
    selection = slicer.vtkMRMLSelectionNode()
    selection.SetSingletonTag("Singleton")
    scene.AddNode(selection)
    interaction = slicer.vtkMRMLInteractionNode()
    interaction.SetSingletonTag("Singleton")
    scene.AddNode(interaction)
    logic = slicer.vtkSlicerMarkupsLogic()
    logic.SetMRMLScene(scene)
    return selection, interaction, logic


def test_the_effects_prompt_nodes_do_not_take_the_users_place_tool(scene):
    """Issue 11, item 5: the hidden prompt points and box must not become the active place node."""
    from SAMLiverSegLogic import effect_logic, slice_clicks

    selection, interaction, logic = scene_with_markups_logic(scene)
    vol = add_ct(scene, GEOMETRIES["oblique"], SHAPE)
    user = point_list(scene, vol, [(20, 18, 11)], name="my landmarks")
    assert selection.GetActivePlaceNodeID() == user.GetID()  # Slicer made the user's list active
    interaction.SetPlaceModePersistence(1)
    interaction.SetCurrentInteractionMode(slicer.vtkMRMLInteractionNode.Place)

    # the real Markups logic does take over a node added plainly (the defect)
    plain = slicer.vtkMRMLMarkupsROINode()
    scene.AddNode(plain)
    assert selection.GetActivePlaceNodeID() == plain.GetID()
    assert selection.GetActivePlaceNodeClassName() == "vtkMRMLMarkupsROINode"
    scene.RemoveNode(plain)
    selection.SetReferenceActivePlaceNodeClassName("vtkMRMLMarkupsFiducialNode")
    selection.SetReferenceActivePlaceNodeID(user.GetID())

    builder = slice_clicks.PromptBuilder(SHAPE)
    builder.slice_axis, builder.current_slice = "k", 11
    builder.positive, builder.negative = [(20.0, 18.0, 11.0)], [(25.0, 20.0, 11.0)]
    from samliverseg.core.prompts import SliceBox

    builder.box = SliceBox((10.0, 10.0, 11.0), (30.0, 28.0, 11.0))
    display = effect_logic.PreviewDisplay(scene)
    display.show_prompts(vol, builder)
    assert display.positive_node.GetNumberOfControlPoints() == 1 and display.box_node is not None
    assert selection.GetActivePlaceNodeID() == user.GetID()
    assert selection.GetActivePlaceNodeClassName() == "vtkMRMLMarkupsFiducialNode"
    assert interaction.GetCurrentInteractionMode() == slicer.vtkMRMLInteractionNode.Place
    assert interaction.GetPlaceModePersistence() == 1
    # the place tool still adds to the user's list
    assert logic.AddControlPoint(1.0, 2.0, 3.0) == 1 and user.GetNumberOfControlPoints() == 2
    display.clear()
    assert selection.GetActivePlaceNodeID() == user.GetID()
