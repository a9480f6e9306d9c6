"""The "Segment Anything" Segment Editor effect, without Qt, backed by the inference worker.

Slicer's process runs no model code: every preview, propagation, prefetch, uncertainty map and
3D-model call is a request to the persistent inference worker (``samliverseg worker``) through the
Qt-free client :mod:`.worker_client` (the module's one :func:`~.worker_client.shared_client`).

:class:`SegmentAnythingSession` holds what the effect knows between clicks: the source volume
node, the prompts collected so far (IJK, :class:`.slice_clicks.PromptBuilder`), the requests in
flight and the current preview. It never blocks and starts no thread:

* :meth:`~SegmentAnythingSession.click` / :meth:`~SegmentAnythingSession.drag_box` record a
  prompt and send the worker a ``prompt`` request (RAS points/box on the slice, see
  WORKER_PROTOCOL.md); :meth:`~SegmentAnythingSession.start_propagate`,
  :meth:`~SegmentAnythingSession.start_uncertainty` send theirs. Each returns at once.
* Once a 3D result of a 2D model is shown (a propagation), a click in any view or a box on any
  slice of the prompts' axis corrects it: a ``correct`` request with that one prompt and the
  ``result_id`` of the result shown, which the worker applies to the result it holds (``CorrectionSession``: only the
  slices the correction walks through are decoded), or, holding another, makes again from all the
  prompts. Corrections clicked while one is in flight are queued; one the worker refuses (a click
  that would add an organ) is taken out of the prompts, and the result shown stays.
  :meth:`~SegmentAnythingSession.undo_correction` takes the last correction back (its prompt, and
  in the worker the slices it changed).
* The volume goes to the worker lazily (at the first prompt), not when the source volume
  changes, and again before a request whenever the shared worker holds another volume (the
  module panel's run loaded its own, or the voxels changed): the client knows which volume it
  holds (``worker_client.volume_node_key``: node ID, image MTime, world IJKToRAS) and requests
  run in the order sent, so nothing waits. A restarted worker gets it again from the client.
* The session talks through its own ``worker_client.Channel`` on the shared client: its
  :meth:`~SegmentAnythingSession.poll` gets the messages of its own requests only, whichever
  user's notifier read the pipe; :attr:`~SegmentAnythingSession.notify` is called when another
  user's poll took some of them.
* :meth:`~SegmentAnythingSession.poll` is called when :meth:`~SegmentAnythingSession.watch`'s pipe
  is readable (a ``QSocketNotifier`` in Slicer; ``select()`` in tests) and when
  :meth:`~SegmentAnythingSession.next_timeout` passes. It takes the worker's answers, applies them
  to the scene (the preview segmentation node, the uncertainty overlay; :class:`PreviewDisplay`)
  and returns them as :class:`Outcome` s for the GUI to show.

Every user-facing failure is an :class:`Outcome` with ``ok=False`` and a one-line message, and
the scene is left as it was. A worker that crashes or runs out of memory fails the requests in
flight with the client's one-line message; the next prompt restarts it.

Frames: prompts are kept in IJK of the source volume (``[k, j, i]`` arrays, IJK points) and sent
in world RAS (parent transforms applied), with the slice axis given as its RAS direction
(``normal``), so the worker prompts exactly the slice the click snapped to.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from vtk.util import numpy_support

import slicer

from samliverseg.core.errors import InputError, PromptError, SAMLiverSegError
from samliverseg.core.prompts import IJK_INDEX, Prompts

from . import geometry, markups_prompts, segment_writer, slice_clicks, volume_nodes
from .constants import EFFECT_NAME, MODEL_3D_CHOICES
from .worker_client import WorkerError, prompt_fields

#: What a request can fail with before it reaches the worker: bad input, a worker that cannot
#: start (or speaks another protocol version), a session folder that cannot be written.
SEND_ERRORS = (SAMLiverSegError, WorkerError, OSError)

PREVIEW_NODE_NAME = "Segment Anything preview"
POSITIVE_NODE_NAME = "SAM positive points"
NEGATIVE_NODE_NAME = "SAM negative points"
BOX_NODE_NAME = "SAM box"
UNCERTAINTY_NODE_NAME = "Segment uncertainty"
UNCERTAINTY_COLOR_NAME = "SAM uncertainty"
#: Voxels whose ensemble variance is at least this are called uncertain (shown, and counted in the
#: message). With N binary votes, Var = p(1 - p): 0.05 means that ~6 % or more of the members
#: disagree with the majority. (The worker's ``uncertain_fraction`` uses the same threshold.)
UNCERTAINTY_THRESHOLD = 0.05
#: Slices embedded ahead on each side of a clicked slice (a background ``prefetch``).
NEIGHBOUR_PREFETCH = 4
#: The requests whose result the user waits for (one at a time; clear() drops them).
USER_TASKS = ("preview", "propagate", "correct", "uncertainty", "click3d")
#: Seconds a ``prompt`` may take before the client answers it with an error and cancels it (the
#: first one also waits for the model to build and the volume to load).
PROMPT_TIMEOUT_S = 600.0

#: The effect's parameters and their defaults. None is empty: Slicer's ``setParameterDefault``
#: stores nothing for an empty value (``setCommonParameter`` skips it), and ``parameter()`` of a
#: name that is not stored logs a critical error; so optional ones (the checkpoint) have no
#: default here and are read with :func:`read_parameter`, which never calls ``parameter()``.
PARAMETER_DEFAULTS = {"Model": "lite_medsam", "Device": "auto", "Backend": "auto", "Window": "model",
                      "CustomWindow": "-200,300", "DecoderPrecision": "fp32"}
OPTIONAL_PARAMETERS = ("Checkpoint",)


def parameter_attribute(name: str) -> str:
    """Where Slicer stores an effect parameter: the parameter set node's attribute ``"<effect>.<name>"``
    (qSlicerSegmentEditorAbstractEffect::setParameter)."""
    return f"{EFFECT_NAME}.{name}"


def read_parameter(parameter_set_node, name: str) -> str:
    """An effect parameter from the segment editor node, its default ('' for an optional one) when
    it is not stored; never logs (unlike ``scriptedEffect.parameter()`` of an unset name)."""
    value = parameter_set_node.GetAttribute(parameter_attribute(name)) if parameter_set_node is not None else None
    return value if value else PARAMETER_DEFAULTS.get(name, "")


@dataclass
class Outcome:
    ok: bool
    message: str = ""
    seconds: float = 0.0
    voxels: int = 0
    cold: bool = False  # the slice had to be embedded (not cached)
    data: object = None  # what the computation produced, when the caller needs more than a mask
    kind: str = ""  # what finished: preview, propagate, correct, uncertainty, volume, prefetch ('' for a direct answer)


def is_model_3d(name: Optional[str]) -> bool:
    """True for a native 3D model (the SAM-Med3D family: ``sam_med3d``, ``sam_med3d_turbo``,
    ``sam_med3d_tiny``), by name: no model code is imported in Slicer's process to decide it."""
    return bool(name) and (name in MODEL_3D_CHOICES or name.startswith("sam_med3d"))


@dataclass
class EngineSettings:
    """What the worker is started with (another value of any field means another worker)."""

    model: str = "lite_medsam"
    checkpoint: Optional[str] = None
    device: str = "auto"
    window: Optional[str] = None  # None: the model's own window
    cache_mb: float = 768
    backend: str = "auto"  # auto | torch | openvino | onnxruntime (samliverseg.interactive.backends)
    #: fp32 | bf16: the mask decoder's precision (bf16: faster corrections where OpenVINO has native bf16)
    decoder_precision: str = "fp32"
    python: Optional[str] = None  # the worker's interpreter (Slicer: PythonSlicer); None: this one

    def client_settings(self) -> Dict[str, Any]:
        """The keyword arguments of :func:`.worker_client.shared_client`."""
        three_d = is_model_3d(self.model)  # a 3D model z-scores its patches itself and caches nothing
        return {"python": self.python, "model": self.model, "checkpoint": self.checkpoint, "device": self.device,
                "window": None if three_d else self.window, "cache_mb": None if three_d else self.cache_mb,
                "backend": self.backend, "decoder_precision": "fp32" if three_d else self.decoder_precision}


def worker_python() -> str:
    """The worker's interpreter: Slicer's ``PythonSlicer`` (Slicer's Python with its environment)
    when on the PATH, else this Python."""
    return shutil.which("PythonSlicer") or sys.executable


def default_client_factory(settings: EngineSettings):
    """The module's shared worker client for these settings (imported late: Qt-free and model-free)."""
    from . import worker_client

    return worker_client.shared_client(**settings.client_settings())


def send_error_message(exc: BaseException) -> str:
    """One line for a request that could not be sent."""
    if isinstance(exc, OSError) and not isinstance(exc, WorkerError):
        return f"cannot hand the data to the inference worker: {exc}"
    return str(exc)


def voxels_view(volume_node) -> np.ndarray:
    """The voxels of a scalar volume node as ``[k, j, i]``, a view of VTK's array (no copy)."""
    image = volume_node.GetImageData()
    d = image.GetDimensions()
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(d[2], d[1], d[0])


@dataclass
class Task:
    """A request in flight."""

    kind: str  # volume | preview | propagate | correct | uncertainty | prefetch | click3d
    generation: int  # the prompts' generation when it was sent (clear() starts a new one)
    sent: float = field(default_factory=time.perf_counter)
    slice_axis: Optional[str] = None
    slice_index: Optional[int] = None
    volume_rid: Optional[int] = None  # the load_volume it was sent behind
    progress: Tuple[int, int] = (0, 0)
    cancelled: bool = False
    extra: Dict[str, Any] = field(default_factory=dict)


class SegmentAnythingSession:
    """State and actions of the effect (see the module docstring)."""

    def __init__(self, settings: Optional[EngineSettings] = None, scene=None,
                 client_factory: Optional[Callable[[EngineSettings], Any]] = None):
        self.settings = settings or EngineSettings()
        self._client_factory = client_factory or default_client_factory
        self.client = None
        self.channel = None  # this session's worker_client.Channel on the client (its requests' messages)
        #: called when another user of the shared worker took this session's messages from the pipe
        #: (the Qt effect schedules a poll: its own notifier will not fire for them)
        self.notify: Optional[Callable[[], None]] = None
        self.display = PreviewDisplay(scene) if scene is not None else None
        self.volume_node = None
        self.shape_kji: Optional[Tuple[int, int, int]] = None
        self.builder: Optional[slice_clicks.PromptBuilder] = None
        self.preview: Optional[np.ndarray] = None  # uint8 [k, j, i]
        self.preview_is_3d = False
        self.intensity_check: Optional[volume_nodes.IntensityCheck] = None
        self.tasks: Dict[int, Task] = {}
        self.generation = 0
        self.preview_pending = False  # a prompt changed while a preview was in flight
        self._checked: Optional[tuple] = None  # the volume (worker_client.volume_node_key) the intensity check is of
        self._volume_rid: Optional[int] = None  # the last load_volume this session sent
        self._volume_failed: set = set()  # load_volume ids that failed: the requests behind them are dropped
        # 3D models (SAM-Med3D): every click prompts the whole volume and refines the last result
        self.clicks3d: List[tuple] = []  # ((i, j, k), label) in the order clicked
        self.sent3d = 0  # how many of them the current 3D result has seen
        # 2D models: once a 3D result is shown, a prompt on any slice corrects it in the worker
        # (``correct``: only the slices it changes are decoded) instead of previewing its slice
        self.result_id: Optional[str] = None  # the worker's id of the 3D result shown
        self.pending_corrections: List[Tuple[Dict[str, Any], Callable[[], None]]] = []  # (correction, undo)
        self.applied: List[Callable[[], None]] = []  # corrections of the result shown: each one's undo, in order

    # -- worker ---------------------------------------------------------------------------
    def is_3d_model(self) -> bool:
        """True when the chosen model is a native 3D model (a click prompts the whole volume)."""
        return is_model_3d(self.settings.model)

    def _client(self):
        """The worker client for the current settings (made on first use; never blocks)."""
        client = self._client_factory(self.settings)
        if client is not self.client or self.channel is None:
            self._forget_tasks()
            self.client = client
            self.channel = client.channel(EFFECT_NAME, notify=self._notify)
        return client

    def _notify(self) -> None:
        if self.notify is not None:
            self.notify()

    def _forget_tasks(self) -> None:
        """Drop the requests in flight (cancelled; their answers are dropped): the client changed or
        the session ends."""
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        self.tasks.clear()
        self.preview_pending = False

    def configure(self, settings: EngineSettings) -> None:
        """New model / checkpoint / device / window: the next request goes to a worker started with them."""
        if settings == self.settings:
            return
        model_kind_changed = is_model_3d(settings.model) != is_model_3d(self.settings.model)
        self.settings = settings
        if model_kind_changed:
            self.clear()

    def watch(self) -> Optional[Tuple[int, int]]:
        """``(starts, fileno)`` of the worker's pipe to watch (a new notifier when it changes), or None."""
        return self.client.watch() if self.client is not None else None

    def next_timeout(self) -> Optional[float]:
        """Seconds until a request timeout passes (poll then, even if the pipe stays silent), or None."""
        return self.client.next_timeout() if self.client is not None else None

    def busy(self) -> Optional[str]:
        """The kind of the user-visible computation in flight (preview, propagate, correct, uncertainty,
        click3d), or None."""
        for task in self.tasks.values():
            if task.kind in USER_TASKS and not task.cancelled:
                return task.kind
        return None

    def progress(self) -> Tuple[int, int]:
        """(done, total) of the propagation or uncertainty in flight ((0, 0) if none)."""
        for task in self.tasks.values():
            if task.kind in ("propagate", "correct", "uncertainty") and not task.cancelled:
                return task.progress
        return 0, 0

    def shutdown(self) -> None:
        """Cancel what is in flight and forget the worker (the shared worker itself stays for the module)."""
        self._forget_tasks()
        self.client = None

    # -- volume ---------------------------------------------------------------------------
    def set_volume_node(self, node) -> Outcome:
        """Use ``node`` as source volume: cheap (no copy, nothing sent; the first prompt sends it).

        Refuses 2D/RGB/non-volume input with a message.
        """
        t0 = time.perf_counter()
        try:
            dims = volume_nodes.check_source_volume(node)
        except SAMLiverSegError as exc:
            return Outcome(False, str(exc))
        self.clear()
        self.volume_node = node
        self.shape_kji = (int(dims[2]), int(dims[1]), int(dims[0]))
        self.builder = slice_clicks.PromptBuilder(self.shape_kji, None)
        self.intensity_check, self._checked = None, None
        return Outcome(True, "", time.perf_counter() - t0)

    def _require_volume(self) -> None:
        if self.volume_node is None or self.builder is None:
            raise InputError("no source volume: select a CT volume as source volume first")
        if self.volume_node.GetScene() is None:
            raise InputError("the source volume was removed from the scene: select a CT volume")
        dims = volume_nodes.check_source_volume(self.volume_node)
        shape = (int(dims[2]), int(dims[1]), int(dims[0]))
        if shape != self.shape_kji:  # the voxels were replaced by another grid
            self.set_volume_node(self.volume_node)
        self.builder.array_kji = voxels_view(self.volume_node)  # for the empty-slice check; no copy

    def _ensure_volume(self) -> Tuple[Optional[int], str]:
        """Make the shared worker hold the source volume for the request sent next: ``load_volume``
        unless the volume it holds is this node as it is now (``Channel.ensure_volume_node``: the
        panel may have loaded another one, even of the same geometry, meanwhile). Returns the id of
        the last load_volume this session sent (the request is dropped if that one failed) and a
        note for the user: the intensity check, once per volume content."""
        from .worker_client import volume_node_key

        key = volume_node_key(self.volume_node)
        note = ""
        if key != self._checked:
            view = voxels_view(self.volume_node)
            self.intensity_check = check = volume_nodes.check_ct_intensities(view)
            note = "" if check.looks_like_ct else check.message
            if note and self.settings.window is None:
                note += " (the segmentation uses the model's CT window until you set a custom one)"
        rid, sent = self.channel.ensure_volume_node(self.volume_node)
        self._checked = key
        if sent:
            self.tasks[rid] = Task("volume", self.generation)
            self._volume_rid = rid
        elif self._volume_rid in self._volume_failed:  # the worker holds it from another user's load
            self._volume_rid = None
        return self._volume_rid, note

    # -- prompts --------------------------------------------------------------------------
    def click(self, slice_node, xy: Sequence[float], positive: bool = True, preview: bool = True) -> Outcome:
        """A click (positive) or negative click at XY in a slice view; sends the preview request."""
        try:
            self._require_volume()
            target = slice_clicks.map_click(slice_node, self.volume_node, xy, self.shape_kji)
            if self.is_3d_model():  # any view, any slice: the clicks are 3D points
                slice_clicks.check_slice_not_empty(self.builder.array_kji, target.slice_axis, target.slice_index)
                self.clicks3d.append((tuple(float(v) for v in target.ijk), 1 if positive else 0))
                (self.builder.positive if positive else self.builder.negative).append(tuple(target.ijk))
                self.builder.slice_axis, self.builder.current_slice = target.slice_axis, target.slice_index
                note = ""
            else:
                correcting = preview and self._correcting(target.slice_axis, point=True)
                # a correcting click in another view joins the prompts (a voxel lies on a slice of every axis)
                note = (self.builder.add_correction_point if correcting else self.builder.add_point)(target, positive)
                if correcting:
                    added = self.builder.positive if positive else self.builder.negative
                    point = added[-1]
                    fields = self._ras_fields(Prompts(positive=[point], slice_axis=target.slice_axis))
                    return self._correct({"point": fields["points"][0], "label": int(positive)}, note,
                                         lambda: added.remove(point))
        except SAMLiverSegError as exc:
            return Outcome(False, str(exc))
        return self._after_prompt(note, preview)

    def drag_box(self, slice_node, xy0: Sequence[float], xy1: Sequence[float], preview: bool = True) -> Outcome:
        if self.is_3d_model():
            return Outcome(False, f"{self.settings.model} takes points, not boxes: click inside the object "
                                  "(Ctrl+click outside it to remove a part)")
        try:
            self._require_volume()
            a = slice_clicks.map_click(slice_node, self.volume_node, xy0, self.shape_kji)
            b = slice_clicks.map_click(slice_node, self.volume_node, xy1, self.shape_kji, a.slice_axis)
            correcting = preview and self._correcting(a.slice_axis)
            if not correcting and self._would_drop_3d_result(a.slice_axis):
                raise PromptError(
                    f"a box in this view would start the prompts over (they lie on {self.builder.slice_axis} slices) "
                    "and drop the 3D result shown: Apply or Clear it first; a box in the prompts' view, or a "
                    "click in any view, corrects it")
            replaced = next((q for q in [self.builder.box] + self.builder.boxes
                             if q is not None and self.builder.box_slice(q) == a.slice_index), None)
            note = self.builder.set_box(a, b)
            if correcting:
                box = self.builder.box
                fields = self._ras_fields(Prompts(box=box, slice_axis=a.slice_axis))

                def undo():  # this box out, the one it replaced back; boxes queued after it stay
                    kept = [q for q in [self.builder.box] + self.builder.boxes if q is not None and q is not box]
                    kept += [replaced] if replaced is not None else []
                    self.builder.box, self.builder.boxes = (kept[-1], kept[:-1]) if kept else (None, [])

                return self._correct({"box": fields["box"]}, note, undo)
        except SAMLiverSegError as exc:
            return Outcome(False, str(exc))
        return self._after_prompt(note, preview)

    def _would_drop_3d_result(self, slice_axis: str) -> bool:
        """True when a box on an ``slice_axis`` slice would start the prompts over (they lie across
        another axis) while a 3D result that is not applied is shown: a propagation, and the
        corrections made to it, that would be lost with them."""
        return (self.preview_is_3d and self.preview is not None and bool(self.preview.any())
                and not self.builder.is_empty() and self.builder.slice_axis not in (None, slice_axis))

    def _correcting(self, slice_axis: str, point: bool = False) -> bool:
        """True when a prompt on an ``slice_axis`` slice corrects the 3D result shown (a 2D model's
        propagation, or a correction of it) rather than previewing its slice: a ``point`` in any
        view (the worker corrects the slice through it that its session walks across), a box on a
        slice across the prompts' axis (in another view a box starts the prompts over, and is
        refused while an unapplied 3D result is shown: ``_would_drop_3d_result``)."""
        hello = self.client.hello_result if self.client is not None else None
        # an older worker lacks ``correct``; one (re)starting now is this installation's and has it
        served = hello is None or "correct" in hello.get("requests", ())
        return (served and not self.is_3d_model() and self.preview_is_3d and self.result_id is not None
                and (point or self.builder.slice_axis == slice_axis))

    def _correct(self, correction: Dict[str, Any], note: str, undo: Callable[[], None]) -> Outcome:
        """Send ``correction`` (RAS; the builder holds it already) to the worker, or queue it behind
        the correction in flight; ``undo`` takes it out of the builder if the worker refuses it."""
        self.show_prompts()
        if self.busy() not in (None, "correct"):
            undo()
            self.show_prompts()
            return Outcome(False, f"wait for the {self.busy()} to finish, or cancel it")
        self.pending_corrections.append((correction, undo))
        if self.busy() is None:
            out = self._send_correction()
            if out.ok and note:
                out.message = note
            return out
        return Outcome(True, note)

    def can_undo(self) -> bool:
        """True when a correction of the 3D result shown can be taken back (:meth:`undo_correction`)."""
        return bool(self.applied) and self.builder is not None and self._correcting(self.builder.slice_axis)

    def undo_correction(self) -> Outcome:
        """Take back the last correction of the 3D result shown: its prompt leaves the prompts and the
        worker restores the slices it changed (``correct`` with ``{"undo": true}``)."""
        if not self.applied:
            return Outcome(False, "no correction to undo")
        if self.busy() is not None or self.pending_corrections:
            return Outcome(False, f"wait for the {self.busy() or 'correct'} to finish")
        undo = self.applied.pop()
        saved = (list(self.builder.positive), list(self.builder.negative), self.builder.box, list(self.builder.boxes))
        undo()
        self.show_prompts()

        def restore() -> None:  # the worker could not take it back: the prompt comes back too
            (self.builder.positive, self.builder.negative, self.builder.box, self.builder.boxes) = saved
            self.applied.append(undo)

        self.pending_corrections.append(({"undo": True}, restore))
        return self._send_correction()

    def _send_correction(self) -> Outcome:
        """Send the first queued correction of the 3D result shown, with all the prompts (the worker
        makes the 3D mask again from them if it no longer holds that result)."""
        correction, undo = self.pending_corrections.pop(0)
        try:
            self._require_volume()
            fields = self._ras_fields(self.builder.prompts())
            rid, note = self._send("correct", "correct", timeout=PROMPT_TIMEOUT_S, base=self.result_id,
                                   correction=correction, **fields)
        except SEND_ERRORS as exc:
            undo()
            self.show_prompts()
            return Outcome(False, send_error_message(exc), kind="correct")
        self.tasks[rid].extra["undo"] = undo
        self.tasks[rid].extra["is_undo"] = correction == {"undo": True}
        return Outcome(True, note)

    def _after_prompt(self, note: str, preview: bool) -> Outcome:
        """Show the prompts; send the preview request (unless told not to). A note of the prompt
        builder (or the volume's intensity check) is the message."""
        self.show_prompts()
        if not preview:
            return Outcome(True, note)
        out = self.request_preview()
        if out.ok and note:
            out.message = note
        return out

    def has_prompts(self) -> bool:
        return self.builder is not None and not self.builder.is_empty()

    def clear(self) -> None:
        """Forget the prompts and the preview; results of requests in flight are dropped."""
        self.generation += 1
        for rid, task in self.tasks.items():
            if task.kind in USER_TASKS and not task.cancelled:
                task.cancelled = True
                if self.client is not None:
                    self.client.cancel(rid)
        self.preview_pending = False
        self.clicks3d, self.sent3d = [], 0
        self.result_id, self.pending_corrections, self.applied = None, [], []
        if self.builder is not None:
            self.builder.clear()
        self.preview, self.preview_is_3d = None, False
        if self.display is not None:
            self.display.clear()

    def show_prompts(self) -> None:
        if self.display is not None and self.volume_node is not None and self.builder is not None:
            self.display.show_prompts(self.volume_node, self.builder)

    # -- requests ---------------------------------------------------------------------------
    def _ras_fields(self, prompts: Prompts) -> Dict[str, Any]:
        """A prompt in the worker's RAS frame: the IJK request fields (``worker_client.prompt_fields``)
        with points and box corners mapped to world RAS, and the slice axis given as its world RAS
        direction (``normal``), so the worker prompts exactly the slice the click snapped to."""
        fields = prompt_fields(prompts)
        del fields["frame"], fields["slice_axis"]
        m = geometry.world_ijk_to_ras(self.volume_node)
        axis_dir = m[:3, IJK_INDEX[prompts.slice_axis]]
        fields["normal"] = [float(v) for v in axis_dir / np.linalg.norm(axis_dir)]
        def ras(points):
            return (np.c_[np.asarray(points, dtype=float), np.ones(len(points))] @ m.T)[:, :3].tolist()

        for key in ("points", "box"):
            if key in fields:
                fields[key] = ras(fields[key])
        if "boxes" in fields:
            fields["boxes"] = [ras(b) for b in fields["boxes"]]
        if "roi" in fields:  # two opposite corners: the worker takes their IJK bounding box
            r = fields["roi"]
            fields["roi"] = (np.array([[r[0], r[1], r[2], 1.0], [r[3], r[4], r[5], 1.0]]) @ m.T)[:, :3].tolist()
        return fields

    def _send(self, kind: str, rtype: str, timeout: Optional[float] = None, **fields: Any) -> Tuple[int, str]:
        """Send a request behind the volume (sent first if the worker lacks it); (id, note)."""
        self._client()
        volume_rid, note = self._ensure_volume()
        rid = self.channel.send(rtype, timeout=timeout, **fields)
        self.tasks[rid] = Task(kind, self.generation, volume_rid=volume_rid)
        return rid, note

    def request_preview(self) -> Outcome:
        """Send the 2D preview of the slice last clicked (or the 3D model's refinement); at most one
        in flight: a prompt that arrives meanwhile is previewed when it ends."""
        if self.busy() in ("preview", "click3d"):
            self.preview_pending = True
            return Outcome(True, "")
        if self.busy() is not None:
            return Outcome(False, f"wait for the {self.busy()} to finish, or cancel it")
        try:
            self._require_volume()
            if self.is_3d_model():
                return self._request_3d_click()
            prompts = self.builder.prompts_on_slice()
            axis, index = prompts.slice_axis, self.builder.current_slice
            rid, note = self._send("preview", "prompt", timeout=PROMPT_TIMEOUT_S, **self._ras_fields(prompts))
        except SEND_ERRORS as exc:
            return Outcome(False, send_error_message(exc))
        self.tasks[rid].slice_axis, self.tasks[rid].slice_index = axis, index
        return Outcome(True, note)

    def _request_3d_click(self) -> Outcome:
        new = self.clicks3d[self.sent3d:]
        if not new:
            return Outcome(False, "click on the object")
        upto = len(self.clicks3d)
        m = geometry.world_ijk_to_ras(self.volume_node)
        points = [[float(v) for v in (m @ np.array([*p, 1.0]))[:3]] for p, _ in self.clicks3d[:upto]]
        labels = [lab for _, lab in self.clicks3d[:upto]]
        try:
            rid, note = self._send("click3d", "prompt3d", timeout=PROMPT_TIMEOUT_S, points=points, labels=labels)
        except SEND_ERRORS as exc:
            return Outcome(False, send_error_message(exc))
        self.tasks[rid].extra["upto"] = upto
        return Outcome(True, note)

    def start_propagate(self) -> Outcome:
        """Send the propagation of all prompts to 3D (both directions from the prompted slice(s))."""
        if self.is_3d_model():
            return Outcome(False, f"{self.settings.model} segments in 3D at every click: Apply writes the result")
        if self.busy() is not None:
            return Outcome(False, f"wait for the {self.busy()} to finish, or cancel it")
        try:
            self._require_volume()
            prompts = self.builder.prompts()
            _, note = self._send("propagate", "propagate", **self._ras_fields(prompts))
            self.pending_corrections, self.applied = [], []  # queued ones are among the prompts propagated
        except SEND_ERRORS as exc:
            return Outcome(False, send_error_message(exc))
        return Outcome(True, note)

    def start_uncertainty(self, segment_mask: Optional[np.ndarray] = None) -> Outcome:
        """Send the prompt-ensemble variance of the preview when there is one, else of
        ``segment_mask`` (the selected segment's voxels on the source volume's grid, [k, j, i])."""
        if self.volume_node is None:
            return Outcome(False, "select a source volume first")
        if self.is_3d_model():
            return Outcome(False, "the uncertainty map uses a 2D model's prompt ensemble: choose lite_medsam "
                                  "(or another 2D model) to show it")
        if self.busy() is not None:
            return Outcome(False, f"wait for the {self.busy()} to finish, or cancel it")
        mask = self.preview if self.preview is not None and np.any(self.preview) else segment_mask
        if mask is None or not np.any(mask):
            return Outcome(False, "nothing to analyse: segment the object first (a preview or the selected segment)")
        if tuple(np.shape(mask)) != tuple(self.shape_kji):
            return Outcome(False, "the segment is not on the source volume's grid")
        axis = (self.builder.slice_axis if self.builder is not None else None) or "k"
        try:
            self._require_volume()
            client = self._client()
            ref = client.write_array("mask", np.asarray(mask, dtype=np.uint8))
            _, note = self._send("uncertainty", "uncertainty", mask=ref, slice_axis=axis)
        except SEND_ERRORS as exc:
            return Outcome(False, send_error_message(exc))
        return Outcome(True, note)

    def start_prefetch(self) -> Optional[int]:
        """Embed the slices around the one last previewed, in the worker's background (one at a time)."""
        if self.builder is None or self.builder.current_slice is None or self.is_3d_model():
            return None
        if any(t.kind == "prefetch" for t in self.tasks.values()):
            return None
        axis, index = self.builder.slice_axis, self.builder.current_slice
        n = self.shape_kji[{"k": 0, "j": 1, "i": 2}[axis]]
        slices = [index + d * s for d in range(1, NEIGHBOUR_PREFETCH + 1) for s in (1, -1)]
        slices = [s for s in slices if 0 <= s < n]
        if not slices:
            return None
        try:
            rid, _ = self._send("prefetch", "prefetch", slice_axis=axis, slices=slices, around=index)
        except SEND_ERRORS:  # only a speed-up: the next prompt says what is wrong
            return None
        return rid

    def cancel(self) -> None:
        """Cancel the propagation / uncertainty in flight (its answer then says so)."""
        if self.client is None:
            return
        for rid, task in self.tasks.items():
            if task.kind in ("propagate", "correct", "uncertainty", "prefetch"):
                self.client.cancel(rid)

    # -- answers ------------------------------------------------------------------------------
    def poll(self) -> List[Outcome]:
        """Take the worker's answers (never blocks); apply them to the scene; what finished."""
        if self.channel is None:
            if self.client is not None:
                self.client.poll()  # nothing of ours in flight: drain the pipe for the other users
            return []
        out: List[Outcome] = []
        for msg in self.channel.poll():
            task = self.tasks.get(msg.get("id"))
            if task is None:
                continue  # not ours
            if "ok" not in msg:
                if msg.get("event") == "progress":
                    task.progress = (int(msg.get("done", 0)), int(msg.get("total", 0)))
                elif msg.get("event") == "partial":
                    self._show_partial(task, msg)
                continue
            del self.tasks[msg["id"]]
            outcome = self._finish(msg["id"], task, msg)
            if outcome is not None:
                out.append(outcome)
        if self.preview_pending and self.busy() is None:
            self.preview_pending = False
            sent = self.request_preview()
            if not sent.ok:
                out.append(Outcome(False, sent.message, kind="preview"))
        if self.pending_corrections and self.busy() is None:
            sent = self._send_correction()
            if not sent.ok:
                out.append(sent)
        return out

    def _show_partial(self, task: Task, msg: Dict[str, Any]) -> None:
        """A correction's own slice, sent before the walk through the others: shown at once in the
        3D result (the final answer then replaces the whole result)."""
        if task.kind != "correct" or task.cancelled or task.generation != self.generation or self.preview is None:
            self._drop_arrays(msg)
            return
        try:
            part = msg["result"]
            mask2d = self.client.read_array(part["mask"])
            target = slice_clicks.slice_array(self.preview, part["slice_axis"], int(part["slice_index"]))
            if target.shape != mask2d.shape:
                return
        except (KeyError, TypeError, ValueError, OSError, SAMLiverSegError):
            self._drop_arrays(msg)
            return
        target[...] = mask2d != 0
        self._set_preview(self.preview, True)
        task.extra["first_shown"] = time.perf_counter() - task.sent

    def _drop_arrays(self, msg: Dict[str, Any]) -> None:
        """Remove the result files of an answer nobody uses."""
        self.client.discard_result(msg)

    def _finish(self, rid: int, task: Task, msg: Dict[str, Any]) -> Optional[Outcome]:
        seconds = time.perf_counter() - task.sent
        if task.kind == "volume":
            if msg["ok"]:
                return None
            self._volume_failed.add(rid)  # (the client forgets it: the next prompt sends it again)
            return Outcome(False, f"the inference worker cannot use the volume: {msg['error']}", seconds, kind="volume")
        if task.volume_rid in self._volume_failed:  # already said why
            if task.kind == "correct" and not task.cancelled and task.generation == self.generation:
                task.extra["undo"]()  # not applied: its prompt goes, as for a refused one
                self.show_prompts()
            self._drop_arrays(msg)
            return None
        stale = task.cancelled or task.generation != self.generation
        if task.kind == "prefetch":
            self._drop_arrays(msg)
            return None
        if not msg["ok"]:
            if task.kind == "correct" and not stale:  # the prompt is dropped; the result shown stays
                task.extra["undo"]()
                self.show_prompts()
            if stale and msg.get("exit_code") == 130:
                return None
            if msg.get("exit_code") == 130:
                what = {"propagate": "propagation cancelled; the preview is unchanged",
                        "correct": "correction cancelled; the preview is unchanged",
                        "uncertainty": "uncertainty cancelled"}.get(task.kind, f"{task.kind} cancelled")
                return Outcome(False, what, seconds, kind=task.kind)
            if task.kind == "click3d" and not stale:  # the clicks that failed are dropped, the earlier result stays
                self.clicks3d = self.clicks3d[:self.sent3d]
                self.builder.positive = [p for p, lab in self.clicks3d if lab == 1]
                self.builder.negative = [p for p, lab in self.clicks3d if lab == 0]
                self.show_prompts()
            return Outcome(False, msg["error"], seconds, kind=task.kind)
        if stale:
            self._drop_arrays(msg)
            return None
        result = msg["result"]
        task.extra["timings"] = msg.get("timings")
        try:
            if task.kind == "preview":
                return self._finish_preview(task, result, seconds)
            if task.kind in ("propagate", "correct", "click3d"):
                return self._finish_3d(task, result, seconds)
            if task.kind == "uncertainty":
                return self._finish_uncertainty(result, seconds)
        except (OSError, ValueError, SAMLiverSegError) as exc:
            self._drop_arrays(msg)
            return Outcome(False, f"the worker's answer cannot be used: {exc}", seconds, kind=task.kind)
        return None

    def _finish_preview(self, task: Task, result: Dict[str, Any], seconds: float) -> Outcome:
        mask2d = self.client.read_array(result["mask"])
        axis, index = result["slice_axis"], int(result["slice_index"])
        mask = np.zeros(self.shape_kji, np.uint8)
        target = slice_clicks.slice_array(mask, axis, index)
        if target.shape != mask2d.shape:
            raise InputError(f"the preview has shape {list(mask2d.shape)}, the slice {list(target.shape)}")
        target[...] = mask2d != 0
        self._set_preview(mask, False)
        n = int(np.count_nonzero(mask))
        self.start_prefetch()
        msg = "" if n else "the model found nothing here: drag a box around the object"
        return Outcome(True, msg, seconds, n, cold=bool(result.get("embedded", False)), kind="preview")

    def _finish_3d(self, task: Task, result: Dict[str, Any], seconds: float) -> Outcome:
        mask = self.client.read_array(result["mask"])
        if tuple(mask.shape) != tuple(self.shape_kji):
            raise InputError(f"the result has shape {list(mask.shape)}, the volume {list(self.shape_kji)}")
        self._set_preview((mask != 0).astype(np.uint8), True)
        if task.kind == "click3d":
            self.sent3d = int(task.extra.get("upto", len(self.clicks3d)))
        else:
            self.result_id = result.get("result_id")
        n = int(np.count_nonzero(self.preview))
        what = "click inside the object" if task.kind == "click3d" else "the model found nothing to propagate"
        if task.kind == "propagate" and n:
            what = ""
        if task.kind == "correct":
            data = {"correction": result.get("correction"), "incremental": result.get("incremental"),
                    "timings": task.extra.get("timings"), "first_shown_s": task.extra.get("first_shown")}
            c = data["correction"]
            # (an older worker's summary has no slice_axis)
            where = "" if c is None else (f"{c['slice_axis']}={c['slice_index']}" if c.get("slice_axis")
                                          else str(c["slice_index"]))
            if not task.extra.get("is_undo"):
                self.applied.append(task.extra["undo"])
            what = ("made again from all the prompts (the worker held another result)" if c is None else
                    f"took back the correction on slice {where}: {len(c['changed_slices'])} slices "
                    "restored" if c["kind"] == "undo" else
                    f"corrected from slice {where}: {len(c['changed_slices'])} slices changed")
            return Outcome(True, what if n else "the correction removed the whole object", seconds, n, data=data,
                           kind="correct")
        return Outcome(True, what if not n else "", seconds, n, kind=task.kind)

    def _finish_uncertainty(self, result: Dict[str, Any], seconds: float) -> Outcome:
        variance = self.client.read_array(result["variance"])
        if tuple(variance.shape) != tuple(self.shape_kji):
            raise InputError(f"the variance map has shape {list(variance.shape)}, the volume {list(self.shape_kji)}")
        node = self.display.show_uncertainty(self.volume_node, variance) if self.display is not None else None
        n = int(np.count_nonzero(variance >= UNCERTAINTY_THRESHOLD))
        frac = float(result.get("uncertain_fraction", 0.0))
        msg = (f"{100 * frac:.1f} % of the voxels the {result.get('members', '?')} ensemble members touch are "
               f"uncertain (variance >= {UNCERTAINTY_THRESHOLD}); click there to correct")
        return Outcome(True, msg, seconds, n, data={"variance": variance, "node": node, "slices": result.get("slices"),
                                                          "members": result.get("members")}, kind="uncertainty")

    def _set_preview(self, mask: np.ndarray, is_3d: bool) -> None:
        self.preview, self.preview_is_3d = mask, is_3d
        if self.display is not None:
            self.display.show_preview(self.volume_node, mask)

    # -- apply --------------------------------------------------------------------------------
    def apply(self, target: segment_writer.WriteTarget, segmentation_node, segment_id: str) -> Outcome:
        """Write the preview into the segment (one undo step); prompts and preview are cleared."""
        t0 = time.perf_counter()
        if self.preview is None:
            return Outcome(False, "nothing to apply: click on the object or drag a box first")
        if self.busy() is not None:
            return Outcome(False, f"wait for the {self.busy()} to finish, or cancel it")
        mode = "add" if self.preview_is_3d else "replace_slices"
        axis = self.builder.slice_axis or "k"
        try:
            report = segment_writer.write_mask(target, self.preview, self.volume_node, segmentation_node, segment_id,
                                               mode=mode, slice_axis=axis)
        except SAMLiverSegError as exc:
            return Outcome(False, str(exc), time.perf_counter() - t0)
        self.clear()
        return Outcome(True, "", time.perf_counter() - t0, report.voxels_in_mask)


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
        with markups_prompts.keep_place_state(self.scene):  # the Markups logic makes every new node the active one
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
            with markups_prompts.keep_place_state(self.scene):
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

    def clear(self, uncertainty: bool = False) -> None:
        """Remove the preview and the prompt nodes (and the uncertainty overlay when asked)."""
        if uncertainty:
            self.hide_uncertainty()
        for name in ("preview_node", "positive_node", "negative_node", "box_node"):
            node = getattr(self, name)
            if node is not None and self.scene.IsNodePresent(node):
                self.scene.RemoveNode(node)
            setattr(self, name, None)
