"""Helpers of the Qt-free logic tests (a uniquely named module, so that ``conftest`` never clashes).

Volumes of several geometries, slice nodes set up the way a slice view sets them up, a small
CT-like array. ``slicer`` here is the slicer-core wheel: Slicer's MRML, Segmentations and Segment
Editor logic without Qt, the same C++ classes the application uses.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

MODULE_DIR = Path(__file__).resolve().parents[2]  # .../SAMLiverSeg
REPO_ROOT = MODULE_DIR.parent
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

os.environ.setdefault("SAMLIVERSEG_CACHE", str(REPO_ROOT / ".cache" / "samliverseg"))

import slicer  # noqa: E402  (slicer-core)

from SAMLiverSegLogic import volume_nodes  # noqa: E402


def rotation(axis, degrees):
    a = np.radians(degrees)
    c, s = np.cos(a), np.sin(a)
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def make_ijk_to_ras(spacing, origin_ras, directions_ras):
    m = np.eye(4)
    m[:3, :3] = np.asarray(directions_ras, float) @ np.diag(spacing)
    m[:3, 3] = origin_ras
    return m


#: The geometry cases every geometric test runs on: (name, IJKToRAS).
GEOMETRIES = {
    # i -> R, j -> A, k -> S, 1 mm
    "identity": make_ijk_to_ras((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3)),
    # the usual DICOM axial CT (LPS-aligned: i -> L, j -> P) with k reversed (feet first)
    "flipped": make_ijk_to_ras((0.8, 0.8, 2.0), (120.5, 95.25, -40.0), np.diag([-1.0, -1.0, -1.0])),
    # rotated 25 degrees about S, then 12 degrees about R
    "oblique": make_ijk_to_ras((0.9, 0.9, 1.5), (-30.0, 12.0, 7.5), rotation("x", 12) @ rotation("z", 25)),
    # strongly anisotropic voxels, shifted origin
    "anisotropic": make_ijk_to_ras((0.6, 1.1, 4.0), (-80.0, -60.0, 100.0), np.eye(3)),
}


def blob_ct(shape_kji=(24, 40, 48), seed=0):
    """A small CT-like array: air around a soft-tissue body with a brighter organ and noise."""
    rng = np.random.default_rng(seed)
    k, j, i = np.indices(shape_kji)
    nk, nj, ni = shape_kji
    body = ((i - ni / 2) / (ni * 0.45)) ** 2 + ((j - nj / 2) / (nj * 0.42)) ** 2 < 1
    organ = ((i - ni * 0.4) / (ni * 0.2)) ** 2 + ((j - nj * 0.45) / (nj * 0.2)) ** 2 + \
        ((k - nk / 2) / (nk * 0.35)) ** 2 < 1
    arr = np.full(shape_kji, -1000.0, np.float32)
    arr[body] = 20.0
    arr[organ] = 110.0
    arr += rng.normal(0, 5, shape_kji).astype(np.float32)
    return arr.astype(np.int16)


def add_ct(scene, ijk_to_ras, shape_kji=(24, 40, 48), name="CT", seed=0):
    return volume_nodes.add_volume_node(scene, blob_ct(shape_kji, seed), ijk_to_ras, name)


def slice_node_for(scene, orientation, volume_node=None, dims=(480, 360), fov_mm=None):
    """A slice node set up as a slice view does: orientation preset, view size, field of view."""
    node = scene.AddNewNodeByClass("vtkMRMLSliceNode")
    node.SetLayoutName(f"View{scene.GetNumberOfNodesByClass('vtkMRMLSliceNode')}")
    node.SetOrientation(orientation)
    if volume_node is not None:
        node.RotateToVolumePlane(volume_node)
    node.SetDimensions(dims[0], dims[1], 1)
    w = fov_mm or 160.0
    node.SetFieldOfView(w, w * dims[1] / dims[0], 1.0)
    node.UpdateMatrices()
    return node


def centre_view_on(slice_node, ras):
    """Put the slice plane through ``ras`` and the view centre on it (like Slicer's jump to point)."""
    slice_node.JumpSliceByCentering(float(ras[0]), float(ras[1]), float(ras[2]))
    slice_node.UpdateMatrices()


def roi_in_volume_axes(scene, vol, lo_ijk, hi_ijk):
    """An ROI whose box is exactly the IJK box ``lo..hi`` (rotated with an oblique volume)."""
    from SAMLiverSegLogic.module_logic import roi_node_for_ijk_box

    return roi_node_for_ijk_box(scene, vol, lo_ijk, hi_ijk)


def pump(session, until, timeout=300.0):
    """Drive a worker-backed effect session as Slicer's event loop does: sleep in ``select()`` on
    the worker's pipe (``session.watch()``, what the effect's QSocketNotifier watches) or until the
    next request timeout, then ``session.poll()``; never ``join()`` or a blocking ``wait()``.

    Returns the :class:`Outcome` s seen once ``until(outcomes)`` is true (AssertionError after
    ``timeout`` seconds).
    """
    import select
    import time

    outcomes = []
    deadline = time.monotonic() + timeout
    while True:
        outcomes += session.poll()
        if until(outcomes):
            return outcomes
        if time.monotonic() > deadline:
            raise AssertionError(f"no answer within {timeout:g} s; outcomes so far: {outcomes}")
        watched, t = session.watch(), session.next_timeout()
        wait = 0.1 if t is None else min(0.1, t)
        if watched is None:
            time.sleep(wait)
        else:
            select.select([watched[1]], [], [], wait)


def segment_in_process(scene, volume_node, segmentation_node, target: str, settings, roi_node=None,
                         positive_node=None, negative_node=None, engine=None, propagate: bool = True,
                         editor=None, progress=None, cancel=None):
    """The reference for the worker path of the module panel (``module_logic.PanelRun``): the same
    markups and the same ``module_logic.apply_mask``, with ``engine`` (or the model opened by name)
    in this (the test's) process. Returns a report dict."""
    import time
    from typing import List

    from SAMLiverSegLogic import module_logic

    if target not in module_logic.TARGETS:
        raise module_logic.InputError(f"unknown target {target!r}: liver or tumor")
    if segmentation_node is None:
        raise module_logic.InputError("no output segmentation: choose or create one")
    t0 = time.perf_counter()
    volume = module_logic.volume_nodes.volume_from_node(volume_node)
    prompts = module_logic.markups_prompts.prompts_from_markups(volume_node, roi_node, positive_node, negative_node)
    notes: List[str] = []
    from samliverseg.api import call_with_cpu_fallback, open_model

    first = str(getattr(engine, "device", None) or settings.device)

    def run(device: str):  # the given engine, else the model opened by name; on the CPU after a GPU OOM
        eng = engine if engine is not None and device == first else open_model(
            settings.model, settings.checkpoint, device, settings.window, notes=notes)
        eng.set_volume(volume)
        return eng.segment(prompts, propagate=propagate, progress=progress, cancel=cancel)

    result = call_with_cpu_fallback(run, first, notes)
    _node, segment_id, _editor = module_logic.apply_mask(scene, volume_node, segmentation_node, target, result.mask, editor)
    report = dict(getattr(result, "report", {}) or {})
    report.update({"segment_id": segment_id, "segment_name": module_logic.TARGETS[target][0], "notes": notes,
                   "wall_s": round(time.perf_counter() - t0, 3)})
    return report
