"""The demo's simulated case (phantom.py) and the demo runner (demo.py)."""

import argparse
import json
import math
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from MRISynthesisLib.inference import preferred_precision

from conftest import make_bundle

pytest.importorskip("nilearn", reason="the demo's default case is built from nilearn's ICBM152 template")

from MRISynthesisLib import demo, models  # noqa: E402
from MRISynthesisLib.bundle import bundle_from_generator, save_bundle  # noqa: E402
from MRISynthesisLib.networks import ModelConfig, build_generator, init_weights  # noqa: E402
from MRISynthesisLib.errors import BundleError, InputError  # noqa: E402
from MRISynthesisLib.phantom import (SEQUENCES, TISSUES, flair_null_ti, make_phantom,  # noqa: E402
                                     save_phantom, signal)
from MRISynthesisLib.preprocessing import PreprocessingConfig, normalize_intensity, to_output_scale  # noqa: E402
from MRISynthesisLib.volumes import Volume, load_volume  # noqa: E402

TEMPLATE_SHAPE = (197, 233, 189)
TEMPLATE_AFFINE = np.array([[1, 0, 0, -98], [0, 1, 0, -134], [0, 0, 1, -72], [0, 0, 0, 1]], dtype=float)


@pytest.fixture(scope="module")
def phantom_1mm():
    return make_phantom(seed=0)


@pytest.fixture(scope="module")
def phantom_2mm():
    return make_phantom(seed=0, resolution=2)


def pure(phantom, tissue, threshold=0.95):
    return phantom.fractions[tissue] > threshold


def mean_in(phantom, name, tissue):
    return float(phantom.volumes[name].array[pure(phantom, tissue)].mean())


# ------------------------------------------------------------------------------ phantom


def test_phantom_geometry_is_the_template(phantom_1mm):
    p = phantom_1mm
    assert set(p.volumes) == {"t1", "t2", "t1c", "flair"}
    for v in [*p.volumes.values(), p.mask, p.lesion]:
        assert v.shape == TEMPLATE_SHAPE
        assert np.array_equal(v.affine, TEMPLATE_AFFINE)
        assert v.array.dtype == np.float32 and np.all(np.isfinite(v.array))
    mask = p.mask.array > 0
    assert 1.8e6 < mask.sum() < 2.0e6  # about 1.9 litres of brain + CSF
    for v in p.volumes.values():
        assert not np.any(v.array[~mask])  # skull-stripped: exact zero outside
        assert np.all(v.array[mask] > 0)  # Rician magnitude is positive inside
    fractions = sum(p.fractions.values())
    assert np.allclose(fractions[mask], 1.0, atol=1e-5)


def test_phantom_tissue_contrasts(phantom_1mm):
    p = phantom_1mm
    t1 = {t: mean_in(p, "t1", t) for t in ("wm", "gm", "csf")}
    t2 = {t: mean_in(p, "t2", t) for t in ("wm", "gm", "csf")}
    fl = {t: mean_in(p, "flair", t) for t in ("wm", "gm", "csf", "lesion")}
    assert t1["wm"] > 1.1 * t1["gm"] > 1.1 * t1["csf"]
    assert t2["csf"] > 1.5 * t2["gm"] > 1.5 * t2["wm"]
    # A real 3 T FLAIR: grey matter slightly brighter than white, CSF nulled, lesions bright.
    assert 1.05 * fl["wm"] < fl["gm"] < 1.35 * fl["wm"] and fl["csf"] < 0.15 * fl["wm"]
    assert fl["lesion"] > 1.5 * fl["wm"]  # white-matter hyperintensity
    assert mean_in(p, "t2", "lesion") > 2 * t2["wm"]
    assert mean_in(p, "t1", "lesion") < 0.9 * t1["wm"]  # long T1: darker than white matter


def test_phantom_lesions_look_like_real_lesions(phantom_1mm):
    """Lesion mean over brain median in the band the real MS lesions and tumour oedema of
    ../shared/data span (ms-mni-07/-19, brats18-cbica-abm: phantom.py's table), per contrast."""
    p = phantom_1mm
    lesion, brain = p.lesion.array > 0.5, p.mask.array > 0
    bands = {"t1": (0.8, 1.05), "t2": (1.4, 1.7), "flair": (1.3, 1.9)}
    for name, (low, high) in bands.items():
        a = p.volumes[name].array
        assert low < a[lesion].mean() / np.median(a[brain]) < high, name


def test_phantom_lesions_are_in_white_matter(phantom_1mm, phantom_2mm):
    for p in (phantom_1mm, phantom_2mm):
        lesion = p.lesion.array
        assert 4000 < lesion.sum() * np.prod(p.lesion.spacing) < 15000  # mm^3, three blobs of 8-12 mm
        assert np.allclose(lesion, p.fractions["lesion"])
        # The lesion replaced white matter: at its core there is no GM/CSF.
        core = lesion > 0.9
        assert core.any() and p.fractions["gm"][core].max() < 0.1 and p.fractions["csf"][core].max() < 0.1
    healthy = make_phantom(seed=0, resolution=2, num_lesions=0)
    assert not healthy.lesion.array.any()


def test_phantom_t1c_enhances_vessels_only(phantom_1mm):
    p = phantom_1mm
    diff = p.volumes["t1c"].array - p.volumes["t1"].array
    inside = p.mask.array > 0
    enhancing = diff > 200
    assert 0.001 < enhancing.sum() / inside.sum() < 0.01
    # Parenchyma away from the surface: same signal up to noise (sigma = 20).
    deep = pure(p, "wm")
    assert abs(float(diff[deep].mean())) < 2.0
    assert p.volumes["t1c"].array[enhancing].mean() > 1.3 * mean_in(p, "t1", "wm")


def test_phantom_rician_noise_floor(phantom_1mm):
    # FLAIR nulls CSF, so pure CSF shows the Rician floor sigma * sqrt(pi / 2) = 25 at 2 %.
    floor = float(phantom_1mm.volumes["flair"].array[phantom_1mm.fractions["csf"] > 0.99].mean())
    assert 20.0 < floor < 35.0
    noiseless = make_phantom(seed=0, resolution=2, noise=0.0, num_lesions=0)
    csf = noiseless.fractions["csf"] > 0.9999
    assert csf.sum() > 50 and noiseless.volumes["flair"].array[csf].max() < 0.5


def test_signal_equations():
    ti = flair_null_ti(9000.0, 4200.0)
    assert ti == pytest.approx(4200.0 * math.log(2 / (1 + math.exp(-9000 / 4200))))
    assert 2300 < ti < 2600  # a usual 3 T FLAIR inversion time
    assert abs(signal(TISSUES["csf"], SEQUENCES["flair"])) < 1e-12
    wm = signal(TISSUES["wm"], SEQUENCES["t1"])
    assert wm == pytest.approx(0.69 * math.exp(-10 / 69) * (1 - math.exp(-500 / 1084)))
    assert signal(TISSUES["wm"], SEQUENCES["t1c"], r1_extra=4.5e-3 * 0.3) > wm  # gadolinium brightens


def test_phantom_is_deterministic_for_a_seed(phantom_2mm):
    again = make_phantom(seed=0, resolution=2)
    for name in phantom_2mm.volumes:
        assert np.array_equal(phantom_2mm.volumes[name].array, again.volumes[name].array)
    assert np.array_equal(phantom_2mm.lesion.array, again.lesion.array)
    other = make_phantom(seed=1, resolution=2)
    assert not np.array_equal(phantom_2mm.volumes["t1"].array, other.volumes["t1"].array)
    assert not np.array_equal(phantom_2mm.lesion.array, other.lesion.array)  # lesions moved


def test_phantom_2mm_grid(phantom_2mm):
    p = phantom_2mm
    assert p.mask.shape == tuple(n // 2 for n in TEMPLATE_SHAPE)
    expected = TEMPLATE_AFFINE.copy()
    expected[:3, :3] *= 2
    expected[:3, 3] += 0.5  # centre of the first 2x2x2 block
    assert np.allclose(p.affine, expected)
    # The 2 mm brain covers the same volume as the 1 mm one (within partial-volume rounding).
    assert (p.mask.array > 0).sum() * 8 == pytest.approx(1.886e6, rel=0.02)


def test_phantom_bad_arguments():
    with pytest.raises(InputError, match="resolution"):
        make_phantom(resolution=0)
    with pytest.raises(InputError, match="noise"):
        make_phantom(noise=-0.1)


def test_save_phantom_roundtrip(phantom_2mm, tmp_path):
    paths = save_phantom(phantom_2mm, tmp_path / "case")
    assert set(paths) == {"t1", "t2", "t1c", "flair", "mask", "lesion"}
    back = load_volume(paths["flair"], "flair")
    assert back.same_grid(phantom_2mm.mask)
    assert np.array_equal(back.array, phantom_2mm.volumes["flair"].array)


# ------------------------------------------------------------------------------ demo


def small_bundle(path, sources):
    """A tiny random bundle working on 64x64 slices: the demo's plumbing at a small cost."""
    torch.manual_seed(0)
    cfg = ModelConfig(num_sources=len(sources), base_width=4)
    bundle = bundle_from_generator(init_weights(build_generator(cfg)), cfg, sources,
                                   preprocessing=PreprocessingConfig(image_size=64),
                                   provenance={"note": "randomly initialised test bundle"})
    save_bundle(bundle, path)
    return Path(path)


@pytest.fixture
def bundle3(tmp_path):
    return small_bundle(tmp_path / "tiny3.safetensors", ("t1", "t2", "t1c"))


def run_demo(argv):
    args = demo.add_demo_arguments(argparse.ArgumentParser()).parse_args(argv)
    return demo.demo_main(args)


def test_demo_end_to_end_on_the_phantom(tmp_path, bundle3, phantom_2mm):
    out = tmp_path / "out"
    assert demo.main(["--model", str(bundle3), "--out", str(out), "--resolution", "2", "-q"]) == 0
    for name in ("synthetic_flair.nii.gz", "figure.png", "metrics.json"):
        assert (out / name).is_file()
    assert (out / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("t1", "t2", "t1c", "flair", "mask", "lesion"):
        assert (out / "phantom" / f"{name}.nii.gz").is_file()
    synthetic = load_volume(out / "synthetic_flair.nii.gz", "synthetic")
    assert synthetic.same_grid(phantom_2mm.mask)
    assert np.array_equal(nib.load(out / "phantom" / "t1.nii.gz").get_fdata(dtype=np.float32),
                          phantom_2mm.volumes["t1"].array)
    assert not np.any(synthetic.array[phantom_2mm.mask.array == 0])
    report = json.loads((out / "metrics.json").read_text())
    assert report["sources"] == ["t1", "t2", "t1c"] and report["precision"] == preferred_precision(torch.device("cpu"))
    m = report["metrics"]
    for key in ("psnr", "ssim", "nrmse", "psnr_masked", "ssim_masked", "nrmse_masked"):
        assert math.isfinite(m[key]), key
    brain_slices = int(np.any(phantom_2mm.mask.array > 0, axis=(0, 1)).sum())
    assert m["num_slices"] == brain_slices
    assert report["phantom"]["seed"] == 0 and report["phantom"]["resolution_mm"] == 2
    # A second run into the same folder is allowed (the demo wrote it).
    assert demo.main(["--model", str(bundle3), "--out", str(out), "--resolution", "4", "-q",
                      "--sources", "t1,t2,t1c"]) == 0
    assert json.loads((out / "metrics.json").read_text())["phantom"]["resolution_mm"] == 4


def test_metrics_of_a_perfect_synthesis_are_perfect(phantom_2mm):
    config = PreprocessingConfig()
    mask = phantom_2mm.mask.array > 0
    flair = phantom_2mm.volumes["flair"]
    perfect = Volume(to_output_scale(normalize_intensity(flair.array, mask, config), config), flair.affine)
    real, fake = demo.normalized_pair(perfect, flair, mask, config)
    assert np.allclose(real, fake, atol=1e-5)
    m = demo.evaluate(real, fake, mask, flair.affine)
    assert m["ssim"] == pytest.approx(1.0) and m["nrmse"] == pytest.approx(0.0, abs=1e-5)
    worse = demo.evaluate(real, np.where(mask, fake * 0.5, -1.0), mask, flair.affine)
    assert worse["psnr"] < 30 and worse["ssim"] < 1.0 and worse["nrmse"] > 0.05


def test_demo_picks_the_richest_shipped_model(tmp_path, monkeypatch):
    shipped = tmp_path / "models"
    shipped.mkdir()
    make_bundle(shipped / "t1_to_flair.safetensors", sources=("t1",))
    make_bundle(shipped / "t1_t2_to_flair.safetensors", sources=("t1", "t2"))
    monkeypatch.setattr(models, "models_dirs", lambda: [shipped])
    bundle, sources = demo.choose_model(None, None, ["t1", "t2", "t1c"])
    assert sources == ("t1", "t2") and Path(bundle.path).name == "t1_t2_to_flair.safetensors"
    bundle, sources = demo.choose_model(None, ("t1",), ["t1", "t2", "t1c"])
    assert sources == ("t1",)
    _, sources = demo.choose_model(None, None, ["t1"])
    assert sources == ("t1",)
    with pytest.raises(BundleError, match="pass --model"):
        demo.choose_model(None, ("t1", "t2", "t1c"), ["t1", "t2", "t1c"])
    with pytest.raises(InputError, match="t1c"):
        demo.choose_model(None, ("t1", "t1c"), ["t1", "t2"])
    with pytest.raises(InputError, match="does not match"):
        demo.choose_model(str(shipped / "t1_to_flair.safetensors"), ("t1", "t2"), ["t1", "t2"])


def test_demo_without_shipped_model_says_pass_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(models, "models_dirs", lambda: [tmp_path / "none"])
    out = tmp_path / "out"
    assert demo.main(["--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert "no shipped model" in err and "pass --model" in err and err.count("\n") == 1
    assert not out.exists()  # failed before writing anything


def test_demo_refuses_to_overwrite_inputs(tmp_path, subject_files):
    subject = subject_files["t1"].parent
    bundle = make_bundle(tmp_path / "b.safetensors", sources=("t1", "t2"))
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(subject_files["t1"], out / "synthetic_flair.nii.gz")
    before = subject_files["t1"].read_bytes()
    with pytest.raises(InputError, match="refusing to overwrite"):
        run_demo(["--subject", str(subject), "--model", str(bundle), "--out", str(out), "-q"])
    assert subject_files["t1"].read_bytes() == before
    # A phantom/ folder that the demo did not write is not overwritten either.
    user = tmp_path / "user"
    (user / "phantom").mkdir(parents=True)
    (user / "phantom" / "t1.nii.gz").write_bytes(b"mine")
    bundle3 = make_bundle(tmp_path / "b3.safetensors", sources=("t1", "t2", "t1c"))
    with pytest.raises(InputError, match="not written by the demo"):
        run_demo(["--model", str(bundle3), "--out", str(user), "--resolution", "2", "-q"])
    assert (user / "phantom" / "t1.nii.gz").read_bytes() == b"mine"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        run_demo(["--model", str(bundle3), "--out", str(tmp_path / "afile"), "-q"])


def test_demo_subject_folder_without_flair(tmp_path, subject_files):
    subject = subject_files["t1"].parent
    subject_files["flair"].unlink()
    bundle = small_bundle(tmp_path / "b.safetensors", ("t1", "t2"))
    out = tmp_path / "out"
    assert run_demo(["--subject", str(subject), "--model", str(bundle), "--out", str(out), "-q"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["metrics"] is None and report["sources"] == ["t1", "t2"]
    assert (out / "figure.png").is_file() and not (out / "phantom").exists()
    synthetic = load_volume(out / "synthetic_flair.nii.gz", "synthetic")
    assert synthetic.same_grid(load_volume(subject_files["t1"], "t1"))


def test_demo_subject_folder_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        demo.find_subject_files(tmp_path / "missing")
    (tmp_path / "t2.nii.gz").write_bytes(b"")
    with pytest.raises(InputError, match="no t1"):
        demo.find_subject_files(tmp_path)
    (tmp_path / "t1.nii.gz").write_bytes(b"")
    (tmp_path / "t1.nrrd").write_bytes(b"")
    with pytest.raises(InputError, match="several t1"):
        demo.find_subject_files(tmp_path)


def test_demo_on_a_real_subject(real_data, tmp_path):
    preferred = ["ms-long-03b", "ms-long-04a", "ms-mni-07", "brats-gli-00001"]
    folders = [real_data / n for n in preferred if (real_data / n / "t2.nii.gz").is_file()]
    if not folders:
        pytest.skip(f"no subject with t1 and t2 in {real_data}")
    subject = folders[0]
    bundle = small_bundle(tmp_path / "b.safetensors", ("t1", "t2"))
    out = tmp_path / "out"
    assert run_demo(["--subject", str(subject), "--model", str(bundle), "--out", str(out), "-q"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert all(math.isfinite(report["metrics"][k]) for k in ("psnr", "ssim", "nrmse", "ssim_masked"))
    assert report["inputs"]["t1"] == str(subject / "t1.nii.gz")
    synthetic = load_volume(out / "synthetic_flair.nii.gz", "synthetic")
    assert synthetic.same_grid(load_volume(subject / "t1.nii.gz", "t1"))
    assert sorted(os.listdir(out)) == ["figure.png", "metrics.json", "synthetic_flair.json", "synthetic_flair.nii.gz"]
    sidecar = json.loads((out / "synthetic_flair.json").read_text())
    assert sidecar["Synthetic"] is True and sidecar["Sources"][0] == str(subject / "t1.nii.gz")


def test_figure_slices_include_the_lesion_and_stay_apart():
    mask = np.zeros((4, 4, 100), bool)
    mask[..., 10:90] = True
    lesion = np.zeros(mask.shape, np.float32)
    lesion[1, 1, 55] = 1
    assert demo.figure_slices(mask) == [34, 50, 65]
    assert demo.figure_slices(mask, lesion) == [34, 55, 65]
