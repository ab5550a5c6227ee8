"""Model cards: a markdown page per trained model, written from the run and its held-out
evaluation, committed under docs/model_cards/ and stored in the bundle's provenance.

    python -m training model-card --run RUN --evaluation REPORT/metrics.json --label fdgan \
        --name t1_t2_to_flair --out docs/model_cards/t1_t2_to_flair.md
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

from MRISynthesisLib.errors import InputError
from MRISynthesisLib.preprocessing import PreprocessingConfig

from .data import portable_path
from .evaluate import format_stat, slices_phrase
from .trainer import preprocessing_config, saved_config

KNOWN_LIMITS = """\
- Trained briefly ({hours:.1f} h{warm}, device above): base width {width} (the paper uses 64) and
  {epochs} epochs (the paper 200) on {n_train} subjects. It is a small model trained briefly; the
  paper-sized model needs a GPU (`python -m training train` with the defaults).
- Training data: adult glioma/metastasis cases (BraTS 2018-2023, TCGA via BraTS-Toolkit)
  and multiple-sclerosis cases (Ljubljana MS databases). Other pathologies, children,
  other field strengths or sequences (e.g. 3D FLAIR vs 2D) are outside what it saw.
- 2D axial, slice by slice: no through-plane consistency; thick-slice clinical scans work
  but each slice is synthesised on its own.
{slices_limit}
- Lesion conspicuity varies from subject to subject (mean ± std above; 1 = as in the real
  FLAIR): small or subtle FLAIR lesions can be missed or blurred, and tumour borders can be
  softer than in a real FLAIR. A synthetic FLAIR is not a substitute for an acquired one in
  diagnosis.
- Intensities are relative (0-1000 scale, see above), not quantitative.
"""


def _slices_limit(trained: Optional[int], evaluated: Optional[int]) -> str:
    """The known limit that follows from which slices the model saw and was scored on."""
    seen = f"- Trained on {slices_phrase(trained)} of each subject"
    if not trained:
        return f"{seen} (figures above: {slices_phrase(evaluated)})."
    return (f"{seen}: the top and bottom of the brain\n"
            "  (slices with little brain) are outside what it saw and come out worse, below a linear fit\n"
            f"  of the inputs on some subjects (figures above: {slices_phrase(evaluated)}).")


def _devices(run_dir: Path, history) -> list:
    """The devices the epochs ran on: recorded per epoch since the device record existed,
    else the trainer's start lines in train.log ("... on cpu x1 (bf16)")."""
    devices = sorted({h["device"] for h in history if h.get("device")})
    log = run_dir / "train.log"
    if not devices and log.exists():
        devices = sorted(set(re.findall(r"^training .* on (\S+ x\d+) \(", log.read_text(), re.M)))
    return devices or ["not recorded"]


def _recipe(config: dict) -> str:
    """The recipe options that differ between runs (docs/recipe_study.md), as CLI options."""
    options = [f"--background-weight {config.get('background_weight', 1.0):g}",
               f"--gdl-weight {config.get('gdl_weight', 0.0):g}", f"--gan-weight {config.get('gan_weight', 1.0):g}",
               f"--fm-weight {config.get('fm_weight', 0.0):g}",
               f"--intensity-reference {config.get('intensity_reference', 'percentile')}"]
    if config.get("lesion_weight", 1.0) != 1.0:
        options.append(f"--lesion-weight {config['lesion_weight']:g}")
    if config.get("augment"):
        options.append("--augment")
    if config.get("augment_contrast"):
        options.append(f"--augment-contrast {config['augment_contrast']:g}")
    if config.get("augment_blur"):
        options.append(f"--augment-blur {config['augment_blur']:g}")
    if config.get("standardize_histograms"):
        options.append("--standardize-histograms")
    if config["architecture"] == "fdgan":
        options += [f"--adain-scale {config.get('adain_scale', 'direct')}",
                    f"--style-init {config.get('style_init', 'normal')}"]
    return " ".join(f"`{o}`" for o in options)


def _normalisation(pre: PreprocessingConfig) -> str:
    why = (" (lesion-robust: a large bright lesion moves the upper percentiles of a FLAIR, hardly its median)"
           if pre.intensity_reference == "median" else "")
    return (f"per volume, {pre.window_text(False)}{why}{pre.standardization_text()}, clipped; background -1; "
            f"slices padded to a square field of view of at least {pre.min_field_of_view_mm:g} mm and resized "
            f"to the network's grid {pre.resize_interpolation}, back bicubic. The output is on "
            f"0-{pre.output_max:g}: 0 = background, {pre.output_max:g} = the upper end of that window in a "
            "real FLAIR normalised the same way.")


def render_model_card(run_dir, evaluation_json, label: str, name: str,
                      preprocessing: Optional[PreprocessingConfig] = None) -> str:
    """``preprocessing``: the shipped bundle's, where it differs from the run's (histogram
    standardisation added at export)."""
    run_dir = Path(run_dir)
    config = saved_config(json.loads((run_dir / "config.json").read_text()))
    split = json.loads((run_dir / "split.json").read_text())
    history = json.loads((run_dir / "log.json").read_text())
    history = history.get("history", history) if isinstance(history, dict) else history
    evaluation = json.loads(Path(evaluation_json).read_text())
    pre = preprocessing or preprocessing_config({"intensity_reference": "percentile", **config}, run_dir)
    sources = config["sources"].split(",")
    train_subjects = split.get("train_usable", split.get("train", []))
    val_subjects = split.get("val_usable", split.get("val", []))
    test_subjects = evaluation["subjects"]
    hours = sum(float(h.get("seconds", 0)) for h in history) / 3600
    last = history[-1] if history else {}
    lines = [
        f"# Model card: `{name}`",
        "",
        f"{' + '.join(s.upper() for s in sources)} -> {config['target'].upper()}, "
        + ("the feature-disentanglement GAN of the paper" if config["architecture"] == "fdgan"
           else "the paper's pix2pix U-Net baseline") + f" (`{config['architecture']}`), shipped as `Resources/Models/{name}.safetensors` "
        "(fp16 weights; the same text is in the bundle's provenance, `mrisynthesis info` prints it).",
        "",
        "## Training",
        f"- Data: `{portable_path(config['data'])}` (real MRI: the project's shared subjects and the BraTS subjects "
        "`../shared/more-data/stage.py` writes); split by patient, same-patient sessions kept together "
        f"(`{portable_path(config['split']) if config.get('split') else 'seeded split, seed ' + str(config['seed'])}`).",
        f"- Training subjects ({len(train_subjects)}): {', '.join(train_subjects)}.",
        f"- Validation subjects ({len(val_subjects)}): {', '.join(val_subjects) or 'none with these modalities'}.",
        f"- Held-out test subjects ({len(test_subjects)}): {', '.join(test_subjects)}.",
        f"- Slices: {slices_phrase(config['slices_per_subject'])} of each subject, axial, 256x256.",
        (f"- Model: base width {config['width']}, LAF grid {config['laf_grid']}x{config['laf_grid']}, "
         f"specific encoder {'off' if config.get('no_specific_encoder') else 'on'}; "
         if config["architecture"] == "fdgan" else f"- Model: U-Net, base width {config['width']}; ")
        + f"discriminator width {config.get('d_width') or config['width']}.",
        f"- Recipe: {_recipe(config)} (what each does and why it was adopted: docs/recipe_study.md).",
        f"- Schedule: {len(history)} epochs ({config['epochs_constant']} at lr {config['lr']:g}, "
        f"{config['epochs_decay']} linear decay), batch {config['batch_size']}, Adam betas "
        f"({config['beta1']}, {config['beta2']}), {config['precision']} autocast, seed {config['seed']}; "
        f"{hours:.1f} h of training"
        + (f", warm-started from the weights of `{Path(config['init_from']).name}` (another run's checkpoint; "
           "its hours are not counted here)" if config.get("init_from") else "") + ".",
        f"- Device: {'; '.join(_devices(run_dir, history))}.",
        f"- Loss: GAN (BCE, weight {config.get('gan_weight', 1.0):g}) + {config['lambda1']:g} L1(G)"
        + (f" + {config['lambda2']:g} L1(LAF pseudo-target)" if config["architecture"] == "fdgan" else "")
        + f", L1 reduction `{config['l1_reduction']}`: the paper's 0.1 on a sum makes the adversarial term about "
        "1e-4 of the objective, i.e. plain L1 regression; per-pixel mean with pix2pix's weight 100 keeps "
        "the weighting independent of image and batch size (docs/training.md).",
        f"- Last epoch losses: D {last.get('loss_D', float('nan')):.3f}, G {last.get('loss_G', float('nan')):.3f}"
        + (f"; validation brain PSNR {last['val_psnr_masked']:.2f} dB, brain SSIM {last['val_ssim_masked']:.3f}"
           if isinstance(last.get("val_psnr_masked"), (int, float)) else "") + ".",
        "",
        "## Inputs it expects",
        f"- {', '.join(s.upper() for s in sources)} of one head, co-registered (the same grid, or grids that "
        "overlap in physical space: others are resampled onto the T1).",
        "- Skull-stripped volumes, or raw heads (the default `--brain-mask auto` extracts the brain), "
        "or any head with a brain mask (`--brain-mask FILE`).",
        "- Any storage orientation and in-plane size (reoriented from the affine, padded to a square field "
        "of view of at least 240 mm and resized to 256x256, and back).",
        f"- Intensity normalisation: {_normalisation(pre)}"
        + (" The network itself trained on unstandardised inputs; the standardisation was added at export "
           "(`training export --standardize-histograms`): without it, the T1 model drew regions of scans whose "
           "tissue contrast is far from the training data's black (docs/learning_curves.md, \"T1: black regions\")."
           if pre.histogram_landmarks and not config.get("standardize_histograms") else ""),
        "",
        "## Held-out evaluation",
        f"`python -m training evaluate` on the test subjects of `docs/split.json` (never seen in training), "
        f"{slices_phrase(evaluation['slices_per_subject'])} of each subject, output units; mean ± std over subjects. "
        "Brain figures first (inside the brain mask); lesion figures over the subjects with a lesion label "
        "(conspicuity 1 = lesions as conspicuous as in the real FLAIR); whole-slice figures last, they mostly "
        f"measure the background (report: [docs/evaluation/{name}/report.md](../evaluation/{name}/report.md)).",
        "",
        "| method | brain PSNR (dB) | brain SSIM | brain NRMSE | scale-free brain PSNR (dB) | sharpness (1 = as real) "
        "| brain GMSD | lesion conspicuity | lesion PSNR (dB) | whole-slice PSNR (dB) | whole-slice SSIM |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    columns = (("psnr_masked", 2), ("ssim_masked", 3), ("nrmse_masked", 3), ("psnr_masked_scale_free", 2),
               ("sharpness", 2), ("gmsd_masked", 3), ("lesion_conspicuity", 2), ("psnr_lesion", 2), ("psnr", 2),
               ("ssim", 3))
    for method, stats in evaluation["summary"].items():
        shown = f"**{method}** (this model)" if method == label else method
        lines.append(f"| {shown} | " + " | ".join(format_stat(stats, key, digits) for key, digits in columns) + " |")
    lines += ["", "Each model is scored against the real FLAIR normalised the way that model normalises "
              "(its bundle's intensity reference; `previous_*` is the bundle this one replaced); the linear "
              "baseline is fit in this model's units. The scale-free brain PSNR does not depend on the units."]
    tests = [t for t in evaluation.get("ttests", []) if label in (t["a"], t["b"]) and "psnr_masked" in t]
    if tests:
        lines += ["", "Paired t-tests over subjects, brain PSNR (this model minus the other):", ""]
        for t in tests:
            other, sign = (t["b"], 1) if t["a"] == label else (t["a"], -1)
            r = t["psnr_masked"]
            lines.append(f"- vs {other}: {sign * r['mean_difference']:+.2f} dB, n = {r['n']}, p = {r['p']:.3g}")
    lines += ["", "## Known limits",
              KNOWN_LIMITS.format(width=config["width"], epochs=len(history), n_train=len(train_subjects),
                                  hours=hours, warm=", plus a warm start" if config.get("init_from") else "",
                                  slices_limit=_slices_limit(config["slices_per_subject"],
                                                             evaluation["slices_per_subject"]))]
    return "\n".join(lines)


COMPARISON_HEADING = "## Against the other models of one evaluation"
# The paired figures of the comparison, (key, name, digits): scale-free first, as in the reports.
COMPARED = (("psnr_masked_scale_free", "scale-free brain PSNR (dB)", 2), ("psnr_masked", "brain PSNR (dB)", 2),
            ("sharpness", "sharpness", 3), ("lesion_conspicuity", "lesion conspicuity", 2))


def comparison_section(evaluation_json, label: str, report: str) -> str:
    """Paired differences, this model minus each other model of an evaluation that scored
    several on the same subjects (e.g. the shipped models with different inputs), and where
    a model with fewer inputs is not beaten on scale-free brain PSNR, the sentence that says so."""
    evaluation = json.loads(Path(evaluation_json).read_text())
    if label not in evaluation.get("summary", {}):
        raise InputError(f"--compared-in: {label!r} is not a method of {evaluation_json}")
    sources = {m["label"]: m.get("sources", []) for m in evaluation.get("methods", []) if "label" in m}
    rows, verdicts = [], []
    for t in evaluation.get("ttests", []):
        if label not in (t["a"], t["b"]):
            continue
        other, sign = (t["b"], 1) if t["a"] == label else (t["a"], -1)
        cells = []
        for key, _, digits in COMPARED:
            r = t.get(key)
            cells.append("-" if not r else f"{sign * r['mean_difference']:+.{digits}f} (p = {r['p']:.2g})")
        rows.append(f"| {other} | {t['psnr_masked']['n']} | " + " | ".join(cells) + " |")
        gain = t.get("psnr_masked_scale_free")
        fewer = len(sources.get(other, [])) < len(sources.get(label, []))
        if fewer and gain and sign * gain["mean_difference"] <= 0:
            extra = [s.upper() for s in sources[label] if s not in sources[other]]
            verdicts.append(f"On these subjects this model is no more faithful than `{other}`, which does without "
                            f"the {', '.join(extra)} (scale-free brain PSNR {sign * gain['mean_difference']:+.2f} dB, "
                            f"p = {gain['p']:.2g}): for the most faithful FLAIR, leave the {', '.join(extra)} out.")
    if not rows:
        raise InputError(f"--compared-in: {evaluation_json} holds no paired test of {label!r} against another model")
    lines = [COMPARISON_HEADING, "",
             f"{len(evaluation['subjects'])} test subjects scored by every model, "
             f"{slices_phrase(evaluation['slices_per_subject'])} of each (report: {report}). "
             "This model minus the other, mean over subjects, paired t-test:", "",
             "| other model | n | " + " | ".join(name for _, name, _ in COMPARED) + " |",
             "|---|---|" + "---|" * len(COMPARED)] + rows
    return "\n".join(lines + ([""] + verdicts if verdicts else []))


def with_comparison(card: str, section: str) -> str:
    """``card`` with its comparison section, if any, replaced by ``section`` (before the
    known limits, which close a card)."""
    if COMPARISON_HEADING in card:
        head, rest = card.split(COMPARISON_HEADING, 1)
        after = rest.find("\n## ")
        card = head.rstrip("\n") + ("\n" + rest[after:] if after >= 0 else "")
    head, limits, rest = card.partition("\n## Known limits")
    return head.rstrip("\n") + "\n\n" + section + ("\n" + limits + rest if limits else "\n")


def _report_link(evaluation_json) -> str:
    """The evaluation's report as a link from docs/model_cards/ where it lies under
    docs/evaluation/, else its file name."""
    path = Path(evaluation_json).resolve()
    parts = path.parts
    if "evaluation" in parts and parts[parts.index("evaluation") - 1] == "docs":
        rel = "/".join(parts[parts.index("evaluation"):-1])
        return f"[docs/{rel}/report.md](../{rel}/report.md)"
    return f"`{path.parent.name}/report.md`"


def model_card_cli(args) -> int:
    from MRISynthesisLib.bundle import BundleError, load_bundle

    if args.from_bundle:
        ignored = [o for o, v in (("--evaluation", args.evaluation), ("--name", args.name),
                                  ("--preprocessing-from", args.preprocessing_from)) if v]
        if ignored:
            raise InputError(f"{' and '.join(ignored)} {'goes' if len(ignored) == 1 else 'go'} with --run; "
                             "--from-bundle keeps the bundle's card and rewrites only its --compared-in section")
        if not args.compared_in:
            raise InputError("--from-bundle rewrites a bundle's card with --compared-in; give --run to write a new card")
        try:
            card = str(load_bundle(args.from_bundle).provenance.get("model_card") or "")
        except BundleError as exc:
            raise InputError(f"--from-bundle: {exc}") from None
        if not card:
            raise InputError(f"--from-bundle: {args.from_bundle} holds no model card")
        text = card
    else:
        if not args.evaluation or not args.name:
            raise InputError("--run needs --evaluation and --name (the shipped name, e.g. t1_t2_to_flair)")
        preprocessing = load_bundle(args.preprocessing_from).preprocessing if args.preprocessing_from else None
        text = render_model_card(args.run, args.evaluation, args.label, args.name, preprocessing)
    if args.compared_in:
        text = with_comparison(text, comparison_section(args.compared_in, args.label, _report_link(args.compared_in)))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text, encoding="utf-8")
    print(args.out)
    return 0


def store_model_card(bundle_path, card_path) -> str:
    """Replace the model card stored in a bundle (its provenance's model_card) with the text
    of ``card_path``: the weights and the rest of the provenance stay as they are, and the
    bundle is rewritten atomically (a new SHA-256, since the card is part of what it covers).
    For a shipped bundle whose run folder is gone, so that it cannot be exported again; the
    SHA-256s it had before are kept in the provenance's earlier_sha256."""
    from MRISynthesisLib.bundle import BundleError, load_bundle, save_bundle

    card = Path(card_path)
    if not card.is_file():
        raise InputError(f"--model-card: no such file: {card}")
    text = card.read_text(encoding="utf-8")
    if not text.startswith("# Model card"):
        raise InputError(f"--model-card: {card} does not start with '# Model card'; is it a model card?")
    try:
        bundle = load_bundle(bundle_path)
    except BundleError as exc:
        raise InputError(f"--bundle: {exc}") from None
    if bundle.provenance.get("model_card") == text:
        return bundle.sha256  # nothing to change: the file stays as it is
    # Evaluations name the bundles they scored by SHA-256; the earlier ones stay traceable.
    earlier = list(bundle.provenance.get("earlier_sha256", [])) + [bundle.sha256]
    bundle.provenance = {**bundle.provenance, "model_card": text, "earlier_sha256": earlier}
    return save_bundle(bundle, bundle_path)  # tensors as stored (fp16 stays fp16)
