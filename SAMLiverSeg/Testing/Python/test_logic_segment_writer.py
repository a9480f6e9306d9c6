"""Masks into segments: undo, editable area, overwrite mode - through vtkSlicerSegmentEditorLogic
(Slicer 5.10+) and through the Slicer 5.8 path without it (``LabelmapTarget``: forced by
``create_editor(use_editor_logic=False)``), which must give the same segments."""

import numpy as np
import pytest

import slicer
from slicer_test_helpers import GEOMETRIES, add_ct

from samliverseg.core.errors import InputError
from SAMLiverSegLogic import segment_writer, volume_nodes

SHAPE = (12, 16, 20)


def block(lo, hi):
    m = np.zeros(SHAPE, np.uint8)
    m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = 1
    return m


WRITERS = {"editor_logic": True, "slicer58": False}


@pytest.fixture(params=list(WRITERS))
def writer(request):
    return WRITERS[request.param]


@pytest.fixture
def setup(scene, geometry_case, writer):
    name, m = geometry_case
    vol = add_ct(scene, m, SHAPE)
    seg = volume_nodes.add_segmentation_node(scene, vol)
    ids = {n: volume_nodes.add_segment(seg, n) for n in ("Liver", "Other", "Hidden")}
    editor = segment_writer.create_editor(scene, seg, vol, use_editor_logic=writer)
    assert (editor.logic is not None) == writer
    segment_writer.configure_editing(editor.node, "everywhere", overwrite="none")
    t = editor.target
    # initial content, written without undo
    segment_writer.write_mask(t, block((2, 2, 2), (6, 9, 9)), vol, seg, ids["Liver"], "set", save_undo=False)
    segment_writer.write_mask(t, block((4, 0, 0), (9, 16, 8)), vol, seg, ids["Other"], "set", save_undo=False)
    segment_writer.write_mask(t, block((0, 10, 10), (12, 14, 18)), vol, seg, ids["Hidden"], "set", save_undo=False)
    seg.GetDisplayNode().SetSegmentVisibility(ids["Hidden"], False)
    return vol, seg, ids, editor


def masks(seg, vol):
    return {seg.GetSegmentation().GetSegment(i).GetName(): m for i, m in volume_nodes.all_segment_masks(seg, vol).items()}


NEW = block((3, 4, 5), (10, 13, 16))  # overlaps all three segments


def test_initial_content_is_exact(setup):
    vol, seg, ids, editor = setup
    got = masks(seg, vol)
    np.testing.assert_array_equal(got["Liver"], block((2, 2, 2), (6, 9, 9)))
    np.testing.assert_array_equal(got["Other"], block((4, 0, 0), (9, 16, 8)))
    np.testing.assert_array_equal(got["Hidden"], block((0, 10, 10), (12, 14, 18)))


@pytest.mark.parametrize("mode", ["set", "add", "remove", "replace_slices"])
def test_undo_restores_exactly(setup, mode):
    vol, seg, ids, editor = setup
    segment_writer.configure_editing(editor.node, "everywhere", overwrite="all")
    before = masks(seg, vol)
    segment_writer.write_mask(editor.target, NEW, vol, seg, ids["Liver"], mode, slice_axis="k")
    after = masks(seg, vol)
    assert any(not np.array_equal(before[k], after[k]) for k in before)
    expected = {"set": NEW, "add": before["Liver"] | NEW, "remove": before["Liver"] & ~NEW}.get(mode)
    if mode == "replace_slices":
        expected = before["Liver"].copy()
        expected[3:10] = NEW[3:10]
    np.testing.assert_array_equal(after["Liver"], expected)
    editor.target.undo()
    restored = masks(seg, vol)
    for name in before:
        np.testing.assert_array_equal(restored[name], before[name], err_msg=name)
    editor.target.redo()
    for name, m in masks(seg, vol).items():
        np.testing.assert_array_equal(m, after[name], err_msg=name)


def test_inside_another_segment_keeps_voxels_outside_untouched(setup):
    vol, seg, ids, editor = setup
    before = masks(seg, vol)
    segment_writer.configure_editing(editor.node, "inside_segment", mask_segment_id=ids["Other"], overwrite="none")
    segment_writer.write_mask(editor.target, NEW, vol, seg, ids["Liver"], "add")
    after = masks(seg, vol)
    inside = before["Other"].astype(bool)
    np.testing.assert_array_equal(after["Liver"][~inside], before["Liver"][~inside])  # untouched outside
    np.testing.assert_array_equal(after["Liver"][inside], (before["Liver"] | NEW)[inside])
    for name in ("Other", "Hidden"):
        np.testing.assert_array_equal(after[name], before[name])


def test_inside_another_segment_with_set_keeps_outside(setup):
    """'set' replaces the segment only where editing is allowed (Slicer's rule for masked Set)."""
    vol, seg, ids, editor = setup
    before = masks(seg, vol)
    segment_writer.configure_editing(editor.node, "inside_segment", mask_segment_id=ids["Other"], overwrite="none")
    segment_writer.write_mask(editor.target, NEW, vol, seg, ids["Liver"], "set")
    after = masks(seg, vol)
    inside = before["Other"].astype(bool)
    np.testing.assert_array_equal(after["Liver"][~inside], before["Liver"][~inside])
    np.testing.assert_array_equal(after["Liver"][inside], NEW[inside])


def test_outside_all_segments(setup):
    vol, seg, ids, editor = setup
    before = masks(seg, vol)
    segment_writer.configure_editing(editor.node, "outside_all", overwrite="none")
    segment_writer.write_mask(editor.target, NEW, vol, seg, ids["Liver"], "add")
    after = masks(seg, vol)
    others = (before["Other"] | before["Hidden"]).astype(bool)
    np.testing.assert_array_equal(after["Liver"][others & ~before["Liver"].astype(bool)], 0)
    np.testing.assert_array_equal(after["Liver"], before["Liver"] | (NEW & ~others))


@pytest.mark.parametrize("overwrite,other_loses,hidden_loses", [("all", True, True), ("visible", True, False),
                                                                 ("none", False, False)])
def test_overwrite_modes(setup, overwrite, other_loses, hidden_loses):
    vol, seg, ids, editor = setup
    before = masks(seg, vol)
    segment_writer.configure_editing(editor.node, "everywhere", overwrite=overwrite)
    segment_writer.write_mask(editor.target, NEW, vol, seg, ids["Liver"], "add")
    after = masks(seg, vol)
    np.testing.assert_array_equal(after["Liver"], before["Liver"] | NEW)
    np.testing.assert_array_equal(after["Other"], before["Other"] & ~NEW if other_loses else before["Other"])
    np.testing.assert_array_equal(after["Hidden"], before["Hidden"] & ~NEW if hidden_loses else before["Hidden"])


def test_intensity_range_mask(setup):
    vol, seg, ids, editor = setup
    before = masks(seg, vol)
    arr = volume_nodes.array_from_volume_node(vol)
    segment_writer.configure_editing(editor.node, "everywhere", overwrite="none", intensity_range=(-200, 500))
    segment_writer.write_mask(editor.target, NEW, vol, seg, ids["Liver"], "add")
    allowed = (arr >= -200) & (arr <= 500)
    np.testing.assert_array_equal(masks(seg, vol)["Liver"], before["Liver"] | (NEW & allowed))


def test_bad_input_leaves_scene_and_undo_stack_unchanged(setup):
    vol, seg, ids, editor = setup
    before = masks(seg, vol)
    can_undo = editor.target.can_undo()
    with pytest.raises(InputError, match="shape"):
        segment_writer.write_mask(editor.target, np.ones((3, 3, 3), np.uint8), vol, seg, ids["Liver"], "add")
    with pytest.raises(InputError, match="no segment"):
        segment_writer.write_mask(editor.target, NEW, vol, seg, "nope", "add")
    with pytest.raises(InputError, match="no source volume"):
        segment_writer.write_mask(editor.target, NEW, None, seg, ids["Liver"], "add")
    with pytest.raises(InputError, match="unknown write mode"):
        segment_writer.write_mask(editor.target, NEW, vol, seg, ids["Liver"], "paint")
    with pytest.raises(InputError, match="inside a segment"):
        segment_writer.configure_editing(editor.node, "inside_segment")
    assert editor.target.can_undo() == can_undo
    for name, m in masks(seg, vol).items():
        np.testing.assert_array_equal(m, before[name])


def test_segmentation_on_another_grid(scene, writer):
    """The segmentation's geometry comes from a coarser volume: the mask is resampled onto it."""
    fine = add_ct(scene, GEOMETRIES["identity"], SHAPE, "fine")
    coarse_m = np.diag([2.0, 2.0, 2.0, 1.0])
    coarse = add_ct(scene, coarse_m, (6, 8, 10), "coarse")
    seg = volume_nodes.add_segmentation_node(scene, coarse)
    sid = volume_nodes.add_segment(seg, "Liver")
    editor = segment_writer.create_editor(scene, seg, fine, use_editor_logic=writer)
    mask = np.zeros(SHAPE, np.uint8)
    mask[2:8, 4:12, 6:16] = 1  # even-aligned block: exactly representable on the 2 mm grid
    segment_writer.write_mask(editor.target, mask, fine, seg, sid, "set")
    np.testing.assert_array_equal(volume_nodes.segment_mask(seg, sid, coarse), mask[::2, ::2, ::2])
