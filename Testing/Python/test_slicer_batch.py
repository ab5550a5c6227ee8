"""The headless batch script under plain Python with slicer-core: small generated subject
folders, and one real subject when MRISYNTHESIS_DATA is set."""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SOURCE_SCRIPT = REPO / "MRISynthesis" / "Scripts" / "batch_synthesize.py"

pytest.importorskip("slicer", reason="the PyPI slicer-core package is needed (pip install slicer-core)")

from MRISynthesisLib.bundle import bundle_from_generator, save_bundle  # noqa: E402
from MRISynthesisLib.networks import ModelConfig, build_generator, init_weights  # noqa: E402
from MRISynthesisLib.volumes import Volume, load_volume, save_volume  # noqa: E402
from slicer_testdata import brain_like  # noqa: E402

AFFINE = np.array([[0.0, -1.1, 0.0, 30.0], [0.9, 0.0, 0.0, -12.0], [0.0, 0.0, 2.0, 7.0], [0.0, 0.0, 0.0, 1.0]])
SHAPE = (22, 18, 6)


def make_bundle(path, sources):
    torch.manual_seed(0)
    config = ModelConfig(num_sources=len(sources), base_width=4)
    save_bundle(bundle_from_generator(init_weights(build_generator(config)), config, sources), path)
    return path


def brain(seed, shape=SHAPE):
    """Skull-stripped (round, zero outside): --brain-mask auto leaves it as it is."""
    return brain_like(shape, seed, low=100, high=500)


def installed_layout(root, with_helpers=True):
    """The extension as CMake installs it: qt-scripted-modules/ with the module file, its
    helper package, MRISynthesisLib beside them and Scripts/batch_synthesize.py."""
    lib = Path(root) / "qt-scripted-modules"
    (lib / "Scripts").mkdir(parents=True)
    shutil.copy(REPO / "MRISynthesis" / "MRISynthesis.py", lib)
    shutil.copy(SOURCE_SCRIPT, lib / "Scripts")
    shutil.copytree(REPO / "MRISynthesisLib", lib / "MRISynthesisLib", ignore=shutil.ignore_patterns("__pycache__"))
    if with_helpers:
        shutil.copytree(REPO / "MRISynthesis" / "SlicerMRISynthesisLib", lib / "SlicerMRISynthesisLib",
                        ignore=shutil.ignore_patterns("__pycache__"))
    return lib / "Scripts" / "batch_synthesize.py"


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    return installed_layout(tmp_path_factory.mktemp("install"))


SCRIPT = None  # set by the autouse fixture: every test runs the installed-layout copy


@pytest.fixture(autouse=True)
def _use_installed_copy(script):
    global SCRIPT
    SCRIPT = script


def run(*args, timeout=300, script=None):
    return subprocess.run([sys.executable, str(script or SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=str(REPO / "Testing"))


@pytest.fixture(scope="module")
def subjects(tmp_path_factory):
    root = tmp_path_factory.mktemp("subjects")
    (root / "a").mkdir()
    save_volume(Volume(brain(0), AFFINE), root / "a" / "t1.nii.gz")
    save_volume(Volume(brain(1), AFFINE), root / "a" / "t2.nii.gz")
    (root / "b").mkdir()  # BraTS-style names, NRRD
    save_volume(Volume(brain(2), AFFINE), root / "b" / "b-t1n.nrrd")
    save_volume(Volume(brain(3), AFFINE), root / "b" / "b-t2w.nrrd")
    save_volume(Volume(brain(4), AFFINE), root / "b" / "b-t2f.nrrd")  # real FLAIR: not an input
    (root / "c").mkdir()  # T2 missing
    save_volume(Volume(brain(5), AFFINE), root / "c" / "t1.nii.gz")
    return root


def test_batch_synthesises_each_subject_and_fails_on_missing_modality(subjects, tmp_path):
    bundle = make_bundle(tmp_path / "m.safetensors", ("t1", "t2"))
    out = tmp_path / "out"
    result = run("--input-dir", subjects, "--output-dir", out, "--model", bundle, "--device", "cpu")
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 1, result.stdout + result.stderr
    assert lines[0].startswith("a: OK") and lines[1].startswith("b: OK")
    assert lines[2].startswith("c: SKIPPED") and "missing T2" in lines[2]
    assert lines[3] == "2 of 3 subjects synthesised"
    for subject in ("a", "b"):
        flair = load_volume(out / f"{subject}_flair.nii.gz")
        assert flair.shape == SHAPE
        np.testing.assert_allclose(flair.affine, AFFINE, atol=1e-5)
        assert 0 <= flair.array.min() and 0 < flair.array.max() <= 1000
    assert not (out / "c_flair.nii.gz").exists()


def test_batch_exit_zero_when_all_succeed_and_nrrd_output(subjects, tmp_path):
    bundle = make_bundle(tmp_path / "m.safetensors", ("t1",))
    result = run("--input-dir", subjects, "--output-dir", tmp_path / "out", "--model", bundle,
                 "--subjects", "c,b", "--format", "nrrd", "--precision", "bf16")
    assert result.returncode == 0, result.stdout + result.stderr
    assert [line.split(":")[0] for line in result.stdout.splitlines()[:2]] == ["c", "b"]
    flair = load_volume(tmp_path / "out" / "b_flair.nrrd")
    np.testing.assert_allclose(flair.affine, AFFINE, atol=1e-5)


def test_batch_never_overwrites_an_earlier_run_unless_asked(subjects, tmp_path):
    bundle = make_bundle(tmp_path / "m.safetensors", ("t1",))
    out = tmp_path / "out"
    args = ("--input-dir", subjects, "--output-dir", out, "--model", bundle, "--subjects", "c", "--device", "cpu")
    assert run(*args).returncode == 0
    flair, sidecar = out / "c_flair.nii.gz", out / "c_flair.json"
    before = {f: (f.stat().st_mtime_ns, f.read_bytes()) for f in (flair, sidecar)}
    result = run(*args)
    assert result.returncode == 2 and result.stdout == ""
    assert f"{flair} and 1 more already exist" in result.stderr and "--overwrite" in result.stderr
    assert {f: (f.stat().st_mtime_ns, f.read_bytes()) for f in (flair, sidecar)} == before  # untouched
    sidecar.unlink()  # a lone sidecar is an earlier run's result too
    assert run(*args).returncode == 2 and flair.stat().st_mtime_ns == before[flair][0]
    result = run(*args, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert flair.stat().st_mtime_ns != before[flair][0] and sidecar.is_file()


def test_batch_bad_arguments(subjects, tmp_path):
    result = run("--input-dir", tmp_path / "nowhere", "--output-dir", tmp_path / "out")
    assert result.returncode == 2 and "input folder not found" in result.stderr
    result = run("--input-dir", subjects, "--output-dir", tmp_path / "out", "--subjects", "zzz")
    assert result.returncode == 2 and "no subject folder zzz" in result.stderr
    result = run("--input-dir", subjects, "--output-dir", tmp_path / "out", "--model", "no_such_model",
                 "--subjects", "a")
    assert result.returncode == 2 and "--model" in result.stderr and "no_such_model" in result.stderr
    assert result.stdout == "" and not (tmp_path / "out" / "a_flair.nii.gz").exists()  # checked before any work


def test_batch_on_one_real_subject(tmp_path):
    data = os.environ.get("MRISYNTHESIS_DATA")
    if not data or not (Path(data) / "brats-gli-00001").is_dir():
        pytest.skip("real data not available: set MRISYNTHESIS_DATA to the shared data folder")
    bundle = make_bundle(tmp_path / "m.safetensors", ("t1", "t2"))
    result = run("--input-dir", data, "--output-dir", tmp_path / "out", "--model", bundle,
                 "--subjects", "brats-gli-00001", "--precision", "bf16", "--device", "cpu", timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    t1 = load_volume(Path(data) / "brats-gli-00001" / "t1.nii.gz")
    flair = load_volume(tmp_path / "out" / "brats-gli-00001_flair.nii.gz")
    assert flair.shape == t1.shape == (240, 240, 155)
    np.testing.assert_allclose(flair.affine, t1.affine, atol=1e-4)
    # Background stays 0 where T1 is 0 (skull-stripped), brain gets values.
    assert np.all(flair.array[t1.array == 0] == 0) and flair.array[t1.array > 0].mean() > 0


def test_batch_uses_the_installed_copies(subjects, tmp_path):
    code = (f"import runpy, sys; sys.argv = [{str(SCRIPT)!r}, '--help']\n"
            f"try:\n    runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\nexcept SystemExit as e:\n"
            "    import MRISynthesisLib, SlicerMRISynthesisLib; print(MRISynthesisLib.__file__); "
            "print(SlicerMRISynthesisLib.__file__); print(e.code)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == "0" and "--input-dir" in result.stdout
    assert Path(lines[-3]).parent.parent == SCRIPT.parent.parent and Path(lines[-2]).parent.parent == SCRIPT.parent.parent


@pytest.mark.parametrize("inputs, message", [
    ("t1,mask", "mask is not an input modality"),
    ("t2", "t1 is required"),
])
def test_batch_bad_inputs_are_refused_before_any_work(subjects, tmp_path, inputs, message):
    result = run("--input-dir", subjects, "--output-dir", tmp_path / "out", "--inputs", inputs)
    assert result.returncode == 2 and message in result.stderr and result.stdout == ""
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_batch_output_folder_that_cannot_be_made(subjects, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = run("--input-dir", subjects, "--output-dir", blocker / "out")
    assert result.returncode == 2 and "cannot create the output folder" in result.stderr
    result = run("--input-dir", subjects)  # argparse error: printed, exit 2
    assert result.returncode == 2 and "--output-dir" in result.stderr


@pytest.mark.parametrize("extra, message", [
    (["--inputs", "t1,t1"], "listed twice"),
    (["--inputs", ","], "nothing is not an input modality"),
    (["--device", "gpu"], "--device 'gpu'"),
    (["--inputs", "t1", "--model", "t1_t2_to_flair"], "the model takes t1, t2"),
])
def test_batch_argument_validation_in_process(subjects, tmp_path, extra, message):
    import runpy

    script = runpy.run_path(str(SOURCE_SCRIPT))  # not __main__: only defines its functions
    script["_importModuleSide"]()
    args = script["parseArguments"](["--input-dir", str(subjects), "--output-dir", str(tmp_path / "out"), *extra])
    with pytest.raises(script["ArgumentError"], match=message):
        script["validateArguments"](args)
    assert not (tmp_path / "out").exists()


def test_batch_import_error_exits_with_its_reason(tmp_path, subjects):
    broken = installed_layout(tmp_path, with_helpers=False)
    result = run("--input-dir", subjects, "--output-dir", tmp_path / "out", script=broken)
    assert result.returncode == 1
    assert "ModuleNotFoundError" in result.stderr and "SlicerMRISynthesisLib" in result.stderr


def test_batch_ctrl_c_exits_130(tmp_path):
    root = tmp_path / "many"
    for i in range(12):
        (root / f"s{i:02d}").mkdir(parents=True)
        save_volume(Volume(brain(i), AFFINE), root / f"s{i:02d}" / "t1.nii.gz")
    bundle = make_bundle(tmp_path / "m.safetensors", ("t1",))
    process = subprocess.Popen([sys.executable, str(SCRIPT), "--input-dir", str(root), "--output-dir",
                                str(tmp_path / "out"), "--model", str(bundle), "--device", "cpu"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               # Ctrl-C as at a terminal, even when this test runs with SIGINT
                               # ignored (started in the background, under nohup).
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first = process.stdout.readline()
    assert first.startswith("s00: OK"), first + process.stderr.read()
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, out + err
    assert "interrupted (Ctrl-C)" in err and "12 of 12" not in out


# ----------------------------------------------------------------------------- brain mask, BIDS


@pytest.fixture(scope="module")
def bids(tmp_path_factory):
    """A small BIDS dataset: sub-01 (no session), sub-02 with sessions a and b; ses-b has its own
    brain mask (desc-brain_mask), so that one is "given"; all T1s are skull-stripped."""
    root = tmp_path_factory.mktemp("bids")
    (root / "dataset_description.json").write_text('{"Name": "test", "BIDSVersion": "1.9.0"}')
    for i, (folder, prefix) in enumerate([("sub-01", "sub-01"), ("sub-02/ses-a", "sub-02_ses-a"),
                                          ("sub-02/ses-b", "sub-02_ses-b")]):
        anat = root / folder / "anat"
        anat.mkdir(parents=True)
        save_volume(Volume(brain(2 * i), AFFINE), anat / f"{prefix}_T1w.nii.gz")
        save_volume(Volume(brain(2 * i + 1), AFFINE), anat / f"{prefix}_T2w.nii.gz")
    given = np.zeros(SHAPE, np.float32)
    given[6:16, 5:13, 2:4] = 1
    save_volume(Volume(given, AFFINE), root / "sub-02" / "ses-b" / "anat" / "sub-02_ses-b_desc-brain_mask.nii.gz")
    return root


def derivative(root, folder, prefix, what="desc-synthetic_FLAIR"):
    return Path(root) / "derivatives" / "mrisynthesis" / folder / "anat" / f"{prefix}_{what}.nii.gz"


def test_batch_bids_dataset_is_written_as_a_bids_derivative(bids, tmp_path):
    import json

    bundle = make_bundle(tmp_path / "m.safetensors", ("t1", "t2"))
    out = tmp_path / "out"
    result = run("--input-dir", bids, "--output-dir", out, "--model", bundle, "--device", "cpu", "--save-mask")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("BIDS dataset: writing the derivative")
    assert [line.split(":")[0] for line in lines[1:4]] == ["sub-01", "sub-02_ses-a", "sub-02_ses-b"]
    assert "already skull-stripped" in lines[1] and "already skull-stripped" in lines[2]
    assert "brain mask: given" in lines[3] and "sub-02_ses-b_desc-brain_mask.nii.gz" in lines[3]
    assert lines[4] == "3 of 3 subjects synthesised"
    description = json.loads((out / "derivatives" / "mrisynthesis" / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["GeneratedBy"][0]["Name"] == "MRISynthesis"
    for i, (folder, prefix) in enumerate([("sub-01", "sub-01"), ("sub-02/ses-a", "sub-02_ses-a"),
                                          ("sub-02/ses-b", "sub-02_ses-b")]):
        flair = load_volume(derivative(out, folder, prefix))
        assert flair.shape == SHAPE and 0 < flair.array.max() <= 1000
        np.testing.assert_allclose(flair.affine, AFFINE, atol=1e-5)
        mask = load_volume(derivative(out, folder, prefix, "desc-brain_mask")).array
        if prefix == "sub-02_ses-b":
            expected = load_volume(bids / folder / "anat" / f"{prefix}_desc-brain_mask.nii.gz").array > 0
        else:
            expected = (brain(2 * i) != 0) | (brain(2 * i + 1) != 0)  # stripped: the non-zero voxels
        np.testing.assert_array_equal(mask > 0, expected)
        assert np.all(flair.array[~expected] == 0)  # background outside the mask used
        # Each derivative file has its BIDS JSON sidecar naming the subject's files with their SHA-256.
        sidecar = json.loads(derivative(out, folder, prefix).with_suffix("").with_suffix(".json").read_text())
        anat = bids / folder / "anat"
        inputs = [anat / f"{prefix}_T1w.nii.gz", anat / f"{prefix}_T2w.nii.gz"]
        assert sidecar["Sources"] == [str(p) for p in inputs]
        assert [s["SHA256"] for s in sidecar["SourceFiles"]] == [_sha256(p) for p in inputs]
        assert sidecar["Synthetic"] is True and "not acquired" in sidecar["Statement"]
        assert sidecar["GeneratedBy"][0]["Model"]["SHA256"] == _bundle_digest(bundle)
        assert sidecar["BrainMask"]["Source"] == ("given" if prefix == "sub-02_ses-b" else
                                                  "input already skull-stripped")
        if prefix == "sub-02_ses-b":
            assert sidecar["BrainMask"]["File"]["Path"] == str(anat / f"{prefix}_desc-brain_mask.nii.gz")
        assert _nifti_intent(derivative(out, folder, prefix)) == b"synthetic FLAIR"
        mask_sidecar = json.loads((derivative(out, folder, prefix, "desc-brain_mask").parent
                                   / f"{prefix}_desc-brain_mask.json").read_text())
        assert mask_sidecar["Kind"] == "brain mask" and mask_sidecar["Sources"] == sidecar["Sources"]
    assert not (bids / "derivatives").exists()  # --output-dir given: the dataset is left alone


def _sha256(path):
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _bundle_digest(path):
    from MRISynthesisLib.bundle import load_bundle

    return load_bundle(path).sha256


def _nifti_intent(path):
    import nibabel as nib

    return bytes(nib.load(str(path)).header["intent_name"]).rstrip(b"\0")


def test_batch_uncertainty_and_marks_in_nrrd_and_bids(subjects, bids, tmp_path):
    """--uncertainty writes the map beside each output; every file is marked (NRRD keys,
    sidecars), and the synthetic image is the one written without the map."""
    import json

    import SimpleITK as sitk
    from MRISynthesisLib.subjects import UNCERTAINTY_DESC

    bundle = make_bundle(tmp_path / "m.safetensors", ("t1", "t2"))
    plain = run("--input-dir", subjects, "--output-dir", tmp_path / "plain", "--model", bundle, "--device", "cpu",
                "--subjects", "a", "--format", "nrrd")
    assert plain.returncode == 0, plain.stdout + plain.stderr
    result = run("--input-dir", subjects, "--output-dir", tmp_path / "out", "--model", bundle, "--device", "cpu",
                 "--subjects", "a", "--format", "nrrd", "--uncertainty")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "a_flair_uncertainty.nrrd" in result.stdout
    out = tmp_path / "out"
    np.testing.assert_array_equal(load_volume(out / "a_flair.nrrd").array, load_volume(tmp_path / "plain" / "a_flair.nrrd").array)
    for name, kind in (("a_flair", "synthetic"), ("a_flair_uncertainty", "uncertainty")):
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(out / f"{name}.nrrd"))
        reader.ReadImageInformation()
        keys = {k: reader.GetMetaData(k) for k in reader.GetMetaDataKeys()}
        record = json.loads((out / f"{name}.json").read_text())
        assert json.loads(keys["MRISynthesis.Provenance"]) == record and record["Kind"] == kind
        assert keys["MRISynthesis.Synthetic"] == "true"
        assert record["Sources"] == [str(subjects / "a" / "t1.nii.gz"), str(subjects / "a" / "t2.nii.gz")]
    u = load_volume(out / "a_flair_uncertainty.nrrd")
    np.testing.assert_allclose(u.affine, AFFINE, atol=1e-5)
    assert u.array.min() >= 0 and u.array.max() > 0 and np.all(u.array[brain(0) == 0] == 0)
    # A BIDS derivative gets the map as desc-<UNCERTAINTY_DESC> with its sidecar.
    result = run("--input-dir", bids, "--output-dir", tmp_path / "bidsout", "--model", bundle, "--device", "cpu",
                 "--subjects", "sub-01", "--uncertainty")
    assert result.returncode == 0, result.stdout + result.stderr
    path = derivative(tmp_path / "bidsout", "sub-01", "sub-01", f"desc-{UNCERTAINTY_DESC}_FLAIR")
    assert load_volume(path).array.max() > 0 and _nifti_intent(path) == b"TTA spread"
    assert json.loads(path.with_suffix("").with_suffix(".json").read_text())["Kind"] == "uncertainty"


def test_batch_bids_default_output_is_the_dataset_and_subjects_select_sessions(bids, tmp_path):
    import shutil as sh

    dataset = tmp_path / "ds"
    sh.copytree(bids, dataset)
    bundle = make_bundle(tmp_path / "m.safetensors", ("t1",))
    result = run("--input-dir", dataset, "--model", bundle, "--device", "cpu", "--subjects", "sub-02",
                 "--brain-mask", "none", "--no-mask")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines[1:3]] == ["sub-02_ses-a", "sub-02_ses-b"]
    assert all("brain mask: none" in line for line in lines[1:3])
    assert derivative(dataset, "sub-02/ses-b", "sub-02_ses-b").is_file()
    assert not derivative(dataset, "sub-01", "sub-01").exists()
    assert not derivative(dataset, "sub-02/ses-b", "sub-02_ses-b", "desc-brain_mask").exists()  # not asked
    # The derivative inside the dataset is not a subject the next run would find.
    result = run("--input-dir", dataset, "--model", bundle, "--device", "cpu", "--subjects", "sub-01_ses-a")
    assert result.returncode == 2 and "no BIDS subject sub-01_ses-a" in result.stderr


@pytest.mark.parametrize("extra, message", [
    (["--format", "nrrd"], "a BIDS derivative is written as .nii.gz"),
    (["--brain-mask", "deepbet"], "invalid choice: 'deepbet'"),
])
def test_batch_bids_bad_arguments_before_any_work(bids, tmp_path, extra, message):
    result = run("--input-dir", bids, "--output-dir", tmp_path / "out", *extra)
    assert result.returncode == 2 and message in result.stderr and result.stdout == ""
    assert not (tmp_path / "out").exists()


def test_batch_plain_folders_need_an_output_dir(subjects):
    result = run("--input-dir", subjects)
    assert result.returncode == 2 and "--output-dir is required" in result.stderr


def test_batch_save_mask_beside_the_output(subjects, tmp_path):
    bundle = make_bundle(tmp_path / "m.safetensors", ("t1",))
    result = run("--input-dir", subjects, "--output-dir", tmp_path / "out", "--model", bundle, "--device", "cpu",
                 "--subjects", "a", "--save-mask", "--brain-mask", "none")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "brain mask: none" in result.stdout and "a_brainmask.nii.gz" in result.stdout
    mask = load_volume(tmp_path / "out" / "a_brainmask.nii.gz")
    np.testing.assert_array_equal(mask.array > 0, brain(0) != 0)
    np.testing.assert_allclose(mask.affine, AFFINE, atol=1e-5)


def test_batch_auto_extracts_the_brain_of_a_real_raw_head(tmp_path):
    """The one real un-stripped case: ms-long-04a (whole head, 50 slices of 3 mm), its own
    mask ignored (--no-mask) so auto must extract; the extracted mask overlaps the dataset's."""
    data = os.environ.get("MRISYNTHESIS_DATA")
    if not data or not (Path(data) / "ms-long-04a" / "mask.nii.gz").is_file():
        pytest.skip("real data not available: set MRISYNTHESIS_DATA to the shared data folder (ms-long-04a)")
    bundle = make_bundle(tmp_path / "m.safetensors", ("t1", "t2"))
    result = run("--input-dir", data, "--output-dir", tmp_path / "out", "--model", bundle, "--device", "cpu",
                 "--subjects", "ms-long-04a", "--no-mask", "--save-mask", timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "brain mask: extracted from t1 with deepbet" in result.stdout and "not skull-stripped" in result.stdout
    extracted = load_volume(tmp_path / "out" / "ms-long-04a_brainmask.nii.gz").array > 0
    reference = load_volume(Path(data) / "ms-long-04a" / "mask.nii.gz").array > 0
    dice = 2 * np.count_nonzero(extracted & reference) / (np.count_nonzero(extracted) + np.count_nonzero(reference))
    assert dice >= 0.9, dice
    flair = load_volume(tmp_path / "out" / "ms-long-04a_flair.nii.gz").array
    assert np.all(flair[~extracted] == 0) and flair[extracted].max() > 0
