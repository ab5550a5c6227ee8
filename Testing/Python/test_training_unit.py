"""training/: data discovery, split, schedule, losses, and a small end-to-end run on
generated volumes (checkpoint on SIGINT, bit-exact resume, cache, export, evaluation)."""

import json
import os
import shutil
import signal

import numpy as np
import pytest
import torch

from conftest import head_phantom
from MRISynthesisLib.bundle import bundle_from_generator, load_bundle, save_bundle
from MRISynthesisLib.errors import InputError
from MRISynthesisLib.networks import ModelConfig, build_generator
from MRISynthesisLib.volumes import Volume, load_volume, save_volume
from MRISynthesisLib.subjects import modality_of
from training import data as data_mod
from training import recipe, trainer
from training.cli import main as training_main
from training.evaluate import SPECTRUM, evaluate, render_report


pytestmark = pytest.mark.usefixtures("one_thread")


def touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def test_modality_names():
    cases = {
        "t1.nii.gz": "t1", "T1C.nii.gz": "t1c", "t2.nii": "t2", "flair.nii.gz": "flair", "mask.nii.gz": "mask",
        "BraTS20_Training_001_t1.nii.gz": "t1", "BraTS20_Training_001_t1ce.nii.gz": "t1c",
        "BraTS20_Training_001_t2.nii.gz": "t2", "BraTS20_Training_001_flair.nii.gz": "flair",
        "BraTS-GLI-00001-000-t1n.nii.gz": "t1", "BraTS-GLI-00001-000-t1c.nii.gz": "t1c",
        "BraTS-GLI-00001-000-t2w.nii.gz": "t2", "BraTS-GLI-00001-000-t2f.nii.gz": "flair",
        "Brats18_CBICA_AAB_1_flair.nii.gz": "flair", "case-t2.nrrd": "t2",
    }
    for name, modality in cases.items():
        assert modality_of(name) == modality, name
    for name in ("seg.nii.gz", "BraTS20_Training_001_seg.nii.gz", "seg_auto.nii.gz", "t1.txt", "notes.md",
                 "BraTS-GLI-00001-000-seg.nii.gz", "lesion_change_gt.nii.gz"):
        assert modality_of(name) is None, name


def test_discover_reports_missing_and_refuses_ambiguity(tmp_path):
    for f in ("a/t1.nii.gz", "a/t2.nii.gz", "a/flair.nii.gz", "a/seg.nii.gz",
              "b/B_t1.nii.gz", "b/B_flair.nii.gz",
              "c/C-t1n.nii.gz", "c/C-t2w.nii.gz", "c/C-t2f.nii.gz", "c/C-t1c.nii.gz", "c/mask.nii.gz"):
        touch(tmp_path / "data" / f)
    (tmp_path / "data" / "empty").mkdir()
    subjects = data_mod.discover(tmp_path / "data")
    assert [s.name for s in subjects] == ["a", "b", "c"]
    by = {s.name: s for s in subjects}
    assert by["b"].missing(["t1", "t2", "flair"]) == ["t2"]
    assert by["c"].mask is not None and by["a"].mask is None
    assert set(by["c"].files) == {"t1", "t2", "t1c", "flair", "mask"}
    report = data_mod.availability_report(subjects, ["t1", "t2", "flair"])
    assert "no (lacks t2)" in report.splitlines()[2] and report.splitlines()[1].endswith("yes")
    touch(tmp_path / "data" / "a" / "A_t1.nii.gz")
    with pytest.raises(InputError, match="both"):
        data_mod.discover(tmp_path / "data")
    with pytest.raises(InputError, match="not found"):
        data_mod.discover(tmp_path / "nowhere")


def test_discover_several_folders_and_lesion_labels(tmp_path):
    for f in ("one/a/t1.nii.gz", "one/a/flair.nii.gz", "one/a/seg.nii.gz",
              "one/b/t1.nii.gz", "one/b/seg_auto.nii.gz", "one/b/lesion_change_gt.nii.gz",
              "two/c/C_t1.nii.gz", "two/c/C_seg.nii.gz", "two/d/t1.nii.gz"):
        touch(tmp_path / f)
    subjects = data_mod.discover(f"{tmp_path / 'two'}{os.pathsep}{tmp_path / 'one'}")
    assert [s.name for s in subjects] == ["a", "b", "c", "d"]
    kinds = {s.name: (s.lesion.name if s.lesion else None, s.lesion_kind) for s in subjects}
    assert kinds == {"a": ("seg.nii.gz", "ground truth"), "b": ("seg_auto.nii.gz", "automatic"),
                     "c": ("C_seg.nii.gz", "ground truth"), "d": (None, None)}
    assert data_mod.discover([tmp_path / "one", tmp_path / "two"])[2].folder == tmp_path / "two" / "c"
    touch(tmp_path / "two" / "a" / "t1.nii.gz")
    with pytest.raises(InputError, match="subject a is in two data folders"):
        data_mod.discover(f"{tmp_path / 'one'}{os.pathsep}{tmp_path / 'two'}")


def test_split_is_seeded_disjoint_and_keeps_groups():
    names = [f"s{i:02d}" for i in range(20)] + ["brats20-001", "brats18-cbica-aab", "ms-long-01a", "ms-long-01b"]
    groups = data_mod.parse_groups(["s01,s02", "s02,s03"])
    assert sorted(map(sorted, groups)) == [["brats18-cbica-aab", "brats20-001"], ["ms-long-01a", "ms-long-01b"],
                                           ["s01", "s02", "s03"]]
    seen = set()
    for seed in range(6):
        split = data_mod.split_subjects(names, seed, 0.1, 0.2, groups)
        assert split == data_mod.split_subjects(list(reversed(names)), seed, 0.1, 0.2, groups)
        parts = [set(split[p]) for p in ("train", "val", "test")]
        assert set.union(*parts) == set(names) and sum(map(len, parts)) == len(names)
        for g in groups:
            assert sum(any(n in part for n in g) for part in parts) == 1, (seed, g)
        assert split["val"] and split["test"]
        seen.add(tuple(split["test"]))
    assert len(seen) > 1  # the seed matters
    assert data_mod.parse_groups(use_defaults=False) == []
    with pytest.raises(InputError):
        data_mod.split_subjects(names, 0, 0.5, 0.5)


def test_lr_schedule_and_l1_reduction():
    f = [trainer.lr_factor(e, 3, 4) for e in range(7)]
    assert f[:3] == [1.0, 1.0, 1.0]
    assert f[3:] == pytest.approx([0.8, 0.6, 0.4, 0.2])
    assert trainer.lr_factor(0, 0, 1) == pytest.approx(0.5)
    pred, target = torch.zeros(2, 1, 4, 8), torch.ones(2, 1, 4, 8)
    target[1] *= 3
    everywhere = torch.ones(pred.shape[0], 1, *pred.shape[2:], dtype=torch.bool)
    assert float(recipe.weighted_l1(pred, target, everywhere, 1.0, "mean")) == pytest.approx(2.0)
    assert float(recipe.weighted_l1(pred, target, everywhere, 1.0, "sum")) == pytest.approx(2.0 * 32)  # per-image norm


def test_config_defaults_and_errors(tmp_path):
    cfg = trainer.resolve_config({"data": tmp_path, "out": tmp_path / "run"})
    assert (cfg["epochs_constant"], cfg["epochs_decay"], cfg["batch_size"], cfg["lr"]) == (100, 100, 3, 2e-4)
    assert (cfg["l1_reduction"], cfg["lambda1"], cfg["lambda2"], cfg["d_width"]) == ("mean", 100.0, 100.0, 64)
    cfg = trainer.resolve_config({"data": tmp_path, "out": tmp_path, "l1_reduction": "sum", "epochs": 5, "width": 8})
    assert (cfg["lambda1"], cfg["lambda2"], cfg["epochs_constant"], cfg["epochs_decay"], cfg["d_width"]) == (0.1, 0.1, 3, 2, 8)
    bad = [{"sources": "t1,flair"}, {"sources": "t1,pd"}, {"laf_grid": 3}, {"architecture": "unet"},
           {"epochs": 0}, {"precision": "fp16"}, {"l1_reduction": "max"}, {"split_over": "some"}]
    for extra in bad:
        with pytest.raises(InputError):
            trainer.resolve_config({"data": tmp_path, "out": tmp_path, **extra})


# ----------------------------------------------------------------------- generated data


def write_subject(folder, seed, flair_from=None):
    affine = np.diag([5.0, 5.0, 5.0, 1.0])
    t1 = head_phantom((40, 44, 16), seed=seed, affine=affine)
    t2 = head_phantom((40, 44, 16), seed=seed + 100, affine=affine)
    t2.array = (t2.array * 0.7 + (t2.array > 0) * 80 * np.sin(np.arange(44) / 3.0)[None, :, None]).astype(np.float32)
    flair = Volume((0.5 * t1.array + 1.5 * t2.array + 20.0 * (t1.array > 0)).astype(np.float32), affine)
    if flair_from == "t2":
        flair = t2
    folder.mkdir(parents=True, exist_ok=True)
    for name, vol in (("t1", t1), ("t2", t2), ("flair", flair)):
        save_volume(vol, folder / f"{name}.nii.gz")


@pytest.fixture(scope="module")
def gen_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    for i in range(4):
        write_subject(root / "data" / f"sub{i}", seed=i)
    os.makedirs(root / "data" / "t1only")
    shutil.copy(root / "data" / "sub0" / "t1.nii.gz", root / "data" / "t1only" / "t1.nii.gz")
    return root


def small_run(gen_data, out, **extra):
    opts = dict(data=gen_data / "data", out=out, cache_dir=gen_data / "cache", architecture="pix2pix_unet",
                width=4, epochs=2, slices_per_subject=4, val_fraction=0.25, test_fraction=0.0, no_progress=True)
    opts.update(extra)
    return trainer.train(opts)


def load_ckpt(run):
    return torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)


def assert_same_state(a, b):
    for key in ("G", "D"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    for key in ("opt_G", "opt_D"):
        for pid, state in a[key]["state"].items():
            for name, value in state.items():
                assert torch.equal(value, b[key]["state"][pid][name]), (key, pid, name)


def test_generated_run_sigint_resume_is_bit_exact(gen_data, tmp_path, monkeypatch):
    handler_before = signal.getsignal(signal.SIGINT)  # ignored when the tests run in the background
    full = small_run(gen_data, tmp_path / "full")
    assert not full["stopped"] and len(full["history"]) == 2
    run = tmp_path / "full"
    for name in ("split.json", "config.json", "log.csv", "log.json", "loss_curve.png", "samples.png",
                 "model.safetensors", "train.log"):
        assert (run / name).is_file(), name
    split = json.loads((run / "split.json").read_text())
    assert split["skipped"] == {"t1only": ["t2", "flair"]}
    assert len(split["train_usable"]) == 3 and len(split["val_usable"]) == 1
    rows = (run / "log.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("epoch,lr,steps,loss_D")
    assert np.isfinite(full["history"][-1]["val_psnr_masked"])
    bundle = load_bundle(run / "model.safetensors")
    assert bundle.sources == ("t1", "t2") and bundle.model.architecture == "pix2pix_unet"
    assert bundle.provenance["split"]["val"] == split["val_usable"] and bundle.provenance["epochs"] == 2
    assert bundle.provenance["loss"]["l1_reduction"] == "mean"

    # Ctrl-C in epoch 2 (the 6th batch of 8): the handler saves a mid-epoch checkpoint.
    calls = {"n": 0}
    real_gather = data_mod.SliceDataset.gather

    def gather(self, indices):
        if len(self) == 12:  # the training set (3 subjects x 4 slices), not validation or plots
            calls["n"] += 1
            if calls["n"] == 6:
                os.kill(os.getpid(), signal.SIGINT)
        return real_gather(self, indices)

    monkeypatch.setattr(data_mod.SliceDataset, "gather", gather)
    part = small_run(gen_data, tmp_path / "part")
    monkeypatch.setattr(data_mod.SliceDataset, "gather", real_gather)
    assert part["stopped"]
    state = load_ckpt(tmp_path / "part")
    assert (state["epoch"], state["step"]) == (1, 2)
    assert signal.getsignal(signal.SIGINT) is handler_before  # handler restored
    with pytest.raises(InputError, match="--resume"):
        small_run(gen_data, tmp_path / "part")
    with pytest.raises(InputError, match="width"):
        trainer.train({"out": tmp_path / "part", "resume": True, "width": 8})
    # No NIfTI is read again: every slice comes from the cache.
    monkeypatch.setattr(data_mod, "load_volume", lambda *a, **k: pytest.fail("NIfTI re-read"))
    resumed = trainer.train({"out": tmp_path / "part", "resume": True, "no_progress": True})
    assert not resumed["stopped"]
    assert_same_state(load_ckpt(run), load_ckpt(tmp_path / "part"))
    assert [h["loss_G"] for h in resumed["history"]] == [h["loss_G"] for h in full["history"]]

    # A kill without any checkpoint of its own resumes from the last epoch's checkpoint.
    with pytest.raises(trainer.StopTraining):
        small_run(gen_data, tmp_path / "crash", stop_after_steps=7, stop_mode="crash")
    assert load_ckpt(tmp_path / "crash")["epoch"] == 1
    trainer.train({"out": tmp_path / "crash", "resume": True, "no_progress": True})
    assert_same_state(load_ckpt(run), load_ckpt(tmp_path / "crash"))

    # Export from the checkpoint through the command line, fp16.
    out = tmp_path / "half.safetensors"
    card, evaluation = tmp_path / "card.md", tmp_path / "metrics.json"
    card.write_text("# Model card\nknown limits: none tested")
    evaluation.write_text('{"summary": {"fdgan": {"psnr": {"mean": 20.0}}}}')
    # A label that is not a method of the evaluation is refused before anything is written.
    with pytest.raises(SystemExit):
        training_main(["export", "--run", str(run), "--out", str(out), "--evaluation", str(evaluation),
                       "--evaluation-label", "pix2pix"])
    assert not out.exists()
    assert training_main(["export", "--run", str(run), "--out", str(out), "--half",
                          "--model-card", str(card), "--evaluation", str(evaluation),
                          "--evaluation-label", "fdgan"]) == 0
    half = load_bundle(out)
    assert half.provenance["evaluation_label"] == "fdgan"
    # The device each epoch ran on is recorded for the model card.
    assert half.provenance["devices"] and half.provenance["devices"][0].startswith("cpu x1: ")
    assert half.provenance["model_card"].startswith("# Model card")
    assert half.provenance["held_out_evaluation"]["summary"]["fdgan"]["psnr"]["mean"] == 20.0
    assert half.provenance["loss"]["l1_reduction"] == "mean"
    key = next(k for k, v in half.state_dict.items() if v.is_floating_point())
    assert half.state_dict[key].dtype == torch.float16
    assert torch.allclose(half.state_dict[key].float(), bundle.state_dict[key], atol=1e-3)


def test_curve_figure_of_a_run_from_before_the_spectrum_was_logged(tmp_path, recwarn):
    # Older runs' curve.json rows lack the spectral ratios: the panel says so, nothing warns.
    from training.plots import plot_curve
    rows = [{"step": s, "cpu_hours": s / 1000, "val_psnr_masked": 17.0 + s / 1000, "val_sharpness": 0.8}
            for s in (500, 1000, 1500)]
    plot_curve(rows, tmp_path / "old.png")
    plot_curve([dict(r, val_spectrum_low=0.9, val_spectrum_mid=0.7) for r in rows], tmp_path / "new.png")
    assert (tmp_path / "old.png").stat().st_size > 0 and (tmp_path / "new.png").stat().st_size > 0
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)], [str(w.message) for w in recwarn]


def test_learning_curve_points_survive_resume_and_leave_training_unchanged(gen_data, tmp_path):
    # 2 epochs x 4 steps; a curve point every 3 steps: steps 3 and 6.
    plain = small_run(gen_data, tmp_path / "plain", val_every=0)
    assert not (tmp_path / "plain" / "curve.csv").exists()
    with_curve = small_run(gen_data, tmp_path / "curve", val_every=3)
    run = tmp_path / "curve"
    curve = json.loads((run / "curve.json").read_text())
    assert [row["step"] for row in curve] == [3, 6]
    for row in curve:
        for key in ("val_psnr_masked", "val_psnr_masked_scale_free", "val_sharpness", "val_sharpness_median",
                    "val_gmsd_masked", "val_spectrum_low", "val_spectrum_mid", "loss_G_L1"):
            assert np.isfinite(row[key]), key
    assert 0 < curve[0]["cpu_hours"] < curve[1]["cpu_hours"]
    assert (run / "curve.csv").read_text().splitlines()[0].startswith("step,epoch,cpu_hours,wall_hours,lr")
    for name in ("curve.png", "curve_samples.png", "curve_samples/step_0000003.npy", "curve_samples/step_0000006.npy"):
        assert (run / name).is_file(), name
    # The epoch rows carry the new validation figures too.
    assert np.isfinite(with_curve["history"][-1]["val_sharpness"])
    # Validating between steps changes no weight.
    assert_same_state(load_ckpt(tmp_path / "plain"), load_ckpt(run))
    assert [h["loss_G"] for h in plain["history"]] == [h["loss_G"] for h in with_curve["history"]]

    # Stopped after step 5 and resumed: the curve continues with its CPU hours accumulated.
    part = small_run(gen_data, tmp_path / "part", val_every=3, stop_after_steps=5)
    assert part["stopped"]
    assert [row["step"] for row in json.loads((tmp_path / "part" / "curve.json").read_text())] == [3]
    trainer.train({"out": tmp_path / "part", "resume": True, "no_progress": True})
    resumed = json.loads((tmp_path / "part" / "curve.json").read_text())
    assert [row["step"] for row in resumed] == [3, 6]
    assert resumed[1]["cpu_hours"] > resumed[0]["cpu_hours"]
    assert resumed[1]["val_psnr_masked"] == pytest.approx(curve[1]["val_psnr_masked"], abs=1e-9)
    # Killed without a checkpoint of its own after step 7: the curve point at step 6 (the 2nd of
    # epoch 2) saved one, and the resumed run ends with the same weights as the uninterrupted one.
    with pytest.raises(trainer.StopTraining):
        small_run(gen_data, tmp_path / "killed", val_every=3, stop_after_steps=7, stop_mode="crash")
    assert (load_ckpt(tmp_path / "killed")["epoch"], load_ckpt(tmp_path / "killed")["step"]) == (1, 2)
    trainer.train({"out": tmp_path / "killed", "resume": True, "no_progress": True})
    assert_same_state(load_ckpt(run), load_ckpt(tmp_path / "killed"))
    assert [row["step"] for row in json.loads((tmp_path / "killed" / "curve.json").read_text())] == [3, 6]
    with pytest.raises(InputError, match="val-every"):
        small_run(gen_data, tmp_path / "bad", val_every=-1)


def test_train_cli_errors(gen_data, tmp_path, capsys):
    assert training_main(["train", "--data", str(gen_data / "data"), "--out", str(tmp_path / "r"),
                          "--sources", "t1,t2,t1c", "--no-progress", "--cache-dir", str(gen_data / "cache")]) == 2
    assert "has all of t1, t2, t1c, flair" in capsys.readouterr().err
    assert training_main(["train", "--out", str(tmp_path / "r2"), "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert training_main(["train", "--data", str(gen_data / "data"), "--out", str(tmp_path / "r3"),
                          "--subjects", "sub0,nobody"]) == 2
    assert "nobody" in capsys.readouterr().err


def test_evaluate_baselines_on_generated_data(gen_data, tmp_path):
    data = tmp_path / "data"
    for i in range(3):
        write_subject(data / f"lin{i}", seed=10 + i)
    write_subject(data / "same", seed=20, flair_from="t2")
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["lin0", "lin1"], "val": [], "test": ["lin2", "same"]}))
    results = evaluate([], ["t2", "linear"], data, tmp_path / "report", split=split, split_name="test",
                       slices_per_subject=6, log=lambda m: None)
    labels = ["t2 baseline", "linear(t1+t2)"]
    assert results["subjects"] == ["lin2", "same"]
    per = results["per_subject"]
    # FLAIR identical to T2: the T2 baseline is exact in the shared output units.
    assert per["same"]["t2 baseline"]["nrmse"] == 0.0 and per["same"]["t2 baseline"]["nrmse_masked"] == 0.0
    # FLAIR an affine function of T1 and T2: the linear fit (on lin0, lin1) nearly recovers it.
    assert per["lin2"]["linear(t1+t2)"]["nrmse"] < 0.08
    assert per["lin2"]["linear(t1+t2)"]["psnr"] > per["lin2"]["t2 baseline"]["psnr"] + 5
    assert per["lin2"]["t2 baseline"]["num_slices"] == 6
    assert results["notes"].startswith("metrics on the middle 6 brain slices of each subject")
    assert results["methods"][1]["fit_on"] == "training subjects of the split"
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| Method | PSNR (dB) | SSIM | NRMSE |" in report
    # Blanked brain: the mean and the worst subject (an exact prediction blanks nothing).
    assert per["same"]["t2 baseline"]["blanked_brain"] == 0.0
    worst = max(("lin2", "same"), key=lambda s: per[s]["t2 baseline"]["blanked_brain"])
    mean = results["summary"]["t2 baseline"]["blanked_brain"]["mean"]
    assert f"| {mean:.2f} ({per[worst]['t2 baseline']['blanked_brain']:.2f}, {worst}) |" in report
    for label in labels:
        assert f"| {label} | " in report
    assert "t2 baseline vs linear(t1+t2)" in report
    # Both sharpness scalings beside each other; an exact prediction is as sharp either way.
    assert per["same"]["t2 baseline"]["sharpness_median"] == pytest.approx(1.0)
    assert "| sharpness, median-scaled |" in report and "/ median-scaled sharpness" in report
    # The generated brains are smaller than a 64-pixel crop: no spectrum, and no table of NaNs.
    assert per["lin2"]["t2 baseline"]["spectrum_crops"] == 0 and "## Spectrum" not in report
    results["summary"]["t2 baseline"].update({k: {"mean": 0.5, "std": 0.1, "n": 2} for k in SPECTRUM})
    assert "| t2 baseline | 0.50 ± 0.10 | 0.50 ± 0.10 | 0.50 ± 0.10 | 0.50 ± 0.10 |" in render_report(results, labels)
    assert (tmp_path / "report" / "figure.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert saved["ttests"][0]["nrmse"]["n"] == 2  # (PSNR of an exact prediction is inf: left out)
    assert "lesion_conspicuity" not in per["lin2"]["t2 baseline"]  # no label map, no lesion figures
    with pytest.raises(InputError, match="nothing to evaluate"):
        evaluate([], [], data, tmp_path / "r2")
    with pytest.raises(InputError, match="unknown baseline"):
        evaluate([], ["cubic"], data, tmp_path / "r2")


@pytest.mark.parametrize("extra, expected", [
    (["--no-specific-encoder", "--precision", "bf16"], dict(specific_encoder=False, laf_grid=2)),
    (["--laf-grid", "4", "--l1-reduction", "sum"], dict(specific_encoder=True, laf_grid=4)),
    (["--context-slices", "1", "--augment"], dict(specific_encoder=True, context_slices=1)),
])
def test_ablations_through_the_command_line(gen_data, tmp_path, extra, expected):
    out = tmp_path / "run"
    assert training_main(["train", "--data", str(gen_data / "data"), "--out", str(out), "--cache-dir",
                          str(gen_data / "cache1"), "--width", "2", "--epochs", "1", "--slices-per-subject", "1",
                          "--no-progress", "--test-fraction", "0", "--val-fraction", "0.25", *extra]) == 0
    bundle = load_bundle(out / "model.safetensors")
    assert bundle.model.architecture == "fdgan" and bundle.model.base_width == 2
    for key, value in expected.items():
        assert getattr(bundle.model, key) == value
    history = json.loads((out / "log.json").read_text())
    assert len(history) == 1 and history[0]["steps"] == 1
    # The shared-only ablation has no pseudo-target, so no L1 on it.
    assert (history[0]["loss_G_L1_pseudo"] == 0) == (not expected["specific_encoder"])
    if "sum" in extra:
        assert bundle.provenance["loss"]["lambda1"] == 0.1 and history[0]["loss_G_L1"] > 1000  # per-image sum


def test_recipe_options_train_and_resume_bit_exact(gen_data, tmp_path):
    """Augmentation, background-weighted L1, gradient-difference loss, GAN weight and feature
    matching: a run killed mid-way and resumed ends with the same weights (augmentation is
    seeded per step)."""
    recipe_opts = dict(architecture="fdgan", width=2, augment=True, augment_contrast=0.5, augment_blur=1.0,
                       background_weight=0.1,
                       gdl_weight=1.0, gan_weight=0.5, fm_weight=10.0)
    full = small_run(gen_data, tmp_path / "full", **recipe_opts)
    assert not full["stopped"]
    config = json.loads((tmp_path / "full" / "config.json").read_text())
    assert (config["augment"], config["augment_contrast"], config["background_weight"], config["style_init"]) == (
        True, 0.5, 0.1, "kaiming")
    with pytest.raises(trainer.StopTraining):
        small_run(gen_data, tmp_path / "crash", stop_after_steps=5, stop_mode="crash", **recipe_opts)
    trainer.train({"out": tmp_path / "crash", "resume": True, "no_progress": True})
    assert_same_state(load_ckpt(tmp_path / "full"), load_ckpt(tmp_path / "crash"))
    plain = small_run(gen_data, tmp_path / "plain", architecture="fdgan", width=2)
    assert plain["history"][-1]["loss_G"] != full["history"][-1]["loss_G"]
    with pytest.raises(InputError, match="background-weight"):
        trainer.resolve_config({"data": tmp_path, "out": tmp_path, "background_weight": -1})
    with pytest.raises(InputError, match="fm-weight"):
        trainer.resolve_config({"data": tmp_path, "out": tmp_path, "fm_weight": -1})
    for key in ("augment_contrast", "augment_blur"):
        with pytest.raises(InputError, match="goes with --augment"):
            trainer.resolve_config({"data": tmp_path, "out": tmp_path, key: 0.5})
    with pytest.raises(InputError, match="context_slices"):
        trainer.resolve_config({"data": tmp_path, "out": tmp_path, "context_slices": -1})


def test_model_card_from_run_and_evaluation(gen_data, tmp_path):
    run = tmp_path / "run"
    small_run(gen_data, run, architecture="fdgan", epochs=1)
    evaluation = tmp_path / "metrics.json"
    stats = {"psnr_masked": {"mean": 17.5, "std": 1.25, "n": 2}, "ssim_masked": {"mean": 0.5, "std": 0.01, "n": 2},
             "lesion_conspicuity": {"mean": 0.97, "std": 0.2, "n": 1}, "psnr": {"mean": 21.5, "std": 1.0, "n": 2},
             "sharpness": {"mean": 0.912, "std": 0.04, "n": 2}}
    ttest = {"a": "t2 baseline", "b": "fdgan", "psnr_masked": {"n": 2, "t": 3.0, "p": 0.2, "mean_difference": -1.5}}
    evaluation.write_text(json.dumps({"subjects": ["sub3", "sub2"], "slices_per_subject": 80, "ttests": [ttest],
                                      "summary": {"fdgan": stats, "t2 baseline": stats}}))
    out = tmp_path / "card.md"
    assert training_main(["model-card", "--run", str(run), "--evaluation", str(evaluation), "--label", "fdgan",
                          "--name", "t1_t2_to_flair", "--out", str(out)]) == 0
    card = out.read_text()
    split = json.loads((run / "split.json").read_text())
    assert card.startswith("# Model card: `t1_t2_to_flair`")
    assert "feature-disentanglement GAN" in card and "base width 4" in card
    assert ", ".join(split["train_usable"]) in card
    # Brain figures first (with the blur-sensitive ones), then lesion and whole-slice figures;
    # an absent figure is "-"; the paired test from this model's side.
    assert ("| **fdgan** (this model) | 17.50 ± 1.25 | 0.500 ± 0.010 | - | - | 0.91 ± 0.04 | - | 0.97 ± 0.20 | - "
            "| 21.50 ± 1.00 | - |") in card
    assert "vs t2 baseline: +1.50 dB, n = 2, p = 0.2" in card
    assert "Device: cpu x1" in card and "`--background-weight 1`" in card and "--intensity-reference percentile" in card
    assert "## Known limits" in card and "L1 reduction `mean`" in card
    # Data, split and run folders are named portably: no path of this machine.
    assert str(tmp_path) not in card and str(gen_data) not in card
    provenance = load_bundle(run / "model.safetensors").provenance
    assert str(gen_data) not in json.dumps(provenance) and str(tmp_path) not in json.dumps(provenance)
    assert provenance["data"] == "<elsewhere>/data" and provenance["options"]["out"] == "<elsewhere>/run"
    # What it saw and was scored on, and a warm start, come from the run, not fixed text.
    assert "Slices: the middle 4 brain slices of each subject" in card and "the middle 80 brain slices of each" in card
    assert "Trained on the middle 4 brain slices" in card and "warm-started" not in card
    config = json.loads((run / "config.json").read_text())
    config.update(slices_per_subject=None, init_from=str(tmp_path / "elsewhere" / "epoch2.pt"))
    (run / "config.json").write_text(json.dumps(config))
    from training.model_card import render_model_card
    card = render_model_card(run, evaluation, "fdgan", "t1_t2_to_flair")
    assert "Slices: every brain slice of each subject" in card and "Trained on every brain slice" in card
    assert "warm-started from the weights of `epoch2.pt`" in card and str(tmp_path) not in card


def test_export_refuses_a_model_that_blanks_brain(gen_data, tmp_path, capsys):
    run = tmp_path / "run"
    small_run(gen_data, run, architecture="fdgan", epochs=1)
    evaluation = tmp_path / "metrics.json"
    per_subject = {"sub2": {"fdgan": {"blanked_brain": 0.3}}, "sub3": {"fdgan": {"blanked_brain": 7.25}}}
    evaluation.write_text(json.dumps({"subjects": ["sub2", "sub3"], "per_subject": per_subject, "ttests": [],
                                      "summary": {"fdgan": {"blanked_brain": {"mean": 3.775, "std": 5.0, "n": 2}}}}))
    out = tmp_path / "model.safetensors"
    args = ["export", "--run", str(run), "--out", str(out), "--evaluation", str(evaluation), "--evaluation-label", "fdgan"]
    assert training_main([*args, "--max-blanked-brain", "1"]) == 2
    assert "fdgan renders 7.25 % of sub3's brain black" in capsys.readouterr().err and not out.exists()
    assert training_main([*args, "--max-blanked-brain", "8"]) == 0 and out.is_file()
    # An evaluation made before the figure existed cannot vouch for the model.
    per_subject["sub3"]["fdgan"] = {}
    del per_subject["sub2"]["fdgan"]["blanked_brain"]
    evaluation.write_text(json.dumps({"subjects": ["sub2", "sub3"], "per_subject": per_subject, "ttests": [],
                                      "summary": {"fdgan": {}}}))
    assert training_main([*args, "--max-blanked-brain", "8"]) == 2
    assert "no blanked-brain figure" in capsys.readouterr().err


def test_export_standardises_histograms_onto_the_training_subjects(gen_data, tmp_path, capsys):
    from MRISynthesisLib.inference import synthesize
    from MRISynthesisLib.preprocessing import histogram_landmarks
    from training.data import discover

    run = tmp_path / "run"
    small_run(gen_data, run, architecture="fdgan", epochs=1, intensity_reference="median")
    out = tmp_path / "standardised.safetensors"
    assert training_main(["export", "--run", str(run), "--out", str(out), "--standardize-histograms",
                          "--data", str(gen_data / "data")]) == 0
    bundle, plain = load_bundle(out), load_bundle(run / "model.safetensors")
    train = json.loads((run / "split.json").read_text())["train_usable"]
    subjects = {s.name: s for s in discover(gen_data / "data")}
    for modality in ("t1", "t2"):
        expected = np.mean([histogram_landmarks(load_volume(subjects[n].files[modality]).array, None,
                                                plain.preprocessing) for n in train], axis=0)
        assert np.allclose(bundle.preprocessing.landmarks_for(modality), expected)
    assert bundle.preprocessing.landmarks_for("flair") is None and plain.preprocessing.histogram_landmarks is None
    assert f"the mean of the {len(train)} training subjects" in bundle.provenance["histogram_landmarks_from"]
    assert str(tmp_path) not in json.dumps(bundle.provenance)
    # Inference applies it: a scan whose T1 contrast is squeezed (not an affine change) comes
    # out of the standardised bundle closer to what it gives for the scan as it was.
    folder = subjects[train[0]].folder
    t1, t2 = load_volume(folder / "t1.nii.gz"), load_volume(folder / "t2.nii.gz")
    inside = t1.array > 0
    median = np.median(t1.array[inside])
    squeezed = Volume(np.where(inside, median * (t1.array / median) ** 0.4, 0).astype(np.float32), t1.affine)
    distance = {}
    for name, b in (("standardised", bundle), ("plain", plain)):
        ref = synthesize({"t1": t1, "t2": t2}, b, mask="none").array
        got = synthesize({"t1": squeezed, "t2": t2}, b, mask="none").array
        distance[name] = float(np.abs(got - ref)[inside].mean())
    assert distance["standardised"] < distance["plain"] / 2, distance
    # The model card describes the bundle's preprocessing when told to.
    evaluation = tmp_path / "metrics.json"
    evaluation.write_text(json.dumps({"subjects": ["sub3"], "slices_per_subject": 80, "ttests": [],
                                      "summary": {"fdgan": {}}}))
    card = tmp_path / "card.md"
    assert training_main(["model-card", "--run", str(run), "--evaluation", str(evaluation), "--label", "fdgan",
                          "--name", "t1_t2_to_flair", "--out", str(card), "--preprocessing-from", str(out)]) == 0
    assert "T1, T2 histogram standardised first" in card.read_text()
    # Only with the option, and from a folder that holds the training subjects.
    with pytest.raises(SystemExit):
        training_main(["export", "--run", str(run), "--out", str(tmp_path / "x.safetensors"), "--data", "x"])
    shutil.copytree(gen_data / "data" / "sub0", tmp_path / "other" / "subX")
    assert training_main(["export", "--run", str(run), "--out", str(tmp_path / "y.safetensors"),
                          "--standardize-histograms", "--data", str(tmp_path / "other")]) == 2
    assert "training subjects not found in" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()


def test_training_on_standardised_histograms_carries_the_landmarks_into_the_bundle(gen_data, tmp_path, capsys):
    from MRISynthesisLib.preprocessing import histogram_landmarks
    from training.data import discover

    run = tmp_path / "run"
    entries = lambda: set((gen_data / "cache").glob("sub*-t1_t2_flair-*.images.npy"))  # noqa: E731
    before = entries()
    small_run(gen_data, run, architecture="fdgan", epochs=1, intensity_reference="median", standardize_histograms=True)
    standardised = entries() - before
    landmarks = json.loads((run / "histogram_landmarks.json").read_text())
    train = json.loads((run / "split.json").read_text())["train_usable"]
    subjects = {s.name: s for s in discover(gen_data / "data")}
    plain = trainer.preprocessing_config({"intensity_reference": "median", "resize_interpolation": "bicubic"})
    expected = np.mean([histogram_landmarks(load_volume(subjects[n].files["t1"]).array, None, plain) for n in train], 0)
    assert sorted(landmarks) == ["t1", "t2"] and np.allclose(landmarks["t1"], expected)
    bundle = load_bundle(run / "model.safetensors")
    assert np.allclose(bundle.preprocessing.landmarks_for("t2"), landmarks["t2"])
    assert bundle.preprocessing.landmarks_for("flair") is None  # the target is never standardised
    # It trained on standardised slices, cached apart from unstandardised ones: the same target,
    # other sources (the generated subjects' landmarks are close to the mean, so not far off).
    modalities = ["t1", "t2", "flair"]
    ours = data_mod.preprocess_subject(subjects[train[0]], modalities, bundle.preprocessing, 4).images
    theirs = data_mod.preprocess_subject(subjects[train[0]], modalities, plain, 4).images
    assert np.array_equal(ours[:, 2], theirs[:, 2]) and not np.array_equal(ours[:, 0], theirs[:, 0])
    cached = [np.load(p) for p in standardised if p.name.startswith(f"{train[0]}-t1_t2_flair-")]
    assert len(cached) == 1 and np.array_equal(cached[0], ours)
    # A re-export takes the run's landmarks, wherever the folder now is; asking again is refused.
    shutil.move(str(run), str(tmp_path / "moved"))
    out = tmp_path / "again.safetensors"
    assert training_main(["export", "--run", str(tmp_path / "moved"), "--out", str(out)]) == 0
    assert load_bundle(out).preprocessing == bundle.preprocessing
    assert training_main(["export", "--run", str(tmp_path / "moved"), "--out", str(tmp_path / "x.safetensors"),
                          "--standardize-histograms"]) == 2
    assert "trained on standardised inputs" in capsys.readouterr().err
    (tmp_path / "moved" / "histogram_landmarks.json").unlink()
    assert training_main(["export", "--run", str(tmp_path / "moved"), "--out", str(tmp_path / "y.safetensors")]) == 2
    assert "histogram_landmarks.json is missing" in capsys.readouterr().err


def test_portable_path_names_folders_relative_to_the_project_never_absolute(tmp_path):
    from training.data import PROJECT_ROOT, portable_path

    assert portable_path(PROJECT_ROOT / "docs" / "split.json") == "docs/split.json"
    assert portable_path(PROJECT_ROOT.parent / "shared" / "data") == "../shared/data"
    assert portable_path(f"{PROJECT_ROOT.parent / 'shared' / 'data'}{os.pathsep}{PROJECT_ROOT / 'runs' / 'x'}") == \
        "../shared/data:runs/x"
    assert portable_path("/nowhere/near/the/project/extra") == "<elsewhere>/extra"


def test_portable_path_names_the_staged_more_data_subjects_wherever_they_are(tmp_path, monkeypatch):
    from training import data as data_mod

    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps([{"folder": "brats18-a", "file": "t1.nii.gz"}, {"folder": "brats18-a", "file": "t2.nii.gz"},
                                    {"folder": "brats18-b", "file": "t1.nii.gz"}]))
    monkeypatch.setattr(data_mod, "STAGED_MANIFEST", manifest)
    staged = tmp_path / "anywhere" / "extra"
    (staged / "brats18-a").mkdir(parents=True)
    (staged / "brats18-b").mkdir()
    shared = data_mod.PROJECT_ROOT.parent / "shared" / "data"
    assert data_mod.portable_path(f"{shared}{os.pathsep}{staged}") == "../shared/data:" + data_mod.STAGED_NAME
    # Some of them is still them; one subject the manifest does not list, or none, is not.
    (staged / "brats18-b").rmdir()
    assert data_mod.portable_path(staged) == data_mod.STAGED_NAME
    (staged / "other").mkdir()
    assert data_mod.portable_path(staged) == "<elsewhere>/extra"
    assert data_mod.portable_path(tmp_path / "empty") == "<elsewhere>/empty"
    monkeypatch.setattr(data_mod, "STAGED_MANIFEST", tmp_path / "absent.json")
    (staged / "other").rmdir()
    assert data_mod.portable_path(staged) == "<elsewhere>/extra"


def test_evaluate_lesion_figures(tmp_path):
    """A bright lesion in the real FLAIR: the T2 baseline (no lesion) scores conspicuity
    about 0, a prediction equal to the FLAIR scores 1; reported per subject with n."""
    data = tmp_path / "data"
    write_subject(data / "les", seed=3, flair_from="t2")
    t2 = load_volume(data / "les" / "t2.nii.gz")
    lesion = np.zeros(t2.shape, np.float32)
    brain = np.argwhere(t2.array > 0)
    centre = brain.mean(axis=0).round().astype(int)
    lesion[centre[0] - 3:centre[0] + 3, centre[1] - 3:centre[1] + 3, centre[2] - 2:centre[2] + 2] = 1
    flair = t2.array.copy()
    flair[lesion > 0] = flair[t2.array > 0].mean() * 3
    save_volume(Volume(flair, t2.affine), data / "les" / "flair.nii.gz")
    save_volume(Volume(lesion, t2.affine), data / "les" / "seg.nii.gz")
    results = evaluate([], ["t2"], data, tmp_path / "report", slices_per_subject=0, log=lambda m: None)
    entry = results["per_subject"]["les"]["t2 baseline"]
    assert entry["lesion_contrast_real"] > 1.0 and abs(entry["lesion_conspicuity"]) < 0.3
    assert results["lesion_labels"] == {"les": "ground truth"}
    assert results["notes"].startswith("metrics on every brain slice of each subject")
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Lesions (1 subjects with labels: les (ground truth))" in report
    assert report.index("## Brain (masked)") < report.index("## Whole slice")


def test_the_field_of_view_a_run_trains_with_reaches_its_bundle(gen_data, tmp_path):
    run = small_run(gen_data, tmp_path / "run", epochs=1, field_of_view_mm=256.0)
    assert load_bundle(run["bundle"]).preprocessing.min_field_of_view_mm == 256.0
    assert trainer.preprocessing_config(trainer.DEFAULTS).min_field_of_view_mm == 240.0  # runs saved before the option
    with pytest.raises(InputError, match="field-of-view-mm"):
        trainer.resolve_config({"data": tmp_path, "out": tmp_path, "field_of_view_mm": 0})


def test_a_discriminator_warm_up_trains_only_the_discriminator_for_its_steps(gen_data, tmp_path):
    first = load_bundle(small_run(gen_data, tmp_path / "first", epochs=1)["bundle"])
    held = small_run(gen_data, tmp_path / "held", epochs=1, init_from=first.path, d_warmup_steps=10_000)
    kept = load_bundle(held["bundle"]).state_dict
    # G's weights never stepped (BatchNorm's running statistics still follow its batches).
    weights = [k for k in first.state_dict if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert [k for k in weights if not torch.equal(kept[k], first.state_dict[k])] == []
    assert held["history"][0]["loss_D"] > 0 and held["history"][0]["loss_G_L1"] > 0  # G's losses still logged
    state = load_ckpt(tmp_path / "held")
    assert state["opt_G"]["state"] == {} and state["opt_D"]["state"]  # Adam stepped D only
    moved = load_bundle(small_run(gen_data, tmp_path / "moved", epochs=1, init_from=first.path)["bundle"]).state_dict
    assert not all(torch.equal(moved[k], first.state_dict[k]) for k in first.state_dict)
    with pytest.raises(InputError, match="d-warmup-steps goes with --init-from"):
        trainer.resolve_config({"data": tmp_path, "out": tmp_path, "d_warmup_steps": 5})


def test_a_lesion_weight_trains_towards_the_ground_truth_lesion_labels(gen_data, tmp_path, capsys):
    data = tmp_path / "data"
    for i in range(4):
        write_subject(data / f"sub{i}", seed=i)
    t1 = load_volume(data / "sub0" / "t1.nii.gz")
    head = (t1.array > 0).astype(np.float32)
    lesion = np.zeros_like(head)
    lesion[14:22, 16:26, 5:11] = 1
    for name in ("sub0", "sub1", "sub2"):  # ground truth (sub2 is the validation subject)
        save_volume(Volume(lesion, t1.affine), data / name / "seg.nii.gz")
    save_volume(Volume(head, t1.affine), data / "sub0" / "mask.nii.gz")
    save_volume(Volume(head, t1.affine), data / "sub3" / "seg_auto.nii.gz")  # automatic: not trained towards
    opts = dict(cache_dir=tmp_path / "cache", architecture="fdgan", width=2, augment=True, epochs=1)
    weighted = small_run(tmp_path, tmp_path / "weighted", data=data, lesion_weight=5.0, **opts)
    log = (tmp_path / "weighted" / "train.log").read_text()
    split = json.loads((tmp_path / "weighted" / "split.json").read_text())
    assert (split["train_usable"], split["val_usable"]) == (["sub0", "sub1", "sub3"], ["sub2"])
    assert "lesion labels of 2 of 3 training subjects (sub0, sub1)" in log
    plain = small_run(tmp_path, tmp_path / "plain", data=data, **opts)
    assert plain["history"][-1]["loss_G_L1"] != weighted["history"][-1]["loss_G_L1"]
    # Validation carries the labels whatever the weight: every run's curve has lesion figures.
    for run in (weighted, plain):
        assert np.isfinite(run["history"][-1]["val_psnr_lesion"])
    assert json.loads((tmp_path / "weighted" / "config.json").read_text())["lesion_weight"] == 5.0

    # The label is cut and resized as the brain mask is: sub0's mask and label are one file's content.
    subjects = {s.name: s for s in data_mod.discover(data)}
    pre = trainer.preprocessing_config(trainer.resolve_config({"data": data, "out": tmp_path}))
    save_volume(Volume(head, t1.affine), data / "sub0" / "seg.nii.gz")
    subjects = {s.name: s for s in data_mod.discover(data)}
    slices = data_mod.load_or_build(subjects["sub0"], ("t1", "t2", "flair"), pre, 4, tmp_path / "cache2", lambda m: None)
    cut = data_mod.with_lesions(slices, subjects["sub0"], pre, tmp_path / "cache2", lambda m: None)
    assert cut.lesion.shape == slices.mask.shape and cut.lesion.any() and np.array_equal(cut.lesion, slices.mask)
    assert not data_mod.with_lesions(slices, subjects["sub3"], pre, tmp_path / "cache2").lesion.any()
    # A label on another grid is refused by name; so is a run without any ground-truth label.
    save_volume(Volume(head[:-2], t1.affine), data / "sub0" / "seg.nii.gz")
    subjects = {s.name: s for s in data_mod.discover(data)}
    with pytest.raises(InputError, match="lesion label seg.nii.gz is not on the grid of t1"):
        data_mod.with_lesions(slices, subjects["sub0"], pre, tmp_path / "cache2")
    with pytest.raises(InputError, match="no training subject has a ground-truth lesion label"):
        small_run(gen_data, tmp_path / "unlabelled", lesion_weight=5.0, epochs=1)
    with pytest.raises(InputError, match="lesion-weight"):
        trainer.resolve_config({"data": tmp_path, "out": tmp_path, "lesion_weight": -1})


def test_new_runs_resize_bicubic_and_runs_saved_before_the_option_keep_bilinear(gen_data, tmp_path):
    fresh = small_run(gen_data, tmp_path / "fresh", epochs=1)
    assert load_bundle(fresh["bundle"]).preprocessing.resize_interpolation == "bicubic"
    old = tmp_path / "old"
    small_run(gen_data, old, epochs=2, stop_after_steps=2)
    config = json.loads((old / "config.json").read_text())
    del config["resize_interpolation"]  # as a run saved before the option wrote it
    (old / "config.json").write_text(json.dumps(config))
    resumed = trainer.train({"out": old, "resume": True, "no_progress": True})
    assert load_bundle(resumed["bundle"]).preprocessing.resize_interpolation == "bilinear"
    with pytest.raises(InputError, match="resize-interpolation"):
        trainer.resolve_config({"data": tmp_path, "out": tmp_path, "resize_interpolation": "nearest"})


def test_a_shipped_models_card_gains_the_comparison_with_other_inputs_without_its_run(tmp_path):
    from training.model_card import store_model_card

    config = ModelConfig(architecture="pix2pix_unet", num_sources=2, base_width=4)
    card = "# Model card: `t1_t2_t1c_to_flair`\n\n## Held-out evaluation\nfigures\n\n## Known limits\n- small\n"
    bundle = bundle_from_generator(build_generator(config), config, ["t1", "t2"],
                                   provenance={"model_card": card})
    bundle_path = tmp_path / "t1_t2_t1c_to_flair.safetensors"
    old_sha = save_bundle(bundle, bundle_path, half_precision=True)
    methods = [{"label": "three", "sources": ["t1", "t2", "t1c"]}, {"label": "two", "sources": ["t1", "t2"]},
               {"label": "one", "sources": ["t1"]}]
    pair = lambda d, p: {"n": 11, "t": 2.0, "p": p, "mean_difference": d}  # noqa: E731
    ttests = [{"a": "three", "b": "two", "psnr_masked_scale_free": pair(-0.1, 0.08), "psnr_masked": pair(-0.12, 0.007),
               "sharpness": pair(0.058, 0.001), "lesion_conspicuity": pair(-0.04, 0.019)},
              {"a": "one", "b": "three", "psnr_masked_scale_free": pair(-0.86, 0.004), "psnr_masked": pair(-0.86, 0.004)},
              {"a": "one", "b": "two", "psnr_masked_scale_free": pair(-0.95, 0.003), "psnr_masked": pair(-0.9, 0.003)}]
    evaluation = tmp_path / "docs" / "evaluation" / "inputs" / "metrics.json"
    evaluation.parent.mkdir(parents=True)
    evaluation.write_text(json.dumps({"subjects": ["s"] * 11, "slices_per_subject": None, "methods": methods,
                                      "ttests": ttests, "summary": {m["label"]: {} for m in methods}}))
    out = tmp_path / "card.md"
    args = ["model-card", "--from-bundle", str(bundle_path), "--compared-in", str(evaluation), "--label", "three",
            "--out", str(out)]
    assert training_main(args) == 0
    text = out.read_text()
    # The comparison goes before the known limits, from this model's side, with the report linked.
    assert text.index("## Held-out evaluation") < text.index("## Against the other models") < text.index("## Known")
    assert "| two | 11 | -0.10 (p = 0.08) | -0.12 (p = 0.007) | +0.058 (p = 0.001) | -0.04 (p = 0.019) |" in text
    assert "| one | 11 | +0.86 (p = 0.004) | +0.86 (p = 0.004) | - | - |" in text
    assert "[docs/evaluation/inputs/report.md](../evaluation/inputs/report.md)" in text
    assert "no more faithful than `two`, which does without the T1C" in text and "leave the T1C out" in text
    # The model with fewer inputs that it beats gets no such sentence; rewriting replaces the section.
    assert "than `one`" not in text
    assert training_main(args[:2] + [str(bundle_path)] + args[3:]) == 0
    assert out.read_text().count("## Against the other models") == 1
    # Stored in the bundle: the weights as they were (fp16), the earlier SHA-256 kept.
    assert training_main(["set-model-card", "--bundle", str(bundle_path), "--model-card", str(out)]) == 0
    stored = load_bundle(bundle_path)
    assert stored.provenance["model_card"] == text and stored.provenance["earlier_sha256"] == [old_sha]
    assert all(torch.equal(v, bundle.state_dict[k].half()) and v.dtype == torch.float16
               for k, v in stored.state_dict.items() if v.is_floating_point())
    # Bad input is named and leaves the bundle as it was.
    before = bundle_path.read_bytes()
    (tmp_path / "notes.md").write_text("some notes")
    assert training_main(["set-model-card", "--bundle", str(bundle_path), "--model-card", str(tmp_path / "notes.md")]) == 2
    assert training_main(["model-card", "--from-bundle", str(bundle_path), "--compared-in", str(evaluation),
                          "--label", "four", "--out", str(out)]) == 2
    assert training_main(["model-card", "--from-bundle", str(bundle_path), "--label", "three", "--out", str(out)]) == 2
    assert training_main(args + ["--evaluation", str(evaluation)]) == 2
    assert bundle_path.read_bytes() == before and out.read_text() == text


def test_a_compiled_channels_last_step_trains_as_the_plain_one_and_resumes_bit_exact(gen_data, tmp_path):
    """--compile --memory-format channels_last (the faster step on the CPU, docs/performance.md)
    changes only the rounding: the same losses as the plain step; a run killed mid-way and
    resumed ends with the uninterrupted run's weights; its bundle is ordinary."""
    fast_opts = dict(architecture="fdgan", width=2, compile=True, memory_format="channels_last")
    plain = small_run(gen_data, tmp_path / "plain", architecture="fdgan", width=2)
    fast = small_run(gen_data, tmp_path / "fast", **fast_opts)
    state = load_ckpt(tmp_path / "fast")
    assert state["config"]["compile"] and state["config"]["memory_format"] == "channels_last"
    kernels = [t for t in state["G"].values() if t.dim() == 4 and t.shape[1] > 1 and t.shape[2] > 1]
    assert kernels and all(t.is_contiguous(memory_format=torch.channels_last) for t in kernels)
    for a, b in zip(plain["history"], fast["history"], strict=True):
        for key in ("loss_D", "loss_G", "loss_G_GAN", "loss_G_L1", "loss_G_L1_pseudo"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key
    plain_state = load_ckpt(tmp_path / "plain")
    assert any(not torch.equal(plain_state["G"][k], state["G"][k]) for k in state["G"])  # it did run compiled
    with pytest.raises(trainer.StopTraining):
        small_run(gen_data, tmp_path / "crash", stop_after_steps=5, stop_mode="crash", **fast_opts)
    trainer.train({"out": tmp_path / "crash", "resume": True, "no_progress": True})
    assert_same_state(state, load_ckpt(tmp_path / "crash"))
    # Dropped on resume: the run goes on with the plain step.
    small_run(gen_data, tmp_path / "drop", stop_after_steps=5, **fast_opts)
    resumed = trainer.train({"out": tmp_path / "drop", "resume": True, "no_progress": True, "compile": False,
                             "memory_format": "contiguous"})
    assert not resumed["stopped"] and json.loads((tmp_path / "drop" / "config.json").read_text())["compile"] is False
    bundle = load_bundle(tmp_path / "fast" / "model.safetensors")
    assert all(t.is_contiguous() for t in bundle.state_dict.values())
    with pytest.raises(InputError, match="--memory-format"):
        trainer.resolve_config({"data": tmp_path, "out": tmp_path, "memory_format": "nhwc"})
    # No C++ compiler: one line at the start, before any data is read.
    from torch._inductor import config as inductor_config
    with inductor_config.patch({"cpp.cxx": (str(tmp_path / "no-such-g++"),)}):
        with pytest.raises(InputError, match="--compile: torch.compile needs a C\\+\\+ compiler"):
            small_run(gen_data, tmp_path / "nocompiler", **fast_opts)
    assert not (tmp_path / "nocompiler" / "checkpoint.pt").exists()
