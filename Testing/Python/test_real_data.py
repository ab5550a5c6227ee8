"""Integration tests on real co-registered MRI (MRISYNTHESIS_DATA, e.g. ../shared/data).

A randomly initialised small bundle is used, so these check geometry, dtype, value range
and errors, not image quality (see test_shipped_models.py for that)."""

import numpy as np
import pytest

from MRISynthesisLib.cli import main
from MRISynthesisLib.volumes import load_volume

from conftest import make_bundle

CASES = [
    # subject, sources, uses mask: BraTS 240x240x155 LPS-stored; MNI 182x218x182;
    # clinical thick-slice 0.72 mm in-plane, not skull-stripped (brain mask given)
    ("brats-gli-00001", ("t1", "t2", "t1c"), False),
    ("ms-mni-07", ("t1", "t2"), False),
    ("ms-long-01a", ("t1", "t2"), True),
    ("tcga-du-7294", ("t1",), False),
]


@pytest.mark.parametrize("subject,sources,use_mask", CASES)
def test_predict_on_real_case(real_data, tmp_path, capsys, subject, sources, use_mask):
    folder = real_data / subject
    bundle = make_bundle(tmp_path / "m.safetensors", sources=sources, width=4)
    out = tmp_path / "flair.nii.gz"
    args = ["predict", "--model", str(bundle), "-o", str(out), "--precision", "bf16", "-q"]
    for s in sources:
        args += [f"--{s}", str(folder / f"{s}.nii.gz")]
    if use_mask:
        args += ["--mask", str(folder / "mask.nii.gz")]
    assert main(args) == 0, capsys.readouterr().err
    result, t1 = load_volume(out), load_volume(folder / "t1.nii.gz")
    assert result.shape == t1.shape
    assert np.allclose(result.affine, t1.affine, atol=1e-5)
    assert result.array.dtype == np.float32
    assert result.array.min() >= 0 and result.array.max() <= 1000
    brain = load_volume(folder / "mask.nii.gz").array > 0 if use_mask else t1.array != 0
    assert np.all(result.array[~brain] == 0)
    assert result.array[brain].std() > 0


def test_real_case_errors(real_data, tmp_path, capsys):
    folder = real_data / "brats-gli-00001"
    bundle = make_bundle(tmp_path / "m.safetensors", sources=("t1", "t2"), width=4)
    out = tmp_path / "o.nii.gz"
    code = main(["predict", "--t1", str(folder / "t1.nii.gz"), "--model", str(bundle), "-o", str(out)])
    assert code == 2 and "t2 was not given" in capsys.readouterr().err
    # Another subject's T2 on another grid and far from this head in world space would be
    # caught by the overlap check; the MNI subject's grid overlaps, so it is resampled.
    code = main(["predict", "--t1", str(folder / "t1.nii.gz"), "--t2", str(folder / "t2.nii.gz"),
                 "--model", str(bundle), "-o", str(folder / "t2.nii.gz")])
    assert code == 2 and "refusing to overwrite" in capsys.readouterr().err
    assert not out.exists()
