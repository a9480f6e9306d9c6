"""The "Segment Anything" Segment Editor effect (Qt side only).

In a slice view: left-click adds a positive point, Ctrl+click a negative point, click-drag draws
a box. The 2D result shows as a preview (a separate segmentation node, like Grow from seeds);
"Propagate to 3D" extends it through the volume; then a click in any view or a box in the view of
the prompts corrects the 3D result (only the slices it changes are recomputed); "Apply" writes it into the selected segment
through the Segment Editor (editable area, overwrite mode, undo).

All decisions are in ``SAMLiverSegLogic.effect_logic`` (Qt-free, tested with pytest); the mouse
mapping is ``slice_clicks.ClickTracker``. No model code runs in Slicer's process and no Python
thread is started: the session sends requests to the inference worker process and Qt wakes this
effect when answers arrive (a ``QSocketNotifier`` on the worker's pipe, remade when the worker
restarts), plus a slow ``QTimer`` only as a safety net for request timeouts. The module panel
watches the same pipe: whichever notifier fires first reads it into per-owner inboxes, and the
session's ``notify`` (a zero-delay ``QTimer``) brings this effect its own answers.
"""

import logging
import os

import qt
import vtk

import slicer

from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

SAFETY_POLL_MS = 1000  # the notifier wakes us; this only catches timeouts of a silent worker


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
        self.tracker = None  # slice_clicks.ClickTracker, made in activate() (the library may not be installed yet)
        self.rubberBands = {}  # view widget -> (actor, points, poly)
        self.notifier = None
        self.watched = None  # the (starts, fileno) the notifier was made for
        self.cleanedUp = False
        self.safetyTimer = qt.QTimer()
        self.safetyTimer.setInterval(SAFETY_POLL_MS)
        self.safetyTimer.connect("timeout()", self.onWorkerReadable)
        # Slicer 5.8 never calls cleanup(): tie it to the scene's and the application's lifetime too
        self.sceneCloseObserver = slicer.mrmlScene.AddObserver(slicer.vtkMRMLScene.StartCloseEvent, self.onSceneClose)
        slicer.app.aboutToQuit.connect(self.cleanup)

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
<b>Left-click</b>: positive point. <b>Ctrl+click</b>: negative point. <b>Drag</b>: box (best for
LiteMedSAM/MedSAM). Shift+drag still pans the view. The result on that slice shows as soon as the
model answers; <b>Propagate to 3D</b> extends it through the volume. Then a click or Ctrl+click in
any view, or a box in the view of the first prompts, corrects the 3D result: a click adds the missed
part under it, a Ctrl+click removes the wrong region it lies in (in 3D), a box re-segments its slice
and the slices beyond it (a box in another view would start the prompts over: Apply or Clear the 3D result first);
<b>Undo correction</b> takes the last one back.
<b>Apply</b> writes it into the selected segment (Ctrl+Z undoes it). Works in axial, coronal and sagittal views. With a 3D
model (SAM-Med3D) every click, in any view, segments the whole object in 3D and refines it.
<b>Show uncertainty</b> marks where the model is unsure (the best places for the next click).
The model runs in a separate process, started at the first click.</html>"""

    def cleanup(self):
        """Stop the timer and the notifier, cancel the requests in flight, remove the preview nodes.

        Slicer >= 5.10 calls it when the effect is deleted; 5.8 never does, so the application's
        ``aboutToQuit`` calls it too (and a closing scene clears the session, onSceneClose). Safe to
        call more than once.
        """
        if self.cleanedUp:
            return
        self.cleanedUp = True
        self.safetyTimer.stop()
        self.dropNotifier()
        if self.sceneCloseObserver is not None:
            slicer.mrmlScene.RemoveObserver(self.sceneCloseObserver)
            self.sceneCloseObserver = None
        try:
            slicer.app.aboutToQuit.disconnect(self.cleanup)
        except (AttributeError, ValueError, RuntimeError):
            pass
        if self.session is not None:
            self.session.clear()
            if self.session.display is not None:
                self.session.display.clear(uncertainty=True)
            self.session.shutdown()
            self.session = None

    def onSceneClose(self, caller=None, event=None):
        """The scene is closing: drop prompts, preview and requests (the nodes go with the scene)."""
        if self.session is not None:
            self.session.clear()
            self.session.volume_node = None
        self.safetyTimer.stop()

    # -- options panel -------------------------------------------------------------------------
    def setupOptionsFrame(self):
        from SAMLiverSegLogic.constants import (DECODER_PRECISION_CHOICES, DEVICE_CHOICES, MODEL_3D_CHOICES,
                                                MODEL_CHOICES, WINDOW_CHOICES)

        self.modelComboBox = qt.QComboBox()
        self.modelComboBox.addItems(MODEL_CHOICES + MODEL_3D_CHOICES)
        self.modelComboBox.toolTip = "Model (weights of LiteMedSAM are installed; others need a checkpoint)"
        self.deviceComboBox = qt.QComboBox()
        self.deviceComboBox.addItems(DEVICE_CHOICES)
        self.decoderPrecisionComboBox = qt.QComboBox()
        self.decoderPrecisionComboBox.addItems(DECODER_PRECISION_CHOICES)
        self.decoderPrecisionComboBox.toolTip = (
            "Precision of the mask decoder. fp32: masks do not depend on the CPU. bf16: faster corrections (the "
            "decoder takes about 0.6 of its fp32 time, a correction about 0.75; masks differ slightly) where OpenVINO "
            "runs bf16 natively; elsewhere fp32. 2D models only")
        self.windowComboBox = qt.QComboBox()
        self.windowComboBox.addItems(WINDOW_CHOICES)
        self.customWindowLineEdit = qt.QLineEdit()
        self.customWindowLineEdit.placeholderText = "LOW,HIGH in HU"
        modelRow = qt.QHBoxLayout()
        modelRow.addWidget(self.modelComboBox)
        modelRow.addWidget(qt.QLabel("device:"))
        modelRow.addWidget(self.deviceComboBox)
        modelRow.addWidget(qt.QLabel("decoder:"))
        modelRow.addWidget(self.decoderPrecisionComboBox)
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
        self.undoButton = qt.QPushButton("Undo correction")
        self.undoButton.objectName = self.__class__.__name__ + "UndoCorrection"
        self.undoButton.toolTip = "Take back the last click or box that corrected the 3D result"
        self.clearButton = qt.QPushButton("Clear")
        self.clearButton.objectName = self.__class__.__name__ + "Clear"
        self.clearButton.toolTip = "Remove the prompts and the preview"
        self.applyButton = qt.QPushButton("Apply")
        self.applyButton.objectName = self.__class__.__name__ + "Apply"
        self.applyButton.toolTip = "Write the preview into the selected segment (undo with Ctrl+Z)"
        buttons = qt.QHBoxLayout()
        buttons.addWidget(self.propagateButton)
        buttons.addWidget(self.undoButton)
        buttons.addWidget(self.clearButton)
        buttons.addWidget(self.applyButton)
        self.scriptedEffect.addOptionsWidget(buttons)
        self.uncertaintyCheckBox = qt.QCheckBox("Show uncertainty")
        self.uncertaintyCheckBox.objectName = self.__class__.__name__ + "ShowUncertainty"
        self.uncertaintyCheckBox.toolTip = ("Ask the model several times with perturbed prompts and show where the "
                                            "answers disagree (the preview, else the selected segment): click there")
        self.scriptedEffect.addOptionsWidget(self.uncertaintyCheckBox)

        self.propagateButton.connect("clicked()", self.onPropagate)
        self.undoButton.connect("clicked()", self.onUndoCorrection)
        self.clearButton.connect("clicked()", self.onClear)
        self.applyButton.connect("clicked()", self.onApply)
        self.cancelTaskButton.connect("clicked()", self.onCancelTask)
        self.uncertaintyCheckBox.connect("toggled(bool)", self.onShowUncertainty)
        for combo in (self.modelComboBox, self.deviceComboBox, self.decoderPrecisionComboBox, self.windowComboBox):
            combo.connect("currentIndexChanged(int)", self.updateMRMLFromGUI)
        self.customWindowLineEdit.connect("editingFinished()", self.updateMRMLFromGUI)
        self.checkpointLineEdit.connect("editingFinished()", self.updateMRMLFromGUI)

    def createCursor(self, widget):
        return qt.QCursor(qt.Qt.CrossCursor)

    # -- parameters ------------------------------------------------------------------------------
    def setMRMLDefaults(self):
        from SAMLiverSegLogic import effect_logic

        # only non-empty defaults: Slicer stores nothing for "" (see effect_logic.PARAMETER_DEFAULTS)
        for name, value in effect_logic.PARAMETER_DEFAULTS.items():
            self.scriptedEffect.setParameterDefault(name, value)

    def parameterValue(self, name):
        """A parameter, its default when unset, without scriptedEffect.parameter()'s critical error."""
        from SAMLiverSegLogic import effect_logic

        return effect_logic.read_parameter(self.scriptedEffect.parameterSetNode(), name)

    def updateGUIFromMRML(self):
        for combo, name in ((self.modelComboBox, "Model"), (self.deviceComboBox, "Device"),
                            (self.decoderPrecisionComboBox, "DecoderPrecision"), (self.windowComboBox, "Window")):
            wasBlocked = combo.blockSignals(True)
            index = combo.findText(self.parameterValue(name))
            combo.currentIndex = max(index, 0)
            combo.blockSignals(wasBlocked)
        wasBlocked = self.customWindowLineEdit.blockSignals(True)
        self.customWindowLineEdit.text = self.parameterValue("CustomWindow")
        self.customWindowLineEdit.enabled = self.windowComboBox.currentText == "custom"
        self.customWindowLineEdit.blockSignals(wasBlocked)
        wasBlocked = self.checkpointLineEdit.blockSignals(True)
        self.checkpointLineEdit.text = self.parameterValue("Checkpoint")
        self.checkpointLineEdit.blockSignals(wasBlocked)
        self.updateButtons()

    def updateMRMLFromGUI(self):
        self.scriptedEffect.setParameter("Model", self.modelComboBox.currentText)
        self.scriptedEffect.setParameter("Device", self.deviceComboBox.currentText)
        self.scriptedEffect.setParameter("DecoderPrecision", self.decoderPrecisionComboBox.currentText)
        self.scriptedEffect.setParameter("Window", self.windowComboBox.currentText)
        self.scriptedEffect.setParameter("CustomWindow", self.customWindowLineEdit.text)
        self.scriptedEffect.setParameter("Checkpoint", self.checkpointLineEdit.text.strip())
        self.configureSession()

    def configureSession(self):
        """Hand the effect parameters to the session (a new worker only when they change)."""
        if self.session is not None:
            self.session.configure(self.engineSettings())

    def engineSettings(self):
        from samliverseg.core.errors import SAMLiverSegError
        from SAMLiverSegLogic import effect_logic, module_logic

        try:
            window = module_logic.window_spec(self.parameterValue("Window"), self.parameterValue("CustomWindow"))
        except SAMLiverSegError as exc:  # a malformed custom window: say so, use the model's window
            self.showStatus(str(exc), error=True)
            window = None
        return effect_logic.EngineSettings(
            model=self.parameterValue("Model"), checkpoint=self.parameterValue("Checkpoint") or None,
            device=self.parameterValue("Device"), backend=self.parameterValue("Backend"), window=window,
            decoder_precision=self.parameterValue("DecoderPrecision"),
            python=effect_logic.worker_python())

    def updateButtons(self):
        busy = self.session is not None and self.session.busy() is not None
        hasPreview = self.session is not None and self.session.preview is not None
        hasPrompts = self.session is not None and self.session.has_prompts()
        self.propagateButton.enabled = hasPrompts and not busy
        self.applyButton.enabled = hasPreview and not busy
        self.undoButton.enabled = self.session is not None and self.session.can_undo() and not busy
        self.clearButton.enabled = hasPrompts or hasPreview or busy
        kind = self.session.busy() if self.session is not None else None
        self.progressBar.visible = self.cancelTaskButton.visible = kind in ("propagate", "correct", "uncertainty")
        if kind in ("propagate", "correct", "uncertainty"):
            done, total = self.session.progress()
            self.progressBar.setMaximum(max(total, 1))
            self.progressBar.setValue(done)

    def showStatus(self, text, error=False):
        self.statusLabel.text = text
        self.statusLabel.setStyleSheet("color: #c00;" if error else "")

    # -- life cycle ----------------------------------------------------------------------------
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
        from SAMLiverSegLogic import effect_logic, slice_clicks

        self.cleanedUp = False
        if self.tracker is None:
            self.tracker = slice_clicks.ClickTracker()
        if self.sceneCloseObserver is None:
            self.sceneCloseObserver = slicer.mrmlScene.AddObserver(slicer.vtkMRMLScene.StartCloseEvent,
                                                                   self.onSceneClose)
        self.refreshModelChoices()
        if self.session is None:
            self.session = effect_logic.SegmentAnythingSession(self.engineSettings(), slicer.mrmlScene)
            # the module panel's poll may take this session's answers from the shared pipe: poll soon
            self.session.notify = lambda: qt.QTimer.singleShot(0, self.onWorkerReadable)
        self.useSourceVolume()
        self.safetyTimer.start()

    def refreshModelChoices(self):
        """The built-in models plus the user's trained ones (they appear after a training run)."""
        from SAMLiverSegLogic import module_logic
        from SAMLiverSegLogic.constants import MODEL_3D_CHOICES

        current = self.parameterValue("Model")
        wasBlocked = self.modelComboBox.blockSignals(True)
        self.modelComboBox.clear()
        self.modelComboBox.addItems(module_logic.model_choices() + MODEL_3D_CHOICES)
        self.modelComboBox.currentIndex = max(self.modelComboBox.findText(current), 0)
        self.modelComboBox.blockSignals(wasBlocked)

    def deactivate(self):
        self.safetyTimer.stop()
        if self.tracker is not None:
            self.tracker.reset()
        for viewWidget in list(self.rubberBands):
            self.removeRubberBand(viewWidget)
        self.onClear()  # cancels what is in flight; late answers are dropped
        self.uncertaintyCheckBox.setChecked(False)  # removes the overlay

    # The Segment Editor notifies every registered effect, active or not (and, in Slicer >= 5.2,
    # calls both methods). Choosing the volume is cheap: nothing is copied or sent until a click.
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
        outcome = self.session.set_volume_node(volumeNode)
        if not outcome.ok:
            self.showStatus(outcome.message, error=True)
        else:
            self.showStatus("Drag a box around the object, or click on it.")
        self.updateButtons()

    # -- mouse ---------------------------------------------------------------------------------
    def processInteractionEvents(self, callerInteractor, eventId, viewWidget):
        if viewWidget.className() != "qMRMLSliceWidget" or self.session is None or self.tracker is None:
            return False
        name = vtk.vtkCommand.GetStringFromEventId(eventId)
        action = self.tracker.event(name, callerInteractor.GetEventPosition(), viewWidget,
                                    shift=bool(callerInteractor.GetShiftKey()),
                                    ctrl=bool(callerInteractor.GetControlKey()),
                                    alt=bool(callerInteractor.GetAltKey()))
        if action.kind == "rubber_band":
            self.updateRubberBand(viewWidget, action.start, action.end)
        elif name == "LeftButtonReleaseEvent" or action.kind:
            self.removeRubberBand(viewWidget)
        if action.kind == "click":
            self.onClick(viewWidget, action.start, positive=action.positive)
        elif action.kind == "box":
            self.onDrag(viewWidget, action.start, action.end)
        return action.consume

    def onClick(self, viewWidget, xy, positive=True):
        """A point at XY in a slice view (also for scripts and the self-test); never waits."""
        self.configureSession()  # the request goes to a worker with the current parameters
        self.afterPromptChange(self.session.click(viewWidget.mrmlSliceNode(), xy, positive=positive))

    def onDrag(self, viewWidget, xy0, xy1):
        """A box dragged from XY0 to XY1 in a slice view (also for scripts and the self-test); never waits."""
        self.configureSession()
        self.afterPromptChange(self.session.drag_box(viewWidget.mrmlSliceNode(), xy0, xy1))

    def afterPromptChange(self, outcome):
        """A prompt was added (the session sent the preview request, or queued it behind the running one)."""
        if not outcome.ok:
            self.showStatus(outcome.message, error=True)
        elif outcome.message:  # a note: oblique view, prompts started over, not CT intensities
            self.showStatus(outcome.message)
        elif self.session.busy() == "correct":
            self.showStatus("Correcting the 3D result...")
        else:
            self.showStatus("Computing the preview... (the first one also starts the model)"
                            if self.session.busy() else "")
        self.watchWorker()
        self.updateButtons()

    # -- the worker: woken by Qt ---------------------------------------------------------------
    def dropNotifier(self):
        if self.notifier is not None:
            self.notifier.setEnabled(False)  # a notifier on a closed pipe must not fire
            self.notifier.deleteLater()
            self.notifier = None
        self.watched = None

    def watchWorker(self):
        """After every send and poll: a notifier on the worker's current pipe (a new one after a restart)."""
        if self.session is None:
            return
        w = self.session.watch()
        if w != self.watched:
            self.dropNotifier()
            if w is not None:
                self.notifier = qt.QSocketNotifier(w[1], qt.QSocketNotifier.Read)
                self.notifier.activated.connect(self.onWorkerReadable)  # Qt 5 and 6: no signature named
            self.watched = w
        t = self.session.next_timeout()
        if t is not None and t * 1000 < SAFETY_POLL_MS:
            qt.QTimer.singleShot(int(1000 * t) + 1, self.onWorkerReadable)

    def onWorkerReadable(self, *args):
        if self.session is None:
            return
        for outcome in self.session.poll():
            self.showOutcome(outcome)
        self.watchWorker()
        self.updateButtons()

    def showOutcome(self, outcome):
        if not outcome.ok:
            if outcome.kind == "uncertainty":
                self.uncertaintyCheckBox.setChecked(False)
            self.showStatus(outcome.message, error=True)
            return
        if outcome.kind == "uncertainty":
            slicer.util.setSliceViewerLayers(foreground=outcome.data["node"], foregroundOpacity=0.6)
            self.showStatus(f"Uncertainty ({outcome.seconds:.1f} s): {outcome.message}")
            return
        what = "3D result" if self.session.preview_is_3d else "result on this slice"
        self.showStatus(f"Preview: {what}, {outcome.voxels} voxels ({outcome.seconds:.1f} s). {outcome.message}".strip())

    def onPropagate(self):
        if self.session is None:
            return
        self.configureSession()
        outcome = self.session.start_propagate()
        self.showStatus(outcome.message or "Propagating through the volume...", error=not outcome.ok)
        self.watchWorker()
        self.updateButtons()

    def onCancelTask(self):
        if self.session is not None:
            self.session.cancel()

    def onShowUncertainty(self, on):
        """Show (or hide) where the model is unsure about the preview or the selected segment."""
        if not on:
            if self.session is not None:
                if self.session.busy() == "uncertainty":
                    self.session.cancel()
                if self.session.display is not None:
                    self.session.display.hide_uncertainty()
            return
        if self.session is None:
            self.uncertaintyCheckBox.setChecked(False)
            return
        from SAMLiverSegLogic import volume_nodes

        self.configureSession()
        segmentMask = None
        parameterSetNode = self.scriptedEffect.parameterSetNode()
        segmentationNode = parameterSetNode.GetSegmentationNode()
        segmentId = parameterSetNode.GetSelectedSegmentID()
        if self.session.preview is None and segmentationNode is not None and segmentId \
                and self.session.volume_node is not None:
            try:
                segmentMask = volume_nodes.segment_mask(segmentationNode, segmentId, self.session.volume_node)
            except Exception as exc:  # noqa: BLE001 - shown, nothing changed
                self.showStatus(f"Cannot read the segment: {exc}", error=True)
                self.uncertaintyCheckBox.setChecked(False)
                return
        outcome = self.session.start_uncertainty(segmentMask)
        if not outcome.ok:
            self.showStatus(outcome.message, error=True)
            self.uncertaintyCheckBox.setChecked(False)
            return
        self.showStatus(outcome.message or "Estimating the uncertainty...")
        self.watchWorker()
        self.updateButtons()

    # -- apply / clear ---------------------------------------------------------------------------
    def onApply(self):
        if self.session is None:
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
        self.showStatus(f"Applied {outcome.voxels} voxels to the segment (Ctrl+Z to undo).")
        self.updateButtons()

    def onUndoCorrection(self):
        if self.session is None:
            return
        outcome = self.session.undo_correction()
        self.showStatus(outcome.message or "Taking the last correction back...", error=not outcome.ok)
        self.watchWorker()
        self.updateButtons()

    def onClear(self):
        if self.session is not None:
            self.session.clear()  # requests in flight are cancelled, their answers dropped
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
        self.scriptedEffect.scheduleRender(viewWidget)  # at idle time, not on every move

    def removeRubberBand(self, viewWidget):
        entry = self.rubberBands.pop(viewWidget, None)
        if entry is not None:
            self.scriptedEffect.removeActor2D(viewWidget, entry[0])
            self.scriptedEffect.scheduleRender(viewWidget)  # at idle time, not on every move
