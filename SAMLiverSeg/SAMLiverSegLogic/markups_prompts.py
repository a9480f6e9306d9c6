"""Markups nodes in the scene -> IJK :class:`samliverseg.core.prompts.Prompts` of a volume.

The conventions are those of the core library's ``samliverseg.io.markups`` (the CLI's
``--prompts FILE.mrk.json``), so the module and the CLI read the same markups the same way:

* A point list holds positive points, or negative ones when its name contains ``neg``,
  ``exclude`` or ``background``; within any list a point whose label starts with ``-`` or whose
  description is ``negative`` is negative, one whose description is ``positive`` is positive.
  A second point list can be given as all-negative.
* An ROI gives a 3D ROI (``Roi3D``): the IJK bounding box of its eight corners, rounded outward
  (a rotated ROI or an oblique volume is handled through the corners). One extension: an ROI
  that is flat (at most one voxel thick along a volume axis), which the CLI would reject as
  empty, is a 2D box on that slice.

Positions are read in world RAS (parent transforms applied) and mapped through the volume's
world RASToIJK, so what is seen in the views is what is prompted. A point outside the volume, an
empty ROI or an ROI outside the volume raises :class:`samliverseg.core.errors.PromptError`.
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from typing import Iterator, List, Sequence, Tuple

import numpy as np
import vtk

from samliverseg.core.errors import PromptError
from samliverseg.core.prompts import Prompts, Roi3D, SliceBox, validate_prompts

from . import geometry
from .slice_clicks import format_ijk


def _shape_kji(volume_node) -> Tuple[int, int, int]:
    d = volume_node.GetImageData().GetDimensions()
    return d[2], d[1], d[0]


NEGATIVE_LIST_WORDS = ("neg", "exclude", "background")
#: ROI faces this close (in voxels) to a voxel centre count as on it.
ROUND_TOLERANCE_VOXELS = 1e-3


def is_negative_list(markups_node) -> bool:
    name = (markups_node.GetName() or "").lower()
    return any(w in name for w in NEGATIVE_LIST_WORDS)


def is_negative_point(markups_node, index: int, list_negative: bool = False) -> bool:
    label = (markups_node.GetNthControlPointLabel(index) or "").strip()
    desc = (markups_node.GetNthControlPointDescription(index) or "").strip().lower()
    if label.startswith("-") or desc == "negative":
        return True
    if desc == "positive":
        return False
    return list_negative


def point_list_ijk(markups_node, volume_node) -> List[Tuple[Tuple[float, float, float], bool]]:
    """[(ijk, is_negative)] of the defined control points of a point list."""
    out = []
    list_negative = is_negative_list(markups_node)
    m = geometry.world_ras_to_ijk(volume_node)
    for n in range(markups_node.GetNumberOfControlPoints()):
        if markups_node.GetNthControlPointPositionStatus(n) != markups_node.PositionDefined:
            continue
        ras = [0.0, 0.0, 0.0]
        markups_node.GetNthControlPointPositionWorld(n, ras)
        ijk = (m @ np.array([ras[0], ras[1], ras[2], 1.0]))[:3]
        out.append((tuple(float(v) for v in ijk), is_negative_point(markups_node, n, list_negative)))
    return out


def roi_corners_ras(roi_node) -> np.ndarray:
    """The eight corners of an ROI in world RAS (8 x 3)."""
    size = [float(v) for v in roi_node.GetSize()]
    obj_to_world = roi_node.GetObjectToWorldMatrix()
    # GetObjectToWorldMatrix places the ROI centre at the object origin
    m = geometry.array_from_vtk_matrix(obj_to_world)
    half = np.asarray(size) / 2.0
    corners = []
    for sx, sy, sz in itertools.product((-1, 1), repeat=3):
        p = np.array([sx * half[0], sy * half[1], sz * half[2], 1.0])
        corners.append((m @ p)[:3])
    return np.array(corners)


def roi_ijk_bounds(roi_node, volume_node) -> Tuple[np.ndarray, np.ndarray]:
    """(lo, hi) continuous IJK of the voxel box containing the ROI."""
    m = geometry.world_ras_to_ijk(volume_node)
    ijk = np.array([(m @ np.array([*c, 1.0]))[:3] for c in roi_corners_ras(roi_node)])
    return ijk.min(axis=0), ijk.max(axis=0)


def prompts_from_roi(roi_node, volume_node, flat_voxels: float = 1.0) -> Prompts:
    """An ROI -> a 3D ROI prompt (or a 2D box if it is flat along a volume axis)."""
    if roi_node is None or roi_node.GetNumberOfDefinedControlPoints() < 1:
        raise PromptError("the ROI is not placed: place it around the object first")
    lo, hi = roi_ijk_bounds(roi_node, volume_node)
    shape = _shape_kji(volume_node)
    sizes = (shape[2], shape[1], shape[0])
    if np.any(hi < -0.5) or np.any(lo > np.asarray(sizes) - 0.5):
        raise PromptError(f"the ROI ({format_ijk(lo)} to {format_ijk(hi)}) is outside the volume")
    # rounded outward, as samliverseg.io.markups.roi_to_ijk_box does, but with a tolerance that
    # survives Slicer's float32 control-point storage (an ROI face placed on a voxel centre comes
    # back a few 1e-6 voxel off, which a 1e-6 tolerance would round out to the next voxel)
    lo_v = np.floor(lo + ROUND_TOLERANCE_VOXELS)
    hi_v = np.ceil(hi - ROUND_TOLERANCE_VOXELS)
    thickness = hi - lo
    flat = [a for a in range(3) if thickness[a] <= flat_voxels]
    if len(flat) >= 2:
        raise PromptError("the ROI is empty: give it a width and a height of a few voxels")
    if flat:
        axis = "ijk"[flat[0]]
        c = flat[0]
        centre = int(np.clip(np.round((lo[c] + hi[c]) / 2.0), 0, sizes[c] - 1))
        a = [float(v) for v in lo_v]
        b = [float(v) for v in hi_v]
        a[c] = b[c] = float(centre)
        p = Prompts(box=SliceBox(tuple(a), tuple(b)), slice_axis=axis)
    else:
        p = Prompts(roi=Roi3D(*lo_v, *hi_v))
    return validate_prompts(p, shape)


def prompts_from_point_lists(volume_node, positive_node=None, negative_node=None,
                             slice_axis: str = "k") -> Prompts:
    """Point list(s) -> positive / negative points (validated: outside -> PromptError)."""
    pos: List[Tuple[float, float, float]] = []
    neg: List[Tuple[float, float, float]] = []
    if positive_node is not None:
        for ijk, negative in point_list_ijk(positive_node, volume_node):
            (neg if negative else pos).append(ijk)
    if negative_node is not None:
        neg += [ijk for ijk, _ in point_list_ijk(negative_node, volume_node)]
    if not pos and not neg:
        raise PromptError("the point list has no placed points: place at least one point on the object")
    return validate_prompts(Prompts(positive=pos, negative=neg, slice_axis=slice_axis), _shape_kji(volume_node))


def prompts_from_markups(volume_node, roi_node=None, positive_node=None, negative_node=None,
                         slice_axis: str = "k") -> Prompts:
    """An ROI and/or point lists -> one validated :class:`Prompts`."""
    if roi_node is None and positive_node is None and negative_node is None:
        raise PromptError("no prompt: place an ROI around the object or points on it")
    prompts = Prompts(slice_axis=slice_axis)
    if roi_node is not None:
        prompts = prompts_from_roi(roi_node, volume_node)
    if positive_node is not None or negative_node is not None:
        pts = prompts_from_point_lists(volume_node, positive_node, negative_node, prompts.slice_axis)
        prompts.positive += pts.positive
        prompts.negative += pts.negative
    return validate_prompts(prompts, _shape_kji(volume_node))


def add_points_to_markups(markups_node, volume_node, ijk_points: Sequence[Sequence[float]],
                          label_prefix: str = "") -> None:
    """Put IJK points into a point list (world RAS) - used to show the effect's prompts."""
    markups_node.RemoveAllControlPoints()
    m = geometry.world_ijk_to_ras(volume_node)
    for n, ijk in enumerate(ijk_points):
        ras = (m @ np.array([ijk[0], ijk[1], ijk[2], 1.0]))[:3]
        idx = markups_node.AddControlPointWorld(vtk.vtkVector3d(*ras))
        markups_node.SetNthControlPointLabel(idx, f"{label_prefix}{n + 1}")


def _nodes_of_class(scene, class_name: str) -> list:
    return [scene.GetNthNodeByClass(n, class_name) for n in range(scene.GetNumberOfNodesByClass(class_name))]


@contextmanager
def keep_place_state(scene) -> Iterator[None]:
    """Add markups nodes inside this block without taking the user's place tool.

    Slicer's Markups logic (``vtkSlicerMarkupsLogic::OnMRMLSceneNodeAdded``, the same in 5.8, 5.10
    and 5.12) makes every markups node added outside a batch/import the active place node
    (``SetActiveListID``: the selection node's ActivePlaceNodeID and ActivePlaceNodeClassName), so
    the toolbar's place mode would put the user's next point into the effect's hidden prompt
    nodes, in ROI mode after the box. This restores every selection node's active place node and
    class, and every interaction node's mode and place persistence, as they were before the block.
    """
    selections = [(n, n.GetActivePlaceNodeID(), n.GetActivePlaceNodeClassName())
                  for n in _nodes_of_class(scene, "vtkMRMLSelectionNode")]
    interactions = [(n, n.GetCurrentInteractionMode(), n.GetPlaceModePersistence())
                    for n in _nodes_of_class(scene, "vtkMRMLInteractionNode")]
    try:
        yield
    finally:
        for node, place_id, class_name in selections:
            if node.GetActivePlaceNodeClassName() != class_name:
                node.SetReferenceActivePlaceNodeClassName(class_name)
            if node.GetActivePlaceNodeID() != place_id:
                node.SetReferenceActivePlaceNodeID(place_id)
        for node, mode, persistence in interactions:
            if node.GetPlaceModePersistence() != persistence:
                node.SetPlaceModePersistence(persistence)
            if node.GetCurrentInteractionMode() != mode:
                node.SetCurrentInteractionMode(mode)
