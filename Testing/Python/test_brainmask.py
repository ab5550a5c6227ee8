"""The brain-mask policy (MRISynthesisLib.brainmask): modes, the skull-stripped rule, the
non-brain checks, the CLI options, and extraction on a real raw head."""

import os
import subprocess
import sys

import numpy as np
import pytest

from MRISynthesisLib import brainmask
from MRISynthesisLib.brainmask import (BRAIN_MASK_MODES, SOURCE_EXTRACTED, SOURCE_GIVEN, SOURCE_NONE,
                                       SOURCE_STRIPPED, grow_mask, resolve_brain_mask, skull_stripped)
from MRISynthesisLib.cli import main
from MRISynthesisLib.errors import InputError
from MRISynthesisLib.subjects import subject_files
from MRISynthesisLib.volumes import Volume, load_volume, save_volume

from conftest import data_dir, head_phantom

RAW_HEAD = "ms-long-04a"  # whole head, 3 mm slices, with the dataset's brain mask


def _ellipsoid(shape, spacing, radii_fraction=0.8, contrast=True, seed=0):
    """An ellipsoid with tissue-like contrast in a zero background, on a grid of ``spacing`` mm."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    inside = np.sqrt((grid ** 2).sum(0)) < radii_fraction
    values = 300 + (200 * np.cos(6 * grid[0]) if contrast else 0) + np.random.default_rng(seed).normal(0, 5, shape)
    return Volume((values * inside).astype(np.float32), np.diag([*spacing, 1.0]))


def test_modes_and_sources():
    assert BRAIN_MASK_MODES == ("auto", "none")
    t1 = head_phantom()
    for spec in ("none", None):
        decision = resolve_brain_mask(spec, t1)
        assert decision.array is None and decision.source == SOURCE_NONE and decision.description
    decision = resolve_brain_mask("auto", t1)  # small, zero background: already stripped
    assert decision.array is None and decision.source == SOURCE_STRIPPED and "skull-stripped" in decision.description
    mask = np.zeros(t1.shape, np.float32)
    mask[10:30, 10:30, 5:20] = 1
    decision = resolve_brain_mask(Volume(mask, t1.affine), t1)
    assert decision.source == SOURCE_GIVEN and np.array_equal(decision.array, mask > 0)
    with pytest.raises(InputError, match="no voxel is inside the mask"):  # non-zero but nothing > 0
        resolve_brain_mask(Volume(-np.ones(t1.shape, np.float32), t1.affine), t1)
    with pytest.raises(InputError, match="neither auto nor none"):
        resolve_brain_mask("automatic", t1)


def test_given_mask_file_on_another_grid_is_resampled(tmp_path):
    t1 = head_phantom()
    coarse = np.diag([2.2, 1.8, 4.0, 1.0])
    coarse[:3, 3] = t1.affine[:3, 3]
    save_volume(Volume(np.ones((20, 24, 12), np.float32), coarse), tmp_path / "mask.nii.gz")
    decision = resolve_brain_mask(str(tmp_path / "mask.nii.gz"), t1)
    assert decision.source == SOURCE_GIVEN and decision.array.shape == t1.shape and decision.array.mean() > 0.8


def test_skull_stripped_rule_by_physical_volume():
    # Same voxels, two voxel sizes: 1 mm -> 1.1 l of non-zero voxels (a brain), 2 mm -> 8.6 l (a head).
    brain = _ellipsoid((160, 160, 130), (1.0, 1.0, 1.0))
    head = _ellipsoid((160, 160, 130), (2.0, 2.0, 2.0))
    assert brainmask.nonzero_ml(brain) < brainmask.STRIPPED_MAX_ML < brainmask.nonzero_ml(head)
    assert skull_stripped(brain) and not skull_stripped(head)


def test_non_brain_images_are_refused():
    cube = np.zeros((60, 60, 40), np.float32)
    cube[10:50, 10:50, 5:35] = 500 + np.random.default_rng(0).normal(0, 20, (40, 40, 30))
    with pytest.raises(InputError, match="bounding box"):
        resolve_brain_mask("auto", Volume(cube, np.eye(4)))
    flat = _ellipsoid((60, 60, 40), (1.0, 1.0, 1.0), contrast=False)
    with pytest.raises(InputError, match="uniform intensity"):
        resolve_brain_mask("auto", flat)
    t1 = head_phantom()
    with pytest.raises(InputError, match="empty"):
        brainmask.check_brain_like(np.zeros(t1.shape, bool), t1, "the brain extracted from t1", extracted=True)
    small = t1.array != 0
    with pytest.raises(InputError, match="too small"):
        brainmask.check_brain_like(small, t1, "the brain extracted from t1", extracted=True)


def test_grow_mask_is_a_physical_margin():
    from scipy import ndimage

    mask = np.zeros((40, 40, 16), bool)
    mask[12:25, 10:30, 5:10] = True
    spacing = (0.7, 0.9, 3.0)
    grown = grow_mask(mask, spacing, 2.0)
    assert np.array_equal(grown, mask | (ndimage.distance_transform_edt(~mask, sampling=spacing) <= 2.0))
    assert grown[12:25, 10:30, 4].sum() == 0  # 3 mm slices: a 2 mm margin adds none through-plane
    assert grown[10, 15, 7] and not grown[8, 15, 7]  # 1.4 mm in, 2.8 mm out


def test_extraction_needs_no_display():
    code = ("import sys, numpy as np; from MRISynthesisLib.brainmask import _deepbet; _deepbet('cpu'); "
            "bad = [m for m in ('customtkinter', 'tkinter', '_tkinter') if m in sys.modules]; "
            "sys.exit(f'GUI modules imported: {bad}' if bad else 0)")
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_cli_options(capsys, tmp_path, subject_files, tiny_bundle):
    t1, t2 = str(subject_files["t1"]), str(subject_files["t2"])
    out, saved = tmp_path / "o.nii.gz", tmp_path / "brain.nii.gz"
    code = main(["predict", "--t1", t1, "--t2", t2, "--model", str(tiny_bundle), "-o", str(out),
                 "--save-mask", str(saved)])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert "already skull-stripped" in stdout  # the decision is said
    mask = load_volume(saved)
    assert mask.same_grid(load_volume(out)) and set(np.unique(mask.array)) == {0.0, 1.0}
    assert np.array_equal(mask.array > 0, load_volume(t1).array != 0)

    def error(*args):
        code = main([str(a) for a in args])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1, lines
        return lines[0]

    base = ["predict", "--t1", t1, "--t2", t2, "--model", tiny_bundle]
    fresh = tmp_path / "fresh.nii.gz"
    assert "expected auto or none or an existing mask file" in error(*base, "--brain-mask", "nope", "-o", fresh)
    assert "give the mask once" in error(*base, "--brain-mask", t1, "--mask", t1, "-o", fresh)
    assert "exists; pass --overwrite" in error(*base, "--save-mask", saved, "-o", fresh)
    assert "refusing to overwrite an input" in error(*base, "--save-mask", t2, "-o", fresh)
    cube = np.zeros((40, 40, 30), np.float32)
    cube[5:35, 5:35, 5:25] = 400
    save_volume(Volume(cube, np.eye(4)), tmp_path / "cube.nii.gz")
    message = error("predict", "--t1", tmp_path / "cube.nii.gz", "--t2", tmp_path / "cube.nii.gz", "--model",
                    tiny_bundle, "-o", fresh, "--save-mask", tmp_path / "cube_mask.nii.gz")
    assert "does not look like a brain scan" in message
    assert not fresh.exists() and not (tmp_path / "cube_mask.nii.gz").exists()
    # --brain-mask FILE and the older --mask FILE give the same result
    for option, name in (("--brain-mask", "a.nii.gz"), ("--mask", "b.nii.gz")):
        assert main([*map(str, base), option, str(saved), "-o", str(tmp_path / name), "-q"]) == 0
    assert np.array_equal(load_volume(tmp_path / "a.nii.gz").array, load_volume(tmp_path / "b.nii.gz").array)


def test_rule_on_every_subject_of_the_data():
    """The rule against the data README: the subjects with their own mask.nii.gz (ms-long-*)
    are whole heads, all others are skull-stripped."""
    data = data_dir()
    if data is None:
        pytest.skip("real data not available: set MRISYNTHESIS_DATA to the shared data folder")
    checked = 0
    for folder in sorted(p for p in data.iterdir() if p.is_dir()):
        files = subject_files(folder)
        if "t1" not in files:
            continue
        assert skull_stripped(load_volume(files["t1"])) == ("mask" not in files), folder.name
        checked += 1
    assert checked >= 20


@pytest.fixture
def raw_head():
    data = data_dir()
    if data is None or not (data / RAW_HEAD / "mask.nii.gz").is_file():
        pytest.skip(f"real data not available: set MRISYNTHESIS_DATA to the shared data folder (needs {RAW_HEAD})")
    return subject_files(data / RAW_HEAD)


def test_extraction_on_a_raw_head_matches_the_dataset_mask_and_the_default_path_scores(raw_head, one_thread):
    """Item 7 of issue 10: deepbet's mask overlaps the dataset's (Dice >= 0.9) and the default
    path (no mask given) scores within 0.5 dB of the path given the dataset's mask."""
    from MRISynthesisLib.bundle import load_bundle
    from MRISynthesisLib.demo import evaluate, normalized_pair
    from MRISynthesisLib.inference import synthesize_with_details
    from MRISynthesisLib.models import resolve_model

    inputs = {"t1": load_volume(raw_head["t1"], "t1"), "t2": load_volume(raw_head["t2"], "t2")}
    flair, dataset_mask = load_volume(raw_head["flair"]), load_volume(raw_head["mask"])
    region = dataset_mask.array > 0
    bundle = load_bundle(resolve_model(None, ("t1", "t2")))
    generator = bundle.build_generator("cpu")
    scores = {}
    for label, spec in (("default", "auto"), ("dataset mask", dataset_mask)):
        result = synthesize_with_details(inputs, bundle, mask=spec, device="cpu", generator=generator)
        real, fake = normalized_pair(result.volume, flair, region, bundle.preprocessing)
        scores[label] = evaluate(real, fake, region, result.volume.affine)["psnr_masked"]
        if label == "default":
            assert result.mask_decision.source == SOURCE_EXTRACTED
            extracted = result.brain_mask.array > 0
            assert np.array_equal(extracted, result.mask_decision.array)
            assert np.all(result.volume.array[~extracted] == 0)  # background outside the brain
    dice = 2 * np.count_nonzero(extracted & region) / (np.count_nonzero(extracted) + np.count_nonzero(region))
    assert dice >= 0.9, dice
    assert scores["default"] >= scores["dataset mask"] - 0.5, scores
