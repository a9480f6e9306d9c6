"""What the SAMLiverSeg module panel does, without Qt.

* "Segment liver" / "Segment tumor": markups (an ROI and/or point lists) -> prompts -> the prompt
  engine (propagated to 3D) -> a segment named "Liver" / "Liver tumor" in the chosen segmentation,
  written through the Segment Editor logic (one undo step).
* Which models exist and whether their weights are present, and the weights cache folder (the one
  registry, ``samliverseg.models.registry.list_models``).
* The choices offered in the panel (models, devices, windows) and their validation; the model
  names offered for segmentation (the built-in 2D ones, then the user's trained interactive ones).
  Models are opened by name with ``samliverseg.api.open_model`` (as the CLI and the effect do).
* The training plot: train loss per optimiser step, mean train loss and validation Dice per
  epoch (``training_process.TrainingState``) as Slicer plot nodes: two ``vtkMRMLTableNode``
  (columns ``step``, ``train loss``; ``step``, ``epoch``, ``epoch loss``, ``val Dice``), three
  ``vtkMRMLPlotSeriesNode`` (x = optimiser step) in one ``vtkMRMLPlotChartNode``, and a
  ``vtkMRMLPlotViewNode`` showing the chart (for the panel's embedded plot widget).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from samliverseg.core.errors import InputError, SAMLiverSegError

from . import markups_prompts, segment_writer, volume_nodes
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


def model_rows() -> Tuple[List[ModelRow], str]:
    """([ModelRow], cache folder): every model of the installed library (built-in and trained, as
    ``samliverseg models`` lists them), or a message if the library is not there."""
    try:
        from samliverseg.models.registry import list_models
        from samliverseg.models.weights import cache_dir
    except ImportError as exc:
        return [], f"(the SAMLiverSeg library is not installed: {exc})"
    rows = [ModelRow(r.name, r.present, r.path if r.present else f"missing: {r.where}", r.description)
            for r in list_models()]
    return rows, str(cache_dir())


def segment_from_markups(scene, volume_node, segmentation_node, target: str, settings, roi_node=None,
                         positive_node=None, negative_node=None, engine=None, propagate: bool = True,
                         editor: Optional[segment_writer.Editor] = None, progress=None, cancel=None) -> Dict:
    """Segment the liver or a tumour from markups into a named segment. Returns a report dict.

    Raises :class:`SAMLiverSegError` subclasses (one-line messages) on bad input; nothing in the
    scene changes in that case.
    """
    if target not in TARGETS:
        raise InputError(f"unknown target {target!r}: liver or tumor")
    if segmentation_node is None:
        raise InputError("no output segmentation: choose or create one")
    t0 = time.perf_counter()
    volume = volume_nodes.volume_from_node(volume_node)
    prompts = markups_prompts.prompts_from_markups(volume_node, roi_node, positive_node, negative_node)
    notes: List[str] = []
    from samliverseg.api import call_with_cpu_fallback, open_model

    if engine is None:
        _check_panel_model(settings.model)
    first = str(getattr(engine, "device", None) or settings.device)

    def run(device: str):  # the given engine, else the model opened by name; on the CPU after a GPU OOM
        eng = engine if engine is not None and device == first else open_model(
            settings.model, settings.checkpoint, device, settings.window, notes=notes)
        eng.set_volume(volume)
        return eng.segment(prompts, propagate=propagate, progress=progress, cancel=cancel)

    result = call_with_cpu_fallback(run, first, notes)
    name, color = TARGETS[target]
    segmentation = segmentation_node.GetSegmentation()
    if not segmentation.GetSegmentIdBySegmentName(name) and segmentation.GetNumberOfSegments() == 0:
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    existed = bool(segmentation.GetSegmentIdBySegmentName(name))
    segment_id = volume_nodes.add_segment(segmentation_node, name, color)
    try:
        if editor is None:
            editor = segment_writer.create_editor(scene, segmentation_node, volume_node)
            segment_writer.configure_editing(editor.node, "everywhere", overwrite="none" if target == "tumor" else "all")
        segment_writer.write_mask(editor.target, result.mask, volume_node, segmentation_node, segment_id, mode="set")
    except Exception:
        if not existed:  # leave the segmentation as it was
            segmentation.RemoveSegment(segment_id)
        raise
    report = dict(getattr(result, "report", {}) or {})
    report.update({"segment_id": segment_id, "segment_name": name, "notes": notes,
                   "wall_s": round(time.perf_counter() - t0, 3)})
    return report


def _check_panel_model(name: str) -> None:
    """The panel segments with 2D promptable models: a 3D or an automatic model is an InputError."""
    from samliverseg.models.registry import find_model
    from samliverseg.models.specs import SAM3D

    entry = find_model(name)
    if entry.family == SAM3D:
        raise InputError(f"{name!r} is a 3D model: use it in the Segment Editor's Segment Anything effect")
    if not entry.interactive:
        raise InputError(f"{name!r} is an automatic {entry.family} model (no prompts): use it with "
                         f"`samliverseg segment --model {name}` or the batch section")


def model_choices() -> List[str]:
    """Model names to offer for prompt-based segmentation (2D: the panel propagates slice by slice):
    the panel's built-in choices, then the user's trained interactive models (kinds ``decoder``/
    ``adapter``), from the one registry; unreadable trained models are left out, and only the
    built-in choices are offered when the registry cannot be read."""
    names = list(MODEL_CHOICES)
    try:
        from samliverseg.models.registry import list_models

        names += [r.name for r in list_models() if r.trained and r.interactive and r.present and r.name not in names]
    except (ImportError, OSError, SAMLiverSegError):
        pass
    return names


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
