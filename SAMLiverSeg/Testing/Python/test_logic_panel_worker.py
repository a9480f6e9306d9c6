"""The module panel's "Segment liver/tumor" through the inference worker (issue 11, item 1 and 11):
markups -> one propagate request -> a real ``samliverseg worker`` (real LiteMedSAM) -> the segment in a
real slicer-core scene, driven as the GUI drives it (wait on the worker's pipe, then ``poll()``,
never ``wait()``), compared with the in-process path on the same node; cancel, a killed worker, bad
markups, and the module's one segment editor node.
"""

from __future__ import annotations

import functools
import os
import select
import signal
import time

import numpy as np
import pytest

import slicer
from slicer_test_helpers import GEOMETRIES, add_ct, roi_in_volume_axes, segment_in_process

from samliverseg.core.errors import InputError, PromptError
from samliverseg.io.volume import Volume
from samliverseg.service.handlers import volume_from_ijk_to_ras
from SAMLiverSegLogic import effect_logic, geometry, module_logic, segment_writer, volume_nodes
from SAMLiverSegLogic.worker_client import WorkerClient

SHAPE = (10, 72, 80)  # k, j, i


@functools.lru_cache(maxsize=None)
def _phantom():
    from samliverseg.demo.phantom import make_phantom

    return make_phantom(SHAPE, (3.0, 3.0, 5.0), seed=2, n_tumors=1, noise_sd=10.0, scale=0.6)


def phantom_node(scene, name="oblique"):
    ph = _phantom()
    m = GEOMETRIES[name].copy()
    m[:3, :3] = m[:3, :3] / np.linalg.norm(m[:3, :3], axis=0) * np.array([1.2, 1.2, 3.0])
    node = volume_nodes.add_volume_node(scene, ph.hu.astype(np.int16), m, "PhantomCT")
    liver = ph.liver_mask
    ks = np.flatnonzero(liver.any(axis=(1, 2)))
    k = int(ks[len(ks) // 2])
    jj, ii = np.nonzero(liver[k])
    box = (int(ii.min()) - 2, int(jj.min()) - 2, int(ii.max()) + 2, int(jj.max()) + 2, k)
    return node, box


def points_node(scene, volume_node, ijk_points, name="P"):
    node = slicer.vtkMRMLMarkupsFiducialNode()
    node.SetName(name)
    scene.AddNode(node)
    for p in ijk_points:
        node.AddControlPoint(*geometry.ijk_to_ras_point(volume_node, p))
    return node


def drive(run, timeout=600.0):
    """What the GUI does, without Qt: sleep until the worker's pipe is readable (a QSocketNotifier),
    then ``poll()`` (never blocks) and hand the messages to the run; re-read ``fileno()`` every
    time (a restarted worker has a new pipe)."""
    run.start()
    deadline = time.monotonic() + timeout
    polls = 0
    while not run.finished:
        assert time.monotonic() < deadline, f"no answer in {timeout} s ({run.status}, {run.progress})"
        fd = run.client.fileno()
        if fd is not None:
            select.select([fd], [], [], 0.5)
        t0 = time.perf_counter()
        others = run.poll()
        assert time.perf_counter() - t0 < 5.0 or run.finished  # poll never waits on the worker
        assert others == []
        polls += 1
    return polls


# -- the request ---------------------------------------------------------------------------------

def test_bad_markups_fail_before_anything_is_sent(scene):
    vol = add_ct(scene, GEOMETRIES["flipped"], (12, 40, 48))
    seg = volume_nodes.add_segmentation_node(scene, vol)
    outside = points_node(scene, vol, [(24, 20, 40)])  # k=40: outside (12 slices)
    idle = WorkerClient(python="/no/such/python")  # never started: nothing may be sent
    with pytest.raises(PromptError, match="outside the volume"):
        module_logic.PanelRun(scene, idle, vol, seg, "liver", positive_node=outside)
    with pytest.raises(InputError, match="unknown target"):
        module_logic.PanelRun(scene, idle, vol, seg, "spleen", positive_node=outside)
    empty = roi_in_volume_axes(scene, vol, np.array([8.0, 6.0, 3.0]), np.array([8.0, 30.0, 3.0]))
    with pytest.raises(PromptError, match="empty"):
        module_logic.PanelRun(scene, idle, vol, seg, "liver", roi_node=empty)
    label = volume_nodes.add_volume_node(scene, np.zeros((12, 40, 48), np.uint8), GEOMETRIES["identity"], "L",
                                         label=True)
    with pytest.raises(InputError, match="labelmap"):
        module_logic.PanelRun(scene, idle, label, seg, "liver", positive_node=outside)
    assert idle.proc is None and seg.GetSegmentation().GetNumberOfSegments() == 0


def test_a_worker_that_cannot_start_fails_the_run_in_one_line(scene):
    vol, box = phantom_node(scene)
    pts = points_node(scene, vol, [((box[0] + box[2]) / 2, (box[1] + box[3]) / 2, box[4])])
    n_nodes = scene.GetNumberOfNodes()
    with WorkerClient(python="/no/such/python") as broken:
        run = module_logic.PanelRun(scene, broken, vol, None, "liver", positive_node=pts).start()
    assert run.status == "failed" and "cannot start the inference worker" in run.message and "\n" not in run.message
    assert scene.GetNumberOfNodes() == n_nodes


# -- through the real worker -------------------------------------------------------------------------

def test_segment_liver_through_the_worker_equals_the_in_process_path(scene, client, engine):
    """A flat ROI (a box) without propagation, a 3D ROI with and without propagation, on an oblique
    volume: the worker's segment equals the one the in-process engine writes for the same markups."""
    vol, (i0, j0, i1, j1, k) = phantom_node(scene, "oblique")
    flat = roi_in_volume_axes(scene, vol, np.array([i0, j0, k], float), np.array([i1, j1, k], float))
    roi3d = roi_in_volume_axes(scene, vol, np.array([i0, j0, k - 1], float), np.array([i1, j1, k + 1], float))
    for roi, propagate in ((flat, False), (roi3d, True), (roi3d, False)):
        run = module_logic.PanelRun(scene, client, vol, None, "liver", roi_node=roi, propagate=propagate)
        drive(run)
        assert run.status == "done", run.message
        assert run.segmentation_node is not None and run.segmentation_node.GetScene() is scene
        got = volume_nodes.segment_mask(run.segmentation_node, run.segment_id, vol)
        assert run.report["voxels"] == int(got.sum()) > 50 and run.message.startswith("Liver: ")
        ref_seg = volume_nodes.add_segmentation_node(scene, vol, "reference")
        rep = segment_in_process(scene, vol, ref_seg, "liver", effect_logic.EngineSettings(device="cpu"),
                                                roi_node=roi, engine=engine, propagate=propagate)
        want = volume_nodes.segment_mask(ref_seg, rep["segment_id"], vol)
        np.testing.assert_array_equal(got, want)
        if not propagate:
            assert got[k].sum() == got.sum()  # one slice (a 3D ROI: its middle one)
        else:
            assert got[[k - 1, k, k + 1]].sum() == got.sum() and got[k - 1].any() and got[k + 1].any()


def test_tumor_keeps_the_liver_and_the_editor_node_is_reused(scene, client):
    vol, (i0, j0, i1, j1, k) = phantom_node(scene, "identity")
    flat = roi_in_volume_axes(scene, vol, np.array([i0, j0, k], float), np.array([i1, j1, k], float))
    seg = volume_nodes.add_segmentation_node(scene, vol, "Result")
    editors = scene.GetNumberOfNodesByClass("vtkMRMLSegmentEditorNode")
    liver = module_logic.PanelRun(scene, client, vol, seg, "liver", roi_node=flat, propagate=False)
    drive(liver)
    assert liver.status == "done", liver.message
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentEditorNode") == editors + 1
    node = segment_writer.module_editor_node(scene)
    liver_mask = volume_nodes.segment_mask(seg, liver.segment_id, vol)
    # the tumour: a box inside the liver, written without taking voxels from the liver
    ci, cj = (i0 + i1) // 2, (j0 + j1) // 2
    small = roi_in_volume_axes(scene, vol, np.array([ci - 6, cj - 6, k], float), np.array([ci + 6, cj + 6, k], float))
    editor = liver.editor
    for _ in range(2):  # two clicks (the panel passes its editor: one undo history): one editor node
        tumor = module_logic.PanelRun(scene, client, vol, seg, "tumor", roi_node=small, propagate=False, editor=editor)
        drive(tumor)
        assert tumor.status == "done", tumor.message
        assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentEditorNode") == editors + 1
        assert segment_writer.module_editor_node(scene) is node and tumor.editor is editor and editor.node is node
    names = [seg.GetSegmentation().GetNthSegment(n).GetName() for n in range(seg.GetSegmentation().GetNumberOfSegments())]
    assert names == ["Liver", "Liver tumor"]
    np.testing.assert_array_equal(volume_nodes.segment_mask(seg, liver.segment_id, vol), liver_mask)
    tumor_mask = volume_nodes.segment_mask(seg, tumor.segment_id, vol)
    assert tumor_mask.sum() > 0 and not np.array_equal(tumor_mask, liver_mask)
    # one undo step per write: the first tumour (the same mask), no tumour, no liver
    editor.target.undo()
    np.testing.assert_array_equal(volume_nodes.segment_mask(seg, tumor.segment_id, vol), tumor_mask)
    editor.target.undo()
    assert volume_nodes.segment_mask(seg, tumor.segment_id, vol).sum() == 0
    np.testing.assert_array_equal(volume_nodes.segment_mask(seg, liver.segment_id, vol), liver_mask)
    editor.target.undo()
    assert volume_nodes.segment_mask(seg, liver.segment_id, vol).sum() == 0


def test_cancel_and_a_killed_worker_leave_the_scene_alone_and_the_next_run_works(scene, client):
    vol, (i0, j0, i1, j1, k) = phantom_node(scene, "flipped")
    roi3d = roi_in_volume_axes(scene, vol, np.array([i0, j0, 0], float), np.array([i1, j1, SHAPE[0] - 1], float))
    seg = volume_nodes.add_segmentation_node(scene, vol, "Result")
    n_nodes = scene.GetNumberOfNodes()

    run = module_logic.PanelRun(scene, client, vol, seg, "liver", roi_node=roi3d).start()
    run.cancel()
    deadline = time.monotonic() + 300
    while not run.finished and time.monotonic() < deadline:
        select.select([client.fileno()], [], [], 0.5)
        run.poll()
    assert run.status == "cancelled" and run.exit_code == 130, (run.status, run.message)
    assert seg.GetSegmentation().GetNumberOfSegments() == 0 and scene.GetNumberOfNodes() == n_nodes

    run = module_logic.PanelRun(scene, client, vol, seg, "liver", roi_node=roi3d).start()
    while run.progress[0] == 0 and not run.finished:  # it is propagating
        select.select([client.fileno()], [], [], 0.5)
        run.poll()
    os.kill(client.pid, signal.SIGKILL)
    while not run.finished:
        fd = client.fileno()
        if fd is not None:
            select.select([fd], [], [], 0.5)
        run.poll()
    assert run.status == "failed" and "killed (SIGKILL" in run.message and "\n" not in run.message
    assert seg.GetSegmentation().GetNumberOfSegments() == 0 and scene.GetNumberOfNodes() == n_nodes

    flat = roi_in_volume_axes(scene, vol, np.array([i0, j0, k], float), np.array([i1, j1, k], float))
    again = module_logic.PanelRun(scene, client, vol, seg, "liver", roi_node=flat, propagate=False)
    drive(again)  # the next request restarts the worker
    assert again.status == "done", again.message
    assert volume_nodes.segment_mask(seg, again.segment_id, vol).sum() > 50


def test_run_until_done_is_the_same_loop_for_scripts(scene, client):
    vol, (i0, j0, i1, j1, k) = phantom_node(scene, "anisotropic")
    pts = points_node(scene, vol, [((i0 + i1) / 2, (j0 + j1) / 2, k)])
    run = module_logic.run_until_done(
        module_logic.PanelRun(scene, client, vol, None, "liver", positive_node=pts, propagate=False), timeout=600)
    assert run.status == "done", run.message
    mask = volume_nodes.segment_mask(run.segmentation_node, run.segment_id, vol)
    assert mask[k].sum() > 0
    # the same through Slicer 5.8's writer (no vtkSlicerSegmentEditorLogic), into another segmentation
    seg58 = volume_nodes.add_segmentation_node(scene, vol, "5.8")
    editor58 = segment_writer.create_editor(scene, seg58, vol, editor_node=segment_writer.module_editor_node(scene),
                                            use_editor_logic=False)
    run58 = module_logic.run_until_done(module_logic.PanelRun(scene, client, vol, seg58, "liver", positive_node=pts,
                                                              propagate=False, editor=editor58), timeout=600)
    assert run58.status == "done" and run58.editor.logic is None, run58.message
    np.testing.assert_array_equal(volume_nodes.segment_mask(seg58, run58.segment_id, vol), mask)
    run58.editor.target.undo()
    assert volume_nodes.segment_mask(seg58, run58.segment_id, vol).sum() == 0


def test_volume_from_ijk_to_ras_is_the_worker_view(scene):
    """The worker sees the node's voxels on the node's world IJKToRAS (sanity of the test above)."""
    vol = add_ct(scene, GEOMETRIES["oblique"], (12, 40, 48))
    v = volume_from_ijk_to_ras(volume_nodes.array_from_volume_node(vol).astype(np.float32),
                               geometry.world_ijk_to_ras(vol))
    assert isinstance(v, Volume)
    np.testing.assert_allclose(v.ijk_to_ras_matrix(), geometry.world_ijk_to_ras(vol), atol=1e-9)
