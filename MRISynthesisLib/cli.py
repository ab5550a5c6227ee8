"""The ``mrisynthesis`` command line.

    mrisynthesis predict --t1 T1 [--t2 T2] [--t1c T1C] [--brain-mask auto|none|FILE]
                         [--save-mask PATH] [--uncertainty PATH] [--model BUNDLE] -o OUT
    (T1/T2/T1C: an image file or a folder holding one DICOM series; every volume written is
    marked as synthetic in its header and gets a JSON sidecar: MRISynthesisLib.provenance)
    mrisynthesis info BUNDLE | SYNTHETIC_VOLUME | SIDECAR.json
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


def check_output_paths(outputs, inputs, overwrite: bool) -> None:
    """Refuse, before any work, outputs that cannot be written as asked. ``outputs``:
    [(option, volume path)], each written with its JSON sidecar (provenance.output_files);
    ``inputs``: [(option, path)]. Every file of every output is checked: supported
    extension, existing folder, not an input, not another output's file, not existing
    unless ``overwrite``."""
    from .provenance import VOLUME_SUFFIXES, output_files, sidecar_path

    for option, out in outputs:
        if not out.lower().endswith(OUTPUT_SUFFIXES):
            raise InputError(f"{option} {out}: unsupported extension; use one of {', '.join(OUTPUT_SUFFIXES)}")
        if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
            raise InputError(f"{option} folder does not exist: {os.path.dirname(os.path.abspath(out))}")
    files = [(option, path, path == out) for option, out in outputs for path in output_files(out)]
    # An input's own JSON sidecar (a BIDS T1w.json) is the input's too.
    protected = list(inputs) + [(f"{name} input's sidecar", sidecar_path(source)) for name, source in inputs
                                if os.path.isfile(source) and source.lower().endswith(VOLUME_SUFFIXES)]
    for option, path, is_volume in files:
        what = f"{option} {path}" if is_volume else f"the sidecar {path} of {option}"
        for name, source in protected:
            if _same_file(path, source):
                whose = name if name.endswith("sidecar") else f"{name} input"
                raise InputError(f"{what} is the {whose}; refusing to overwrite an input")
    for i, (option, path, is_volume) in enumerate(files):
        for other, other_path, _ in files[:i]:
            if other != option and _same_file(path, other_path):
                raise InputError(f"{option} and {other} would both write {path} (each output has a sidecar "
                                 f"{os.path.basename(sidecar_path(path))}); choose other names")
    for option, path, is_volume in files:
        if os.path.exists(path) and not overwrite:
            what = f"{option} {path}" if is_volume else f"{option}'s sidecar {path}"
            raise InputError(f"{what} exists; pass --overwrite to replace it")


def cmd_predict(args) -> int:
    from .brainmask import brain_mask_spec
    from .inference import synthesize_with_details
    from .models import resolve_model
    from .provenance import sidecar_path
    from .volumes import save_volumes

    inputs = {name: getattr(args, name) for name in SOURCE_OPTIONS if getattr(args, name)}
    if args.mask and args.brain_mask is not None:
        raise InputError("give the mask once: --brain-mask FILE (--mask FILE is the older spelling)")
    mask_spec = brain_mask_spec(args.mask or args.brain_mask or "auto")
    outputs = [("output", args.output)] + ([("--save-mask", args.save_mask)] if args.save_mask else []) \
        + ([("--uncertainty", args.uncertainty)] if args.uncertainty else [])
    mask_file = [("brain-mask", mask_spec)] if mask_spec not in ("auto", "none") else []
    for name, path in list(inputs.items()) + mask_file:
        if not os.path.exists(path):
            raise InputError(f"--{name}: file not found (nor a DICOM folder): {path}")
    check_output_paths(outputs, [(f"--{name}", path) for name, path in list(inputs.items()) + mask_file],
                       args.overwrite)
    model_path = resolve_model(args.model, inputs)
    result = synthesize_with_details(inputs, str(model_path), mask=mask_spec, device=args.device,
                                     precision=args.precision, batch_size=args.batch_size,
                                     progress=None if args.quiet else _Progress(), threads=args.threads,
                                     uncertainty=bool(args.uncertainty))
    written = [(result.volume, args.output)]
    if args.save_mask:
        written.append((result.brain_mask, args.save_mask))
    if args.uncertainty:
        written.append((result.uncertainty, args.uncertainty))
    save_volumes(written)  # all files, sidecars included, or none
    if not args.quiet:
        print(result.mask_decision.description)
        print(f"wrote {args.output} (synthetic, marked; sidecar {sidecar_path(args.output)})"
              + (f", the brain mask {args.save_mask}" if args.save_mask else "")
              + (f", the uncertainty map {args.uncertainty} ({result.provenance['Uncertainty']['NetworkPasses']} "
                 "network passes; docs/uncertainty.md)" if args.uncertainty else "")
              + f" (model {model_path})")
    return 0


BUNDLE_SUFFIXES = (".safetensors",)


def cmd_info(args) -> int:
    """A model bundle: what it expects and how it was trained. A volume MRISynthesis wrote
    (or its JSON sidecar): its provenance; exit status 1 when it carries none."""
    from .provenance import SIDECAR_SUFFIX, VOLUME_SUFFIXES, read_provenance

    path = args.file
    if path.lower().endswith(VOLUME_SUFFIXES + (SIDECAR_SUFFIX,)):
        report = read_provenance(path)
        print(report.describe())
        return 0 if report.marked else 1
    from .bundle import load_bundle

    print(load_bundle(path).describe())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mrisynthesis", description="Synthesise a missing MRI contrast (FLAIR).")
    parser.add_argument("--version", action="version", version=f"mrisynthesis {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("predict", help="synthesise FLAIR from T1 [+ T2 [+ T1c]] NIfTI/NRRD files")
    p.add_argument("--t1", required=True, help="T1-weighted volume: a file or a folder holding one DICOM "
                                               "series (the output takes its grid)")
    p.add_argument("--t2", help="T2-weighted volume (file or DICOM folder)")
    p.add_argument("--t1c", help="post-contrast T1 volume (file or DICOM folder)")
    p.add_argument("--brain-mask", metavar="auto|none|FILE",
                   help="auto (default): extract the brain from the T1 with deepbet unless it is already "
                        "skull-stripped; none: the non-zero voxels are the brain; FILE: a brain mask "
                        "(non-zero = brain). Outside the brain the output is 0")
    p.add_argument("--mask", metavar="FILE", help=argparse.SUPPRESS)  # older spelling of --brain-mask FILE
    p.add_argument("--save-mask", metavar="PATH", help="also write the brain mask used (1 = brain) to PATH")
    p.add_argument("--uncertainty", metavar="PATH",
                   help="also write a per-voxel uncertainty map to PATH: the spread of the synthetic image over "
                        "test-time augmentations (costs one network pass per augmentation; what it is worth "
                        "against the real error: docs/uncertainty.md). Off by default")
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
                        "one per usable core; workers of one thread that each take the next batch when free)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file (never an input)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("info", help="print what a model bundle expects and how it was trained, or how a synthetic "
                                    "volume was made (its provenance)")
    p.add_argument("file", help="model bundle (.safetensors), or a volume MRISynthesis wrote (.nii.gz, .nii, .nrrd, "
                                ".mha) or its JSON sidecar")
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
