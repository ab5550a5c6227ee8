"""The Slicer module's scene logic against real MRML (PyPI slicer-core: real vtkMRMLScene,
volume and storage nodes; no Qt). Small generated volumes and tiny random bundles."""

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from vtk.util import numpy_support

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "MRISynthesis"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

slicer = pytest.importorskip("slicer", reason="the PyPI slicer-core package is needed (pip install slicer-core)")

from slicer_testdata import brain_like  # noqa: E402

from MRISynthesisLib.bundle import bundle_from_generator, save_bundle  # noqa: E402
from MRISynthesisLib.errors import BundleError, Cancelled, InputError  # noqa: E402
from MRISynthesisLib.inference import synthesize as core_synthesize, synthesize_with_details  # noqa: E402
from MRISynthesisLib.networks import ModelConfig, build_generator, init_weights  # noqa: E402
from MRISynthesisLib.volumes import Volume  # noqa: E402
from SlicerMRISynthesisLib.scene import (  # noqa: E402
    MODEL_AUTOMATIC, MODEL_FILE, SynthesisSceneLogic, assignInputsByName, guessModality, ijkToRAS,
    inputsFromFolder, loadVolumeNode, panelState, readBundleSources, saveVolumeNode, updateNodeFromArray,
    volumeFromNode, worldIJKToRAS,
)

# Oblique (30 degrees about S), axes permuted (I runs along A), anisotropic spacing,
# right-handed (Slicer's file reader reorders left-handed grids; see the round-trip test).
_c, _s = np.cos(np.radians(30)), np.sin(np.radians(30))
OBLIQUE = np.array([
    [-1.2 * _s, -0.9 * _c, 0.0, 12.5],
    [1.2 * _c, -0.9 * _s, 0.0, -20.0],
    [0.0, 0.0, 2.5, 4.0],
    [0.0, 0.0, 0.0, 1.0],
])
SHAPE = (24, 20, 7)


def make_bundle(path, sources, seed=0):
    torch.manual_seed(seed)
    config = ModelConfig(num_sources=len(sources), base_width=4)
    save_bundle(bundle_from_generator(init_weights(build_generator(config)), config, sources), path)
    return str(path)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bundles")
    return {
        "t1": make_bundle(folder / "t1_to_flair.safetensors", ("t1",)),
        "t1t2": make_bundle(folder / "t1_t2_to_flair.safetensors", ("t1", "t2")),
    }


def brain(shape, seed):
    """A small skull-stripped "brain": noisy tissue in an ellipsoid (round, with contrast), zero
    outside, so the default brain mask "auto" finds it already stripped (= mode "none")."""
    return brain_like(shape, seed)


def add_volume(scene, name, array, affine):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    updateNodeFromArray(node, array, affine)
    return node


def add_linear_transform(scene, matrix):
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    import vtk

    m = vtk.vtkMatrix4x4()
    for i in range(4):
        for j in range(4):
            m.SetElement(i, j, matrix[i, j])
    node.SetMatrixTransformToParent(m)
    return node


def scene_snapshot(scene):
    """IDs of all nodes plus, for volumes, name, matrix, transform and a copy of the voxels."""
    snap = []
    for i in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(i)
        entry = [node.GetID(), node.GetName()]
        if node.IsA("vtkMRMLScalarVolumeNode"):
            image = node.GetImageData()
            voxels = None
            if image is not None and image.GetPointData().GetScalars() is not None:
                voxels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).tobytes()
            entry += [ijkToRAS(node).tobytes(), node.GetTransformNodeID(), voxels,
                      None if image is None else image.GetDimensions()]
        snap.append(tuple(entry))
    return snap


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


@pytest.fixture
def pair(scene):
    t1 = add_volume(scene, "case t1n", brain(SHAPE, 0), OBLIQUE)
    t2 = add_volume(scene, "case t2w", brain(SHAPE, 1), OBLIQUE)
    return t1, t2


# ----------------------------------------------------------------------------- geometry


def test_volume_round_trip_keeps_ijk_order_and_geometry(scene):
    array = brain(SHAPE, 3)
    array[1, 2, 3] = 7.0  # an asymmetric marker: any axis swap would move it
    node = add_volume(scene, "v", array, OBLIQUE)
    vol = volumeFromNode(node)
    assert vol.array.shape == SHAPE and vol.array.dtype == np.float32
    assert vol.array[1, 2, 3] == 7.0
    np.testing.assert_array_equal(vol.array, array)
    np.testing.assert_allclose(vol.affine, OBLIQUE, atol=1e-12)
    np.testing.assert_allclose(node.GetSpacing(), [1.2, 0.9, 2.5], atol=1e-12)
    # Slicer's own accessor agrees on the voxel order: arrayFromVolume is (K, J, I).
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), array.transpose(2, 1, 0))
    vol.array[:] = 0  # the Volume is a copy: the node keeps its voxels
    assert slicer.util.arrayFromVolume(node)[3, 2, 1] == 7.0


def test_output_has_exactly_t1_geometry_and_matches_core(scene, pair, bundles):
    t1, t2 = pair
    before = scene_snapshot(scene)
    out = SynthesisSceneLogic(scene).synthesize(t1=t1, t2=t2, model=bundles["t1t2"], device="cpu")
    assert out.GetName() == "case t1n synthetic FLAIR"
    assert np.array_equal(ijkToRAS(out), ijkToRAS(t1))  # exactly, not approximately
    assert out.GetImageData().GetDimensions() == SHAPE
    assert out.GetImageData().GetScalarTypeAsString() == "float"
    assert out.GetDisplayNode() is not None
    # Inputs untouched; exactly one volume (plus its display node) added.
    assert scene_snapshot(scene)[: len(before)] == before
    result = volumeFromNode(out).array
    expected = core_synthesize({"t1": Volume(brain(SHAPE, 0), OBLIQUE), "t2": Volume(brain(SHAPE, 1), OBLIQUE)},
                               bundles["t1t2"], mask="none", device="cpu").array  # "auto" on a stripped T1 = "none"
    np.testing.assert_allclose(result, expected, atol=1e-4)
    assert 0.0 <= result.min() and result.max() <= 1000.0
    assert np.all(result[0] == 0) and result[5:-5, 5:-5, 2:-2].min() > 0  # background 0, brain filled


def test_input_on_other_grid_is_resampled_onto_t1(scene, bundles, caplog):
    t1_array = brain(SHAPE, 0)
    t1 = add_volume(scene, "t1", t1_array, OBLIQUE)
    # T2 covers the same head with half the voxels along I and J, axes in RAS order.
    t2_affine = np.eye(4)
    t2_affine[:3, :3] = np.diag([2.0, 2.0, 2.5])
    t2_affine[:3, 3] = OBLIQUE[:3, 3] + [-25.0, -5.0, 0.0]
    t2 = add_volume(scene, "t2", brain((20, 20, 7), 1), t2_affine)
    # The module logs it with the node names; the core it calls warns as well.
    with caplog.at_level(logging.INFO, logger="MRISynthesis"), pytest.warns(UserWarning, match="t2 is on a different"):
        out = SynthesisSceneLogic(scene).synthesize(t1=t1, t2=t2, model=bundles["t1t2"], device="cpu")
    assert any("resampling it onto T1" in r.getMessage() for r in caplog.records)
    assert np.array_equal(ijkToRAS(out), OBLIQUE)
    with pytest.warns(UserWarning, match="t2 is on a different grid than t1"):
        expected = core_synthesize({"t1": Volume(t1_array, OBLIQUE), "t2": Volume(brain((20, 20, 7), 1), t2_affine)},
                                   bundles["t1t2"], mask="none", device="cpu").array
    np.testing.assert_allclose(volumeFromNode(out).array, expected, atol=1e-4)


def test_parent_transform_is_hardened_for_computation_only(scene, pair, bundles):
    t1, t2_plain = pair
    plain = volumeFromNode(SynthesisSceneLogic(scene).synthesize(t1=t1, t2=t2_plain, model=bundles["t1t2"],
                                                                 device="cpu")).array
    # The same T2 stored 10 mm off, brought back by a parent transform: same world grid.
    shifted = OBLIQUE.copy()
    shifted[0, 3] -= 10.0
    t2 = add_volume(scene, "t2 moved", brain(SHAPE, 1), shifted)
    move = np.eye(4)
    move[0, 3] = 10.0
    transform = add_linear_transform(scene, move)
    t2.SetAndObserveTransformNodeID(transform.GetID())
    np.testing.assert_allclose(worldIJKToRAS(t2), OBLIQUE, atol=1e-12)
    out = SynthesisSceneLogic(scene).synthesize(t1=t1, t2=t2, model=bundles["t1t2"], device="cpu")
    np.testing.assert_allclose(volumeFromNode(out).array, plain, atol=1e-4)
    assert np.array_equal(ijkToRAS(t2), shifted)  # input not hardened
    assert t2.GetTransformNodeID() == transform.GetID()


def test_t1_under_transform_output_follows_it(scene, bundles):
    t1 = add_volume(scene, "t1", brain(SHAPE, 0), OBLIQUE)
    move = np.eye(4)
    move[:3, 3] = [5.0, -3.0, 8.0]
    transform = add_linear_transform(scene, move)
    t1.SetAndObserveTransformNodeID(transform.GetID())
    out = SynthesisSceneLogic(scene).synthesize(t1=t1, model=bundles["t1"], device="cpu")
    assert np.array_equal(ijkToRAS(out), OBLIQUE)
    assert out.GetTransformNodeID() == transform.GetID()  # overlays T1 in world space


def test_existing_output_node_is_reused(scene, pair, bundles):
    t1, t2 = pair
    existing = add_volume(scene, "my result", np.ones((4, 4, 4), np.float32), np.eye(4))
    count = scene.GetNumberOfNodes()
    out = SynthesisSceneLogic(scene).synthesize(t1=t1, t2=t2, model=bundles["t1t2"], outputNode=existing,
                                                device="cpu")
    assert out is existing and out.GetName() == "my result"
    assert out.GetImageData().GetDimensions() == SHAPE
    assert np.array_equal(ijkToRAS(out), OBLIQUE)
    # Only its display node and the NRRD storage node that keeps the provenance marks on saving.
    assert scene.GetNumberOfNodes() == count + 2
    assert out.GetStorageNode().IsA("vtkMRMLNRRDStorageNode")


def test_outputs_say_they_are_synthetic_and_the_marks_survive_saving_and_loading(tmp_path, pair, bundles):
    """Issue 19: the FLAIR, the brain mask and the TTA spread carry their provenance as
    MRISynthesis.* node attributes; Slicer's NRRD storage node writes them into the header,
    MRISynthesisLib reads them back from the file, and loading it restores them."""
    import json

    from MRISynthesisLib import provenance
    from SlicerMRISynthesisLib.scene import nodeRecord

    t1, t2 = pair
    saveVolumeNode(t1, tmp_path / "t1.nrrd")
    scene = slicer.vtkMRMLScene()
    t1_file = loadVolumeNode(scene, tmp_path / "t1.nrrd", "case t1")
    t2_node = add_volume(scene, "case t2", volumeFromNode(t2).array, ijkToRAS(t2))  # no file behind it
    result = SynthesisSceneLogic(scene).synthesizeWithDetails(t1=t1_file, t2=t2_node, model=bundles["t1t2"],
                                                              device="cpu", saveMask=True, uncertainty=True)
    record = nodeRecord(result.output)
    assert record == result.provenance and record["Synthetic"] is True and record["ImageType"] == "synthetic FLAIR"
    assert result.output.GetAttribute("MRISynthesis.Synthetic") == "true"
    assert "not acquired" in result.output.GetAttribute("MRISynthesis.Statement")
    sources = {e["Modality"]: e for e in record["SourceFiles"]}
    assert sources["t1"]["Path"] == str(tmp_path / "t1.nrrd") and sources["t1"]["SHA256"] == \
        provenance.file_sha256(tmp_path / "t1.nrrd")
    assert sources["t2"]["Path"] is None and len(sources["t2"]["VoxelSHA256"]) == 64
    assert record["GeneratedBy"][0]["Model"]["SHA256"] and record["Precision"] and record["Device"] == "cpu"
    assert nodeRecord(result.maskOutput)["Kind"] == provenance.KIND_MASK
    assert nodeRecord(result.uncertaintyOutput)["Kind"] == provenance.KIND_UNCERTAINTY
    assert result.uncertaintyOutput.GetName() == "case t1 synthetic FLAIR TTA spread"
    spread = volumeFromNode(result.uncertaintyOutput).array
    assert spread.shape == volumeFromNode(result.output).array.shape and spread.min() >= 0 and spread.max() > 0
    # File > Save: the node's own storage node writes the NRRD with the marks.
    storage = result.output.GetStorageNode()
    storage.SetFileName(str(tmp_path / "saved.nrrd"))
    assert storage.WriteData(result.output)
    header = (tmp_path / "saved.nrrd").read_bytes().split(b"\n\n")[0].decode()
    assert "MRISynthesis.Synthetic:=true" in header
    assert provenance.read_provenance(tmp_path / "saved.nrrd").record == record
    # Loaded back (Slicer reads NRRD key/values into node attributes).
    other = slicer.vtkMRMLScene()
    node = other.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "loaded")
    reader = other.AddNewNodeByClass("vtkMRMLNRRDStorageNode")
    reader.SetFileName(str(tmp_path / "saved.nrrd"))
    node.SetAndObserveStorageNodeID(reader.GetID())
    assert reader.ReadData(node)
    assert json.dumps(nodeRecord(node), sort_keys=True) == json.dumps(record, sort_keys=True)
    # An acquired volume carries no record.
    assert nodeRecord(t1_file) is None


def test_nrrd_and_nifti_round_trip_through_storage_nodes(tmp_path, pair, bundles):
    t1, t2 = pair
    for suffix in (".nrrd", ".nii.gz"):
        saveVolumeNode(t1, tmp_path / f"t1{suffix}")
        saveVolumeNode(t2, tmp_path / f"t2{suffix}")
        scene = slicer.vtkMRMLScene()
        t1_loaded = loadVolumeNode(scene, tmp_path / f"t1{suffix}")
        t2_loaded = loadVolumeNode(scene, tmp_path / f"t2{suffix}")
        assert t1_loaded.GetName() == "t1"
        np.testing.assert_allclose(ijkToRAS(t1_loaded), OBLIQUE, atol=1e-5)
        np.testing.assert_array_equal(volumeFromNode(t1_loaded).array, volumeFromNode(t1).array)
        out = SynthesisSceneLogic(scene).synthesize(t1=t1_loaded, t2=t2_loaded, model=bundles["t1t2"],
                                                    device="cpu")
        assert np.array_equal(ijkToRAS(out), ijkToRAS(t1_loaded))
        saveVolumeNode(out, tmp_path / f"flair{suffix}")
        reread = loadVolumeNode(slicer.vtkMRMLScene(), tmp_path / f"flair{suffix}")
        np.testing.assert_allclose(ijkToRAS(reread), ijkToRAS(t1_loaded), atol=1e-5)
        np.testing.assert_array_equal(volumeFromNode(reread).array, volumeFromNode(out).array)
    # The core library reads the module's files with the same geometry (NIfTI via nibabel).
    from MRISynthesisLib.volumes import load_volume

    np.testing.assert_allclose(load_volume(tmp_path / "flair.nii.gz").affine, OBLIQUE, atol=1e-5)
    np.testing.assert_allclose(load_volume(tmp_path / "flair.nrrd").affine, OBLIQUE, atol=1e-5)


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz"])
def test_left_handed_file_is_read_physically_identical(tmp_path, suffix):
    # A left-handed voxel grid (common for NIfTI, e.g. LAS): the file is written exactly, and
    # Slicer's reader reverses K to keep IJK right-handed; the image in space is unchanged.
    left = OBLIQUE.copy()
    left[:3, 1] *= -1
    array = brain(SHAPE, 4)
    scene = slicer.vtkMRMLScene()
    node = add_volume(scene, "v", array, left)
    saveVolumeNode(node, tmp_path / f"v{suffix}")
    from MRISynthesisLib.volumes import load_volume

    written = load_volume(tmp_path / f"v{suffix}")
    np.testing.assert_allclose(written.affine, left, atol=1e-5)
    np.testing.assert_array_equal(written.array, array)
    reread = loadVolumeNode(slicer.vtkMRMLScene(), tmp_path / f"v{suffix}")
    flip_k = np.diag([1.0, 1.0, -1.0, 1.0])
    flip_k[2, 3] = SHAPE[2] - 1
    np.testing.assert_allclose(ijkToRAS(reread), left @ flip_k, atol=1e-5)
    np.testing.assert_array_equal(volumeFromNode(reread).array, array[:, :, ::-1])


def test_load_missing_or_broken_file_gives_clear_error_and_no_nodes(tmp_path):
    scene = slicer.vtkMRMLScene()
    with pytest.raises(InputError, match="file not found"):
        loadVolumeNode(scene, tmp_path / "nothing.nrrd")
    (tmp_path / "broken.nrrd").write_bytes(b"not an nrrd")
    with pytest.raises(InputError, match="cannot read"):
        loadVolumeNode(scene, tmp_path / "broken.nrrd")
    assert scene.GetNumberOfNodes() == 0


# ----------------------------------------------------------------------------- scene unchanged


def test_cancel_leaves_scene_unchanged(scene, pair, bundles):
    t1, t2 = pair
    before = scene_snapshot(scene)
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 1  # cancel after the first batch

    with pytest.raises(Cancelled):
        SynthesisSceneLogic(scene).synthesize(t1=t1, t2=t2, model=bundles["t1t2"], device="cpu",
                                              cancel=cancel, batchSize=2)
    assert len(calls) == 2
    assert scene_snapshot(scene) == before


def test_error_keeps_existing_output_untouched(scene, pair, bundles):
    t1, t2 = pair
    existing = add_volume(scene, "old result", np.full((4, 5, 6), 3.0, np.float32), np.eye(4))
    before = scene_snapshot(scene)
    with pytest.raises(InputError, match="t1, t2"):
        SynthesisSceneLogic(scene).synthesize(t1=t1, model=bundles["t1t2"], outputNode=existing, device="cpu")
    with pytest.raises(Cancelled):
        SynthesisSceneLogic(scene).synthesize(t1=t1, t2=t2, model=bundles["t1t2"], outputNode=existing,
                                              device="cpu", cancel=lambda: True)
    assert scene_snapshot(scene) == before


def test_failure_inside_synthesis_leaves_scene_unchanged(scene, pair):
    t1, t2 = pair
    before = scene_snapshot(scene)

    def failing(*args, progress=None, **kwargs):
        progress(0, 10)
        raise RuntimeError("out of memory")

    logic = SynthesisSceneLogic(scene, synthesizeFunction=failing, resolveModel=lambda model, sources: "m")
    with pytest.raises(RuntimeError, match="out of memory"):
        logic.synthesize(t1=t1, t2=t2, progressCallback=lambda d, t: None)
    assert scene_snapshot(scene) == before


def test_bad_inputs_give_clear_errors(scene, pair, bundles):
    t1, t2 = pair
    logic = SynthesisSceneLogic(scene)
    flat = add_volume(scene, "flat", np.full((24, 20, 1), 5.0, np.float32), np.eye(4))
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    zeros = add_volume(scene, "zeros", np.zeros(SHAPE, np.float32), OBLIQUE)
    before = scene_snapshot(scene)
    cases = [
        (dict(t1=t1, model=bundles["t1t2"]), InputError, "needs t1, t2 but t2 was not given"),
        (dict(t2=t2, model=bundles["t1t2"]), InputError, "T1 volume is required"),
        (dict(t1=flat, model=bundles["t1"]), InputError, "t1: volume 'flat' is a 2D image"),
        (dict(t1=empty, model=bundles["t1"]), InputError, "t1: volume 'empty' is empty"),
        (dict(t1=t1, t2=empty, model=bundles["t1t2"]), InputError, "t2: volume 'empty' is empty"),
        (dict(t1=zeros, model=bundles["t1"]), InputError, "all voxels are zero"),
        (dict(t1=t1, t2=t2, model=bundles["t1"]), InputError, "cannot use t2"),
        (dict(t1=t1, model=bundles["t1"], outputNode=t1), InputError, "must not be one of the inputs"),
        (dict(t1=t1, model=bundles["t1"], precision="fp8"), InputError, "unknown precision"),
        (dict(t1=t1, model=bundles["t1"], device="tpu"), InputError, "unknown device"),
        (dict(t1=t1, model="no_such_model"), BundleError, "neither a file nor a shipped model"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            logic.synthesize(**kwargs)
    assert scene_snapshot(scene) == before


def test_cuda_without_gpu_falls_back_to_cpu_with_warning(scene, pair, bundles, caplog):
    t1, _ = pair
    seen = {}

    def recording(*args, device, **kwargs):
        seen["device"] = device
        return synthesize_with_details(*args, device=device, **kwargs)

    logic = SynthesisSceneLogic(scene, synthesizeFunction=recording, cudaAvailable=lambda: False)
    with caplog.at_level(logging.WARNING, logger="MRISynthesis"):
        logic.synthesize(t1=t1, model=bundles["t1"], device="cuda")
    assert seen["device"] == "cpu"
    assert any("running on the CPU" in r.getMessage() for r in caplog.records)


def test_default_model_is_the_shipped_one_for_the_given_inputs(scene, pair, bundles, monkeypatch, tmp_path):
    t1, t2 = pair
    shipped = tmp_path / "models"
    shipped.mkdir()
    make_bundle(shipped / "t1_t2_to_flair.safetensors", ("t1", "t2"), seed=5)
    monkeypatch.setenv("MRISYNTHESIS_MODELS", str(shipped))
    out = SynthesisSceneLogic(scene).synthesize(t1=t1, t2=t2, device="cpu")
    expected = core_synthesize({"t1": volumeFromNode(t1), "t2": volumeFromNode(t2)},
                               str(shipped / "t1_t2_to_flair.safetensors"), mask="none", device="cpu").array
    np.testing.assert_allclose(volumeFromNode(out).array, expected, atol=1e-4)
    # T1 + T1c is a source set no model is shipped for (the real Resources/Models has
    # t1, t1+t2, t1+t2+t1c).
    with pytest.raises(BundleError, match=r"no shipped model takes exactly t1 \+ t1c -> flair"):
        SynthesisSceneLogic(scene).synthesize(t1=t1, t1c=t2, device="cpu")


def test_mask_restricts_output(scene, pair, bundles):
    t1, t2 = pair
    mask_array = np.zeros(SHAPE, np.float32)
    mask_array[6:14, 6:12, 2:5] = 1
    mask = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "mask")
    updateNodeFromArray(mask, mask_array, OBLIQUE)
    out = volumeFromNode(SynthesisSceneLogic(scene).synthesize(t1=t1, t2=t2, mask=mask, model=bundles["t1t2"],
                                                               device="cpu")).array
    assert np.all(out[mask_array == 0] == 0) and np.all(out[mask_array > 0] > 0)


# ----------------------------------------------------------------------------- panel rules


@pytest.mark.parametrize("name, modality", [
    ("BraTS-GLI-00001-000-t1n", "t1"), ("T1", "t1"), ("sub-01_T1w", "t1"), ("t1_mprage", "t1"),
    ("BraTS-GLI-00001-000-t1c", "t1c"), ("T1ce", "t1c"), ("T1Gd", "t1c"), ("T1 post", "t1c"),
    ("t2", "t2"), ("sub-01_T2w", "t2"), ("T2-FLAIR", "flair"), ("case-t2f", "flair"), ("FLAIR", "flair"),
    ("t1 synthetic FLAIR", "flair"), ("MRHead", None), ("t10", None), ("", None),
])
def test_guess_modality(name, modality):
    assert guessModality(name) == modality


def test_prefill_from_names_keeps_user_choices(scene):
    nodes = [add_volume(scene, n, brain((8, 8, 4), 0), np.eye(4))
             for n in ("x-t1n", "x-t2w", "x-t2f", "other t1", "x-t1c")]
    assigned = assignInputsByName(nodes)
    assert {m: n.GetName() for m, n in assigned.items()} == {"t1": "x-t1n", "t2": "x-t2w", "t1c": "x-t1c"}
    assigned = assignInputsByName(nodes, current={"t1": nodes[3], "t2": None})
    assert "t1" not in assigned and assigned["t2"] is nodes[1]


def test_panel_state(tmp_path, bundles):
    shipped = {"t1_to_flair": bundles["t1"], "t1_t2_to_flair": bundles["t1t2"],
               "pix2pix_t1_t2_to_flair": bundles["t1t2"]}
    state = panelState(MODEL_AUTOMATIC, None, ["t1", "t2"], shipped)
    assert state.canApply and state.model == "t1_t2_to_flair" and state.sources == ("t1", "t2")
    # The baseline only by name; its inputs come from its header, not from its name.
    state = panelState("pix2pix_t1_t2_to_flair", None, ["t1"], shipped)
    assert not state.canApply and state.sources == ("t1", "t2") and "select T2" in state.message
    assert panelState("pix2pix_t1_t2_to_flair", None, ["t1", "t2"], shipped).model == "pix2pix_t1_t2_to_flair"
    assert not panelState(MODEL_AUTOMATIC, None, ["t2"], shipped).canApply
    state = panelState(MODEL_AUTOMATIC, None, ["t1", "t1c"], shipped)
    assert not state.canApply and "T1 + T1c" in state.message
    state = panelState("t1_t2_to_flair", None, ["t1"], shipped)
    assert not state.canApply and "select T2" in state.message
    state = panelState("t1_to_flair", None, ["t1", "t2"], shipped)
    assert state.canApply and state.sources == ("t1",) and state.unused == ("t2",) and "not used" in state.message
    assert not panelState("t1_t2_t1c_to_flair", None, ["t1", "t2", "t1c"], shipped).canApply  # not installed
    assert not panelState(MODEL_FILE, None, ["t1"], shipped).canApply
    state = panelState(MODEL_FILE, bundles["t1t2"], ["t1"], {})
    assert not state.canApply and state.sources == ("t1", "t2") and "select T2" in state.message
    assert panelState(MODEL_FILE, bundles["t1t2"], ["t1", "t2"], {}).canApply
    (tmp_path / "junk.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{}xyz")
    state = panelState(MODEL_FILE, str(tmp_path / "junk.safetensors"), ["t1"], {})
    assert not state.canApply and "not an MRISynthesis model bundle" in state.message
    assert readBundleSources(bundles["t1"]) == ("t1",)


def test_inputs_from_folder(tmp_path):
    for name in ("BraTS-X-t1n.nii.gz", "BraTS-X-t2w.nii.gz", "BraTS-X-t2f.nii.gz", "brainmask.nrrd", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    found = inputsFromFolder(tmp_path)
    assert {k: Path(v).name for k, v in found.items()} == {
        "t1": "BraTS-X-t1n.nii.gz", "t2": "BraTS-X-t2w.nii.gz", "mask": "brainmask.nrrd"}
    (tmp_path / "t1.nrrd").write_bytes(b"")
    with pytest.raises(InputError, match="two files look like t1"):
        inputsFromFolder(tmp_path)


# ----------------------------------------------------------------------------- torch and packages


# ----------------------------------------------------------------------------- brain mask


def raw_head(seed=0):
    """A whole "head" (> 2200 ml of non-zero voxels at 4 mm) that auto must extract from."""
    rng = np.random.default_rng(seed)
    return (100 + 400 * rng.random((40, 40, 24))).astype(np.float32)


HEAD_AFFINE = np.diag([4.0, 4.0, 4.0, 1.0])


@pytest.fixture
def fake_deepbet(monkeypatch):
    """deepbet replaced by an ellipsoid "brain" (the real one takes seconds on a real head and
    is tested on one in test_slicer_batch); records the thread it ran in."""
    from MRISynthesisLib import brainmask

    calls = []

    def extract(volume, device="cpu", name="t1", **kwargs):
        import threading

        calls.append(threading.current_thread())
        return brain_like(volume.shape, 0, margin=(6, 6, 4)) > 0

    monkeypatch.setattr(brainmask, "extract_brain", extract)
    return calls


def test_default_auto_on_a_stripped_t1_is_mode_none_and_the_mask_can_be_saved(scene, pair, bundles):
    t1, t2 = pair
    logic = SynthesisSceneLogic(scene)
    before = scene.GetNumberOfNodes()
    result = logic.synthesizeWithDetails(t1=t1, t2=t2, model=bundles["t1t2"], device="cpu", saveMask=True)
    assert result.maskDecision.source == "input already skull-stripped"
    assert "already skull-stripped" in result.maskDecision.description
    mask = result.maskOutput
    assert mask.IsA("vtkMRMLLabelMapVolumeNode") and mask.GetName() == "case t1n brain mask"
    assert mask.GetImageData().GetScalarTypeAsString() == "unsigned char"
    assert np.array_equal(ijkToRAS(mask), ijkToRAS(t1))
    np.testing.assert_array_equal(volumeFromNode(mask).array, (brain(SHAPE, 0) != 0) | (brain(SHAPE, 1) != 0))
    assert scene.GetNumberOfNodes() > before + 2  # FLAIR + mask (+ display nodes)
    # Each Apply a new label map unless one is picked; a picked one is reused, not added to.
    again = logic.synthesizeWithDetails(t1=t1, t2=t2, model=bundles["t1t2"], device="cpu", saveMask=True)
    assert again.maskOutput is not mask and again.output is not result.output
    picked = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "my mask")
    third = logic.synthesizeWithDetails(t1=t1, t2=t2, model=bundles["t1t2"], device="cpu", maskOutputNode=picked)
    assert third.maskOutput is picked and picked.GetName() == "case t1n brain mask"  # empty node: named
    # No mask asked for: none stored.
    assert logic.synthesizeWithDetails(t1=t1, t2=t2, model=bundles["t1t2"], device="cpu").maskOutput is None


def test_brain_mask_none_and_given_node(scene, pair, bundles):
    t1, t2 = pair
    logic = SynthesisSceneLogic(scene)
    none = logic.synthesizeWithDetails(t1=t1, t2=t2, model=bundles["t1t2"], device="cpu", brainMask="none")
    assert none.maskDecision.source == "none"
    mask_array = np.zeros(SHAPE, np.float32)
    mask_array[6:14, 6:12, 2:5] = 1
    mask = add_volume(scene, "my brain", mask_array, OBLIQUE)
    given = logic.synthesizeWithDetails(t1=t1, t2=t2, mask=mask, brainMask="none", model=bundles["t1t2"],
                                        device="cpu", saveMask=True)  # a mask node wins over the mode
    assert given.maskDecision.source == "given" and "given" in given.maskDecision.description
    np.testing.assert_array_equal(volumeFromNode(given.maskOutput).array, mask_array)


def test_auto_extracts_a_raw_head_in_compute_and_refuses_a_box(scene, bundles, fake_deepbet):
    t1 = add_volume(scene, "head t1", raw_head(), HEAD_AFFINE)
    logic = SynthesisSceneLogic(scene)
    request = logic.prepare(t1=t1, model=bundles["t1"], device="cpu", saveMask=True)
    assert not fake_deepbet  # prepare (main thread) does not extract
    result = logic.compute(request)
    assert len(fake_deepbet) == 1 and result.mask_decision.source == "extracted (deepbet)"
    stored = logic.store(request, result)
    expected = brain_like((40, 40, 24), 0, margin=(6, 6, 4)) > 0
    np.testing.assert_array_equal(volumeFromNode(stored.maskOutput).array, expected)
    flair = volumeFromNode(stored.output).array
    assert np.all(flair[~expected] == 0) and flair[expected].max() > 0  # background outside the brain
    # A box (a phantom cube) is not a brain: one line, nothing added.
    cube = np.zeros(SHAPE, np.float32)
    cube[3:-3, 3:-3, 1:-1] = 300 + 200 * np.random.default_rng(0).random((SHAPE[0] - 6, SHAPE[1] - 6, SHAPE[2] - 2))
    box = add_volume(scene, "phantom", cube, OBLIQUE)
    before = scene_snapshot(scene)
    with pytest.raises(InputError, match="a box, not a brain") as error:
        logic.synthesize(t1=box, model=bundles["t1"], device="cpu", saveMask=True)
    assert "\n" not in str(error.value)
    assert scene_snapshot(scene) == before


def test_bad_brain_mask_arguments(scene, pair, bundles):
    t1, t2 = pair
    logic = SynthesisSceneLogic(scene)
    other = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "other")
    before = scene_snapshot(scene)
    cases = [
        (dict(brainMask="deepbet"), "unknown brain mask choice 'deepbet'"),
        (dict(maskOutputNode=t2), "must not be an input"),
        (dict(maskOutputNode=other, outputNode=other), "or the FLAIR output"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InputError, match=message):
            logic.synthesize(t1=t1, t2=t2, model=bundles["t1t2"], device="cpu", **kwargs)
    scalar = add_volume(scene, "scalar", np.ones((4, 4, 4), np.float32), np.eye(4))
    with pytest.raises(InputError, match="not a label map"):
        logic.synthesize(t1=t1, t2=t2, model=bundles["t1t2"], device="cpu", maskOutputNode=scalar)
    assert scene_snapshot(scene)[: len(before)] == before
