"""What the SAMLiverSeg module panel does, without Qt.

* "Segment liver" / "Segment tumor": markups (an ROI and/or point lists) -> prompts -> the prompt
  engine (propagated to 3D) -> a segment named "Liver" / "Liver tumor" in the chosen segmentation,
  written through the Segment Editor logic (one undo step).
* Which models exist and whether their weights are present, and the weights cache folder.
* The choices offered in the panel (models, devices, windows) and their validation.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from samliverseg.errors import InputError, SAMLiverSegError

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
    """([ModelRow], cache folder) from the installed library (or a message if it is not there)."""
    try:
        from samliverseg.build_sam import model_status
        from samliverseg.weights import cache_dir
    except ImportError as exc:
        return [], f"(the SAMLiverSeg library is not installed: {exc})"
    rows = []
    for r in model_status():
        r = r if isinstance(r, dict) else vars(r)
        where = r.get("path") or f"missing: put {r.get('filename')} in the cache folder or choose a checkpoint file"
        rows.append(ModelRow(r["name"], bool(r["present"]), str(where), r.get("description", "")))
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
    notes = []

    def build(device):
        from samliverseg.engine import PromptEngine

        return PromptEngine(model=settings.model, checkpoint=settings.checkpoint, device=device, window=settings.window)

    if engine is None:
        engine = build(settings.device)
    try:
        engine.set_volume(volume)
        result = engine.segment(prompts, propagate=propagate, progress=progress, cancel=cancel)
    except Exception as exc:
        from .effect_logic import is_out_of_memory

        if not is_out_of_memory(exc) or str(getattr(engine, "device", "cpu")) == "cpu":
            raise
        notes.append("the GPU ran out of memory: this segmentation ran on the CPU")
        engine = build("cpu")
        engine.set_volume(volume)
        result = engine.segment(prompts, propagate=propagate, progress=progress, cancel=cancel)
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
