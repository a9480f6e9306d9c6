"""The "Segment Anything" Segment Editor effect, without Qt.

:class:`SegmentAnythingSession` holds what the effect knows between clicks: the source volume
(as a ``samliverseg`` Volume), the prompt engine, the prompts collected so far, and the current
preview. The Qt effect turns mouse events into :meth:`~SegmentAnythingSession.click` /
:meth:`~SegmentAnythingSession.drag_box` calls, shows :class:`Outcome` messages, and displays
the preview and the prompts through :class:`PreviewDisplay` (plain MRML nodes).

Every user-facing failure comes back as an :class:`Outcome` with ``ok=False`` and a one-line
message; the scene is left as it was. Engine calls are serialised with a lock so that a
background prefetch thread (embedding slices ahead) and the GUI thread never run the model at the
same time; a click waits for at most one slice embedding.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Optional, Sequence

import numpy as np
import vtk

import slicer

from samliverseg.core.errors import CancelledError, InputError, PromptError, SAMLiverSegError

from . import geometry, markups_prompts, segment_writer, slice_clicks, volume_nodes

PREVIEW_NODE_NAME = "Segment Anything preview"
POSITIVE_NODE_NAME = "SAM positive points"
NEGATIVE_NODE_NAME = "SAM negative points"
BOX_NODE_NAME = "SAM box"
UNCERTAINTY_NODE_NAME = "Segment uncertainty"
UNCERTAINTY_COLOR_NAME = "SAM uncertainty"
#: Voxels whose ensemble variance is at least this are called uncertain (shown, and counted in the
#: message). With N binary votes, Var = p(1 - p): 0.05 means that ~6 % or more of the members
#: disagree with the majority.
UNCERTAINTY_THRESHOLD = 0.05


@dataclass
class Outcome:
    ok: bool
    message: str = ""
    seconds: float = 0.0
    voxels: int = 0
    cold: bool = False  # the slice had to be embedded (not cached)
    data: object = None  # what the computation produced, when the caller needs more than a mask


def is_model_3d(name: Optional[str]) -> bool:
    """True for a native 3D model (SAM-Med3D); False when the library lacks them."""
    try:
        from samliverseg.models.build_sam3d import is_model3d
    except ImportError:
        return False
    return bool(name) and is_model3d(name)


@dataclass
class EngineSettings:
    model: str = "lite_medsam"
    checkpoint: Optional[str] = None
    device: str = "auto"
    window: Optional[str] = None  # None: the model's own window
    cache_mb: float = 768
    backend: str = "auto"  # auto | torch | openvino | onnxruntime (samliverseg.interactive.backends)


class SegmentAnythingSession:
    """State and actions of the effect (see the module docstring)."""

    def __init__(self, settings: Optional[EngineSettings] = None,
                 engine_factory: Optional[Callable[[EngineSettings], object]] = None):
        self.settings = settings or EngineSettings()
        self._engine_factory = engine_factory or self._default_engine_factory
        self.engine = None
        self.volume_node = None
        self.volume = None
        self.builder: Optional[slice_clicks.PromptBuilder] = None
        self.preview: Optional[np.ndarray] = None  # uint8 [k, j, i]
        self.preview_is_3d = False
        self.intensity_check: Optional[volume_nodes.IntensityCheck] = None
        self.lock = threading.RLock()
        self.notes: List[str] = []
        # 3D models (SAM-Med3D): every click prompts the whole volume and refines the last result
        self.clicks3d: List[tuple] = []  # ((i, j, k), label) in the order clicked
        self.sent3d = 0  # how many of them the current result3d has seen
        self.result3d = None
        self._generation = 0  # bumped by clear(): a running 3D job's result is then dropped

    # -- engine ---------------------------------------------------------------------------
    def is_3d_model(self) -> bool:
        """True when the chosen model is a native 3D model (a click prompts the whole volume)."""
        return is_model_3d(self.settings.model)

    @staticmethod
    def _default_engine_factory(s: EngineSettings):
        """Any model by name (``samliverseg.api.open_model``); a 3D model z-scores its patches itself,
        so the CT window is not passed to it."""
        from samliverseg.api import open_model

        if is_model_3d(s.model):
            return open_model(s.model, s.checkpoint, s.device, None, cache_mb=s.cache_mb)
        return open_model(s.model, s.checkpoint, s.device, s.window, cache_mb=s.cache_mb, backend=s.backend)

    def _ensure_engine(self):
        if self.engine is None:
            self.engine = self._engine_factory(self.settings)
            if self.volume is not None and hasattr(self.engine, "set_volume"):
                self.engine.set_volume(self.volume)
        return self.engine

    def _run(self, fn):
        """Run ``fn(engine)`` under the lock; on GPU out-of-memory once more on the CPU, for good
        (``samliverseg.api.call_with_cpu_fallback``; the note goes to ``self.notes``)."""
        from samliverseg.api import call_with_cpu_fallback

        def attempt(device: str):
            if device != self.settings.device:  # the fallback: rebuild the engine on the CPU
                self.settings.device, self.engine = device, None
            return fn(self._ensure_engine())

        with self.lock:
            return call_with_cpu_fallback(attempt, self.settings.device, self.notes)

    def configure(self, settings: EngineSettings) -> None:
        """New model / checkpoint / device / window: the engine is rebuilt on next use."""
        if settings == self.settings:
            return
        with self.lock:
            if settings.window != self.settings.window and self.engine is not None and \
                    (settings.model, settings.checkpoint, settings.device) == \
                    (self.settings.model, self.settings.checkpoint, self.settings.device) and \
                    hasattr(self.engine, "set_window"):
                self.settings = settings
                self.engine.set_window(settings.window or self.engine.spec.window)
                return
            self.settings = settings
            self.engine = None

    # -- volume ---------------------------------------------------------------------------
    def set_volume_node(self, node) -> Outcome:
        """Use ``node`` as source volume; refuses 2D/RGB/non-volume input with a message."""
        t0 = time.perf_counter()
        try:
            volume = volume_nodes.volume_from_node(node)
        except SAMLiverSegError as exc:
            return Outcome(False, str(exc))
        check = volume_nodes.check_ct_intensities(volume.array)
        with self.lock:
            self.volume_node, self.volume, self.intensity_check = node, volume, check
            self.builder = slice_clicks.PromptBuilder(tuple(volume.array.shape), volume.array)
            self.preview, self.preview_is_3d = None, False
            self._reset_3d()
            if self.engine is not None and hasattr(self.engine, "set_volume"):
                self.engine.set_volume(volume)
        msg = "" if check.looks_like_ct else check.message
        if not check.looks_like_ct and self.settings.window is None:
            msg += " (the segmentation uses the model's CT window until you set a custom one)"
        return Outcome(True, msg, time.perf_counter() - t0)

    def _require_volume(self) -> None:
        if self.volume_node is None or self.builder is None:
            raise InputError("no source volume: select a CT volume as source volume first")

    # -- prompts --------------------------------------------------------------------------
    def click(self, slice_node, xy: Sequence[float], positive: bool = True, preview: bool = True) -> Outcome:
        """A left click (positive) or Shift+click (negative) at XY in a slice view."""
        try:
            self._require_volume()
            target = slice_clicks.map_click(slice_node, self.volume_node, xy, self.volume.array.shape)
            if self.is_3d_model():  # any view, any slice: the clicks are 3D points
                slice_clicks.check_slice_not_empty(self.volume.array, target.slice_axis, target.slice_index)
                with self.lock:
                    self.clicks3d.append((tuple(float(v) for v in target.ijk), 1 if positive else 0))
                    (self.builder.positive if positive else self.builder.negative).append(tuple(target.ijk))
                    self.builder.slice_axis, self.builder.current_slice = target.slice_axis, target.slice_index
                note = ""
            else:
                note = self.builder.add_point(target, positive)
        except SAMLiverSegError as exc:
            return Outcome(False, str(exc))
        return self._after_prompt(note, preview)

    def _after_prompt(self, note: str, preview: bool) -> Outcome:
        """Preview after a new prompt (unless told not to); a note of the prompt builder wins."""
        if not preview:
            return Outcome(True, note)
        out = self.update_preview()
        if out.ok and note:
            out.message = note
        return out

    def drag_box(self, slice_node, xy0: Sequence[float], xy1: Sequence[float], preview: bool = True) -> Outcome:
        if self.is_3d_model():
            return Outcome(False, f"{self.settings.model} takes points, not boxes: click inside the object "
                                  "(Shift+click outside it to remove a part)")
        try:
            self._require_volume()
            a = slice_clicks.map_click(slice_node, self.volume_node, xy0, self.volume.array.shape)
            b = slice_clicks.map_click(slice_node, self.volume_node, xy1, self.volume.array.shape, a.slice_axis)
            note = self.builder.set_box(a, b)
        except SAMLiverSegError as exc:
            return Outcome(False, str(exc))
        return self._after_prompt(note, preview)

    def _reset_3d(self) -> None:
        self.clicks3d, self.sent3d, self.result3d = [], 0, None
        self._generation += 1

    def clear(self) -> None:
        with self.lock:
            self._reset_3d()
            if self.builder is not None:
                self.builder.clear()
            self.preview, self.preview_is_3d = None, False

    def has_prompts(self) -> bool:
        return self.builder is not None and not self.builder.is_empty()

    # -- results --------------------------------------------------------------------------
    def _is_cached(self, engine, axis: str, index: int) -> bool:
        fn = getattr(engine, "is_cached", None)
        try:
            return bool(fn(axis, index)) if fn is not None else False
        except Exception:  # noqa: BLE001 - a cache query must never break a click
            return False

    def preview_job(self):
        """Snapshot the prompts of the slice last clicked (GUI thread).

        Returns a function that computes the 2D preview (run it in a worker thread), or an
        :class:`Outcome` saying why there is nothing to compute.
        """
        try:
            self._require_volume()
            if self.is_3d_model():
                with self.lock:
                    new, upto, gen = list(self.clicks3d[self.sent3d:]), len(self.clicks3d), self._generation
                if not new:
                    return Outcome(False, "click on the object")
                return lambda: self._compute_3d_click(new, upto, gen)
            prompts = self.builder.prompts_on_slice()
        except SAMLiverSegError as exc:
            return Outcome(False, str(exc))
        axis, index = prompts.slice_axis, self.builder.current_slice
        return lambda: self._compute_preview(prompts, axis, index)

    def update_preview(self) -> Outcome:
        """The 2D result on the slice last clicked (what the user sees at once)."""
        job = self.preview_job()
        return job if isinstance(job, Outcome) else job()

    def _compute_preview(self, prompts, axis: str, index: int) -> Outcome:
        t0 = time.perf_counter()
        try:
            def run(engine):
                cold = not self._is_cached(engine, axis, index)
                return engine.segment_slice(prompts), cold

            result, cold = self._run(run)
        except SAMLiverSegError as exc:
            return Outcome(False, str(exc), time.perf_counter() - t0)
        except Exception as exc:  # noqa: BLE001 - shown to the user, scene unchanged
            return Outcome(False, f"segmentation failed: {type(exc).__name__}: {exc}", time.perf_counter() - t0)
        mask = np.zeros(self.volume.array.shape, np.uint8)
        slice_clicks.slice_array(mask, axis, index)[...] = np.asarray(result.mask, dtype=bool)
        self.preview, self.preview_is_3d = mask, False
        n = int(np.count_nonzero(mask))
        msg = "" if n else "the model found nothing here: drag a box around the object"
        return Outcome(True, msg, time.perf_counter() - t0, n, cold)

    def _compute_3d_click(self, new, upto: int, generation: int) -> Outcome:
        """Send the clicks not yet seen to the 3D model, refining the previous result."""
        t0 = time.perf_counter()
        try:
            result = self._run(lambda e: e.segment(self.volume, [p for p, _ in new], [lab for _, lab in new],
                                                   previous=self.result3d))
        except SAMLiverSegError as exc:
            with self.lock:  # the clicks that failed are dropped, the earlier result stays
                if generation == self._generation:
                    self.clicks3d = self.clicks3d[:upto - len(new)] + self.clicks3d[upto:]
                    self.builder.positive = [p for p, lab in self.clicks3d if lab == 1]
                    self.builder.negative = [p for p, lab in self.clicks3d if lab == 0]
            return Outcome(False, str(exc), time.perf_counter() - t0)
        except Exception as exc:  # noqa: BLE001 - shown to the user, scene unchanged
            return Outcome(False, f"segmentation failed: {type(exc).__name__}: {exc}", time.perf_counter() - t0)
        with self.lock:
            if generation != self._generation:  # cleared meanwhile
                return Outcome(False, "the prompts were cleared", time.perf_counter() - t0)
            self.result3d, self.sent3d = result, upto
            self.preview, self.preview_is_3d = np.asarray(result.mask, dtype=np.uint8), True
        n = int(np.count_nonzero(self.preview))
        return Outcome(True, "" if n else "the model found nothing here: click inside the object",
                       time.perf_counter() - t0, n)

    def propagate_job(self):
        """Snapshot all prompts (GUI thread); returns ``fn(progress, cancel) -> Outcome`` or an Outcome."""
        if self.is_3d_model():
            return Outcome(False, f"{self.settings.model} segments in 3D at every click: Apply writes the result")
        try:
            self._require_volume()
            prompts = self.builder.prompts()
        except SAMLiverSegError as exc:
            return Outcome(False, str(exc))
        return lambda progress=None, cancel=None: self._compute_3d(prompts, progress, cancel)

    def propagate(self, progress: Optional[Callable[[int, int], None]] = None,
                  cancel: Optional[threading.Event] = None) -> Outcome:
        """Extend the prompts to 3D (both directions from the prompted slice(s))."""
        job = self.propagate_job()
        return job if isinstance(job, Outcome) else job(progress, cancel)

    def _compute_3d(self, prompts, progress, cancel) -> Outcome:
        t0 = time.perf_counter()
        try:
            result = self._run(lambda e: e.segment(prompts, propagate=True, progress=progress, cancel=cancel))
        except CancelledError:
            return Outcome(False, "propagation cancelled; the preview is unchanged", time.perf_counter() - t0)
        except SAMLiverSegError as exc:
            return Outcome(False, str(exc), time.perf_counter() - t0)
        except Exception as exc:  # noqa: BLE001
            return Outcome(False, f"propagation failed: {type(exc).__name__}: {exc}", time.perf_counter() - t0)
        self.preview, self.preview_is_3d = np.asarray(result.mask, dtype=np.uint8), True
        n = int(np.count_nonzero(self.preview))
        return Outcome(True, "" if n else "the model found nothing to propagate", time.perf_counter() - t0, n)

    def prefetch(self, axis: str, indices: Iterable[int], progress: Optional[Callable[[int, int], None]] = None,
                 cancel: Optional[threading.Event] = None) -> int:
        """Embed slices ahead of clicks, one at a time under the lock (run it in a thread)."""
        self._require_volume()
        todo = list(indices)
        done = 0
        for n, idx in enumerate(todo):
            if cancel is not None and cancel.is_set():
                break
            done += self._run(lambda e: e.prefetch([idx], slice_axis=axis))
            if progress is not None:
                progress(n + 1, len(todo))
        return done

    def uncertainty_job(self, segment_mask: Optional[np.ndarray] = None):
        """Snapshot the mask to analyse (GUI thread): the preview when there is one, else
        ``segment_mask`` (the selected segment's voxels on the source volume's grid, [k, j, i]).

        Returns ``fn(progress, cancel) -> Outcome`` whose ``data`` is a
        :class:`samliverseg.interactive.uncertainty.UncertaintyMap` (the prompt-ensemble variance), or an
        :class:`Outcome` saying why there is nothing to analyse.
        """
        if self.volume is None:
            return Outcome(False, "select a source volume first")
        if self.is_3d_model():
            return Outcome(False, "the uncertainty map uses a 2D model's prompt ensemble: choose lite_medsam "
                                  "(or another 2D model) to show it")
        mask = self.preview if self.preview is not None and np.any(self.preview) else segment_mask
        if mask is None or not np.any(mask):
            return Outcome(False, "nothing to analyse: segment the object first (a preview or the selected segment)")
        if tuple(np.shape(mask)) != tuple(self.volume.array.shape):
            return Outcome(False, "the segment is not on the source volume's grid")
        mask = np.array(mask, dtype=np.uint8, copy=True)
        axis = (self.builder.slice_axis if self.builder is not None else None) or "k"
        return lambda progress=None, cancel=None: self._compute_uncertainty(mask, axis, progress, cancel)

    def _compute_uncertainty(self, mask, axis, progress, cancel) -> Outcome:
        from samliverseg.interactive.uncertainty import ensemble_uncertainty

        t0 = time.perf_counter()
        try:
            umap = self._run(lambda e: ensemble_uncertainty(e, mask, slice_axis=axis, progress=progress, cancel=cancel))
        except CancelledError:
            return Outcome(False, "uncertainty cancelled", time.perf_counter() - t0)
        except SAMLiverSegError as exc:
            return Outcome(False, str(exc), time.perf_counter() - t0)
        except Exception as exc:  # noqa: BLE001
            return Outcome(False, f"uncertainty failed: {type(exc).__name__}: {exc}", time.perf_counter() - t0)
        n = int(np.count_nonzero(umap.variance >= UNCERTAINTY_THRESHOLD))
        frac = umap.uncertain_fraction(UNCERTAINTY_THRESHOLD)
        msg = (f"{100 * frac:.1f} % of the voxels the {umap.members} ensemble members touch are uncertain "
               f"(variance >= {UNCERTAINTY_THRESHOLD}); click there to correct")
        return Outcome(True, msg, time.perf_counter() - t0, n, data=umap)

    def apply(self, target: segment_writer.WriteTarget, segmentation_node, segment_id: str) -> Outcome:
        """Write the preview into the segment (undo saved first); prompts and preview are cleared."""
        t0 = time.perf_counter()
        if self.preview is None:
            return Outcome(False, "nothing to apply: click on the object or drag a box first")
        mode = "add" if self.preview_is_3d else "replace_slices"
        axis = self.builder.slice_axis or "k"
        try:
            report = segment_writer.write_mask(target, self.preview, self.volume_node, segmentation_node, segment_id,
                                               mode=mode, slice_axis=axis)
        except SAMLiverSegError as exc:
            return Outcome(False, str(exc), time.perf_counter() - t0)
        self.clear()
        return Outcome(True, "", time.perf_counter() - t0, report.voxels_in_mask)


# -- background work ---------------------------------------------------------------------------------

class BackgroundTask:
    """Run ``fn(progress, cancel)`` in a daemon thread; the GUI polls :meth:`done` from a QTimer.

    ``fn`` must not touch MRML (the scene is not thread-safe): it computes, the GUI thread shows.
    """

    def __init__(self, fn: Callable, name: str = "task"):
        self.name = name
        self.cancel_event = threading.Event()
        self.progress = (0, 0)
        self.result = None
        self.error: Optional[BaseException] = None
        self._fn = fn
        self._thread = threading.Thread(target=self._run, name=f"samliverseg-{name}", daemon=True)

    def start(self) -> "BackgroundTask":
        self._thread.start()
        return self

    def _set_progress(self, done: int, total: int) -> None:
        self.progress = (int(done), int(total))

    def _run(self) -> None:
        try:
            self.result = self._fn(self._set_progress, self.cancel_event)
        except BaseException as exc:  # noqa: BLE001 - handed to the GUI thread
            self.error = exc

    def done(self) -> bool:
        return not self._thread.is_alive()

    def cancel(self) -> None:
        self.cancel_event.set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        self._thread.join(timeout)
        return self.done()


# -- display in the views (plain MRML nodes) --------------------------------------------------------

class PreviewDisplay:
    """The preview as a segmentation node, the prompts as markups: visible until applied or cleared."""

    def __init__(self, scene):
        self.scene = scene
        self.preview_node = None
        self.positive_node = None
        self.negative_node = None
        self.box_node = None
        self.uncertainty_node = None

    def _points_node(self, name: str, color) -> "slicer.vtkMRMLMarkupsFiducialNode":
        node = slicer.vtkMRMLMarkupsFiducialNode()
        node.SetName(name)
        node.SetHideFromEditors(True)
        node.SetSaveWithScene(False)
        self.scene.AddNode(node)
        node.CreateDefaultDisplayNodes()
        node.SetLocked(True)
        d = node.GetDisplayNode()
        if d is not None:
            d.SetSelectedColor(*color)
            d.SetColor(*color)
            d.SetTextScale(0.0)
        return node

    def show_prompts(self, volume_node, builder: slice_clicks.PromptBuilder) -> None:
        if self.positive_node is None:
            self.positive_node = self._points_node(POSITIVE_NODE_NAME, (0.1, 0.9, 0.1))
            self.negative_node = self._points_node(NEGATIVE_NODE_NAME, (0.95, 0.1, 0.1))
        markups_prompts.add_points_to_markups(self.positive_node, volume_node, builder.positive, "+")
        markups_prompts.add_points_to_markups(self.negative_node, volume_node, builder.negative, "-")
        self._show_box(volume_node, builder)

    def _show_box(self, volume_node, builder) -> None:
        if builder.box is None:
            if self.box_node is not None:
                self.box_node.GetDisplayNode().SetVisibility(False) if self.box_node.GetDisplayNode() else None
            return
        if self.box_node is None:
            self.box_node = slicer.vtkMRMLMarkupsROINode()
            self.box_node.SetName(BOX_NODE_NAME)
            self.box_node.SetHideFromEditors(True)
            self.box_node.SetSaveWithScene(False)
            self.scene.AddNode(self.box_node)
            self.box_node.CreateDefaultDisplayNodes()
            self.box_node.SetLocked(True)
        m = geometry.world_ijk_to_ras(volume_node)
        lo, hi = np.array(builder.box.lo()), np.array(builder.box.hi())
        c = "ijk".index(builder.slice_axis)
        centre_ijk = (lo + hi) / 2.0
        spacing = np.linalg.norm(m[:3, :3], axis=0)
        axes = m[:3, :3] / spacing
        size = (hi - lo) * spacing
        size[c] = spacing[c]  # one voxel thick
        obj = np.eye(4)
        obj[:3, :3] = axes
        obj[:3, 3] = (m @ np.array([*centre_ijk, 1.0]))[:3]
        self.box_node.SetAndObserveObjectToNodeMatrix(geometry.vtk_matrix_from_array(obj))
        self.box_node.SetSize(*[float(v) for v in size])
        if self.box_node.GetDisplayNode() is not None:
            self.box_node.GetDisplayNode().SetVisibility(True)

    def show_preview(self, volume_node, mask: Optional[np.ndarray], color=(1.0, 0.85, 0.1)) -> None:
        if mask is None:
            if self.preview_node is not None:
                self.scene.RemoveNode(self.preview_node)
                self.preview_node = None
            return
        if self.preview_node is None:
            self.preview_node = volume_nodes.add_segmentation_node(self.scene, volume_node, PREVIEW_NODE_NAME)
            self.preview_node.SetHideFromEditors(True)
            self.preview_node.SetSaveWithScene(False)
            self.preview_node.GetSegmentation().AddEmptySegment("preview", "preview", list(color))
            parent = volume_node.GetParentTransformNode()
            self.preview_node.SetAndObserveTransformNodeID(parent.GetID() if parent else None)
        image = volume_nodes.oriented_image_from_mask(mask, geometry.ijk_to_ras(volume_node))
        slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
            image, self.preview_node, "preview", slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)

    def show_uncertainty(self, volume_node, variance: np.ndarray):
        """The variance map as a scalar volume on the source volume's grid (and parent transform),
        coloured from transparent (certain) to yellow/red (uncertain), below
        ``UNCERTAINTY_THRESHOLD / 2`` thresholded away; returns the node (the Qt effect shows it
        as the slice views' foreground layer)."""
        node = self.uncertainty_node
        if node is None or not self.scene.IsNodePresent(node):
            node = volume_nodes.add_volume_node(self.scene, np.asarray(variance, np.float32),
                                                geometry.ijk_to_ras(volume_node), UNCERTAINTY_NODE_NAME)
            node.SetHideFromEditors(True)
            node.SetSaveWithScene(False)
            parent = volume_node.GetParentTransformNode()
            node.SetAndObserveTransformNodeID(parent.GetID() if parent else None)
            node.CreateDefaultDisplayNodes()
            self.uncertainty_node = node
        else:
            volume_nodes.update_volume_node(node, np.asarray(variance, np.float32))
            geometry.set_ijk_to_ras(node, geometry.ijk_to_ras(volume_node))
        display = node.GetDisplayNode()
        if display is not None:
            display.SetAndObserveColorNodeID(self._uncertainty_colors().GetID())
            display.SetAutoWindowLevel(False)
            display.SetWindowLevelMinMax(0.0, 0.25)  # the largest variance of binary votes
            display.SetApplyThreshold(True)
            display.SetAutoThreshold(False)
            display.SetLowerThreshold(UNCERTAINTY_THRESHOLD / 2)
            display.SetUpperThreshold(1.0)
        return node

    def _uncertainty_colors(self):
        node = self.scene.GetFirstNodeByName(UNCERTAINTY_COLOR_NAME)
        if node is not None:
            return node
        node = slicer.vtkMRMLColorTableNode()
        node.SetName(UNCERTAINTY_COLOR_NAME)
        node.SetTypeToUser()
        node.SetHideFromEditors(True)
        node.SetSaveWithScene(False)
        n = 64
        node.SetNumberOfColors(n)
        for i in range(n):  # dark yellow -> bright red
            t = i / (n - 1)
            node.SetColor(i, f"u{i}", 1.0, 0.9 * (1.0 - t) + 0.1, 0.1 * (1.0 - t), 1.0)
        self.scene.AddNode(node)
        return node

    def hide_uncertainty(self) -> None:
        node = self.uncertainty_node
        if node is not None and self.scene.IsNodePresent(node):
            self.scene.RemoveNode(node)
        self.uncertainty_node = None

    def preview_mask(self, volume_node) -> Optional[np.ndarray]:
        if self.preview_node is None:
            return None
        return volume_nodes.segment_mask(self.preview_node, "preview", volume_node)

    def clear(self) -> None:
        for name in ("preview_node", "positive_node", "negative_node", "box_node"):
            node = getattr(self, name)
            if node is not None and self.scene.IsNodePresent(node):
                self.scene.RemoveNode(node)
            setattr(self, name, None)
