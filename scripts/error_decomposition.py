"""Where a model's brain error lies: in the lesions, and at the real FLAIR's edges.

    python scripts/error_decomposition.py ../shared/data --model shipped=Resources/Models/t1_t2_to_flair.safetensors \
        [--model NAME=BUNDLE ...] [--split docs/split.json] [--split-name val]

For each subject of the split part that has T1, T2, FLAIR and a lesion label (`seg`), and
each model: the synthetic FLAIR (brain = the non-zero voxels of the skull-stripped T1) is
mapped onto the real FLAIR by its least-squares line inside the brain (the scale-free
mapping of the evaluation, fitted here over the whole volume, not slice by slice). The
squared error is then split among:
- the lesion voxels;
- the edges, i.e. the brain voxels in the top fifth of the real FLAIR's in-plane gradient
  magnitude.
Printed per subject:
- for scale, the scale-free brain PSNR of the real FLAIR itself shifted by one voxel
  in-plane, and blurred in-plane by a Gaussian of sigma 1 and 2 voxels;
- the volume's scale-free brain PSNR;
- each part's share of the voxels and of the error;
- the dB the brain PSNR would gain were the lesion error zero;
- what an oracle intensity mapping, fitted with the real FLAIR in hand, would reach instead of
  the one line: the best function of the synthetic intensity (the real FLAIR's mean in each
  of 64 quantile bins of the synthetic), and one least-squares line per axial slice. What
  these cannot remove is spatial error.
A measurement for docs/learning_curves.md, not a test.
"""

import argparse
import json
import os
import sys

import nibabel as nib
import numpy as np
from scipy import ndimage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from MRISynthesisLib.inference import synthesize_with_details  # noqa: E402
from MRISynthesisLib.metrics import scale_free_fit  # noqa: E402

EDGE_QUANTILE = 0.8
ORACLE_BINS = 64


def scale_free_error(real: np.ndarray, fake: np.ndarray, brain: np.ndarray) -> tuple:
    """(squared error of the scale-free mapped synthetic inside the brain, 0 elsewhere;
    the PSNR in dB over the brain, peak = the real FLAIR's 0.5-99.5 percentile range)."""
    a, b = scale_free_fit(real, fake, brain)
    err = np.zeros_like(real)
    err[brain] = (a * fake[brain] + b - real[brain]) ** 2
    data_range = np.percentile(real[brain], 99.5) - np.percentile(real[brain], 0.5)
    return err, 10 * np.log10(data_range ** 2 / err[brain].mean())


def oracle_intensity_psnr(real: np.ndarray, fake: np.ndarray, brain: np.ndarray) -> tuple:
    """Brain PSNR (peak as in ``scale_free_error``) after the best intensity function of the
    synthetic (binned conditional mean of the real) and after one line per axial slice."""
    r, x = real[brain], fake[brain]
    peak = np.percentile(r, 99.5) - np.percentile(r, 0.5)
    edges = np.unique(np.quantile(x, np.linspace(0, 1, ORACLE_BINS + 1)))
    bins = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, len(edges) - 2)
    means = np.bincount(bins, weights=r) / np.maximum(np.bincount(bins), 1)
    binned = np.mean((means[bins] - r) ** 2)
    squared = 0.0
    for z in range(real.shape[2]):
        inside = brain[..., z]
        if inside.any():
            a, b = scale_free_fit(real[..., z], fake[..., z], inside)
            squared += np.sum((a * fake[..., z][inside] + b - real[..., z][inside]) ** 2)
    return 10 * np.log10(peak ** 2 / binned), 10 * np.log10(peak ** 2 / (squared / brain.sum()))


def decompose(real: np.ndarray, fake: np.ndarray, brain: np.ndarray, lesion: np.ndarray) -> dict:
    err, psnr = scale_free_error(real, fake, brain)
    gradient = np.hypot(ndimage.sobel(real, 0), ndimage.sobel(real, 1))
    edge = brain & (gradient >= np.quantile(gradient[brain], EDGE_QUANTILE))
    lesion = brain & lesion
    total = err[brain].sum()
    oracle = oracle_intensity_psnr(real, fake, brain)
    return {"psnr_scale_free": psnr,
            "lesion_voxels": lesion.sum() / brain.sum(), "lesion_error": err[lesion].sum() / total,
            "gain_without_lesion_error_db": 10 * np.log10(total / err[brain & ~lesion].sum()),
            "edge_voxels": edge.sum() / brain.sum(), "edge_error": err[edge].sum() / total,
            "oracle_intensity_function": oracle[0], "oracle_line_per_slice": oracle[1]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir")
    parser.add_argument("--model", action="append", required=True, help="NAME=BUNDLE (repeatable)")
    parser.add_argument("--split", default=os.path.join(REPO, "docs", "split.json"))
    parser.add_argument("--split-name", default="val")
    args = parser.parse_args(argv)
    models = dict(spec.split("=", 1) for spec in args.model)
    subjects = json.load(open(args.split))[args.split_name]
    for subject in subjects:
        folder = os.path.join(args.data_dir, subject)
        files = {m: os.path.join(folder, f"{m}.nii.gz") for m in ("t1", "t2", "flair", "seg")}
        if not all(os.path.isfile(p) for p in files.values()):
            print(f"{subject}: skipped (needs t1, t2, flair and seg)")
            continue
        real = nib.load(files["flair"]).get_fdata().astype(np.float64)
        lesion = nib.load(files["seg"]).get_fdata() > 0
        skull_stripped = nib.load(files["t1"]).get_fdata() > 0
        shifted, blur1, blur2 = (scale_free_error(real, fake, skull_stripped)[1]
                                 for fake in (np.roll(real, 1, axis=0), ndimage.gaussian_filter(real, (1, 1, 0)),
                                              ndimage.gaussian_filter(real, (2, 2, 0))))
        print(f"{subject:20s} for scale, the real FLAIR: shifted by one voxel {shifted:5.2f} dB, "
              f"blurred sigma 1 {blur1:5.2f} dB, sigma 2 {blur2:5.2f} dB", flush=True)
        for name, bundle in models.items():
            result = synthesize_with_details({"t1": files["t1"], "t2": files["t2"]}, bundle, mask="none")
            d = decompose(real, np.asarray(result.volume.array, dtype=np.float64),
                          np.asarray(result.brain_mask.array) > 0, lesion)
            print(f"{subject:20s} {name:16s} scale-free brain PSNR {d['psnr_scale_free']:5.2f} dB | lesions: "
                  f"{d['lesion_voxels']:5.1%} of voxels, {d['lesion_error']:5.1%} of the error, "
                  f"+{d['gain_without_lesion_error_db']:.2f} dB without it | edges: {d['edge_voxels']:4.0%} of voxels, "
                  f"{d['edge_error']:5.1%} of the error | oracle intensity mapping: best function "
                  f"{d['oracle_intensity_function']:5.2f} dB, a line per slice {d['oracle_line_per_slice']:5.2f} dB",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
