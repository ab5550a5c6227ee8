"""MRISynthesis 3D Slicer module: synthesise a missing FLAIR from T1 (+ T2, + T1c).

The panel and this file stay thin: volumes <-> MRISynthesisLib, the scene rules, the
background job and the dependency installer live in the SlicerMRISynthesisLib package beside
this file (Qt-free, tested in CI with slicer-core); model and preprocessing live in
MRISynthesisLib. Importing this module never imports torch.

Python console:
    >>> logic = slicer.util.getModuleLogic("MRISynthesis")
    >>> flair = logic.synthesize(t1=getNode("t1"), t2=getNode("t2"))       # blocks, returns the node
    >>> flair = logic.synthesize(t1=getNode("t1"), model="/path/model.safetensors",
    ...                          device="cuda:0", precision="bf16")
    >>> result = logic.synthesizeWithDetails(t1=getNode("t1"), brainMask="auto", saveMask=True)
    >>> print(result.maskDecision.description); result.maskOutput          # the label map
"""

import importlib
import importlib.util
import logging
import os
import time
from typing import Annotated, Optional

import vtk

import qt
import slicer
from slicer import vtkMRMLLabelMapVolumeNode, vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

import pathlib

# Makes MRISynthesisLib importable (beside this file when installed, ../MRISynthesisLib in a
# source checkout) without putting any other folder on sys.path.
import SlicerMRISynthesisLib  # noqa: F401
from MRISynthesisLib.errors import MRISynthesisError
from SlicerMRISynthesisLib import dependencies, modelinfo
from SlicerMRISynthesisLib.jobs import ApplyRun, SynthesisJob
from MRISynthesisLib.worker import WorkerClient, worker_command
from SlicerMRISynthesisLib.scene import (
    BRAIN_MASK_MODES,
    DEFAULT_BRAIN_MASK,
    DEFAULT_PRECISION,
    INPUT_MODALITIES,
    MODEL_AUTOMATIC,
    MODEL_CHOICES,
    MODEL_FILE,
    PRECISIONS,
    SynthesisSceneLogic,
    brainMaskSummary,
    panelState,
    prefillInputs,
    updateNodeFromArray,
)

RESEARCH_NOTICE = "For research use only. A synthetic FLAIR is not a substitute for an acquired one in diagnosis."

# BraTS 2023 GLI sample BraTS-GLI-00001-000 from BrainLesion/tutorials, pinned commit; the
# SHA-256 sums were computed from files verified byte-identical to these blobs (git blob ids).
SAMPLE_COMMIT = "a2d3fffe821e0dfd3bb62520985239324eaeda9a"
SAMPLE_BASE_URL = ("https://raw.githubusercontent.com/BrainLesion/tutorials/"
                   f"{SAMPLE_COMMIT}/BraTS/data/segmentation/BraTS-GLI-00001-000/")
SAMPLE_FILES = (
    # (node name, file name, SHA-256)
    ("BraTS-GLI-00001-000-t1n", "BraTS-GLI-00001-000-t1n.nii.gz",
     "e860924b936e301ddeba20409fbb59dde322475cb49328f1b46a9235c792e73e"),
    ("BraTS-GLI-00001-000-t2w", "BraTS-GLI-00001-000-t2w.nii.gz",
     "4cd389cc57d12134a30a898c66532228126b9a7d0600ee578e82a32144528b51"),
    ("BraTS-GLI-00001-000-t1c", "BraTS-GLI-00001-000-t1c.nii.gz",
     "4399faadcc45c8a4541313cdf88aced7d835ed59ac3078d950e0eac293d603f5"),
    ("BraTS-GLI-00001-000-t2f", "BraTS-GLI-00001-000-t2f.nii.gz",
     "82aed8546af5e6d8d94fd91c56227abdcf6120130390d1556c4342a208980604"),
)


#
# MRISynthesis
#


class MRISynthesis(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MRI Synthesis")
        self.parent.categories = [_("Image Synthesis")]
        self.parent.dependencies = []
        self.parent.contributors = ["MRISynthesis team (independent)"]  # "Name (Affiliation)", as Slicer lists them
        self.parent.helpText = _("""
Synthesises a missing FLAIR from T1, T1+T2 or T1+T2+T1c with a feature-disentanglement GAN.
Select the inputs (pre-filled from volume names), choose the model, press Apply. The output
is on the T1 volume's grid. See <a href="https://github.com/MRISynthesis/SlicerMRISynthesis#readme">the documentation</a>.
""")
        self.parent.acknowledgementText = _("""
Method: feature-disentanglement GAN for multi-contrast MRI synthesis (see the project README).
Sample data: BraTS 2023 (BrainLesion/tutorials), used under the BraTS challenge terms.
""")
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """Register a BraTS multi-contrast case (T1, T2, T1c and the real FLAIR) in Sample Data."""
    import SampleData

    iconsPath = os.path.join(os.path.dirname(__file__), "Resources/Icons")
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="MRISynthesis",
        sampleName="BraTS-GLI-00001 (T1, T2, T1c, FLAIR)",
        thumbnailFileName=os.path.join(iconsPath, "MRISynthesisSample.png"),
        uris=[SAMPLE_BASE_URL + fileName for nodeName, fileName, sha in SAMPLE_FILES],
        fileNames=[fileName for nodeName, fileName, sha in SAMPLE_FILES],
        nodeNames=[nodeName for nodeName, fileName, sha in SAMPLE_FILES],
        checksums=[f"SHA256:{sha}" for nodeName, fileName, sha in SAMPLE_FILES],
        loadFileTypes=["VolumeFile"] * len(SAMPLE_FILES),
    )


#
# MRISynthesisParameterNode
#


@parameterNodeWrapper
class MRISynthesisParameterNode:
    """Panel state, saved with the scene. Names match SlicerParameterName in the .ui; ``model``,
    ``device`` and ``brainMask`` are shown with human labels, so the widget binds those itself."""

    t1Volume: vtkMRMLScalarVolumeNode
    t2Volume: vtkMRMLScalarVolumeNode
    t1cVolume: vtkMRMLScalarVolumeNode
    maskVolume: vtkMRMLScalarVolumeNode  # a picked node is the brain mask "given"; None: ``brainMask``
    brainMask: Annotated[str, Choice(list(BRAIN_MASK_MODES))] = DEFAULT_BRAIN_MASK  # "auto" or "none"
    model: str = MODEL_AUTOMATIC  # MODEL_CHOICES
    modelFile: pathlib.Path
    device: str = "auto"  # "auto", "cpu", "cuda:N"
    precision: Annotated[str, Choice(list(PRECISIONS))] = DEFAULT_PRECISION
    outputVolume: vtkMRMLScalarVolumeNode  # None: each Apply creates a new volume
    saveBrainMask: bool = False  # also keep the brain mask used, as a label map
    maskOutputVolume: vtkMRMLLabelMapVolumeNode  # None: each Apply creates a new label map
    saveUncertainty: bool = False  # also the test-time-augmentation spread, as a new volume
    decidedInputs: str = ""  # comma-separated selectors already set once: never pre-filled again


#
# MRISynthesisWidget
#


class MRISynthesisWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Thin: the panel state comes from MRISynthesisLogic.panelState, synthesis runs in a
    SynthesisJob (the logic's worker process) after the dependency install (InstallJob), both
    in one ApplyRun advanced by a QTimer, so the panel stays responsive and Cancel works
    throughout without waiting. The worker process is started when the module is shown and
    kept while it is in use (the network stays built between Applies); leaving the module
    lets a run finish, then ends the worker."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run = None  # the running ApplyRun
        self._workerInfoShown = None  # the worker's "ready" report last shown (PyTorch, GPUs)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MRISynthesis.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MRISynthesisLogic()
        self.ui.researchNoticeLabel.text = RESEARCH_NOTICE

        self._fillModelComboBox()
        self._fillDeviceComboBox(torchModule=None)
        self._fillBrainMaskComboBox()
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.brainMaskComboBox.connect("currentIndexChanged(int)", self.onBrainMaskChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.progressBar.hide()
        self.timer = qt.QTimer()
        self.timer.setInterval(100)
        self.timer.connect("timeout()", self._poll)
        # Scene close cancels a run even when the module is not shown.
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

    def cleanup(self) -> None:
        self._cancelRun(_("the module was closed"))
        self.logic.worker.kill()
        self.removeObservers()

    def enter(self) -> None:
        # The parameter node and the name-based pre-fill only while the module is shown.
        self.initializeParameterNode()
        if not self.hasObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self.onNodeAdded):
            self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self.onNodeAdded)
        self._showEnvironment()
        # Start the worker now (PyTorch's import takes seconds) so that the first Apply finds it ready.
        if self.logic.startWorkerIfInstalled():
            self.timer.start()

    def exit(self) -> None:
        # A run goes on (its result still reaches the scene); an idle worker is ended now.
        self.removeObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self.onNodeAdded)
        self.setParameterNode(None)
        if not self._running:
            self.logic.stopWorker()

    def onSceneStartClose(self, caller, event) -> None:
        self._cancelRun(_("the scene was closed"))
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def onNodeAdded(self, caller, event, node) -> None:
        if node.IsA("vtkMRMLScalarVolumeNode"):
            # Loaders set the name after adding the node: decide once the event loop runs.
            qt.QTimer.singleShot(0, self._prefill)

    def _prefill(self) -> None:
        if self.parent.isEntered and self._parameterNode is not None:
            self.logic.prefillInputs(self._parameterNode)

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        self.logic.prefillInputs(self._parameterNode)

    def setParameterNode(self, inputParameterNode: Optional[MRISynthesisParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._onParameterNodeModified()

    # -- model and device: human labels, values in item data

    def _fillModelComboBox(self) -> None:
        combo = self.ui.modelComboBox
        combo.clear()
        combo.addItem(_("automatic (by the selected inputs)"), MODEL_AUTOMATIC)
        combo.setItemData(0, _(modelinfo.AUTOMATIC_HELP), qt.Qt.ToolTipRole)
        self._modelSummaries = {MODEL_AUTOMATIC: _(modelinfo.AUTOMATIC_HELP),
                                MODEL_FILE: _("A model bundle file (.safetensors) you trained or received.")}
        for name, label, summary in modelinfo.shippedModels():
            combo.addItem(label, name)
            combo.setItemData(combo.count - 1, summary, qt.Qt.ToolTipRole)
            self._modelSummaries[name] = summary
        combo.addItem(_("model bundle file..."), MODEL_FILE)

    def _fillBrainMaskComboBox(self) -> None:
        combo = self.ui.brainMaskComboBox
        combo.clear()
        combo.addItem(_("automatic (extract unless skull-stripped)"), "auto")
        combo.addItem(_("none (non-zero voxels)"), "none")

    def _fillDeviceComboBox(self, torchModule) -> None:
        """``torchModule``: what is known of the GPUs: None (not yet), a list of GPU names
        (modelinfo.workerDevices) or the synthesis process's report. The saved choice stays
        listed and selected."""
        combo = self.ui.deviceComboBox
        current = self._parameterNode.device if self._parameterNode else "auto"
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for device, label in modelinfo.deviceChoices(torchModule, current=current):
            combo.addItem(label, device)
        combo.blockSignals(wasBlocked)
        self._showChoice(combo, current)

    def _showEnvironment(self) -> None:
        """The PyTorch line from the installed distribution's metadata: torch is never imported
        into Slicer's process for the panel (an old torch imported here could not be upgraded
        until Slicer restarts). The GPUs come from the synthesis process (_showWorkerInfo)."""
        self.ui.environmentLabel.text = modelinfo.installedTorchStatus()
        if getattr(self, "_workerInfoShown", None) is None:
            self._fillDeviceComboBox(None)

    def _showWorkerInfo(self) -> None:
        """The worker's PyTorch and GPUs: the device list and the PyTorch line (Slicer's own
        interpreter never imports torch)."""
        info = self._workerInfoShown = self.logic.worker.info
        if info is None:
            return
        self._fillDeviceComboBox(modelinfo.workerDevices(info))
        self.ui.environmentLabel.text = modelinfo.workerTorchStatus(info)

    @staticmethod
    def _showChoice(combo, value) -> None:
        index = combo.findData(value)
        wasBlocked = combo.blockSignals(True)
        combo.currentIndex = index if index >= 0 else 0
        combo.blockSignals(wasBlocked)

    def onModelChanged(self, index: int) -> None:
        if self._parameterNode is not None and index >= 0:
            self._parameterNode.model = self.ui.modelComboBox.itemData(index)

    def onDeviceChanged(self, index: int) -> None:
        if self._parameterNode is not None and index >= 0:
            self._parameterNode.device = self.ui.deviceComboBox.itemData(index)

    def onBrainMaskChanged(self, index: int) -> None:
        if self._parameterNode is not None and index >= 0:
            self._parameterNode.brainMask = self.ui.brainMaskComboBox.itemData(index)

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        if not self._parameterNode:
            return
        self.logic.rememberDecidedInputs(self._parameterNode)
        self._showChoice(self.ui.modelComboBox, self._parameterNode.model)
        self._showChoice(self.ui.deviceComboBox, self._parameterNode.device)
        self._showChoice(self.ui.brainMaskComboBox, self._parameterNode.brainMask)
        self.ui.brainMaskComboBox.enabled = self._parameterNode.maskVolume is None  # a picked volume wins
        self.ui.maskOutputSelector.enabled = self._parameterNode.saveBrainMask
        self.ui.modelInfoLabel.text = self._modelSummaries.get(self._parameterNode.model, "")
        if self._running:
            return
        state = self.logic.panelState(self._parameterNode)
        self.ui.modelFilePathLineEdit.enabled = self._parameterNode.model == MODEL_FILE
        self.ui.applyButton.enabled = state.canApply
        message = state.message
        if state.canApply:
            message += " " + brainMaskSummary(self._parameterNode.brainMask, self._parameterNode.maskVolume)
        self.ui.applyButton.toolTip = message
        self.ui.statusLabel.text = message

    # -- Apply / Cancel

    @property
    def _running(self) -> bool:
        return self._run is not None

    def onApplyButton(self) -> None:
        if self._running:
            self._cancelRun(_("you pressed Cancel"))
            return
        try:
            # Checked and read on the main thread; nothing in the scene changes yet.
            request = self.logic.prepareFromParameterNode(self._parameterNode)
            steps = self.logic.dependencyInstaller.askToInstall()
        except MRISynthesisError as exc:
            self._report(str(exc), error=True)
            return
        except Exception as exc:
            logging.exception("MRISynthesis")
            self._report(_("Cannot start: {error}").format(error=exc), error=True)
            return
        if steps is None:
            self._report(_("The Python packages were not installed, so nothing was synthesised; the scene is "
                           "unchanged. Press Apply again to be asked again."))
            return
        installJob = dependencies.InstallJob(self.logic.dependencyInstaller, steps) if steps else None
        self._setRunning(True)
        self._run = ApplyRun(self.logic.sceneLogic, request, slicer.mrmlScene, self.logic.worker, installJob,
                             onInstalled=self._showEnvironment)
        self._showProgress()
        self.timer.start()

    def _poll(self) -> None:
        run = self._run
        if run is None:
            # Only waiting for the worker's "ready" (its PyTorch and GPUs, for the device list).
            self.logic.worker.events()
            if self.logic.worker.info is not None or not self.logic.worker.alive:
                self.timer.stop()
                self._showWorkerInfo()
            return
        if self.logic.worker.info is not None and self.logic.worker.info is not self._workerInfoShown:
            self._showWorkerInfo()
        if run.poll():
            if self._run is run:  # not cancelled inside a blocking install step
                self._showProgress()
            return
        if self._run is run:
            self._finishRun()

    def _showProgress(self) -> None:
        progress = self._run.progress
        self.ui.progressBar.maximum = progress[1] if progress else 0  # 0: busy indicator
        self.ui.progressBar.value = progress[0] if progress else 0
        self.ui.statusLabel.text = self._run.status

    def _cancelRun(self, reason: str) -> None:
        """Stop an install or synthesis now; nothing is added to or changed in the scene."""
        if self._run is not None:
            self._run.cancel(reason)
            self._finishRun()

    def _finishRun(self) -> None:
        run, self._run = self._run, None
        self.timer.stop()
        self._setRunning(False)
        if not self.parent.isEntered:  # the module was left during the run
            self.logic.stopWorker()
        if run.output is not None:
            maskOutput = run.result.maskOutput if run.result is not None else None
            slicer.util.setSliceViewerLayers(background=run.output, label=maskOutput or "keep-current", fit=True)
        self._report(run.message, run.failed)
        if run.failed:
            logging.error("MRISynthesis: %s", run.message)
        else:
            logging.info("MRISynthesis: %s", run.message)  # the brain-mask decision stays in the log

    def _report(self, message: str, error: bool = False) -> None:
        self.ui.statusLabel.text = message
        if error:
            slicer.util.errorDisplay(message)

    def _setRunning(self, running: bool) -> None:
        self.ui.applyButton.text = _("Cancel") if running else _("Apply")
        self.ui.applyButton.enabled = True
        self.ui.progressBar.visible = running
        self.ui.progressBar.maximum = 100
        self.ui.progressBar.value = 0
        self.ui.inputsCollapsibleButton.enabled = not running
        self.ui.modelCollapsibleButton.enabled = not running
        self.ui.outputsCollapsibleButton.enabled = not running
        if not running:
            self._onParameterNodeModified()


#
# MRISynthesisLogic
#


def _confirmInSlicer(message: str) -> bool:
    if slicer.app.testingEnabled():
        # Confirmation dialogs answer yes in testing mode: never install from a test.
        logging.info("MRISynthesis: testing mode, not installing Python packages")
        return False
    if slicer.app.commandOptions().noMainWindow:
        raise MRISynthesisError("Python packages are missing and Slicer runs without a main window, so it cannot "
                                "ask: open the MRISynthesis module in Slicer and press Apply once to install them.\n"
                                + message)
    return slicer.util.confirmOkCancelDisplay(message, windowTitle=_("MRISynthesis: install Python packages"))


def _pythonSlicer() -> str:
    """Slicer's Python launcher (on PATH inside Slicer): what slicer.util.pip_install and the
    PyTorch extension run pip and light-the-torch with."""
    import shutil

    python = shutil.which("PythonSlicer")
    if not python:
        raise RuntimeError("PythonSlicer executable not found")
    return python


def launchSlicerWorker():
    """The synthesis worker process: Slicer's own Python (PythonSlicer) running
    MRISynthesisLib.worker, in a process group of its own so Cancel can kill the whole tree
    (PythonSlicer is a launcher that starts the interpreter as its child)."""
    from MRISynthesisLib.processes import popen_new_group

    return popen_new_group(worker_command(_pythonSlicer()), stdin=True)


def slicerDependencyInstaller() -> dependencies.DependencyInstaller:
    """The installer wired to this Slicer: its dialog, PythonSlicer and temporary folder. Every
    step is a background process tree that Cancel kills at once (pip; light-the-torch, the
    PyTorch extension's method, when that extension is installed), on every Slicer version:
    no blocking Slicer installer (pip_ensure, PyTorchUtils.installTorch) is called."""
    return dependencies.DependencyInstaller(
        confirm=_confirmInSlicer, hasPyTorchExtension=importlib.util.find_spec("PyTorchUtils") is not None,
        python=_pythonSlicer, constraintsFolder=slicer.app.temporaryPath)


class MRISynthesisLogic(ScriptedLoadableModuleLogic):
    """Console and panel entry point; the work is done by SynthesisSceneLogic.

    ``sceneLogic`` and ``dependencyInstaller`` can be injected (tests, other modules).
    """

    def __init__(self, sceneLogic: Optional[SynthesisSceneLogic] = None,
                 dependencyInstaller: Optional[dependencies.DependencyInstaller] = None,
                 launchWorker=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.sceneLogic = sceneLogic or SynthesisSceneLogic(slicer.mrmlScene)
        self.dependencyInstaller = dependencyInstaller or slicerDependencyInstaller()
        # The panel's synthesis process (console calls run in Slicer's own interpreter).
        self.worker = WorkerClient(launchWorker or launchSlicerWorker)

    def startWorkerIfInstalled(self) -> bool:
        """Start the worker process unless a package is missing (then the first Apply installs
        first); True when a worker is (now) running."""
        try:
            if self.dependencyInstaller.problems():
                return False
            self.worker.start()
        except Exception as exc:  # the panel works without it: Apply will report the problem
            logging.warning("MRISynthesis: the synthesis process could not be started: %s", exc)
            return False
        return True

    def stopWorker(self) -> None:
        """End the idle worker process (it exits when its input closes)."""
        self.worker.stop()

    def getParameterNode(self):
        return MRISynthesisParameterNode(super().getParameterNode())

    def missingRequirements(self):
        """["torch is not installed (...)", ...]: what must be installed first (no install)."""
        return [problem.message for problem in self.dependencyInstaller.problems()]

    def ensureDependencies(self) -> bool:
        """Install PyTorch and the other packages on first use, after asking. False if declined."""
        return self.dependencyInstaller.ensure()

    @staticmethod
    def rememberDecidedInputs(p) -> None:
        decided = {m for m in p.decidedInputs.split(",") if m}
        decided |= {m for m in INPUT_MODALITIES if getattr(p, f"{m}Volume") is not None}
        text = ",".join(m for m in INPUT_MODALITIES if m in decided)
        if text != p.decidedInputs:
            p.decidedInputs = text

    @staticmethod
    def prefillInputs(p) -> None:
        """Fill input selectors nobody has set yet from volume names (t1/t1n, t2/t2w, t1c/...)."""
        current = {m: getattr(p, f"{m}Volume") for m in INPUT_MODALITIES}
        nodes = [n for n in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode") if n is not p.outputVolume]
        assigned, decided = prefillInputs(nodes, current, [m for m in p.decidedInputs.split(",") if m])
        for modality, node in assigned.items():
            setattr(p, f"{modality}Volume", node)
        p.decidedInputs = ",".join(m for m in INPUT_MODALITIES if m in decided)

    def panelState(self, p):
        from MRISynthesisLib.models import shipped_bundles  # torch-free

        given = [m for m in INPUT_MODALITIES if getattr(p, f"{m}Volume") is not None]
        modelFile = str(p.modelFile) if p.modelFile and str(p.modelFile) not in ("", ".") else None
        return panelState(p.model, modelFile, given, shipped_bundles())

    def prepareFromParameterNode(self, p):
        """What the panel shows, checked and read from the scene: only the inputs the chosen
        model takes; a new output volume unless the user picked one."""
        state = self.panelState(p)
        if not state.canApply:
            raise MRISynthesisError(state.message)
        inputs = {m: getattr(p, f"{m}Volume") for m in state.sources}
        return self.sceneLogic.prepare(**inputs, mask=p.maskVolume, brainMask=p.brainMask, model=state.model,
                                       device=p.device, precision=p.precision, outputNode=p.outputVolume,
                                       saveMask=p.saveBrainMask,
                                       maskOutputNode=p.maskOutputVolume if p.saveBrainMask else None,
                                       uncertainty=p.saveUncertainty)

    def synthesize(self, t1=None, t2=None, t1c=None, mask=None, model=None, device="auto",
                   precision=DEFAULT_PRECISION, outputNode=None, progressCallback=None, cancel=None,
                   brainMask=DEFAULT_BRAIN_MASK):
        """Synthesise FLAIR on T1's grid; blocks and returns the output vtkMRMLScalarVolumeNode.

        Examples (Python console):
            logic = slicer.util.getModuleLogic("MRISynthesis")
            flair = logic.synthesize(t1=getNode("t1"))                        # model by inputs
            flair = logic.synthesize(t1=getNode("t1"), t2=getNode("t2"), t1c=getNode("t1c"),
                                     device="cuda:0", precision="bf16")
            flair = logic.synthesize(t1=getNode("t1"), model="/models/my.safetensors",
                                     outputNode=getNode("previous result"))

        model: "t1_to_flair", "t1_t2_to_flair", "t1_t2_t1c_to_flair" or a bundle file;
        None picks the shipped model taking exactly the given inputs. device: "auto", "cpu",
        "cuda" or "cuda:N" (without a GPU: the CPU, with a warning). Each call creates a new
        output volume unless ``outputNode`` is given. On error or cancellation the scene is
        unchanged. Installs PyTorch on first use after asking. The network is built once and
        reused while model and device stay the same. Brain mask: ``mask`` (a volume node) is
        used as given, else ``brainMask`` "auto" (extract unless skull-stripped) or "none".
        """
        return self.synthesizeWithDetails(t1=t1, t2=t2, t1c=t1c, mask=mask, model=model, device=device,
                                          precision=precision, outputNode=outputNode,
                                          progressCallback=progressCallback, cancel=cancel,
                                          brainMask=brainMask).output

    def synthesizeWithDetails(self, progressCallback=None, cancel=None, **kwargs):
        """``synthesize`` returning the SceneResult: ``output`` (FLAIR node), ``maskOutput``
        (label map of the brain mask used, with ``saveMask=True`` or ``maskOutputNode=``) and
        ``maskDecision`` (``.description``: how the mask was chosen, one line)."""
        if not self.ensureDependencies():
            raise MRISynthesisError("PyTorch and the other required Python packages are not installed")
        return self.sceneLogic.synthesizeWithDetails(progressCallback=progressCallback, cancel=cancel, **kwargs)


#
# MRISynthesisTest
#


class MRISynthesisTest(dependencies.SelfTestGuard, ScriptedLoadableModuleTest):
    """Self-test in a real Slicer: small generated volumes, a small random model. It never
    installs anything. Without the Python packages every test is skipped in setUp with the
    list of what is missing (SelfTestGuard: ctest runs the test_* methods through unittest;
    Reload and Test calls runTest, which reports "skipped" instead of failing)."""

    selfTests = ("test_SynthesisGeometryAndValues", "test_BackgroundJobAndCancel", "test_ErrorLeavesSceneUnchanged")

    def setUpTest(self):  # after SelfTestGuard.setUp's check of the packages
        slicer.mrmlScene.Clear()

    def _volume(self, name, shape, ijkToRAS, seed):
        import numpy as np

        rng = np.random.default_rng(seed)
        # A round skull-stripped "brain" (a box would be refused as not a brain by brainMask="auto").
        grid = np.stack(np.meshgrid(*[np.linspace(-1.3, 1.3, n) for n in shape], indexing="ij"))
        inside = (grid ** 2).sum(0) <= 1.0
        array = np.where(inside, 50 + 100 * rng.random(shape), 0).astype(np.float32)
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        updateNodeFromArray(node, array, ijkToRAS)
        return node

    def _bundle(self, numSources):
        import torch
        from MRISynthesisLib.bundle import bundle_from_generator, save_bundle
        from MRISynthesisLib.networks import ModelConfig, build_generator, init_weights

        torch.manual_seed(0)
        config = ModelConfig(num_sources=numSources, base_width=4)
        sources = ("t1", "t2", "t1c")[:numSources]
        bundle = bundle_from_generator(init_weights(build_generator(config)), config, sources)
        path = os.path.join(slicer.app.temporaryPath, f"MRISynthesisSelfTest{numSources}.safetensors")
        save_bundle(bundle, path)
        return path

    def _logic(self):
        installer = dependencies.DependencyInstaller(confirm=lambda message: False)  # never installs
        return MRISynthesisLogic(dependencyInstaller=installer)

    def test_SynthesisGeometryAndValues(self):
        import numpy as np

        logic = self._logic()
        ijkToRAS = np.array([[0, -1.1, 0, 20], [0.9, 0, 0, -15], [0, 0, 2.0, 5], [0, 0, 0, 1]], dtype=float)
        t1 = self._volume("case t1n", (24, 20, 6), ijkToRAS, 0)
        t2 = self._volume("case t2w", (24, 20, 6), ijkToRAS, 1)
        self.delayDisplay("Synthesising")
        result = logic.synthesizeWithDetails(t1=t1, t2=t2, model=self._bundle(2), device="cpu", saveMask=True)
        output = result.output
        self.assertEqual(result.maskDecision.source, "input already skull-stripped")
        self.assertTrue(result.maskOutput.IsA("vtkMRMLLabelMapVolumeNode"))
        matrix = vtk.vtkMatrix4x4()
        output.GetIJKToRASMatrix(matrix)
        got = np.array([[matrix.GetElement(i, j) for j in range(4)] for i in range(4)])
        np.testing.assert_allclose(got, ijkToRAS, atol=1e-9)
        self.assertEqual(output.GetName(), "case t1n synthetic FLAIR")
        values = slicer.util.arrayFromVolume(output)
        self.assertEqual(values.shape, slicer.util.arrayFromVolume(t1).shape)
        self.assertGreaterEqual(float(values.min()), 0.0)
        self.assertLessEqual(float(values.max()), 1000.0)
        self.assertGreater(float(values.max()), 0.0)
        second = logic.synthesize(t1=t1, t2=t2, model=self._bundle(2), device="cpu")
        self.assertIsNot(second, output)  # a second Apply never overwrites the first result
        self.delayDisplay("Test passed")

    def test_BackgroundJobAndCancel(self):
        import numpy as np

        logic = self._logic()
        t1 = self._volume("t1", (24, 20, 6), np.eye(4), 0)
        request = logic.sceneLogic.prepare(t1=t1, model=self._bundle(1), device="cpu")
        before = slicer.mrmlScene.GetNumberOfNodes()
        try:
            # In the worker process (PythonSlicer), as the panel runs it; cancelled at once.
            job = SynthesisJob(logic.sceneLogic, request, logic.worker)
            job.start()
            job.cancel("self-test")
            self.assertIsNone(job.finish())
            self.assertFalse(job.running)
            self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), before)
            job = SynthesisJob(logic.sceneLogic, request, logic.worker)
            job.start()
            deadline = time.monotonic() + 120
            while job.poll():
                self.assertLess(time.monotonic(), deadline, "the synthesis process did not finish")
                time.sleep(0.05)
            output = job.finish()
            self.assertEqual(output.GetName(), "t1 synthetic FLAIR")
        finally:
            logic.worker.kill()
        self.delayDisplay("Test passed")

    def test_ErrorLeavesSceneUnchanged(self):
        import numpy as np

        logic = self._logic()
        t1 = self._volume("t1", (24, 20, 6), np.eye(4), 0)
        before = slicer.mrmlScene.GetNumberOfNodes()
        with self.assertRaises(MRISynthesisError):
            logic.synthesize(t1=t1, t2=None, model=self._bundle(2), device="cpu")  # model needs T2
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), before)
        self.delayDisplay("Test passed")
