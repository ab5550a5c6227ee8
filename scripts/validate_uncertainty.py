"""Is the test-time-augmentation (TTA) spread a map of where the synthetic image is wrong?

Usage (what docs/uncertainty.md reports):
    OMP_NUM_THREADS=1 nice .venv/bin/python scripts/validate_uncertainty.py DATA \
        [--split docs/split.json --split-name test] [--model t1_t2_to_flair] [--threads 1] [--out FILE.json]

For each subject of the split (those with the model's inputs and a real FLAIR): synthesise
with the shipped model exactly as ``mrisynthesis predict`` does, brain-masked (the
dataset's mask when the subject has one, else the inputs' non-zero voxels, as the
evaluation does), with every candidate augmentation's pass kept; the real FLAIR is
normalised the model's way into the same units (preprocessing.real_target_in_output_units).
Inside the brain (the mask used, and the real FLAIR's non-zero voxels) it measures, for
each TTA candidate set (MRISynthesisLib.uncertainty.CANDIDATE_SETS), for the disagreement
with a second shipped model (``--disagreement-model``, default the pix2pix T1+T2 bundle
when the model is t1_t2_to_flair) and for the trivial maps (uncertainty.trivial_maps:
synthetic intensity, nearness to the brain edge, gradient magnitude, slice position):

- rho: Spearman rank correlation between the map and the absolute error;
- top10: the share of the total absolute error held by the 10 % of brain voxels the map
  ranks most uncertain (a random map: 0.10; ``oracle``: the 10 % largest errors).

It prints one table per measure (subjects x maps), the mean +- std over subjects, and for
each candidate how many subjects it beats the best trivial map on and the paired Wilcoxon
signed-rank p against it; ``--out`` writes everything as JSON.

Where the shipped map (``uncertainty.DEFAULT_SET``) is high, per subject ("where" table):
its rank correlation with the gradient map; the share of its 10 % highest voxels, and of the
10 % largest errors, within 3 mm of the brain's edge; how many of its 10 % highest voxels are
among the 10 % largest errors; its mean, and the error's, in the top and bottom 10 % of the
brain slices over the rest, and in the lesion (the subject's label map, subjects.lesion_label_file)
over normal brain (brain minus the lesion grown by 2 voxels); the mean signed error.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from MRISynthesisLib import uncertainty as unc  # noqa: E402
from MRISynthesisLib.bundle import load_bundle  # noqa: E402
from MRISynthesisLib.inference import synthesize_with_details  # noqa: E402
from MRISynthesisLib.models import resolve_model, shipped_bundles  # noqa: E402
from MRISynthesisLib.preprocessing import AxialReorientation, real_target_in_output_units  # noqa: E402
from MRISynthesisLib.subjects import lesion_label_file, subject_files  # noqa: E402
from MRISynthesisLib.volumes import Volume, align_to_reference, load_volume, resample_to_reference  # noqa: E402

MEASURES = ("rho", "top10")


def shown(path) -> str:
    """A path as the report shows it: relative to the project when inside it, else as given."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def subject_maps(folder: Path, bundle, disagreement, threads, precision, device):
    """(maps {name: array}, error array, region bool array, timings) for one subject."""
    files = subject_files(folder)
    sources = list(bundle.sources)
    volumes = {m: load_volume(files[m], m) for m in sources + ["flair"]}
    volumes = align_to_reference(volumes, sources[0])
    reference = volumes[sources[0]]
    mask = None
    if "mask" in files:
        m = load_volume(files["mask"], "mask")
        if not m.same_grid(reference):
            m = resample_to_reference(m, reference, "mask", interpolation="nearest")
        mask = m.array > 0
    spec = Volume(mask.astype(np.float32), reference.affine) if mask is not None else "none"
    augmentations = unc.augmentation_set("all", len(sources))
    timings = {}
    start = time.perf_counter()
    result = synthesize_with_details({m: volumes[m] for m in sources}, bundle, mask=spec, device=device,
                                     precision=precision, threads=threads, timings=timings,
                                     uncertainty=unc.TTAConfig(augmentations=augmentations, keep_passes=True))
    seconds = time.perf_counter() - start
    synthetic = result.volume.array
    real = real_target_in_output_units(volumes["flair"].array, mask, bundle.preprocessing, "flair")
    region = (result.brain_mask.array > 0) & (mask if mask is not None else volumes["flair"].array != 0)
    error = np.abs(synthetic - real)
    maps = {}
    for name in unc.CANDIDATE_SETS:
        chosen = [a.name for a in unc.augmentation_set(name, len(sources))]
        maps[f"TTA {name} ({len(chosen) + 1})"] = unc.spread(
            np.stack([synthetic] + [result.passes[a].array for a in chosen]))
    if disagreement is not None:
        other = synthesize_with_details({m: volumes[m] for m in sources}, disagreement, mask=spec, device=device,
                                        precision=precision, threads=threads)
        maps[f"disagreement with {Path(disagreement.path).stem}"] = np.abs(other.volume.array - synthetic)
    orientation = AxialReorientation(reference.affine)
    axial_axis = int(np.flatnonzero(orientation.to_ras[:, 0] == 2)[0])
    for name, array in unc.trivial_maps(synthetic, region, reference.spacing, axial_axis).items():
        maps[f"trivial: {name}"] = array
    info = {"slices": int(region.any(axis=tuple(a for a in range(3) if a != axial_axis)).sum()),
            "brain_voxels": int(region.sum()), "seconds": seconds, "network_seconds": timings.get("network"),
            "network_passes": 1 + len(augmentations), "mask": "dataset mask" if mask is not None else "non-zero voxels",
            "mean_abs_error": float(error[region].mean()),
            "mean_signed_error": float((synthetic - real)[region].mean())}
    shipped = next(n for n in maps if n.startswith(f"TTA {unc.DEFAULT_SET} ("))
    lesion = None
    found = lesion_label_file(folder)
    if found is not None:
        label = load_volume(found[0], "lesion")
        if not label.same_grid(reference):
            label = resample_to_reference(label, reference, "lesion", interpolation="nearest")
        lesion = (label.array > 0) & region
    info["where"] = where(maps[shipped], maps, error, region, axial_axis, lesion)
    info["where"]["map"] = shipped
    return maps, error, region, info


def where(spread, maps, error, region, axial_axis, lesion):
    """Where the map is high against where the error is (see the module docstring)."""
    from scipy import ndimage

    n = max(1, int(0.1 * region.sum()))
    flat = np.flatnonzero(region)
    near_edge = (maps["trivial: edge"] >= -3.0) & region

    def top(values):
        chosen = np.zeros(region.shape, bool)
        chosen.flat[flat[np.argsort(-values[region], kind="stable")[:n]]] = True
        return chosen

    top_spread, top_error = top(spread), top(error)
    slices = np.flatnonzero(region.any(axis=tuple(a for a in range(3) if a != axial_axis)))
    k = max(1, int(round(0.1 * len(slices))))
    ends = np.zeros(region.shape, bool)
    index = [slice(None)] * 3
    index[axial_axis] = np.r_[slices[:k], slices[-k:]]
    ends[tuple(index)] = True
    ends &= region
    middle = region & ~ends
    out = {"rho_with_gradient": unc.spearman(spread[region], maps["trivial: gradient"][region]),
           "brain_share_within_3mm_of_edge": float(near_edge.sum() / region.sum()),
           "top10_map_within_3mm_of_edge": float((top_spread & near_edge).sum() / n),
           "top10_error_within_3mm_of_edge": float((top_error & near_edge).sum() / n),
           "top10_map_among_top10_error": float((top_spread & top_error).sum() / n),
           "end_slices_over_rest_map": float(spread[ends].mean() / spread[middle].mean()),
           "end_slices_over_rest_error": float(error[ends].mean() / error[middle].mean())}
    if lesion is not None and lesion.any():
        normal = region & ~ndimage.binary_dilation(lesion, iterations=2)
        out.update(lesion_voxels=int(lesion.sum()),
                   lesion_over_normal_map=float(spread[lesion].mean() / spread[normal].mean()),
                   lesion_over_normal_error=float(error[lesion].mean() / error[normal].mean()))
    return out


def score(maps, error, region):
    e = error[region]
    row = {name: {"rho": unc.spearman(m[region], e), "top10": unc.top_share(m[region], e)} for name, m in maps.items()}
    row["oracle"] = {"rho": 1.0, "top10": unc.oracle_share(e)}
    return row


def summarise(per_subject, names):
    from scipy.stats import wilcoxon

    subjects = list(per_subject)
    summary = {}
    trivial = [n for n in names if n.startswith("trivial:")]
    for name in names + ["oracle"]:
        entry = {}
        for measure in MEASURES:
            values = np.array([per_subject[s][name][measure] for s in subjects], dtype=float)
            entry[measure] = {"mean": float(np.nanmean(values)),
                              "std": float(np.nanstd(values, ddof=1)) if len(values) > 1 else 0.0}
            if not name.startswith("trivial:") and name != "oracle" and trivial:
                # Against the best trivial map (by mean) and against each subject's best trivial map.
                best = max(trivial, key=lambda t: np.nanmean([per_subject[s][t][measure] for s in subjects]))
                other = np.array([per_subject[s][best][measure] for s in subjects], dtype=float)
                best_each = np.array([max(per_subject[s][t][measure] for t in trivial) for s in subjects])
                try:
                    p = float(wilcoxon(values, other).pvalue) if len(values) > 1 else math.nan
                except ValueError:
                    p = math.nan
                entry[measure].update(best_trivial=best, wins_vs_best_trivial=int(np.sum(values > other)),
                                      wins_vs_each_subjects_best_trivial=int(np.sum(values > best_each)),
                                      wilcoxon_p_vs_best_trivial=p, n=len(values))
        summary[name] = entry
    return summary


WHERE_COLUMNS = (("rho_with_gradient", "rho(map, gradient)"), ("top10_map_within_3mm_of_edge", "top map <=3mm edge"),
                 ("top10_error_within_3mm_of_edge", "top error <=3mm edge"),
                 ("top10_map_among_top10_error", "top map in top error"),
                 ("end_slices_over_rest_map", "end slices: map"), ("end_slices_over_rest_error", "end slices: error"),
                 ("lesion_over_normal_map", "lesion: map"), ("lesion_over_normal_error", "lesion: error"))


def print_where(infos, out=sys.stdout):
    subjects = list(infos)
    print(f"\nwhere {infos[subjects[0]]['where']['map']} is high (top = its 10 % highest voxels; ratios: mean over "
          "the rest of the brain)", file=out)
    print(f"{'subject':<20}" + "".join(f"{title:>22}" for _, title in WHERE_COLUMNS) + f"{'mean signed error':>20}",
          file=out)
    for s in subjects:
        w = infos[s]["where"]
        cells = "".join(f"{w[key]:22.3f}" if key in w else f"{'-':>22}" for key, _ in WHERE_COLUMNS)
        print(f"{s[:19]:<20}{cells}{infos[s]['mean_signed_error']:20.1f}", file=out)


def print_tables(per_subject, summary, names, out=sys.stdout):
    subjects = list(per_subject)
    for measure, title in (("rho", "Spearman rho between the map and |error| inside the brain"),
                           ("top10", "share of |error| in the 10% most uncertain brain voxels")):
        print(f"\n{title}", file=out)
        width = max(len(n) for n in names + ["oracle"]) + 2
        print(f"{'map':<{width}}" + "".join(f"{s[:14]:>15}" for s in subjects) + f"{'mean ± std':>18}", file=out)
        for name in names + ["oracle"]:
            cells = "".join(f"{per_subject[s][name][measure]:15.3f}" for s in subjects)
            stats = summary[name][measure]
            print(f"{name:<{width}}{cells}{stats['mean']:>10.3f} ± {stats['std']:.3f}", file=out)
        for name in names:
            stats = summary[name][measure]
            if "best_trivial" in stats:
                print(f"  {name}: beats the best trivial map ({stats['best_trivial']}) on "
                      f"{stats['wins_vs_best_trivial']}/{stats['n']} subjects (each subject's best trivial map: "
                      f"{stats['wins_vs_each_subjects_best_trivial']}/{stats['n']}), Wilcoxon p = "
                      f"{stats['wilcoxon_p_vs_best_trivial']:.4f}", file=out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="the data folder (one sub-folder per subject: t1, t2, flair, [mask])")
    parser.add_argument("--split", default=str(REPO / "docs" / "split.json"))
    parser.add_argument("--split-name", default="test")
    parser.add_argument("--subjects", default=None, help="comma-separated subjects instead of the split's list")
    parser.add_argument("--model", default="t1_t2_to_flair")
    parser.add_argument("--disagreement-model", default="auto",
                        help="a second bundle whose disagreement is also scored ('auto': the shipped pix2pix T1+T2 "
                             "bundle for t1_t2_to_flair; 'none')")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="write the per-subject and summary figures as JSON")
    args = parser.parse_args(argv)

    bundle = load_bundle(resolve_model(args.model, []))
    disagreement = None
    if args.disagreement_model == "auto":
        name = "pix2pix_" + Path(bundle.path).stem
        if name in shipped_bundles():
            disagreement = load_bundle(shipped_bundles()[name])
    elif args.disagreement_model != "none":
        disagreement = load_bundle(resolve_model(args.disagreement_model, []))
    if args.subjects:
        names = [s.strip() for s in args.subjects.split(",") if s.strip()]
    else:
        names = json.loads(Path(args.split).read_text())[args.split_name]
    data = Path(args.data)
    per_subject, infos, skipped = {}, {}, {}
    for i, name in enumerate(names):
        files = subject_files(data / name)
        missing = [m for m in list(bundle.sources) + ["flair"] if m not in files]
        if missing:
            skipped[name] = missing
            print(f"[{i + 1}/{len(names)}] {name}: skipped (no {', '.join(missing)})", flush=True)
            continue
        maps, error, region, info = subject_maps(data / name, bundle, disagreement, args.threads, args.precision,
                                                 args.device)
        per_subject[name] = score(maps, error, region)
        infos[name] = info
        best = max((n for n in maps if n.startswith("trivial:")), key=lambda n: per_subject[name][n]["rho"])
        print(f"[{i + 1}/{len(names)}] {name}: {info['brain_voxels']} brain voxels, {info['slices']} slices, "
              f"{info['seconds']:.0f} s ({info['network_passes']} passes); rho "
              + ", ".join(f"{n}: {per_subject[name][n]['rho']:.3f}" for n in maps if not n.startswith("trivial:"))
              + f"; best trivial {best}: {per_subject[name][best]['rho']:.3f}", flush=True)
        del maps, error, region
    if not per_subject:
        print("no subject had the model's inputs and a FLAIR", file=sys.stderr)
        return 1
    names_maps = [n for n in next(iter(per_subject.values())) if n != "oracle"]
    summary = summarise(per_subject, names_maps)
    print_tables(per_subject, summary, names_maps)
    print_where(infos)
    if args.out:
        import platform

        results = {"command": " ".join(["scripts/validate_uncertainty.py"]
                                       + (argv if argv is not None else sys.argv[1:])),
                   "model": {"path": shown(bundle.path), "sha256": bundle.sha256},
                   "disagreement_model": shown(disagreement.path) if disagreement is not None else None,
                   "split": shown(args.split) if not args.subjects else None, "split_name": args.split_name,
                   "subjects": list(per_subject), "skipped": skipped,
                   "machine": platform.machine(), "threads": args.threads,
                   "per_subject": per_subject, "info": infos, "summary": summary}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
