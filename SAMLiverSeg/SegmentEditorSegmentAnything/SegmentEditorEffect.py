"""The "Segment Anything" Segment Editor effect (Qt side only).

In a slice view: left-click adds a positive point, Shift+click a negative point, click-drag draws
a box. The 2D result shows at once as a preview (a separate segmentation node, like Grow from
seeds); "Propagate to 3D" extends it through the volume; "Apply" writes it into the selected
segment through the Segment Editor (editable area, overwrite mode, undo).

All decisions are in ``SAMLiverSegLogic.effect_logic`` (Qt-free, tested with pytest). Model work
runs in a background thread (``BackgroundTask``); a QTimer polls it, so the UI never waits on
the model. MRML is only touched from the GUI thread.
"""

import logging
import os

import qt
import vtk

import slicer

from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

NEIGHBOUR_PREFETCH = 4  # slices embedded ahead on each side of a clicked slice
CLICK_MAX_PIXELS = 4  # a press-release closer than this is a click, farther is a drag


class EffectTarget:
    """``segment_writer.WriteTarget`` through the effect: the Segment Editor's own logic and undo."""

    def __init__(self, scriptedEffect):
        self.scriptedEffect = scriptedEffect

    def modifier_geometry(self):
        return self.scriptedEffect.defaultModifierLabelmap()

    def save_state_for_undo(self):
        self.scriptedEffect.saveStateForUndo()

    def modify(self, segmentationNode, segmentId, modifier, mode):
        modes = {
            "add": slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeAdd,
            "set": slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeSet,
            "remove": slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeRemove,
        }
        self.scriptedEffect.modifySegmentByLabelmap(segmentationNode, segmentId, modifier, modes[mode])


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    """Segment Anything: point and box prompts, 2D preview, propagation to 3D."""

    def __init__(self, scriptedEffect):
        scriptedEffect.name = "Segment Anything"
        scriptedEffect.perSegment = True
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self.session = None
        self.display = None
        self.task = None  # the BackgroundTask running now
        self.taskKind = ""
        self.discardedTask = None  # a task whose prompts were cleared while it ran: its result is dropped
        self.previewPending = False  # a click arrived while the model was busy
        self.prefetchTask = None
        self.dragStart = None
        self.dragViewWidget = None
        self.dragShift = False
        self.rubberBands = {}  # view widget -> (actor, points)
        self.pollTimer = qt.QTimer()
        self.pollTimer.setInterval(100)
        self.pollTimer.connect("timeout()", self.onPoll)

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        iconPath = os.path.join(os.path.dirname(__file__), "SegmentEditorEffect.png")
        return qt.QIcon(iconPath) if os.path.exists(iconPath) else qt.QIcon()

    def helpText(self):
        return """<html>Segment with a Segment-Anything model (LiteMedSAM by default).<p>
<b>Left-click</b>: positive point. <b>Shift+click</b>: negative point. <b>Drag</b>: box (best for
LiteMedSAM/MedSAM). The result on that slice shows at once; <b>Propagate to 3D</b> extends it
through the volume; <b>Apply</b> writes it into the selected segment (Ctrl+Z undoes it).
Works in axial, coronal and sagittal views. With a 3D model (SAM-Med3D) every click, in any view,
segments the whole object in 3D and refines it. <b>Show uncertainty</b> marks where the model is
unsure (the best places for the next click).</html>"""

    def cleanup(self):
        self.pollTimer.disconnect("timeout()", self.onPoll)

    # -- options panel -------------------------------------------------------------------------
    def setupOptionsFrame(self):
        from SAMLiverSegLogic.constants import DEVICE_CHOICES, MODEL_3D_CHOICES, MODEL_CHOICES, WINDOW_CHOICES

        self.modelComboBox = qt.QComboBox()
        self.modelComboBox.addItems(MODEL_CHOICES + MODEL_3D_CHOICES)
        self.modelComboBox.toolTip = "Model (weights of LiteMedSAM are installed; others need a checkpoint)"
        self.deviceComboBox = qt.QComboBox()
        self.deviceComboBox.addItems(DEVICE_CHOICES)
        self.windowComboBox = qt.QComboBox()
        self.windowComboBox.addItems(WINDOW_CHOICES)
        self.customWindowLineEdit = qt.QLineEdit()
        self.customWindowLineEdit.placeholderText = "LOW,HIGH in HU"
        modelRow = qt.QHBoxLayout()
        modelRow.addWidget(self.modelComboBox)
        modelRow.addWidget(qt.QLabel("device:"))
        modelRow.addWidget(self.deviceComboBox)
        self.scriptedEffect.addLabeledOptionsWidget("Model:", modelRow)
        windowRow = qt.QHBoxLayout()
        windowRow.addWidget(self.windowComboBox)
        windowRow.addWidget(self.customWindowLineEdit)
        self.scriptedEffect.addLabeledOptionsWidget("CT window:", windowRow)
        self.checkpointLineEdit = qt.QLineEdit()
        self.checkpointLineEdit.placeholderText = "(from the weights cache)"
        self.checkpointLineEdit.toolTip = "Checkpoint file of the model; empty: the weights cache folder"
        self.scriptedEffect.addLabeledOptionsWidget("Checkpoint:", self.checkpointLineEdit)

        self.statusLabel = qt.QLabel("Drag a box around the object, or click on it.")
        self.statusLabel.wordWrap = True
        self.scriptedEffect.addOptionsWidget(self.statusLabel)
        self.progressBar = qt.QProgressBar()
        self.progressBar.visible = False
        self.cancelTaskButton = qt.QPushButton("Cancel")
        self.cancelTaskButton.toolTip = "Stop the computation running in the background"
        self.cancelTaskButton.visible = False
        progressRow = qt.QHBoxLayout()
        progressRow.addWidget(self.progressBar)
        progressRow.addWidget(self.cancelTaskButton)
        self.scriptedEffect.addOptionsWidget(progressRow)

        self.propagateButton = qt.QPushButton("Propagate to 3D")
        self.propagateButton.objectName = self.__class__.__name__ + "Propagate"
        self.propagateButton.toolTip = "Extend the result through the volume, both ways from the prompted slice"
        self.clearButton = qt.QPushButton("Clear")
        self.clearButton.objectName = self.__class__.__name__ + "Clear"
        self.clearButton.toolTip = "Remove the prompts and the preview"
        self.applyButton = qt.QPushButton("Apply")
        self.applyButton.objectName = self.__class__.__name__ + "Apply"
        self.applyButton.toolTip = "Write the preview into the selected segment (undo with Ctrl+Z)"
        buttons = qt.QHBoxLayout()
        buttons.addWidget(self.propagateButton)
        buttons.addWidget(self.clearButton)
        buttons.addWidget(self.applyButton)
        self.scriptedEffect.addOptionsWidget(buttons)
        self.uncertaintyCheckBox = qt.QCheckBox("Show uncertainty")
        self.uncertaintyCheckBox.objectName = self.__class__.__name__ + "ShowUncertainty"
        self.uncertaintyCheckBox.toolTip = ("Ask the model several times with perturbed prompts and show where the "
                                            "answers disagree (the preview, else the selected segment): click there")
        self.scriptedEffect.addOptionsWidget(self.uncertaintyCheckBox)

        self.propagateButton.connect("clicked()", self.onPropagate)
        self.clearButton.connect("clicked()", self.onClear)
        self.applyButton.connect("clicked()", self.onApply)
        self.cancelTaskButton.connect("clicked()", self.onCancelTask)
        self.uncertaintyCheckBox.connect("toggled(bool)", self.onShowUncertainty)
        for combo in (self.modelComboBox, self.deviceComboBox, self.windowComboBox):
            combo.connect("currentIndexChanged(int)", self.updateMRMLFromGUI)
        self.customWindowLineEdit.connect("editingFinished()", self.updateMRMLFromGUI)
        self.checkpointLineEdit.connect("editingFinished()", self.updateMRMLFromGUI)

    def createCursor(self, widget):
        return qt.QCursor(qt.Qt.CrossCursor)

    def setMRMLDefaults(self):
        self.scriptedEffect.setParameterDefault("Model", "lite_medsam")
        self.scriptedEffect.setParameterDefault("Device", "auto")
        self.scriptedEffect.setParameterDefault("Window", "model")
        self.scriptedEffect.setParameterDefault("CustomWindow", "-200,300")
        self.scriptedEffect.setParameterDefault("Checkpoint", "")

    def updateGUIFromMRML(self):
        for combo, name in ((self.modelComboBox, "Model"), (self.deviceComboBox, "Device"), (self.windowComboBox, "Window")):
            wasBlocked = combo.blockSignals(True)
            index = combo.findText(self.scriptedEffect.parameter(name))
            combo.currentIndex = max(index, 0)
            combo.blockSignals(wasBlocked)
        wasBlocked = self.customWindowLineEdit.blockSignals(True)
        self.customWindowLineEdit.text = self.scriptedEffect.parameter("CustomWindow")
        self.customWindowLineEdit.enabled = self.windowComboBox.currentText == "custom"
        self.customWindowLineEdit.blockSignals(wasBlocked)
        wasBlocked = self.checkpointLineEdit.blockSignals(True)
        self.checkpointLineEdit.text = self.scriptedEffect.parameter("Checkpoint")
        self.checkpointLineEdit.blockSignals(wasBlocked)
        self.updateButtons()

    def updateMRMLFromGUI(self):
        self.scriptedEffect.setParameter("Model", self.modelComboBox.currentText)
        self.scriptedEffect.setParameter("Device", self.deviceComboBox.currentText)
        self.scriptedEffect.setParameter("Window", self.windowComboBox.currentText)
        self.scriptedEffect.setParameter("CustomWindow", self.customWindowLineEdit.text)
        self.scriptedEffect.setParameter("Checkpoint", self.checkpointLineEdit.text.strip())
        self.configureSession()

    def configureSession(self):
        """Hand the effect parameters to the session (the model is rebuilt only when they change)."""
        if self.session is None:
            return
        try:
            self.session.configure(self.engineSettings())
        except Exception as exc:  # an invalid custom window: say so, keep the old settings
            self.showStatus(str(exc), error=True)

    def updateButtons(self):
        busy = self.task is not None
        hasPreview = self.session is not None and self.session.preview is not None
        hasPrompts = self.session is not None and self.session.has_prompts()
        self.propagateButton.enabled = hasPrompts and not busy
        self.applyButton.enabled = hasPreview and not busy
        self.clearButton.enabled = (hasPrompts or hasPreview) and not busy

    def showStatus(self, text, error=False):
        self.statusLabel.text = text
        self.statusLabel.setStyleSheet("color: #c00;" if error else "")

    # -- life cycle ----------------------------------------------------------------------------
    def engineSettings(self):
        from samliverseg.core.errors import SAMLiverSegError
        from SAMLiverSegLogic import effect_logic, module_logic

        try:
            window = module_logic.window_spec(self.scriptedEffect.parameter("Window") or "model",
                                              self.scriptedEffect.parameter("CustomWindow"))
        except SAMLiverSegError as exc:  # a malformed custom window: say so, use the model's window
            self.showStatus(str(exc), error=True)
            window = None
        return effect_logic.EngineSettings(
            model=self.scriptedEffect.parameter("Model") or "lite_medsam",
            checkpoint=self.scriptedEffect.parameter("Checkpoint") or None,
            device=self.scriptedEffect.parameter("Device") or "auto",
            window=window)

    def sourceVolumeNode(self):
        node = self.scriptedEffect.parameterSetNode()
        getter = getattr(node, "GetSourceVolumeNode", None) or node.GetMasterVolumeNode
        return getter()

    def activate(self):
        from SAMLiverSegLogic import dependencies

        ready, message = dependencies.dependencies_ready()
        if not ready:
            self.showStatus(f"Not ready: {message}. Open the 'SAM Liver Segmentation' module and press "
                            "'Install dependencies'.", error=True)
            return
        from SAMLiverSegLogic import effect_logic

        self.refreshModelChoices()
        if self.session is None:
            self.session = effect_logic.SegmentAnythingSession(self.engineSettings())
        if self.display is None:
            self.display = effect_logic.PreviewDisplay(slicer.mrmlScene)
        self.useSourceVolume()
        self.pollTimer.start()

    def refreshModelChoices(self):
        """The built-in models plus the user's trained ones (they appear after a training run)."""
        from SAMLiverSegLogic import module_logic
        from SAMLiverSegLogic.constants import MODEL_3D_CHOICES

        current = self.scriptedEffect.parameter("Model") or "lite_medsam"
        wasBlocked = self.modelComboBox.blockSignals(True)
        self.modelComboBox.clear()
        self.modelComboBox.addItems(module_logic.model_choices() + MODEL_3D_CHOICES)
        self.modelComboBox.currentIndex = max(self.modelComboBox.findText(current), 0)
        self.modelComboBox.blockSignals(wasBlocked)

    def deactivate(self):
        self.pollTimer.stop()
        self.dragStart = None
        for viewWidget in list(self.rubberBands):
            self.removeRubberBand(viewWidget)
        # Cancels the running task but keeps it: its thread may still write the session, so its
        # result is dropped in finishTask (polled again on the next activation).
        self.onClear()
        self.uncertaintyCheckBox.setChecked(False)  # removes the overlay

    # The Segment Editor notifies every registered effect, active or not (and, in Slicer >= 5.2,
    # calls both methods): load the volume only when this effect is in use (activate() does it too).
    def sourceVolumeNodeChanged(self):
        if self.scriptedEffect.active():
            self.useSourceVolume()

    def masterVolumeNodeChanged(self):  # Slicer < 5.2
        if self.scriptedEffect.active():
            self.useSourceVolume()

    def useSourceVolume(self):
        if self.session is None:
            return
        volumeNode = self.sourceVolumeNode()
        if volumeNode is None:
            self.showStatus("Select a source volume (a CT).", error=True)
            return
        if volumeNode is self.session.volume_node:
            return
        self.onClear()
        outcome = self.session.set_volume_node(volumeNode)
        if not outcome.ok:
            self.showStatus(outcome.message, error=True)
        elif outcome.message:
            self.showStatus(outcome.message + " Set the CT window to 'custom' to change it.", error=True)
        else:
            self.showStatus("Drag a box around the object, or click on it.")

    # -- mouse ---------------------------------------------------------------------------------
    def processInteractionEvents(self, callerInteractor, eventId, viewWidget):
        if viewWidget.className() != "qMRMLSliceWidget" or self.session is None:
            return False
        if eventId == vtk.vtkCommand.LeftButtonPressEvent:
            self.dragStart = callerInteractor.GetEventPosition()
            self.dragViewWidget = viewWidget
            self.dragShift = bool(callerInteractor.GetShiftKey())
            return True
        if eventId == vtk.vtkCommand.MouseMoveEvent and self.dragStart is not None and viewWidget is self.dragViewWidget:
            self.updateRubberBand(viewWidget, self.dragStart, callerInteractor.GetEventPosition())
            return True
        if eventId == vtk.vtkCommand.LeftButtonReleaseEvent and self.dragStart is not None:
            start, end = self.dragStart, callerInteractor.GetEventPosition()
            self.dragStart = None
            self.removeRubberBand(viewWidget)
            if abs(end[0] - start[0]) <= CLICK_MAX_PIXELS and abs(end[1] - start[1]) <= CLICK_MAX_PIXELS:
                self.onClick(viewWidget, start, positive=not self.dragShift)
            else:
                self.onDrag(viewWidget, start, end)
            return True
        return False

    def onClick(self, viewWidget, xy, positive=True):
        outcome = self.session.click(viewWidget.mrmlSliceNode(), xy, positive=positive, preview=False)
        self.afterPromptChange(outcome)

    def onDrag(self, viewWidget, xy0, xy1):
        outcome = self.session.drag_box(viewWidget.mrmlSliceNode(), xy0, xy1, preview=False)
        self.afterPromptChange(outcome)

    def afterPromptChange(self, outcome):
        if not outcome.ok:
            self.showStatus(outcome.message, error=True)
            return
        self.display.show_prompts(self.session.volume_node, self.session.builder)
        if outcome.message:
            self.showStatus(outcome.message)
        self.requestPreview()

    # -- background work -------------------------------------------------------------------------
    def requestPreview(self):
        if self.task is not None:
            self.previewPending = True  # recomputed when the running one ends
            return
        from SAMLiverSegLogic import effect_logic

        self.configureSession()
        job = self.session.preview_job()  # the prompts are read here, in the GUI thread
        if isinstance(job, effect_logic.Outcome):
            self.showStatus(job.message, error=True)
            return
        self.showStatus("Computing the preview...")
        self.startTask("preview", effect_logic.BackgroundTask(lambda progress, cancel: job()))

    def startTask(self, kind, task):
        self.task, self.taskKind = task, kind
        task.start()
        self.progressBar.visible = kind in ("propagate", "uncertainty")
        self.cancelTaskButton.visible = kind in ("propagate", "uncertainty")
        self.progressBar.setValue(0)
        self.updateButtons()

    def onPropagate(self):
        if self.session is None or self.task is not None:
            return
        from SAMLiverSegLogic import effect_logic

        self.configureSession()
        job = self.session.propagate_job()
        if isinstance(job, effect_logic.Outcome):
            self.showStatus(job.message, error=True)
            return
        self.showStatus("Propagating through the volume...")
        self.startTask("propagate", effect_logic.BackgroundTask(job, "propagate"))

    def onCancelTask(self):
        if self.task is not None:
            self.task.cancel()
        if self.prefetchTask is not None:
            self.prefetchTask.cancel()

    def onPoll(self):
        task = self.task
        if task is not None and self.taskKind in ("propagate", "uncertainty"):
            done, total = task.progress
            self.progressBar.setMaximum(max(total, 1))
            self.progressBar.setValue(done)
        if task is not None and task.done():
            self.task = None
            self.progressBar.visible = self.cancelTaskButton.visible = False
            self.finishTask(task)
            if self.previewPending:
                self.previewPending = False
                self.requestPreview()
        if self.prefetchTask is not None and self.prefetchTask.done():
            self.prefetchTask = None
        self.updateButtons()

    def finishTask(self, task):
        if task is self.discardedTask:  # the prompts were cleared while it ran: its preview is stale
            self.discardedTask = None
            if self.session is not None:
                self.session.preview, self.session.preview_is_3d = None, False
            return
        if task.error is not None:
            logging.error(f"Segment Anything: {task.error}")
            self.showStatus(f"Failed: {task.error}", error=True)
            return
        outcome = task.result
        if not outcome.ok:
            self.showStatus(outcome.message, error=True)
            if task.name == "uncertainty":
                self.uncertaintyCheckBox.setChecked(False)
            return
        if task.name == "uncertainty":
            node = self.display.show_uncertainty(self.session.volume_node, outcome.data.variance)
            slicer.util.setSliceViewerLayers(foreground=node, foregroundOpacity=0.6)
            self.showStatus(f"Uncertainty ({outcome.seconds:.1f} s): {outcome.message}")
            return
        self.display.show_preview(self.session.volume_node, self.session.preview)
        what = "3D result" if self.session.preview_is_3d else "result on this slice"
        note = " ".join(self.session.notes)
        self.session.notes.clear()
        self.showStatus(f"Preview: {what}, {outcome.voxels} voxels ({outcome.seconds:.1f} s). {outcome.message} {note}".strip())
        if not self.session.preview_is_3d:
            self.startPrefetch()

    def startPrefetch(self):
        """Embed the neighbouring slices in the background, so that the next click is fast."""
        if self.prefetchTask is not None or self.session.builder.current_slice is None:
            return
        from SAMLiverSegLogic import effect_logic

        axis = self.session.builder.slice_axis
        index = self.session.builder.current_slice
        indices = [index + d * s for d in range(1, NEIGHBOUR_PREFETCH + 1) for s in (1, -1)]
        self.prefetchTask = effect_logic.BackgroundTask(
            lambda progress, cancel: self.session.prefetch(axis, indices, progress, cancel), "prefetch").start()

    def waitForBackgroundWork(self, timeout=60.0):
        """For tests and scripts: process the running task(s) to the end."""
        import time

        t0 = time.time()
        while self.task is not None or self.previewPending:
            if time.time() - t0 > timeout:
                return False
            if self.task is not None:
                self.task.wait(0.05)
            self.onPoll()
            slicer.app.processEvents()
        return True

    def onShowUncertainty(self, on):
        """Show (or hide) where the model is unsure about the preview or the selected segment."""
        if not on:
            if self.task is not None and self.taskKind == "uncertainty":
                self.task.cancel()
            if self.display is not None:
                self.display.hide_uncertainty()
            return
        if self.session is None or self.task is not None:
            self.uncertaintyCheckBox.setChecked(False)
            return
        from SAMLiverSegLogic import effect_logic, volume_nodes

        self.configureSession()
        segmentMask = None
        parameterSetNode = self.scriptedEffect.parameterSetNode()
        segmentationNode = parameterSetNode.GetSegmentationNode()
        segmentId = parameterSetNode.GetSelectedSegmentID()
        if self.session.preview is None and segmentationNode is not None and segmentId:
            try:
                segmentMask = volume_nodes.segment_mask(segmentationNode, segmentId, self.session.volume_node)
            except Exception as exc:  # noqa: BLE001 - shown, nothing changed
                self.showStatus(f"Cannot read the segment: {exc}", error=True)
                self.uncertaintyCheckBox.setChecked(False)
                return
        job = self.session.uncertainty_job(segmentMask)
        if isinstance(job, effect_logic.Outcome):
            self.showStatus(job.message, error=True)
            self.uncertaintyCheckBox.setChecked(False)
            return
        self.showStatus("Estimating the uncertainty...")
        self.startTask("uncertainty", effect_logic.BackgroundTask(job, "uncertainty"))

    # -- apply / clear ---------------------------------------------------------------------------
    def onApply(self):
        if self.session is None or self.task is not None:
            return
        if not self.scriptedEffect.confirmCurrentSegmentVisible():
            return  # a hidden segment: the user said no
        parameterSetNode = self.scriptedEffect.parameterSetNode()
        segmentationNode = parameterSetNode.GetSegmentationNode()
        segmentId = parameterSetNode.GetSelectedSegmentID()
        outcome = self.session.apply(EffectTarget(self.scriptedEffect), segmentationNode, segmentId)
        if not outcome.ok:
            self.showStatus(outcome.message, error=True)
            return
        self.display.clear()
        self.showStatus(f"Applied {outcome.voxels} voxels to the segment (Ctrl+Z to undo).")
        self.updateButtons()

    def onClear(self):
        if self.task is not None:
            self.task.cancel()
            self.discardedTask = self.task  # dropped when it ends (see finishTask)
        if self.prefetchTask is not None:
            self.prefetchTask.cancel()
        self.previewPending = False
        if self.session is not None:
            self.session.clear()
        if self.display is not None:
            self.display.clear()
        self.updateButtons()

    # -- rubber band while dragging --------------------------------------------------------------
    def updateRubberBand(self, viewWidget, start, end):
        if viewWidget not in self.rubberBands:
            points = vtk.vtkPoints()
            points.SetNumberOfPoints(4)
            lines = vtk.vtkCellArray()
            lines.InsertNextCell(5, [0, 1, 2, 3, 0])
            poly = vtk.vtkPolyData()
            poly.SetPoints(points)
            poly.SetLines(lines)
            mapper = vtk.vtkPolyDataMapper2D()
            mapper.SetInputData(poly)
            actor = vtk.vtkActor2D()
            actor.SetMapper(mapper)
            actor.GetProperty().SetColor(1.0, 0.85, 0.1)
            actor.GetProperty().SetLineWidth(2)
            self.scriptedEffect.addActor2D(viewWidget, actor)
            self.rubberBands[viewWidget] = (actor, points, poly)
        actor, points, poly = self.rubberBands[viewWidget]
        (x0, y0), (x1, y1) = start, end
        for n, (x, y) in enumerate(((x0, y0), (x1, y0), (x1, y1), (x0, y1))):
            points.SetPoint(n, x, y, 0)
        points.Modified()
        poly.Modified()
        self.scriptedEffect.forceRender(viewWidget)

    def removeRubberBand(self, viewWidget):
        entry = self.rubberBands.pop(viewWidget, None)
        if entry is not None:
            self.scriptedEffect.removeActor2D(viewWidget, entry[0])
            self.scriptedEffect.forceRender(viewWidget)
