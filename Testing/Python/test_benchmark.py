"""The speed/memory benchmark: FLOP counting, derived figures and a --quick end-to-end run."""

import json
import math
import os

import pytest
import torch
from torch import nn

from MRISynthesisLib import benchmark
from MRISynthesisLib.networks import ModelConfig, build_generator

DATA = os.environ.get("MRISYNTHESIS_DATA")


def test_flops_of_known_layers_match_hand_count():
    conv = nn.Conv2d(3, 8, 3, 1, 1)
    x = torch.zeros(2, 3, 16, 16)
    # 2 FLOPs per MAC: out elements (2*8*16*16) x MACs per element (3*3*3).
    assert benchmark.count_flops(lambda: conv(x)) == 2 * (2 * 8 * 16 * 16) * (3 * 3 * 3)
    up = nn.ConvTranspose2d(4, 2, 4, 2, 1)
    y = torch.zeros(1, 4, 8, 8)
    # Transposed conv: every input element is multiplied into a 4x4 kernel for each output channel.
    assert benchmark.count_flops(lambda: up(y)) == 2 * (4 * 8 * 8) * (2 * 4 * 4)
    a, b = torch.zeros(5, 7), torch.zeros(7, 3)
    assert benchmark.count_flops(lambda: a @ b) == 2 * 5 * 7 * 3


def test_generator_flops_scale_with_width_squared_and_sources():
    def flops(width, m):
        net = build_generator(ModelConfig(num_sources=m, base_width=width)).eval()
        return benchmark.generator_flops_per_slice(net, m, size=64)  # small slices: same ratios, faster

    f4, f8 = flops(4, 2), flops(8, 2)
    # Dominated by w x w convolutions: doubling the width roughly quadruples the work.
    assert 3.5 < f8 / f4 < 4.1
    assert flops(4, 1) < f4 < flops(4, 3)


def test_derived_figures_are_consistent():
    d = benchmark.derived_figures(0.25, 164_000_000_000)
    assert d["slices_per_s"] == pytest.approx(4.0)
    assert d["volume_155_s"] == pytest.approx(155 * 0.25)
    assert d["gflops_per_s"] == pytest.approx(656.0)


def _check_row(row, peak):
    assert row["per_slice_s"] > 0 and all(t > 0 for t in row["times_s"])
    assert row["slices_per_s"] == pytest.approx(1.0 / row["per_slice_s"])
    assert row["volume_155_s"] == pytest.approx(155 * row["per_slice_s"])
    assert row["flops_per_slice"] > 0
    assert row["gflops_per_s"] == pytest.approx(row["flops_per_slice"] / row["per_slice_s"] / 1e9)
    assert row["fraction_of_conv3x3_peak"] == pytest.approx(row["gflops_per_s"] / peak["conv3x3"]["gflops_per_s"])


def test_quick_benchmark_writes_well_formed_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = benchmark.main(["--quick", "--width", "4", "--models", "fdgan-m1", "pix2pix-m2", "--no-data",
                         "--device", "cpu", "--volume-slices", "3", "6", "-o", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "fdgan-m1" in printed and "pix2pix-m2" in printed and f"wrote {out}" in printed
    result = json.loads(out.read_text())
    assert result["schema"] == benchmark.SCHEMA
    assert "1 multiply-accumulate = 2 FLOPs" in result["flop_convention"]
    assert len(result["load_average_start"]) == 3
    cpu = result["devices"]["cpu"]
    for p in ("fp32", "bf16"):
        peak = cpu["peak"][p]
        assert peak["matmul"]["gflops_per_s"] > 0 and peak["conv3x3"]["gflops_per_s"] > 0
        assert peak["matmul"]["flops"] == 2 * peak["matmul"]["n"] ** 3
        b, c, h, w = peak["conv3x3"]["shape"]
        assert peak["conv3x3"]["flops"] == 2 * b * c * h * w * c * 9
    rows = cpu["models"]
    assert [(r["model"], r["precision"]) for r in rows] == [
        ("fdgan-m1", "fp32"), ("fdgan-m1", "bf16"), ("pix2pix-m2", "fp32"), ("pix2pix-m2", "bf16")]
    for r in rows:
        _check_row(r, cpu["peak"][r["precision"]])
        assert r["width"] == 4 and r["process_peak_rss_bytes"] > 0
        assert "training" not in r  # training throughput: python -m training bench
    # Same network, same FLOPs whatever the precision.
    assert rows[0]["flops_per_slice"] == rows[1]["flops_per_slice"]
    # Each row is fed the way synthesize() feeds the generator on this machine.
    from MRISynthesisLib.inference import NetworkFeed
    for r in rows:
        feed = NetworkFeed.of("cpu", r["precision"])
        assert r["run_as"] == ("fp32" if r["precision"] == "fp32" else "bf16-native")
        assert r["channels_last"] == feed.channels_last
    assert "as synthesize() feeds it" in printed
    sweep = cpu["sweep"]["rows"]
    assert sweep[0]["speedup_vs_baseline"] == pytest.approx(1.0)
    for r in sweep:
        assert r["per_slice_s"] > 0
        assert r["speedup_vs_baseline"] == pytest.approx(sweep[0]["per_slice_s"] / r["per_slice_s"])
    vols = cpu["volume"]
    assert [v["slices"] for v in vols] == [3, 6]
    for v in vols:
        assert v["seconds"] > 0 and v["peak_rss_bytes"] >= v["rss_after_import_bytes"] > 0
        assert v["volume_bytes"] == v["slices"] * 240 * 240 * 4
        assert v["output_shape"] == [240, 240, v["slices"]]
    checks = result["checks"]
    assert "volume_155_under_3gb" not in checks  # no 155-slice run in this test
    assert checks["volume_extra_bytes_per_volume"] == 3 * 240 * 240 * 4
    assert math.isfinite(checks["bf16_paper_generator_min_fraction_of_conv3x3_peak"])


def test_bad_arguments_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        benchmark.main(["--quick", "--width", "0", "-o", str(tmp_path / "x.json")])
    assert exc.value.code == 2
    assert "--width must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        benchmark.main(["--models", "nonexistent"])
    with pytest.raises(SystemExit) as exc:
        benchmark.main(["--quick", "-o", str(tmp_path / "missing" / "x.json")])
    assert "output folder does not exist" in capsys.readouterr().err


@pytest.mark.skipif(not DATA or not os.path.isdir(DATA), reason="MRISYNTHESIS_DATA is unset or not a folder: "
                    "the bf16-vs-fp32 check needs the real data")
def test_bf16_output_agrees_with_fp32_on_a_real_case():
    check = benchmark.precision_check(DATA, width=4, subjects=["brats-gli-00001"], max_slices=2, batch_size=2)
    assert "skipped" not in check, check.get("skipped")
    case = check["cases"][0]
    assert case["slices"] == 2
    # A random network's output is not flat, so the comparison is not vacuous ...
    assert case["fp32_output_std_in_brain"] > 0
    # ... and bf16 stays close to fp32: a bf16-vs-fp32 error 40 dB below the signal moves a
    # ~24 dB PSNR against ground truth by < 0.1 dB (10*log10(1 + 10**-1.6) = 0.1).
    assert 40 < case["psnr_bf16_vs_fp32_db"] < math.inf
    # The criterion, literally: against the real FLAIR the two differ by < 0.1 dB.
    assert case["psnr_vs_real_difference_db"] < 0.1
    assert check["max_psnr_vs_real_difference_db"] == case["psnr_vs_real_difference_db"]


def test_preferred_precision_follows_the_hardware():
    from MRISynthesisLib.inference import PRECISIONS, preferred_precision

    assert preferred_precision("cpu") in PRECISIONS
    if not torch.cuda.is_available():
        assert preferred_precision("cuda") == "fp32"  # no GPU: never claim bf16 for it
    with open("/proc/cpuinfo") if os.path.exists("/proc/cpuinfo") else open(os.devnull) as f:
        flags = f.read()
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        assert preferred_precision("cpu") == "bf16"
    elif "avx512" not in flags:
        assert preferred_precision("cpu") == "fp32"


# ----------------------------------------------------------------- end to end (mrisynthesis bench)


def test_end_to_end_quick_reports_every_stage_and_contention(tmp_path, capsys):
    """mrisynthesis bench --quick: fresh processes on a synthetic case, every stage as seconds
    and share, the network against its floor, and idle vs one busy core (plumbing only)."""
    from MRISynthesisLib import e2e_benchmark
    from MRISynthesisLib.cli import main as cli_main

    out = tmp_path / "e2e.json"
    assert cli_main(["bench", "--quick", "--repeats", "1", "--policies", "default", "--device", "cpu",
                     "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    for stage in e2e_benchmark.STAGES:
        assert f"  {stage}" in printed, stage
    assert "floor" in printed and "busy/idle" in printed
    result = json.loads(out.read_text())
    entry = result["devices"]["cpu"]["models"]["t1_t2_to_flair"]
    assert entry["slices"] == 6 and entry["shape"] == [240, 240, 6]
    stages = entry["stages_s"]
    assert all(stages[s] >= 0 for s in e2e_benchmark.STAGES) and stages["start-up"] > 0 and stages["network"] > 0
    assert sum(stages.values()) == pytest.approx(entry["total_s"], rel=1e-6)  # "other" closes the sum
    floor = entry["floor"]
    assert floor["flops"] == floor["flops_per_slice"] * 6 and set(floor["floor_s"]) == {"fp32", "bf16"}
    row = result["contention"]["policies"]["default"]
    assert row["busy_over_idle"] == pytest.approx(row["busy_s"] / row["idle_s"])
    assert len(result["load_average_start"]) == 3


def test_end_to_end_skips_clearly_without_data(tmp_path, capsys, monkeypatch):
    from MRISynthesisLib.cli import main as cli_main

    monkeypatch.delenv("MRISYNTHESIS_DATA", raising=False)
    assert cli_main(["bench"]) == 0
    assert "end-to-end benchmark skipped" in capsys.readouterr().out
    assert cli_main(["bench", "--data", str(tmp_path)]) == 0
    assert "has no t1.nii.gz" in capsys.readouterr().out
    assert cli_main(["bench", "--repeats", "0", "--quick"]) == 2
    assert "--repeats must be >= 1" in capsys.readouterr().err


# ----------------------------------------------------------------- structure


def test_core_library_never_imports_training_and_cli_demo_do_not_cycle():
    """Arrows point inward: MRISynthesisLib imports neither the training package nor (the
    command line aside) its own command line; cli imports demo, never the reverse."""
    import ast
    import pathlib

    import MRISynthesisLib

    root = pathlib.Path(MRISynthesisLib.__file__).parent
    for path in root.glob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
                names += [("." * node.level) + a.name for a in node.names if not node.module]
            else:
                continue
            for name in names:
                assert name.split(".")[0] != "training", f"{path.name} imports {name}"
                if path.name not in ("cli.py", "__main__.py"):
                    assert name not in (".cli", "MRISynthesisLib.cli"), f"{path.name} imports the command line"
    # And at run time: importing every core module loads no training module.
    import subprocess
    import sys

    code = ("import importlib, pkgutil, sys, MRISynthesisLib; "
            "[importlib.import_module('MRISynthesisLib.' + m.name) for m in pkgutil.iter_modules(MRISynthesisLib.__path__) "
            "if m.name != '__main__']; print(sorted(k for k in sys.modules if k.split('.')[0] == 'training'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_training_step_exists_once():
    """The training benchmark times the trainer's own step; the core library has no copy."""
    import inspect

    from MRISynthesisLib import benchmark as core_benchmark
    from training import benchmark as training_benchmark
    from training import trainer

    assert "train_step(" in inspect.getsource(trainer.Run.train)
    assert "train_step(" in inspect.getsource(training_benchmark.make_step)
    source = inspect.getsource(core_benchmark)
    assert ".backward(" not in source and "torch.optim" not in source


def test_training_bench_quick(capsys, tmp_path):
    from training.cli import main as training_main

    out = tmp_path / "bench.json"
    assert training_main(["bench", "--quick", "--width", "4", "--models", "fdgan-m1", "--precision", "fp32",
                          "--memory-format", "contiguous", "channels_last", "--execution", "eager", "compiled",
                          "--repeats", "1", "--warmup", "0", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "training.trainer.train_step" in printed and "fdgan-m1" in printed
    rows = [line.split() for line in printed.splitlines() if line.startswith("fdgan-m1")]
    assert [row[2:4] for row in rows] == [["contiguous", "eager"], ["contiguous", "compiled"],
                                         ["channels_last", "eager"], ["channels_last", "compiled"]]
    measured = json.loads(out.read_text())["rows"]
    # The compiled step counts the eager step's FLOPs; its first step (the compilation) is apart.
    assert measured[0]["flops_per_step"] == measured[1]["flops_per_step"] > 0
    assert measured[0]["first_step_s"] is None and measured[1]["first_step_s"] > measured[1]["step_s"]
