"""Progress figures (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path) -> None:
    path = Path(path)
    tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}{path.suffix}")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def plot_losses(history, path) -> None:
    """Per-epoch losses (left) and validation PSNR/SSIM (right)."""
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("loss_D", "loss_G_GAN", "loss_G_L1", "loss_G_L1_pseudo"):
        values = [h.get(key, np.nan) for h in history]
        if any(np.isfinite(values)) and any(v != 0 for v in values):
            ax1.plot(epochs, values, marker=".", label=key)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.set_yscale("log")
    ax1.legend()
    ax1.set_title("training losses")
    for key, axis_label in (("val_psnr", "PSNR"), ("val_psnr_masked", "PSNR (brain)")):
        values = [h.get(key, np.nan) for h in history]
        if any(np.isfinite(values)):
            ax2.plot(epochs, values, marker=".", label=axis_label)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("dB")
    ax2.set_title("validation")
    if ax2.lines:
        ax2.legend()
    fig.tight_layout()
    _save(fig, path)


def plot_samples(sources, target, synthetic, pseudo, source_names, target_name, subject_names, path, title="") -> None:
    """One row per slice: sources, real target, pseudo-target (if any), synthetic; all in [-1, 1]."""
    sources, target, synthetic = (np.asarray(a, dtype=np.float32) for a in (sources, target, synthetic))
    cols = [(f"{n}", sources[:, i]) for i, n in enumerate(source_names)] + [(f"real {target_name}", target)]
    if pseudo is not None:
        cols.append(("pseudo-target (LAF)", np.asarray(pseudo, dtype=np.float32)))
    cols.append((f"synthetic {target_name}", synthetic))
    rows = [[(name, images[r]) for name, images in cols] for r in range(len(target))]
    _slice_grid(rows, subject_names, path, panel_size=(2.6, 2.6), title=title)


def _slice_grid(rows, row_labels, path, panel_size=(2.4, 2.5), title="") -> None:
    """A grid of axial slices in [-1, 1]: ``rows`` of (column title, image); titles on the
    first row, ``row_labels`` on the first column."""
    width, height = panel_size
    fig, axes = plt.subplots(len(rows), len(rows[0]), figsize=(width * len(rows[0]), height * len(rows) + 0.4),
                             squeeze=False)
    for r, panels in enumerate(rows):
        for c, (name, image) in enumerate(panels):
            ax = axes[r, c]
            # Axial slices in RAS order (X, Y): transpose and flip so anterior is up.
            ax.imshow(np.flipud(np.asarray(image, dtype=np.float32).T), cmap="gray", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
            if c == 0:
                ax.set_ylabel(row_labels[r], fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


CURVE_PANELS = (("val_psnr_masked", "brain PSNR (dB)"), ("val_psnr_masked_scale_free", "scale-free brain PSNR (dB)"),
                ("val_sharpness", "sharpness (1 = as real)"), ("val_gmsd_masked", "brain GMSD (lower = better)"),
                ("val_ssim_masked", "brain SSIM"), ("loss_G_L1", "training L1 (since last point)"),
                ("val_lesion_conspicuity", "lesion conspicuity (1 = as real)"), ("val_psnr_lesion", "lesion PSNR (dB)"),
                ("val_spectrum_mid", "spectral power / real's (1 = as real)"), ("val_blanked_brain", "blanked brain (%)"))
# Panels that draw more than their own figure: (key, legend label or None, line style).
# Beside the percentile-scaled sharpness, the median-scaled one that lesion brightness does not
# move; the spectral bands the trainer logs (MRISynthesisLib.metrics.spectral_ratios;
# training.trainer says why not the higher ones), in cycles per pixel of the network grid.
PANEL_SERIES = {"val_sharpness": (("val_sharpness", None, "-"), ("val_sharpness_median", "median-scaled", ":")),
                "val_spectrum_mid": (("val_spectrum_low", "< 0.1 cycles/px", "-"), ("val_spectrum_mid", "0.1-0.3", "-"))}


def plot_curve(curve, path) -> None:
    """The learning curve: each validation figure against steps (CPU hours on the top axis)."""
    steps = np.array([row["step"] for row in curve], dtype=float)
    hours = np.array([row.get("cpu_hours", np.nan) for row in curve], dtype=float)
    fig, axes = plt.subplots(2, 5, figsize=(21, 7))
    for ax, (key, label) in zip(axes.ravel(), CURVE_PANELS):
        ax.set_title(label, fontsize=10)
        legends = []
        for name, legend, style in PANEL_SERIES.get(key, ((key, None, "-"),)):
            values = np.array([row.get(name, np.nan) for row in curve], dtype=float)
            if np.isfinite(values).any():  # runs from before a figure was logged have none
                ax.plot(steps, values, marker=".", ls=style, label=legend)
                legends.append(legend)
        if not ax.lines:  # a figure this run did not log (older runs, no lesion labels)
            ax.text(0.5, 0.5, "not logged in this run", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        if any(legends):
            ax.legend(fontsize=8)
        if key in ("val_sharpness", "val_lesion_conspicuity", "val_spectrum_mid"):
            ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("step")
        if len(steps) > 1 and np.all(np.isfinite(hours)) and hours[-1] > hours[0]:
            top = ax.secondary_xaxis("top", functions=(lambda s: np.interp(s, steps, hours),
                                                      lambda h: np.interp(h, hours, steps)))
            top.set_xlabel("CPU hours", fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def plot_curve_samples(real, steps, images, subject_names, target_name, path) -> None:
    """Validation slices at a few steps: one row per slice, the real target then the synthetic
    image at each step (all in [-1, 1])."""
    rows = [[(f"real {target_name}", real[r])] + [(f"step {s}", im[r]) for s, im in zip(steps, images)]
            for r in range(len(real))]
    _slice_grid(rows, subject_names, path)
