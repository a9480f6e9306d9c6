"""What the SAMLiverSeg module panel does, without Qt.

* "Segment liver" / "Segment tumor": markups (an ROI and/or point lists, read as IJK prompts by
  ``markups_prompts``) -> one ``propagate`` request (``propagate`` false: the prompted slices only)
  to the inference worker, its fields from ``worker_client.prompt_fields`` (from which the worker
  rebuilds exactly those prompts; no model code runs in Slicer's process) -> a segment named "Liver" /
  "Liver tumor" in the chosen segmentation, written through the module's one segment editor node
  (one undo step). :class:`PanelRun` never blocks: the GUI sends, then calls :meth:`PanelRun.poll`
  whenever the worker's pipe is readable (each run is its own ``worker_client.Channel`` on the
  shared client: it gets its own messages only, and the effect's stay the effect's);
  :func:`run_until_done` is the blocking loop (``select`` on the pipe, then ``poll``) for scripts
  and tests. The volume is sent only when the shared worker does not hold it already.
* Which models exist and whether their weights are present, and the weights cache folder: what
  ``samliverseg models --json`` prints (the one registry, ``registry.list_models``), read from
  that command's output so that Slicer's process never imports torch (:func:`parse_models_json`;
  the GUI runs the command with a QProcess, :func:`model_rows` with a subprocess).
* The choices offered in the panel (models, devices, windows) and their validation; the model
  names offered for segmentation (the built-in 2D ones, then the user's trained interactive ones).
* The training plot: train loss per optimiser step, mean train loss and validation Dice per
  epoch (``training_process.TrainingState``) as Slicer plot nodes: two ``vtkMRMLTableNode``
  (columns ``step``, ``train loss``; ``step``, ``epoch``, ``epoch loss``, ``val Dice``), three
  ``vtkMRMLPlotSeriesNode`` (x = optimiser step) in one ``vtkMRMLPlotChartNode``, and a
  ``vtkMRMLPlotViewNode`` showing the chart (for the panel's embedded plot widget).
"""

from __future__ import annotations

import json
import re
import select
import subprocess
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from samliverseg.core.errors import InputError, SAMLiverSegError

from . import geometry, markups_prompts, segment_writer, volume_nodes
from .constants import DEVICE_CHOICES, MODEL_CHOICES, TARGETS, WINDOW_CHOICES  # noqa: F401


def window_spec(choice: str, custom: str = "") -> Optional[str]:
    """The ``window`` argument of the engine / CLI for a panel choice (None = the model's own)."""
    if choice == "model":
        return None
    if choice != "custom":
        if choice not in WINDOW_CHOICES:
            raise InputError(f"unknown window {choice!r}")
        return choice
    m = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*", custom or "")
    if not m:
        raise InputError(f"custom window {custom!r} is not LOW,HIGH in HU (for example -200,300)")
    low, high = float(m.group(1)), float(m.group(2))
    if high <= low:
        raise InputError(f"custom window {custom!r}: HIGH must be above LOW")
    return f"{low:g},{high:g}"


@dataclass
class ModelRow:
    name: str
    present: bool
    where: str
    description: str = ""
    trained: bool = False
    interactive: bool = True
    family: str = ""


def models_command(python: Optional[str] = None) -> List[str]:
    """``samliverseg models --json``: the model list, made by the library in its own process."""
    from .process import samliverseg_command

    return samliverseg_command("models", "--json", python=python)


def parse_models_json(text: str) -> Tuple[List[ModelRow], str]:
    """([ModelRow], cache folder) from what ``samliverseg models --json`` printed (InputError if
    it is not that)."""
    try:
        data = json.loads(text)
        rows = [ModelRow(str(r["name"]), bool(r["present"]),
                         str(r.get("path") if r["present"] else f"missing: {r.get('where', '')}"),
                         str(r.get("description", "")), bool(r.get("trained", False)),
                         bool(r.get("interactive", True)), str(r.get("family", "")))
                for r in data["models"]]
        return rows, str(data["weights_cache"])
    except (ValueError, KeyError, TypeError) as exc:
        first = (text or "").strip().splitlines()[-1:] or ["(no output)"]
        raise InputError(f"could not read the model list ({type(exc).__name__}): {first[0][:200]}") from None


def model_rows(python: Optional[str] = None, timeout: float = 120.0) -> Tuple[List[ModelRow], str]:
    """([ModelRow], cache folder): every model of the installed library (built-in and trained, as
    ``samliverseg models`` lists them), or ([], a message) when it cannot be listed. Blocking (a
    subprocess: nothing heavy is imported here); the GUI runs :func:`models_command` with a QProcess."""
    try:
        out = subprocess.run(models_command(python), capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [], f"(could not list the models: {exc})"
    if out.returncode != 0:
        tail = (out.stderr or out.stdout or "").strip().splitlines()[-1:] or [f"exit code {out.returncode}"]
        return [], f"(the SAMLiverSeg library could not list the models: {tail[0][:300]})"
    try:
        return parse_models_json(out.stdout)
    except InputError as exc:
        return [], f"({exc})"


def model_choices(rows: Optional[List[ModelRow]] = None) -> List[str]:
    """Model names to offer for prompt-based segmentation (2D: the panel propagates slice by slice):
    the panel's built-in choices, then the user's trained interactive models that are usable, from
    ``rows`` (default: :func:`model_rows`); only the built-in choices when the list is unavailable."""
    names = list(MODEL_CHOICES)
    if rows is None:
        rows, _cache = model_rows()
    names += [r.name for r in rows if r.trained and r.interactive and r.present and r.name not in names]
    return names


# -- "Segment liver/tumor" through the worker ------------------------------------------------------

def worker_settings(model: str, checkpoint: Optional[str], device: str, backend: str, window: Optional[str],
                    python: Optional[str] = None, decoder_precision: str = "fp32") -> Dict[str, Any]:
    """The ``worker_client.shared_client(**settings)`` of the panel's choices (``window`` as
    :func:`window_spec` gives it). The effect passes the same keys, so the two share one worker
    while their choices agree."""
    return {"python": python, "model": model, "checkpoint": checkpoint or None, "device": device,
            "backend": backend, "window": window or None,
            "decoder_precision": decoder_precision}


def roi_node_for_ijk_box(scene, volume_node, lo_ijk, hi_ijk, name: str = "ROI"):
    """A markups ROI node whose box is exactly the IJK box ``lo..hi`` of ``volume_node`` (voxel
    centres; rotated with an oblique volume), placed in world RAS: what a user draws around an organ."""
    m = geometry.world_ijk_to_ras(volume_node)
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    object_to_node = np.eye(4)
    object_to_node[:3, :3] = m[:3, :3] / spacing
    centre = (np.asarray(lo_ijk, float) + np.asarray(hi_ijk, float)) / 2
    object_to_node[:3, 3] = (m @ np.array([*centre, 1.0]))[:3]
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name)
    roi.SetAndObserveObjectToNodeMatrix(geometry.vtk_matrix_from_array(object_to_node))
    roi.SetSize(*((np.asarray(hi_ijk, float) - np.asarray(lo_ijk, float)) * spacing))
    return roi


def apply_mask(scene, volume_node, segmentation_node, target: str, mask: np.ndarray,
               editor: Optional[segment_writer.Editor] = None) -> Tuple[object, str, segment_writer.Editor]:
    """Write ``mask`` ([k, j, i] on the volume grid) as the target's segment ("Liver" / "Liver
    tumor", made if missing) of ``segmentation_node`` (a new segmentation node when None), one
    undo step, through the module's one segment editor node (liver: overwrites other segments;
    tumour: overwrites none); pass the ``editor`` of the last call to keep one undo history. Returns (segmentation node, segment id, editor). On an error nothing
    the user made changes: a segment or segmentation made here is removed again."""
    if target not in TARGETS:
        raise InputError(f"unknown target {target!r}: liver or tumor")
    volume_nodes.check_source_volume(volume_node)
    made_node = segmentation_node is None
    if made_node:
        segmentation_node = volume_nodes.add_segmentation_node(scene, volume_node,
                                                               f"{volume_node.GetName()} segmentation")
    name, color = TARGETS[target]
    segmentation = segmentation_node.GetSegmentation()
    if not segmentation.GetSegmentIdBySegmentName(name) and segmentation.GetNumberOfSegments() == 0:
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    existed = bool(segmentation.GetSegmentIdBySegmentName(name))
    segment_id = volume_nodes.add_segment(segmentation_node, name, color)
    if editor is not None and editor.node.GetScene() is not scene:
        editor = None  # the scene was closed: its node is gone
    try:
        if editor is None:
            editor = segment_writer.create_editor(scene, segmentation_node, volume_node,
                                                  editor_node=segment_writer.module_editor_node(scene))
        else:
            editor.node.SetAndObserveSegmentationNode(segmentation_node)
            editor.node.SetAndObserveSourceVolumeNode(volume_node)
        segment_writer.configure_editing(editor.node, "everywhere", overwrite="none" if target == "tumor" else "all")
        segment_writer.write_mask(editor.target, mask, volume_node, segmentation_node, segment_id, mode="set")
    except Exception:
        if made_node:
            scene.RemoveNode(segmentation_node)
        elif not existed:
            segmentation.RemoveSegment(segment_id)
        raise
    return segmentation_node, segment_id, editor


#: The name of the panel runs' channels on the shared worker client (in its log lines).
PANEL_CHANNEL = "SAMLiverSeg panel"


def _voxel_ml(volume_node) -> float:
    return float(np.prod(volume_node.GetSpacing())) / 1000.0


class PanelRun:
    """One "Segment liver/tumor" through the worker, never blocking (see the module docstring).

    ``start()`` opens the run's own channel on ``client`` (the shared ``WorkerClient``), sends
    ``load_volume`` (the volume node's voxels and world IJKToRAS) unless the worker holds this
    volume already (``Channel.ensure_volume_node``), and the prompt request; the GUI calls
    :meth:`poll` when the worker's pipe is readable (and when ``notify`` is called: another user's
    poll took this run's messages from the pipe); when the answer comes the mask is written (one
    undo step) and :attr:`status` becomes ``done``, else ``failed`` / ``cancelled`` with a
    one-line :attr:`message` and nothing in the scene changed; a finished run closes its channel
    (late answers are dropped). Bad markups or a bad volume raise :class:`SAMLiverSegError` in the
    constructor, before anything is sent.
    """

    def __init__(self, scene, client, volume_node, segmentation_node, target: str, roi_node=None,
                 positive_node=None, negative_node=None, propagate: bool = True,
                 editor: Optional[segment_writer.Editor] = None, timeout: Optional[float] = None,
                 notify=None):
        if target not in TARGETS:
            raise InputError(f"unknown target {target!r}: liver or tumor")
        volume_nodes.check_source_volume(volume_node)
        from .worker_client import prompt_fields

        prompts = markups_prompts.prompts_from_markups(volume_node, roi_node, positive_node, negative_node)
        self.fields = dict(prompt_fields(prompts), propagate=bool(propagate))
        self.scene, self.client, self.volume_node = scene, client, volume_node
        self.segmentation_node, self.target, self.editor, self.timeout = segmentation_node, target, editor, timeout
        self.status = "new"  # new | running | done | failed | cancelled
        self.message = ""
        self.exit_code: Optional[int] = None
        self.progress: Tuple[int, int] = (0, 0)
        self.report: Dict[str, Any] = {}
        self.load_id: Optional[int] = None
        self.request_id: Optional[int] = None
        self.segment_id: Optional[str] = None
        self.notify = notify  # called when another user's poll took this run's messages (the GUI polls then)
        self.channel = None  # worker_client.Channel of this run, from start() until it finishes
        self._t0 = 0.0

    def start(self) -> "PanelRun":
        """Send ``load_volume`` (unless the worker holds this volume) and the request (never waits);
        a worker that is not running starts."""
        self._t0 = time.perf_counter()
        self.status = "running"
        try:
            self.channel = self.client.channel(PANEL_CHANNEL, notify=self.notify)
            self.load_id, _sent = self.channel.ensure_volume_node(self.volume_node, timeout=self.timeout)
            self.request_id = self.channel.send("propagate", timeout=self.timeout, **self.fields)
        except SAMLiverSegError as exc:
            self._fail(str(exc), getattr(exc, "exit_code", 2))
        except Exception as exc:  # WorkerError (cannot start, refused version) and the like
            self._fail(str(exc), getattr(exc, "exit_code", 70))
        return self

    @property
    def finished(self) -> bool:
        return self.status in ("done", "failed", "cancelled")

    def ids(self) -> List[int]:
        return [i for i in (self.load_id, self.request_id) if i is not None]

    def _fail(self, message: str, exit_code: int) -> None:
        self.status = "cancelled" if exit_code == 130 else "failed"
        self.message = " ".join(str(message).split()) or "the segmentation failed"
        self.exit_code = int(exit_code)
        self._close()

    def _close(self) -> None:
        """Finished: close the channel (what is still in flight is cancelled, late answers dropped)."""
        if self.channel is not None:
            self.channel.close()

    def poll(self) -> List[Dict[str, Any]]:
        """Take this run's messages from the worker (never blocks) and act on them; returns the
        messages that were not this run's (none: its channel gets its own only)."""
        if self.channel is None or self.channel.closed:
            return []
        return self.handle(self.channel.poll())

    def handle(self, messages: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        """Take this run's messages (progress, answers) from ``messages``; returns the others."""
        others = []
        for msg in messages:
            rid = msg.get("id")
            if rid not in self.ids():
                others.append(msg)
                continue
            if self.finished:  # a late answer after a failure: drop it (and its array file)
                self.client.discard_result(msg)
                continue
            if "ok" not in msg:
                if rid == self.request_id and msg.get("event") == "progress":
                    self.progress = (int(msg.get("done", 0)), int(msg.get("total", 0)))
                continue
            if not msg["ok"]:
                what = "loading the volume" if rid == self.load_id else "segmenting"
                self._fail(msg.get("error") or f"the worker failed {what}", msg.get("exit_code", 70))
                continue  # (a failed load: _fail closed the channel, which cancelled the request)
            if rid == self.request_id:
                self._finish(msg["result"])
        return others

    def _finish(self, result: Dict[str, Any]) -> None:
        try:
            mask = self.client.read_array(result["mask"])
            self.segmentation_node, self.segment_id, self.editor = apply_mask(
                self.scene, self.volume_node, self.segmentation_node, self.target, mask, self.editor)
        except SAMLiverSegError as exc:
            self._fail(str(exc), getattr(exc, "exit_code", 2))
            return
        voxels = int(np.count_nonzero(mask))
        report = dict(result.get("report") or {})
        report.update({"segment_id": self.segment_id, "segment_name": TARGETS[self.target][0], "voxels": voxels,
                       "volume_ml": round(voxels * _voxel_ml(self.volume_node), 2),
                       "wall_s": round(time.perf_counter() - self._t0, 3)})
        self.report = report
        self.status = "done"
        self.message = (f"{report['segment_name']}: {voxels} voxels, {report['volume_ml']} ml "
                        f"in {report['wall_s']} s")
        self._close()

    def cancel(self) -> None:
        """Ask the worker to stop (returns at once); the run ends ``cancelled`` when it answers."""
        if self.finished:
            return
        for rid in self.ids():
            self.client.cancel(rid)


def run_until_done(run: PanelRun, timeout: float = 600.0, on_progress=None) -> PanelRun:
    """Drive ``run`` as the GUI's notifier does, but blocking (scripts, tests, the console): wait
    in ``select`` on the worker's pipe, then :meth:`PanelRun.poll` (other users' messages stay in
    their inboxes). A run still going after ``timeout`` is cancelled."""
    if run.status == "new":
        run.start()
    deadline = time.monotonic() + timeout
    while not run.finished:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            run.cancel()
            run._fail(f"no answer from the inference worker within {timeout:g} s", 70)
            break
        fd = run.client.fileno()
        if run.channel is not None and run.channel.ready():
            pass  # another poll took its messages from the pipe already
        elif fd is not None:
            try:
                select.select([fd], [], [], min(remaining, 1.0))
            except (OSError, ValueError):  # the pipe closed between fileno() and select
                pass
        else:
            time.sleep(0.02)
        run.poll()
        if on_progress is not None:
            on_progress(*run.progress)
    return run


# -- the training plot ---------------------------------------------------------------------------

TRAINING_PLOT_NAME = "SAMLiverSeg training"
#: series name -> (table: "steps" | "epochs", y column, colour RGB, marker)
TRAINING_SERIES = {
    "train loss (step)": ("steps", "train loss", (0.55, 0.70, 0.90), False),
    "train loss (epoch)": ("epochs", "epoch loss", (0.10, 0.30, 0.80), True),
    "val Dice": ("epochs", "val Dice", (0.85, 0.35, 0.10), True),
}


@dataclass
class TrainingPlotNodes:
    chart: object
    view: object
    steps_table: object
    epochs_table: object
    series: Dict[str, object]

    def alive_in(self, scene) -> bool:
        nodes = [self.chart, self.view, self.steps_table, self.epochs_table, *self.series.values()]
        return all(n is not None and n.GetScene() is scene for n in nodes)


def _fill_table(table_node, columns: Dict[str, List[float]]) -> None:
    """Replace the table's content by ``columns`` (name -> values, all the same length; float64)."""
    import vtk

    table = table_node.GetTable()
    n = len(next(iter(columns.values()))) if columns else 0
    for name, values in columns.items():
        arr = table.GetColumnByName(name)
        if arr is None:
            arr = vtk.vtkDoubleArray()
            arr.SetName(name)
            table.AddColumn(arr)
        arr.SetNumberOfTuples(n)
        for r, v in enumerate(values):
            arr.SetValue(r, float("nan") if v is None else float(v))
        arr.Modified()
    table.SetNumberOfRows(n)
    table.Modified()
    table_node.Modified()


def _training_plot_nodes(scene) -> TrainingPlotNodes:
    steps = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{TRAINING_PLOT_NAME} steps")
    epochs = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{TRAINING_PLOT_NAME} epochs")
    _fill_table(steps, {"step": [], "train loss": []})
    _fill_table(epochs, {"step": [], "epoch": [], "epoch loss": [], "val Dice": []})
    chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", TRAINING_PLOT_NAME)
    chart.SetTitle("Training")
    chart.SetXAxisTitle("optimiser step")
    chart.SetYAxisTitle("loss / Dice")
    series = {}
    for name, (which, column, color, marker) in TRAINING_SERIES.items():
        node = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", name)
        node.SetAndObserveTableNodeID((steps if which == "steps" else epochs).GetID())
        node.SetXColumnName("step")
        node.SetYColumnName(column)
        node.SetPlotType(node.PlotTypeScatter)
        node.SetMarkerStyle(node.MarkerStyleCircle if marker else node.MarkerStyleNone)
        node.SetColor(*color)
        chart.AddAndObservePlotSeriesNodeID(node.GetID())
        series[name] = node
    view = scene.AddNewNodeByClass("vtkMRMLPlotViewNode", f"{TRAINING_PLOT_NAME} view")
    view.SetPlotChartNodeID(chart.GetID())
    return TrainingPlotNodes(chart, view, steps, epochs, series)


def update_training_plot(scene, state, nodes: Optional[TrainingPlotNodes] = None) -> TrainingPlotNodes:
    """Show ``state``'s histories in the training plot nodes (created when ``nodes`` is None or
    no longer in ``scene``, e.g. after the scene was closed); returns the nodes."""
    if nodes is None or not nodes.alive_in(scene):
        nodes = _training_plot_nodes(scene)
    _fill_table(nodes.steps_table, {"step": [s for s, _ in state.losses], "train loss": [v for _, v in state.losses]})
    by_epoch: Dict[int, List[Optional[float]]] = {}
    for epoch, step, loss in state.epoch_losses:
        by_epoch[epoch] = [step, loss, None]
    for epoch, step, dice in state.val_dice:
        row = by_epoch.setdefault(epoch, [step, None, None])
        row[2] = dice
    epochs = sorted(by_epoch)
    _fill_table(nodes.epochs_table, {"step": [by_epoch[e][0] for e in epochs], "epoch": [e + 1 for e in epochs],
                                     "epoch loss": [by_epoch[e][1] for e in epochs],
                                     "val Dice": [by_epoch[e][2] for e in epochs]})
    return nodes
