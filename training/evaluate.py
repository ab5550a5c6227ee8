"""Evaluation the way the paper reports it (Table 2), whole-slice and brain-masked.

For every subject, each method predicts the target volume: a model bundle through
``MRISynthesisLib.inference.synthesize`` (exactly what ``mrisynthesis predict`` runs), or a
trivial baseline. The real target is normalised with the same preprocessing and mapped
to the same output scale [0, output_max], so units match. Every method is compared on
the same axial slices (the middle ``slices_per_subject`` brain slices, RAS order, on the
reference T1 grid); per-slice PSNR/SSIM/NRMSE are averaged per subject, then mean +- std
over subjects, with paired t-tests between methods over subjects.

Baselines (no bundle needed):
- ``t2``: the normalised T2 itself as the prediction;
- ``linear`` (``linear:t1,t2``): y = a0 + sum_i a_i x_i, a least-squares fit over brain
  voxels of the normalised sources to the normalised target, fitted on the split's
  training subjects (or, without a split, on the evaluated subjects: labelled so).
"""

from __future__ import annotations

import datetime
import itertools
import json
import math
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from MRISynthesisLib.bundle import load_bundle
from MRISynthesisLib.errors import InputError
from MRISynthesisLib.inference import resolve_device, synthesize
from MRISynthesisLib.metrics import METRIC_NAMES, aggregate, lesion_metrics, subject_metrics
from MRISynthesisLib.preprocessing import (AxialReorientation, PreprocessingConfig, SliceStack,
                                           real_target_in_output_units, select_middle_slices)
from MRISynthesisLib.volumes import Volume, align_to_reference, load_volume, resample_to_reference

from . import data as data_mod

MASKED = tuple(f"{m}_masked" for m in METRIC_NAMES)
LESION = ("lesion_conspicuity", "psnr_lesion")
# Blur-sensitive figures (MRISynthesisLib.metrics): brain PSNR hardly sees blur.
SHARPNESS = ("psnr_masked_scale_free", "sharpness", "gmsd_masked")
# Sharpness with each volume scaled by its brain median instead of its 99.5th percentile, which
# lesion brightness sets where lesions fill more than 0.5 % of the brain (metrics module doc).
SHARPNESS_MEDIAN = "sharpness_median"
# Power of the synthetic over the real image per band of spatial frequency (MRISynthesisLib.metrics).
SPECTRUM = ("spectrum_low", "spectrum_mid", "spectrum_high", "spectrum_checkerboard")
BLANKED = "blanked_brain"  # tissue rendered black (MRISynthesisLib.metrics.blanked_brain)
LINEAR_MAX_VOXELS = 200_000  # per subject, for the least-squares fit
# The evaluation protocol: the middle 80 brain slices of each subject (the top and bottom
# slices hold a few voxels of brain each, and a per-slice mean would weigh them as much).
EVALUATION_SLICES = 80


class Method:
    def __init__(self, label: str, sources, kind: str, bundle=None, generator=None, coefficients=None):
        self.label, self.sources, self.kind = label, tuple(sources), kind
        self.bundle, self.generator, self.coefficients = bundle, generator, coefficients

    def describe(self) -> dict:
        d = {"label": self.label, "kind": self.kind, "sources": list(self.sources)}
        if self.bundle is not None:
            d.update(path=data_mod.portable_path(self.bundle.path), sha256=self.bundle.sha256, model=self.bundle.model.to_dict(),
                     preprocessing=self.bundle.preprocessing.to_dict())
        if self.coefficients is not None:
            d["coefficients"] = [float(c) for c in self.coefficients]
        return d


def _label_on_grid(path, name: str, reference: Volume) -> np.ndarray:
    vol = load_volume(path, name)
    if not vol.same_grid(reference):
        vol = resample_to_reference(vol, reference, name, interpolation="nearest")
    return vol.array > 0


def _subject_volumes(subject: data_mod.Subject, modalities, reference: str):
    volumes = {m: load_volume(subject.files[m], f"{subject.name}/{m}") for m in modalities}
    volumes = align_to_reference(volumes, reference)
    mask = None
    if subject.mask is not None:
        mask = _label_on_grid(subject.mask, f"{subject.name}/mask", volumes[reference])
    return volumes, mask


def fit_linear(subjects, sources, target, preprocessing, slices_per_subject) -> np.ndarray:
    """Least-squares [a0, a_1..a_M] of target ~ a0 + sum a_i * source_i over brain voxels."""
    rows, ys = [], []
    rng = np.random.default_rng(0)
    for subject in subjects:
        volumes, mask = _subject_volumes(subject, list(sources) + [target], sources[0])
        stack = SliceStack([volumes[m].array for m in list(sources) + [target]], volumes[sources[0]].affine,
                           preprocessing, mask=mask)
        keep = select_middle_slices(stack.brain_slices, slices_per_subject)
        region = np.zeros_like(stack.mask)
        region[..., keep] = stack.mask[..., keep]
        values = stack.channels[:, region]  # (C, N)
        if values.shape[1] > LINEAR_MAX_VOXELS:
            values = values[:, rng.choice(values.shape[1], LINEAR_MAX_VOXELS, replace=False)]
        rows.append(values[:-1].T)
        ys.append(values[-1])
    X = np.concatenate(rows)
    X = np.concatenate([np.ones((len(X), 1), np.float32), X], axis=1).astype(np.float64)
    coef, *_ = np.linalg.lstsq(X, np.concatenate(ys).astype(np.float64), rcond=None)
    return coef


def predict(method: Method, volumes: Dict[str, Volume], mask, reference: str, preprocessing, device, precision,
            batch_size) -> np.ndarray:
    """The method's prediction on the reference grid (original voxel order), output units."""
    if method.kind == "model":
        # The dataset's mask, else the inputs' non-zero voxels, as in training (never extraction).
        mask_vol = "none" if mask is None else Volume(mask.astype(np.float32), volumes[reference].affine)
        ref = reference if reference in method.sources else None
        out = synthesize({s: volumes[s] for s in method.sources}, method.bundle, mask=mask_vol, reference=ref,
                         device=device, precision=precision, batch_size=batch_size, generator=method.generator)
        return out.array
    stack = SliceStack([volumes[s].array for s in method.sources], volumes[reference].affine, preprocessing,
                       mask=mask, names=list(method.sources))
    if method.kind == "t2":
        pred = stack.channels[0]
    else:  # linear
        c = method.coefficients
        pred = c[0] + np.tensordot(c[1:], stack.channels, axes=1)
    return stack.finish(pred.astype(np.float32))


def parse_baseline(spec: str, model_sources) -> tuple:
    name, _, rest = spec.partition(":")
    if name == "t2":
        if rest:
            raise InputError("--baseline t2 takes no sources")
        return "t2", ("t2",)
    if name == "linear":
        if rest:
            sources = tuple(s.strip() for s in rest.split(",") if s.strip())
        else:
            sources = tuple(model_sources) if model_sources else ("t1", "t2")
        for s in sources:
            if s not in data_mod.MODALITIES:
                raise InputError(f"--baseline {spec}: unknown modality {s!r}")
        return "linear", sources
    raise InputError(f"unknown baseline {spec!r}; expected t2, linear or linear:SOURCES")


def ttests(per_subject: Dict[str, Dict[str, dict]], labels: List[str], keys) -> list:
    from scipy.stats import ttest_rel

    out = []
    for a, b in itertools.combinations(labels, 2):
        entry = {"a": a, "b": b}
        for key in keys:
            pairs = [(per_subject[s][a][key], per_subject[s][b][key]) for s in per_subject
                     if key in per_subject[s].get(a, {}) and key in per_subject[s].get(b, {})]
            pairs = [(x, y) for x, y in pairs if math.isfinite(x) and math.isfinite(y)]
            if len(pairs) < 2:
                entry[key] = {"n": len(pairs), "t": None, "p": None, "mean_difference": None}
                continue
            xa, xb = np.array(pairs).T
            res = ttest_rel(xa, xb)
            t, p = float(res.statistic), float(res.pvalue)
            entry[key] = {"n": len(pairs), "t": t if math.isfinite(t) else None,
                          "p": p if math.isfinite(p) else None, "mean_difference": float(np.mean(xa - xb))}
        out.append(entry)
    return out


def evaluate(models, baselines, data_dir, out_dir, subjects=None, split=None, split_name="test",
             slices_per_subject: Optional[int] = EVALUATION_SLICES, target="flair", device="auto", precision="fp32",
             batch_size=8, log=print) -> dict:
    """Evaluate ``models`` (list of (label or None, bundle path)) and ``baselines`` (specs)
    on the subjects of ``data_dir``; writes metrics.json, report.md and figure.png to
    ``out_dir`` and returns the metrics dictionary."""
    if not models and not baselines:
        raise InputError("nothing to evaluate: give at least one --model or --baseline")
    if slices_per_subject is not None and slices_per_subject <= 0:
        slices_per_subject = None
    torch_device = resolve_device(device)
    out_dir = Path(out_dir)
    all_subjects = data_mod.discover(data_dir)
    by_name = {s.name: s for s in all_subjects}

    methods: List[Method] = []
    preprocessing = None
    for label, path in models:
        bundle = load_bundle(path)
        if bundle.target != target:
            raise InputError(f"{path}: the model predicts {bundle.target}, not {target}")
        # Baselines and the figure use the first model's preprocessing; a model with other
        # settings is scored against the real target normalised its own way (its own units).
        if preprocessing is None:
            preprocessing = bundle.preprocessing
        label = label or Path(path).name.removesuffix(".safetensors")
        methods.append(Method(label, bundle.sources, "model", bundle, bundle.build_generator(torch_device)))
    preprocessing = preprocessing or PreprocessingConfig()

    split_data = None
    if split:
        split_data = json.loads(Path(split).read_text())
        if split_name not in split_data:
            raise InputError(f"{split}: no {split_name!r} list")
    if subjects:
        names = [s.strip() for s in subjects.split(",") if s.strip()] if isinstance(subjects, str) else list(subjects)
        origin = "given subjects"
    elif split_data is not None:
        names = list(split_data[split_name])
        origin = f"{split_name} subjects of {data_mod.portable_path(split)}"
    else:
        names = sorted(by_name)
        origin = f"all subjects of {data_dir}"
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise InputError(f"subjects not found in {data_dir}: {', '.join(unknown)}")

    model_sources = methods[0].sources if methods else None
    for spec in baselines:
        kind, sources = parse_baseline(spec, model_sources)
        methods.append(Method(f"{kind} baseline" if kind == "t2" else f"linear({'+'.join(sources)})", sources, kind))
    labels = [m.label for m in methods]
    if len(set(labels)) != len(labels):
        raise InputError(f"two methods share a label ({labels}); name models with --model NAME=PATH")

    needed = sorted({s for m in methods for s in m.sources} | {target}, key=data_mod.MODALITIES.index)
    sources_shown = [m for m in needed if m != target]
    reference = "t1" if "t1" in needed else sources_shown[0]
    evaluated, skipped = [], {}
    for n in names:
        missing = by_name[n].missing(needed)
        if missing:
            skipped[n] = missing
            log(f"skipping {n}: lacks {', '.join(missing)} (needed by {', '.join(labels)})")
        else:
            evaluated.append(n)
    if not evaluated:
        raise InputError(f"no subject among {names} has all of {', '.join(needed)}")

    # Linear baselines: fit on the split's training subjects, else on the evaluated ones.
    for m in methods:
        if m.kind != "linear":
            continue
        fit_names = None
        if split_data is not None:
            fit_names = [n for n in split_data.get("train", []) if n in by_name and not by_name[n].missing(list(m.sources) + [target])]
        if fit_names:
            m.fit_on = "training subjects of the split"
        else:
            fit_names = evaluated
            m.fit_on = "the evaluated subjects (no split given: optimistic)"
            m.label += " [fit on evaluated]"
        log(f"fitting {m.label} on {len(fit_names)} subjects")
        m.coefficients = fit_linear([by_name[n] for n in fit_names], list(m.sources), target, preprocessing,
                                    slices_per_subject)
    labels = [m.label for m in methods]

    per_subject: Dict[str, Dict[str, dict]] = {}
    lesion_kinds: Dict[str, str] = {}
    figure_rows = []
    for si, name in enumerate(evaluated):
        log(f"[{si + 1}/{len(evaluated)}] {name}")
        volumes, mask = _subject_volumes(by_name[name], needed, reference)
        affine = volumes[reference].affine
        orient = AxialReorientation(affine)
        # The library's one definition of the real target in output units, in RAS order,
        # for each preprocessing in use.
        reals = {}

        def real_for(config):
            key = json.dumps(config.to_dict(), sort_keys=True)
            if key not in reals:
                reals[key] = orient.forward(real_target_in_output_units(volumes[target].array, mask, config, target))
            return reals[key]

        real = real_for(preprocessing)
        if mask is not None:
            region = orient.forward(mask)
        else:
            region = np.zeros(real.shape, dtype=bool)
            for m in needed:
                region |= orient.forward(volumes[m].array) != 0
        brain = np.flatnonzero(region.any(axis=(0, 1)))
        slices = select_middle_slices(brain, slices_per_subject)
        lesion = None
        subject = by_name[name]
        if subject.lesion is not None:
            lesion = orient.forward(_label_on_grid(subject.lesion, f"{name}/lesion", volumes[reference])) & region
            lesion_kinds[name] = subject.lesion_kind
        per_subject[name] = {}
        predictions = {}
        for m in methods:
            pred = orient.forward(predict(m, volumes, mask, reference, preprocessing, device, precision, batch_size))
            predictions[m.label] = pred
            own = real_for(m.bundle.preprocessing) if m.bundle is not None else real
            # Slices first: (Z, X, Y).
            per_subject[name][m.label] = subject_metrics(own[..., slices].transpose(2, 0, 1),
                                                         pred[..., slices].transpose(2, 0, 1),
                                                         region[..., slices].transpose(2, 0, 1))
            if lesion is not None:  # every lesion voxel of the volume, not only the middle slices
                per_subject[name][m.label].update(lesion_metrics(own, pred, lesion, region))
        if len(figure_rows) < 3:
            # Through the lesion where there is one (what FLAIR is read for), else the middle slice.
            k = int(np.argmax(lesion.sum(axis=(0, 1)))) if lesion is not None and lesion.any() \
                else int(slices[len(slices) // 2])
            shown = SliceStack([volumes[s].array for s in sources_shown], affine, preprocessing, mask=mask)
            figure_rows.append({"subject": name, "slice": k,
                                "sources": {s: shown.channels[i][..., k] for i, s in enumerate(sources_shown)},
                                "real": real[..., k], "predictions": {l: p[..., k] for l, p in predictions.items()}})
        summary = ", ".join(f"{l}: {per_subject[name][l].get('psnr_masked', math.nan):.2f} dB brain" for l in labels)
        log(f"    {summary}")

    keys = [k for k in (*MASKED, *SHARPNESS, SHARPNESS_MEDIAN, *LESION, *METRIC_NAMES)]
    results = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "data": data_mod.portable_path(os.pathsep.join(str(p) for p in data_mod.data_folders(data_dir))),
        "subjects_from": origin,
        "subjects": evaluated,
        "skipped": skipped,
        "slices_per_subject": slices_per_subject,
        "target": target,
        "reference_grid": reference,
        "preprocessing": preprocessing.to_dict(),
        "methods": [dict(m.describe(), **({"fit_on": m.fit_on} if hasattr(m, "fit_on") else {})) for m in methods],
        "summary": {l: aggregate([per_subject[s][l] for s in evaluated]) for l in labels},
        "per_subject": per_subject,
        "ttests": ttests(per_subject, labels, keys),
        "lesion_labels": lesion_kinds,
        "notes": (f"metrics on {slices_phrase(slices_per_subject)} of each subject, in output units "
                  "[0, output_max] after the models' normalisation; brain = the dataset's brain mask, "
                  "else the non-zero voxels of the inputs; "
                  "PSNR MAX = max of the real slice/region; SSIM 7x7 uniform window, data range "
                  "of the real slice; NRMSE = sqrt(sum (Y-Y')^2 / sum Y^2); per-slice values averaged per "
                  "subject, then mean +- std (ddof 1) over subjects; paired t-tests over subjects (n stated); a model "
                  "whose preprocessing differs from the first model's is scored against the real target normalised "
                  "its own way. Sharpness = mean in-plane gradient magnitude of the synthetic volume over the "
                  "real one inside the brain eroded 3 voxels in-plane, each volume scaled to its own 0.5-99.5th "
                  "brain percentiles (1 = as sharp); median-scaled sharpness: the same with each volume scaled "
                  "to its own 0.5th brain percentile and brain median (lesion brightness does not set the scale); "
                  "spectrum = power of the synthetic over the real image per band of in-plane frequency, summed "
                  "over Hann-windowed 64x64 crops around each slice's brain centroid that are at least 98 % brain; "
                  "GMSD per slice as piq's (2x2 pooled, Prewitt, c = 170/255^2, scaled by the real subject "
                  "maximum), brain = deviation over pooled brain pixels; scale-free brain "
                  "PSNR = brain PSNR after mapping the synthetic volume onto the real one by the least-squares line "
                  "over the subject's brain voxels. "
                  "Lesion figures over all lesion voxels of the volume (label > 0: BraTS whole tumour, MS "
                  "lesions): conspicuity = lesion contrast of the synthetic / of the real image, contrast = "
                  "(mean lesion - mean normal brain) / mean normal brain, normal brain = brain minus the lesion "
                  "dilated 2 voxels in-plane; lesion PSNR over the lesion voxels. Whole-slice figures are kept "
                  "for comparison with the paper; they mostly measure the background"),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(out_dir / "metrics.json", results)
    (out_dir / "report.md").write_text(render_report(results, labels))
    plot_figure(figure_rows, sources_shown, target, labels, preprocessing.output_max, out_dir / "figure.png")
    log(f"report: {out_dir / 'report.md'}")
    return results


def _write_json(path: Path, obj) -> None:
    def default(o):
        if isinstance(o, (np.floating, np.integer)):
            return o.item()
        raise TypeError(type(o))

    text = json.dumps(obj, indent=1, default=default, allow_nan=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def slices_phrase(slices_per_subject: Optional[int]) -> str:
    """What a report, card or table was measured on: 0/None = every brain slice."""
    return f"the middle {slices_per_subject} brain slices" if slices_per_subject else "every brain slice"


def format_stat(stats: dict, key: str, digits: Optional[int] = None) -> str:
    """"mean ± std" of ``stats[key]`` (a summary entry), "-" where it is absent; dB figures
    with 2 decimals, the others with 3 unless ``digits`` says."""
    if not stats or not stats.get(key):
        return "-"
    mean, std = stats[key]["mean"], stats[key]["std"]
    if digits is None:
        digits = 2 if key.startswith("psnr") else 3
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def worst_blanked(results: dict, label: str):
    """(subject, blanked brain %) of the subject where ``label`` blanks most tissue, or None
    when the evaluation predates the measure."""
    values = [(s, v[label][BLANKED]) for s, v in results.get("per_subject", {}).items()
              if label in v and math.isfinite(v[label].get(BLANKED, math.nan))]
    return max(values, key=lambda sv: sv[1]) if values else None


def check_blanked_brain(results: dict, label: str, limit: float) -> None:
    """InputError unless ``label`` blanks at most ``limit`` % of every subject's brain."""
    worst = worst_blanked(results, label)
    if worst is None:
        raise InputError(f"the evaluation has no blanked-brain figure for {label!r}: run `python -m training "
                         "evaluate` again with this version")
    if worst[1] > limit:
        raise InputError(f"{label} renders {worst[1]:.2f} % of {worst[0]}'s brain black where the real image shows "
                         f"tissue (limit {limit:g} %): not exported")


def format_blanked(results: dict, label: str) -> str:
    worst = worst_blanked(results, label)
    if worst is None:
        return "-"
    return f"{results['summary'][label][BLANKED]['mean']:.2f} ({worst[1]:.2f}, {worst[0]})"


def render_report(results: dict, labels) -> str:
    lines = [f"# Evaluation: {', '.join(labels)}", "",
             f"- data: `{results['data']}` ({results['subjects_from']})",
             f"- subjects ({len(results['subjects'])}): {', '.join(results['subjects'])}",
             "- skipped: " + (", ".join(f"{k} (lacks {', '.join(v)})" for k, v in results["skipped"].items()) or "none"),
             f"- slices: {slices_phrase(results['slices_per_subject'])} of each subject, "
             f"axial, on the {results['reference_grid']} grid",
             f"- date: {results['date']}", ""]
    for m in results["methods"]:
        if m["kind"] == "linear":
            coef = ", ".join(f"{c:.3f}" for c in m["coefficients"])
            lines.append(f"- {m['label']}: y = a0 + sum a_i x_i with [{coef}], fit on {m.get('fit_on')}")
        elif m["kind"] == "t2":
            lines.append(f"- {m['label']}: the normalised T2 used as the prediction")
        else:
            mm = m["model"]
            lines.append(f"- {m['label']}: {mm['architecture']}, width {mm['base_width']}, "
                         f"{' + '.join(m['sources'])} -> {results['target']}, `{m['path']}`")
    for title, keys in (("Brain (masked): the lead figure", MASKED), ("Whole slice (mostly background; for the paper)", METRIC_NAMES)):
        lines += ["", f"## {title} (mean ± std over subjects)", "",
                  "| Method | PSNR (dB) | SSIM | NRMSE |", "|---|---|---|---|"]
        for l in labels:
            stats = results["summary"][l]
            lines.append(f"| {l} | " + " | ".join(format_stat(stats, k) for k in keys) + " |")
    lines += ["", "## Sharpness and edges (blur-sensitive; mean ± std over subjects)", "",
              "| Method | scale-free brain PSNR (dB) | sharpness (1 = as real) | brain GMSD (lower = better) "
              "| blanked brain (%, worst subject) | sharpness, median-scaled |",
              "|---|---|---|---|---|---|"]
    for l in labels:
        stats = results["summary"][l]
        lines.append(f"| {l} | " + " | ".join(format_stat(stats, k) for k in SHARPNESS)
                     + f" | {format_blanked(results, l)} | {format_stat(stats, SHARPNESS_MEDIAN)} |")
    if any(SPECTRUM[0] in results["summary"][l] for l in labels):
        lines += ["", f"## Spectrum: power of the synthetic over the real {results['target']} per band of spatial "
                  "frequency (1 = as much; 64-pixel crops inside the brain; mean ± std over subjects)", "",
                  "| Method | below 0.1 cycles/pixel | 0.1-0.3 | 0.3-0.5 | checkerboard (both >= 0.45) |",
                  "|---|---|---|---|---|"]
        for l in labels:
            stats = results["summary"][l]
            lines.append(f"| {l} | " + " | ".join(format_stat(stats, k, 2) for k in SPECTRUM) + " |")
    lesion_subjects = results.get("lesion_labels", {})
    if lesion_subjects:
        lines += ["", f"## Lesions ({len(lesion_subjects)} subjects with labels: "
                  + ", ".join(f"{s} ({k})" for s, k in lesion_subjects.items()) + ")", "",
                  "| Method | conspicuity (1 = as in the real FLAIR) | lesion PSNR (dB) | n |", "|---|---|---|---|"]
        for l in labels:
            stats = results["summary"][l]
            n = stats.get("lesion_conspicuity", {}).get("n", 0)
            lines.append(f"| {l} | {format_stat(stats, 'lesion_conspicuity')} | {format_stat(stats, 'psnr_lesion')} | {n} |")
    if results["ttests"]:
        shown = (*MASKED, *SHARPNESS, *LESION, "psnr")
        lines += ["", "## Paired t-tests over subjects (p-value (mean difference A - B), n subjects)", "",
                  "| A vs B | PSNR brain | SSIM brain | NRMSE brain | scale-free brain PSNR | sharpness | brain GMSD "
                  "| conspicuity | lesion PSNR | PSNR whole |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for t in results["ttests"]:
            cells = []
            for k in shown:
                e = t.get(k, {})
                cells.append("-" if e.get("p") is None else f"{e['p']:.3g} ({e['mean_difference']:+.3g}), n={e['n']}")
            lines.append(f"| {t['a']} vs {t['b']} | " + " | ".join(cells) + " |")

    def cell(v, key, digits):
        x = v.get(key)
        return "-" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"

    per_subject_tables = (
        ("brain PSNR dB / brain SSIM / lesion conspicuity / lesion PSNR dB",
         (("psnr_masked", 2), ("ssim_masked", 3), ("lesion_conspicuity", 2), ("psnr_lesion", 2))),
        ("scale-free brain PSNR dB / sharpness / brain GMSD / blanked brain % / median-scaled sharpness",
         (("psnr_masked_scale_free", 2), ("sharpness", 2), ("gmsd_masked", 3), (BLANKED, 2),
          (SHARPNESS_MEDIAN, 2))),
        ("spectral power ratio below 0.1 / 0.1-0.3 / 0.3-0.5 cycles per pixel / checkerboard",
         tuple((k, 2) for k in SPECTRUM)),
        ("whole slice: PSNR dB / SSIM / NRMSE", (("psnr", 2), ("ssim", 3), ("nrmse", 3))),
    )
    for title, columns in per_subject_tables:
        lines += ["", f"## Per subject, {title}", "",
                  "| Subject | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        for s in results["subjects"]:
            cells = [" / ".join(cell(results["per_subject"][s][l], key, digits) for key, digits in columns)
                     for l in labels]
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines += ["", f"Notes: {results['notes']}.", "", "![figure](figure.png)", ""]
    return "\n".join(lines)


def plot_figure(rows, sources, target, labels, output_max, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = len(sources) + 1 + 2 * len(labels)
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.2 * cols, 2.3 * len(rows) + 0.3), squeeze=False)
    for r, row in enumerate(rows):
        panels = [(s, row["sources"][s], dict(cmap="gray", vmin=-1, vmax=1)) for s in sources]
        panels.append((f"real {target}", row["real"], dict(cmap="gray", vmin=0, vmax=output_max)))
        panels += [(l, row["predictions"][l], dict(cmap="gray", vmin=0, vmax=output_max)) for l in labels]
        panels += [(f"|error| {l}", np.abs(row["predictions"][l] - row["real"]),
                    dict(cmap="magma", vmin=0, vmax=output_max / 2)) for l in labels]
        for c, (title, image, kw) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(np.flipud(np.asarray(image).T), **kw)  # RAS (X, Y): anterior up
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=8)
            if c == 0:
                ax.set_ylabel(f"{row['subject']}\nz={row['slice']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def evaluate_cli(args) -> int:
    models = []
    for spec in args.model:
        label, sep, path = spec.partition("=")
        if not sep or os.path.exists(spec):
            label, path = None, spec
        models.append((label, path))
    evaluate(models, args.baseline, args.data, args.out, subjects=args.subjects, split=args.split,
             split_name=args.split_name, slices_per_subject=args.slices_per_subject, target=args.target,
             device=args.device, precision=args.precision, batch_size=args.batch_size,
             log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(Path(args.out) / "report.md")
    return 0
