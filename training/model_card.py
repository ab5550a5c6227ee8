"""Model cards: a markdown page per trained model, written from the run and its held-out
evaluation, committed under docs/model_cards/ and stored in the bundle's provenance.

    python -m training model-card --run RUN --evaluation REPORT/metrics.json --label fdgan \
        --name t1_t2_to_flair --out docs/model_cards/t1_t2_to_flair.md
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from MRISynthesisLib.preprocessing import PreprocessingConfig

KNOWN_LIMITS = """\
- Trained on a 2-core CPU in {hours:.1f} h: base width {width} (the paper uses 64) and
  {epochs} epochs (the paper 200) on {n_train} subjects. It is a small model trained briefly; the
  paper-sized model needs a GPU (`python -m training train` with the defaults).
- Training data: adult glioma/metastasis cases (BraTS 2018-2023, TCGA via BraTS-Toolkit)
  and multiple-sclerosis cases (Ljubljana MS databases). Other pathologies, children,
  other field strengths or sequences (e.g. 3D FLAIR vs 2D) are outside what it saw.
- 2D axial, slice by slice: no through-plane consistency; thick-slice clinical scans work
  but each slice is synthesised on its own.
- Lesion contrast is learnt from few examples: small or subtle FLAIR lesions can be missed
  or blurred, and tumour borders are softer than in a real FLAIR. A synthetic FLAIR is not
  a substitute for an acquired one in diagnosis.
- Intensities are relative (0-1000 scale, see above), not quantitative.
"""


def _fmt(stats: Optional[dict], digits: int) -> str:
    if not stats:
        return "-"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def render_model_card(run_dir, evaluation_json, label: str, name: str) -> str:
    run_dir = Path(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    split = json.loads((run_dir / "split.json").read_text())
    history = json.loads((run_dir / "log.json").read_text())
    history = history.get("history", history) if isinstance(history, dict) else history
    evaluation = json.loads(Path(evaluation_json).read_text())
    pre = PreprocessingConfig()
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
        f"- Data: `{config['data']}` (the project's shared real MRI); split by subject, seed {config['seed']}, "
        f"same-patient sessions kept together (`{config.get('split') or 'seeded split'}`).",
        f"- Training subjects ({len(train_subjects)}): {', '.join(train_subjects)}.",
        f"- Validation subjects ({len(val_subjects)}): {', '.join(val_subjects) or 'none with these modalities'}.",
        f"- Held-out test subjects ({len(test_subjects)}): {', '.join(test_subjects)}.",
        f"- Slices: the middle {config['slices_per_subject']} axial brain slices per subject, 256x256.",
        f"- Model: base width {config['width']}, LAF grid {config['laf_grid']}x{config['laf_grid']}, "
        f"specific encoder {'off' if config.get('no_specific_encoder') else 'on'}; discriminator width "
        f"{config.get('d_width') or config['width']}.",
        f"- Schedule: {len(history)} epochs ({config['epochs_constant']} at lr {config['lr']:g}, "
        f"{config['epochs_decay']} linear decay), batch {config['batch_size']}, Adam betas "
        f"({config['beta1']}, {config['beta2']}), {config['precision']} autocast, seed {config['seed']}; "
        f"{hours:.1f} h on 2 CPU cores (one thread per run).",
        f"- Loss: GAN (BCE) + {config['lambda1']:g} L1(G) + {config['lambda2']:g} L1(LAF pseudo-target), "
        f"L1 reduction `{config['l1_reduction']}`: the paper's 0.1 on a sum makes the adversarial term about "
        "1e-4 of the objective, i.e. plain L1 regression; per-pixel mean with pix2pix's weight 100 keeps "
        "the weighting independent of image and batch size (docs/training.md).",
        f"- Last epoch losses: D {last.get('loss_D', float('nan')):.3f}, G {last.get('loss_G', float('nan')):.3f}"
        + (f"; validation PSNR {last['val_psnr']:.2f} dB, SSIM {last['val_ssim']:.3f}"
           if isinstance(last.get("val_psnr"), (int, float)) else "") + ".",
        "",
        "## Inputs it expects",
        f"- {', '.join(s.upper() for s in sources)} of one head, co-registered (the same grid, or grids that "
        "overlap in physical space: others are resampled onto the T1).",
        "- Skull-stripped volumes (zero outside the brain), or any head with a brain mask (`--mask`); "
        "without either, the whole non-zero head is normalised, which the model did not see in training.",
        "- Any storage orientation and in-plane size (reoriented from the affine, padded to a square field "
        "of view of at least 240 mm and resized to 256x256, and back).",
        f"- Intensity normalisation: per volume, the {pre.lower_percentile}th and {pre.upper_percentile}th "
        "percentiles inside the brain map to -1 and 1 (clipped), background -1. The output is on 0-"
        f"{pre.output_max:g}: 0 = background, {pre.output_max:g} = the {pre.upper_percentile}th brain "
        "percentile of a real FLAIR normalised the same way.",
        "",
        "## Held-out evaluation",
        f"`python -m training evaluate` on the test subjects, middle {evaluation['slices_per_subject']} brain "
        "slices, output units; mean ± std over subjects (report: "
        f"[docs/evaluation/{name}/report.md](../evaluation/{name}/report.md)).",
        "",
        "| method | PSNR (dB) | SSIM | NRMSE | PSNR brain | SSIM brain |",
        "|---|---|---|---|---|---|",
    ]
    for method, stats in evaluation["summary"].items():
        shown = f"**{method}** (this model)" if method == label else method
        lines.append(f"| {shown} | {_fmt(stats.get('psnr'), 2)} | {_fmt(stats.get('ssim'), 3)} | "
                     f"{_fmt(stats.get('nrmse'), 3)} | {_fmt(stats.get('psnr_masked'), 2)} | "
                     f"{_fmt(stats.get('ssim_masked'), 3)} |")
    lines += ["", "## Known limits",
              KNOWN_LIMITS.format(width=config["width"], epochs=len(history), n_train=len(train_subjects),
                                  hours=hours)]
    return "\n".join(lines)


def model_card_cli(args) -> int:
    text = render_model_card(args.run, args.evaluation, args.label, args.name)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text, encoding="utf-8")
    print(args.out)
    return 0
