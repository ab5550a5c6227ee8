"""The training loop: one code path for one process or many (torchrun + DDP).

Each iteration updates D then G (pix2pix order):
    loss_D = 0.5 * (BCE(D(x, y), 1) + BCE(D(x, G(x)), 0))
    loss_G = BCE(D(x, G(x)), 1) + lambda1 * L1(G(x), y) + lambda2 * L1(F(x), y)
with L1 reduced per ``l1_reduction`` ("mean": per-pixel mean; "sum": the paper's norm,
the sum over the pixels of an image, averaged over the batch).

No lost work: ``RUN/checkpoint.pt`` is written atomically after every epoch and on
SIGINT/SIGTERM (mid-epoch, with the step reached). The data order of epoch e is a
function of (seed, e) only and the RNG states are saved, so a resumed run ends with
the same weights as an uninterrupted one (bit-exact on CPU).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from MRISynthesisLib import __version__ as lib_version
from MRISynthesisLib.bundle import bundle_from_generator, save_bundle
from MRISynthesisLib.errors import InputError
from MRISynthesisLib.inference import autocast_context, resolve_device
from MRISynthesisLib.metrics import aggregate, lesion_metrics, subject_metrics
from MRISynthesisLib.networks import (ModelConfig, build_discriminator, build_generator, count_parameters, init_generator,
                                      init_weights)
from MRISynthesisLib.preprocessing import INTENSITY_REFERENCES, RESIZE_INTERPOLATIONS, PreprocessingConfig, to_output_scale

from . import data as data_mod
from . import recipe

CHECKPOINT = "checkpoint.pt"
LOSS_KEYS = ("loss_D", "loss_G", "loss_G_GAN", "loss_G_L1", "loss_G_L1_pseudo")
# Of the spectral power ratios only the two lower bands: the validation slices' real target is
# the 240 mm slice resized to the 256 grid, which leaves it almost no power in the highest band
# and the checkerboard corner, so their ratios there (11 times the real's checkerboard power for
# the shipped model, 0.9 on the output grid) would measure the resizing, not the model.
VAL_METRICS = ("psnr", "ssim", "nrmse", "psnr_masked", "ssim_masked", "nrmse_masked",
               "psnr_masked_scale_free", "sharpness", "gmsd", "gmsd_masked", "blanked_brain",
               "lesion_conspicuity", "psnr_lesion", "sharpness_median", "spectrum_low", "spectrum_mid")
VAL_KEYS = tuple(f"val_{k}" for k in VAL_METRICS)
CURVE_KEYS = ("step", "epoch", "cpu_hours", "wall_hours", "lr", "loss_G_L1", "loss_D", "loss_G_GAN", *VAL_KEYS)
# Options that may change when resuming; everything else must match the saved run.
RESUME_OVERRIDABLE = {"resume", "no_progress", "stop_after_steps", "stop_mode", "num_threads", "device",
                      "epochs", "epochs_constant", "epochs_decay", "data", "cache_dir", "val_every",
                      "memory_format", "compile"}
# Layouts of the networks' weights and batches in the training step (channels-last: oneDNN's).
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}

DEFAULTS = dict(
    data=None, out=None, sources="t1,t2", target="flair", subjects=None,
    architecture="fdgan", width=64, d_width=None, laf_grid=2, no_specific_encoder=False,
    adain_scale="one_plus_delta", style_init="kaiming", context_slices=0, init_from=None,
    init_discriminator_from=None,
    epochs=None, epochs_constant=100, epochs_decay=100, d_warmup_steps=0, batch_size=3, lr=2e-4, beta1=0.5, beta2=0.999,
    l1_reduction="mean", lambda1=None, lambda2=None,
    background_weight=1.0, lesion_weight=1.0, gdl_weight=0.0, gan_weight=1.0, fm_weight=0.0,
    augment=False, augment_contrast=0.0, augment_blur=0.0,
    intensity_reference="percentile", standardize_histograms=False,
    resize_interpolation="bicubic", field_of_view_mm=240.0,
    slices_per_subject=80, val_fraction=0.1, test_fraction=0.2, split=None, split_over="usable",
    group=[], groups_file=None, no_default_groups=False,
    seed=0, precision="fp32", device="auto", num_threads=None, memory_format="contiguous", compile=False, cache_dir=None,
    max_val_slices=None, val_every=500, resume=False, no_progress=False, stop_after_steps=None, stop_mode="interrupt",
)
# The L1 weights each reduction defaults to: pix2pix's 100 on a per-pixel mean, or the
# paper's 0.1 on a per-image sum (see docs/training.md, "Loss reduction").
DEFAULT_LAMBDA = {"mean": 100.0, "sum": 0.1}
L1_DECISION = ("default l1_reduction=mean with lambda1=lambda2=100 (pix2pix's weighting): the weight does not "
               "depend on the image size, and the paper's 0.1 on a per-image sum (= 6553.6 on a 256x256 mean) "
               "makes the adversarial term about 1e-4 of the objective, i.e. plain L1 regression; the paper's "
               "setting is --l1-reduction sum (lambda 0.1)")


class StopTraining(RuntimeError):
    """Raised by the debug option --stop-after-steps in "crash" mode (a simulated kill)."""


def resolve_config(given: dict) -> dict:
    """Full option set: defaults, then given values; derived values filled in and checked."""
    cfg = dict(DEFAULTS)
    cfg.update({k: v for k, v in given.items() if k in DEFAULTS})
    unknown = set(given) - set(DEFAULTS)
    if unknown:
        raise InputError(f"unknown training options: {sorted(unknown)}")
    if cfg["data"] is None or cfg["out"] is None:
        raise InputError("--data and --out are required")
    for key in data_mod.PATH_OPTIONS:  # "data" may list several folders (below)
        if key != "data" and cfg[key] is not None:
            cfg[key] = str(Path(cfg[key]).resolve())
    cfg["data"] = os.pathsep.join(str(p.resolve()) for p in data_mod.data_folders(cfg["data"]))
    sources = [s.strip() for s in cfg["sources"].split(",")] if isinstance(cfg["sources"], str) else list(cfg["sources"])
    for s in sources + [cfg["target"]]:
        if s not in data_mod.MODALITIES:
            raise InputError(f"unknown modality {s!r}; expected one of {data_mod.MODALITIES}")
    if cfg["target"] in sources or len(set(sources)) != len(sources) or not sources:
        raise InputError(f"sources {sources} must be distinct, non-empty and not include the target {cfg['target']}")
    cfg["sources"] = ",".join(sources)
    if cfg["epochs"] is not None:
        if cfg["epochs"] < 1:
            raise InputError("--epochs must be >= 1")
        cfg["epochs_decay"] = cfg["epochs"] // 2
        cfg["epochs_constant"] = cfg["epochs"] - cfg["epochs_decay"]
    if cfg["epochs_constant"] < 0 or cfg["epochs_decay"] < 0 or cfg["epochs_constant"] + cfg["epochs_decay"] < 1:
        raise InputError("need epochs_constant, epochs_decay >= 0 and at least one epoch in total")
    if cfg["l1_reduction"] not in DEFAULT_LAMBDA:
        raise InputError(f"--l1-reduction must be mean or sum, got {cfg['l1_reduction']!r}")
    for key in ("lambda1", "lambda2"):
        if cfg[key] is None:
            cfg[key] = DEFAULT_LAMBDA[cfg["l1_reduction"]]
    if cfg["intensity_reference"] not in INTENSITY_REFERENCES:
        raise InputError(f"--intensity-reference must be one of {INTENSITY_REFERENCES}")
    if cfg["resize_interpolation"] not in RESIZE_INTERPOLATIONS:
        raise InputError(f"--resize-interpolation must be one of {RESIZE_INTERPOLATIONS}")
    if not cfg["field_of_view_mm"] > 0:
        raise InputError(f"--field-of-view-mm must be > 0, got {cfg['field_of_view_mm']}")
    if min(cfg["background_weight"], cfg["lesion_weight"], cfg["gdl_weight"], cfg["gan_weight"], cfg["fm_weight"]) < 0:
        raise InputError("--background-weight, --lesion-weight, --gdl-weight, --gan-weight and --fm-weight "
                         "must be >= 0")
    for key in ("augment_contrast", "augment_blur"):
        if cfg[key] < 0 or (cfg[key] > 0 and not cfg["augment"]):
            raise InputError(f"--{key.replace('_', '-')} must be >= 0 and goes with --augment")
    if cfg["d_warmup_steps"] < 0:
        raise InputError(f"--d-warmup-steps must be >= 0, got {cfg['d_warmup_steps']}")
    if cfg["d_warmup_steps"] and cfg["init_from"] is None:
        raise InputError("--d-warmup-steps goes with --init-from: it trains a fresh discriminator against a "
                         "trained generator")
    if cfg["init_discriminator_from"] is not None and cfg["init_from"] is None:
        raise InputError("--init-discriminator-from goes with --init-from: it gives a warm-started generator a "
                         "trained discriminator")
    if cfg["d_width"] is None:
        cfg["d_width"] = cfg["width"]
    if cfg["batch_size"] < 1 or cfg["width"] < 1 or cfg["d_width"] < 1:
        raise InputError("--batch-size, --width and --d-width must be >= 1")
    if cfg["slices_per_subject"] is not None and cfg["slices_per_subject"] <= 0:
        cfg["slices_per_subject"] = None  # 0 means every brain slice
    if cfg["precision"] not in ("fp32", "bf16"):
        raise InputError(f"--precision must be fp32 or bf16, got {cfg['precision']!r}")
    if cfg["memory_format"] not in MEMORY_FORMATS:
        raise InputError(f"--memory-format must be one of {', '.join(MEMORY_FORMATS)}, got {cfg['memory_format']!r}")
    if cfg["split_over"] not in ("usable", "all"):
        raise InputError("--split-over must be usable or all")
    if cfg["val_every"] is None or cfg["val_every"] < 0:
        raise InputError("--val-every must be >= 0 (0: validate once per epoch only)")
    if cfg["stop_mode"] not in ("interrupt", "crash"):
        raise InputError("--stop-mode must be interrupt or crash")
    model_config(cfg)  # validates architecture / grid
    return cfg


# Options added after runs were saved whose default differs from what those runs did: a
# saved configuration without them gets the value it trained with.
SAVED_BEFORE = {"resize_interpolation": "bilinear"}


def saved_config(cfg: dict) -> dict:
    """A run's saved configuration (config.json, a checkpoint's) with the options it predates."""
    return {**SAVED_BEFORE, **cfg}


# With --standardize-histograms: the mean landmarks of the run's training subjects, written
# once when the run starts (so that a resumed run, its export and its card use the same).
LANDMARKS_FILE = "histogram_landmarks.json"


def preprocessing_config(cfg: dict, run_dir=None) -> PreprocessingConfig:
    """The preprocessing a run trains with, stored in its bundle (with the run's histogram
    landmarks when it standardises and ``run_dir`` holds them)."""
    landmarks = None
    if cfg.get("standardize_histograms") and run_dir is not None and (Path(run_dir) / LANDMARKS_FILE).is_file():
        landmarks = json.loads((Path(run_dir) / LANDMARKS_FILE).read_text())
    return PreprocessingConfig(intensity_reference=cfg["intensity_reference"],
                               resize_interpolation=cfg["resize_interpolation"],
                               min_field_of_view_mm=float(cfg.get("field_of_view_mm", DEFAULTS["field_of_view_mm"])),
                               histogram_landmarks=landmarks)


def model_config(cfg: dict) -> ModelConfig:
    try:
        return ModelConfig(architecture=cfg["architecture"], num_sources=len(cfg["sources"].split(",")),
                           base_width=cfg["width"], laf_grid=cfg["laf_grid"],
                           specific_encoder=not cfg["no_specific_encoder"], adain_scale=cfg["adain_scale"],
                           context_slices=cfg["context_slices"])
    except ValueError as exc:
        raise InputError(str(exc)) from None


def lr_factor(epoch: int, epochs_constant: int, epochs_decay: int) -> float:
    """The one learning-rate schedule (pix2pix "linear"): 1 for the first epochs_constant
    epochs (0-based ``epoch``), then linearly towards 0 over epochs_decay epochs."""
    if epoch < epochs_constant:
        return 1.0
    return max(0.0, 1.0 - (epoch - epochs_constant + 1) / (epochs_decay + 1))


@dataclass(frozen=True)
class Objective:
    """The weights of G's objective (module docstring), from a run's options: the paper's
    L1 terms, plus the recipe options of ``training/recipe.py`` (all neutral by default)."""

    l1_reduction: str = "mean"
    lambda1: float = DEFAULT_LAMBDA["mean"]
    lambda2: float = DEFAULT_LAMBDA["mean"]
    background_weight: float = 1.0
    gdl_weight: float = 0.0
    gan_weight: float = 1.0
    fm_weight: float = 0.0
    lesion_weight: float = 1.0

    @classmethod
    def from_config(cls, cfg: dict) -> "Objective":
        return cls(cfg["l1_reduction"], cfg["lambda1"], cfg["lambda2"], cfg["background_weight"],
                   cfg["gdl_weight"], cfg["gan_weight"], cfg["fm_weight"], cfg.get("lesion_weight", 1.0))

    @property
    def uses_lesions(self) -> bool:
        return self.lesion_weight != 1.0


def train_step(G, D, D_plain, opt_G, opt_D, x, y, brain, autocast, objective: Objective, update_G: bool = True):
    """One training iteration, D then G (the objective in the module docstring): the one
    step that the training loop and ``python -m training bench`` run. ``brain`` (B, 1, H, W)
    marks brain pixels for the background-weighted L1; a second channel, where given, marks
    lesion pixels for ``objective.lesion_weight``. ``D`` may be wrapped in DDP;
    ``D_plain`` is the bare D, called in the G update so that D's weights get no gradient
    there. ``autocast()`` returns the precision context. ``update_G=False`` trains D only
    (G's losses are still computed, for the log). Returns the losses as tensors, in LOSS_KEYS
    order."""
    bce = torch.nn.BCEWithLogitsLoss()
    with autocast(), torch.set_grad_enabled(update_G):
        out = G(x)
    fake = out.synthetic
    # D: real pairs -> 1, synthetic pairs -> 0 (pix2pix's 0.5 factor).
    for p in D_plain.parameters():
        p.requires_grad_(True)
    opt_D.zero_grad(set_to_none=True)
    with autocast():
        pred_fake = D(x, fake.detach())
        pred_real = D(x, y)
        loss_D = 0.5 * (bce(pred_fake.float(), torch.zeros_like(pred_fake, dtype=torch.float32))
                        + bce(pred_real.float(), torch.ones_like(pred_real, dtype=torch.float32)))
    loss_D.backward()
    opt_D.step()
    # G: fool D, plus L1 on the synthetic image and on the LAF pseudo-target.
    for p in D_plain.parameters():
        p.requires_grad_(False)
    opt_G.zero_grad(set_to_none=True)
    o = objective
    with autocast(), torch.set_grad_enabled(update_G):
        if o.fm_weight:
            pred, fake_features = D_plain.forward_with_features(x, fake)
            with torch.no_grad():
                _, real_features = D_plain.forward_with_features(x, y)
        else:
            pred = D_plain(x, fake)
        loss_gan = bce(pred.float(), torch.ones_like(pred, dtype=torch.float32))
    lesion = brain[:, 1:2] if brain.shape[1] > 1 else None
    brain = brain[:, :1]
    loss_l1 = recipe.weighted_l1(fake, y, brain, o.background_weight, o.l1_reduction, lesion, o.lesion_weight)
    loss_pseudo = (recipe.weighted_l1(out.pseudo_target, y, brain, o.background_weight, o.l1_reduction,
                                      lesion, o.lesion_weight)
                   if out.pseudo_target is not None else torch.zeros((), device=x.device))
    loss_G = o.gan_weight * loss_gan + o.lambda1 * loss_l1 + o.lambda2 * loss_pseudo
    if o.gdl_weight:
        loss_G = loss_G + o.gdl_weight * recipe.gradient_difference(fake, y)
    if o.fm_weight:
        loss_G = loss_G + o.fm_weight * recipe.feature_matching(fake_features, real_features)
    if update_G:
        loss_G.backward()
        opt_G.step()
    return loss_D, loss_G, loss_gan, loss_l1, loss_pseudo


def require_compiler(device: torch.device) -> None:
    """``--compile`` builds C++ kernels for the CPU during the first steps, after the data is
    prepared: check for a compiler at the start instead."""
    if device.type != "cpu":
        return
    from torch._inductor import cpp_builder, exc
    try:
        cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        raise InputError("--compile: torch.compile needs a C++ compiler for the CPU (g++ or clang++, or one named by "
                         "the CXX environment variable) and none was found; train without --compile") from None


def device_description(device: torch.device, world: int = 1) -> str:
    """What an epoch ran on, for the model card: GPU name, or CPU model and thread count."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
        except OSError:
            pass
        name = f"{name}, {torch.get_num_threads()} thread(s)"
    return f"{device.type} x{world}: {name}"


def git_commit() -> Optional[str]:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "training", "MRISynthesisLib"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def rng_state() -> dict:
    import random

    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import random

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Distributed:
    """World size, rank and device; a process group only when torchrun started >1 process."""

    def __init__(self, device_request: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = resolve_device(device_request)
        if device.type == "cuda":
            device = torch.device("cuda", self.local_rank % max(1, torch.cuda.device_count()))
            torch.cuda.set_device(device)
        self.device = device
        self.active = self.world > 1
        if self.active and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.active:
            dist.barrier()

    def all_sum(self, values):
        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        if self.active:
            dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        if not self.active:
            return flag
        return self.all_sum([1.0 if flag else 0.0])[0] > 0

    def gather(self, obj):
        if not self.active:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def run_on_main(self, fn):
        """Run ``fn`` on rank 0 while the others wait; an error there is raised on every rank
        (instead of leaving the others at a barrier)."""
        error = None
        if self.main:
            try:
                fn()
            except Exception as exc:  # re-raised below, on rank 0 as it was
                error = exc
        if self.any(error is not None):
            raise error if error is not None else InputError("rank 0 failed (see its message); stopping")
        self.barrier()

    def close(self):
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


class Run:
    """Everything about one training run folder."""

    def __init__(self, cfg: dict, dist_: Distributed):
        self.cfg, self.dist = cfg, dist_
        self.dir = Path(cfg["out"])
        self.sources = cfg["sources"].split(",")
        self.target = cfg["target"]
        self.modalities = self.sources + [self.target]
        self.preprocessing = preprocessing_config(cfg, self.dir)
        self.log_file = self.dir / "train.log"

    def log(self, message: str) -> None:
        if not self.dist.main:
            return
        print(message, file=sys.stderr, flush=True)
        with open(self.log_file, "a") as f:
            f.write(message + "\n")

    # ------------------------------------------------------------------ data

    def prepare_data(self):
        cfg = self.cfg
        cache_dir = Path(cfg["cache_dir"]) if cfg["cache_dir"] else self.dir / "cache"
        subjects = data_mod.discover(cfg["data"])
        if cfg["subjects"]:
            wanted = [s.strip() for s in cfg["subjects"].split(",") if s.strip()]
            names = {s.name for s in subjects}
            unknown = [w for w in wanted if w not in names]
            if unknown:
                raise InputError(f"--subjects: not found in {cfg['data']}: {', '.join(unknown)}")
            subjects = [s for s in subjects if s.name in wanted]
        by_name = {s.name: s for s in subjects}
        split_path = self.dir / "split.json"

        def prepare():
            self.log(data_mod.availability_report(subjects, self.modalities))
            skipped = {s.name: s.missing(self.modalities) for s in subjects if s.missing(self.modalities)}
            if len(skipped) == len(subjects):
                raise InputError(f"no subject in {cfg['data']} has all of {', '.join(self.modalities)}")
            for name, missing in skipped.items():
                self.log(f"skipping {name}: lacks {', '.join(missing)} (needed for {' + '.join(self.sources)} -> {self.target})")
            if split_path.is_file() and cfg["resume"]:
                split = json.loads(split_path.read_text())
            else:
                if cfg["split"]:
                    given = json.loads(Path(cfg["split"]).read_text())
                    assignment = {k: list(given[k]) for k in ("train", "val", "test")}
                    groups = given.get("groups", [])
                    origin = data_mod.portable_path(cfg["split"])
                else:
                    groups = data_mod.parse_groups(cfg["group"], cfg["groups_file"], not cfg["no_default_groups"])
                    # "usable": only subjects with every needed modality, so that small folders still get
                    # validation/test subjects; "all": one split of the folder for every source set.
                    pool = list(by_name) if cfg["split_over"] == "all" else [n for n in by_name if n not in skipped]
                    assignment = data_mod.split_subjects(pool, cfg["seed"], cfg["val_fraction"],
                                                         cfg["test_fraction"], groups)
                    origin = (f"seeded split over {cfg['split_over']} subjects (seed {cfg['seed']}, "
                              f"val {cfg['val_fraction']}, test {cfg['test_fraction']})")
                split = {"origin": origin, "data": cfg["data"], "seed": cfg["seed"], "groups": groups,
                         "train": assignment["train"], "val": assignment["val"], "test": assignment["test"],
                         "skipped": skipped, "modalities": self.modalities}
                for part in ("train", "val", "test"):
                    split[f"{part}_usable"] = [n for n in split[part] if n in by_name and n not in skipped]
                listed = {n for part in ("train", "val", "test") for n in split[part]}
                unlisted = [n for n in by_name if n not in skipped and n not in listed]
                if unlisted:
                    self.log(f"not in the given split, so unused: {', '.join(unlisted)}")
                for part in ("val", "test"):
                    if not split[f"{part}_usable"] and cfg[f"{part}_fraction"] > 0:
                        self.log(f"warning: no {part} subject has all of {', '.join(self.modalities)}")
                if not split["train_usable"]:
                    raise InputError("no training subject has all of " + ", ".join(self.modalities))
                atomic_write_text(split_path, json.dumps(split, indent=2))
            self.log(f"split: train {split['train_usable']}, val {split['val_usable']}, test {split['test_usable']}")
            landmarks_path = self.dir / LANDMARKS_FILE
            if cfg["standardize_histograms"] and not landmarks_path.is_file():
                landmarks = data_mod.mean_histogram_landmarks([by_name[n] for n in split["train_usable"]],
                                                              self.sources, self.preprocessing)
                atomic_write_text(landmarks_path, json.dumps(landmarks, indent=2))
                self.log(f"histogram landmarks of the {len(split['train_usable'])} training subjects: {landmarks_path}")
            self.preprocessing = preprocessing_config(cfg, self.dir)
            for part in ("train", "val"):
                for name in split[f"{part}_usable"]:
                    data_mod.load_or_build(by_name[name], self.modalities, self.preprocessing,
                                           cfg["slices_per_subject"], cache_dir, self.log, cfg["context_slices"])

        self.dist.run_on_main(prepare)
        self.preprocessing = preprocessing_config(cfg, self.dir)  # every process: the landmarks main wrote
        split = json.loads(split_path.read_text())
        self.split = split
        load = lambda n: data_mod.load_or_build(by_name[n], self.modalities, self.preprocessing,  # noqa: E731
                                                cfg["slices_per_subject"], cache_dir, self.log, cfg["context_slices"])
        train = [load(n) for n in split["train_usable"]]
        if Objective.from_config(cfg).uses_lesions:
            train = [data_mod.with_lesions(t, by_name[t.name], self.preprocessing, cache_dir, self.log) for t in train]
            labelled = [t.name for t in train if t.lesion.any()]
            if not labelled:
                raise InputError("--lesion-weight: no training subject has a ground-truth lesion label "
                                 "(seg/lesion file; automatic labels do not count)")
            self.log(f"--lesion-weight {cfg['lesion_weight']}: lesion labels of {len(labelled)} of "
                     f"{len(train)} training subjects ({', '.join(labelled)})")
        self.train_data = data_mod.SliceDataset(train)
        # Validation always carries the lesion labels: every curve shows lesion figures.
        self.val_data = data_mod.SliceDataset([data_mod.with_lesions(load(n), by_name[n], self.preprocessing, cache_dir,
                                                                     self.log) for n in split["val_usable"]])
        self.log(f"{len(self.train_data)} training slices, {len(self.val_data)} validation slices")

    # ------------------------------------------------------------------ training

    def build(self):
        cfg = self.cfg
        torch.manual_seed(cfg["seed"])
        self.model_config = model_config(cfg)
        G = init_generator(build_generator(self.model_config), cfg["style_init"])
        # The discriminator is conditioned on everything the generator sees (2.5D: the neighbours too).
        D = init_weights(build_discriminator(self.model_config.input_channels, cfg["d_width"]))
        if cfg["init_from"] and not cfg["resume"]:  # a resumed run loads its own checkpoint instead
            from .warm_start import warm_start
            self.log(warm_start(G, D, cfg["init_from"], self.model_config, cfg["sources"].split(","),
                                discriminator_from=cfg["init_discriminator_from"]))
        self.layout = MEMORY_FORMATS[cfg["memory_format"]]  # of the weights here, of each batch in train()
        self.G = G.to(self.dist.device, memory_format=self.layout)
        self.D = D.to(self.dist.device, memory_format=self.layout)
        betas = (cfg["beta1"], cfg["beta2"])
        self.opt_G = torch.optim.Adam(self.G.parameters(), lr=cfg["lr"], betas=betas)
        self.opt_D = torch.optim.Adam(self.D.parameters(), lr=cfg["lr"], betas=betas)
        self.log(f"generator {self.model_config.architecture}: {count_parameters(G):,} parameters; "
                 f"discriminator: {count_parameters(D):,}")

    def wrap(self):
        if self.dist.active:
            ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
            return (DistributedDataParallel(self.G, device_ids=ids), DistributedDataParallel(self.D, device_ids=ids))
        return self.G, self.D

    def cpu_seconds(self) -> float:
        """CPU seconds this run has used, over every session it was resumed in (all threads)."""
        return self.cpu_before + time.process_time() - self.cpu_start

    def wall_seconds(self) -> float:
        return self.wall_before + time.time() - self.wall_start

    def checkpoint_state(self, epoch: int, step: int, sums, history, rng_states) -> dict:
        return {"format": "mrisynthesis-training-checkpoint", "version": 1, "config": self.cfg,
                "epoch": epoch, "step": step, "sums": list(sums), "history": history,
                "curve": self.curve, "cpu_seconds": self.cpu_seconds(), "wall_seconds": self.wall_seconds(),
                "G": self.G.state_dict(), "D": self.D.state_dict(),
                "opt_G": self.opt_G.state_dict(), "opt_D": self.opt_D.state_dict(),
                "rng": rng_states, "world": self.dist.world, "time": datetime.datetime.now().isoformat()}

    def save_checkpoint(self, state: dict) -> None:
        if self.dist.main:
            atomic_torch_save(state, self.dir / CHECKPOINT)

    def train(self) -> dict:
        cfg, dist_ = self.cfg, self.dist
        device = dist_.device
        n_epochs = cfg["epochs_constant"] + cfg["epochs_decay"]
        start_epoch, start_step, sums, history = 0, 0, [0.0] * (len(LOSS_KEYS) + 1), []
        ckpt_path = self.dir / CHECKPOINT
        self.curve, self.cpu_before, self.wall_before = [], 0.0, 0.0
        self.cpu_start, self.wall_start = time.process_time(), time.time()
        if cfg["resume"]:
            state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
            self.curve = list(state.get("curve", []))
            self.cpu_before, self.wall_before = state.get("cpu_seconds", 0.0), state.get("wall_seconds", 0.0)
            if state.get("world", 1) != dist_.world:
                self.log(f"note: resuming a run saved with {state.get('world')} processes on {dist_.world}; "
                         "the data order changes, so the weights will not equal an uninterrupted run")
            self.G.load_state_dict(state["G"])
            self.D.load_state_dict(state["D"])
            self.opt_G.load_state_dict(state["opt_G"])
            self.opt_D.load_state_dict(state["opt_D"])
            start_epoch, start_step, sums, history = state["epoch"], state["step"], state["sums"], state["history"]
            rngs = state["rng"]
            set_rng_state(rngs[dist_.rank] if dist_.rank < len(rngs) else rngs[0])
            self.log(f"resumed from {ckpt_path}: epoch {start_epoch + 1}, step {start_step}")
        G, D = self.wrap()
        D_plain = self.D  # the G step calls D without DDP: D's weights get no gradient there
        if cfg["compile"]:
            # Only the training step runs compiled (one process: train() refuses DDP); validation,
            # plots and checkpoints use the plain modules, which share the weights.
            G, D = torch.compile(G, dynamic=False), torch.compile(D, dynamic=False)
            D_plain = D
        sampler = torch.utils.data.DistributedSampler(self.train_data, num_replicas=dist_.world, rank=dist_.rank,
                                                      shuffle=True, seed=cfg["seed"], drop_last=False)
        autocast = lambda: autocast_context(device, cfg["precision"])  # noqa: E731
        objective = Objective.from_config(cfg)
        M = self.model_config.input_channels
        stop = {"flag": False}

        def on_signal(signum, frame):
            if stop["flag"]:  # a second Ctrl-C: stop now
                raise KeyboardInterrupt
            stop["flag"] = True
            self.log(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step (again to stop now)")

        old_handlers = {}
        if threading_main():
            for sig in (signal.SIGINT, signal.SIGTERM):
                old_handlers[sig] = signal.signal(sig, on_signal)
        global_step = sum(h["steps"] for h in history) + start_step
        window = []  # the training losses since the last curve point
        result = {"stopped": False}
        augment_config = recipe.AugmentConfig(max_contrast=cfg["augment_contrast"], max_blur=cfg["augment_blur"])
        try:
            for epoch in range(start_epoch, n_epochs):
                factor = lr_factor(epoch, cfg["epochs_constant"], cfg["epochs_decay"])
                for opt in (self.opt_G, self.opt_D):
                    for group in opt.param_groups:
                        group["lr"] = cfg["lr"] * factor
                sampler.set_epoch(epoch)
                order = list(sampler)
                batches = [order[i:i + cfg["batch_size"]] for i in range(0, len(order), cfg["batch_size"])]
                first = start_step if epoch == start_epoch else 0
                if first == 0:
                    sums = [0.0] * (len(LOSS_KEYS) + 1)
                t0 = time.time()
                G.train()
                D.train()
                bar = None
                if dist_.main and not cfg["no_progress"]:
                    from tqdm import tqdm

                    bar = tqdm(total=len(batches), initial=first, desc=f"epoch {epoch + 1}/{n_epochs}",
                               leave=False, dynamic_ncols=True)
                for step in range(first, len(batches)):
                    batch = self.train_data.gather(batches[step]).to(device)
                    x, y = batch[:, :M], batch[:, M:M + 1]
                    # The brain mask, then the lesion map where the objective weights lesions: moved alike by augment.
                    masks = [self.train_data.masks(batches[step])]
                    if objective.uses_lesions:
                        masks.append(self.train_data.lesions(batches[step]))
                    masks = torch.from_numpy(np.stack(masks, axis=1)).to(device)
                    if cfg["augment"]:
                        x, y, masks = recipe.augment(x, y, masks, recipe.augment_generator(cfg["seed"], epoch, step),
                                                     augment_config, slices_per_source=self.model_config.slices_per_source)
                    x, y, masks = (t.contiguous(memory_format=self.layout) for t in (x, y, masks))
                    values = train_step(G, D, D_plain, self.opt_G, self.opt_D, x, y, masks, autocast, objective,
                                        update_G=global_step >= cfg["d_warmup_steps"])
                    loss_D, loss_G = values[0], values[1]
                    n = len(batches[step])
                    for i, v in enumerate(values):
                        sums[i] += float(v.detach()) * n
                    sums[-1] += n
                    global_step += 1
                    window.append([float(v.detach()) for v in values])
                    if cfg["val_every"] and global_step % cfg["val_every"] == 0:
                        if dist_.main:
                            self.curve_point(global_step, epoch + (step + 1) / len(batches), cfg["lr"] * factor,
                                             window)
                        window = []
                        if step + 1 < len(batches):
                            # With each curve point a mid-epoch checkpoint: a killed run loses at most
                            # val_every steps (an epoch of all slices is 30-45 min on one CPU thread).
                            rngs = dist_.gather(rng_state())
                            self.save_checkpoint(self.checkpoint_state(epoch, step + 1, sums, history, rngs))
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(D=f"{float(loss_D.detach()):.3f}", G=f"{float(loss_G.detach()):.3f}")
                    debug_stop = cfg["stop_after_steps"] is not None and global_step >= cfg["stop_after_steps"]
                    if debug_stop and cfg["stop_mode"] == "crash":
                        if bar is not None:
                            bar.close()
                        raise StopTraining(f"--stop-after-steps {cfg['stop_after_steps']}: simulated kill")
                    if dist_.any(stop["flag"] or debug_stop) and step + 1 < len(batches):
                        if bar is not None:
                            bar.close()
                        rngs = dist_.gather(rng_state())
                        self.save_checkpoint(self.checkpoint_state(epoch, step + 1, sums, history, rngs))
                        self.log(f"stopped in epoch {epoch + 1} after step {step + 1}/{len(batches)}; "
                                 f"checkpoint {ckpt_path}; continue with --resume")
                        result["stopped"] = True
                        return result
                if bar is not None:
                    bar.close()
                totals = dist_.all_sum(sums)
                row = {"epoch": epoch + 1, "lr": cfg["lr"] * factor, "steps": len(batches),
                       "device": device_description(device, dist_.world)}
                row.update({k: totals[i] / max(totals[-1], 1) for i, k in enumerate(LOSS_KEYS)})
                rngs = dist_.gather(rng_state())
                if dist_.main:
                    row.update(self.validate())
                    row["seconds"] = round(time.time() - t0, 2)
                history = history + [row]
                self.save_checkpoint(self.checkpoint_state(epoch + 1, 0, [0.0] * len(sums), history, rngs))
                if dist_.main:
                    self.write_log(history)
                    self.log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
                    self.plot(history)
                if stop["flag"] or (cfg["stop_after_steps"] is not None and global_step >= cfg["stop_after_steps"]):
                    self.log(f"stopped after epoch {epoch + 1}; checkpoint {ckpt_path}; continue with --resume")
                    result["stopped"] = True
                    return result
            self.check_replicas()
            if dist_.main:
                result["bundle"] = str(self.export(self.dir / "model.safetensors", history))
            result["history"] = history
            return result
        finally:
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)

    def check_replicas(self) -> None:
        """Under DDP every rank must hold the same weights; fail loudly if not. Buffers
        (BatchNorm running statistics) are rank 0's by DDP's convention: copy them over."""
        if not self.dist.active:
            return
        for net in (self.G, self.D):
            for buf in net.buffers():
                dist.broadcast(buf.data, 0)
        for name, p in list(self.G.named_parameters()) + list(self.D.named_parameters()):
            ref = p.detach().clone()
            dist.broadcast(ref, 0)
            if not torch.equal(ref, p.detach()):
                raise RuntimeError(f"rank {self.dist.rank}: parameter {name} differs from rank 0 after training")

    # ------------------------------------------------------------------ outputs

    def predict(self, x: torch.Tensor):
        self.G.eval()
        try:
            with torch.no_grad(), autocast_context(self.dist.device, self.cfg["precision"]):
                out = self.G(x.to(self.dist.device))
            pseudo = None if out.pseudo_target is None else out.pseudo_target.float().cpu()
            return out.synthetic.float().cpu(), pseudo
        finally:
            self.G.train()

    def validate(self) -> dict:
        """The validation figures (VAL_METRICS: PSNR/SSIM/NRMSE whole and masked, scale-free
        brain PSNR, sharpness, GMSD; lesion conspicuity and PSNR over the labelled subjects) on
        the validation slices (256x256, output units)."""
        data = self.val_data
        if len(data) == 0:
            return {}
        indices = np.arange(len(data))
        if self.cfg["max_val_slices"] and len(indices) > self.cfg["max_val_slices"]:
            indices = np.linspace(0, len(data) - 1, self.cfg["max_val_slices"]).round().astype(int)
        M = self.model_config.input_channels
        per_subject = {}
        for start in range(0, len(indices), 8):
            chunk = indices[start:start + 8]
            batch = data.gather(chunk)
            fake, _ = self.predict(batch[:, :M])
            real = to_output_scale(batch[:, M].numpy(), self.preprocessing)
            fake = to_output_scale(fake[:, 0].clamp(-1, 1).numpy(), self.preprocessing)
            masks, lesions = data.masks(chunk), data.lesions(chunk)
            for i, idx in enumerate(chunk):
                entry = per_subject.setdefault(int(data.index[idx][0]), ([], [], [], []))
                for part, value in zip(entry, (real[i], fake[i], masks[i], lesions[i])):
                    part.append(value)
        subjects = []
        for real, fake, masks, lesions in per_subject.values():
            try:
                figures = subject_metrics(real, fake, masks)
            except ValueError:
                continue
            figures.update(lesion_metrics(np.stack(real), np.stack(fake), np.stack(lesions), np.stack(masks)))
            subjects.append(figures)
        agg = aggregate(subjects)
        return {f"val_{k}": agg[k]["mean"] for k in VAL_METRICS if k in agg}

    def curve_point(self, step: int, epoch: float, lr: float, window) -> None:
        """One point of the learning curve: validation figures at ``step``, against the CPU
        hours spent so far, with the mean training losses since the previous point; the
        synthetic images of the fixed sample slices are kept for the curve figure."""
        row = {"step": step, "epoch": round(epoch, 4), "cpu_hours": self.cpu_seconds() / 3600,
               "wall_hours": self.wall_seconds() / 3600, "lr": lr}
        if window:
            means = np.mean(np.asarray(window, dtype=np.float64), axis=0)
            row.update({k: float(means[i]) for i, k in enumerate(LOSS_KEYS)})
        row.update(self.validate())
        self.curve.append(row)
        self.write_curve()
        data, picks = self.sample_picks()
        if picks:
            fake, _ = self.predict(data.gather(picks)[:, :self.model_config.input_channels])
            folder = self.dir / "curve_samples"
            folder.mkdir(exist_ok=True)
            np.save(folder / f"step_{step:07d}.npy", fake[:, 0].numpy().astype(np.float16))
            self.plot_curve()
        self.log("curve " + " ".join(f"{k}={row[k]:.4g}" if isinstance(row[k], float) else f"{k}={row[k]}"
                                     for k in CURVE_KEYS if k in row))

    def write_curve(self) -> None:
        path = self.dir / "curve.csv"
        tmp = path.with_name(f"curve.csv.tmp-{os.getpid()}")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(CURVE_KEYS) + ["loss_G_L1_pseudo"], extrasaction="ignore")
            writer.writeheader()
            for row in self.curve:
                writer.writerow({k: row.get(k, "") for k in writer.fieldnames})
        os.replace(tmp, path)
        atomic_write_text(self.dir / "curve.json", json.dumps(self.curve, indent=1))

    def plot_curve(self) -> None:
        from .plots import plot_curve, plot_curve_samples

        plot_curve(self.curve, self.dir / "curve.png")
        data, picks = self.sample_picks()
        steps = sorted(int(p.stem.split("_")[1]) for p in (self.dir / "curve_samples").glob("step_*.npy"))
        if not steps or not picks:
            return
        shown = sorted({steps[int(round(i))] for i in np.linspace(0, len(steps) - 1, min(6, len(steps)))})
        images = [np.load(self.dir / "curve_samples" / f"step_{s:07d}.npy").astype(np.float32) for s in shown]
        batch = data.gather(picks)
        names = [data.subjects[int(data.index[i][0])].name for i in picks]
        plot_curve_samples(batch[:, self.model_config.input_channels].numpy(), shown, images, names, self.target,
                           self.dir / "curve_samples.png")

    def sample_picks(self):
        """The fixed validation slices shown in the figures: the middle slice of the first
        subject and one of the last (training slices when there is no validation part)."""
        data = self.val_data if len(self.val_data) else self.train_data
        if not len(data):
            return data, []
        first, last = len(data.subjects[0].images), len(data.subjects[-1].images)
        second = len(data) - 1 - last // 2 if len(data.subjects) > 1 else first // 4
        return data, sorted({first // 2, second})

    def write_log(self, history) -> None:
        keys = ["epoch", "lr", "steps", *LOSS_KEYS, *VAL_KEYS, "seconds"]
        path = self.dir / "log.csv"
        tmp = path.with_name(f"log.csv.tmp-{os.getpid()}")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
            writer.writeheader()
            for row in history:
                writer.writerow({k: row.get(k, "") for k in keys})
        os.replace(tmp, path)
        atomic_write_text(self.dir / "log.json", json.dumps(history, indent=1))

    def plot(self, history) -> None:
        from .plots import plot_losses, plot_samples

        plot_losses(history, self.dir / "loss_curve.png")
        data, picks = self.sample_picks()
        if picks:
            batch = data.gather(picks)
            M = self.model_config.input_channels
            fake, pseudo = self.predict(batch[:, :M])
            names = [data.subjects[int(data.index[i][0])].name for i in picks]
            centre = batch[:, self.model_config.centre_channels()]  # the sources' own slices
            plot_samples(centre, batch[:, M], fake[:, 0], None if pseudo is None else pseudo[:, 0],
                         self.sources, self.target, names, self.dir / "samples.png",
                         title=f"epoch {history[-1]['epoch']}")

    def provenance(self, history) -> dict:
        cfg = self.cfg
        last_val = {k: history[-1][k] for k in VAL_KEYS if history and k in history[-1]}
        return {
            "trained_by": "python -m training train",
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "data": data_mod.portable_path(cfg["data"]),
            "split": {part: self.split.get(f"{part}_usable", []) for part in ("train", "val", "test")},
            "epochs": len(history),
            "epochs_planned": cfg["epochs_constant"] + cfg["epochs_decay"],
            "options": data_mod.portable_options({k: v for k, v in cfg.items()
                                                  if k not in ("resume", "no_progress", "stop_after_steps", "stop_mode")}),
            "loss": {"l1_reduction": cfg["l1_reduction"], "lambda1": cfg["lambda1"], "lambda2": cfg["lambda2"],
                     "decision": L1_DECISION},
            "validation": last_val,
            "slices_per_subject": cfg["slices_per_subject"],
            "processes": self.dist.world,
            "devices": sorted({h["device"] for h in history if h.get("device")}),
            "git_commit": git_commit(),
            "torch": torch.__version__,
            "mrisynthesis": lib_version,
            "python": platform.python_version(),
        }

    def export(self, path, history, half_precision: bool = False, extra_provenance: Optional[dict] = None) -> Path:
        bundle = bundle_from_generator(self.G, self.model_config, self.sources, self.target,
                                       self.preprocessing, {**self.provenance(history), **(extra_provenance or {})})
        save_bundle(bundle, path, half_precision=half_precision)
        self.log(f"model bundle: {path}")
        return Path(path)


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def train(given: dict) -> dict:
    """Run (or resume) training with options ``given`` (argparse names); returns a summary
    with "stopped" and, when finished, "bundle" (the exported model) and "history"."""
    out = Path(given["out"]).resolve()
    if given.get("resume"):
        cfg_path = out / "config.json"
        if not (out / CHECKPOINT).is_file() or not cfg_path.is_file():
            raise InputError(f"--resume: no checkpoint in {out}")
        saved = saved_config(json.loads(cfg_path.read_text()))
        explicit = {k: v for k, v in given.items() if k not in ("out",)}
        merged = dict(saved)
        requested = resolve_config({**saved, **explicit})
        conflicts = sorted(k for k in explicit if k not in RESUME_OVERRIDABLE and requested.get(k) != saved.get(k))
        if conflicts:
            raise InputError(f"--resume: options differ from the saved run ({', '.join(conflicts)}); "
                             f"the run was started with {', '.join(f'{k}={saved.get(k)!r}' for k in conflicts)}")
        # Overridable options take the new value when given; debug stops never carry over.
        merged.update({k: requested[k] for k in RESUME_OVERRIDABLE if k in explicit})
        if {"epochs", "epochs_constant", "epochs_decay"} & set(explicit):
            merged.update(epochs_constant=requested["epochs_constant"], epochs_decay=requested["epochs_decay"])
        for k in ("stop_after_steps", "stop_mode", "no_progress"):
            merged[k] = requested[k] if k in explicit else DEFAULTS[k]
        cfg = resolve_config({**merged, "resume": True, "epochs": None})
    else:
        cfg = resolve_config(given)
    dist_ = Distributed(cfg["device"])
    try:
        if cfg["compile"]:
            if dist_.active:
                raise InputError("--compile runs in one process only; under torchrun train without it")
            require_compiler(dist_.device)
        if cfg["num_threads"]:
            torch.set_num_threads(int(cfg["num_threads"]))
        run_dir = Path(cfg["out"])

        def start():
            if not cfg["resume"] and (run_dir / CHECKPOINT).exists():
                raise InputError(f"{run_dir} already holds a training run; continue it with --resume or choose "
                                 "another --out")
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run_dir / "config.json", json.dumps(cfg, indent=2, sort_keys=True))

        dist_.run_on_main(start)
        run = Run(cfg, dist_)
        run.log(f"training {cfg['architecture']} {cfg['sources'].replace(',', ' + ')} -> {cfg['target']} "
                f"in {run_dir} on {dist_.device} x{dist_.world} ({cfg['precision']}); loss: {L1_DECISION}")
        run.prepare_data()
        run.build()
        return run.train()
    finally:
        dist_.close()


def export_run(run_dir, out, half_precision: bool = False, checkpoint=None,
               extra_provenance: Optional[dict] = None, standardize_histograms: bool = False,
               data=None) -> Path:
    """Export a bundle from a run's (latest or given) checkpoint; ``extra_provenance``
    (e.g. the model card and held-out evaluation) is added to the bundle's provenance.
    ``standardize_histograms``: the bundle standardises each source's histogram onto the
    mean landmarks of the run's training subjects, read from ``data`` (default: the run's
    data folders)."""
    run_dir = Path(run_dir).resolve()
    ckpt = Path(checkpoint) if checkpoint else run_dir / CHECKPOINT
    if not ckpt.is_file():
        raise InputError(f"no checkpoint found: {ckpt}")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    if state.get("format") != "mrisynthesis-training-checkpoint":
        raise InputError(f"{ckpt} is not a training checkpoint of this package")
    cfg = saved_config(state["config"])
    dist_ = Distributed("cpu") if int(os.environ.get("WORLD_SIZE", "1")) == 1 else None
    if dist_ is None:
        raise InputError("export runs in a single process; do not start it under torchrun")
    run = Run(cfg, dist_)
    # This folder, wherever it trained (cfg["out"] names the folder it was started in).
    run.dir, run.log_file = run_dir, run_dir / "train.log"
    run.preprocessing = preprocessing_config(cfg, run_dir)
    split_path = run_dir / "split.json"
    run.split = json.loads(split_path.read_text()) if split_path.is_file() else {}
    run.model_config = model_config(cfg)
    run.G = build_generator(run.model_config)
    run.G.load_state_dict(state["G"])
    history = state["history"]
    if state["step"]:
        print(f"note: {ckpt} was saved mid-epoch ({state['step']} steps into epoch {state['epoch'] + 1})",
              file=sys.stderr)
    extra_provenance = dict(extra_provenance or {})
    if cfg["standardize_histograms"]:
        if run.preprocessing.histogram_landmarks is None:
            raise InputError(f"{run_dir}: trained with --standardize-histograms but {LANDMARKS_FILE} is missing")
        if standardize_histograms:
            raise InputError("--standardize-histograms: this run trained on standardised inputs, so its bundle "
                             f"standardises already (with {LANDMARKS_FILE} of the run)")
    elif standardize_histograms:
        names = run.split.get("train_usable", run.split.get("train"))
        if not names:
            raise InputError(f"{run_dir}: no split.json with training subjects to take histogram landmarks from")
        by_name = {s.name: s for s in data_mod.discover(data or cfg["data"])}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise InputError(f"training subjects not found in {data or cfg['data']}: {', '.join(missing)}")
        landmarks = data_mod.mean_histogram_landmarks([by_name[n] for n in names], run.sources, run.preprocessing)
        run.preprocessing = dataclasses.replace(run.preprocessing, histogram_landmarks=landmarks)
        extra_provenance["histogram_landmarks_from"] = (
            f"the mean of the {len(names)} training subjects' brain histograms; the network itself was trained "
            "on unstandardised inputs")
    return run.export(out, history, half_precision=half_precision, extra_provenance=extra_provenance)
