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
    rows = len(target)
    fig, axes = plt.subplots(rows, len(cols), figsize=(2.6 * len(cols), 2.6 * rows + 0.4), squeeze=False)
    for r in range(rows):
        for c, (name, images) in enumerate(cols):
            ax = axes[r, c]
            # Axial slices in RAS order (X, Y): transpose and flip so anterior is up.
            ax.imshow(np.flipud(images[r].T), cmap="gray", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
            if c == 0:
                ax.set_ylabel(subject_names[r], fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)
