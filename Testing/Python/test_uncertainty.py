"""The optional uncertainty map (test-time augmentation, MRISynthesisLib.uncertainty): the
synthetic image is unchanged by asking for it, the map is the spread of the passes, it is
written and marked on the command line, and the validation measures mean what they say."""

import json

import numpy as np
import pytest
import torch

from MRISynthesisLib import uncertainty as unc
from MRISynthesisLib.cli import main
from MRISynthesisLib.inference import synthesize_with_details
from MRISynthesisLib.volumes import load_volume

from conftest import head_phantom, make_bundle


def _inputs():
    return {"t1": head_phantom(seed=0), "t2": head_phantom(seed=1)}


@pytest.mark.parametrize("augmentation", [unc.FLIP, *unc.SHIFTS, unc.Augmentation("both", flip=True, shift=(2, -1))])
def test_geometric_augmentations_are_undone_exactly(augmentation):
    x = torch.randn(2, 3, 16, 12)
    moved = augmentation.apply(x, num_sources=3)
    assert not torch.equal(moved, x)
    assert torch.equal(augmentation.undo(moved), x)


def test_intensity_jitter_keeps_background_and_scales_each_source():
    x = torch.full((1, 2 * 3, 4, 4), -1.0)  # 2 sources with 2.5D context 1: 3 slices each
    x[:, :, 1:3, 1:3] = 0.0  # "brain" at the middle of the window
    y = unc.Augmentation("s", scale=(1.1, 0.9)).apply(x, num_sources=2)
    assert torch.all(y[:, :, 0, :] == -1.0)  # background stays background
    assert torch.allclose(y[0, :3, 1, 1], torch.tensor(0.1)) and torch.allclose(y[0, 3:, 1, 1], torch.tensor(-0.1))
    assert torch.equal(x, torch.where(x == -1.0, -1.0, 0.0))  # the input is left as it was
    with pytest.raises(ValueError, match="2 scale factors for 3 sources"):
        unc.Augmentation("s", scale=(1.1, 0.9)).apply(x, num_sources=3)


def test_map_is_off_by_default_and_leaves_the_synthetic_image_unchanged(tiny_bundle):
    plain = synthesize_with_details(_inputs(), str(tiny_bundle), mask="none", device="cpu", threads=1)
    assert plain.uncertainty is None and "Uncertainty" not in plain.provenance
    with_map = synthesize_with_details(_inputs(), str(tiny_bundle), mask="none", device="cpu", threads=1,
                                       uncertainty=True)
    np.testing.assert_array_equal(with_map.volume.array, plain.volume.array)
    u = with_map.uncertainty
    assert u.array.shape == plain.volume.shape and np.array_equal(u.affine, plain.volume.affine)
    brain = with_map.brain_mask.array > 0
    assert np.all(u.array[~brain] == 0) and np.all(u.array >= 0) and u.array[brain].max() > 0
    described = with_map.provenance["Uncertainty"]
    expected = unc.augmentation_set(unc.DEFAULT_SET, 2)
    assert described["NetworkPasses"] == 1 + len(expected)
    assert described["Augmentations"] == [a.name for a in expected]
    assert u.provenance["Kind"] == "uncertainty" and u.provenance["Synthetic"] is True


@pytest.mark.parametrize("threads", [1, 2])
def test_map_is_the_spread_of_the_kept_passes(tiny_bundle, threads):
    config = unc.TTAConfig(set_name="all", keep_passes=True)
    result = synthesize_with_details(_inputs(), str(tiny_bundle), mask="none", device="cpu", threads=threads,
                                     batch_size=3, uncertainty=config)
    names = [a.name for a in unc.augmentation_set("all", 2)]
    assert list(result.passes) == names
    passes = np.stack([result.volume.array] + [result.passes[n].array for n in names])
    np.testing.assert_allclose(result.uncertainty.array, unc.spread(passes), atol=1e-3)
    # Each pass is a plausible synthetic image of its own: same background, same range.
    for volume in result.passes.values():
        assert np.all(volume.array[result.brain_mask.array == 0] == 0) and volume.array.max() <= 1000
    # A flip of a random network changes its output: the map is not zero.
    assert result.uncertainty.array.max() > 1


def test_bad_uncertainty_spec_is_one_line_error(tiny_bundle):
    from MRISynthesisLib.errors import InputError

    with pytest.raises(InputError, match="unknown uncertainty method 'dropout'"):
        synthesize_with_details(_inputs(), str(tiny_bundle), mask="none", uncertainty="dropout")


def test_cli_writes_the_marked_map_and_the_same_synthetic_image(capsys, tmp_path, subject_files, tiny_bundle):
    base = ["predict", "--t1", subject_files["t1"], "--t2", subject_files["t2"], "--model", tiny_bundle,
            "--brain-mask", "none", "--threads", "1"]
    assert main([str(a) for a in base + ["-o", tmp_path / "plain.nii.gz"]]) == 0
    code = main([str(a) for a in base + ["-o", tmp_path / "o.nii.gz", "--uncertainty", tmp_path / "u.nii.gz"]])
    out = capsys.readouterr().out
    assert code == 0 and "the uncertainty map" in out and "network passes" in out
    np.testing.assert_array_equal(load_volume(tmp_path / "o.nii.gz").array, load_volume(tmp_path / "plain.nii.gz").array)
    u = load_volume(tmp_path / "u.nii.gz")
    assert u.shape == load_volume(subject_files["t1"]).shape and u.array.min() >= 0 and u.array.max() > 0
    record = json.loads((tmp_path / "u.json").read_text())
    assert record["Kind"] == "uncertainty" and record["Uncertainty"]["Name"] == unc.NAME
    assert "Not a confidence map" in record["Statement"] and "not a confidence map" in record["Uncertainty"]["Validation"]
    assert json.loads((tmp_path / "o.json").read_text())["Uncertainty"] == record["Uncertainty"]
    import nibabel as nib

    assert bytes(nib.load(str(tmp_path / "u.nii.gz")).header["intent_name"]).rstrip(b"\0") == b"TTA spread"
    code = main(["info", str(tmp_path / "u.nii.gz")])
    assert code == 0 and "TTA SPREAD OF A SYNTHETIC FLAIR" in capsys.readouterr().out


def test_validation_measures():
    rng = np.random.default_rng(0)
    error = rng.random(10000)
    assert unc.spearman(error, error) == pytest.approx(1.0)
    assert unc.spearman(-error, error) == pytest.approx(-1.0)
    assert abs(unc.spearman(rng.random(10000), error)) < 0.05
    assert np.isnan(unc.spearman(np.ones(100), error[:100]))
    # The 10 % most uncertain voxels: all the error when the map knows, 10 % when it is constant.
    spiky = np.zeros(1000)
    spiky[:100] = 1.0
    assert unc.top_share(spiky, spiky) == pytest.approx(1.0) == unc.oracle_share(spiky)
    assert unc.top_share(np.zeros(1000), spiky) == pytest.approx(0.1, abs=0.05)
    assert unc.top_share(np.zeros(1000), np.ones(1000)) == pytest.approx(0.1)
    assert unc.oracle_share(np.ones(1000)) == pytest.approx(0.1)


def test_trivial_maps():
    mask = np.zeros((20, 20, 10), bool)
    mask[5:15, 5:15, 2:8] = True
    synthetic = np.where(mask, 500.0, 0.0).astype(np.float32)
    maps = unc.trivial_maps(synthetic, mask, (1.0, 1.0, 2.0), axial_axis=2)
    assert set(maps) == set(unc.TRIVIAL_MAPS)
    assert maps["edge"][10, 10, 5] < maps["edge"][5, 10, 5]  # deeper = less near the edge
    assert maps["edge"][5, 10, 5] == pytest.approx(-1.0)
    assert maps["gradient"][10, 10, 5] == 0 and maps["gradient"][5, 10, 5] > 0
    assert maps["slice position"][10, 10, 2] == pytest.approx(5.0)  # (7 - 2) / 2 slices of 2 mm from the middle
    assert maps["slice position"][10, 10, 4] == maps["slice position"][10, 10, 5] == pytest.approx(1.0)
    np.testing.assert_array_equal(maps["intensity"], synthetic)


def test_2_5d_model_gets_a_map(tmp_path):
    bundle = make_bundle(tmp_path / "ctx.safetensors", context_slices=1)
    result = synthesize_with_details(_inputs(), str(bundle), mask="none", device="cpu", threads=1,
                                     uncertainty="intensity")
    assert result.uncertainty.array.max() > 0
    assert result.provenance["Uncertainty"]["Augmentations"][0].startswith("scale")
