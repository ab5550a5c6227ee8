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


def model_card_cli(args) -> int:
    preprocessing = None
    if getattr(args, "preprocessing_from", None):
        from MRISynthesisLib.bundle import load_bundle

        preprocessing = load_bundle(args.preprocessing_from).preprocessing
    text = render_model_card(args.run, args.evaluation, args.label, args.name, preprocessing)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text, encoding="utf-8")
    print(args.out)
    return 0
