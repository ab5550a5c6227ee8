"""Image-quality metrics of the paper (Eqs. 6-8), whole-slice and brain-masked.

- PSNR = 10 log10(MAX^2 / MSE), MAX = the maximum intensity of the real image (of the
  region: the whole slice, or the voxels inside the mask).
- SSIM: Wang et al. 2004 via scikit-image, 7x7 uniform window, K1 = 0.01, K2 = 0.03,
  data_range = max - min of the real slice. Masked SSIM is the mean of the SSIM map
  over the mask voxels.
- NRMSE = sqrt(sum (Y - Y')^2 / sum Y^2), over the slice or the mask.

Lesion figures (FLAIR is read for its lesions), over a subject's lesion voxels pooled:
- lesion contrast C = (mean(lesion) - mean(normal brain)) / mean(normal brain), with
  normal brain = brain minus the lesion dilated by ``LESION_MARGIN`` voxels in-plane
  (partial-volume rim left out);
- relative conspicuity = C(synthetic) / C(real): 1 = the lesion stands out as much as in
  the real scan, < 1 = washed out; undefined (NaN) when the real lesion is not
  hyperintense (C(real) < ``MIN_REAL_CONTRAST``);
- lesion PSNR: PSNR over the lesion voxels (MAX = the real maximum there).

Per-slice values are averaged per subject (``subject_metrics``), then mean +- std over
subjects (``aggregate``). Slices are compared in the same units (e.g. both normalised
with the same preprocessing); metrics are only defined where the real slice is not
all zero, other slices are skipped.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import numpy as np
from skimage.metrics import structural_similarity

SSIM_WINDOW = 7
METRIC_NAMES = ("psnr", "ssim", "nrmse")


def _region(real, fake, mask):
    real = np.asarray(real, dtype=np.float64)
    fake = np.asarray(fake, dtype=np.float64)
    if real.shape != fake.shape:
        raise ValueError(f"shape mismatch: real {real.shape} vs synthetic {fake.shape}")
    if mask is None:
        return real.ravel(), fake.ravel()
    mask = np.asarray(mask, dtype=bool)
    return real[mask], fake[mask]


def psnr(real, fake, mask=None) -> float:
    r, f = _region(real, fake, mask)
    mse = np.mean((r - f) ** 2)
    peak = r.max()
    if mse == 0:
        return math.inf
    return float(10.0 * np.log10(peak ** 2 / mse))


def nrmse(real, fake, mask=None) -> float:
    r, f = _region(real, fake, mask)
    return float(np.sqrt(np.sum((r - f) ** 2) / np.sum(r ** 2)))


def ssim(real, fake, mask=None) -> float:
    real = np.asarray(real, dtype=np.float64)
    fake = np.asarray(fake, dtype=np.float64)
    data_range = real.max() - real.min()
    if data_range == 0:
        data_range = 1.0
    value, ssim_map = structural_similarity(real, fake, win_size=SSIM_WINDOW, data_range=data_range,
                                            full=True, gaussian_weights=False)
    if mask is None:
        return float(value)
    return float(ssim_map[np.asarray(mask, dtype=bool)].mean())


def slice_metrics(real, fake, mask=None) -> dict:
    """PSNR, SSIM and NRMSE of one 2D slice, whole and (when a mask is given) masked."""
    out = {"psnr": psnr(real, fake), "ssim": ssim(real, fake), "nrmse": nrmse(real, fake)}
    if mask is not None and np.any(mask):
        out.update({"psnr_masked": psnr(real, fake, mask), "ssim_masked": ssim(real, fake, mask),
                    "nrmse_masked": nrmse(real, fake, mask)})
    return out


def subject_metrics(real_slices: Iterable, fake_slices: Iterable, masks: Optional[Iterable] = None) -> dict:
    """Mean of the per-slice metrics over one subject's slices (first axis = slice)."""
    masks = [None] * len(real_slices) if masks is None else masks
    per_slice = [slice_metrics(r, f, m) for r, f, m in zip(real_slices, fake_slices, masks)
                 if np.any(np.asarray(r))]
    if not per_slice:
        raise ValueError("no slice with signal to evaluate")
    keys = sorted(set().union(*per_slice))
    result = {}
    for key in keys:
        values = np.array([s[key] for s in per_slice if key in s], dtype=np.float64)
        finite = values[np.isfinite(values)]
        result[key] = float(finite.mean()) if finite.size else math.inf
    result["num_slices"] = len(per_slice)
    return result


LESION_MARGIN = 2
MIN_REAL_CONTRAST = 0.05


def _normal_brain(lesion: np.ndarray, brain: np.ndarray) -> np.ndarray:
    from scipy.ndimage import binary_dilation

    # In-plane dilation (axes 0, 1 = one axial slice), so thick slices are not over-grown.
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[:, :, 1] = True
    grown = binary_dilation(lesion, structure=structure, iterations=LESION_MARGIN) if lesion.ndim == 3 else \
        binary_dilation(lesion, iterations=LESION_MARGIN)
    return brain & ~grown


def lesion_contrast(image, lesion, brain) -> float:
    """(mean(lesion) - mean(normal brain)) / mean(normal brain); NaN when either is empty."""
    image = np.asarray(image, dtype=np.float64)
    lesion, brain = np.asarray(lesion, dtype=bool), np.asarray(brain, dtype=bool)
    normal = _normal_brain(lesion & brain, brain)
    if not lesion.any() or not normal.any():
        return math.nan
    background = image[normal].mean()
    if background <= 0:
        return math.nan
    return float((image[lesion].mean() - background) / background)


def lesion_metrics(real, fake, lesion, brain) -> dict:
    """Lesion contrast of the real and synthetic volume, their ratio (relative
    conspicuity) and PSNR inside the lesion; {} when there is no lesion voxel."""
    lesion = np.asarray(lesion, dtype=bool) & np.asarray(brain, dtype=bool)
    if not lesion.any():
        return {}
    c_real = lesion_contrast(real, lesion, brain)
    c_fake = lesion_contrast(fake, lesion, brain)
    ratio = c_fake / c_real if math.isfinite(c_real) and c_real >= MIN_REAL_CONTRAST else math.nan
    return {"lesion_contrast_real": c_real, "lesion_contrast_synthetic": c_fake,
            "lesion_conspicuity": ratio, "psnr_lesion": psnr(real, fake, lesion),
            "lesion_voxels": int(lesion.sum())}


def aggregate(per_subject: Iterable[dict]) -> dict:
    """{metric: {"mean", "std", "n"}} over subjects (std with ddof=1 when n > 1)."""
    per_subject = list(per_subject)
    keys = sorted({k for s in per_subject for k in s if k not in ("num_slices", "lesion_voxels")})
    out = {}
    for key in keys:
        values = np.array([s[key] for s in per_subject if key in s], dtype=np.float64)
        values = values[np.isfinite(values)]  # undefined values (e.g. no hyperintense lesion) are left out
        if values.size == 0:
            continue
        out[key] = {"mean": float(values.mean()),
                    "std": float(values.std(ddof=1)) if values.size > 1 else 0.0,
                    "n": int(values.size)}
    return out
