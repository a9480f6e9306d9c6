"""Write a mask into a segment the way a Segment Editor effect does.

The mask (uint8/bool ``[k, j, i]`` on the source volume grid) is resampled onto the segment
editor's modifier-labelmap geometry and handed to ``ModifySegmentByLabelmap`` of the Segment
Editor logic, which applies:

* the *editable area* (mask mode: everywhere, inside/outside all or visible segments, inside one
  segment) and the optional source-volume intensity range,
* the *overwrite mode* (other segments lose the voxels written: all, visible, or none).

Undo state is saved first (one undo step per write), so undo restores exactly what was there.
Everything is checked before anything is saved or modified: on bad input the scene is unchanged.

Two targets do the actual work:

* :class:`LogicTarget` - a ``vtkSlicerSegmentEditorLogic`` (Qt-free; tests, the module logic);
* in Slicer, the effect wraps its ``scriptedEffect`` (``saveStateForUndo`` /
  ``modifySegmentByLabelmap`` / ``defaultModifierLabelmap``), which forwards to the same logic
  of the Segment Editor widget, so Ctrl+Z in the Segment Editor undoes the write.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import numpy as np

import slicer

from samliverseg.core.errors import InputError

from . import volume_nodes

#: Editable area ("Masking > Editable area" in the Segment Editor).
MASK_MODES = {
    "everywhere": "EditAllowedEverywhere",
    "inside_all": "EditAllowedInsideAllSegments",
    "inside_visible": "EditAllowedInsideVisibleSegments",
    "outside_all": "EditAllowedOutsideAllSegments",
    "outside_visible": "EditAllowedOutsideVisibleSegments",
    "inside_segment": "EditAllowedInsideSingleSegment",
}
#: Which other segments lose the voxels written ("Modify other segments").
OVERWRITE_MODES = {
    "all": "OverwriteAllSegments",
    "visible": "OverwriteVisibleSegments",
    "none": "OverwriteNone",
}
#: add = union with the segment; set = replace the segment; remove = erase the mask from it;
#: replace_slices = replace the segment only on the slices the mask covers (a 2D result).
WRITE_MODES = ("add", "set", "remove", "replace_slices")


def mask_mode_value(name: str) -> int:
    try:
        return getattr(slicer.vtkMRMLSegmentationNode, MASK_MODES[name])
    except KeyError:
        raise InputError(f"unknown editable area {name!r}: use one of {', '.join(MASK_MODES)}") from None


def overwrite_mode_value(name: str) -> int:
    try:
        return getattr(slicer.vtkMRMLSegmentEditorNode, OVERWRITE_MODES[name])
    except KeyError:
        raise InputError(f"unknown overwrite mode {name!r}: use one of {', '.join(OVERWRITE_MODES)}") from None


class WriteTarget(Protocol):
    """What :func:`write_mask` needs from a segment editor (the logic, or an effect in Slicer)."""

    def modifier_geometry(self):  # -> vtkOrientedImageData whose geometry the modifier must have
        ...

    def save_state_for_undo(self) -> None:
        ...

    def modify(self, segmentation_node, segment_id: str, modifier, mode: str) -> None:
        ...


class LogicTarget:
    """A :class:`WriteTarget` on a ``vtkSlicerSegmentEditorLogic`` (see :func:`create_editor`)."""

    def __init__(self, logic):
        self.logic = logic

    def modifier_geometry(self):
        if not self.logic.ResetModifierLabelmapToDefault():
            raise InputError("the segment editor has no reference geometry: select a source volume")
        return self.logic.GetModifierLabelmap()

    def save_state_for_undo(self) -> None:
        self.logic.SaveStateForUndo()

    def modify(self, segmentation_node, segment_id: str, modifier, mode: str) -> None:
        value = {"add": self.logic.ModificationModeAdd, "set": self.logic.ModificationModeSet,
                 "remove": self.logic.ModificationModeRemove}[mode]
        # isPerSegment=True (like Paint: the selected segment is edited), bypassMasking=False
        self.logic.ModifySegmentByLabelmap(segmentation_node, segment_id, modifier, value, True, False)

    # conveniences for tests and scripts
    def undo(self) -> None:
        self.logic.Undo()

    def redo(self) -> None:
        self.logic.Redo()


@dataclass
class Editor:
    """A Qt-free segment editor: the parameter node and the logic working on it."""

    node: "slicer.vtkMRMLSegmentEditorNode"
    logic: "slicer.vtkSlicerSegmentEditorLogic"

    @property
    def target(self) -> LogicTarget:
        return LogicTarget(self.logic)


def create_editor(scene, segmentation_node, source_volume_node, editor_node=None,
                  max_undo_states: int = 10) -> Editor:
    """A segment editor node + ``vtkSlicerSegmentEditorLogic`` on ``segmentation_node``."""
    volume_nodes.ensure_segmentation_converters()
    if editor_node is None:
        editor_node = slicer.vtkMRMLSegmentEditorNode()
        editor_node.SetName("SAMLiverSegEditor")
        editor_node.SetHideFromEditors(True)
        scene.AddNode(editor_node)
    logic = slicer.vtkSlicerSegmentEditorLogic()
    logic.SetMRMLScene(scene)
    logic.SetSegmentEditorNode(editor_node)
    logic.SetMaximumNumberOfUndoStates(max_undo_states)
    editor_node.SetAndObserveSegmentationNode(segmentation_node)
    editor_node.SetAndObserveSourceVolumeNode(source_volume_node)
    return Editor(editor_node, logic)


def configure_editing(editor_node, mask_mode: str = "everywhere", mask_segment_id: Optional[str] = None,
                      overwrite: str = "all", intensity_range=None) -> None:
    """Set the editable area, overwrite mode and optional intensity range of a segment editor node."""
    if mask_mode == "inside_segment" and not mask_segment_id:
        raise InputError("'inside a segment' needs the segment whose inside is editable")
    editor_node.SetMaskMode(mask_mode_value(mask_mode))
    editor_node.SetMaskSegmentID(mask_segment_id if mask_mode == "inside_segment" else None)
    editor_node.SetOverwriteMode(overwrite_mode_value(overwrite))
    if intensity_range is None:
        editor_node.SourceVolumeIntensityMaskOff()
    else:
        editor_node.SourceVolumeIntensityMaskOn()
        editor_node.SetSourceVolumeIntensityMaskRange(float(intensity_range[0]), float(intensity_range[1]))


@dataclass
class WriteReport:
    segment_id: str
    mode: str
    voxels_in_mask: int


def mask_to_modifier(mask: np.ndarray, volume_node, segmentation_node, modifier_geometry=None):
    """The mask as a ``vtkOrientedImageData`` on the modifier geometry (or the volume grid)."""
    image = volume_nodes.oriented_image_from_mask(
        mask, volume_nodes.ijk_to_segmentation_frame(volume_node, segmentation_node))
    if modifier_geometry is None:
        return image
    return volume_nodes.resample_to(image, modifier_geometry)


def slices_covered(mask: np.ndarray, axis: str) -> np.ndarray:
    """A mask that is 1 on every whole slice (across ``axis``) where ``mask`` has a voxel."""
    m = np.asarray(mask) > 0
    region = np.zeros(m.shape, np.uint8)
    if axis == "k":
        region[m.any(axis=(1, 2)), :, :] = 1
    elif axis == "j":
        region[:, m.any(axis=(0, 2)), :] = 1
    elif axis == "i":
        region[:, :, m.any(axis=(0, 1))] = 1
    else:
        raise InputError(f"unknown slice axis {axis!r}")
    return region


def write_mask(target: WriteTarget, mask: np.ndarray, volume_node, segmentation_node, segment_id: str,
               mode: str = "add", slice_axis: str = "k", save_undo: bool = True) -> WriteReport:
    """Write ``mask`` (``[k, j, i]`` on the grid of ``volume_node``) into ``segment_id``.

    ``mode``: see :data:`WRITE_MODES`; ``replace_slices`` replaces the segment on the slices
    (across ``slice_axis``) the mask touches and leaves the other slices alone, which is what
    applying a 2D result should do. Raises :class:`InputError` before touching anything if the
    inputs do not fit.
    """
    if mode not in WRITE_MODES:
        raise InputError(f"unknown write mode {mode!r}: use one of {', '.join(WRITE_MODES)}")
    volume_nodes.check_source_volume(volume_node)
    if segmentation_node is None:
        raise InputError("no segmentation: create or select a segmentation first")
    if not segment_id or segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
        raise InputError("no segment selected: add or select a segment first")
    d = volume_node.GetImageData().GetDimensions()
    m = np.asarray(mask)
    if m.shape != (d[2], d[1], d[0]):
        raise InputError(f"the mask has shape {m.shape} but the volume is {(d[2], d[1], d[0])} (k, j, i)")
    geometry_image = target.modifier_geometry()
    steps = []
    if mode == "replace_slices":
        steps.append(("remove", slices_covered(m, slice_axis)))
        steps.append(("add", m))
    else:
        steps.append((mode, m))
    modifiers = [(op, mask_to_modifier(arr, volume_node, segmentation_node, geometry_image)) for op, arr in steps]
    if save_undo:
        target.save_state_for_undo()
    for op, modifier in modifiers:
        target.modify(segmentation_node, segment_id, modifier, op)
    return WriteReport(segment_id, mode, int(np.count_nonzero(m)))
