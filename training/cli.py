"""Command line: ``python -m training {train,evaluate,export,subjects,model-card,bench,targets,quality-table} ...``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from MRISynthesisLib.errors import MRISynthesisError

S = argparse.SUPPRESS


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model (also under torchrun for several processes)",
                       argument_default=S, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", help="folder of subject folders, or several joined with ':' (required unless --resume)")
    g.add_argument("--out", required=True, help="run folder (checkpoints, logs, figures, model.safetensors)")
    g.add_argument("--sources", help="comma-separated source modalities (default t1,t2)")
    g.add_argument("--target", help="target modality (default flair)")
    g.add_argument("--subjects", help="comma-separated subset of subject folders to use")
    g.add_argument("--slices-per-subject", type=int, help="middle brain slices per subject (default 80; 0 = all)")
    g.add_argument("--val-fraction", type=float, help="fraction of subject groups for validation (default 0.1)")
    g.add_argument("--test-fraction", type=float, help="fraction of subject groups held out for testing (default 0.2)")
    g.add_argument("--split", help="reuse a split.json (e.g. another run's) instead of a seeded split")
    g.add_argument("--split-over", choices=("usable", "all"),
                   help="split only the subjects that have every needed modality (default), or all subjects of "
                        "the folder (the same split for every source set)")
    g.add_argument("--group", action="append", help="same-patient subjects kept in one split, e.g. a,b (repeatable)")
    g.add_argument("--groups-file", help="JSON list of lists of same-patient subject names")
    g.add_argument("--no-default-groups", action="store_true",
                   help="drop the built-in groups (brats20-001+brats18-cbica-aab, ms-long-01a+ms-long-01b)")
    g.add_argument("--intensity-reference", choices=("percentile", "median"),
                   help="normalisation window: brain 0.5-99.5th percentiles (default) or 0.5th percentile to "
                        "2.5 x (median - low), which large bright lesions hardly move")
    g.add_argument("--resize-interpolation", choices=("bicubic", "bilinear"),
                   help="how slices are resized onto the network's 256x256 grid: bicubic (default) or bilinear "
                        "(the bundles made before this option); stored in the bundle")
    g.add_argument("--field-of-view-mm", type=float,
                   help="smallest square field of view a slice is padded to before it is resized onto the 256x256 "
                        "grid (default 240: a 240 mm, 1 mm slice is upsampled; 256: 1 mm slices up to 256 mm are "
                        "only padded, never resampled); stored in the bundle")
    g.add_argument("--cache-dir", help="preprocessed-slice cache (default RUN/cache; share it between runs)")
    g = p.add_argument_group("model")
    g.add_argument("--architecture", choices=("fdgan", "pix2pix_unet"), help="generator (default fdgan)")
    g.add_argument("--width", type=int, help="generator base channels (default 64, the paper's)")
    g.add_argument("--d-width", type=int, help="discriminator base channels (default: --width)")
    g.add_argument("--laf-grid", type=int, choices=(1, 2, 4, 8, 16), help="LAF grid g (default 2)")
    g.add_argument("--no-specific-encoder", action="store_true",
                   help="shared-information-only ablation (no LAF/SPE/AdaIN; MILR-like)")
    g.add_argument("--adain-scale", choices=("one_plus_delta", "direct"),
                   help="AdaIN scale = 1 + MLP output (default: starts as instance norm) or the MLP output itself "
                        "(the paper's literal form)")
    g.add_argument("--context-slices", type=int,
                   help="2.5D input: neighbouring axial slices on each side given with each source as extra "
                        "channels (default 0: the paper's single slice)")
    g.add_argument("--style-init", choices=("kaiming", "normal"),
                   help="init of the SPE and its MLP: He/fan-in (default, MUNIT's) or N(0, 0.02) (the paper's)")
    g.add_argument("--init-from", metavar="MODEL",
                   help="warm start: a bundle (.safetensors), run folder or training checkpoint of another source "
                        "set with the same architecture (the paper model may grow wider); shared sources keep their "
                        "weights, new ones start at zero weight (training/warm_start.py)")
    g.add_argument("--init-discriminator-from", metavar="RUN",
                   help="with --init-from: take the discriminator from this run folder or training checkpoint "
                        "instead (same --d-width; sources mapped as for the generator), for a bundle, which holds "
                        "none")
    g.add_argument("--d-warmup-steps", type=int,
                   help="with --init-from: the first N steps train only the discriminator (default 0), for a "
                        "bundle, which holds none. Measured: 500 and 3,000 such steps did not keep a fine-tune from "
                        "blurring (docs/learning_curves.md); warm-start from a run folder where one exists")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, help="total epochs, split in half: constant lr, then linear decay")
    g.add_argument("--epochs-constant", type=int, help="epochs at constant lr (default 100)")
    g.add_argument("--epochs-decay", type=int, help="epochs of linear decay to 0 (default 100)")
    g.add_argument("--batch-size", type=int, help="slices per step per process (default 3)")
    g.add_argument("--lr", type=float, help="Adam learning rate for G and D (default 2e-4)")
    g.add_argument("--beta1", type=float, help="Adam beta1 (default 0.5)")
    g.add_argument("--beta2", type=float, help="Adam beta2 (default 0.999)")
    g.add_argument("--l1-reduction", choices=("mean", "sum"),
                   help="L1 terms as per-pixel mean (default, lambda 100) or per-image sum (paper, lambda 0.1)")
    g.add_argument("--lambda1", type=float, help="weight of L1(G(x), y) (default by reduction: 100 / 0.1)")
    g.add_argument("--lambda2", type=float, help="weight of L1(pseudo-target, y) (default as --lambda1)")
    g.add_argument("--background-weight", type=float,
                   help="weight of background pixels in both L1 terms (default 1: the paper's uniform L1; "
                        "the brain has weight 1)")
    g.add_argument("--lesion-weight", type=float,
                   help="weight of lesion pixels in both L1 terms, from the training subjects' ground-truth "
                        "lesion labels (BraTS seg, MS lesion masks; subjects without one get none; default 1: "
                        "the paper's, no labels read)")
    g.add_argument("--gdl-weight", type=float, help="weight of a gradient-difference loss on G(x) (default 0: off)")
    g.add_argument("--fm-weight", type=float, help="weight of pix2pixHD's discriminator feature-matching loss on G(x) "
                                                  "(default 0: off; pix2pixHD uses 10)")
    g.add_argument("--gan-weight", type=float, help="weight of the adversarial term in G's loss (default 1)")
    g.add_argument("--augment", action="store_true",
                   help="random flips, rotations (10 deg), scaling (10%%) and per-source gamma/bias/scale jitter")
    g.add_argument("--augment-contrast", type=float,
                   help="with --augment: also squeeze/spread each source's tissue contrast around its brain median "
                        "by a power law with exponent in [exp(-C), exp(C)] (default 0: off; training/recipe.py)")
    g.add_argument("--augment-blur", type=float,
                   help="with --augment: also blur each source in-plane inside the brain, Gaussian sigma in [0, S] "
                        "voxels (default 0: off; training/recipe.py)")
    g.add_argument("--standardize-histograms", action="store_true",
                   help="standardise each source's brain histogram onto the mean of the training subjects (written "
                        "to RUN/histogram_landmarks.json, stored in the bundle) before normalising it, in training "
                        "and so at inference")
    g.add_argument("--seed", type=int, help="seed for the split, initialisation and data order (default 0)")
    g.add_argument("--precision", choices=("fp32", "bf16"), help="fp32 (default) or bf16 autocast")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default auto")
    g.add_argument("--num-threads", type=int, help="CPU threads for torch")
    g.add_argument("--memory-format", choices=("contiguous", "channels_last"),
                   help="layout of the networks and batches in the training step (default contiguous); with "
                        "--compile, channels_last made a bf16 step 1.3x faster on an AMD EPYC (docs/performance.md)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="run the training step through torch.compile (one process; on the CPU it needs a C++ "
                        "compiler, and the first steps take minutes to compile). It changes only the rounding, so "
                        "a resumed run may take it up or drop it (--no-compile); so may --memory-format")
    g.add_argument("--max-val-slices", type=int, help="validate on at most this many slices (evenly spaced)")
    g.add_argument("--val-every", type=int,
                   help="also validate every N steps: RUN/curve.csv (figures against steps and CPU hours), "
                        "curve.png, curve_samples.png, and a mid-epoch checkpoint (default 500; 0: once per "
                        "epoch only; each point costs a pass over the validation slices: cap them with "
                        "--max-val-slices)")
    g = p.add_argument_group("runs")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--stop-after-steps", type=int, help="debugging: stop after this many steps in total")
    g.add_argument("--stop-mode", choices=("interrupt", "crash"),
                   help="debugging: 'interrupt' saves a checkpoint like Ctrl-C; 'crash' exits without one")


def add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="compare models (and trivial baselines) against the real target")
    p.add_argument("--model", action="append", default=[], help="model bundle (repeatable); NAME=PATH sets its label")
    p.add_argument("--baseline", action="append", default=[],
                   help="trivial reference: t2 (the normalised T2), linear (least-squares fit of the normalised "
                        "sources; linear:t1,t2 picks the sources) (repeatable)")
    p.add_argument("--data", required=True, help="folder of subject folders, or several joined with ':'")
    p.add_argument("--subjects", help="comma-separated subjects to evaluate")
    p.add_argument("--split", help="a run's split.json: evaluate its --split-name subjects; linear fits on its train")
    p.add_argument("--split-name", default="test", choices=("train", "val", "test"))
    p.add_argument("--out", required=True, help="report folder (metrics.json, report.md, figure.png)")
    p.add_argument("--slices-per-subject", type=int, default=80, help="middle brain slices compared (0 = all)")
    p.add_argument("--target", default="flair")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--batch-size", type=int, default=8)


def add_export(sub) -> None:
    p = sub.add_parser("export", help="write a model bundle from a run's checkpoint")
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--out", required=True, help="bundle path (.safetensors)")
    p.add_argument("--checkpoint", help="checkpoint file (default RUN/checkpoint.pt)")
    p.add_argument("--half", action="store_true", help="store weights as fp16 (half the size)")
    p.add_argument("--model-card", help="markdown model card stored in the bundle's provenance (model_card)")
    p.add_argument("--evaluation", help="an evaluate metrics.json whose results are stored in the provenance "
                                        "(held_out_evaluation)")
    p.add_argument("--evaluation-label", help="this model's method label in --evaluation (default: its "
                                              "architecture's label, e.g. fdgan)")
    p.add_argument("--standardize-histograms", action="store_true",
                   help="the bundle standardises each source's brain histogram onto the mean of the run's training "
                        "subjects before normalising it (for scans whose tissue contrast is far from the training data's)")
    p.add_argument("--data", help="with --standardize-histograms: the data folder(s) holding the run's training "
                                  "subjects (default: the run's own)")
    p.add_argument("--max-blanked-brain", type=float,
                   help="refuse to export when, on any subject of --evaluation, the model renders more than this "
                        "percentage of the brain black where the real image shows tissue (needs --evaluation-label)")


def add_subjects(sub) -> None:
    p = sub.add_parser("subjects", help="list the subjects of a data folder and the modalities each has")
    p.add_argument("--data", required=True)
    p.add_argument("--sources", default="t1,t2")
    p.add_argument("--target", default="flair")


def add_model_card(sub) -> None:
    p = sub.add_parser("model-card", help="write a model card (markdown) from a run and its evaluation")
    given = p.add_mutually_exclusive_group(required=True)
    given.add_argument("--run", help="run folder")
    given.add_argument("--from-bundle", metavar="BUNDLE",
                       help="instead of --run: start from the card stored in this bundle and (re)write its "
                            "--compared-in section (for a shipped model whose run folder is gone)")
    p.add_argument("--evaluation", help="with --run: metrics.json of python -m training evaluate")
    p.add_argument("--compared-in", metavar="EVALUATION",
                   help="metrics.json of an evaluation that scored this model beside others on the same subjects "
                        "(e.g. the shipped models with fewer inputs): adds the paired differences")
    p.add_argument("--label", required=True, help="this model's label in the evaluation(s)")
    p.add_argument("--name", help="with --run: shipped name, e.g. t1_t2_to_flair")
    p.add_argument("--out", required=True, help="markdown file to write")
    p.add_argument("--preprocessing-from", metavar="BUNDLE",
                   help="describe this bundle's preprocessing (e.g. one exported with --standardize-histograms) "
                        "instead of the run's")


def add_set_model_card(sub) -> None:
    p = sub.add_parser("set-model-card", help="store a model card in a bundle; weights unchanged")
    p.add_argument("--bundle", required=True, help="bundle (.safetensors), rewritten in place")
    p.add_argument("--model-card", required=True, help="markdown model card (docs/model_cards/NAME.md)")


def add_bench(sub) -> None:
    from .benchmark import __doc__ as doc, add_arguments

    add_arguments(sub.add_parser("bench", help="training-step throughput (samples/s) per model and precision",
                                 description=doc.split("\n\n")[0]))


def add_targets(sub) -> None:
    from .targets import __doc__ as doc, add_arguments

    add_arguments(sub.add_parser("targets", help="check the shipped T1+T2 model's quality targets on an evaluation",
                                 description=doc.split("\n\n")[0]))


def add_quality_table(sub) -> None:
    from .quality_table import __doc__ as doc, add_arguments

    add_arguments(sub.add_parser("quality-table", help="the README's quality table from the shipped models' evaluations",
                                 description=doc.split("\n\n")[0]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_train(sub)
    add_evaluate(sub)
    add_export(sub)
    add_subjects(sub)
    add_model_card(sub)
    add_set_model_card(sub)
    add_bench(sub)
    add_targets(sub)
    add_quality_table(sub)
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            from .trainer import train

            given = {k: v for k, v in vars(args).items() if k != "command"}
            result = train(given)
            if result.get("stopped"):
                return 130
            print(result["bundle"] if result.get("bundle") else "")
            return 0
        if args.command == "export":
            from .trainer import export_run

            if not args.out.endswith(".safetensors"):
                parser.error("--out must end with .safetensors")
            extra = {}
            if args.model_card:
                extra["model_card"] = Path(args.model_card).read_text(encoding="utf-8")
            if args.evaluation:
                extra["held_out_evaluation"] = json.loads(Path(args.evaluation).read_text())
                if args.evaluation_label:
                    if args.evaluation_label not in extra["held_out_evaluation"].get("summary", {}):
                        parser.error(f"--evaluation-label {args.evaluation_label!r} is not a method of {args.evaluation}")
                    extra["evaluation_label"] = args.evaluation_label
            if getattr(args, "max_blanked_brain", None) is not None:
                if "evaluation_label" not in extra:
                    parser.error("--max-blanked-brain needs --evaluation and --evaluation-label")
                from .evaluate import check_blanked_brain

                check_blanked_brain(extra["held_out_evaluation"], args.evaluation_label, args.max_blanked_brain)
            if args.data and not args.standardize_histograms:
                parser.error("--data is only read with --standardize-histograms")
            print(export_run(args.run, args.out, args.half, args.checkpoint, extra_provenance=extra,
                             standardize_histograms=args.standardize_histograms, data=args.data))
            return 0
        if args.command == "model-card":
            from .model_card import model_card_cli

            return model_card_cli(args)
        if args.command == "set-model-card":
            from .model_card import store_model_card

            print(f"{args.bundle}: sha256 {store_model_card(args.bundle, args.model_card)}")
            return 0
        if args.command == "evaluate":
            from .evaluate import evaluate_cli

            return evaluate_cli(args)
        if args.command == "targets":
            from .targets import targets_cli

            return targets_cli(args)
        if args.command == "quality-table":
            from .quality_table import quality_table_cli

            return quality_table_cli(args)
        if args.command == "bench":
            from .benchmark import bench_cli

            try:
                return bench_cli(args)
            except ValueError as exc:
                parser.error(str(exc))
        if args.command == "subjects":
            from .data import availability_report, discover

            needed = [s.strip() for s in args.sources.split(",")] + [args.target]
            print(availability_report(discover(args.data), needed))
            return 0
    except MRISynthesisError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        from .trainer import StopTraining

        if not isinstance(exc, StopTraining):  # only the debug option's simulated kill is expected
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 1
