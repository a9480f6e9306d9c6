"""SAMLiverSeg: liver and liver-tumour segmentation on CT with Segment-Anything-style models.

This file holds the Qt side only (module, widget, thin logic, test). Every decision lives in the
Qt-free package ``SAMLiverSegLogic`` (tested with pytest against a real MRML scene); the models
live in the ``samliverseg`` library, installed into Slicer's Python on first use.

Slicer's process runs no model code and no Python thread: "Segment liver/tumor" goes to the
persistent inference worker (``SAMLiverSegLogic.worker_client``, the same worker as the Segment
Anything effect), and Qt wakes the panel when the worker's pipe has something (a
``QSocketNotifier``); the model list comes from ``samliverseg models --json`` run by a QProcess.
Opening the panel imports nothing heavy (no torch, no model module of the library).
"""

import logging
import os
import shutil
import sys
import unittest
from typing import Annotated, Optional

import ctk
import qt
import vtk

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin
from slicer import (
    vtkMRMLMarkupsFiducialNode,
    vtkMRMLMarkupsROINode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
)

# Light imports only (no torch, no samliverseg): this file is imported at Slicer startup.
from SAMLiverSegLogic import MODULE_VERSION
from SAMLiverSegLogic.constants import (
    BACKEND_CHOICES,
    DECODER_PRECISION_CHOICES,
    DEVICE_CHOICES,
    EFFECT_NAME,
    MODEL_CHOICES,
    OUTPUT_FORMAT_CHOICES,
    TARGET_CHOICES,
    WINDOW_CHOICES,
)

#: Training panel choices (kept equal to SAMLiverSegLogic.training_process's by a test; that module
#: imports the library, so it is not imported at startup).
TRAINER_KIND_CHOICES = ["decoder", "adapter", "unet", "student", "semi"]  # = samliverseg.models.kinds.KIND_NAMES (tested)
TRAIN_DEVICE_CHOICES = ["auto", "cpu", "cuda"]

#: Widgets bound to the parameter node by this module instead of parameterNodeWrapper (the .ui
#: names the parameter in this dynamic property): on Slicer 5.8 the wrapper's QLineEdit connector
#: moves the cursor to the end on every keystroke, and its QSpinBox connector replaces the .ui
#: range with +-2^31 (epochs 0 and below accepted). Line edits are written to the parameter node
#: on editingFinished; spin boxes keep their .ui range.
MANUAL_PARAMETER_PROPERTY = "SAMLiverSegParameterName"

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
EFFECT_FILE = os.path.join(MODULE_DIR, "SegmentEditorSegmentAnything", "SegmentEditorEffect.py")


#
# SAMLiverSeg
#


class SAMLiverSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SAM Liver Segmentation")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["Segmentations", "SegmentEditor", "Markups"]
        self.parent.contributors = ["SAMLiverSeg developers"]
        self.parent.helpText = _(
            "Segment the liver and liver tumours on CT with Segment-Anything-style models "
            "(LiteMedSAM by default; SAM and MedSAM with your checkpoints). Place an ROI or points "
            "and press <b>Segment liver</b> / <b>Segment tumor</b>, or use the <b>Segment Anything</b> "
            "effect in the Segment Editor (click: positive point, Ctrl+click: negative point, "
            "drag: box). A batch section segments a folder of CT files in the background."
        )
        self.parent.acknowledgementText = _(
            "Built on Segment Anything (Meta AI), MedSAM and LiteMedSAM (Bo Wang lab), 3D Slicer and "
            "its Segment Editor, and the PyTorch extension."
        )
        # Register the Segment Editor effect once the application is up (like the effect template).
        slicer.app.connect("startupCompleted()", registerSegmentEditorEffect)


def qbytesText(value) -> str:
    """A QByteArray (as PythonQt returns it: a QByteArray, bytes or str) as text."""
    data = value.data() if hasattr(value, "data") else value
    if isinstance(data, str):
        return data
    return bytes(data).decode("utf-8", "replace")


def registerSegmentEditorEffect():
    """Register the "Segment Anything" effect (imports nothing heavy; registering twice is a no-op:
    the effect factory ignores a second effect of the same name)."""
    try:
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        instance = effects.qSlicerSegmentEditorScriptedEffect(None)
        instance.setPythonSource(EFFECT_FILE.replace("\\", "/"))
        instance.self().register()
    except Exception as exc:  # never break Slicer startup
        logging.error(f"SAMLiverSeg: could not register the '{EFFECT_NAME}' effect: {exc}")


#
# SAMLiverSegParameterNode
#


@parameterNodeWrapper
class SAMLiverSegParameterNode:
    """All GUI state of the module (saved with the scene)."""

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    roi: vtkMRMLMarkupsROINode
    points: vtkMRMLMarkupsFiducialNode
    model: Annotated[str, Choice(MODEL_CHOICES)] = "lite_medsam"
    checkpoint: str = ""
    device: Annotated[str, Choice(DEVICE_CHOICES)] = "auto"
    backend: Annotated[str, Choice(BACKEND_CHOICES)] = "auto"
    decoderPrecision: Annotated[str, Choice(DECODER_PRECISION_CHOICES)] = "fp32"
    window: Annotated[str, Choice(WINDOW_CHOICES)] = "model"
    customWindow: str = "-200,300"
    propagate: bool = True
    batchInputFolder: str = ""
    batchOutputFolder: str = ""
    batchPromptsFile: str = ""
    batchTarget: Annotated[str, Choice(TARGET_CHOICES)] = "liver"
    batchFormat: Annotated[str, Choice(OUTPUT_FORMAT_CHOICES)] = "seg.nrrd"
    trainLabelledFolder: str = ""
    trainUnlabelledFolder: str = ""
    trainKind: Annotated[str, Choice(TRAINER_KIND_CHOICES)] = "decoder"
    trainTarget: Annotated[str, Choice(TARGET_CHOICES)] = "liver"
    trainBaseModel: Annotated[str, Choice(MODEL_CHOICES)] = "lite_medsam"
    trainDevice: Annotated[str, Choice(TRAIN_DEVICE_CHOICES)] = "auto"
    trainEpochs: int = 10
    trainRunFolder: str = ""


#
# SAMLiverSegWidget
#


class SAMLiverSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    BATCH_POLL_MS = 200
    TRAIN_POLL_MS = 500
    #: Stop: the trainer finishes its step and saves last.pt; its processes are killed after this.
    TRAIN_STOP_GRACE_S = 120.0

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.batchRunner = None
        self.batchTimer = None
        self.trainingJob = None
        self.trainTimer = None
        self.trainPlotNodes = None
        self.trainPlotWidget = None
        self.trainLogShown = 0
        self.trainPlotSize = None
        self.manualBindings = []  # [(widget, parameter name)] (see MANUAL_PARAMETER_PROPERTY)
        self.panelRun = None  # module_logic.PanelRun in flight or last finished
        self.panelEditor = None  # segment_writer.Editor of the panel's writes (its undo history)
        self.workerClient = None
        self.workerNotifier = None
        self.workerWatched = None
        self.segmentProgress = None
        self.modelsProcess = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SAMLiverSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SAMLiverSegLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.segmentLiverButton.connect("clicked(bool)", lambda: self.onSegment("liver"))
        self.ui.segmentTumorButton.connect("clicked(bool)", lambda: self.onSegment("tumor"))
        self.ui.openSegmentEditorButton.connect("clicked(bool)", self.onOpenSegmentEditor)
        self.ui.checkpointBrowseButton.connect("clicked(bool)", self.onBrowseCheckpoint)
        self.ui.refreshModelsButton.connect("clicked(bool)", self.updateModelStatus)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        self.ui.batchInputBrowseButton.connect("clicked(bool)", lambda: self.onBrowseFolder("batchInputFolder"))
        self.ui.batchOutputBrowseButton.connect("clicked(bool)", lambda: self.onBrowseFolder("batchOutputFolder"))
        self.ui.batchPromptsBrowseButton.connect("clicked(bool)", self.onBrowseBatchPrompts)
        self.ui.batchStartButton.connect("clicked(bool)", self.onBatchStart)
        self.ui.batchCancelButton.connect("clicked(bool)", self.onBatchCancel)
        self.ui.batchCancelButton.enabled = False
        self.ui.batchProgressBar.setValue(0)

        self.batchTimer = qt.QTimer()
        self.batchTimer.setInterval(self.BATCH_POLL_MS)
        self.batchTimer.connect("timeout()", self.onBatchPoll)

        self.ui.trainLabelledBrowseButton.connect("clicked(bool)", lambda: self.onBrowseFolder("trainLabelledFolder"))
        self.ui.trainUnlabelledBrowseButton.connect("clicked(bool)", lambda: self.onBrowseFolder("trainUnlabelledFolder"))
        self.ui.trainRunFolderBrowseButton.connect("clicked(bool)", lambda: self.onBrowseFolder("trainRunFolder"))
        self.ui.trainStartButton.connect("clicked(bool)", self.onTrainStart)
        self.ui.trainStopButton.connect("clicked(bool)", self.onTrainStop)
        self.ui.trainResumeButton.connect("clicked(bool)", self.onTrainResume)
        self.ui.trainProgressBar.setValue(0)
        self.trainTimer = qt.QTimer()
        self.trainTimer.setInterval(self.TRAIN_POLL_MS)
        self.trainTimer.connect("timeout()", self.onTrainPoll)

        self.setupManualBindings(uiWidget)
        self.initializeParameterNode()
        self.updateDependencyStatus()

    def setupManualBindings(self, uiWidget) -> None:
        """Bind the widgets whose .ui names a parameter in MANUAL_PARAMETER_PROPERTY (not through
        parameterNodeWrapper): line edits on editingFinished, spin boxes on valueChanged."""
        self.manualBindings = []
        for widget in uiWidget.findChildren(qt.QWidget):
            name = widget.property(MANUAL_PARAMETER_PROPERTY)
            if not name:
                continue
            name = str(name)
            self.manualBindings.append((widget, name))
            if isinstance(widget, qt.QLineEdit):
                widget.connect("editingFinished()", lambda w=widget, n=name: self.onManualWidgetEdited(w, n))
            elif isinstance(widget, qt.QSpinBox):
                widget.connect("valueChanged(int)", lambda _v, w=widget, n=name: self.onManualWidgetEdited(w, n))
            else:
                logging.error(f"SAMLiverSeg: {widget.objectName}: no manual binding for {type(widget).__name__}")

    def onManualWidgetEdited(self, widget, name: str) -> None:
        if self._parameterNode is None:
            return
        value = int(widget.value) if isinstance(widget, qt.QSpinBox) else str(widget.text)
        if getattr(self._parameterNode, name) != value:
            setattr(self._parameterNode, name, value)

    def updateManualWidgets(self) -> None:
        """Parameter node -> the manually bound widgets (a line edit is written only when its text
        differs, so the cursor stays where the user types)."""
        p = self._parameterNode
        if p is None:
            return
        for widget, name in self.manualBindings:
            value = getattr(p, name)
            if isinstance(widget, qt.QSpinBox):
                if int(widget.value) != int(value):
                    wasBlocked = widget.blockSignals(True)
                    widget.value = int(value)  # clamped to the .ui range
                    widget.blockSignals(wasBlocked)
                    if int(widget.value) != int(value):  # out of range in the node: the widget's value wins
                        setattr(p, name, int(widget.value))
            elif str(widget.text) != str(value):
                widget.text = str(value)

    def cleanup(self) -> None:
        self.removeObservers()
        if self.panelRun is not None and not self.panelRun.finished:
            self.panelRun.cancel()
        self._dropWorkerNotifier()
        if self.modelsProcess is not None:
            self.modelsProcess.kill()
            self.modelsProcess = None
        try:  # the effect's worker is the same one; Slicer is closing or the module is reloaded
            from SAMLiverSegLogic import worker_client

            worker_client.shutdown_shared_client()
        except Exception as exc:  # the library may be missing; never fail a cleanup
            logging.info(f"SAMLiverSeg: worker shutdown: {exc}")
        if self.batchRunner is not None and not self.batchRunner.done():
            self.batchRunner.cancel()
        if self.batchTimer is not None:
            self.batchTimer.stop()
        if self.trainingJob is not None and self.trainingJob.running():
            # the trainer saves last.pt and exits on its own (Resume continues the run)
            self.trainingJob.stop(grace_s=self.TRAIN_STOP_GRACE_S)
        if self.trainTimer is not None:
            self.trainTimer.stop()

    def enter(self) -> None:
        self.initializeParameterNode()
        self.updateDependencyStatus()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode: Optional[SAMLiverSegParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
            self._updateButtons()

    def _updateButtons(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None:
            return
        self.updateManualWidgets()
        hasPrompt = bool(p.roi or p.points)
        segmenting = self.panelRun is not None and not self.panelRun.finished
        canSegment = bool(p.inputVolume) and hasPrompt and not segmenting
        tip = _("Segment from the ROI and/or points") if canSegment else _("Select a CT volume and an ROI or points")
        for button in (self.ui.segmentLiverButton, self.ui.segmentTumorButton):
            button.enabled = canSegment
            button.toolTip = tip
        self.ui.customWindowLineEdit.enabled = p.window == "custom"
        running = self.batchRunner is not None and not self.batchRunner.done()
        self.ui.batchStartButton.enabled = bool(p.batchInputFolder and p.batchOutputFolder) and not running
        self.ui.batchCancelButton.enabled = running
        training = self.trainingJob is not None and self.trainingJob.running()
        self.ui.trainStartButton.enabled = bool(p.trainLabelledFolder and p.trainRunFolder) and not training
        self.ui.trainStopButton.enabled = training and not self.trainingJob.stop_requested
        canResume = bool(p.trainRunFolder) and os.path.isfile(os.path.join(p.trainRunFolder, "last.pt"))
        self.ui.trainResumeButton.enabled = canResume and not training

    # -- dependencies and model status -------------------------------------------------------
    def updateDependencyStatus(self) -> None:
        """Imports nothing heavy (no torch): runs when the panel opens. Any failure is a message."""
        try:
            from SAMLiverSegLogic import dependencies

            ready, message = dependencies.dependencies_ready()
        except Exception as exc:
            logging.exception("SAMLiverSeg: dependency check failed")
            ready, message = False, _("Could not check the dependencies: {error}").format(error=exc)
        self.ui.dependenciesStatusLabel.text = _("Ready") if ready else message
        self.ui.installDependenciesButton.visible = not ready
        if ready:
            self.updateModelStatus()
        else:
            self.ui.weightsStatusLabel.text = _("(install the dependencies first)")
            self.ui.cacheFolderLabel.text = ""

    def updateModelStatus(self) -> None:
        """List the models with ``samliverseg models --json`` in a QProcess (torch loads there, not
        here); the labels are filled in when it finishes."""
        if self.modelsProcess is not None:
            return  # one listing at a time
        try:
            from SAMLiverSegLogic import module_logic

            command = module_logic.models_command(python=self.logic.pythonSlicerExecutable())
        except Exception as exc:
            self.ui.weightsStatusLabel.text = _("Could not list the models: {error}").format(error=exc)
            return
        self.ui.weightsStatusLabel.text = _("(listing the models...)")
        proc = qt.QProcess()
        proc.setProgram(command[0])
        proc.setArguments(command[1:])
        proc.connect("finished(int,QProcess::ExitStatus)", lambda *args: self.onModelsListed(proc))
        proc.connect("errorOccurred(QProcess::ProcessError)", lambda *args: self.onModelsListed(proc, failed=True))
        self.modelsProcess = proc
        proc.start()

    def onModelsListed(self, proc, failed: bool = False) -> None:
        if proc is not self.modelsProcess:
            return
        self.modelsProcess = None
        try:
            from SAMLiverSegLogic import module_logic

            out = qbytesText(proc.readAllStandardOutput())
            err = qbytesText(proc.readAllStandardError())
            if failed or proc.exitCode() != 0:
                tail = (err or out).strip().splitlines()[-1:] or [proc.errorString()]
                raise RuntimeError(tail[0][:300])
            rows, cache = module_logic.parse_models_json(out)
        except Exception as exc:
            self.ui.weightsStatusLabel.text = _("Could not list the models: {error}").format(error=exc)
            self.ui.cacheFolderLabel.text = ""
            return
        lines = [f"{'✔' if r.present else '✘'} {r.name}: {r.where}" for r in rows]
        self.ui.weightsStatusLabel.text = "\n".join(lines) if lines else cache
        self.ui.cacheFolderLabel.text = cache if rows else ""

    def ensureDependencies(self) -> bool:
        """First use: check and (after asking) install torch, the library and the weights."""
        from SAMLiverSegLogic import dependencies

        ready, _msg = dependencies.dependencies_ready()
        if ready:
            return True
        try:
            with slicer.util.WaitCursor():
                notes = dependencies.ensure_dependencies(MODULE_DIR, confirm=slicer.util.confirmOkCancelDisplay)
        except dependencies.DependencyError as exc:
            slicer.util.errorDisplay(str(exc), windowTitle=_("SAMLiverSeg setup"))
            self.updateDependencyStatus()
            return False
        self.updateDependencyStatus()
        if notes:
            slicer.util.infoDisplay("\n".join(notes), windowTitle=_("SAMLiverSeg setup"))
            return not any("restart" in n for n in notes)
        return dependencies.dependencies_ready()[0]

    def onInstallDependencies(self) -> None:
        self.ensureDependencies()

    # -- segment from markups (through the inference worker) ---------------------------------
    def workerSettings(self) -> dict:
        """The shared worker's settings for the panel's choices (InputError for a bad custom window)."""
        from SAMLiverSegLogic import module_logic

        p = self._parameterNode
        self.ensureBackend(p.backend, p.device)
        return module_logic.worker_settings(p.model, p.checkpoint, p.device, p.backend,
                                            module_logic.window_spec(p.window, p.customWindow),
                                            python=self.logic.pythonSlicerExecutable(),
                                            decoder_precision=p.decoderPrecision)

    def ensureBackend(self, backend: str, device: str) -> None:
        """First use of a fast CPU backend: offer to install its package (saying its download size).
        Declined or failed, the engine uses torch; asked once per session and backend."""
        from SAMLiverSegLogic import dependencies

        asked = getattr(self, "_backendsAsked", set())
        if backend in asked:
            return
        asked.add(backend)
        self._backendsAsked = asked
        notes = dependencies.ensure_backend(backend, device, confirm=slicer.util.confirmOkCancelDisplay)
        for note in notes:
            logging.info(note)

    def confirmIntensityRange(self, volumeNode) -> bool:
        """Non-CT intensities: offer the custom window (the scene is left alone if refused)."""
        from SAMLiverSegLogic import volume_nodes

        check = volume_nodes.check_ct_intensities(volume_nodes.array_from_volume_node(volumeNode))
        if check.looks_like_ct or self._parameterNode.window == "custom":
            return True
        if slicer.util.confirmYesNoDisplay(
            check.message + "\n\n" + _("Use the custom window {window}?").format(window=check.suggested_window),
            windowTitle=_("Not a CT range"),
        ):
            self._parameterNode.window = "custom"
            self._parameterNode.customWindow = check.suggested_window
            return True
        return False

    def onSegment(self, target: str) -> None:
        """Send the markups to the worker and return: Qt calls onWorkerReadable when it answers."""
        p = self._parameterNode
        if self.panelRun is not None and not self.panelRun.finished:
            return  # one at a time (the buttons are disabled meanwhile)
        if not self.ensureDependencies():
            return
        from samliverseg.core.errors import SAMLiverSegError
        from SAMLiverSegLogic import markups_prompts, module_logic, volume_nodes, worker_client

        try:
            volume_nodes.check_source_volume(p.inputVolume)
            markups_prompts.prompts_from_markups(p.inputVolume, p.roi, p.points)  # bad prompts: a message now
            if not self.confirmIntensityRange(p.inputVolume):
                return
            settings = self.workerSettings()  # after the range check: the window may now be the custom one
            client = worker_client.shared_client(**settings)
            run = module_logic.PanelRun(slicer.mrmlScene, client, p.inputVolume, p.outputSegmentation, target,
                                        roi_node=p.roi, positive_node=p.points, propagate=p.propagate,
                                        editor=self.panelEditor,  # one undo history for the panel
                                        # the effect's poll may take this run's answers from the shared pipe
                                        notify=lambda: qt.QTimer.singleShot(0, self.onWorkerReadable))
        except SAMLiverSegError as exc:
            slicer.util.errorDisplay(str(exc))
            return
        except Exception as exc:  # e.g. a worker of another protocol version
            logging.exception("SAMLiverSeg: could not start the segmentation")
            slicer.util.errorDisplay(_("Segmentation failed: {error}").format(error=exc))
            return
        self.workerClient = client
        self.panelRun = run
        self.showSegmentProgress(run)
        run.start()
        self.watchWorker()
        self.onWorkerReadable()  # a run that failed at once (the worker cannot start) ends here
        self._updateButtons()

    def showSegmentProgress(self, run) -> None:
        dialog = slicer.util.createProgressDialog(labelText=_("Segmenting..."), maximum=0)
        dialog.autoReset = False  # stays up at done == total until the answer has been written
        dialog.autoClose = False
        dialog.setCancelButtonText(_("Cancel"))
        dialog.connect("canceled()", self.onSegmentCancel)
        self.segmentProgress = dialog

    def onSegmentCancel(self) -> None:
        run = self.panelRun
        if run is None or run.finished or self.segmentProgress is None:
            return  # QProgressDialog emits canceled() when it is closed too
        run.cancel()  # returns at once; the worker answers "cancelled"
        self.segmentProgress.labelText = _("Cancelling...")
        self.segmentProgress.show()

    def watchWorker(self) -> None:
        """A notifier on the worker's stdout pipe, remade when the worker was (re)started."""
        client = self.workerClient
        watched = client.watch() if client is not None else None
        if watched != self.workerWatched:
            self._dropWorkerNotifier()
            if watched is not None:
                self.workerNotifier = qt.QSocketNotifier(watched[1], qt.QSocketNotifier.Read)
                self.workerNotifier.activated.connect(self.onWorkerReadable)  # Qt 5 and 6: no signature named
            self.workerWatched = watched
        due = client.next_timeout() if client is not None else None
        if due is not None:
            qt.QTimer.singleShot(int(1000 * due) + 1, self.onWorkerReadable)

    def _dropWorkerNotifier(self) -> None:
        if self.workerNotifier is not None:
            self.workerNotifier.setEnabled(False)
            self.workerNotifier.deleteLater()  # a notifier on a closed pipe must not fire
            self.workerNotifier = None
        self.workerWatched = None

    def onWorkerReadable(self, *args) -> None:
        """The worker wrote something: take it (never blocks), show progress, finish the run."""
        client, run = self.workerClient, self.panelRun
        if client is None:
            return
        try:
            if run is not None and not run.finished:
                run.poll()  # the run's own messages only (the effect's stay in the effect's inbox)
            else:
                client.poll()  # no run of ours: still drain the pipe (a notifier that reads nothing refires)
        except Exception as exc:  # never let an unexpected error leave the dialog up
            logging.exception("SAMLiverSeg: worker message handling failed")
            if run is not None and not run.finished:
                run.status, run.message = "failed", str(exc)
        if run is not None and self.segmentProgress is not None and not run.finished:
            done, total = run.progress
            if total:
                self.segmentProgress.maximum = total
                self.segmentProgress.value = done
        self.watchWorker()
        if run is not None and run.finished and self.segmentProgress is not None:
            self.onSegmentFinished(run)

    def onSegmentFinished(self, run) -> None:
        dialog, self.segmentProgress = self.segmentProgress, None
        dialog.close()
        p = self._parameterNode
        if run.status == "done":
            self.panelEditor = run.editor
            if p is not None and not p.outputSegmentation and run.segmentation_node is not None:
                run.segmentation_node.CreateDefaultDisplayNodes()
                p.outputSegmentation = run.segmentation_node
            notes = run.report.get("notes", [])
            self.ui.statusLabel.text = run.message + "".join(f"\n{n}" for n in notes)
        elif run.status == "cancelled":
            self.ui.statusLabel.text = _("Cancelled: nothing was changed")
        else:
            self.ui.statusLabel.text = ""
            slicer.util.errorDisplay(_("Segmentation failed: {error}").format(error=run.message))
        self._updateButtons()

    def onOpenSegmentEditor(self) -> None:
        """Open the Segment Editor on the same volume/segmentation with the effect selected."""
        p = self._parameterNode
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        if p.outputSegmentation:
            editor.setSegmentationNode(p.outputSegmentation)
        if p.inputVolume:
            setSource = getattr(editor, "setSourceVolumeNode", None) or editor.setMasterVolumeNode
            setSource(p.inputVolume)
        editor.setActiveEffectByName(EFFECT_NAME)

    def onBrowseCheckpoint(self) -> None:
        path = qt.QFileDialog.getOpenFileName(self.parent, _("Checkpoint"), "", "PyTorch checkpoints (*.pth *.pt *.ckpt)")
        if path:
            self._parameterNode.checkpoint = path

    def onBrowseFolder(self, attribute: str) -> None:
        path = qt.QFileDialog.getExistingDirectory(self.parent, _("Choose a folder"), getattr(self._parameterNode, attribute))
        if path:
            setattr(self._parameterNode, attribute, path)

    def onBrowseBatchPrompts(self) -> None:
        path = qt.QFileDialog.getOpenFileName(self.parent, _("Prompts for every case"), "", "Markups (*.mrk.json)")
        if path:
            self._parameterNode.batchPromptsFile = path

    # -- batch -------------------------------------------------------------------------------
    def onBatchStart(self) -> None:
        if not self.ensureDependencies():
            return
        from samliverseg.core.errors import SAMLiverSegError
        from SAMLiverSegLogic import batch

        p = self._parameterNode
        try:
            jobs = batch.plan_batch(p.batchInputFolder, p.batchOutputFolder, default_prompts=p.batchPromptsFile or None,
                                    output_format=p.batchFormat)
            from SAMLiverSegLogic import module_logic

            window = module_logic.window_spec(p.window, p.customWindow)
        except (ValueError, SAMLiverSegError) as exc:
            slicer.util.errorDisplay(str(exc))
            return
        self.batchRunner = self.logic.createBatchRunner(jobs, p, window)
        skipped = [j for j in jobs if j.status == "skipped"]
        self.ui.batchLogTextEdit.clear()
        for j in skipped:
            self.ui.batchLogTextEdit.appendPlainText(f"[{j.case}] skipped: {j.message}")
        if not self.batchRunner.runnable():
            slicer.util.errorDisplay(_("No case has a prompt: put CASE.mrk.json beside each image or choose a "
                                       "prompts file for every case."))
            self.batchRunner = None
            return
        self.ui.batchProgressBar.setMaximum(len(self.batchRunner.runnable()))
        self.ui.batchProgressBar.setValue(0)
        self.batchTimer.start()
        self._updateButtons()

    def onBatchPoll(self) -> None:
        runner = self.batchRunner
        if runner is None:
            self.batchTimer.stop()
            return
        for line in runner.poll():
            self.ui.batchLogTextEdit.appendPlainText(line)
        done, total = runner.progress()
        self.ui.batchProgressBar.setValue(done)
        if runner.done():
            self.batchTimer.stop()
            self.ui.batchLogTextEdit.appendPlainText(_("Finished: {summary}").format(summary=runner.summary()))
            self._updateButtons()

    def onBatchCancel(self) -> None:
        if self.batchRunner is not None:
            self.batchRunner.cancel()
            self.ui.batchLogTextEdit.appendPlainText(_("Cancelled: {summary}").format(summary=self.batchRunner.summary()))
        self.batchTimer.stop()
        self._updateButtons()

    # -- training ----------------------------------------------------------------------------
    def onTrainStart(self) -> None:
        if not self.ensureDependencies():
            return
        from samliverseg.core.errors import SAMLiverSegError
        from SAMLiverSegLogic import training_process

        p = self._parameterNode
        request = self.logic.trainingRequest(p)
        try:
            request.validate()
        except SAMLiverSegError as exc:
            slicer.util.errorDisplay(str(exc))
            return
        found = training_process.previous_run(p.trainRunFolder)
        if (found["last"] or found["model"]) and not slicer.util.confirmOkCancelDisplay(
                _("The run folder {folder} holds an earlier training run. Start over? Its checkpoints and model "
                  "will be replaced (Resume continues it instead).").format(folder=p.trainRunFolder),
                windowTitle=_("Start training")):
            return
        job = self.logic.createTrainingJob(request)
        try:
            job.start()
        except SAMLiverSegError as exc:
            slicer.util.errorDisplay(str(exc))
            return
        self._startTrainingPolling(job, clearLog=True)

    def onTrainResume(self) -> None:
        if not self.ensureDependencies():
            return
        from samliverseg.core.errors import SAMLiverSegError

        request = self.logic.trainingRequest(self._parameterNode)
        job = self.trainingJob
        sameRun = job is not None and not job.running() and job.request.run == request.run
        if sameRun:
            job.request = request  # keeps the loss/Dice history of the stopped run on the plot
        else:
            job = self.logic.createTrainingJob(request)
        try:
            job.resume()
        except SAMLiverSegError as exc:
            slicer.util.errorDisplay(str(exc))
            return
        self._startTrainingPolling(job, clearLog=not sameRun)

    def onTrainStop(self) -> None:
        if self.trainingJob is not None:
            self.trainingJob.stop(grace_s=self.TRAIN_STOP_GRACE_S)
            self.onTrainPoll()
        self._updateButtons()

    def _startTrainingPolling(self, job, clearLog: bool) -> None:
        self.trainingJob = job
        if clearLog:
            self.ui.trainLogTextEdit.clear()
            self.trainLogShown = 0
        self.trainPlotSize = None
        self.trainTimer.start()
        self.onTrainPoll()
        self._updateButtons()

    def onTrainPoll(self) -> None:
        job = self.trainingJob
        if job is None:
            self.trainTimer.stop()
            return
        job.poll()
        lines, self.trainLogShown = job.new_log_lines(self.trainLogShown)
        for line in lines:
            self.ui.trainLogTextEdit.appendPlainText(line)
        st = job.state
        fraction = st.fraction()
        if fraction is None and job.running():
            self.ui.trainProgressBar.setRange(0, 0)  # busy: preparing, loading the model
        else:
            self.ui.trainProgressBar.setRange(0, 1000)
            self.ui.trainProgressBar.setValue(int(round(1000 * (fraction or 0.0))))
        self.ui.trainStatusLabel.text = st.progress_text()
        self.updateTrainingPlot()
        if not job.running():
            self.trainTimer.stop()
            self._updateButtons()
            if st.status == "done":
                self.onTrainingDone()

    def updateTrainingPlot(self) -> None:
        from SAMLiverSegLogic import module_logic

        st = self.trainingJob.state
        size = (len(st.losses), len(st.epoch_losses), len(st.val_dice))
        alive = self.trainPlotNodes is not None and self.trainPlotNodes.alive_in(slicer.mrmlScene)
        if size == self.trainPlotSize and alive:
            return
        self.trainPlotSize = size
        self.trainPlotNodes = module_logic.update_training_plot(slicer.mrmlScene, st, self.trainPlotNodes)
        if self.trainPlotWidget is None:
            self.trainPlotWidget = slicer.qMRMLPlotWidget()
            self.trainPlotWidget.setMRMLScene(slicer.mrmlScene)
            self.ui.trainPlotFrame.layout().addWidget(self.trainPlotWidget)
        shown = self.trainPlotWidget.mrmlPlotViewNode()
        if shown is None or shown.GetID() != self.trainPlotNodes.view.GetID():
            self.trainPlotWidget.setMRMLPlotViewNode(self.trainPlotNodes.view)

    def onTrainingDone(self) -> None:
        """The finished model is registered: show where it is and refresh the model lists."""
        st = self.trainingJob.state
        self.updateModelStatus()
        if st.registered_name:
            text = _("Training finished. The model '{name}' is selectable in the Segment Anything effect "
                     "(model list).").format(name=st.registered_name)
        else:
            text = _("Training finished: {message}").format(message=st.message)
        slicer.util.infoDisplay(text + "\n" + _("Model file: {path}").format(path=st.model_path),
                                windowTitle=_("Training"))


#
# SAMLiverSegLogic
#


class SAMLiverSegLogic(ScriptedLoadableModuleLogic):
    """Thin: forwards to the Qt-free SAMLiverSegLogic package (usable from the Python console)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return SAMLiverSegParameterNode(super().getParameterNode())

    def segmentFromMarkups(self, volumeNode, segmentationNode, target, roiNode=None, pointsNode=None,
                           propagate=True, settings=None, timeout=600.0):
        """For the Python console and scripts: the panel's "Segment liver/tumor" through the shared
        inference worker, waited for (``select`` on its pipe). ``settings``: see
        ``module_logic.worker_settings`` (default: LiteMedSAM, auto device). Returns the finished
        ``module_logic.PanelRun`` (``status``, ``message``, ``segmentation_node``, ``segment_id``)."""
        from SAMLiverSegLogic import module_logic, worker_client

        if settings is None:
            settings = module_logic.worker_settings("lite_medsam", None, "auto", "auto", None,
                                                    python=self.pythonSlicerExecutable())
        client = worker_client.shared_client(**settings)
        run = module_logic.PanelRun(slicer.mrmlScene, client, volumeNode, segmentationNode, target, roi_node=roiNode,
                                    positive_node=pointsNode, propagate=propagate)
        return module_logic.run_until_done(run, timeout=timeout)

    @staticmethod
    def pythonSlicerExecutable() -> str:
        return shutil.which("PythonSlicer") or sys.executable

    def trainingRequest(self, parameterNode):
        """The training run described by the panel (the Setup checkpoint is the base weights when
        the base model is the Setup model)."""
        from SAMLiverSegLogic import training_process

        p = parameterNode
        checkpoint = p.checkpoint if (p.checkpoint and p.trainBaseModel == p.model) else ""
        return training_process.TrainingRequest(
            labelled=p.trainLabelledFolder, unlabelled=p.trainUnlabelledFolder, kind=p.trainKind,
            epochs=int(p.trainEpochs), device=p.trainDevice, base_model=p.trainBaseModel, target=p.trainTarget,
            run_folder=p.trainRunFolder, checkpoint=checkpoint)

    def createTrainingJob(self, request):
        """A job running `samliverseg prepare/train` with PythonSlicer in Slicer's startup environment."""
        from SAMLiverSegLogic import training_process

        return training_process.TrainingJob(request, python=self.pythonSlicerExecutable(),
                                            env=slicer.util.startupEnvironment())

    def createBatchRunner(self, jobs, parameterNode, window):
        from SAMLiverSegLogic import batch

        def launcher(args, env=None, cwd=None):
            return slicer.util.launchConsoleProcess(args, useStartupEnvironment=True,
                                                    updateEnvironment={"PYTHONUNBUFFERED": "1"}, cwd=cwd)

        return batch.BatchRunner(jobs, model=parameterNode.model, device=parameterNode.device, window=window,
                                 checkpoint=parameterNode.checkpoint or None, target=parameterNode.batchTarget,
                                 python=self.pythonSlicerExecutable(), launcher=launcher)


#
# SAMLiverSegTest
#


class SAMLiverSegTest(ScriptedLoadableModuleTest):
    """Loads a CT (a synthetic phantom), places an ROI, presses "Segment liver" in the panel and
    checks the segment; drags a box with the Segment Anything effect; the training panel.

    Model work runs in the inference worker, as in normal use: the test waits the way the GUI
    does, processing Qt events until the notifier-driven callback says it is done (no ``join()``,
    no blocking wait), with a timeout. Run from "Reload and Test" or ctest
    (slicer_add_python_unittest). On first run it installs the dependencies (in testing mode
    without asking).
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SAMLiverSeg_dependencies()
        self.setUp()
        self.test_SAMLiverSeg_PanelSegmentLiver()
        self.setUp()
        self.test_SAMLiverSeg_SegmentEditorEffect()
        self.setUp()
        self.test_SAMLiverSeg_TrainingPanel()

    def processEventsUntil(self, condition, timeoutS: float, what: str) -> None:
        """Let Qt run (notifiers, timers, redraws) until ``condition()``; fail after ``timeoutS``."""
        import time

        deadline = time.monotonic() + timeoutS
        while not condition():
            if time.monotonic() > deadline:
                self.fail(f"{what}: not done within {timeoutS:g} s")
            slicer.app.processEvents(qt.QEventLoop.AllEvents, 50)
            time.sleep(0.005)  # the worker is another process: nothing here needs the CPU meanwhile

    def test_SAMLiverSeg_dependencies(self):
        from SAMLiverSegLogic import dependencies

        ready, message = dependencies.dependencies_ready()
        if not ready:
            self.delayDisplay(f"Installing dependencies ({message})")
            dependencies.ensure_dependencies(MODULE_DIR, confirm=lambda text: True, pip_progress=False)
        ready, message = dependencies.dependencies_ready()
        self.assertTrue(ready, message)

    def _phantomScene(self):
        import numpy as np
        from samliverseg.demo.phantom import make_phantom
        from SAMLiverSegLogic import volume_nodes

        spacing = (3.0, 3.0, 5.0)  # (k, j, i) order as make_phantom takes it: i and j 3 mm, k 5 mm
        ph = make_phantom((24, 96, 112), spacing, seed=3, n_tumors=1, scale=0.75)
        ijkToRas = np.diag([-spacing[2], -spacing[1], spacing[0], 1.0])  # i -> L, j -> P, k -> S (axial CT)
        volumeNode = volume_nodes.add_volume_node(slicer.mrmlScene, ph.hu.astype(np.int16), ijkToRas, "PhantomCT")
        volumeNode.CreateDefaultDisplayNodes()
        liver = ph.liver_mask
        ks = np.flatnonzero(liver.any(axis=(1, 2)))
        k = int(ks[len(ks) // 2])
        jj, ii = np.nonzero(liver[k])
        box = (int(ii.min()) - 2, int(jj.min()) - 2, int(ii.max()) + 2, int(jj.max()) + 2, k)
        slicer.util.setSliceViewerLayers(background=volumeNode, fit=True)
        return volumeNode, liver, box

    def _redSliceOn(self, volumeNode, ijk):
        from SAMLiverSegLogic import geometry

        sliceWidget = slicer.app.layoutManager().sliceWidget("Red")
        sliceNode = sliceWidget.mrmlSliceNode()
        sliceNode.SetOrientation("Axial")
        sliceNode.RotateToVolumePlane(volumeNode)
        ras = geometry.ijk_to_ras_point(volumeNode, ijk)
        sliceNode.JumpSliceByCentering(*[float(v) for v in ras])
        slicer.app.processEvents()
        return sliceWidget, sliceNode

    def test_SAMLiverSeg_PanelSegmentLiver(self):
        """The panel as a user drives it: volume, ROI, "Segment liver" (twice: one segment editor
        node), the result against the phantom's liver, undo."""
        import numpy as np
        from SAMLiverSegLogic import volume_nodes

        self.delayDisplay("Load a CT phantom and place an ROI around the liver (3 slices)")
        volumeNode, liver, box = self._phantomScene()
        i0, j0, i1, j1, k = box
        from SAMLiverSegLogic import module_logic

        roi = module_logic.roi_node_for_ijk_box(slicer.mrmlScene, volumeNode, (i0, j0, k - 1), (i1, j1, k + 1),
                                                "LiverBox")
        slicer.util.selectModule("SAMLiverSeg")
        widget = slicer.modules.samliverseg.widgetRepresentation().self()
        p = widget._parameterNode
        p.inputVolume = volumeNode
        p.roi = roi
        p.points = None
        p.outputSegmentation = None
        p.model = "lite_medsam"
        p.device = "cpu"
        p.backend = "torch"  # no offer to install a faster backend in a test
        p.window = "model"
        p.propagate = True

        self.delayDisplay("Segment liver (the inference worker answers; Qt wakes the panel)")
        editorNodesBefore = None
        for attempt in range(2):
            widget.onSegment("liver")
            run = widget.panelRun
            self.assertIsNotNone(run)
            self.processEventsUntil(lambda: run.finished and widget.segmentProgress is None, 600, "Segment liver")
            self.assertEqual(run.status, "done", run.message)
            editorNodes = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentEditorNode")
            if editorNodesBefore is None:
                editorNodesBefore = editorNodes
            self.assertEqual(editorNodes, editorNodesBefore)  # the second click adds no editor node
        segmentationNode = p.outputSegmentation
        self.assertIsNotNone(segmentationNode)
        mask = volume_nodes.segment_mask(segmentationNode, run.segment_id, volumeNode)
        truth = liver.astype(bool).copy()
        truth[: k - 1] = False
        truth[k + 2:] = False
        dice = 2.0 * np.logical_and(mask, truth).sum() / (mask.sum() + truth.sum())
        self.delayDisplay(f"Liver Dice against the phantom truth (3 slices): {dice:.3f}")
        self.assertGreater(dice, 0.5)
        self.assertEqual(int(mask.sum()), int(mask[k - 1:k + 2].sum()))  # only inside the ROI
        run.editor.target.undo()  # one undo step: the first result (the same mask) comes back
        np.testing.assert_array_equal(volume_nodes.segment_mask(segmentationNode, run.segment_id, volumeNode), mask)
        run.editor.target.undo()
        self.assertEqual(int(volume_nodes.segment_mask(segmentationNode, run.segment_id, volumeNode).sum()), 0)
        self.delayDisplay("Test passed")

    def test_SAMLiverSeg_SegmentEditorEffect(self):
        """The registered effect in a real Segment Editor: drag a box, apply, undo."""
        import numpy as np
        from SAMLiverSegLogic import geometry, slice_clicks, volume_nodes

        registerSegmentEditorEffect()
        volumeNode, liver, box = self._phantomScene()
        i0, j0, i1, j1, k = box
        segmentationNode = volume_nodes.add_segmentation_node(slicer.mrmlScene, volumeNode)
        segmentId = volume_nodes.add_segment(segmentationNode, "Liver")

        editorWidget = slicer.qMRMLSegmentEditorWidget()
        editorWidget.setMRMLScene(slicer.mrmlScene)
        editorNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
        editorWidget.setMRMLSegmentEditorNode(editorNode)
        editorWidget.setSegmentationNode(segmentationNode)
        setSource = getattr(editorWidget, "setSourceVolumeNode", None) or editorWidget.setMasterVolumeNode
        setSource(volumeNode)
        editorWidget.setCurrentSegmentID(segmentId)
        editorWidget.setActiveEffectByName(EFFECT_NAME)
        effect = editorWidget.activeEffect()
        self.assertIsNotNone(effect, "the effect is not registered")
        effect.setParameter("Device", "cpu")

        sliceWidget, sliceNode = self._redSliceOn(volumeNode, ((i0 + i1) / 2, (j0 + j1) / 2, k))
        xyA = slice_clicks.ras_to_xy(sliceNode, geometry.ijk_to_ras_point(volumeNode, (i0, j0, k)))[:2]
        xyB = slice_clicks.ras_to_xy(sliceNode, geometry.ijk_to_ras_point(volumeNode, (i1, j1, k)))[:2]
        effect.self().onDrag(sliceWidget, xyA, xyB)
        self.processEventsUntil(lambda: effect.self().session.preview is not None, 300, "the effect's preview")
        effect.self().onApply()
        mask = volume_nodes.segment_mask(segmentationNode, segmentId, volumeNode)
        self.assertGreater(int(mask[k].sum()), 0)
        self.assertEqual(int(mask.sum()), int(mask[k].sum()))  # a 2D result changes only its slice
        editorWidget.undo()
        self.assertEqual(volume_nodes.segment_mask(segmentationNode, segmentId, volumeNode).sum(), 0)
        editorWidget.setActiveEffect(None)
        self.delayDisplay("Test passed")

    def test_SAMLiverSeg_TrainingPanel(self):
        """The training panel without training: the request built from the parameter node, its
        validation, and the loss / Dice plot nodes shown in a plot widget."""
        from samliverseg.core.errors import InputError
        from SAMLiverSegLogic import module_logic, training_process

        logic = SAMLiverSegLogic()
        p = logic.getParameterNode()
        p.trainLabelledFolder = ""
        p.trainRunFolder = os.path.join(slicer.app.temporaryPath, "SAMLiverSegTrainingTest")
        p.trainKind = "decoder"
        p.trainEpochs = 3
        request = logic.trainingRequest(p)
        self.assertEqual((request.kind, request.epochs, request.base_model), ("decoder", 3, p.trainBaseModel))
        with self.assertRaises(InputError):
            request.validate()  # no labelled folder: a message, nothing started
        job = logic.createTrainingJob(request)
        self.assertEqual(job.state.status, "idle")

        state = training_process.TrainingState(losses=[(1, 0.8), (2, 0.6), (3, 0.5)], epoch_losses=[(0, 3, 0.63)],
                                               val_dice=[(0, 3, 0.71)])
        nodes = module_logic.update_training_plot(slicer.mrmlScene, state)
        widget = slicer.qMRMLPlotWidget()
        widget.setMRMLScene(slicer.mrmlScene)
        widget.setMRMLPlotViewNode(nodes.view)
        widget.show()
        slicer.app.processEvents()
        self.assertEqual(widget.mrmlPlotViewNode().GetPlotChartNodeID(), nodes.chart.GetID())
        self.assertEqual(nodes.chart.GetNumberOfPlotSeriesNodes(), 3)
        self.assertEqual(nodes.steps_table.GetTable().GetNumberOfRows(), 3)
        widget.close()
        self.delayDisplay("Test passed")
