"""The effect session over a real inference worker (``samliverseg worker``, real LiteMedSAM) and a
real MRML scene (slicer-core), driven as Slicer drives it: requests are sent and return at once,
answers are taken when the worker's pipe is readable (``select()`` here, a QSocketNotifier in
Slicer), never with ``join()`` or a blocking wait.

What it shows: choosing a source volume copies and sends nothing; the first prompt sends the
volume; the preview and the propagation equal the in-process engine's for the same IJK prompts
(identity, flipped and oblique volumes); clearing drops a result in flight; a worker killed in the
middle of a request gives a one-line message, leaves the scene as it was, and the next prompt
restarts it and gives the same mask; bad input is a message and changes nothing.
"""

import os
import signal

import numpy as np
import pytest

import slicer
from slicer_test_helpers import GEOMETRIES, add_ct, centre_view_on, pump, slice_node_for

from SAMLiverSegLogic import effect_logic, geometry, segment_writer, slice_clicks, volume_nodes
from SAMLiverSegLogic.worker_client import WorkerClient

SHAPE = (12, 40, 48)  # k, j, i
BOX = ((10, 10, 6), (34, 30, 6))  # IJK corners on slice k=6


def scene_snapshot(scene):
    return [scene.GetNthNode(n).GetID() for n in range(scene.GetNumberOfNodes())]


def box_xy(sn, vol, lo, hi):
    return (slice_clicks.ras_to_xy(sn, geometry.ijk_to_ras_point(vol, lo))[:2],
            slice_clicks.ras_to_xy(sn, geometry.ijk_to_ras_point(vol, hi))[:2])


def point_xy(sn, vol, ijk):
    return slice_clicks.ras_to_xy(sn, geometry.ijk_to_ras_point(vol, ijk))[:2]


def finished(kind):
    return lambda outs: any(o.kind == kind for o in outs)


def session_on(scene, client, geometry_name="identity", shape=SHAPE):
    vol = add_ct(scene, GEOMETRIES[geometry_name], shape)
    session = effect_logic.SegmentAnythingSession(effect_logic.EngineSettings(device="cpu", backend="torch"),
                                                  scene, client_factory=lambda s: client)
    assert session.set_volume_node(vol).ok
    sn = slice_node_for(scene, "Axial", vol)
    centre_view_on(sn, geometry.ijk_to_ras_point(vol, (24, 20, 6)))
    return vol, session, sn


def in_process(engine, vol, prompts, propagate=False):
    engine.set_volume(volume_nodes.volume_from_node(vol))
    if propagate:
        return np.asarray(engine.segment(prompts, propagate=True).mask, np.uint8)
    mask = np.zeros(SHAPE, np.uint8)
    res = engine.segment_slice(prompts)
    slice_clicks.slice_array(mask, res.slice_axis, res.slice_index)[...] = res.mask
    return mask


def test_choosing_a_source_volume_copies_and_sends_nothing(scene):
    vol = add_ct(scene, GEOMETRIES["identity"], SHAPE)
    made = []
    session = effect_logic.SegmentAnythingSession(client_factory=lambda s: made.append(s) or pytest.fail("no worker"))
    assert session.set_volume_node(vol).ok
    assert session.set_volume_node(add_ct(scene, GEOMETRIES["flipped"], SHAPE, name="CT2")).ok
    assert not made and session.watch() is None and session.intensity_check is None


@pytest.mark.parametrize("name", ["identity", "flipped", "oblique"])
def test_preview_through_the_worker_equals_the_in_process_engine(scene, client, engine, name):
    vol, session, sn = session_on(scene, client, name)
    out = session.drag_box(sn, *box_xy(sn, vol, *BOX))
    assert out.ok, out.message
    assert session.busy() == "preview" and session.preview is None  # sent, not computed: nothing waited
    outs = pump(session, finished("preview"))
    preview = [o for o in outs if o.kind == "preview"][-1]
    assert preview.ok, preview.message
    expected = in_process(engine, vol, session.builder.prompts_on_slice())
    assert expected.any()
    np.testing.assert_array_equal(session.preview, expected)
    np.testing.assert_array_equal(session.display.preview_mask(vol), expected)  # shown in the scene
    # a negative click on the same slice refines it, through the same worker and volume
    starts = client.starts
    assert session.click(sn, point_xy(sn, vol, (30, 26, 6)), positive=False).ok
    outs = pump(session, finished("preview"))
    assert all(o.ok for o in outs), outs
    np.testing.assert_array_equal(session.preview, in_process(engine, vol, session.builder.prompts_on_slice()))
    assert client.starts == starts


def test_propagation_equals_the_in_process_engine_and_applies_with_one_undo_step(scene, client, engine):
    vol, session, sn = session_on(scene, client, "oblique")
    seg = volume_nodes.add_segmentation_node(scene, vol)
    sid = volume_nodes.add_segment(seg, "liver")
    editor = segment_writer.create_editor(scene, seg, vol)
    assert session.drag_box(sn, *box_xy(sn, vol, *BOX), preview=False).ok
    assert session.start_propagate().ok
    outs = pump(session, finished("propagate"))
    out = [o for o in outs if o.kind == "propagate"][-1]
    assert out.ok, out.message
    expected = in_process(engine, vol, session.builder.prompts(), propagate=True)
    np.testing.assert_array_equal(session.preview, expected)
    assert session.preview_is_3d and out.voxels == int(expected.sum())
    applied = session.apply(editor.target, seg, sid)
    assert applied.ok, applied.message
    np.testing.assert_array_equal(volume_nodes.segment_mask(seg, sid, vol), expected)
    assert session.preview is None and scene.GetFirstNodeByName(effect_logic.PREVIEW_NODE_NAME) is None
    editor.target.undo()
    assert not volume_nodes.segment_mask(seg, sid, vol).any()


def test_clear_drops_a_result_in_flight(scene, client):
    vol, session, sn = session_on(scene, client)
    assert session.drag_box(sn, *box_xy(sn, vol, *BOX)).ok
    session.clear()
    before = scene_snapshot(scene)
    pump(session, lambda outs: not session.tasks)
    assert session.preview is None and scene_snapshot(scene) == before


def test_a_killed_worker_is_a_message_and_the_next_prompt_restarts_it(scene, client, engine):
    vol, session, sn = session_on(scene, client, "flipped")
    assert session.drag_box(sn, *box_xy(sn, vol, *BOX), preview=False).ok
    assert session.start_propagate().ok
    pump(session, lambda outs: session.progress()[0] >= 1)  # in the middle of it
    before = scene_snapshot(scene)
    os.kill(client.pid, signal.SIGKILL)
    outs = pump(session, finished("propagate"))
    out = [o for o in outs if o.kind == "propagate"][-1]
    assert not out.ok and "killed (SIGKILL" in out.message and "\n" not in out.message
    assert session.preview is None and scene_snapshot(scene) == before and session.busy() is None
    starts = client.starts
    assert session.click(sn, point_xy(sn, vol, (20, 18, 6))).ok  # restarts the worker, resends the volume
    outs = pump(session, finished("preview"))
    assert all(o.ok for o in outs), outs
    assert client.starts == starts + 1
    np.testing.assert_array_equal(session.preview, in_process(engine, vol, session.builder.prompts_on_slice()))


def test_a_worker_that_cannot_start_is_a_one_line_message(scene, tmp_path):
    missing = tmp_path / "no-such-python"
    with WorkerClient(python=str(missing), device="cpu") as broken:
        vol, session, sn = session_on(scene, broken)
        out = session.drag_box(sn, *box_xy(sn, vol, *BOX))
    assert not out.ok and "cannot start the inference worker" in out.message and str(missing) in out.message
    assert "\n" not in out.message and session.preview is None and session.busy() is None


def test_non_ct_intensities_are_reported_at_the_first_prompt(scene, client):
    mr = np.random.default_rng(0).uniform(0, 900, SHAPE).astype(np.float32)
    vol = volume_nodes.add_volume_node(scene, mr, GEOMETRIES["identity"], "MR")
    session = effect_logic.SegmentAnythingSession(scene=scene, client_factory=lambda s: client)
    assert session.set_volume_node(vol).ok and session.intensity_check is None
    sn = slice_node_for(scene, "Axial", vol)
    centre_view_on(sn, geometry.ijk_to_ras_point(vol, (24, 20, 6)))
    out = session.drag_box(sn, *box_xy(sn, vol, *BOX))
    assert out.ok and "custom window" in out.message
    assert not session.intensity_check.looks_like_ct and "," in session.intensity_check.suggested_window
    pump(session, finished("preview"))


def test_apply_without_preview_or_segment_is_a_message(scene):
    vol = add_ct(scene, GEOMETRIES["identity"], SHAPE)
    seg = volume_nodes.add_segmentation_node(scene, vol)
    editor = segment_writer.create_editor(scene, seg, vol)
    session = effect_logic.SegmentAnythingSession(client_factory=lambda s: pytest.fail("no worker needed"))
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
    session = effect_logic.SegmentAnythingSession(client_factory=lambda s: pytest.fail("no worker needed"))
    session.set_volume_node(vol)
    out = session.start_propagate()
    assert not out.ok and "no prompt" in out.message


def test_missing_checkpoint_is_a_message(scene, tmp_path):
    """A model whose weights are not there: the worker says where to put the file; nothing changes."""
    env = dict(os.environ, SAMLIVERSEG_CACHE=str(tmp_path))  # an empty weights cache
    vol = add_ct(scene, GEOMETRIES["anisotropic"], SHAPE)
    sn = slice_node_for(scene, "Axial")
    centre_view_on(sn, geometry.ijk_to_ras_point(vol, (24, 20, 6)))
    with WorkerClient(model="sam_vit_b", device="cpu", backend="torch", env=env) as other:
        session = effect_logic.SegmentAnythingSession(effect_logic.EngineSettings(model="sam_vit_b", device="cpu"),
                                                      scene, client_factory=lambda s: other)
        assert session.set_volume_node(vol).ok
        assert session.drag_box(sn, *box_xy(sn, vol, (10, 10, 6), (30, 28, 6))).ok
        before = scene_snapshot(scene)  # the prompts are shown; the model's failure adds nothing
        outs = pump(session, lambda outs: not session.tasks)
    errors = [o for o in outs if not o.ok]
    assert len(errors) == 1, outs  # the volume's error; the prompt behind it says nothing more
    assert "missing" in errors[0].message and "sam_vit_b" in errors[0].message and str(tmp_path) in errors[0].message
    assert session.preview is None and scene_snapshot(scene) == before


def test_parameters_are_read_without_unset_reads_and_defaults_are_never_empty(scene):
    """Slicer's setParameterDefault stores nothing for "" and parameter() of an unset name logs a
    critical error: defaults are non-empty, optional ones are read from the node's attribute."""
    assert all(v for v in effect_logic.PARAMETER_DEFAULTS.values())
    assert not set(effect_logic.OPTIONAL_PARAMETERS) & set(effect_logic.PARAMETER_DEFAULTS)
    node = slicer.vtkMRMLSegmentEditorNode()
    scene.AddNode(node)
    assert effect_logic.read_parameter(node, "Checkpoint") == ""
    assert effect_logic.read_parameter(node, "Model") == "lite_medsam"
    node.SetAttribute("Segment Anything.Checkpoint", "/data/w.pth")
    node.SetAttribute("Segment Anything.Model", "medsam")
    assert effect_logic.read_parameter(node, "Checkpoint") == "/data/w.pth"
    assert effect_logic.read_parameter(node, "Model") == "medsam"
    assert effect_logic.parameter_attribute("Model") == "Segment Anything.Model"


def test_prompts_and_preview_stay_visible_until_cleared(scene):
    from slicer_test_helpers import blob_ct

    vol = add_ct(scene, GEOMETRIES["oblique"], SHAPE)
    builder = slice_clicks.PromptBuilder(SHAPE, blob_ct(SHAPE))
    sn = slice_node_for(scene, "Axial", vol)
    centre_view_on(sn, geometry.ijk_to_ras_point(vol, (24, 20, 6)))
    a, b = (slice_clicks.map_click(sn, vol, xy) for xy in box_xy(sn, vol, (10, 10, 6), (30, 28, 6)))
    builder.set_box(a, b)
    builder.add_point(slice_clicks.map_click(sn, vol, point_xy(sn, vol, (20, 18, 6))))
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


def test_3d_models_are_recognised_by_name_without_model_code():
    assert all(effect_logic.is_model_3d(n) for n in ("sam_med3d", "sam_med3d_turbo", "sam_med3d_tiny"))
    assert not any(effect_logic.is_model_3d(n) for n in ("lite_medsam", "medsam", "sam_vit_b", "", None))
    s = effect_logic.EngineSettings(model="sam_med3d_turbo", window="liver", backend="torch",
                                    decoder_precision="bf16").client_settings()
    assert s["window"] is None and s["model"] == "sam_med3d_turbo" and s["decoder_precision"] == "fp32"
    assert effect_logic.EngineSettings(decoder_precision="bf16").client_settings()["decoder_precision"] == "bf16"


def test_window_choices():
    from samliverseg.core.errors import InputError
    from SAMLiverSegLogic import module_logic

    assert module_logic.window_spec("model") is None
    assert module_logic.window_spec("liver") == "liver"
    assert module_logic.window_spec("custom", " -200 , 300 ") == "-200,300"
    for bad in ("", "300,-200", "abc", "1,2,3"):
        with pytest.raises(InputError):
            module_logic.window_spec("custom", bad)


def test_the_effect_and_a_panel_run_share_one_worker_without_taking_each_others_answers_or_volumes(
        scene, client, engine):
    """Issue 11: the effect (a preview in flight) and the module panel's "Segment liver" (another
    volume of the same geometry) on one shared client. The panel's polls drain the pipe and take
    the effect's answer from it: it waits in the effect's inbox (``notify`` is called) instead of
    being dropped; each result equals its in-process reference; the worker holds the panel's
    volume afterwards, and the effect's next click still segments the effect's volume."""
    import select

    from slicer_test_helpers import blob_ct, roi_in_volume_axes, segment_in_process

    from SAMLiverSegLogic import module_logic
    from SAMLiverSegLogic.worker_client import volume_node_key

    vol, session, sn = session_on(scene, client, "identity")
    notified = []
    session.notify = lambda: notified.append(1)
    other = np.roll(blob_ct(SHAPE), (6, 8), axis=(1, 2))  # the organ elsewhere, the same grid
    panel_vol = volume_nodes.add_volume_node(scene, other, GEOMETRIES["identity"], "PanelCT")
    (i0, j0, k), (i1, j1, _) = BOX
    roi = roi_in_volume_axes(scene, panel_vol, np.array([i0, j0, k], float), np.array([i1, j1, k], float))

    assert session.drag_box(sn, *box_xy(sn, vol, *BOX)).ok  # load_volume(effect) + prompt, in flight
    run = module_logic.PanelRun(scene, client, panel_vol, None, "liver", roi_node=roi, propagate=False).start()
    assert run.status == "running" and run.load_id is not None  # the worker holds the effect's volume
    assert client.volume_key == volume_node_key(panel_vol)
    # only the panel's notifier fires: it reads everything (the worker answers in the order sent,
    # so the effect's preview comes before the panel's answer) and keeps only its own
    while not run.finished:
        if not run.channel.ready():
            select.select([client.fileno()], [], [], 0.5)
        assert run.poll() == []
    assert run.status == "done", run.message
    assert notified and session.channel.ready() and session.busy() == "preview"
    outs = session.poll()  # the effect's own answer, although the pipe was read by the panel
    preview = [o for o in outs if o.kind == "preview"]
    assert preview and all(o.ok for o in outs), outs
    expected = in_process(engine, vol, session.builder.prompts_on_slice())
    np.testing.assert_array_equal(session.preview, expected)
    panel_mask = volume_nodes.segment_mask(run.segmentation_node, run.segment_id, panel_vol)
    ref_seg = volume_nodes.add_segmentation_node(scene, panel_vol, "reference")
    rep = segment_in_process(scene, panel_vol, ref_seg, "liver", effect_logic.EngineSettings(device="cpu"),
                             roi_node=roi, engine=engine, propagate=False)
    np.testing.assert_array_equal(panel_mask, volume_nodes.segment_mask(ref_seg, rep["segment_id"], panel_vol))
    assert panel_mask.sum() > 50 and not np.array_equal(panel_mask, expected)

    # the effect's next click (after the panel loaded its volume) segments the effect's volume
    assert session.click(sn, point_xy(sn, vol, (20, 18, 6))).ok
    assert client.volume_key == volume_node_key(vol)
    outs = pump(session, finished("preview"))
    assert all(o.ok for o in outs), outs
    prompts = session.builder.prompts_on_slice()
    expected = in_process(engine, vol, prompts)
    np.testing.assert_array_equal(session.preview, expected)
    assert not np.array_equal(expected, in_process(engine, panel_vol, prompts))  # the volume matters

    # the panel again, while the effect prefetches: its volume is sent again, the same segment comes
    again = module_logic.PanelRun(scene, client, panel_vol, None, "liver", roi_node=roi, propagate=False).start()
    assert again.load_id is not None
    while not (again.finished and not session.tasks):
        fd = client.fileno()
        if not (again.channel.ready() or session.channel.ready()):
            select.select([fd], [], [], 0.5)
        for owner in ((again, session) if len(notified) % 2 else (session, again)):
            owner.poll()
    assert again.status == "done", again.message
    np.testing.assert_array_equal(volume_nodes.segment_mask(again.segmentation_node, again.segment_id, panel_vol),
                                  panel_mask)
    # and once more at once: the worker holds it, nothing is sent but the request
    third = module_logic.run_until_done(module_logic.PanelRun(scene, client, panel_vol, None, "liver", roi_node=roi,
                                                              propagate=False))
    assert third.load_id is None and third.status == "done", third.message
    np.testing.assert_array_equal(volume_nodes.segment_mask(third.segmentation_node, third.segment_id, panel_vol),
                                  panel_mask)
    session.shutdown()


@pytest.mark.parametrize("box_view,click_view", [("Axial", "Coronal"), ("Coronal", "Axial")])
def test_a_click_in_another_view_corrects_the_result_shown(scene, client, engine, box_view, click_view):
    """A click in a view other than the box's corrects the 3D result shown, as one in the box's view
    does (a point is a voxel, on one slice of every axis), instead of starting the prompts over: the
    prompts keep their axis, and the worker's session walks across the axis of the result's last
    propagation through the click (axial slices after a coronal box, which is handed to axial ones).
    The in-process ``CorrectionSession``'s mask, on an oblique volume."""
    from samliverseg.interactive.session3d import CorrectionSession

    vol, session, sn = session_on(scene, client, "oblique")
    first = slice_node_for(scene, box_view, vol)
    lo, hi = ((10, 10, 6), (34, 30, 6)) if box_view == "Axial" else ((10, 20, 2), (34, 20, 10))
    centre_view_on(first, geometry.ijk_to_ras_point(vol, [(a + b) / 2.0 for a, b in zip(lo, hi)]))
    assert session.drag_box(first, *box_xy(first, vol, lo, hi), preview=False).ok
    axis = session.builder.slice_axis
    assert axis == ("k" if box_view == "Axial" else "j")
    assert session.start_propagate().ok
    out = [o for o in pump(session, finished("propagate")) if o.kind == "propagate"][-1]
    assert out.ok, out.message
    engine.set_volume(volume_nodes.volume_from_node(vol))
    ref = CorrectionSession(engine, session.builder.prompts())
    np.testing.assert_array_equal(session.preview, ref.mask)
    assert ref.axis == "k"  # an axial box's own axis; a coronal box's hand-off's

    # a negative click inside the mask, on an axial slice other than the box's, in the other view
    inside = np.argwhere(ref.mask > 0)
    k, j, i = inside[len(inside) // 3]
    other = slice_node_for(scene, click_view, vol)
    centre_view_on(other, geometry.ijk_to_ras_point(vol, (float(i), float(j), float(k))))
    assert session.click(other, point_xy(other, vol, (float(i), float(j), float(k))), positive=False).ok
    assert session.busy() == "correct"  # a correction, not a preview of the clicked slice
    outs = pump(session, lambda o: any(x.kind == "correct" for x in o) and not session.tasks, timeout=600)
    last = [o for o in outs if o.kind == "correct"][-1]
    assert last.ok and last.data["incremental"], last.message
    assert "started over" not in last.message
    assert session.builder.slice_axis == axis and session.builder.box is not None  # the prompts stay
    assert len(session.builder.negative) == 1
    corr = ref.add_point(session.builder.negative[-1], positive=False)
    c = last.data["correction"]
    assert (c["slice_axis"], c["slice_index"], c["walk_axis"]) == ("k", corr.slice_index, "k") and corr.slice_index == k
    assert c["changed_slices"] == corr.changed_slices and corr.changed_slices
    np.testing.assert_array_equal(session.preview, ref.mask)

    # a box in the other view would start the prompts over and drop the corrected 3D result shown,
    # which is not applied: refused in one line, and nothing changes (nothing is sent)
    box2 = ((10, 10, 6), (34, 30, 6)) if click_view == "Axial" else ((10, 20, 2), (34, 20, 10))
    centre_view_on(other, geometry.ijk_to_ras_point(vol, [(a + b) / 2.0 for a, b in zip(*box2)]))
    prompts_before = session.builder.prompts()
    out = session.drag_box(other, *box_xy(other, vol, *box2))
    assert not out.ok and "Apply or Clear" in out.message and "\n" not in out.message, out.message
    assert session.busy() is None and not session.tasks
    assert session.builder.prompts() == prompts_before and session.preview_is_3d and session.can_undo()
    np.testing.assert_array_equal(session.preview, ref.mask)

    # after Clear, the box in the other view starts anew; while only its slice's 2D preview is shown, a
    # box back in the first view starts the prompts over (a new object, or the same drawn anew there)
    session.clear()
    out = session.drag_box(other, *box_xy(other, vol, *box2))
    assert out.ok, out.message
    assert session.builder.slice_axis != axis and not session.builder.negative
    assert [o for o in pump(session, finished("preview")) if o.kind == "preview"][-1].ok
    assert not session.preview_is_3d and session.preview.any()
    out = session.drag_box(first, *box_xy(first, vol, lo, hi))
    assert out.ok and "started over" in out.message, out.message
    assert session.builder.slice_axis == axis
    pump(session, finished("preview"))


def test_after_a_propagation_clicks_and_boxes_on_any_slice_correct_it_in_the_worker(scene, client, engine):
    """Once the 3D result is shown, a click or a box on another slice corrects it through the worker
    (``correct``) instead of previewing its slice: the in-process ``CorrectionSession``'s masks, on an
    oblique volume. A click while a correction is in flight is queued and sent after it; one the
    in-process session refuses (past the object's end) the worker refuses too, in one line, and the
    effect drops it from its prompts. A worker killed meanwhile: the next correction goes to a new
    worker, which makes the mask again from all the prompts (``propagate``'s mask)."""
    from samliverseg.core.errors import PromptError
    from samliverseg.interactive.session3d import CorrectionSession

    vol, session, sn = session_on(scene, client, "oblique")
    assert session.drag_box(sn, *box_xy(sn, vol, *BOX), preview=False).ok
    assert session.start_propagate().ok
    out = [o for o in pump(session, finished("propagate")) if o.kind == "propagate"][-1]
    assert out.ok, out.message
    assert session.result_id
    engine.set_volume(volume_nodes.volume_from_node(vol))
    ref = CorrectionSession(engine, session.builder.prompts())
    np.testing.assert_array_equal(session.preview, ref.mask)
    ks = [int(k) for k in np.flatnonzero(ref.mask.any(axis=(1, 2)))]
    assert len(ks) >= 3, ks

    # a negative click inside the mask on another slice, then a positive one on the slice past the
    # object's other end, clicked at once
    kn = ks[-1]
    j, i = np.argwhere(ref.mask[kn])[len(np.argwhere(ref.mask[kn])) // 2]
    centre_view_on(sn, geometry.ijk_to_ras_point(vol, (float(i), float(j), float(kn))))
    assert session.click(sn, point_xy(sn, vol, (float(i), float(j), float(kn))), positive=False).ok
    assert session.busy() == "correct" and session.preview_is_3d  # sent, nothing waited
    kp = ks[0] - 1
    centre_view_on(sn, geometry.ijk_to_ras_point(vol, (20.0, 20.0, float(kp))))
    pos = slice_clicks.map_click(sn, vol, point_xy(sn, vol, (20.0, 20.0, float(kp))), ref.mask.shape).ijk
    assert session.click(sn, point_xy(sn, vol, (20.0, 20.0, float(kp))), positive=True).ok
    assert len(session.pending_corrections) == 1  # queued behind the first
    outs = pump(session, lambda o: sum(x.kind == "correct" for x in o) == 2 and not session.tasks)
    corrections = [o for o in outs if o.kind == "correct"]
    assert len(corrections) == 2 and corrections[0].ok, corrections
    assert "corrected from slice" in corrections[0].message
    neg = session.builder.negative[-1]
    assert int(round(neg[2])) == kn
    cut = ref.add_point(neg, positive=False)
    # a cut that HU carries comes whole; one the model follows beyond its slice shows that slice first
    assert (corrections[0].data["first_shown_s"] is None) == (not cut.decoded_slices), cut
    # the worker takes or refuses the positive click as the in-process session does; refused (a click
    # past the object's end that would add more than 3 times its last slice: here the model's answer
    # is mostly the body around the organ's 22-px tip), it is dropped from the prompts, one line
    try:
        ref.add_point(pos, positive=True)
        refused = None
    except PromptError as exc:
        refused = str(exc)
    if refused is None:
        assert corrections[1].ok and int(round(session.builder.positive[-1][2])) == kp, corrections[1]
    else:
        assert not corrections[1].ok and refused in corrections[1].message, (refused, corrections[1])
        assert "\n" not in corrections[1].message and not session.builder.positive
    np.testing.assert_array_equal(session.preview, ref.mask)
    np.testing.assert_array_equal(session.display.preview_mask(vol), ref.mask)

    # a box on another slice sent to a killed worker: a one-line message, the box is dropped and
    # the result shown stays; drawn again, a new worker makes the mask from all the prompts
    shown = session.preview.copy()
    os.kill(client.pid, signal.SIGKILL)
    kb = [k for k in ks if k not in (BOX[0][2], kn)][0]  # not the first box's slice: a second box
    centre_view_on(sn, geometry.ijk_to_ras_point(vol, (24.0, 20.0, float(kb))))
    lo, hi = (10.0, 10.0, float(kb)), (33.0, 29.0, float(kb))
    for attempt in range(2):
        assert session.drag_box(sn, *box_xy(sn, vol, lo, hi)).ok
        outs = pump(session, lambda o: any(x.kind == "correct" for x in o) and not session.tasks, timeout=600)
        last = [o for o in outs if o.kind == "correct"][-1]
        if attempt == 0:
            assert not last.ok and "killed" in last.message and "\n" not in last.message
            assert session.builder.boxes == [] and session.builder.box is not None  # the first box only
            np.testing.assert_array_equal(session.preview, shown)
    assert last.ok and "made again from all the prompts" in last.message, last.message
    assert last.data["first_shown_s"] is None  # made again, not corrected: no part first
    assert len(session.builder.prompts().all_boxes()) == 2
    np.testing.assert_array_equal(session.preview, in_process(engine, vol, session.builder.prompts(), propagate=True))

    # a box on a third slice: its own slice is shown first (a ``partial`` event), then the walk
    ref2 = CorrectionSession(engine, session.builder.prompts())
    np.testing.assert_array_equal(session.preview, ref2.mask)
    k3 = [k for k in ks if k not in (BOX[0][2], kb)][-1]
    centre_view_on(sn, geometry.ijk_to_ras_point(vol, (24.0, 20.0, float(k3))))
    lo, hi = (11.0, 11.0, float(k3)), (32.0, 28.0, float(k3))
    assert session.drag_box(sn, *box_xy(sn, vol, lo, hi)).ok
    corr = ref2.add_box(session.builder.box)
    outs = pump(session, lambda o: any(x.kind == "correct" for x in o) and not session.tasks, timeout=600)
    last = [o for o in outs if o.kind == "correct"][-1]
    assert last.ok and last.data["incremental"], last.message
    assert 0 < last.data["first_shown_s"] <= last.seconds
    assert last.data["correction"]["decoded_slices"] == corr.decoded_slices
    np.testing.assert_array_equal(session.preview, ref2.mask)

    # Undo correction: the third box is taken back in the worker (the slices it changed restored);
    # the one before it was made by a new worker from all prompts, which holds nothing to take back:
    # undoing it makes the mask again from the prompts left
    before_k3 = session.preview.copy()
    ref2.undo()
    assert session.can_undo()
    assert session.undo_correction().ok
    outs = pump(session, lambda o: any(x.kind == "correct" for x in o) and not session.tasks, timeout=600)
    last = [o for o in outs if o.kind == "correct"][-1]
    assert last.ok and last.data["incremental"] and "took back" in last.message, last.message
    np.testing.assert_array_equal(session.preview, ref2.mask)
    assert not np.array_equal(session.preview, before_k3)
    assert len(session.builder.prompts().all_boxes()) == 2
    assert session.undo_correction().ok
    outs = pump(session, lambda o: any(x.kind == "correct" for x in o) and not session.tasks, timeout=600)
    last = [o for o in outs if o.kind == "correct"][-1]
    assert last.ok and not last.data["incremental"], last.message
    assert len(session.builder.prompts().all_boxes()) == 1
    np.testing.assert_array_equal(session.preview, in_process(engine, vol, session.builder.prompts(), propagate=True))
