"""Qt-free logic of the SAMLiverSeg Slicer module and its "Segment Anything" effect.

Everything here runs with only Slicer's MRML / Segmentations logic (the ``slicer-core`` wheel
outside Slicer, the real application inside it) and the ``samliverseg`` core library; nothing
imports ``qt``, ``ctk`` or ``slicer.app``. The Qt classes (module widget, segment editor effect)
only forward user actions here and show the results, so every decision is testable with pytest
against a real ``vtkMRMLScene``.

Submodules (import them explicitly; this package imports nothing heavy at Slicer startup):

* :mod:`.geometry` - IJK/RAS/LPS matrices of volume nodes (parent transforms included).
* :mod:`.volume_nodes` - ``vtkMRMLScalarVolumeNode`` <-> ``samliverseg.io.volume.Volume``; masks
  <-> ``vtkOrientedImageData`` and segments on the volume grid.
* :mod:`.slice_clicks` - slice-view clicks (XY) -> RAS -> IJK -> ``Prompts``.
* :mod:`.markups_prompts` - markups point lists / ROIs -> ``Prompts``.
* :mod:`.segment_writer` - masks into segments through ``vtkSlicerSegmentEditorLogic``
  (editable area, overwrite mode, undo).
* :mod:`.effect_logic` - the state machine of the "Segment Anything" effect (2D models with
  propagation; SAM-Med3D clicks in any view), its background tasks, and the display of prompts,
  preview and the uncertainty overlay as MRML nodes.
* :mod:`.module_logic` - "Segment liver" / "Segment tumor" from markups; model status and
  choices (trained models included); the training plot's table/plot nodes.
* :mod:`.training_process` - the training panel: prepare/train subprocesses, stop/resume,
  progress state.
* :mod:`.constants` - the choices offered in the GUI (imports nothing).
* :mod:`.process` - subprocess manager for batch jobs (reader thread, poll, kill the tree).
* :mod:`.batch` - a folder of CT files -> a queue of ``samliverseg segment`` runs.
* :mod:`.dependencies` - first-use dependency decisions (torch, the library, the weights).
"""

#: Version of the Slicer module; the bundled library must match it (see dependencies.py).
MODULE_VERSION = "0.1.0"
