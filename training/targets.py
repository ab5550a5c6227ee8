"""The quality targets of the shipped T1+T2 model, checked on an evaluation's metrics.json.

    python -m training targets EVALUATION/metrics.json --model NEW --shipped OLD --baseline PIX2PIX

EVALUATION is a ``python -m training evaluate`` run over the fixed test split with every
brain slice (``--slices-per-subject 0``) that evaluated the three labels. The targets
(issue 20; docs/learning_curves.md):
- sharpness of NEW between 0.85 and 1.15 (1 = as sharp as the real FLAIR);
- mean lesion conspicuity of NEW >= 0.95;
- scale-free brain PSNR of NEW >= that of OLD + 2 dB (paired over subjects);
- scale-free brain PSNR of NEW >= that of PIX2PIX + 1 dB (paired t-test over subjects).
Prints a table with each measured value and by how much it is met or missed, then the
median-scaled sharpness (not a target: the same ratio, each volume scaled by its brain median,
so that lesion brightness does not set the scale; MRISynthesisLib.metrics) where the
evaluation has it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

from MRISynthesisLib.errors import InputError

SHARPNESS_RANGE = (0.85, 1.15)
MIN_CONSPICUITY = 0.95
GAIN_OVER_SHIPPED_DB = 2.0
GAIN_OVER_BASELINE_DB = 1.0
SCALE_FREE = "psnr_masked_scale_free"


def paired(per_subject: dict, a: str, b: str, key: str) -> dict:
    """Mean difference a - b over the subjects both have, with the paired t-test's p and n
    (``evaluate.ttests``, as in the report); NaN where fewer than 2 subjects pair."""
    from .evaluate import ttests

    entry = ttests(per_subject, [a, b], [key])[0][key]
    return {k: math.nan if entry[k] is None else entry[k] for k in ("n", "mean_difference", "p")}


def check(metrics: dict, model: str, shipped: str, baseline: str) -> list:
    """One row per target: name, the measured value (text), met (bool) and the margin."""
    summary, per_subject = metrics["summary"], metrics["per_subject"]
    for label in (model, shipped, baseline):
        if label not in summary:
            raise InputError(f"the evaluation has no method {label!r}; it has {', '.join(summary)}")
    if metrics.get("slices_per_subject") not in (None, 0):
        raise InputError("the targets are defined on every brain slice: evaluate with --slices-per-subject 0")
    rows = []
    sharp = summary[model].get("sharpness", {}).get("mean", math.nan)
    low, high = SHARPNESS_RANGE
    margin = min(sharp - low, high - sharp)
    rows.append(("sharpness in [0.85, 1.15]", f"{sharp:.3f} (n={summary[model]['sharpness']['n']})",
                 margin >= 0, margin))
    consp = summary[model].get("lesion_conspicuity", {})
    value = consp.get("mean", math.nan)
    rows.append((f"mean lesion conspicuity >= {MIN_CONSPICUITY}", f"{value:.3f} (n={consp.get('n', 0)})",
                 value >= MIN_CONSPICUITY, value - MIN_CONSPICUITY))
    for other, gain in ((shipped, GAIN_OVER_SHIPPED_DB), (baseline, GAIN_OVER_BASELINE_DB)):
        d = paired(per_subject, model, other, SCALE_FREE)
        rows.append((f"scale-free brain PSNR >= {other} + {gain:g} dB",
                     f"{d['mean_difference']:+.2f} dB (paired t-test p={d['p']:.3g}, n={d['n']})",
                     d["mean_difference"] >= gain, d["mean_difference"] - gain))
    return rows


def median_scaled_sharpness_line(metrics: dict, model: str) -> Optional[str]:
    """The model's median-scaled sharpness as one line beside the table, None where the
    evaluation predates it."""
    entry = metrics["summary"].get(model, {}).get("sharpness_median")
    if not entry:
        return None
    low, high = SHARPNESS_RANGE
    return (f"not a target: sharpness with each volume scaled by its brain median instead of its 99.5th "
            f"percentile: {entry['mean']:.3f} (n={entry['n']}; {'inside' if low <= entry['mean'] <= high else 'outside'} "
            f"[{low}, {high}])")


def format_rows(rows) -> str:
    lines = ["| target | measured | met | margin |", "|---|---|---|---|"]
    for name, measured, met, margin in rows:
        lines.append(f"| {name} | {measured} | {'yes' if met else '**no**'} | {margin:+.3f} |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("metrics", help="metrics.json of `python -m training evaluate` (test split, every slice)")
    parser.add_argument("--model", required=True, help="label of the new T1+T2 model in the evaluation")
    parser.add_argument("--shipped", required=True, help="label of the previously shipped T1+T2 model")
    parser.add_argument("--baseline", required=True, help="label of the pix2pix baseline trained alike")
    return parser


def targets_cli(args) -> int:
    path = Path(args.metrics)
    if not path.is_file():
        raise InputError(f"no evaluation metrics at {path}")
    try:
        metrics = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not JSON ({exc})") from None
    rows = check(metrics, args.model, args.shipped, args.baseline)
    print(f"{metrics.get('subjects_from', 'subjects')}: {len(metrics['per_subject'])} subjects, every brain slice")
    print(format_rows(rows))
    line = median_scaled_sharpness_line(metrics, args.model)
    if line:
        print(line)
    return 0 if all(met for _, _, met, _ in rows) else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="python -m training targets", description=__doc__))
    try:
        return targets_cli(parser.parse_args(argv))
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
