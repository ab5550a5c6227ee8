"""Training throughput: samples per second of the training step itself.

    python -m training bench [--width 16] [--models fdgan-m2 ...] [--precision fp32 bf16]
                             [--memory-format contiguous channels_last] [--execution eager compiled]
                             [--batch-size 3] [--repeats 3] [--threads N] [-o train_bench.json]

Times ``trainer.train_step`` (the one step the training loop runs: D then G update with
the loss the trainer uses by default, Adam) on random slices of 256x256, after warm-up
steps, for each model and precision; prints step time, samples/s, the step's FLOPs
(forward and backward of G and D, counted like ``MRISynthesisLib.benchmark``) and their
share of the machine's measured 3x3-convolution peak. ``--memory-format channels_last``
also times the step with networks and batches in channels-last layout (oneDNN's layout for
AMX; on an AMD EPYC without AMX it was 1.7x slower, docs/performance.md), and
``--execution compiled`` the step run through torch.compile as ``train --compile`` runs it
(its first step, the compilation, is reported apart; the FLOPs are counted on an eager
step). The data path (the slice cache) is not part of it. Median of the timed steps; the
load average is recorded.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable, Optional, Sequence

import torch

from MRISynthesisLib.benchmark import (MODELS, command_main, count_flops, load_average, machine_info, measure_peak,
                                       time_call, write_json)
from MRISynthesisLib.inference import autocast_context
from MRISynthesisLib.networks import ModelConfig, build_discriminator, build_generator, init_generator, init_weights

from .trainer import DEFAULTS, MEMORY_FORMATS, Objective, require_compiler, train_step

SCHEMA = "mrisynthesis-training-benchmark/1"
SHIPPED_WIDTH = 16  # the width of the shipped models (mrisynthesis info Resources/Models/...)
EXECUTIONS = ("eager", "compiled")


def make_step(config: ModelConfig, device: torch.device, precision: str, batch: int,
              memory_format: str = "contiguous", compiled: bool = False) -> Callable[[], object]:
    """A closure running one ``train_step`` on fixed random data, with the trainer's defaults
    (``compiled``: G and D through torch.compile, as ``train --compile``)."""
    torch.manual_seed(0)
    layout = MEMORY_FORMATS[memory_format]
    G = init_generator(build_generator(config)).to(device, memory_format=layout).train()
    D = init_weights(build_discriminator(config.input_channels, config.base_width)).to(device, memory_format=layout).train()
    betas = (DEFAULTS["beta1"], DEFAULTS["beta2"])
    opt_G = torch.optim.Adam(G.parameters(), lr=DEFAULTS["lr"], betas=betas)
    opt_D = torch.optim.Adam(D.parameters(), lr=DEFAULTS["lr"], betas=betas)
    x = (torch.rand(batch, config.input_channels, config.image_size, config.image_size) * 2 - 1).to(device)
    y = (torch.rand(batch, 1, config.image_size, config.image_size) * 2 - 1).to(device)
    x, y = x.contiguous(memory_format=layout), y.contiguous(memory_format=layout)
    brain = torch.ones(batch, 1, config.image_size, config.image_size, dtype=torch.bool, device=device)
    objective = Objective()  # the trainer's default objective
    if compiled:
        G, D = torch.compile(G, dynamic=False), torch.compile(D, dynamic=False)

    def step():
        return train_step(G, D, D, opt_G, opt_D, x, y, brain, lambda: autocast_context(device, precision), objective)

    return step


def measure(config: ModelConfig, device: torch.device, precision: str, batch: int, warmup: int,
            repeats: int, memory_format: str = "contiguous", execution: str = "eager") -> dict:
    step = make_step(config, device, precision, batch, memory_format)
    flops = count_flops(step)  # also a first (untimed) step
    first_step_s = None
    if execution == "compiled":
        step = make_step(config, device, precision, batch, memory_format, compiled=True)
        first_step_s = time_call(step, device, 0, 1)[0]  # the compilation
    times = time_call(step, device, warmup, repeats)
    per_step = statistics.median(times)
    return {"precision": precision, "memory_format": memory_format, "execution": execution, "batch_size": batch,
            "step_s": per_step, "samples_per_s": batch / per_step, "times_s": times, "first_step_s": first_step_s,
            "flops_per_step": flops, "gflops_per_s": flops / per_step / 1e9}


def run(width: int = SHIPPED_WIDTH, models: Sequence[str] = ("fdgan-m1", "fdgan-m2", "fdgan-m3", "pix2pix-m2"),
        precisions: Sequence[str] = ("fp32", "bf16"), memory_formats: Sequence[str] = ("contiguous",),
        executions: Sequence[str] = ("eager",), batch: int = DEFAULTS["batch_size"], warmup: int = 1,
        repeats: int = 3, device: str = "cpu", quick: bool = False, image_size: int = 256,
        log: Callable[[str], None] = lambda s: None) -> dict:
    dev = torch.device(device)
    result = {"schema": SCHEMA, "machine": machine_info(), "load_average_start": load_average(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "step": "training.trainer.train_step",
              "settings": {"width": width, "models": list(models), "precisions": list(precisions),
                           "memory_formats": list(memory_formats), "executions": list(executions), "batch_size": batch,
                           "warmup": warmup, "repeats": repeats, "device": device, "image_size": image_size,
                           "threads": torch.get_num_threads(), "statistic": "median"}}
    log("peak throughput")
    peaks = {p: measure_peak(dev, dtype, quick, warmup, max(repeats, 3))
             for p, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)) if p in precisions}
    result["peak_conv3x3_gflops_per_s"] = {p: v["conv3x3"]["gflops_per_s"] for p, v in peaks.items()}
    rows = []
    for model in models:
        arch, m = MODELS[model]
        # The pix2pix U-Net's 8 downsamplings need 256x256 whatever --quick asks.
        config = ModelConfig(architecture=arch, num_sources=m, base_width=width,
                             image_size=image_size if arch == "fdgan" else 256)
        for precision in precisions:
            for layout in memory_formats:
                for execution in executions:
                    log(f"{model} {precision} {layout} {execution}")
                    row = {"model": model, "width": width,
                           **measure(config, dev, precision, batch, warmup, repeats, layout, execution)}
                    row["fraction_of_conv3x3_peak"] = row["gflops_per_s"] / result["peak_conv3x3_gflops_per_s"][precision]
                    rows.append(row)
    result["rows"] = rows
    result["load_average_end"] = load_average()
    return result


def format_table(result: dict) -> str:
    s = result["settings"]
    lines = [f"training step ({result['step']}), width {s['width']}, batch {s['batch_size']}, {s['device']}, "
             f"{s['threads']} threads; load average {result['load_average_start']} -> {result['load_average_end']}",
             "peak 3x3 conv: " + ", ".join(f"{p} {v:.0f} GFLOP/s" for p, v in result["peak_conv3x3_gflops_per_s"].items()),
             f"{'model':<11} {'prec':<5} {'layout':<13} {'step':<8} {'s/step':>8} {'samples/s':>9} {'GFLOP/step':>10} "
             f"{'GFLOP/s':>8} {'%conv':>6} {'1st step s':>10}"]
    for r in result["rows"]:
        first = f"{r['first_step_s']:10.1f}" if r.get("first_step_s") is not None else f"{'-':>10}"
        lines.append(f"{r['model']:<11} {r['precision']:<5} {r.get('memory_format', 'contiguous'):<13} "
                     f"{r.get('execution', 'eager'):<8} {r['step_s']:8.3f} {r['samples_per_s']:9.2f} "
                     f"{r['flops_per_step'] / 1e9:10.1f} {r['gflops_per_s']:8.1f} {100 * r['fraction_of_conv3x3_peak']:5.0f}% {first}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--width", type=int, default=SHIPPED_WIDTH, help="generator/discriminator base width "
                                                                         f"(default {SHIPPED_WIDTH}, the shipped models')")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=("fp32", "bf16"),
                        dest="precisions")
    parser.add_argument("--memory-format", nargs="+", default=["contiguous"], choices=list(MEMORY_FORMATS),
                        dest="memory_formats", help="layouts to time (channels_last: oneDNN's layout for AMX)")
    parser.add_argument("--execution", nargs="+", default=["eager"], choices=EXECUTIONS, dest="executions",
                        help="compiled: the step through torch.compile, as train --compile (needs a C++ compiler; "
                             "minutes of compilation per row)")
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"],
                        help=f"slices per step (default {DEFAULTS['batch_size']}, the trainer's)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="64x64 slices for the paper generator, small peak probe (for tests; figures not meaningful)")
    parser.add_argument("-o", "--output", default=None, help="also write the result as JSON here")
    return parser


def bench_cli(args) -> int:
    if args.width < 1 or args.batch_size < 1 or args.repeats < 1 or args.warmup < 0:
        raise ValueError("--width, --batch-size and --repeats must be >= 1, --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: PyTorch sees no CUDA GPU")
    if "compiled" in args.executions:
        require_compiler(torch.device(args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(width=args.width, models=args.models, precisions=args.precisions,
                 memory_formats=args.memory_formats, executions=args.executions, batch=args.batch_size,
                 warmup=args.warmup, repeats=args.repeats, device=args.device, quick=args.quick,
                 image_size=64 if args.quick else 256, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(format_table(result))
    if args.output:
        write_json(result, args.output)
        print(f"wrote {args.output}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return command_main(add_arguments, bench_cli, "python -m training bench", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
