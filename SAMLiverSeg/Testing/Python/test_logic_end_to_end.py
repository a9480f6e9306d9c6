"""End to end with the real LiteMedSAM engine: a drag in a slice view -> the effect logic ->
the Segment Editor logic -> a segment, compared with ``samliverseg segment`` run as a subprocess
on the same image with the same prompt.

The CT is a synthetic phantom written to NIfTI with SimpleITK and loaded into the scene with
Slicer's own reader (``vtkMRMLVolumeArchetypeStorageNode``), as a user would load it. The prompt
is defined once, physically (the liver's box on its middle slice); the module side gets it as a
mouse drag in a slice view, the CLI side as ``--box-ijk`` in SimpleITK's voxel indices. The
segment is read back on the node's grid and mapped to SimpleITK's indices voxel by voxel through
physical coordinates (Slicer's reader flips k of a left-handed grid, the ``flipped`` case).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import slicer
from slicer_test_helpers import GEOMETRIES, centre_view_on, pump, roi_in_volume_axes, segment_in_process, slice_node_for

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("samliverseg.interactive.engine", "samliverseg.demo.phantom", "samliverseg.cli.commands")),
    reason="the core engine / phantom / CLI are not installed")

from SAMLiverSegLogic import effect_logic, geometry, process, segment_writer, slice_clicks, volume_nodes  # noqa: E402
from samliverseg.core.evaluation import dice  # noqa: E402

SHAPE_2D = (12, 72, 80)  # k, j, i: small enough for CPU, large enough for an organ
SHAPE_3D = (10, 72, 80)  # fewer slices: 3D propagation embeds every slice of the liver, twice
SPACING = {"identity": (1.0, 1.0, 1.0), "flipped": (0.8, 0.8, 2.0), "oblique": (0.9, 0.9, 1.5),
           "anisotropic": (0.6, 1.1, 4.0)}
#: (geometry, propagate to 3D); the 3D case is the costly one (about a minute on 2 idle cores)
CASES = [(name, False) for name in GEOMETRIES] + [pytest.param("flipped", True, marks=pytest.mark.slow)]
CASE_IDS = [f"{name}-2d" for name in GEOMETRIES] + ["flipped-3d"]


@functools.lru_cache(maxsize=None)
def _phantom(shape):
    from samliverseg.demo.phantom import make_phantom

    # scale 0.6: an adult-like body fills the 240 mm field; the few slices are a slab through the liver
    return make_phantom(shape, (3.0, 3.0, 5.0), seed=2, n_tumors=1, noise_sd=10.0, scale=0.6)


def phantom_case(name: str, propagate: bool):
    """(sitk image, liver truth [k, j, i]) of a phantom on the geometry ``name``.

    The voxels are the same for every geometry; only the grid (spacing, origin, axes) differs.
    """
    ph = _phantom(SHAPE_3D if propagate else SHAPE_2D)
    m = GEOMETRIES[name].copy()
    lin = m[:3, :3] / np.linalg.norm(m[:3, :3], axis=0)
    m[:3, :3] = lin @ np.diag(SPACING[name])
    spacing, origin_lps, direction_lps = geometry.geometry_from_ijk_to_ras(m)
    img = sitk.GetImageFromArray(ph.hu.astype(np.float32))
    img.SetSpacing(spacing)
    img.SetOrigin(tuple(origin_lps))
    img.SetDirection(tuple(direction_lps.ravel()))
    return img, ph.liver_mask


def liver_box_itk(liver):
    """The liver's box on its middle slice, in SimpleITK IJK: (i0, j0, i1, j1, k)."""
    ks = np.flatnonzero(liver.any(axis=(1, 2)))
    k = int(ks[len(ks) // 2])
    jj, ii = np.nonzero(liver[k])
    return int(ii.min()) - 2, int(jj.min()) - 2, int(ii.max()) + 2, int(jj.max()) + 2, k


def itk_ijk_to_ras(img):
    d = np.array(img.GetDirection()).reshape(3, 3)
    m = np.eye(4)
    m[:3, :3] = geometry.RAS_TO_LPS @ d @ np.diag(img.GetSpacing())
    m[:3, 3] = geometry.RAS_TO_LPS @ np.array(img.GetOrigin())
    return m


def node_mask_in_itk_indices(mask_node, node_m, itk_shape, itk_m):
    """Move a [k, j, i] mask from the node's grid to SimpleITK's grid (same voxels, other indexing)."""
    idx = np.round(np.linalg.inv(node_m) @ itk_m).astype(int)  # itk ijk -> node ijk
    k, j, i = np.indices(itk_shape)
    ijk = np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(i.size, int)])
    ni, nj, nk, _ = idx @ ijk
    return mask_node[nk, nj, ni].reshape(itk_shape)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("e2e")


def make_case(root, name, propagate):
    img, liver = phantom_case(name, propagate)
    path = root / f"{name}-{'3d' if propagate else '2d'}.nii.gz"
    if not path.exists():
        sitk.WriteImage(img, str(path))
    return dict(image=path, img=img, liver=liver, box=liver_box_itk(liver))


def start_cli(root, case, name, propagate):
    """``samliverseg segment`` on the case, in the background (one torch thread: we share 2 cores)."""
    result = root / f"{name}-{'3d' if propagate else '2d'}-cli.nii.gz"
    args = ["segment", str(case["image"]), "-o", str(result), "--device", "cpu", "--box-ijk", *map(str, case["box"])]
    if not propagate:
        args.append("--no-propagate")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return process.BackgroundProcess(process.samliverseg_command(*args), env=env).start(), result


@pytest.fixture(scope="module")
def worker():
    """The effect's model runs in the inference worker (never in Slicer's process)."""
    from SAMLiverSegLogic.worker_client import WorkerClient

    with WorkerClient(device="cpu", backend="torch") as client:
        yield client


def effect_session(scene, client):
    return effect_logic.SegmentAnythingSession(effect_logic.EngineSettings(device="cpu", backend="torch"), scene,
                                               client_factory=lambda s: client)


def finished(session, kind):
    outs = pump(session, lambda outs: any(o.kind == kind for o in outs), timeout=900)
    return [o for o in outs if o.kind == kind][-1]


def load_with_slicer(scene, path):
    node = slicer.vtkMRMLScalarVolumeNode()
    node.SetName(Path(path).name.split(".")[0])
    scene.AddNode(node)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    return node


@pytest.mark.parametrize("name,propagate", CASES, ids=CASE_IDS)
def test_segment_from_the_effect_logic_equals_the_cli(scene, root, worker, name, propagate):
    c = make_case(root, name, propagate)
    proc, cli_path = start_cli(root, c, name, propagate)
    node = load_with_slicer(scene, c["image"])
    seg = volume_nodes.add_segmentation_node(scene, node)
    sid = volume_nodes.add_segment(seg, "Liver")
    editor = segment_writer.create_editor(scene, seg, node)
    segment_writer.configure_editing(editor.node, "everywhere", overwrite="all")

    # the same physical box as the CLI's, dragged in an axial view (rotated to the volume plane)
    itk_m = itk_ijk_to_ras(c["img"])
    i0, j0, i1, j1, k = c["box"]
    ras_a = (itk_m @ np.array([i0, j0, k, 1.0]))[:3]
    ras_b = (itk_m @ np.array([i1, j1, k, 1.0]))[:3]
    sn = slice_node_for(scene, "Axial", node, fov_mm=400)
    centre_view_on(sn, (ras_a + ras_b) / 2)
    session = effect_session(scene, worker)
    assert session.set_volume_node(node).ok
    out = session.drag_box(sn, slice_clicks.ras_to_xy(sn, ras_a)[:2], slice_clicks.ras_to_xy(sn, ras_b)[:2])
    assert out.ok, out.message
    out = finished(session, "preview")
    assert out.ok, out.message
    if propagate:
        assert session.start_propagate().ok
        out = finished(session, "propagate")
        assert out.ok, out.message
    applied = session.apply(editor.target, seg, sid)
    assert applied.ok, applied.message
    logic_mask = volume_nodes.segment_mask(seg, sid, node)

    assert proc.wait(timeout=900) == 0, "\n".join(proc.lines)
    cli = sitk.GetArrayFromImage(sitk.ReadImage(str(cli_path))) > 0
    logic_in_itk = node_mask_in_itk_indices(logic_mask, geometry.ijk_to_ras(node), cli.shape, itk_m)
    d = dice(logic_in_itk, cli)
    assert cli.sum() > 50, "the CLI found (almost) nothing: the test prompt is wrong"
    assert d >= 0.999, f"{name}: Dice(logic, CLI) = {d:.5f} ({logic_in_itk.sum()} vs {cli.sum()} voxels)"
    # and it is the liver: the 2D result against the truth on that slice, the 3D one overall
    truth = c["liver"].astype(bool)
    ref = truth if propagate else np.where(np.arange(truth.shape[0])[:, None, None] == k, truth, False)
    assert dice(logic_in_itk, ref) > 0.5  # a sanity check that it is the liver (model quality is tested in the core)
    # undo (Ctrl+Z) restores the empty segment
    editor.target.undo()
    assert volume_nodes.segment_mask(seg, sid, node).sum() == 0


def test_click_to_preview_latency_and_display(scene, root, worker, capsys):
    """Clicks through the effect logic and the worker: cold slice vs cached embedding; prompts and
    preview shown; neighbouring slices prefetched in the worker's background."""
    c = make_case(root, "identity", False)
    node = load_with_slicer(scene, c["image"])  # identity: node IJK == SimpleITK IJK
    i0, j0, i1, j1, k = c["box"]
    from scipy import ndimage

    dist = ndimage.distance_transform_edt(c["liver"][k])
    jc, ic = np.unravel_index(int(np.argmax(dist)), dist.shape)  # the point deepest inside the liver
    centre = (float(ic), float(jc), float(k))
    sn = slice_node_for(scene, "Axial", node, fov_mm=400)
    ras = geometry.ijk_to_ras_point(node, centre)
    centre_view_on(sn, ras)
    session = effect_session(scene, worker)
    assert session.set_volume_node(node).ok
    # LiteMedSAM was trained on boxes: the first prompt is a drag, then a click refines it
    itk_m = itk_ijk_to_ras(c["img"])
    xy_a = slice_clicks.ras_to_xy(sn, (itk_m @ np.array([i0, j0, k, 1.0]))[:3])[:2]
    xy_b = slice_clicks.ras_to_xy(sn, (itk_m @ np.array([i1, j1, k, 1.0]))[:3])[:2]
    t0 = time.perf_counter()
    assert session.drag_box(sn, xy_a, xy_b).ok
    cold = finished(session, "preview")
    cold_s = time.perf_counter() - t0
    assert cold.ok and cold.voxels > 0, cold.message
    xy = slice_clicks.ras_to_xy(sn, ras)[:2]
    t0 = time.perf_counter()
    assert session.click(sn, xy).ok
    warm = finished(session, "preview")
    warm_s = time.perf_counter() - t0
    assert warm.ok and warm.voxels > 0, warm.message
    assert session.click(sn, slice_clicks.ras_to_xy(sn, geometry.ijk_to_ras_point(node, (i0 + 1, j0 + 1, k)))[:2],
                         positive=False).ok
    neg = finished(session, "preview")
    assert neg.ok, neg.message
    display = session.display
    assert display.positive_node.GetNumberOfControlPoints() == 1
    assert display.box_node is not None
    assert display.negative_node.GetNumberOfControlPoints() == 1
    np.testing.assert_array_equal(display.preview_mask(node), session.preview)
    with capsys.disabled():
        print(f"\n[latency] click -> 2D preview through the worker on CPU (first prompt starts it): "
              f"first {cold_s * 1000:.0f} ms, cached embedding {warm_s * 1000:.0f} ms")
    assert cold.cold and not warm.cold  # the drag's slice was embedded; the click reused it
    # the neighbouring slices are embedded in the worker's background after a preview
    pump(session, lambda outs: not session.tasks, timeout=900)
    status = worker.request("status", timeout=60)
    assert status["slices_embedded"] >= 3
    session.clear()
    assert display.preview_node is None and scene.GetFirstNodeByName(effect_logic.PREVIEW_NODE_NAME) is None


def test_module_logic_segments_liver_from_an_roi(scene, root, engine):

    c = make_case(root, "oblique", False)
    node = load_with_slicer(scene, c["image"])
    i0, j0, i1, j1, k = c["box"]
    itk_m = itk_ijk_to_ras(c["img"])
    lo = geometry.ras_to_ijk_point(node, (itk_m @ np.array([i0, j0, k - 1, 1.0]))[:3])
    hi = geometry.ras_to_ijk_point(node, (itk_m @ np.array([i1, j1, k + 1, 1.0]))[:3])
    roi = roi_in_volume_axes(scene, node, np.minimum(lo, hi), np.maximum(lo, hi))
    seg = volume_nodes.add_segmentation_node(scene, node, "Result")
    report = segment_in_process(scene, node, seg, "liver", effect_logic.EngineSettings(device="cpu"),
                                               roi_node=roi, engine=engine, propagate=False)
    assert seg.GetSegmentation().GetSegment(report["segment_id"]).GetName() == "Liver"
    mask = volume_nodes.segment_mask(seg, report["segment_id"], node)
    assert mask.sum() > 50
