"""Write a mask into a segment the way a Segment Editor effect does.

The mask (uint8/bool ``[k, j, i]`` on the source volume grid) is resampled onto the segment
editor's modifier-labelmap geometry (the segmentation's reference geometry) and applied with:

* the *editable area* (mask mode: everywhere, inside/outside all or visible segments, inside one
  segment) and the optional source-volume intensity range,
* the *overwrite mode* (other segments lose the voxels written: all, visible, or none).

Undo state is saved first (one undo step per write), so undo restores exactly what was there.
Everything is checked before anything is saved or modified: on bad input the scene is unchanged.

Three targets do the actual work:

* :class:`LogicTarget` - a ``vtkSlicerSegmentEditorLogic`` (Qt-free; Slicer 5.10 and later, where
  it was added; ``ModifySegmentByLabelmap``, ``SaveStateForUndo``);
* :class:`LabelmapTarget` - Slicer 5.8, which has no ``vtkSlicerSegmentEditorLogic``: the same
  rules as 5.8's ``qSlicerSegmentEditorAbstractEffect::modifySegmentByLabelmap`` (the editable
  area from ``vtkMRMLSegmentationNode.GenerateEditMask``, the intensity range, the overwrite list),
  written with ``vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment`` (``MODE_MERGE_MASK``
  to add, ``MODE_MERGE_MIN`` of the inverted labelmap to erase), undo through a
  ``vtkSegmentationHistory`` on the segmentation. Both exist in 5.8, 5.10 and 5.12.
  :func:`create_editor` picks by feature test (``use_editor_logic=None``); tests force either.
* in Slicer, the effect wraps its ``scriptedEffect`` (``saveStateForUndo`` /
  ``modifySegmentByLabelmap`` / ``defaultModifierLabelmap``), which forwards to the same logic
  of the Segment Editor widget, so Ctrl+Z in the Segment Editor undoes the write.

The module panel writes through one hidden segment editor node per scene (a singleton,
:func:`module_editor_node`), not a new node per click.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Protocol

import numpy as np
import vtk

import slicer

from samliverseg.core.errors import InputError

from . import geometry, volume_nodes

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

    def can_undo(self) -> bool:
        return bool(self.logic.CanUndo())


def has_segment_editor_logic() -> bool:
    """Whether this Slicer has the Qt-free ``vtkSlicerSegmentEditorLogic`` (5.10 and later) with the
    methods :class:`LogicTarget` calls."""
    cls = getattr(slicer, "vtkSlicerSegmentEditorLogic", None)
    return cls is not None and all(hasattr(cls, m) for m in (
        "ModifySegmentByLabelmap", "ResetModifierLabelmapToDefault", "GetModifierLabelmap", "SaveStateForUndo",
        "SetSegmentEditorNode"))


def reference_geometry(segmentation_node, source_volume_node) -> "slicer.vtkOrientedImageData":
    """An empty uint8 image with the geometry edits are made on: the segmentation's reference
    image geometry (its conversion parameter), else the source volume's grid (segmentation frame)."""
    name = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    text = segmentation_node.GetSegmentation().GetConversionParameter(name) if segmentation_node else ""
    image = slicer.vtkOrientedImageData()
    if text and slicer.vtkSegmentationConverter.DeserializeImageGeometry(text, image, True, vtk.VTK_UNSIGNED_CHAR, 1):
        ext = image.GetExtent()
        if ext[0] <= ext[1] and ext[2] <= ext[3] and ext[4] <= ext[5]:
            image.GetPointData().GetScalars().Fill(0)
            return image
    if source_volume_node is None or source_volume_node.GetImageData() is None:
        raise InputError("the segment editor has no reference geometry: select a source volume")
    return volume_nodes.reference_image(source_volume_node, segmentation_node)


class LabelmapTarget:
    """A :class:`WriteTarget` for Slicer 5.8 (no ``vtkSlicerSegmentEditorLogic``): the rules of 5.8's
    ``qSlicerSegmentEditorAbstractEffect::modifySegmentByLabelmap`` on a segment editor node,
    ``SetBinaryLabelmapToSegment`` to write, a ``vtkSegmentationHistory`` for undo."""

    def __init__(self, editor_node, history):
        self.node = editor_node
        self.history = history

    def modifier_geometry(self):
        return reference_geometry(self.node.GetSegmentationNode(), self.node.GetSourceVolumeNode())

    def save_state_for_undo(self) -> None:
        seg_node = self.node.GetSegmentationNode()
        if seg_node is not None and self.history.GetSegmentation() is not seg_node.GetSegmentation():
            self.history.SetSegmentation(seg_node.GetSegmentation())
        self.history.SaveState()

    def _not_editable(self, segmentation_node, segment_id: str, geometry_image) -> Optional[np.ndarray]:
        """uint8 [k, j, i] on the modifier grid: 1 where the editable area / intensity range forbid
        editing (None when everything is editable)."""
        node = self.node
        blocked = None
        mode = node.GetMaskMode()
        if mode != slicer.vtkMRMLSegmentationNode.EditAllowedEverywhere:
            mask = slicer.vtkOrientedImageData()
            if not segmentation_node.GenerateEditMask(mask, mode, geometry_image, segment_id,
                                                      node.GetMaskSegmentID() or ""):
                raise InputError("could not compute the editable area of the segment editor")
            blocked = volume_nodes.array_from_oriented_image_on(mask, geometry_image) > 0
        if node.GetSourceVolumeIntensityMask():
            source = node.GetSourceVolumeNode()
            volume_nodes.check_source_volume(source)
            image = slicer.vtkOrientedImageData()
            image.ShallowCopy(source.GetImageData())
            image.SetImageToWorldMatrix(geometry.vtk_matrix_from_array(
                volume_nodes.ijk_to_segmentation_frame(source, segmentation_node)))
            values = volume_nodes.array_from_image_data(volume_nodes.resample_to(image, geometry_image))
            lo, hi = node.GetSourceVolumeIntensityMaskRange()
            outside = (values < lo) | (values > hi)
            blocked = outside if blocked is None else (blocked | outside)
        return blocked

    def _image(self, array: np.ndarray, like) -> "slicer.vtkOrientedImageData":
        """``array`` [k, j, i] as an oriented image with the geometry (and extent) of ``like``."""
        out = slicer.vtkOrientedImageData()
        out.ShallowCopy(volume_nodes.image_data_from_array(np.asarray(array, np.uint8), vtk.VTK_UNSIGNED_CHAR))
        ext = like.GetExtent()
        out.SetExtent(ext)  # keeps the voxels; only the index origin moves to the reference's
        matrix = vtk.vtkMatrix4x4()
        like.GetImageToWorldMatrix(matrix)
        out.SetImageToWorldMatrix(matrix)
        return out

    def _segment_on(self, segmentation_node, segment_id: str, geometry_image) -> np.ndarray:
        labelmap = slicer.vtkOrientedImageData()
        if not segmentation_node.GetBinaryLabelmapRepresentation(segment_id, labelmap):
            d = geometry_image.GetDimensions()
            return np.zeros((d[2], d[1], d[0]), bool)
        return volume_nodes.array_from_oriented_image_on(labelmap, geometry_image) > 0

    def _overwrite_ids(self, segmentation_node, segment_id: str) -> List[str]:
        ids = vtk.vtkStringArray()
        segmentation_node.GetSegmentation().GetSegmentIDs(ids)
        others = [ids.GetValue(n) for n in range(ids.GetNumberOfValues()) if ids.GetValue(n) != segment_id]
        mode = self.node.GetOverwriteMode()
        if mode == slicer.vtkMRMLSegmentEditorNode.OverwriteAllSegments:
            return others
        if mode == slicer.vtkMRMLSegmentEditorNode.OverwriteVisibleSegments:
            display = segmentation_node.GetDisplayNode()
            return [i for i in others if display is None or display.GetSegmentVisibility(i)]
        return []

    def modify(self, segmentation_node, segment_id: str, modifier, mode: str) -> None:
        logic = slicer.vtkSlicerSegmentationsModuleLogic
        written = volume_nodes.array_from_image_data(modifier) > 0
        blocked = self._not_editable(segmentation_node, segment_id, modifier)
        current = self._segment_on(segmentation_node, segment_id, modifier)
        node = self.node
        if blocked is not None:
            if node.GetMaskMode() == slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment and mode == "remove":
                blocked = blocked & ~current  # erasing inside a segment may always erase the segment itself
            written = written & ~blocked
            if mode == "set":
                written = written | (current & blocked)  # "set" keeps the segment where editing is not allowed
        overwrite = self._overwrite_ids(segmentation_node, segment_id)
        keep = self._image(np.where(written, 0, 255), modifier)  # MODE_MERGE_MIN of this erases `written`
        if mode == "set":
            labelmap = slicer.vtkOrientedImageData()
            if segmentation_node.GetBinaryLabelmapRepresentation(segment_id, labelmap):
                ext = labelmap.GetExtent()
                if ext[0] <= ext[1] and ext[2] <= ext[3] and ext[4] <= ext[5]:
                    erase_all = self._image(np.where(volume_nodes.array_from_image_data(labelmap) > 0, 0, 255), labelmap)
                    if not logic.SetBinaryLabelmapToSegment(erase_all, segmentation_node, segment_id,
                                                            logic.MODE_MERGE_MIN, None, False, []):
                        raise InputError(f"could not clear segment '{segment_id}'")
        if mode in ("set", "add"):
            ok = logic.SetBinaryLabelmapToSegment(self._image(written, modifier), segmentation_node, segment_id,
                                                  logic.MODE_MERGE_MASK, None, False, overwrite)
        else:
            ok = logic.SetBinaryLabelmapToSegment(keep, segmentation_node, segment_id, logic.MODE_MERGE_MIN,
                                                  None, False, overwrite)
        if not ok:
            raise InputError(f"could not write into segment '{segment_id}'")
        if mode in ("set", "add") and overwrite and written.any():
            segmentation = segmentation_node.GetSegmentation()
            name = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
            layer = segmentation.GetSegment(segment_id).GetRepresentation(name)
            for other in overwrite:
                if segmentation.GetSegment(other).GetRepresentation(name) is layer:
                    continue  # the same layer: SetBinaryLabelmapToSegment has overwritten it already
                if not self._segment_on(segmentation_node, other, modifier)[written].any():
                    continue
                if not logic.SetBinaryLabelmapToSegment(keep, segmentation_node, other, logic.MODE_MERGE_MIN,
                                                        None, False, []):
                    raise InputError(f"could not erase the written voxels from segment '{other}'")

    # conveniences for tests and scripts
    def undo(self) -> None:
        self.history.RestorePreviousState()

    def redo(self) -> None:
        self.history.RestoreNextState()

    def can_undo(self) -> bool:
        return bool(self.history.IsRestorePreviousStateAvailable())


@dataclass
class Editor:
    """A Qt-free segment editor: the parameter node and what writes on it (the Segment Editor logic
    on Slicer 5.10+, else a segmentation history for :class:`LabelmapTarget`)."""

    node: "slicer.vtkMRMLSegmentEditorNode"
    logic: Optional[object] = None  # vtkSlicerSegmentEditorLogic, or None (Slicer 5.8)
    history: Optional[object] = None  # vtkSegmentationHistory when logic is None

    @property
    def target(self):
        if self.logic is not None:
            return LogicTarget(self.logic)
        return LabelmapTarget(self.node, self.history)


#: The singleton tag of the segment editor node the module panel writes through.
MODULE_EDITOR_TAG = "SAMLiverSegModule"


def module_editor_node(scene) -> "slicer.vtkMRMLSegmentEditorNode":
    """The module panel's segment editor node: one per scene (a singleton node, hidden from the
    node selectors), made on first use and found again afterwards, also after a scene close."""
    node = scene.GetSingletonNode(MODULE_EDITOR_TAG, "vtkMRMLSegmentEditorNode")
    if node is None:
        node = slicer.vtkMRMLSegmentEditorNode()
        node.SetSingletonTag(MODULE_EDITOR_TAG)
        node.SetName("SAMLiverSeg segment editor")
        node.SetHideFromEditors(True)
        node = scene.AddNode(node)
    return node


def create_editor(scene, segmentation_node, source_volume_node, editor_node=None,
                  max_undo_states: int = 10, use_editor_logic: Optional[bool] = None) -> Editor:
    """A segment editor node (``editor_node``, or a new hidden one) working on ``segmentation_node``
    with ``source_volume_node``: through ``vtkSlicerSegmentEditorLogic`` when this Slicer has it
    (``use_editor_logic=None``; True/False force either way, for tests), else :class:`LabelmapTarget`."""
    volume_nodes.ensure_segmentation_converters()
    if use_editor_logic is None:
        use_editor_logic = has_segment_editor_logic()
    if editor_node is None:
        editor_node = slicer.vtkMRMLSegmentEditorNode()
        editor_node.SetName("SAMLiverSegEditor")
        editor_node.SetHideFromEditors(True)
        scene.AddNode(editor_node)
    editor_node.SetAndObserveSegmentationNode(segmentation_node)
    editor_node.SetAndObserveSourceVolumeNode(source_volume_node)
    if use_editor_logic:
        logic = slicer.vtkSlicerSegmentEditorLogic()
        logic.SetMRMLScene(scene)
        logic.SetSegmentEditorNode(editor_node)
        logic.SetMaximumNumberOfUndoStates(max_undo_states)
        return Editor(editor_node, logic=logic)
    history = slicer.vtkSegmentationHistory()
    history.SetMaximumNumberOfStates(max_undo_states)
    if segmentation_node is not None:
        history.SetSegmentation(segmentation_node.GetSegmentation())
    return Editor(editor_node, history=history)


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
