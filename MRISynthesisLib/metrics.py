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

Blur-sensitive figures (brain PSNR hardly sees blur once intensity errors dominate):
- sharpness = mean in-plane gradient magnitude of the synthetic image inside the brain
  eroded in-plane by ``SHARPNESS_EROSION`` voxels, over the same for the real image, each
  subject's volume first mapped to its own 0.5-99.5th brain percentiles (1 = as sharp,
  < 1 = blurred, > 1 = noisier; issue 20's definition);
- median-scaled sharpness (``sharpness_median``): the same ratio with each volume scaled by
  its brain's median minus its 0.5th percentile instead. Where lesions fill more than 0.5 %
  of the brain, the 99.5th percentile is lesion brightness, so the percentile scaling makes
  sharpness fall when a model draws a lesion brighter and rise when a real lesion is
  brighter; the brain median is the normal tissue's, as in the models' intensity reference;
- spectral power ratios (``spectral_ratios``): on square crops inside the brain of each
  slice, the in-plane power spectrum of the synthetic image over the real one's, summed per
  band of spatial frequency (cycles per pixel): ``spectrum_low`` (below 0.1), ``spectrum_mid``
  (0.1-0.3), ``spectrum_high`` (0.3-0.5) and ``spectrum_checkerboard`` (both frequencies at
  least 0.45: the period-2 pattern of strided transposed convolutions). 1 = as much detail at
  that scale as the real image; sharpness can be high from mid frequencies or from a
  checkerboard, which these tell apart;
- GMSD (Xue et al. 2014; piq's ``gmsd``: 2x2 average-pooled, Prewitt gradients, constant
  170/255^2, images scaled by the real subject's maximum); ``gmsd_masked`` is the deviation
  over the (pooled) brain pixels only; lower = more similar edges;
- scale-free brain PSNR: brain PSNR after mapping the synthetic image onto the real one by
  the least-squares line fitted over the subject's brain voxels, so the choice of intensity
  scale does not count.

A failure the averages hide (a T1-only model once rendered whole frontal lobes black):
- blanked brain = the percentage of a subject's brain voxels where the real image is above
  ``BLANK_REAL`` of its 0.5-99.5th brain-percentile range and the synthetic one below
  ``BLANK_SYNTHETIC`` of that same range: tissue drawn as if it were background or CSF.

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
    """Mean of the per-slice metrics over one subject's slices (first axis = slice), with
    GMSD per slice and, given masks, sharpness, blanked brain and scale-free brain PSNR
    over the subject."""
    masks = [None] * len(real_slices) if masks is None else masks
    kept = [i for i, r in enumerate(real_slices) if np.any(np.asarray(r))]
    if not kept:
        raise ValueError("no slice with signal to evaluate")
    reals = np.stack([np.asarray(real_slices[i], dtype=np.float64) for i in kept])
    fakes = np.stack([np.asarray(fake_slices[i], dtype=np.float64) for i in kept])
    brains = None if masks[0] is None else np.stack([np.asarray(masks[i], dtype=bool) for i in kept])
    per_slice = [slice_metrics(reals[j], fakes[j], None if brains is None else brains[j]) for j in range(len(kept))]
    data_range = float(reals.max()) or 1.0
    for j, entry in enumerate(per_slice):
        mask = None if brains is None else brains[j]
        entry.update(gmsd_pair(reals[j], fakes[j], data_range, mask))
    if brains is not None and brains.any():
        a, b = scale_free_fit(reals, fakes, brains)
        mapped = a * fakes + b
        for j, entry in enumerate(per_slice):
            if brains[j].any():
                entry["psnr_masked_scale_free"] = psnr(reals[j], mapped[j], brains[j])
    keys = sorted(set().union(*per_slice))
    result = {}
    for key in keys:
        values = np.array([s[key] for s in per_slice if key in s], dtype=np.float64)
        finite = values[np.isfinite(values)]
        result[key] = float(finite.mean()) if finite.size else math.inf
    result["num_slices"] = len(per_slice)
    if brains is not None:
        by_scale = sharpness_by_scale(reals, fakes, brains)
        result["sharpness"], result["sharpness_median"] = by_scale["percentile"], by_scale["median"]
        result.update(spectral_ratios(reals, fakes, brains))
        result["blanked_brain"] = blanked_brain(reals, fakes, brains)
    return result


SHARPNESS_EROSION = 3
GMSD_CONSTANT = 170.0 / 255.0 ** 2
_PREWITT = np.array([[-1.0, 0.0, 1.0]] * 3) / 3.0


BLANK_REAL = 0.2
BLANK_SYNTHETIC = 0.05


def blanked_brain(real, fake, brain) -> float:
    """Percentage of ``brain`` where ``real`` is tissue (above BLANK_REAL of its robust brain
    range) and ``fake`` (same units) is black (below BLANK_SYNTHETIC of that range); NaN
    without brain."""
    real, fake, brain = np.asarray(real, dtype=np.float64), np.asarray(fake, dtype=np.float64), np.asarray(brain, bool)
    if not brain.any():
        return math.nan
    lo, hi = np.percentile(real[brain], [0.5, 99.5])
    span = hi - lo if hi > lo else 1.0
    blank = brain & (real > lo + BLANK_REAL * span) & (fake < lo + BLANK_SYNTHETIC * span)
    return float(100.0 * blank.sum() / brain.sum())


def inplane_gradient_magnitude(slices: np.ndarray) -> np.ndarray:
    """|grad| of each 2D slice (first axis = slice), central differences in-plane."""
    gx, gy = np.gradient(np.asarray(slices, dtype=np.float64), axis=(1, 2))
    return np.hypot(gx, gy)


# Each volume's sharpness scale: its brain span from the 0.5th percentile up to this one.
SHARPNESS_LOW_PERCENTILE = 0.5
SHARPNESS_SCALES = {"percentile": 99.5, "median": 50.0}


def sharpness_by_scale(real_slices, fake_slices, brain_slices, scales=tuple(SHARPNESS_SCALES),
                       erosion: int = SHARPNESS_EROSION) -> dict:
    """{scale: sharpness} for each of ``scales`` (see ``sharpness``). A scale divides a volume's
    gradients by one number, so the erosion and the gradients are computed once for all."""
    unknown = [scale for scale in scales if scale not in SHARPNESS_SCALES]
    if unknown:
        raise ValueError(f"unknown sharpness scale {unknown[0]!r}; choose from {', '.join(SHARPNESS_SCALES)}")
    from scipy.ndimage import binary_erosion
    from skimage.morphology import disk

    undefined = {scale: math.nan for scale in scales}
    real = np.asarray(real_slices, dtype=np.float64)
    fake = np.asarray(fake_slices, dtype=np.float64)
    brain = np.asarray(brain_slices, dtype=bool)
    if not brain.any():
        return undefined
    core = binary_erosion(brain, structure=disk(erosion)[None]) if erosion else brain
    if not core.any():
        return undefined
    g_real = inplane_gradient_magnitude(real)[core].mean()
    g_fake = inplane_gradient_magnitude(fake)[core].mean()
    if not g_real > 0:
        return undefined
    uppers = [SHARPNESS_SCALES[scale] for scale in scales]

    def spans(volume):
        low, *highs = np.percentile(volume[brain], [SHARPNESS_LOW_PERCENTILE, *uppers])
        return [high - low if high > low else 1.0 for high in highs]

    return {scale: float((g_fake / span_fake) / (g_real / span_real))
            for scale, span_real, span_fake in zip(scales, spans(real), spans(fake))}


def sharpness(real_slices, fake_slices, brain_slices, erosion: int = SHARPNESS_EROSION,
              scale: str = "percentile") -> float:
    """Mean in-plane gradient magnitude of the synthetic image over that of the real one,
    inside the brain eroded in-plane by ``erosion`` voxels (a disk), each volume normalised
    to its own 0.5-99.5th brain percentiles (``scale="percentile"``) or to its own 0.5th
    percentile and median (``"median"``: lesion brightness does not set the scale); NaN
    when the eroded brain is empty."""
    return sharpness_by_scale(real_slices, fake_slices, brain_slices, (scale,), erosion)[scale]


def _pool2(image: np.ndarray) -> np.ndarray:
    """piq's GMSD downsampling: zero-pad odd sizes at the end, 2x2 average, stride 2."""
    pad = max(image.shape[0] % 2, image.shape[1] % 2)
    if pad:
        image = np.pad(image, ((0, pad), (0, pad)))
    h, w = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
    return image[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))


def gms_map(real, fake, data_range: float) -> np.ndarray:
    """Gradient magnitude similarity map of GMSD (on the 2x-pooled grid)."""
    from scipy.ndimage import correlate

    maps = []
    for image in (real, fake):
        x = _pool2(np.asarray(image, dtype=np.float64) / data_range)
        gx = correlate(x, _PREWITT, mode="constant")
        gy = correlate(x, _PREWITT.T, mode="constant")
        maps.append(np.hypot(gx, gy))
    g_real, g_fake = maps
    return (2 * g_real * g_fake + GMSD_CONSTANT) / (g_real ** 2 + g_fake ** 2 + GMSD_CONSTANT)


def gmsd(real, fake, data_range: float, mask=None) -> float:
    """Gradient magnitude similarity deviation of one 2D slice (0 = same edges); with a
    mask, the deviation over the pooled pixels at least half inside it."""
    gms = gms_map(real, fake, data_range)
    if mask is None:
        return float(gms.std())
    region = _pool2(np.asarray(mask, dtype=np.float64)) >= 0.5
    return float(gms[region].std()) if region.any() else math.nan


def gmsd_pair(real, fake, data_range: float, mask=None) -> dict:
    out = {"gmsd": gmsd(real, fake, data_range)}
    if mask is not None and np.any(mask):
        out["gmsd_masked"] = gmsd(real, fake, data_range, mask)
    return out


SPECTRUM_CROP = 64  # pixels; a crop is used where at least SPECTRUM_BRAIN_FRACTION of it is brain
SPECTRUM_BRAIN_FRACTION = 0.98
SPECTRUM_BANDS = {"spectrum_low": (0.0, 0.1), "spectrum_mid": (0.1, 0.3), "spectrum_high": (0.3, 0.5)}
CHECKERBOARD_FREQUENCY = 0.45


def spectral_ratios(real_slices, fake_slices, brain_slices, size: int = SPECTRUM_CROP) -> dict:
    """Power of the synthetic image over that of the real one per band of in-plane spatial
    frequency (module docstring), from the ``size`` x ``size`` crop around each slice's brain
    centroid (first axis = slice), mean removed and Hann-windowed, where the crop is nearly all
    brain; both images in the same units. NaN values (and ``spectrum_crops`` 0) without such a crop."""
    real = np.asarray(real_slices, dtype=np.float64)
    fake = np.asarray(fake_slices, dtype=np.float64)
    brain = np.asarray(brain_slices, dtype=bool)
    window = np.outer(np.hanning(size), np.hanning(size))
    power_real = np.zeros((size, size))
    power_fake = np.zeros((size, size))
    crops = 0
    half = size // 2
    for k in range(real.shape[0]):
        if brain[k].sum() < size * size:
            continue
        cx, cy = (int(round(c.mean())) for c in np.nonzero(brain[k]))
        box = (slice(cx - half, cx - half + size), slice(cy - half, cy - half + size))
        if cx < half or cy < half or brain[k][box].shape != (size, size) \
                or brain[k][box].mean() < SPECTRUM_BRAIN_FRACTION:
            continue
        for image, power in ((real[k][box], power_real), (fake[k][box], power_fake)):
            power += np.abs(np.fft.fft2((image - image.mean()) * window)) ** 2
        crops += 1
    f = np.fft.fftfreq(size)
    fx, fy = np.meshgrid(f, f, indexing="ij")
    radius = np.hypot(fx, fy)
    regions = {name: (radius >= lo) & (radius < hi) for name, (lo, hi) in SPECTRUM_BANDS.items()}
    regions["spectrum_checkerboard"] = (np.abs(fx) >= CHECKERBOARD_FREQUENCY) & (np.abs(fy) >= CHECKERBOARD_FREQUENCY)
    out = {"spectrum_crops": crops}
    for name, region in regions.items():
        denominator = power_real[region].sum()
        out[name] = float(power_fake[region].sum() / denominator) if crops and denominator > 0 else math.nan
    return out


def scale_free_fit(real, fake, brain) -> tuple:
    """(a, b) minimising sum over brain of (a * fake + b - real)^2."""
    r = np.asarray(real, dtype=np.float64)[brain]
    f = np.asarray(fake, dtype=np.float64)[brain]
    design = np.stack([f, np.ones_like(f)], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, r, rcond=None)
    return float(a), float(b)


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
    keys = sorted({k for s in per_subject for k in s if k not in ("num_slices", "lesion_voxels", "spectrum_crops")})
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
