"""Scene-level logic of the MRISynthesis Slicer module, free of Qt.

Needs only an MRML scene and MRML nodes (``slicer.vtkMRMLScene``, ...), numpy, vtk and
MRISynthesisLib, so it runs inside 3D Slicer (GUI, Python console, ``--python-script``)
and under plain Python with the PyPI ``slicer-core`` package, where CI tests it.
Everything about the model and preprocessing is MRISynthesisLib's
(``inference.synthesize``, ``models.resolve_model``); this file only moves volumes between
MRML nodes and MRISynthesisLib ``Volume`` objects, keeping geometry exact.

Importing this file does not import torch: MRISynthesisLib.inference is imported on the
first synthesis, after the module has made sure PyTorch is installed.

    >>> import slicer
    >>> from SlicerMRISynthesisLib.scene import SynthesisSceneLogic
    >>> logic = SynthesisSceneLogic(slicer.mrmlScene)
    >>> flair = logic.synthesize(t1=t1Node, t2=t2Node, precision="bf16")
    >>> result = logic.synthesizeWithDetails(t1=t1Node, brainMask="auto", saveMask=True)
    >>> result.output, result.maskOutput, result.maskDecision.description

The brain mask follows MRISynthesisLib.brainmask (the one home of that policy): "auto"
(extract with deepbet unless the T1 is already skull-stripped), "none" (the inputs' non-zero
voxels) or a mask volume node ("given"). The extraction runs inside ``compute``, i.e. in the
worker thread, never on the GUI thread.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple

import numpy as np
import vtk
from vtk.util import numpy_support

from MRISynthesisLib import provenance
from MRISynthesisLib.brainmask import BRAIN_MASK_MODES, BrainMaskDecision
from MRISynthesisLib.errors import BundleError, InputError
from MRISynthesisLib.subjects import subject_files
from MRISynthesisLib.volumes import Volume

from .modelinfo import MODALITY_LABELS, readBundleHeader, readBundleMetadata

log = logging.getLogger("MRISynthesis")

INPUT_MODALITIES = ("t1", "t2", "t1c")
DEVICES = ("auto", "cpu", "cuda")  # and "cuda:N" for the N-th GPU
# Mirrors MRISynthesisLib.inference.PRECISIONS (not imported: that module imports torch).
PRECISIONS = ("auto", "fp32", "bf16")
DEFAULT_PRECISION = "auto"

# The brain-mask choices besides a mask volume node ("given"); the policy itself is
# MRISynthesisLib.brainmask's. "auto" (extract unless skull-stripped) is the default.
DEFAULT_BRAIN_MASK = "auto"

MODEL_AUTOMATIC = "automatic"
MODEL_FILE = "bundle file"
# The paper models, then the pix2pix baseline (selectable by name, never the automatic choice).
SHIPPED_MODEL_NAMES = ("t1_to_flair", "t1_t2_to_flair", "t1_t2_t1c_to_flair", "pix2pix_t1_t2_to_flair")
MODEL_CHOICES = (MODEL_AUTOMATIC, *SHIPPED_MODEL_NAMES, MODEL_FILE)

# Volume-name words that say which contrast a volume is. Checked in this order so that
# "T2-FLAIR" is FLAIR (never an input) and "T1 post" is T1c, not T1.
NAME_KEYWORDS = (
    ("flair", ("flair", "t2f", "t2flair")),
    ("t1c", ("t1c", "t1ce", "t1gd", "t1post", "post", "gd")),
    ("t2", ("t2", "t2w")),
    ("t1", ("t1", "t1n", "t1w")),
)


# ----------------------------------------------------------------------------- names


def guessModality(name: Optional[str]) -> Optional[str]:
    """The contrast a volume name denotes ("t1", "t2", "t1c", "flair") or None.

    Whole words only: "BraTS-GLI-00001-000-t1n" is T1, "T2-FLAIR" is FLAIR, "MRHead" is None.
    """
    if not name:
        return None
    words = set(re.split(r"[^a-z0-9]+", name.lower()))
    for modality, keywords in NAME_KEYWORDS:
        if words.intersection(keywords):
            return modality
    return None


def assignInputsByName(nodes: Iterable, current: Optional[Dict[str, object]] = None) -> Dict[str, object]:
    """Inputs pre-filled from volume names: {modality: node} for the modalities that are not
    already set in ``current``; the first matching node wins. FLAIR volumes are never inputs."""
    current = dict(current or {})
    assigned = {}
    for node in nodes:
        if node is None or node.IsA("vtkMRMLLabelMapVolumeNode"):
            continue
        modality = guessModality(node.GetName())
        if modality in INPUT_MODALITIES and current.get(modality) is None and modality not in assigned:
            assigned[modality] = node
    return assigned


def prefillInputs(nodes: Iterable, current: Dict[str, object], decided: Iterable[str]):
    """Pre-fill by name only the selectors nobody has decided yet.

    ``decided``: modalities whose selector was already set once (by the user or a pre-fill):
    they are left alone, so a selector the user set back to "None" stays None. Returns
    ({modality: node} to assign, the new set of decided modalities).
    """
    decided = set(decided) | {m for m, node in current.items() if node is not None}
    assigned = {m: n for m, n in assignInputsByName(nodes).items() if m not in decided}
    return assigned, decided | set(assigned)


def outputName(referenceNode) -> str:
    return f"{referenceNode.GetName()} synthetic FLAIR"


def maskOutputName(referenceNode) -> str:
    return f"{referenceNode.GetName()} brain mask"


def uncertaintyOutputName(referenceNode) -> str:
    return f"{referenceNode.GetName()} synthetic FLAIR TTA spread"


def markNode(node, record: Optional[dict]) -> None:
    """Say on a volume node that it is synthetic and how it was made: the provenance keys of
    MRISynthesisLib.provenance.header_keys as node attributes (``MRISynthesis.*``), and a NRRD
    storage node unless it has a storage node already: Slicer's NRRD storage node writes every
    node attribute into the NRRD header (and reads them back), so File > Save keeps the marks
    (Slicer's default volume writer would drop them). ``provenance.record_from_header_keys``
    reads them back from the node or the saved header."""
    if record is None:
        return
    wasModifying = node.StartModify()
    for key, value in provenance.header_keys(record).items():
        node.SetAttribute(key, value)
    node.EndModify(wasModifying)
    scene = node.GetScene()
    if node.GetStorageNode() is None and scene is not None:
        storage = scene.AddNewNodeByClass("vtkMRMLNRRDStorageNode")
        storage.SetUseCompression(True)
        node.SetAndObserveStorageNodeID(storage.GetID())


def nodeRecord(node) -> Optional[dict]:
    """The provenance record a node carries (None for an acquired volume)."""
    return provenance.record_from_header_keys({name: node.GetAttribute(name) for name in node.GetAttributeNames()})


def nodeSourceFile(node) -> Optional[str]:
    """The file a node's voxels were read from, if it still holds exactly them (the record then
    names the file and its SHA-256 besides the voxels' digest)."""
    storage = node.GetStorageNode() if node is not None else None
    if storage is None or node.GetModifiedSinceRead():
        return None
    name = storage.GetFileName()
    return name if name and os.path.isfile(name) else None


# ----------------------------------------------------------------------------- models


def readBundleSources(path) -> Tuple[str, ...]:
    """The source modalities of a bundle file, read from its header only (no torch)."""
    return tuple(readBundleMetadata(path)["sources"])


@dataclass
class PanelState:
    """What the panel shows for the current selection and whether Apply is possible."""

    canApply: bool
    message: str
    sources: Tuple[str, ...] = ()  # inputs the model takes, in the model's order
    model: Optional[str] = None  # shipped name or file path to pass to synthesize
    unused: Tuple[str, ...] = field(default=())  # selected inputs the model will not use


def panelState(modelChoice: str, modelFile: Optional[str], given: Iterable[str],
               shipped: Optional[Dict[str, object]] = None) -> PanelState:
    """Decide, for the chosen model and the selected inputs, what is missing.

    ``given``: modalities with a selected volume. ``shipped``: {name: path} of installed
    bundles (MRISynthesisLib.models.shipped_bundles()).
    """
    given = [m for m in INPUT_MODALITIES if m in set(given)]
    shipped = shipped or {}
    label = lambda ms: " + ".join(MODALITY_LABELS[m] for m in ms)  # noqa: E731
    if modelChoice == MODEL_AUTOMATIC:
        if "t1" not in given:
            return PanelState(False, "Select a T1 volume (every model needs T1).")
        name = "_".join(given) + "_to_flair"
        if name not in shipped:
            return PanelState(False, f"No installed model takes exactly {label(given)}; "
                                     f"installed: {', '.join(sorted(shipped)) or 'none'}. "
                                     "Choose a model or a bundle file.")
        return PanelState(True, f"Ready: {label(given)} -> FLAIR with model {name}.", tuple(given), name)
    if modelChoice == MODEL_FILE:
        if not modelFile or not os.path.isfile(str(modelFile)):
            return PanelState(False, "Choose a model bundle file (.safetensors).")
        try:
            sources = readBundleSources(modelFile)
        except BundleError as exc:
            return PanelState(False, str(exc))
        model = str(modelFile)
    elif modelChoice in SHIPPED_MODEL_NAMES:
        if modelChoice not in shipped:
            return PanelState(False, f"Model {modelChoice} is not installed "
                                     f"(installed: {', '.join(sorted(shipped)) or 'none'}).")
        try:
            sources = readBundleSources(shipped[modelChoice])
        except BundleError as exc:
            return PanelState(False, str(exc))
        model = modelChoice
    else:
        return PanelState(False, f"Unknown model choice {modelChoice!r}.")
    missing = [m for m in sources if m not in given]
    unused = tuple(m for m in given if m not in sources)
    if missing:
        return PanelState(False, f"The model needs {label(sources)}; select {label(missing)}.",
                          tuple(sources), model, unused)
    note = f" ({label(unused)} selected but not used by this model.)" if unused else ""
    return PanelState(True, f"Ready: {label(sources)} -> FLAIR.{note}", tuple(sources), model, unused)


def brainMaskSummary(brainMask: str, maskNode=None) -> str:
    """One sentence for the status line: which brain mask the next Apply will use."""
    if maskNode is not None:
        return f"Brain mask: '{maskNode.GetName()}' as given."
    if brainMask == "none":
        return "Brain mask: none (the non-zero voxels of the inputs)."
    return "Brain mask: automatic (T1's non-zero voxels if skull-stripped, else extracted with deepbet)."


# ----------------------------------------------------------------------------- geometry


def arrayFromVTKMatrix(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(i, j) for j in range(4)] for i in range(4)], dtype=np.float64)


def vtkMatrixFromArray(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for i in range(4):
        for j in range(4):
            matrix.SetElement(i, j, float(array[i, j]))
    return matrix


def ijkToRAS(node) -> np.ndarray:
    """The node's own IJK-to-RAS matrix (parent transforms not applied)."""
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return arrayFromVTKMatrix(matrix)


def worldIJKToRAS(node, name: str = "volume") -> np.ndarray:
    """IJK-to-world matrix: the node's IJK-to-RAS with any parent transform hardened in
    (computed; the node is not modified). Non-linear transforms cannot be, and are refused."""
    affine = ijkToRAS(node)
    parent = node.GetParentTransformNode()
    if parent is None:
        return affine
    if not parent.IsTransformToWorldLinear():
        raise InputError(f"{name}: volume '{node.GetName()}' is under a non-linear transform "
                         f"('{parent.GetName()}'); harden it in the Transforms module first")
    toWorld = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(toWorld)
    return arrayFromVTKMatrix(toWorld) @ affine


def volumeFromNode(node, name: str = "volume") -> Volume:
    """A copy of a scalar volume node as an MRISynthesisLib Volume: array (I, J, K) float32 and
    the IJK-to-world affine. Refuses non-scalar, empty and 2D volumes by name."""
    if node is None:
        raise InputError(f"{name}: no volume given")
    if not node.IsA("vtkMRMLScalarVolumeNode"):
        raise InputError(f"{name}: '{node.GetName()}' is a {node.GetClassName()}; a scalar volume is needed")
    image = node.GetImageData()
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        raise InputError(f"{name}: volume '{node.GetName()}' is empty (it has no voxel data)")
    dims = image.GetDimensions()
    if min(dims) < 1 or image.GetNumberOfPoints() == 0:
        raise InputError(f"{name}: volume '{node.GetName()}' is empty (dimensions {dims[0]}x{dims[1]}x{dims[2]})")
    if image.GetNumberOfScalarComponents() != 1:
        raise InputError(f"{name}: volume '{node.GetName()}' has {image.GetNumberOfScalarComponents()} "
                         "components per voxel; a scalar volume is needed")
    if min(dims) < 2:
        raise InputError(f"{name}: volume '{node.GetName()}' is a 2D image (dimensions "
                         f"{dims[0]}x{dims[1]}x{dims[2]}); a 3D volume is needed")
    flat = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    # VTK stores x fastest: reshape to (K, J, I), then transpose to (I, J, K); copy so the
    # Volume never aliases the node's memory.
    array = np.array(flat.reshape(dims[2], dims[1], dims[0]).transpose(2, 1, 0), dtype=np.float32, copy=True)
    return Volume(array, worldIJKToRAS(node, name))


VTK_TYPES = {np.dtype(np.float32): vtk.VTK_FLOAT, np.dtype(np.uint8): vtk.VTK_UNSIGNED_CHAR}


def updateNodeFromArray(node, array: np.ndarray, affine: np.ndarray, dtype=np.float32) -> None:
    """Set a scalar volume node's voxels from an (I, J, K) array and its IJK-to-RAS matrix;
    voxels stored as ``dtype`` (float32, or uint8 for label maps)."""
    dtype = np.dtype(dtype)
    array = np.asarray(array, dtype=dtype)
    if array.ndim != 3:
        raise ValueError(f"expected a 3D array, got shape {array.shape}")
    image = vtk.vtkImageData()
    image.SetDimensions(*array.shape)
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(array.transpose(2, 1, 0)).ravel(), deep=True,
                                         array_type=VTK_TYPES[dtype])
    scalars.SetName("ImageScalars")
    image.GetPointData().SetScalars(scalars)
    wasModifying = node.StartModify()
    node.SetIJKToRASMatrix(vtkMatrixFromArray(affine))
    node.SetAndObserveImageData(image)
    node.EndModify(wasModifying)


def addVolumeNode(scene, volume: Volume, name: str):
    """A new scalar volume node (with display node) holding ``volume``."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    updateNodeFromArray(node, volume.array, volume.affine)
    node.CreateDefaultDisplayNodes()
    return node


# ----------------------------------------------------------------------------- files


def loadVolumeNode(scene, path, name: Optional[str] = None):
    """Read a volume file (NRRD, NIfTI, ...) into a new scalar volume node with its own storage
    node (the same reader Slicer's Add Data uses). Raises InputError naming the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"file not found: {path}")
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name or _stem(path))
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(path)
    storage.SetSingleFile(True)
    node.SetAndObserveStorageNodeID(storage.GetID())
    if not storage.ReadData(node) or node.GetImageData() is None:
        scene.RemoveNode(node)
        scene.RemoveNode(storage)
        raise InputError(f"cannot read volume file {path}")
    return node


def saveVolumeNode(node, path) -> None:
    """Write a volume node with a storage node (format from the extension); raises OSError."""
    path = os.fspath(path)
    scene = node.GetScene()
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    try:
        storage.SetFileName(path)
        storage.SetUseCompression(True)
        if not storage.WriteData(node):
            raise OSError(f"cannot write {path}")
    finally:
        scene.RemoveNode(storage)


def _stem(path: str) -> str:
    base = os.path.basename(path)
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".gz"):
        if base.lower().endswith(suffix):
            return base[: -len(suffix)]
    return os.path.splitext(base)[0]


# ----------------------------------------------------------------------------- synthesis


def _defaultResolveModel(model, sources):
    from MRISynthesisLib.models import resolve_model  # torch-free

    return resolve_model(model, sources)


def _cudaAvailable() -> bool:
    import torch

    return torch.cuda.is_available()


def readBundleDigest(path) -> Optional[str]:
    """The SHA-256 a bundle's header states (torch-free; None if unreadable)."""
    try:
        return readBundleHeader(path)["__metadata__"].get("sha256")
    except Exception:
        return None


class GeneratorCache:
    """The network of the last bundle used, built once and reused while the bundle (path and
    digest) and the device and precision stay the same: a second Apply skips loading and
    building. Holds one network (GPU memory)."""

    def __init__(self):
        self._key = None
        self._value = None
        self.builds = 0  # how many networks were built (tests, logs)

    def get(self, bundlePath, torchDevice: str, precision: str):
        """(ModelBundle, generator) for the bundle on ``torchDevice`` ("cpu", "cuda:0")."""
        from MRISynthesisLib.bundle import load_bundle  # imports torch

        key = (os.path.realpath(os.fspath(bundlePath)), readBundleDigest(bundlePath), torchDevice, precision)
        if key != self._key:
            self._key = self._value = None  # free the old network before building the new one
            bundle = load_bundle(bundlePath)
            self._value = (bundle, bundle.build_generator(torchDevice))
            self._key = key
            self.builds += 1
        return self._value

    def clear(self) -> None:
        self._key = self._value = None


@dataclass
class SynthesisRequest:
    """What one synthesis needs, read from the scene on the main thread. The voxels are
    copies, so ``SynthesisSceneLogic.compute`` can run in a worker thread without MRML."""

    volumes: Dict[str, Volume]
    mask: object  # the brain-mask spec for MRISynthesisLib: "auto", "none" or a given mask Volume
    bundlePath: str
    device: str
    precision: str
    batchSize: int
    referenceNode: object  # T1: the output takes its grid and parent transform
    outputNode: object = None  # None: a new node "<T1 name> synthetic FLAIR"
    inputNodes: Tuple = ()  # every node the result depends on
    saveMask: bool = False  # also put the brain mask used into a label map
    maskOutputNode: object = None  # None (with saveMask): a new label map "<T1 name> brain mask"
    uncertainty: bool = False  # also the test-time-augmentation spread, as a new volume
    sourceFiles: Dict[str, str] = field(default_factory=dict)  # {modality or "mask": file the node was read from}

    @property
    def sceneNodes(self) -> Tuple:
        """Nodes whose removal makes the result obsolete (inputs, mask, chosen outputs)."""
        return tuple(n for n in (*self.inputNodes, self.outputNode, self.maskOutputNode) if n is not None)


@dataclass
class SceneResult:
    """What one synthesis put into the scene: the FLAIR node, the brain-mask label map (None
    unless asked for) and how the mask was chosen (``maskDecision.description``: one line)."""

    output: object
    maskOutput: object
    maskDecision: BrainMaskDecision
    uncertaintyOutput: object = None  # the test-time-augmentation spread, when asked for
    provenance: Optional[dict] = None  # how it was made: also on each node as MRISynthesis.* attributes


class SynthesisSceneLogic:
    """Synthesises FLAIR from volume nodes of a scene; everything the module, the console and
    the batch script do goes through ``prepare`` (main thread: read and check the nodes),
    ``compute`` (any thread: no MRML) and ``store`` (main thread: write the result), which
    ``synthesize`` runs in a row.

    Dependencies are injected for testing and reuse: ``synthesizeFunction`` (default
    MRISynthesisLib.inference.synthesize with the network from ``generatorCache``),
    ``resolveModel`` (default MRISynthesisLib.models.resolve_model) and ``cudaAvailable``.
    """

    def __init__(self, scene=None, synthesizeFunction: Optional[Callable] = None,
                 resolveModel: Optional[Callable] = None, cudaAvailable: Optional[Callable[[], bool]] = None,
                 logger: Optional[logging.Logger] = None):
        self.scene = scene
        self._synthesize = synthesizeFunction
        self._resolveModel = resolveModel or _defaultResolveModel
        self._cudaAvailable = cudaAvailable or _cudaAvailable
        self.log = logger or log
        self.generatorCache = GeneratorCache()

    def resolveDevice(self, device: str) -> str:
        """"cuda" (or "cuda:N") without a usable GPU falls back to "cpu" with a warning."""
        if device not in DEVICES and not re.fullmatch(r"cuda:\d+", str(device)):
            raise InputError(f"unknown device {device!r}; expected one of {', '.join(DEVICES)} or cuda:N")
        if device.startswith("cuda") and not self._cudaAvailable():
            self.log.warning("CUDA was requested but PyTorch sees no CUDA GPU; running on the CPU instead")
            return "cpu"
        return device

    def synthesize(self, t1=None, t2=None, t1c=None, mask=None, model: Optional[str] = None,
                   device: str = "auto", precision: str = DEFAULT_PRECISION, outputNode=None,
                   progressCallback: Optional[Callable[[int, int], None]] = None,
                   cancel: Optional[Callable[[], bool]] = None, batchSize: int = 4,
                   brainMask: str = DEFAULT_BRAIN_MASK, saveMask: bool = False, maskOutputNode=None):
        """Synthesise FLAIR on the T1 volume's grid; blocks until done and returns the output node.

        t1, t2, t1c, mask: vtkMRMLScalarVolumeNode (or None). model: a shipped model name
        ("t1_t2_to_flair", ...) or a bundle file; None picks the shipped model that takes
        exactly the given inputs. The output gets exactly T1's IJK-to-RAS matrix and parent
        transform and is a new node named "<T1 name> synthetic FLAIR" unless the caller gives
        ``outputNode`` (which keeps its name unless it is still empty). Inputs on other grids
        or under other parent transforms are resampled onto T1 in physical space (logged). On
        any error or cancellation (``cancel()`` returning True) the scene is left as it was
        and no input node is modified. ``progressCallback(done, total)`` counts slices.
        Brain mask: a ``mask`` node is used as given; otherwise ``brainMask`` "auto" (extract
        unless the T1 is skull-stripped) or "none" (the non-zero voxels). ``saveMask`` or a
        ``maskOutputNode`` (vtkMRMLLabelMapVolumeNode) also stores the mask used; see
        ``synthesizeWithDetails`` to get that node and the decision.
        """
        return self.synthesizeWithDetails(t1=t1, t2=t2, t1c=t1c, mask=mask, model=model, device=device,
                                          precision=precision, outputNode=outputNode,
                                          progressCallback=progressCallback, cancel=cancel, batchSize=batchSize,
                                          brainMask=brainMask, saveMask=saveMask,
                                          maskOutputNode=maskOutputNode).output

    def synthesizeWithDetails(self, progressCallback=None, cancel=None, **kwargs) -> SceneResult:
        """``synthesize`` returning the SceneResult (FLAIR node, mask label map, mask decision)."""
        request = self.prepare(**kwargs)
        result = self.compute(request, progressCallback, cancel)
        return self.store(request, result)

    def prepare(self, t1=None, t2=None, t1c=None, mask=None, model: Optional[str] = None, device: str = "auto",
                precision: str = DEFAULT_PRECISION, outputNode=None, batchSize: int = 4,
                brainMask: str = DEFAULT_BRAIN_MASK, saveMask: bool = False,
                maskOutputNode=None, uncertainty: bool = False) -> SynthesisRequest:
        """Check the nodes and copy their voxels (main thread). Raises InputError/BundleError."""
        nodes = {"t1": t1, "t2": t2, "t1c": t1c}
        given = {m: n for m, n in nodes.items() if n is not None}
        if t1 is None:
            raise InputError("t1: a T1 volume is required (the output is made on its grid)")
        if precision not in PRECISIONS:
            raise InputError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
        if mask is None and brainMask not in BRAIN_MASK_MODES:
            raise InputError(f"unknown brain mask choice {brainMask!r}; expected {' or '.join(BRAIN_MASK_MODES)} "
                             "or a mask volume")
        inputs = (*given.values(), mask)
        if outputNode is not None and any(outputNode is n for n in inputs):
            raise InputError("the output volume must not be one of the inputs (inputs are never overwritten)")
        if outputNode is not None and not outputNode.IsA("vtkMRMLScalarVolumeNode"):
            raise InputError(f"output: '{outputNode.GetName()}' is a {outputNode.GetClassName()}, not a scalar volume")
        if maskOutputNode is not None:
            if any(maskOutputNode is n for n in (*inputs, outputNode)):
                raise InputError("the brain-mask output must not be an input or the FLAIR output "
                                 "(nothing is overwritten by accident)")
            if not maskOutputNode.IsA("vtkMRMLLabelMapVolumeNode"):
                raise InputError(f"brain-mask output: '{maskOutputNode.GetName()}' is a "
                                 f"{maskOutputNode.GetClassName()}, not a label map volume")

        volumes = {m: volumeFromNode(n, m) for m, n in given.items()}
        maskSpec = volumeFromNode(mask, "mask") if mask is not None else brainMask
        reference = volumes["t1"]
        for m, vol in volumes.items():
            if m != "t1" and not vol.same_grid(reference):
                self.log.info("%s ('%s') is on another grid than T1 ('%s') (shape %s vs %s, or a different "
                              "position/orientation/transform); resampling it onto T1 in physical space",
                              MODALITY_LABELS[m], given[m].GetName(), t1.GetName(), vol.shape, reference.shape)
        bundlePath = self._resolveModel(model, list(given))
        device = self.resolveDevice(device)
        self.log.info("Synthesising FLAIR from %s with %s on %s (%s); brain mask: %s",
                      " + ".join(MODALITY_LABELS[m] for m in given), bundlePath, device, precision,
                      f"given ('{mask.GetName()}')" if mask is not None else brainMask)
        sourceFiles = {m: nodeSourceFile(n) for m, n in (*given.items(), ("mask", mask))}
        return SynthesisRequest(volumes, maskSpec, str(bundlePath), device, precision, batchSize, t1, outputNode,
                                tuple(n for n in inputs if n is not None),
                                saveMask=bool(saveMask or maskOutputNode is not None), maskOutputNode=maskOutputNode,
                                uncertainty=bool(uncertainty),
                                sourceFiles={m: f for m, f in sourceFiles.items() if f is not None})

    def compute(self, request: SynthesisRequest, progressCallback=None, cancel=None):
        """Decide the brain mask (extraction included) and run the network (any thread;
        touches no MRML node). Returns MRISynthesisLib.inference.SynthesisResult. Raises
        Cancelled when ``cancel()``, InputError (one line) for an empty or non-brain mask."""
        reference = request.volumes["t1"]
        kwargs = dict(mask=request.mask, reference="t1", precision=request.precision, batch_size=request.batchSize,
                      progress=progressCallback, cancel=cancel)
        if request.uncertainty:
            kwargs["uncertainty"] = True
        if self._synthesize is not None:
            result = self._synthesize(request.volumes, request.bundlePath, device=request.device, **kwargs)
        else:
            result = self._computeWithCachedGenerator(request, kwargs)
        if tuple(result.volume.shape) != tuple(reference.shape):
            raise RuntimeError(f"synthesis returned shape {result.volume.shape}, expected T1's {reference.shape}")
        self.log.info("%s", result.mask_decision.description)
        return result

    def _computeWithCachedGenerator(self, request: SynthesisRequest, kwargs):
        from MRISynthesisLib.inference import device_choice, synthesize_with_details

        torchDevice, coreDevice, deviceContext = device_choice(request.device)
        bundle, generator = self.generatorCache.get(request.bundlePath, torchDevice, request.precision)
        with deviceContext:
            return synthesize_with_details(request.volumes, bundle, device=coreDevice, generator=generator, **kwargs)

    def store(self, request: SynthesisRequest, result) -> SceneResult:
        """Put the result into the scene (main thread), only now that synthesis succeeded:
        the FLAIR and, when asked for, the brain mask used as a label map (1 = brain) and the
        test-time-augmentation spread, each marked with its provenance (``markNode``: the
        record names the input files the nodes were read from). If storing a second volume
        fails, the nodes created here are removed again."""
        scene = self.scene or request.referenceNode.GetScene()
        record = getattr(result, "provenance", None)
        if record is not None and request.sourceFiles:
            record = provenance.attach_source_files(record, request.sourceFiles)
        created = []
        try:
            output = self._storeVolume(scene, result.volume.array, request.referenceNode, request.outputNode,
                                       "vtkMRMLScalarVolumeNode", outputName(request.referenceNode), np.float32)
            if request.outputNode is None:
                created.append(output)
            markNode(output, record)
            maskOutput = None
            if request.saveMask:
                maskOutput = self._storeVolume(scene, result.brain_mask.array > 0, request.referenceNode,
                                               request.maskOutputNode, "vtkMRMLLabelMapVolumeNode",
                                               maskOutputName(request.referenceNode), np.uint8)
                if request.maskOutputNode is None:
                    created.append(maskOutput)
                markNode(maskOutput, record and provenance.record_for_kind(record, provenance.KIND_MASK))
            uncertaintyOutput = None
            spread = getattr(result, "uncertainty", None)
            if request.uncertainty and spread is not None:
                uncertaintyOutput = self._storeVolume(scene, spread.array, request.referenceNode, None,
                                                      "vtkMRMLScalarVolumeNode",
                                                      uncertaintyOutputName(request.referenceNode), np.float32)
                created.append(uncertaintyOutput)
                markNode(uncertaintyOutput, record and provenance.record_for_kind(record, provenance.KIND_UNCERTAINTY))
        except Exception:
            for node in created:
                storage = node.GetStorageNode()
                scene.RemoveNode(node)
                if storage is not None:
                    scene.RemoveNode(storage)
            raise
        return SceneResult(output, maskOutput, result.mask_decision, uncertaintyOutput, record)

    @staticmethod
    def _storeVolume(scene, array: np.ndarray, referenceNode, node, className: str, name: str, dtype):
        """Write ``array`` on the reference grid into ``node``, or a new node of ``className``."""
        created = node is None
        try:
            if created:
                node = scene.AddNewNodeByClass(className, name)
            elif node.GetImageData() is None:
                node.SetName(name)
            # Exactly the reference's own matrix and parent transform: the output overlays T1.
            updateNodeFromArray(node, array, ijkToRAS(referenceNode), dtype)
            node.SetAndObserveTransformNodeID(referenceNode.GetTransformNodeID())
            if node.GetDisplayNode() is None:
                node.CreateDefaultDisplayNodes()
        except Exception:
            if created and node is not None:
                scene.RemoveNode(node)
            raise
        return node


def inputsFromFolder(folder, modalities: Sequence[str] = (*INPUT_MODALITIES, "mask")) -> Dict[str, str]:
    """{modality: path} of a subject folder's volume files, by MRISynthesisLib.subjects' naming
    rule (t1.nii.gz, BraTS-...-t1n.nii.gz, ..._t2.nrrd; "mask" for mask/brainmask files)."""
    return {m: p for m, p in subject_files(folder).items() if m in modalities}
