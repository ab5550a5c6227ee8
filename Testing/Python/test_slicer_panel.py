"""What the panel decides and shows, without Qt: name-based pre-fill that respects the user's
choices, model labels and model-card summaries from the shipped bundles (no torch), device
and PyTorch lines; and static checks of the widget's scene rules (it cannot run here)."""

import ast
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "MRISynthesis"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

slicer = pytest.importorskip("slicer", reason="the PyPI slicer-core package is needed (pip install slicer-core)")

from MRISynthesisLib.models import shipped_bundles  # noqa: E402
from SlicerMRISynthesisLib import modelinfo  # noqa: E402
from SlicerMRISynthesisLib.scene import prefillInputs  # noqa: E402


def volumes(scene, *names):
    return [scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", n) for n in names]


def test_prefill_fills_only_undecided_selectors():
    scene = slicer.vtkMRMLScene()
    t1, t2 = volumes(scene, "case-t1n", "case-t2w")
    assigned, decided = prefillInputs([t1, t2], {"t1": None, "t2": None, "t1c": None}, [])
    assert assigned == {"t1": t1, "t2": t2} and decided == {"t1", "t2"}
    # The user sets T2 back to "None": a later volume named t2 does not refill it.
    (t2b,) = volumes(scene, "other t2")
    assigned, decided = prefillInputs([t1, t2, t2b], {"t1": t1, "t2": None, "t1c": None}, decided)
    assert assigned == {} and decided == {"t1", "t2"}
    # T1c was never decided: a T1c volume loaded later is pre-filled.
    (t1c,) = volumes(scene, "case-t1c")
    assigned, decided = prefillInputs([t1, t2, t1c], {"t1": t1, "t2": None, "t1c": None}, decided)
    assert assigned == {"t1c": t1c} and decided == {"t1", "t2", "t1c"}
    # A selector the user set by hand is decided even when no pre-fill ran.
    assigned, decided = prefillInputs([], {"t1": None, "t2": t2, "t1c": None}, [])
    assert decided == {"t2"}


def test_shipped_models_have_human_labels_and_card_summaries():
    models = modelinfo.shippedModels()
    assert [name for name, _, _ in models] == ["t1_to_flair", "t1_t2_to_flair", "t1_t2_t1c_to_flair",
                                               "pix2pix_t1_t2_to_flair"]
    labels = {name: label for name, label, _ in models}
    assert labels["t1_t2_to_flair"] == "T1 + T2 \u2192 FLAIR (paper model)"
    assert labels["t1_t2_t1c_to_flair"] == "T1 + T2 + T1c \u2192 FLAIR (paper model)"
    assert labels["pix2pix_t1_t2_to_flair"] == "T1 + T2 \u2192 FLAIR (pix2pix baseline)"
    for name, _, summary in models:
        # This model's own row of its evaluation, brain figures first.
        assert "held-out subjects" in summary and "Held-out test: brain PSNR" in summary, name
        assert "lesion conspicuity" in summary and "whole-slice PSNR" in summary, name
        assert "Training data:" in summary and "Limits:" in summary and "research use only" in summary
    assert "automatic" in modelinfo.AUTOMATIC_HELP.lower() and "T1 + T2 + T1c" in modelinfo.AUTOMATIC_HELP
    # Whoever picks the T1c model reads that the T1 + T2 model is as faithful (its card's comparison).
    summaries = {name: summary for name, _, summary in models}
    assert "no more faithful than t1_t2_to_flair" in summaries["t1_t2_t1c_to_flair"]
    assert "leave the T1C out" in summaries["t1_t2_t1c_to_flair"]
    assert "no more faithful" not in summaries["t1_t2_to_flair"]


def test_summary_numbers_come_from_the_bundle(tmp_path):
    path = shipped_bundles()["t1_to_flair"]
    info = modelinfo.readBundleMetadata(path)
    stats = info["provenance"]["held_out_evaluation"]["summary"]["t1_to_flair"]["psnr_masked"]
    assert f"brain PSNR {stats['mean']:.2f} \u00b1 {stats['std']:.2f} dB" in modelinfo.modelSummary(info)
    bad = tmp_path / "t1_to_flair.safetensors"
    bad.write_bytes(b"junk")
    (name, label, summary), = modelinfo.shippedModels({"t1_to_flair": bad})
    assert "unreadable" in label and "not an MRISynthesis model bundle" in summary


def fake_torch(gpus=(), cuda_build="12.1", version="2.5.1+cu121"):
    """A stand-in for the torch module's device queries (torch itself has no GPU here)."""
    cuda = types.SimpleNamespace(is_available=lambda: bool(gpus), device_count=lambda: len(gpus),
                                 get_device_name=lambda i: gpus[i])
    return types.SimpleNamespace(cuda=cuda, version=types.SimpleNamespace(cuda=cuda_build), __version__=version)


def test_device_list_names_each_gpu_and_the_cpu():
    assert modelinfo.deviceChoices(None) == [("auto", "automatic (GPU when usable, else CPU)"), ("cpu", "CPU")]
    choices = modelinfo.deviceChoices(fake_torch(("NVIDIA H200", "NVIDIA RTX A4000")))
    assert [d for d, _ in choices] == ["auto", "cuda:0", "cuda:1", "cpu"]
    assert choices[1][1] == "cuda:0 \u2013 NVIDIA H200"
    import torch

    assert [d for d, _ in modelinfo.deviceChoices(torch)][-1] == "cpu"  # the real one works too


def test_pytorch_line():
    assert "not installed" in modelinfo.torchStatus(None)
    assert modelinfo.torchStatus(fake_torch(("NVIDIA H200",))) == "PyTorch 2.5.1+cu121: CUDA 12.1 usable (1 GPU)."
    assert "no usable GPU" in modelinfo.torchStatus(fake_torch(()))
    assert "CPU build" in modelinfo.torchStatus(fake_torch((), cuda_build=None, version="2.13.0+cpu"))


# The synthesis process's "ready" report (MRISynthesisLib.worker): what the panel gets instead
# of importing torch itself.
READY = {"event": "ready", "torch": "2.5.1+cu121", "cuda_build": "12.1", "cuda_devices": ["NVIDIA H200", "NVIDIA L4"]}


def test_device_list_and_pytorch_line_from_the_synthesis_process_report():
    gpus = modelinfo.workerDevices(READY)
    assert gpus == ["NVIDIA H200", "NVIDIA L4"]
    assert modelinfo.deviceChoices(gpus) == modelinfo.deviceChoices(READY) == modelinfo.deviceChoices(
        fake_torch(("NVIDIA H200", "NVIDIA L4")))
    assert [d for d, _ in modelinfo.deviceChoices(gpus)] == ["auto", "cuda:0", "cuda:1", "cpu"]
    assert modelinfo.workerTorchStatus(READY) == "PyTorch 2.5.1+cu121: CUDA 12.1 usable (2 GPU)."
    cpu_only = {"torch": "2.13.0+cpu", "cuda_build": None, "cuda_devices": []}
    assert modelinfo.workerDevices(cpu_only) == [] and modelinfo.workerDevices(None) == []
    assert modelinfo.workerTorchStatus(cpu_only) == "PyTorch 2.13.0+cpu (CPU build): runs on the CPU."
    assert "no usable GPU" in modelinfo.workerTorchStatus({"torch": "2.5.1", "cuda_build": "12.1", "cuda_devices": []})


def test_a_saved_gpu_choice_stays_in_the_list():
    """Before the synthesis process has reported, a saved "cuda:1" is listed (the combo would
    otherwise show "automatic" while Apply uses cuda:1); a GPU the report lacks is marked."""
    assert modelinfo.deviceChoices(None, current="cuda:1") == [
        ("auto", "automatic (GPU when usable, else CPU)"), ("cuda:1", "cuda:1 (GPUs not listed yet)"), ("cpu", "CPU")]
    assert modelinfo.deviceChoices(["NVIDIA L4"], current="cuda:1")[2] == ("cuda:1", "cuda:1 (not found)")
    assert modelinfo.deviceChoices(["NVIDIA L4"], current="cuda:0") == modelinfo.deviceChoices(["NVIDIA L4"])
    assert modelinfo.deviceChoices(None, current="cpu") == modelinfo.deviceChoices(None)


def test_pytorch_line_from_metadata_without_importing_torch():
    versions = {"torch": "2.5.1"}
    assert modelinfo.installedTorchStatus(versions.get) == ("PyTorch 2.5.1 installed (the GPUs are listed once the "
                                                            "synthesis process has started).")
    assert modelinfo.installedTorchStatus({}.get) == modelinfo.torchStatus(None)
    old = {"torch": "1.13.1"}.get
    assert "upgraded on the first Apply" in modelinfo.installedTorchStatus(old, isLoaded=lambda name: False)
    assert "restart Slicer" in modelinfo.installedTorchStatus(old, isLoaded=lambda name: name == "torch")


def _method(cls, name):
    tree = ast.parse((MODULE_DIR / "MRISynthesis.py").read_text())
    klass = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    return ast.unparse(next(n for n in klass.body if getattr(n, "name", None) == name))


def test_widget_scene_rules():
    """Statically (Qt cannot run here): no parameter node or pre-fill outside the shown module,
    a run is cancelled on scene close and module cleanup but not on leaving the module (an idle
    worker is ended then, a busy one when its run finishes), the result is shown, outputs are new."""
    setup = _method("MRISynthesisWidget", "setup")
    assert "getParameterNode" not in setup and "initializeParameterNode" not in setup and "NodeAddedEvent" not in setup
    assert "NodeAddedEvent" in _method("MRISynthesisWidget", "enter")
    exit_ = _method("MRISynthesisWidget", "exit")
    assert "_cancelRun" not in exit_ and "NodeAddedEvent" in exit_ and "stopWorker" in exit_
    assert "stopWorker" in _method("MRISynthesisWidget", "_finishRun")
    assert "startWorkerIfInstalled" in _method("MRISynthesisWidget", "enter")
    assert "_cancelRun" in _method("MRISynthesisWidget", "onSceneStartClose")
    assert "_cancelRun" in _method("MRISynthesisWidget", "cleanup") and "worker.kill" in _method(
        "MRISynthesisWidget", "cleanup")
    assert "ApplyRun(" in _method("MRISynthesisWidget", "onApplyButton")
    assert "isEntered" in _method("MRISynthesisWidget", "_prefill")
    assert "isEntered" in _method("MRISynthesisWidget", "onSceneEndClose")
    assert "setSliceViewerLayers" in _method("MRISynthesisWidget", "_finishRun") and "processEvents" not in ast.unparse(
        ast.parse((MODULE_DIR / "MRISynthesis.py").read_text()))
    prepare = _method("MRISynthesisLogic", "prepareFromParameterNode")
    assert "outputNode=p.outputVolume" in prepare
    assert "uncertainty=p.saveUncertainty" in prepare  # the panel's TTA-spread checkbox (issue 19)
    assert "p.outputVolume =" not in ast.unparse(ast.parse((MODULE_DIR / "MRISynthesis.py").read_text()))


def test_brain_mask_choice_reaches_the_scene_logic():
    """The panel's brain-mask combo offers exactly the core's modes, the parameter node holds
    the mode (default "auto"), Apply passes mode, mask node and mask output; outputs are new
    unless picked (the widget never assigns the output selectors)."""
    from MRISynthesisLib.brainmask import BRAIN_MASK_MODES

    fill = _method("MRISynthesisWidget", "_fillBrainMaskComboBox")
    assert [m for m in BRAIN_MASK_MODES if f"'{m}')" in fill] == list(BRAIN_MASK_MODES)  # ast.unparse quotes
    assert "automatic (extract unless skull-stripped)" in fill and "none (non-zero voxels)" in fill
    prepare = _method("MRISynthesisLogic", "prepareFromParameterNode")
    for argument in ("mask=p.maskVolume", "brainMask=p.brainMask", "saveMask=p.saveBrainMask",
                     "maskOutputNode=p.maskOutputVolume if p.saveBrainMask else None"):
        assert argument in prepare, argument
    source = ast.unparse(ast.parse((MODULE_DIR / "MRISynthesis.py").read_text()))
    assert "p.maskOutputVolume =" not in source and "brainMask: Annotated[str, Choice(list(BRAIN_MASK_MODES))] = " \
        "DEFAULT_BRAIN_MASK" in source
    from SlicerMRISynthesisLib.scene import DEFAULT_BRAIN_MASK, brainMaskSummary

    assert DEFAULT_BRAIN_MASK == "auto"
    assert "deepbet" in brainMaskSummary("auto") and "non-zero" in brainMaskSummary("none")

    class Node:
        def GetName(self):
            return "my mask"

    assert brainMaskSummary("none", Node()) == "Brain mask: 'my mask' as given."
