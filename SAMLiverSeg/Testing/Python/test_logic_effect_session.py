"""The effect session's handling of bad input: each case is a message, and the scene is unchanged."""

import threading
import time

import numpy as np
import pytest

import slicer
from slicer_test_helpers import GEOMETRIES, add_ct, blob_ct, centre_view_on, slice_node_for

from SAMLiverSegLogic import effect_logic, geometry, segment_writer, slice_clicks, volume_nodes

SHAPE = (12, 40, 48)


def scene_snapshot(scene):
    return [scene.GetNthNode(n).GetID() for n in range(scene.GetNumberOfNodes())]


def box_xy(sn, vol, lo, hi):
    return (slice_clicks.ras_to_xy(sn, geometry.ijk_to_ras_point(vol, lo))[:2],
            slice_clicks.ras_to_xy(sn, geometry.ijk_to_ras_point(vol, hi))[:2])


def test_non_ct_range_is_reported_with_a_custom_window(scene):
    mr = np.random.default_rng(0).uniform(0, 900, SHAPE).astype(np.float32)
    vol = volume_nodes.add_volume_node(scene, mr, GEOMETRIES["identity"], "MR")
    session = effect_logic.SegmentAnythingSession(engine_factory=lambda s: pytest.fail("no model needed"))
    out = session.set_volume_node(vol)
    assert out.ok and "custom window" in out.message
    assert not session.intensity_check.looks_like_ct and "," in session.intensity_check.suggested_window


def test_apply_without_preview_or_segment_is_a_message(scene):
    vol = add_ct(scene, GEOMETRIES["identity"], SHAPE)
    seg = volume_nodes.add_segmentation_node(scene, vol)
    editor = segment_writer.create_editor(scene, seg, vol)
    session = effect_logic.SegmentAnythingSession(engine_factory=lambda s: pytest.fail("no model needed"))
    session.set_volume_node(vol)
    before = scene_snapshot(scene)
    out = session.apply(editor.target, seg, "")
    assert not out.ok and "nothing to apply" in out.message
    session.preview, session.preview_is_3d = np.ones(SHAPE, np.uint8), True
    out = session.apply(editor.target, seg, "")
    assert not out.ok and "no segment selected" in out.message
    assert not editor.logic.CanUndo() and scene_snapshot(scene) == before


def test_propagate_without_prompts_is_a_message(scene):
    vol = add_ct(scene, GEOMETRIES["identity"], SHAPE)
    session = effect_logic.SegmentAnythingSession(engine_factory=lambda s: pytest.fail("no model needed"))
    session.set_volume_node(vol)
    out = session.propagate()
    assert not out.ok and "no prompt" in out.message


def test_missing_checkpoint_is_a_message(scene, tmp_path, monkeypatch):
    """A model whose weights are not there: the message says where to put the file."""
    monkeypatch.setenv("SAMLIVERSEG_CACHE", str(tmp_path))  # an empty weights cache
    vol = add_ct(scene, GEOMETRIES["anisotropic"], SHAPE)
    sn = slice_node_for(scene, "Axial")
    centre_view_on(sn, geometry.ijk_to_ras_point(vol, (24, 20, 6)))
    session = effect_logic.SegmentAnythingSession(effect_logic.EngineSettings(model="sam_vit_b", device="cpu"))
    assert session.set_volume_node(vol).ok
    before = scene_snapshot(scene)
    out = session.drag_box(sn, *box_xy(sn, vol, (10, 10, 6), (30, 28, 6)))
    assert not out.ok
    assert "missing" in out.message and "sam_vit_b" in out.message and str(tmp_path) in out.message
    assert session.preview is None and scene_snapshot(scene) == before


@pytest.fixture(scope="module")
def cpu_engine():
    from samliverseg.interactive.engine import PromptEngine

    return PromptEngine(model="lite_medsam", device="cpu")


def test_cuda_out_of_memory_falls_back_to_cpu(scene, cpu_engine):
    """The GPU engine raises torch's real OOM error; the session retries on the CPU and says so."""
    import torch

    made = []

    class GpuThatRunsOutOfMemory:
        spec = cpu_engine.spec

        def set_volume(self, volume):
            pass

        def segment_slice(self, prompts):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def factory(settings):
        made.append(settings.device)
        return cpu_engine if settings.device == "cpu" else GpuThatRunsOutOfMemory()

    vol = add_ct(scene, GEOMETRIES["identity"], SHAPE)
    sn = slice_node_for(scene, "Axial")
    centre_view_on(sn, geometry.ijk_to_ras_point(vol, (24, 20, 6)))
    session = effect_logic.SegmentAnythingSession(effect_logic.EngineSettings(device="cuda"), engine_factory=factory)
    session.set_volume_node(vol)
    out = session.drag_box(sn, *box_xy(sn, vol, (8, 8, 6), (36, 32, 6)))
    assert out.ok, out.message
    assert made == ["cuda", "cpu"] and session.settings.device == "cpu"
    assert any("out of memory" in n and "CPU" in n for n in session.notes)


def test_background_task_progress_cancel_and_errors():
    def work(progress, cancel):
        for n in range(100):
            if cancel.is_set():
                return "cancelled"
            progress(n + 1, 100)
            time.sleep(0.01)
        return "done"

    task = effect_logic.BackgroundTask(work).start()
    time.sleep(0.1)
    assert not task.done() and task.progress[1] == 100
    task.cancel()
    assert task.wait(5) and task.result == "cancelled"

    failing = effect_logic.BackgroundTask(lambda p, c: 1 / 0).start()
    assert failing.wait(5) and isinstance(failing.error, ZeroDivisionError)


def test_prompts_and_preview_stay_visible_until_cleared(scene):
    vol = add_ct(scene, GEOMETRIES["oblique"], SHAPE)
    builder = slice_clicks.PromptBuilder(SHAPE, blob_ct(SHAPE))
    sn = slice_node_for(scene, "Axial", vol)
    centre_view_on(sn, geometry.ijk_to_ras_point(vol, (24, 20, 6)))
    a, b = (slice_clicks.map_click(sn, vol, xy) for xy in box_xy(sn, vol, (10, 10, 6), (30, 28, 6)))
    builder.set_box(a, b)
    builder.add_point(slice_clicks.map_click(sn, vol, slice_clicks.ras_to_xy(sn, geometry.ijk_to_ras_point(vol, (20, 18, 6)))[:2]))
    display = effect_logic.PreviewDisplay(scene)
    display.show_prompts(vol, builder)
    mask = np.zeros(SHAPE, np.uint8)
    mask[6, 12:26, 14:28] = 1
    display.show_preview(vol, mask)
    np.testing.assert_array_equal(display.preview_mask(vol), mask)
    # the box is drawn in the volume's (oblique) axes, one voxel thick, around the dragged corners
    roi = display.box_node
    lo, hi = np.array(builder.box.lo()), np.array(builder.box.hi())
    from SAMLiverSegLogic import markups_prompts

    blo, bhi = markups_prompts.roi_ijk_bounds(roi, vol)
    np.testing.assert_allclose(blo[:2], lo[:2], atol=1e-3)
    np.testing.assert_allclose(bhi[:2], hi[:2], atol=1e-3)
    np.testing.assert_allclose([blo[2], bhi[2]], [5.5, 6.5], atol=1e-3)
    ids = [display.preview_node.GetID(), display.positive_node.GetID(), display.box_node.GetID()]
    assert all(scene.GetNodeByID(i) is not None for i in ids)
    display.clear()
    assert all(scene.GetNodeByID(i) is None for i in ids)


def test_module_logic_bad_prompts_leave_the_segmentation_alone(scene):
    from samliverseg.core.errors import PromptError
    from SAMLiverSegLogic import module_logic

    vol = add_ct(scene, GEOMETRIES["flipped"], SHAPE)
    seg = volume_nodes.add_segmentation_node(scene, vol)
    pts = slicer.vtkMRMLMarkupsFiducialNode()
    scene.AddNode(pts)
    pts.AddControlPoint(*geometry.ijk_to_ras_point(vol, (24, 20, 40)))  # k=40: outside (12 slices)
    before = scene_snapshot(scene)
    with pytest.raises(PromptError, match="outside the volume"):
        module_logic.segment_from_markups(scene, vol, seg, "liver", effect_logic.EngineSettings(device="cpu"),
                                          positive_node=pts, engine=object())
    assert seg.GetSegmentation().GetNumberOfSegments() == 0 and scene_snapshot(scene) == before
    with pytest.raises(Exception, match="unknown target"):
        module_logic.segment_from_markups(scene, vol, seg, "spleen", effect_logic.EngineSettings())


def test_models_are_opened_by_name_through_the_api(scene, tmp_path):
    """The effect opens any model by name (here a SAM-Med3D one, without the 2D window); the panel
    lists every model and refuses the ones it cannot prompt slice by slice."""
    import torch

    from samliverseg.core.errors import InputError
    from samliverseg.interactive.engine3d import Sam3DEngine
    from samliverseg.models.build_sam3d import build_sam_med3d_tiny
    from SAMLiverSegLogic import module_logic

    weights = tmp_path / "tiny3d.pth"
    torch.save(build_sam_med3d_tiny().state_dict(), weights)
    session = effect_logic.SegmentAnythingSession(effect_logic.EngineSettings(
        model="sam_med3d_tiny", checkpoint=str(weights), device="cpu", window="liver"))
    assert session.is_3d_model() and isinstance(session._ensure_engine(), Sam3DEngine)
    rows, cache = module_logic.model_rows()
    assert {"lite_medsam", "medsam", "sam_med3d", "sam_med3d_turbo"} <= {r.name for r in rows} and cache
    turbo = next(r for r in rows if r.name == "sam_med3d_turbo")
    assert turbo.present or "sam_med3d_turbo.pth" in turbo.where
    vol = add_ct(scene, GEOMETRIES["identity"], SHAPE)
    seg = volume_nodes.add_segmentation_node(scene, vol)
    pts = slicer.vtkMRMLMarkupsFiducialNode()
    scene.AddNode(pts)
    pts.AddControlPoint(*geometry.ijk_to_ras_point(vol, (24, 20, 6)))
    with pytest.raises(InputError, match="3D model"):
        module_logic.segment_from_markups(scene, vol, seg, "liver",
                                          effect_logic.EngineSettings(model="sam_med3d_turbo", device="cpu"),
                                          positive_node=pts)
    assert seg.GetSegmentation().GetNumberOfSegments() == 0


def test_window_choices():
    from samliverseg.core.errors import InputError
    from SAMLiverSegLogic import module_logic

    assert module_logic.window_spec("model") is None
    assert module_logic.window_spec("liver") == "liver"
    assert module_logic.window_spec("custom", " -200 , 300 ") == "-200,300"
    for bad in ("", "300,-200", "abc", "1,2,3"):
        with pytest.raises(InputError):
            module_logic.window_spec("custom", bad)
