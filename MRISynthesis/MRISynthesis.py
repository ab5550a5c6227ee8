"""MRISynthesis 3D Slicer module: synthesise a missing FLAIR from T1 (+ T2, + T1c).

The panel and this file stay thin: volumes <-> MRISynthesisLib and the scene rules live in
MRISynthesisSceneLogic (Qt-free, tested in CI with slicer-core); model and preprocessing
live in MRISynthesisLib. Importing this module never imports torch.

Python console:
    >>> logic = slicer.util.getModuleLogic("MRISynthesis")
    >>> flair = logic.synthesize(t1=getNode("t1"), t2=getNode("t2"))       # blocks, returns the node
    >>> flair = logic.synthesize(t1=getNode("t1"), model="/path/model.safetensors",
    ...                          device="cuda", precision="bf16")
"""

import logging
import os
import sys
from typing import Annotated, Optional

import vtk

import qt
import slicer
from slicer import vtkMRMLScalarVolumeNode
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

# In a source checkout (module path = this folder) MRISynthesisLib is one level up; in an
# installed extension it sits next to this file.
_moduleDir = os.path.dirname(os.path.abspath(__file__))
for _candidate in (_moduleDir, os.path.dirname(_moduleDir)):
    if os.path.isdir(os.path.join(_candidate, "MRISynthesisLib")) and _candidate not in sys.path:
        sys.path.insert(0, _candidate)

from MRISynthesisLib.errors import Cancelled, MRISynthesisError  # noqa: E402
from MRISynthesisDependencies import DependencyInstaller  # noqa: E402
from MRISynthesisSceneLogic import (  # noqa: E402
    DEFAULT_PRECISION,
    DEVICES,
    INPUT_MODALITIES,
    MODEL_AUTOMATIC,
    MODEL_CHOICES,
    MODEL_FILE,
    PRECISIONS,
    SynthesisSceneLogic,
    assignInputsByName,
    panelState,
    updateNodeFromArray,
)

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
        self.parent.categories = [_("Filtering")]
        self.parent.dependencies = []
        self.parent.contributors = ["MRISynthesis contributors"]
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
        loadFileType=["VolumeFile"] * len(SAMPLE_FILES),
    )


#
# MRISynthesisParameterNode
#


@parameterNodeWrapper
class MRISynthesisParameterNode:
    """Panel state, saved with the scene. Names match SlicerParameterName in the .ui."""

    t1Volume: vtkMRMLScalarVolumeNode
    t2Volume: vtkMRMLScalarVolumeNode
    t1cVolume: vtkMRMLScalarVolumeNode
    maskVolume: vtkMRMLScalarVolumeNode
    model: Annotated[str, Choice(list(MODEL_CHOICES))] = MODEL_AUTOMATIC
    modelFile: pathlib.Path
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    precision: Annotated[str, Choice(list(PRECISIONS))] = DEFAULT_PRECISION
    outputVolume: vtkMRMLScalarVolumeNode


#
# MRISynthesisWidget
#


class MRISynthesisWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._running = False
        self._cancelRequested = False

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MRISynthesis.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MRISynthesisLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self.onNodeAdded)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.progressBar.hide()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def onNodeAdded(self, caller, event, node) -> None:
        if node.IsA("vtkMRMLScalarVolumeNode"):
            # Loaders set the name after adding the node: decide once the event loop runs.
            qt.QTimer.singleShot(0, self.logic.prefillInputs)

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        self.logic.prefillInputs()

    def setParameterNode(self, inputParameterNode: Optional[MRISynthesisParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None) -> None:
        if self._running or not self._parameterNode:
            return
        state = self.logic.panelState(self._parameterNode)
        self.ui.modelFilePathLineEdit.enabled = self._parameterNode.model == MODEL_FILE
        self.ui.applyButton.enabled = state.canApply
        self.ui.applyButton.toolTip = state.message
        self.ui.statusLabel.text = state.message

    def onApplyButton(self) -> None:
        if self._running:
            self._cancelRequested = True
            self.ui.statusLabel.text = _("Cancelling after the current batch of slices...")
            return
        self._setRunning(True)
        try:
            output = self.logic.synthesizeFromParameterNode(self._parameterNode, self._onProgress,
                                                            lambda: self._cancelRequested)
            if output is not None:
                slicer.util.setSliceViewerLayers(background=output, fit=True)
                self.ui.statusLabel.text = _("Done: {name}").format(name=output.GetName())
            else:
                self.ui.statusLabel.text = _("Python packages were not installed; nothing was done.")
        except Cancelled:
            self.ui.statusLabel.text = _("Cancelled; the scene is unchanged.")
        except MRISynthesisError as exc:
            self.ui.statusLabel.text = str(exc)
            slicer.util.errorDisplay(str(exc))
        except Exception as exc:
            logging.exception("MRISynthesis failed")
            self.ui.statusLabel.text = _("Failed: {error}").format(error=exc)
            slicer.util.errorDisplay(_("Synthesis failed: {error}").format(error=exc))
        finally:
            self._setRunning(False)

    def _onProgress(self, done: int, total: int) -> None:
        self.ui.progressBar.maximum = max(total, 1)
        self.ui.progressBar.value = done
        self.ui.statusLabel.text = _("Synthesising slice {done} of {total}...").format(done=done, total=total)
        slicer.app.processEvents()  # keeps the panel responsive so Cancel can be clicked

    def _setRunning(self, running: bool) -> None:
        self._running = running
        self._cancelRequested = False
        self.ui.applyButton.text = _("Cancel") if running else _("Apply")
        self.ui.applyButton.enabled = True
        self.ui.progressBar.visible = running
        self.ui.progressBar.value = 0
        self.ui.inputsCollapsibleButton.enabled = not running
        self.ui.modelCollapsibleButton.enabled = not running
        self.ui.outputsCollapsibleButton.enabled = not running
        if not running:
            self._checkCanApply()


#
# MRISynthesisLogic
#


def _confirmInSlicer(message: str) -> bool:
    if slicer.app.commandOptions().noMainWindow:
        raise RuntimeError("Python packages are missing and Slicer runs without a main window, so it cannot ask: "
                           "open the MRISynthesis module once in Slicer and press Apply to install them, "
                           "or install the PyTorch extension.\n" + message)
    return slicer.util.confirmOkCancelDisplay(message, windowTitle="MRISynthesis: install Python packages")


def _pipEnsureFunction():
    """slicer.pydeps.pip_ensure (Slicer >= 5.11; called slicer.packaging in some previews), or None."""
    import importlib

    for name in ("slicer.pydeps", "slicer.packaging"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "pip_ensure"):
            return module.pip_ensure
    return None


def _pipInstallInSlicer(requirements) -> None:
    pipEnsure = _pipEnsureFunction()
    if pipEnsure is not None:
        from packaging.requirements import Requirement

        pipEnsure([Requirement(r) for r in requirements], requester="MRISynthesis")
    else:
        slicer.util.pip_install(" ".join(f'"{r}"' for r in requirements))


def _installTorchInSlicer(requirement: str) -> None:
    try:
        import PyTorchUtils  # the PyTorch extension: chooses the CUDA build matching the GPU
    except ImportError:
        PyTorchUtils = None
    if PyTorchUtils is not None:
        specifier = requirement[len("torch"):]
        if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=specifier) is None:
            raise RuntimeError("the PyTorch extension could not install PyTorch; see the Python console log")
        return
    pipEnsure = _pipEnsureFunction()
    if pipEnsure is not None:
        from packaging.requirements import Requirement

        logging.warning("Installing PyTorch from PyPI; for a CUDA build matched to your GPU install the "
                        "PyTorch extension from the Extensions Manager instead")
        pipEnsure([Requirement(requirement)], requester="MRISynthesis")
        return
    raise RuntimeError("PyTorch is not installed. Install the 'PyTorch' extension from the Extensions Manager "
                       "(it picks a CUDA build when a GPU is present), restart Slicer and press Apply again.")


class MRISynthesisLogic(ScriptedLoadableModuleLogic):
    """Console and panel entry point; the work is done by SynthesisSceneLogic.

    ``sceneLogic`` and ``dependencyInstaller`` can be injected (tests, other modules).
    """

    def __init__(self, sceneLogic: Optional[SynthesisSceneLogic] = None,
                 dependencyInstaller: Optional[DependencyInstaller] = None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.sceneLogic = sceneLogic or SynthesisSceneLogic(slicer.mrmlScene)
        self.dependencyInstaller = dependencyInstaller or DependencyInstaller(
            confirm=_confirmInSlicer, installTorch=_installTorchInSlicer, pipInstall=_pipInstallInSlicer)

    def getParameterNode(self):
        return MRISynthesisParameterNode(super().getParameterNode())

    def ensureDependencies(self) -> bool:
        """Install PyTorch and the other packages on first use, after asking. False if declined."""
        return self.dependencyInstaller.ensure()

    def prefillInputs(self) -> None:
        """Fill empty input selectors from volume names (t1/t1n, t2/t2w, t1c/t1ce/t1gd/post)."""
        p = self.getParameterNode()
        current = {m: getattr(p, f"{m}Volume") for m in INPUT_MODALITIES}
        nodes = slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
        nodes = [n for n in nodes if n is not p.outputVolume]
        for modality, node in assignInputsByName(nodes, current).items():
            setattr(p, f"{modality}Volume", node)

    def panelState(self, p):
        from MRISynthesisLib.models import shipped_bundles  # torch-free

        given = [m for m in INPUT_MODALITIES if getattr(p, f"{m}Volume") is not None]
        modelFile = str(p.modelFile) if p.modelFile and str(p.modelFile) not in ("", ".") else None
        return panelState(p.model, modelFile, given, shipped_bundles())

    def synthesizeFromParameterNode(self, p, progressCallback=None, cancel=None):
        """Run what the panel shows: only the inputs the chosen model takes. None if the user
        declined installing the Python packages."""
        state = self.panelState(p)
        if not state.canApply:
            raise MRISynthesisError(state.message)
        if not self.ensureDependencies():
            return None
        inputs = {m: getattr(p, f"{m}Volume") for m in state.sources}
        output = self.synthesize(**inputs, mask=p.maskVolume, model=state.model, device=p.device,
                                 precision=p.precision, outputNode=p.outputVolume,
                                 progressCallback=progressCallback, cancel=cancel)
        p.outputVolume = output
        return output

    def synthesize(self, t1=None, t2=None, t1c=None, mask=None, model=None, device="auto",
                   precision=DEFAULT_PRECISION, outputNode=None, progressCallback=None, cancel=None):
        """Synthesise FLAIR on T1's grid; blocks and returns the output vtkMRMLScalarVolumeNode.

        Examples (Python console):
            logic = slicer.util.getModuleLogic("MRISynthesis")
            flair = logic.synthesize(t1=getNode("t1"))                        # model by inputs
            flair = logic.synthesize(t1=getNode("t1"), t2=getNode("t2"), t1c=getNode("t1c"),
                                     device="cuda", precision="bf16")
            flair = logic.synthesize(t1=getNode("t1"), model="/models/my.safetensors",
                                     outputNode=getNode("previous result"))

        model: "t1_to_flair", "t1_t2_to_flair", "t1_t2_t1c_to_flair" or a bundle file;
        None picks the shipped model taking exactly the given inputs. device: "auto", "cpu",
        "cuda" ("cuda" without a GPU falls back to the CPU with a warning). On error or
        cancellation the scene is unchanged. Installs PyTorch on first use after asking.
        """
        if not self.ensureDependencies():
            raise MRISynthesisError("PyTorch and the other required Python packages are not installed")
        return self.sceneLogic.synthesize(t1=t1, t2=t2, t1c=t1c, mask=mask, model=model, device=device,
                                          precision=precision, outputNode=outputNode,
                                          progressCallback=progressCallback, cancel=cancel)


#
# MRISynthesisTest
#


class MRISynthesisTest(ScriptedLoadableModuleTest):
    """Self-test in a real Slicer: small generated volumes, a small random model."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SynthesisGeometryAndValues()
        self.setUp()
        self.test_ErrorLeavesSceneUnchanged()

    def _volume(self, name, shape, ijkToRAS, seed):
        import numpy as np

        rng = np.random.default_rng(seed)
        array = np.zeros(shape, dtype=np.float32)
        array[2:-2, 2:-2, 1:-1] = 50 + 100 * rng.random((shape[0] - 4, shape[1] - 4, shape[2] - 2))
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

    def test_SynthesisGeometryAndValues(self):
        import numpy as np

        logic = MRISynthesisLogic()
        if not logic.ensureDependencies():
            self.skipTest("PyTorch is not installed")
        ijkToRAS = np.array([[0, -1.1, 0, 20], [0.9, 0, 0, -15], [0, 0, 2.0, 5], [0, 0, 0, 1]], dtype=float)
        t1 = self._volume("case t1n", (24, 20, 6), ijkToRAS, 0)
        t2 = self._volume("case t2w", (24, 20, 6), ijkToRAS, 1)
        self.delayDisplay("Synthesising")
        output = logic.synthesize(t1=t1, t2=t2, model=self._bundle(2), device="cpu")
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
        self.delayDisplay("Test passed")

    def test_ErrorLeavesSceneUnchanged(self):
        import numpy as np

        logic = MRISynthesisLogic()
        if not logic.ensureDependencies():
            self.skipTest("PyTorch is not installed")
        t1 = self._volume("t1", (24, 20, 6), np.eye(4), 0)
        before = slicer.mrmlScene.GetNumberOfNodes()
        with self.assertRaises(MRISynthesisError):
            logic.synthesize(t1=t1, t2=None, model=self._bundle(2), device="cpu")  # model needs T2
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), before)
        self.delayDisplay("Test passed")
