"""training/ on the real data (MRISYNTHESIS_DATA): a short run through export, predict and
evaluate; bit-exact resume after an interrupt and after a kill; 2-process DDP (gloo)."""

import json
import os
import subprocess
import sys

import nibabel as nib
import pytest
import torch

from conftest import DATA_ENV, REPO, data_dir
from MRISynthesisLib.bundle import load_bundle
from MRISynthesisLib.cli import main as mrisynthesis_main
from training import trainer
from training.cli import main as training_main

SUBJECTS = "brats20-001,ms-long-03b,tcga-du-7294,ms-mni-07"  # seed 0 puts ms-mni-07 in validation
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(data_dir() is None, reason=f"real data not available: set {DATA_ENV} to the shared "
                                                  f"data folder (currently {os.environ.get(DATA_ENV)!r})"),
]


def options(root, out, **extra):
    opts = dict(data=str(data_dir()), out=str(out), subjects=SUBJECTS, cache_dir=str(root / "cache"),
                width=4, epochs=2, slices_per_subject=4, val_fraction=0.3, test_fraction=0.0, no_progress=True)
    opts.update(extra)
    return opts


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("real_training")
    result = trainer.train(options(root, root / "full"))
    torch.set_num_threads(old)
    return root, result


def load_ckpt(run):
    return torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)


def test_real_run_export_predict_evaluate(real_run, tmp_path):
    root, result = real_run
    run = root / "full"
    assert not result["stopped"] and [h["epoch"] for h in result["history"]] == [1, 2]
    split = json.loads((run / "split.json").read_text())
    assert split["val_usable"] == ["ms-mni-07"] and len(split["train_usable"]) == 3
    assert all(0 < h["val_psnr_masked"] < 60 and 0 <= h["val_ssim"] <= 1 for h in result["history"])
    bundle = load_bundle(run / "model.safetensors")
    assert bundle.provenance["split"]["train"] == split["train_usable"]
    assert bundle.provenance["validation"]["val_psnr"] == pytest.approx(result["history"][-1]["val_psnr"])

    exported = tmp_path / "exported.safetensors"
    assert training_main(["export", "--run", str(run), "--out", str(exported)]) == 0
    assert load_bundle(exported).state_dict.keys() == bundle.state_dict.keys()

    # The shipped command line loads the bundle as it is.
    subject = data_dir() / "ms-mni-07"
    out = tmp_path / "flair.nii.gz"
    assert mrisynthesis_main(["predict", "--t1", str(subject / "t1.nii.gz"), "--t2", str(subject / "t2.nii.gz"),
                              "--model", str(exported), "-o", str(out), "--device", "cpu", "-q"]) == 0
    assert nib.load(str(out)).shape == nib.load(str(subject / "t1.nii.gz")).shape

    report = tmp_path / "report"
    assert training_main(["evaluate", "--model", f"fdgan={exported}", "--baseline", "t2", "--data", str(data_dir()),
                          "--split", str(run / "split.json"), "--split-name", "val", "--slices-per-subject", "6",
                          "--out", str(report), "--device", "cpu"]) == 0
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["subjects"] == ["ms-mni-07"]
    for label in ("fdgan", "t2 baseline"):
        stats = metrics["per_subject"]["ms-mni-07"][label]
        assert stats["num_slices"] == 6 and 0 < stats["nrmse"] < 2 and 0 < stats["psnr_masked"] < 60
    text = (report / "report.md").read_text()
    assert "| fdgan | " in text and "| t2 baseline | " in text and (report / "figure.png").is_file()


def test_real_resume_is_bit_exact(real_run):
    root, result = real_run
    # Interrupted in epoch 1 (after step 3 of 4), resumed.
    part = trainer.train(options(root, root / "part", stop_after_steps=3))
    assert part["stopped"] and load_ckpt(root / "part")["step"] == 3
    trainer.train({"out": str(root / "part"), "resume": True, "no_progress": True})
    # Killed in epoch 2 without a checkpoint of its own, resumed from epoch 1's.
    with pytest.raises(trainer.StopTraining):
        trainer.train(options(root, root / "crash", stop_after_steps=6, stop_mode="crash"))
    trainer.train({"out": str(root / "crash"), "resume": True, "no_progress": True})
    full = load_ckpt(root / "full")
    for other in ("part", "crash"):
        state = load_ckpt(root / other)
        assert state["epoch"] == 2 and state["step"] == 0
        for key in ("G", "D"):
            for name, value in full[key].items():
                assert torch.equal(value, state[key][name]), (other, key, name)
        for pid, values in full["opt_G"]["state"].items():
            for name, value in values.items():
                assert torch.equal(value, state["opt_G"]["state"][pid][name]), (other, pid, name)
        assert [h["loss_G"] for h in state["history"]] == [h["loss_G"] for h in full["history"]]


def test_real_two_process_ddp(real_run, tmp_path):
    root, _ = real_run
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "training", "train", "--data", str(data_dir()), "--subjects", SUBJECTS, "--out", str(out),
           "--cache-dir", str(root / "cache"), "--width", "4", "--epochs", "1", "--slices-per-subject", "4",
           "--val-fraction", "0.3", "--test-fraction", "0", "--no-progress", "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (out / "train.log").read_text()
    assert "cpu x2" in log and log.count("training slices") == 1  # rank 0 writes, once
    rows = (out / "log.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].split(",")[2] == "2"  # 12 slices / 2 processes / batch 3 = 2 steps
    state = load_ckpt(out)
    assert state["world"] == 2 and len(state["rng"]) == 2
    bundle = load_bundle(out / "model.safetensors")
    assert bundle.provenance["processes"] == 2
