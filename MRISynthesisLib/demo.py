"""The demo: synthesise a FLAIR for a default case (or your subject) and show how good it is.

    python -m MRISynthesisLib.demo                       # simulated ICBM152 case, shipped model
    python -m MRISynthesisLib.demo --subject DIR         # DIR/t1.nii.gz [t2, t1c, flair, mask]
    python -m MRISynthesisLib.demo --model my.safetensors --out results/

Writes to ``--out`` (default ``demo-output/``):
- ``synthetic_flair.nii.gz``: the synthetic FLAIR on the T1 grid, output scale [0, output_max],
  marked as synthetic in its header, with its provenance sidecar ``synthetic_flair.json``
  (MRISynthesisLib.provenance);
- ``phantom/``: the simulated inputs, reference FLAIR, brain mask and lesion map as NIfTI
  (default case only; open them in 3D Slicer, or rerun with ``--subject OUT/phantom``);
- ``figure.png``: a few axial slices: inputs, synthetic, reference FLAIR, absolute error;
- ``metrics.json``: PSNR / SSIM / NRMSE, whole slice and brain-masked, when a reference
  FLAIR exists. They are computed in output units [0, output_max], as ``python -m training
  evaluate`` does: the real FLAIR goes through
  ``preprocessing.real_target_in_output_units`` (the training normalisation, mapped like
  the network output); per axial slice with brain on the volume's own grid, averaged
  (``MRISynthesisLib.metrics.subject_metrics``).

The model is ``--model`` (file or shipped name) or the shipped bundle for the richest
source set available (T1+T2+T1c, else T1+T2, else T1); ``--sources`` chooses the set.
User errors raise ``MRISynthesisError`` subclasses (``main`` prints them as one line).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from .errors import BundleError, InputError

log = logging.getLogger(__name__)

SOURCE_SETS = (("t1", "t2", "t1c"), ("t1", "t2"), ("t1",))  # richest first
SOURCE_NAMES = ("t1", "t2", "t1c")
DEFAULT_OUT = "demo-output"
OUTPUT_FILES = ("synthetic_flair.nii.gz", "synthetic_flair.json", "figure.png", "metrics.json")
PHANTOM_DIR = "phantom"
PHANTOM_MARKER = "phantom.json"  # marks a folder the demo wrote, safe to rewrite


def add_demo_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--subject", metavar="DIR",
                        help="your own subject folder with t1.nii.gz and optionally t2, t1c, flair (reference "
                             "for metrics) and mask (.nii.gz/.nii/.nrrd; BraTS names and BIDS sub-X folders "
                             "with anat/sub-X_T1w.nii.gz also work); without a mask the brain is extracted "
                             "unless skull-stripped; default: a case simulated from the ICBM152 template "
                             "shipped with nilearn")
    parser.add_argument("--model", help="model bundle file or shipped model name; default: the shipped model "
                                        "for the richest source set available")
    parser.add_argument("--sources", type=_parse_sources, metavar="LIST",
                        help="comma-separated sources to use, e.g. t1,t2 (default: richest available)")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help=f"output folder, created if needed (default: {DEFAULT_OUT})")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="auto (default): bf16 where the hardware computes it natively, else fp32")
    parser.add_argument("--batch-size", type=int, default=4, help="slices per forward pass")
    group = parser.add_argument_group("default case (simulated)")
    group.add_argument("--seed", type=int, default=0, help="noise, lesion and vessel pattern (default 0)")
    group.add_argument("--lesions", type=int, default=3, help="white-matter lesions to add (default 3)")
    group.add_argument("--noise", type=float, default=0.02,
                       help="Rician noise sigma as a fraction of the bright end (default 0.02)")
    group.add_argument("--resolution", type=int, default=1, help="voxel size in mm, 1 or coarser (default 1)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress display or summary")
    return parser


def _parse_sources(text: str) -> tuple:
    names = tuple(s.strip().lower() for s in text.split(",") if s.strip())
    unknown = [s for s in names if s not in SOURCE_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown source(s) {', '.join(unknown) or '(none)'}; "
                                         f"choose from {', '.join(SOURCE_NAMES)}")
    if "t1" not in names:
        raise argparse.ArgumentTypeError("the sources must include t1 (every model takes T1)")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"a source is listed twice in {text!r}")
    return tuple(s for s in SOURCE_NAMES if s in names)


# ---------------------------------------------------------------------------- the case


class Case:
    """Inputs of one demo run: volumes by name, optional reference FLAIR and mask."""

    def __init__(self, label: str, volumes: dict, reference=None, mask=None, files=None, phantom=None):
        self.label, self.volumes, self.reference, self.mask = label, volumes, reference, mask
        self.files = files or {}  # name -> path of the input files (to refuse overwriting them)
        self.phantom = phantom


def find_subject_files(folder) -> Dict[str, str]:
    """{name: path} for the t1/t2/t1c/flair/mask files in ``folder`` (t1 required), by
    MRISynthesisLib.subjects' naming rule."""
    from .subjects import subject_files

    found = subject_files(folder)
    if "t1" not in found:
        raise InputError(f"subject folder {folder} has no t1 volume (expected t1.nii.gz or a BraTS name such as "
                         f"..._t1.nii.gz / ...-t1n.nii.gz, and optionally t2, t1c, flair, mask)")
    return found


def load_subject(folder, sources: Sequence[str] = SOURCE_NAMES) -> Case:
    """The subject's volumes for ``sources`` (those present), reference FLAIR and mask."""
    from .volumes import load_volume

    files = find_subject_files(folder)
    volumes = {name: load_volume(files[name], name) for name in sources if name in files}
    reference = load_volume(files["flair"], "flair") if "flair" in files else None
    mask = load_volume(files["mask"], "mask") if "mask" in files else None
    return Case(str(folder), volumes, reference, mask, files)


def load_phantom_case(args) -> Case:
    from .phantom import make_phantom

    phantom = make_phantom(seed=args.seed, num_lesions=args.lesions, noise=args.noise,
                           resolution=args.resolution)
    volumes = {name: phantom.volumes[name] for name in SOURCE_NAMES}
    return Case("simulated ICBM152 case", volumes, phantom.volumes["flair"], phantom.mask, phantom=phantom)


# ---------------------------------------------------------------------------- the model


def choose_model(model: Optional[str], sources: Optional[Sequence[str]], available: Sequence[str]):
    """(bundle, sources): the bundle to run and the sources it takes, all of them available."""
    from .bundle import load_bundle
    from .models import bundle_name, resolve_model, shipped_bundles

    available = [s for s in SOURCE_NAMES if s in available]
    if sources:
        missing = [s for s in sources if s not in available]
        if missing:
            raise InputError(f"--sources asks for {', '.join(missing)} but the case has only "
                             f"{', '.join(available)}")
    if model:
        bundle = load_bundle(resolve_model(model, sources or available))
        if sources and tuple(sources) != tuple(bundle.sources):
            raise InputError(f"--sources {'+'.join(sources)} does not match the model, which takes "
                             f"{'+'.join(bundle.sources)}")
        missing = [s for s in bundle.sources if s not in available]
        if missing:
            raise InputError(f"the model needs {', '.join(bundle.sources)} but the case has no "
                             f"{', '.join(missing)}")
        return bundle, tuple(bundle.sources)
    candidates = [tuple(sources)] if sources else [s for s in SOURCE_SETS if all(x in available for x in s)]
    if not candidates:
        raise InputError(f"no source set can be formed from {', '.join(available)}")
    shipped = shipped_bundles()
    for candidate in candidates:
        if bundle_name(candidate) in shipped:
            return load_bundle(resolve_model(None, candidate)), candidate
    tried = ", ".join(" + ".join(c) for c in candidates)
    raise BundleError(f"no shipped model takes the demo's inputs (tried {tried} -> flair; shipped: "
                      f"{', '.join(sorted(shipped)) or 'none installed'}); pass --model BUNDLE.safetensors")


# ---------------------------------------------------------------------------- outputs


def _same_file(a, b) -> bool:
    a, b = os.path.abspath(a), os.path.abspath(b)
    return a == b or (os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b))


def prepare_output(out: str, input_files: Dict[str, str], phantom: bool) -> Dict[str, str]:
    """Create the output folder; refuse to overwrite an input or a folder the demo did not write."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"--out {out} exists and is not a folder")
    paths = {name: os.path.join(out, name) for name in OUTPUT_FILES}
    for path in paths.values():
        for name, src in input_files.items():
            if _same_file(path, src):
                raise InputError(f"output {path} is the {name} input; refusing to overwrite an input "
                                 f"(choose another --out)")
    if phantom:
        phantom_dir = os.path.join(out, PHANTOM_DIR)
        if (os.path.isdir(phantom_dir) and os.listdir(phantom_dir)
                and not os.path.isfile(os.path.join(phantom_dir, PHANTOM_MARKER))):
            raise InputError(f"{phantom_dir} exists and was not written by the demo; refusing to overwrite "
                             f"its files (choose another --out)")
        paths[PHANTOM_DIR] = phantom_dir
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create output folder {out}: {exc}") from exc
    return paths


def _axial(volume_array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """(X, Y, Z) in RAS order: axial slices along the last axis."""
    from .preprocessing import AxialReorientation

    return AxialReorientation(affine).forward(volume_array)


def normalized_pair(synthetic, reference, mask: np.ndarray, config):
    """Real FLAIR normalised like training, on the synthetic's output scale [0, output_max]."""
    from .preprocessing import real_target_in_output_units

    real = real_target_in_output_units(reference.array, mask, config, "flair")
    fake = np.where(mask, synthetic.array, 0.0).astype(np.float32)
    return real, fake


def evaluate(real: np.ndarray, fake: np.ndarray, mask: np.ndarray, affine: np.ndarray,
             lesion: Optional[np.ndarray] = None) -> dict:
    """Whole-slice and brain metrics over the brain slices; with a lesion map (voxels
    more than half lesion), lesion conspicuity and lesion PSNR as in the evaluation."""
    from .metrics import lesion_metrics, subject_metrics

    real, fake, mask = (_axial(a, affine) for a in (real, fake, mask))
    slices = np.flatnonzero(mask.any(axis=(0, 1)))
    result = subject_metrics(real[..., slices].transpose(2, 0, 1), fake[..., slices].transpose(2, 0, 1),
                             mask[..., slices].transpose(2, 0, 1))
    if lesion is not None:
        result.update(lesion_metrics(real, fake, _axial(lesion, affine) > 0.5, mask))
    return {k: (v if isinstance(v, int) or math.isfinite(v) else None) for k, v in result.items()}


def figure_slices(mask: np.ndarray, lesion: Optional[np.ndarray] = None, count: int = 3) -> List[int]:
    """Axial indices (RAS order) through the brain: around the middle, one through a lesion."""
    z = np.flatnonzero(mask.any(axis=(0, 1)))
    picks = [int(z[int(round(f * (len(z) - 1)))]) for f in np.linspace(0.3, 0.7, count)]
    if lesion is not None and lesion.any():
        through = int(np.argmax(lesion.sum(axis=(0, 1))))
        picks[int(np.argmin([abs(p - through) for p in picks]))] = through  # keep the slices apart
    return sorted(set(picks))


def save_figure(path: str, inputs: dict, fake: np.ndarray, real: Optional[np.ndarray], mask: np.ndarray,
                affine: np.ndarray, config, lesion: Optional[np.ndarray] = None, title: str = "") -> None:
    """Rows = axial slices; columns = inputs, synthetic, reference FLAIR, |error| (normalised units)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    from .preprocessing import real_target_in_output_units

    top = config.output_max
    columns = [(name.upper(), real_target_in_output_units(v.array, mask, config, name), "gray", (0, top))
               for name, v in inputs.items()]
    columns.append(("synthetic FLAIR", fake, "gray", (0, top)))
    if real is not None:
        columns.append(("reference FLAIR", real, "gray", (0, top)))
        columns.append(("|error|", np.abs(real - fake) * mask, "magma", (0, top / 2)))
    columns = [(t, _axial(a, affine), c, r) for t, a, c, r in columns]
    ras_mask = _axial(mask, affine)
    rows = figure_slices(ras_mask, None if lesion is None else _axial(lesion, affine))
    from .preprocessing import AxialReorientation

    spacing = AxialReorientation(affine).ras_spacing
    aspect = spacing[1] / spacing[0]
    fig = Figure(figsize=(2.3 * len(columns) + 0.5, 2.5 * len(rows) + 0.6), dpi=110, layout="constrained")
    axes = fig.subplots(len(rows), len(columns), squeeze=False)
    for r, z in enumerate(rows):
        for c, (label, array, cmap, (vmin, vmax)) in enumerate(columns):
            ax = axes[r][c]
            im = ax.imshow(array[:, :, z].T, origin="lower", cmap=cmap, vmin=vmin, vmax=vmax,
                           aspect=aspect, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(label, fontsize=9)
            if c == 0:
                ax.set_ylabel(f"axial {z}", fontsize=8)
            if r == len(rows) - 1 and label == "|error|":
                fig.colorbar(im, ax=[axes[i][c] for i in range(len(rows))], fraction=0.046, pad=0.02)
    fig.suptitle((title + "\n" if title else "") + f"output units [0, {top:g}]; patient's right on the right",
                 fontsize=9)
    fig.savefig(path)


class _Progress:
    """Progress display on stderr via tqdm (quiet when asked)."""

    def __init__(self, quiet: bool):
        self.bar, self.quiet = None, quiet

    def __call__(self, done: int, total: int):
        if self.quiet:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="synthesising", unit="slice", file=sys.stderr, leave=True)
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.bar.close()


# ---------------------------------------------------------------------------- main


def demo_main(args) -> int:
    """Run the demo from parsed arguments (see ``add_demo_arguments``); 0 on success."""
    from .inference import resolve_device, resolve_precision, synthesize_with_details
    from .phantom import save_phantom
    from .volumes import resample_to_reference, save_volume

    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    start = time.perf_counter()
    # Model and output folder first: their errors come before the slow loading.
    files = find_subject_files(args.subject) if args.subject else {}
    available = [s for s in SOURCE_NAMES if s in files] if args.subject else list(SOURCE_NAMES)
    bundle, sources = choose_model(args.model, args.sources, available)
    paths = prepare_output(args.out, files, phantom=not args.subject)
    if args.subject:
        case = load_subject(args.subject, sources)
    else:
        say("building the default case from the ICBM152 template (nilearn) ...")
        case = load_phantom_case(args)
    if case.phantom is not None:
        save_phantom(case.phantom, paths[PHANTOM_DIR])
        with open(os.path.join(paths[PHANTOM_DIR], PHANTOM_MARKER), "w") as f:
            json.dump(case.phantom.parameters, f, indent=2)

    say(f"model {bundle.path} ({' + '.join(bundle.sources)} -> {bundle.target}, {bundle.model.architecture})")
    inputs = {name: case.volumes[name] for name in sources}
    t0 = time.perf_counter()
    # The subject's own mask when it has one, else the brain-mask policy's default.
    result = synthesize_with_details(inputs, bundle, mask=case.mask if case.mask is not None else "auto",
                                     device=args.device, precision=args.precision, batch_size=args.batch_size,
                                     progress=_Progress(args.quiet))
    synthetic = result.volume
    seconds = time.perf_counter() - t0
    say(result.mask_decision.description)
    if case.files:  # a subject folder: its files are named in the provenance record
        from .provenance import attach_source_files

        synthetic.provenance = attach_source_files(
            synthetic.provenance, {**{m: case.files[m] for m in sources},
                                   **({"mask": case.files["mask"]} if case.mask is not None else {})})
    save_volume(synthetic, paths["synthetic_flair.nii.gz"])  # and its sidecar synthetic_flair.json

    # Everything below is on the synthetic's grid (the T1's).
    grid = synthetic
    aligned = {name: (v if v.same_grid(grid) else resample_to_reference(v, grid, name)) for name, v in inputs.items()}
    if case.mask is not None:
        m = case.mask if case.mask.same_grid(grid) else resample_to_reference(case.mask, grid, "mask",
                                                                              interpolation="nearest")
        mask = m.array > 0
    else:  # the brain mask synthesis used (extracted, or the inputs' non-zero voxels)
        mask = result.brain_mask.array > 0
    config = bundle.preprocessing
    lesion = None
    if case.phantom is not None and case.phantom.lesion.same_grid(grid):
        lesion = case.phantom.lesion.array
    real = metrics = None
    if case.reference is not None:
        ref = case.reference if case.reference.same_grid(grid) else resample_to_reference(case.reference, grid, "flair")
        real, fake = normalized_pair(synthetic, ref, mask, config)
        metrics = evaluate(real, fake, mask, grid.affine, lesion)
    else:
        fake = np.clip(synthetic.array / (config.output_max / 2.0) - 1.0, -1.0, 1.0)
        fake[~mask] = -1.0
    save_figure(paths["figure.png"], aligned, fake, real, mask, grid.affine, config, lesion,
                title=f"{case.label}: {' + '.join(sources)} -> FLAIR ({Path(bundle.path).name})")

    report = {
        "case": case.label,
        "inputs": case.files or {name: f"{PHANTOM_DIR}/{name}.nii.gz" for name in (*SOURCE_NAMES, "flair")},
        "model": str(bundle.path),
        "model_sha256": bundle.sha256,
        "sources": list(sources),
        "device": str(resolve_device(args.device)),
        "precision": resolve_precision(resolve_device(args.device), args.precision),
        "synthesis_seconds": round(seconds, 2),
        "metrics_units": "output units [0, output_max]: reference FLAIR normalised as in training "
                         "(real_target_in_output_units) in the brain mask; per axial slice with brain, averaged",
        "metrics": metrics,
        "brain_voxels": int(mask.sum()),
        "brain_mask": result.mask_decision.source,
    }
    if case.phantom is not None:
        report["phantom"] = case.phantom.parameters
    with open(paths["metrics.json"], "w") as f:
        json.dump(report, f, indent=2)

    say(f"wrote {paths['synthetic_flair.nii.gz']}, {paths['figure.png']}, {paths['metrics.json']}"
        + (f" and the inputs in {paths[PHANTOM_DIR]}/" if PHANTOM_DIR in paths else ""))
    if metrics:
        say("vs the reference FLAIR (normalised units):  "
            f"PSNR {metrics['psnr']:.2f} dB (brain {metrics['psnr_masked']:.2f}),  "
            f"SSIM {metrics['ssim']:.3f} (brain {metrics['ssim_masked']:.3f}),  "
            f"NRMSE {metrics['nrmse']:.3f} (brain {metrics['nrmse_masked']:.3f})  "
            f"over {metrics['num_slices']} slices"
            + (f"; lesion conspicuity {metrics['lesion_conspicuity']:.2f} (1 = as in the reference)"
               if metrics.get("lesion_conspicuity") is not None else ""))
    else:
        say("no reference FLAIR in the subject folder: metrics skipped")
    say(f"synthesis {seconds:.1f} s, total {time.perf_counter() - start:.1f} s")
    return 0


def main(argv=None) -> int:
    """``python -m MRISynthesisLib.demo ...`` == ``mrisynthesis demo ...`` (the command line
    imports this module, never the other way round)."""
    from .errors import run_command

    parser = add_demo_arguments(argparse.ArgumentParser(prog="python -m MRISynthesisLib.demo",
                                                        description=__doc__.split("\n\n")[0]))
    return run_command(demo_main, parser.parse_args(sys.argv[1:] if argv is None else argv),
                       prog="mrisynthesis")


if __name__ == "__main__":
    sys.exit(main())
