"""The headless batch script under plain Python with slicer-core: small generated subject
folders, and one real subject when MRISYNTHESIS_DATA is set."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "MRISynthesis" / "Scripts" / "batch_synthesize.py"

pytest.importorskip("slicer", reason="the PyPI slicer-core package is needed (pip install slicer-core)")

from MRISynthesisLib.bundle import bundle_from_generator, save_bundle  # noqa: E402
from MRISynthesisLib.networks import ModelConfig, build_generator, init_weights  # noqa: E402
from MRISynthesisLib.volumes import Volume, load_volume, save_volume  # noqa: E402

AFFINE = np.array([[0.0, -1.1, 0.0, 30.0], [0.9, 0.0, 0.0, -12.0], [0.0, 0.0, 2.0, 7.0], [0.0, 0.0, 0.0, 1.0]])
SHAPE = (22, 18, 6)


def make_bundle(path, sources):
    torch.manual_seed(0)
    config = ModelConfig(num_sources=len(sources), base_width=4)
    save_bundle(bundle_from_generator(init_weights(build_generator(config)), config, sources), path)
    return path


def brain(seed):
    rng = np.random.default_rng(seed)
    array = np.zeros(SHAPE, dtype=np.float32)
    array[3:-3, 3:-3, 1:-1] = 100 + 400 * rng.random((SHAPE[0] - 6, SHAPE[1] - 6, SHAPE[2] - 2))
    return array


def run(*args, timeout=300):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
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


def test_batch_bad_arguments(subjects, tmp_path):
    result = run("--input-dir", tmp_path / "nowhere", "--output-dir", tmp_path / "out")
    assert result.returncode == 2 and "input folder not found" in result.stderr
    result = run("--input-dir", subjects, "--output-dir", tmp_path / "out", "--subjects", "zzz")
    assert result.returncode == 2 and "no subject folder zzz" in result.stderr
    result = run("--input-dir", subjects, "--output-dir", tmp_path / "out", "--model", "no_such_model",
                 "--subjects", "a")
    assert result.returncode == 1 and "a: FAILED" in result.stdout and "no_such_model" in result.stdout


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
