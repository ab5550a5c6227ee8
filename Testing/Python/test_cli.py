import numpy as np

from MRISynthesisLib.cli import main
from MRISynthesisLib.volumes import Volume, load_volume, save_volume

from conftest import make_bundle


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_predict_writes_nifti_and_nrrd(capsys, tmp_path, subject_files, tiny_bundle):
    for name in ("out.nii.gz", "out_nrrd.nrrd"):  # each with its sidecar: out.json, out_nrrd.json
        out = tmp_path / name
        code, stdout, err = run(capsys, "predict", "--t1", subject_files["t1"], "--t2", subject_files["t2"],
                                "--model", tiny_bundle, "-o", out, "--batch-size", 3)
        assert code == 0, err
        result, t1 = load_volume(out), load_volume(subject_files["t1"])
        assert result.shape == t1.shape
        assert np.allclose(result.affine, t1.affine, atol=1e-5)
        assert result.array.dtype == np.float32 and 0 <= result.array.min() and result.array.max() <= 1000


def test_info(capsys, tiny_bundle):
    code, out, _ = run(capsys, "info", tiny_bundle)
    assert code == 0 and "t1 + t2 -> flair" in out and "--t1, --t2" in out


def _error(capsys, *args):
    code, _, err = run(capsys, *args)
    assert code == 2
    lines = [l for l in err.strip().splitlines() if l.startswith("mrisynthesis: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_errors_are_one_line(capsys, tmp_path, subject_files, tiny_bundle):
    t1, t2 = subject_files["t1"], subject_files["t2"]
    out = tmp_path / "o.nii.gz"
    assert "file not found" in _error(capsys, "predict", "--t1", tmp_path / "no.nii.gz", "--t2", t2,
                                      "--model", tiny_bundle, "-o", out)
    assert "t2 was not given" in _error(capsys, "predict", "--t1", t1, "--model", tiny_bundle, "-o", out)
    assert "cannot use t1c" in _error(capsys, "predict", "--t1", t1, "--t2", t2, "--t1c", subject_files["t1c"],
                                      "--model", tiny_bundle, "-o", out)
    assert "refusing to overwrite an input" in _error(capsys, "predict", "--t1", t1, "--t2", t2,
                                                      "--model", tiny_bundle, "-o", t2)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage garbage garbage")
    assert "not a model bundle" in _error(capsys, "predict", "--t1", t1, "--t2", t2, "--model", bad, "-o", out)
    assert "not a model bundle" in _error(capsys, "info", bad)
    assert not out.exists()


def test_bad_volume_files(capsys, tmp_path, subject_files, tiny_bundle):
    t1 = load_volume(subject_files["t1"])
    out = tmp_path / "o.nii.gz"
    import nibabel as nib

    cases = {
        "2d.nii.gz": (t1.array[:, :, 5], "expected a 3D volume"),
        "4d.nii.gz": (np.stack([t1.array, t1.array], -1), "expected a 3D volume"),
        "nan.nii.gz": (np.where(t1.array > 300, np.nan, t1.array), "NaN"),
        "zero.nii.gz": (np.zeros_like(t1.array), "all voxels are zero"),
    }
    for name, (array, message) in cases.items():
        nib.save(nib.Nifti1Image(array.astype(np.float32), t1.affine), str(tmp_path / name))
        line = _error(capsys, "predict", "--t1", subject_files["t1"], "--t2", tmp_path / name,
                      "--model", tiny_bundle, "-o", out)
        assert message in line and "t2" in line
    far = t1.affine.copy()
    far[:3, 3] += 1000
    save_volume(Volume(t1.array, far), tmp_path / "far.nii.gz")
    assert "does not overlap" in _error(capsys, "predict", "--t1", subject_files["t1"], "--t2",
                                        tmp_path / "far.nii.gz", "--model", tiny_bundle, "-o", out)
    assert not out.exists()


def test_existing_output_needs_overwrite(capsys, tmp_path, subject_files, tiny_bundle):
    out = tmp_path / "o.nii.gz"
    out.write_bytes(b"precious")
    line = _error(capsys, "predict", "--t1", subject_files["t1"], "--t2", subject_files["t2"],
                  "--model", tiny_bundle, "-o", out)
    assert "exists" in line and out.read_bytes() == b"precious"


def test_default_model_is_the_shipped_one(capsys, tmp_path, subject_files, monkeypatch):
    models = tmp_path / "models"
    models.mkdir()
    make_bundle(models / "t1_to_flair.safetensors", sources=("t1",))
    monkeypatch.setenv("MRISYNTHESIS_MODELS", str(models))
    code, out, err = run(capsys, "predict", "--t1", subject_files["t1"], "-o", tmp_path / "o.nii.gz")
    assert code == 0, err
    assert "t1_to_flair" in out
