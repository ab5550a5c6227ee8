"""Measure what the brain-mask policy does to real clinical heads (docs/clinical_input.md).

    .venv/bin/python scripts/measure_brain_mask.py --data ../shared/data [--figure docs/raw_head.png]

For every subject of the data folder that is not skull-stripped (by MRISynthesisLib.brainmask's
rule; in ../shared/data the ms-long-* sessions, which have a mask.nii.gz) it synthesises FLAIR
with the shipped T1+T2 model three ways:

- "none": the default before automatic extraction (the inputs' non-zero voxels are the brain);
- "auto": today's default (deepbet extracts the brain from the T1);
- "dataset mask": the subject's own mask.nii.gz given as the mask,

and scores each against the real FLAIR inside the dataset mask (the real FLAIR normalised as
in training, ``real_target_in_output_units``; PSNR/SSIM per axial slice, averaged over the
middle 80 slices with brain, as training/evaluate.py reports the shipped models; the
ms-long heads have 50-66 slices, so all of theirs). It also reports the Dice of
the extracted mask with the dataset mask and the extraction time. On skull-stripped cases
(``--stripped``: by default the held-out test cases brats-met-00110 and ms-mni-07 and two
training cases) it compares "auto" with "none", scored inside
the non-zero voxels. Prints markdown tables; ``--figure`` writes the raw-head figure.
"""

from __future__ import annotations

import argparse
import os
import sys
import numpy as np
import torch

from MRISynthesisLib.brainmask import skull_stripped
from MRISynthesisLib.demo import normalized_pair
from MRISynthesisLib.metrics import subject_metrics
from MRISynthesisLib.preprocessing import AxialReorientation, select_middle_slices
from MRISynthesisLib.inference import synthesize_with_details
from MRISynthesisLib.models import resolve_model
from MRISynthesisLib.subjects import subject_files
from MRISynthesisLib.volumes import Volume, load_volume

STRIPPED_DEFAULT = ("brats-met-00110", "ms-mni-07", "brats-gli-00001", "brats18-cbica-aqn")
EVALUATED_SLICES = 80  # training/evaluate.py's default: the middle 80 slices with brain


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b)))


def score(synthetic: Volume, flair: Volume, region: np.ndarray, config) -> dict:
    real, fake = normalized_pair(synthetic, flair, region, config)
    orient = AxialReorientation(synthetic.affine)
    real, fake, region = (orient.forward(a) for a in (real, fake, region))
    slices = select_middle_slices(np.flatnonzero(region.any(axis=(0, 1))), EVALUATED_SLICES)
    return subject_metrics(*(a[..., slices].transpose(2, 0, 1) for a in (real, fake, region)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=os.environ.get("MRISYNTHESIS_DATA"), required="MRISYNTHESIS_DATA" not in os.environ)
    parser.add_argument("--stripped", nargs="*", default=list(STRIPPED_DEFAULT), help="skull-stripped subjects to check")
    parser.add_argument("--figure", help="write the raw-head figure (PNG) of --figure-subject")
    parser.add_argument("--figure-subject", default="ms-long-04a", help="default: the held-out raw head")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timing", nargs="*", metavar="SUBJECT",
                        help="only time extraction (and the rule) on these subjects, 3 runs each, forced "
                             "even on skull-stripped ones (docs/performance.md: ms-long-04a brats18-cbica-aqn)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.timing:
        return time_extraction(args.data, args.timing, args.device)

    from MRISynthesisLib.bundle import load_bundle

    bundle = load_bundle(resolve_model(None, ("t1", "t2")))
    config = bundle.preprocessing
    generator = bundle.build_generator(torch.device(args.device))
    run = dict(device=args.device, precision="auto", generator=generator)

    rows = []
    subjects = sorted(os.listdir(args.data))
    for name in subjects:
        folder = os.path.join(args.data, name)
        if not os.path.isdir(folder):
            continue
        files = subject_files(folder)
        if not all(m in files for m in ("t1", "t2", "flair", "mask")):
            continue
        t1 = load_volume(files["t1"], "t1")
        if skull_stripped(t1):
            continue
        inputs = {"t1": t1, "t2": load_volume(files["t2"], "t2")}
        flair = load_volume(files["flair"], "flair")
        dataset_mask = load_volume(files["mask"], "mask")
        region = dataset_mask.array > 0
        results = {}
        for label, spec in (("none", "none"), ("auto", "auto"), ("dataset mask", dataset_mask)):
            out = synthesize_with_details(inputs, bundle, mask=spec, **run)
            results[label] = (out, score(out.volume, flair, region, config))
        decision = results["auto"][0].mask_decision
        extract_s = decision.seconds
        rows.append((name, t1.shape, decision, extract_s, dice(decision.array, region), results))
        print(f"{name}: {decision.description}; Dice {rows[-1][4]:.3f}; "
              + ", ".join(f"{k} {v[1]['psnr_masked']:.2f} dB" for k, v in results.items()), flush=True)
        if args.figure and name == args.figure_subject:
            save_figure(args.figure, name, t1, flair, region, decision.array, results, config)

    print("\n| subject | grid | extraction, s | Dice (deepbet vs dataset mask) | brain PSNR dB / SSIM: none (before) "
          "| auto (after, default) | dataset mask | auto - dataset mask, dB |")
    print("|---|---|---|---|---|---|---|---|")
    for name, shape, decision, extract_s, d, results in rows:
        m = {k: v[1] for k, v in results.items()}
        cells = " | ".join(f"{m[k]['psnr_masked']:.2f} / {m[k]['ssim_masked']:.3f}" for k in ("none", "auto", "dataset mask"))
        print(f"| {name} | {'x'.join(map(str, shape))} | {extract_s:.1f} | {d:.3f} | {cells} | "
              f"{m['auto']['psnr_masked'] - m['dataset mask']['psnr_masked']:+.2f} |")
    if rows:
        mean = {k: np.mean([r[5][k][1]["psnr_masked"] for r in rows]) for k in ("none", "auto", "dataset mask")}
        print(f"| mean | | {np.mean([r[3] for r in rows]):.1f} | {np.mean([r[4] for r in rows]):.3f} | "
              + " | ".join(f"{mean[k]:.2f}" for k in ("none", "auto", "dataset mask"))
              + f" | {mean['auto'] - mean['dataset mask']:+.2f} |")

    print("\n| skull-stripped subject | auto decision | brain PSNR dB none | auto | difference, dB | max abs voxel difference |")
    print("|---|---|---|---|---|---|")
    for name in args.stripped:
        files = subject_files(os.path.join(args.data, name))
        inputs = {"t1": load_volume(files["t1"], "t1"), "t2": load_volume(files["t2"], "t2")}
        flair = load_volume(files["flair"], "flair")
        outs = {label: synthesize_with_details(inputs, bundle, mask=label, **run) for label in ("none", "auto")}
        region = outs["none"].brain_mask.array > 0
        m = {k: score(v.volume, flair, region, config) for k, v in outs.items()}
        diff = float(np.abs(outs["auto"].volume.array - outs["none"].volume.array).max())
        print(f"| {name} | {outs['auto'].mask_decision.source} | {m['none']['psnr_masked']:.2f} | "
              f"{m['auto']['psnr_masked']:.2f} | {m['auto']['psnr_masked'] - m['none']['psnr_masked']:+.3f} | {diff:.3g} |",
              flush=True)
    return 0


def time_extraction(data, subjects, device) -> int:
    import time

    from MRISynthesisLib.brainmask import _deepbet, extract_brain

    start = time.perf_counter()
    _deepbet(str(torch.device(device)))
    print(f"deepbet networks loaded in {time.perf_counter() - start:.2f} s ({torch.get_num_threads()} threads)")
    for name in subjects:
        t1 = load_volume(subject_files(os.path.join(data, name))["t1"], "t1")
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            extract_brain(t1, device)
            runs.append(time.perf_counter() - start)
        start = time.perf_counter()
        skull_stripped(t1)
        rule = time.perf_counter() - start
        print(f"{name} {'x'.join(map(str, t1.shape))}: extraction median {np.median(runs):.1f} s "
              f"(runs {', '.join(f'{r:.1f}' for r in runs)}), rule {1000 * rule:.0f} ms", flush=True)
    return 0


def save_figure(path, name, t1, flair, region, extracted, results, config):
    """Raw head in (T1 with the extracted mask outlined), FLAIR out (before / after / dataset
    mask) and the real FLAIR, on the middle axial slice with brain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from MRISynthesisLib.preprocessing import real_target_in_output_units

    orient = AxialReorientation(t1.affine)
    axial = lambda a: np.rot90(orient.forward(a))  # noqa: E731  (X right, Y up in the picture)
    slices = np.flatnonzero(orient.forward(region).any(axis=(0, 1)))
    k = int(slices[len(slices) // 2])
    t1_ax, mask_ax = axial(t1.array)[..., k], axial(extracted)[..., k]
    real = axial(real_target_in_output_units(flair.array, region, config))[..., k]
    panels = [("T1 in (raw head),\ndeepbet mask outlined", t1_ax, None)]
    for label, title in (("none", "FLAIR out, no mask\n(before)"), ("auto", "FLAIR out, auto\n(default now)"),
                         ("dataset mask", "FLAIR out,\ndataset mask")):
        out, metrics = results[label]
        panels.append((f"{title}: {metrics['psnr_masked']:.1f} dB", axial(out.volume.array)[..., k], (0, config.output_max)))
    panels.append(("real FLAIR\n(normalised in the brain)", real, (0, config.output_max)))
    fig, axes = plt.subplots(1, len(panels), figsize=(2.3 * len(panels), 2.9), dpi=80)
    for ax, (title, image, window) in zip(axes, panels):
        vmin, vmax = window or np.percentile(image, [1, 99.5])
        ax.imshow(image, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest",
                  aspect=orient.ras_spacing[0] / orient.ras_spacing[1])
        if window is None:
            ax.contour(mask_ax, levels=[0.5], colors="yellow", linewidths=0.7)
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.suptitle(f"{name} (T1 + T2 -> FLAIR, shipped model), axial slice {k}; outside the brain the output is 0",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
