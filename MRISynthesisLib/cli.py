"""The ``mrisynthesis`` command line.

    mrisynthesis predict --t1 T1 [--t2 T2] [--t1c T1C] [--mask MASK] [--model BUNDLE] -o OUT
    mrisynthesis info BUNDLE
    mrisynthesis bench [--data DIR]          (end to end; bench-network: the generators alone)

Errors are reported as one line ``mrisynthesis: error: ...`` with exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from . import __version__
from .errors import InputError, run_command

SOURCE_OPTIONS = ("t1", "t2", "t1c")
# Single-file formats only: they are written under a temporary name and renamed.
OUTPUT_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha")


def _same_file(a: str, b: str) -> bool:
    a, b = os.path.abspath(a), os.path.abspath(b)
    if a == b:
        return True
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


class _Progress:
    """A one-line progress display on stderr (quiet when not a terminal, except the end)."""

    def __init__(self, stream=sys.stderr):
        self.stream, self.start, self.tty = stream, time.perf_counter(), stream.isatty()

    def __call__(self, done: int, total: int):
        if not self.tty and done < total:
            return
        width = 30
        filled = int(width * done / max(total, 1))
        elapsed = time.perf_counter() - self.start
        end = "\n" if done >= total else ""
        self.stream.write(f"\rsynthesising [{'#' * filled}{'.' * (width - filled)}] {done}/{total} slices "
                          f"{elapsed:5.1f}s{end}")
        self.stream.flush()


def _threads(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def cmd_predict(args) -> int:
    from .inference import synthesize
    from .models import resolve_model
    from .volumes import save_volume

    inputs = {name: getattr(args, name) for name in SOURCE_OPTIONS if getattr(args, name)}
    if not args.output.lower().endswith(OUTPUT_SUFFIXES):
        raise InputError(f"output {args.output}: unsupported extension; use one of {', '.join(OUTPUT_SUFFIXES)}")
    for name, path in list(inputs.items()) + ([("mask", args.mask)] if args.mask else []):
        if not os.path.isfile(path):
            raise InputError(f"--{name}: file not found: {path}")
        if _same_file(path, args.output):
            raise InputError(f"output {args.output} is the --{name} input; refusing to overwrite an input")
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise InputError(f"output folder does not exist: {out_dir}")
    if os.path.exists(args.output) and not args.overwrite:
        raise InputError(f"output {args.output} exists; pass --overwrite to replace it")
    model_path = resolve_model(args.model, inputs)
    result = synthesize(inputs, str(model_path), mask=args.mask, device=args.device, precision=args.precision,
                        batch_size=args.batch_size, progress=None if args.quiet else _Progress(),
                        threads=args.threads)
    save_volume(result, args.output)
    if not args.quiet:
        print(f"wrote {args.output} (model {model_path})")
    return 0


def cmd_info(args) -> int:
    from .bundle import load_bundle

    print(load_bundle(args.bundle).describe())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mrisynthesis", description="Synthesise a missing MRI contrast (FLAIR).")
    parser.add_argument("--version", action="version", version=f"mrisynthesis {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("predict", help="synthesise FLAIR from T1 [+ T2 [+ T1c]] NIfTI/NRRD files")
    p.add_argument("--t1", required=True, help="T1-weighted volume (the output takes its grid)")
    p.add_argument("--t2", help="T2-weighted volume")
    p.add_argument("--t1c", help="post-contrast T1 volume")
    p.add_argument("--mask", help="brain mask (non-zero = brain); default: non-zero voxels")
    p.add_argument("--model", help="model bundle file or shipped model name; default: the shipped model "
                                   "that takes exactly the given inputs")
    p.add_argument("-o", "--output", required=True, help="output file (.nii.gz, .nii, .nrrd, .mha)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto (default): bf16 where the CPU/GPU computes it natively (about 2x faster, "
                        "within 0.01 dB of fp32), else fp32")
    p.add_argument("--batch-size", type=int, default=4, help="slices per forward pass (memory scales with it)")
    p.add_argument("--threads", type=_threads, default=None,
                   help="CPU threads for the network (default: $MRISYNTHESIS_THREADS, $OMP_NUM_THREADS, else "
                        "the cores not busy with other processes when the network starts)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file (never an input)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("info", help="print what a model bundle expects and how it was trained")
    p.add_argument("bundle", help="model bundle file (.safetensors)")
    p.set_defaults(func=cmd_info)

    from .demo import add_demo_arguments, demo_main

    p = sub.add_parser("demo", help="synthesise a FLAIR for a simulated default case (or --subject DIR); "
                                    "write NIfTI, a figure and metrics")
    add_demo_arguments(p)
    p.set_defaults(func=demo_main)

    from . import e2e_benchmark
    from .benchmark import add_bench_arguments, bench_main

    p = sub.add_parser("bench", help="time the whole path a user waits for, stage by stage, on a real case "
                                     "(idle and with one core busy)")
    e2e_benchmark.add_arguments(p)
    p.set_defaults(func=_arguments_checked(e2e_benchmark.bench_main))
    p = sub.add_parser("bench-network", help="the generators' speed and memory against the machine's peak")
    add_bench_arguments(p)
    p.set_defaults(func=_arguments_checked(bench_main))
    return parser


def _arguments_checked(func):
    """The benchmarks refuse bad arguments with ValueError: report it as one line."""

    def run(args):
        try:
            return func(args)
        except InputError:
            raise
        except ValueError as exc:
            raise InputError(str(exc)) from None

    return run


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.func, args)


def entry() -> None:
    """The ``mrisynthesis`` program. After ``predict`` has written its output the process
    ends at once: Python's orderly shutdown with PyTorch loaded takes 0.3-0.7 s here
    (docs/performance.md) and there is nothing left to flush but the standard streams."""
    argv = sys.argv[1:]
    rc = main(argv)
    if argv[:1] == ["predict"]:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)


if __name__ == "__main__":
    entry()
