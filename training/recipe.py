"""Training-recipe pieces beyond the paper, each off by default or reachable by an option
so that the paper's setting stays available (docs/training.md, "Recipe study"):

- ``weighted_l1``: L1 with background pixels down-weighted (``--background-weight``):
  with the paper's uniform L1 most of a slice is background that is trivially -1, so the
  brain, and in it the lesions, get a small share of the gradient. Labelled lesion pixels
  can be up-weighted too (``--lesion-weight``): they are 2-8 % of the brain but carry
  9-36 % of the error (docs/learning_curves.md, "Where the error lies").
- ``gradient_difference``: the gradient-difference loss (Mathieu et al. 2016), the
  paper's named future work for sharper tumour borders (``--gdl-weight``).
- ``feature_matching``: pix2pixHD's discriminator feature-matching loss (Wang et al. 2018):
  L1 between D's features of the real and of the synthetic pair, layer by layer
  (``--fm-weight``); it rewards the local statistics D sees (texture, edges) rather than one
  "real or not" bit, and trains stably beside a strong L1.
- ``augment``: random left-right flips, small rotations and scalings (one geometric
  transform per slice, applied to sources, target and mask alike) and per-source
  intensity jitter (gamma, a smooth multiplicative bias field, scale) on the sources only
  (``--augment``). ``--augment-contrast C`` adds a tissue-contrast jitter: a power law
  anchored at black and at the slice's brain median, exponent in [exp(-C), exp(C)], which
  squeezes or spreads normal tissue around the median while the darkest voxels stay at -1.
  Old scanners (BraTS 2013) give T1s whose grey/white contrast is about half the usual
  after the median window; a T1-only model trained without this rendered whole lobes of
  such scans black (docs/learning_curves.md, "T1: black regions"). ``--augment-blur S``
  blurs each source in-plane by a Gaussian of sigma in [0, S] voxels, inside the brain only
  (normalised convolution, so the brain's rim does not darken): the model told tissue from
  CSF by texture, so smooth, low-resolution T1s came out with tissue drawn black. Neither
  removed that failure (it moved between checkpoints); the histogram standardisation of the
  inputs did (``--standardize-histograms``, MRISynthesisLib/preprocessing.py). Random
  numbers come from a generator seeded by (seed, epoch, step), so a resumed run sees the
  same augmentation as an uninterrupted one.

Augmentation is written here with ``torch.nn.functional.affine_grid``/``grid_sample``
rather than taken from torchvision/MONAI: torchvision's PyPI wheels are built against the
CUDA torch (the project pins the CPU wheel), MONAI's random transforms keep their own
NumPy random state, which the bit-exact resume would have to save separately, and both
work per sample where this works on the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

BACKGROUND = -1.0  # value of background pixels after normalisation


def weighted_l1(prediction: torch.Tensor, target: torch.Tensor, brain: torch.Tensor, background_weight: float,
                reduction: str = "mean", lesion: torch.Tensor = None, lesion_weight: float = 1.0) -> torch.Tensor:
    """L1 with weight 1 inside ``brain`` (B, 1, H, W; bool or 0/1), ``background_weight``
    outside and ``lesion_weight`` on ``lesion`` pixels (B, 1, H, W, or None), normalised by
    the weight sum ("mean") or summed per image ("sum")."""
    diff = (prediction.float() - target.float()).abs()
    if background_weight == 1.0:
        weights = torch.ones_like(diff)
    else:
        weights = torch.where(brain.bool(), 1.0, float(background_weight)).to(diff.dtype).expand_as(diff)
    if lesion is not None and lesion_weight != 1.0:
        weights = torch.where(lesion.bool(), float(lesion_weight), weights).to(diff.dtype).expand_as(diff)
    if reduction == "mean":
        return (diff * weights).sum() / weights.sum().clamp_min(1e-8)
    return (diff * weights).flatten(1).sum(1).mean()


def gradient_difference(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean | |d pred| - |d target| | over horizontal and vertical finite differences."""
    p, t = prediction.float(), target.float()
    dx = ((p[..., :, 1:] - p[..., :, :-1]).abs() - (t[..., :, 1:] - t[..., :, :-1]).abs()).abs().mean()
    dy = ((p[..., 1:, :] - p[..., :-1, :]).abs() - (t[..., 1:, :] - t[..., :-1, :]).abs()).abs().mean()
    return 0.5 * (dx + dy)


def feature_matching(fake_features, real_features) -> torch.Tensor:
    """Mean over D's layers of the mean |feature(fake) - feature(real)|; the real features
    are targets (no gradient)."""
    losses = [(f.float() - r.detach().float()).abs().mean() for f, r in zip(fake_features, real_features)]
    return torch.stack(losses).mean()


def median_anchored_contrast(unit: torch.Tensor, brain: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """``median * (unit / median) ** exponent`` per image and channel, with ``median`` the
    median of ``unit`` (B, C, H, W, in [0, 1]) inside ``brain`` (B, 1, H, W): 0 and the
    median stay where they are; an exponent below 1 squeezes the tissue around the median,
    above 1 spreads it. Images without brain pass unchanged."""
    inside = brain.expand_as(unit)
    median = torch.where(inside, unit, torch.nan).flatten(2).nanmedian(dim=2).values[..., None, None]
    has_brain = ~median.isnan()
    median = torch.nan_to_num(median, nan=1.0).clamp_min(1e-3)
    return torch.where(has_brain, median * (unit.clamp_min(0) / median) ** exponent, unit)


def blur_inside(unit: torch.Tensor, brain: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Each image and channel of ``unit`` (B, C, H, W) blurred in-plane by a Gaussian of
    ``sigma`` (B, C) voxels using only voxels inside ``brain`` (B, 1, H, W): a normalised
    convolution, so background does not bleed in. Sigma 0 leaves the image as it is."""
    b, c, h, w = unit.shape
    radius = max(1, math.ceil(3 * float(sigma.max())))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=unit.device)
    safe = sigma.clamp_min(1e-3).reshape(b * c, 1)
    kernel = torch.exp(-0.5 * (offsets / safe) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # (B*C, K)
    inside = brain.expand_as(unit).float().reshape(1, b * c, h, w)
    values = unit.float().reshape(1, b * c, h, w) * inside

    def separable(x):
        x = F.conv2d(x, kernel[:, None, None, :], padding=(0, radius), groups=b * c)
        return F.conv2d(x, kernel[:, None, :, None], padding=(radius, 0), groups=b * c)

    blurred = separable(values) / separable(inside).clamp_min(1e-6)
    blurred = blurred.reshape(b, c, h, w).to(unit.dtype)
    keep = (sigma < 1e-3)[..., None, None] | ~brain.expand_as(unit)
    return torch.where(keep, unit, blurred)


@dataclass(frozen=True)
class AugmentConfig:
    flip_probability: float = 0.5
    max_rotation_degrees: float = 10.0
    max_scale: float = 0.1  # zoom in [1 - s, 1 + s]
    max_gamma: float = 0.3  # gamma in [exp(-g), exp(g)] on [0, 1]-rescaled sources
    max_intensity_scale: float = 0.1
    max_bias: float = 0.2  # multiplicative bias field in [1 - b, 1 + b], smooth (4x4 control grid)
    max_contrast: float = 0.0  # exponent in [exp(-c), exp(c)] of the median-anchored power law; 0: off
    max_blur: float = 0.0  # in-plane Gaussian blur of the sources, sigma in [0, max_blur] voxels; 0: off


def augment_generator(seed: int, epoch: int, step: int) -> torch.Generator:
    """The generator for one training step: a function of (seed, epoch, step) only."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_000_003 + step)


def augment(sources: torch.Tensor, target: torch.Tensor, masks: torch.Tensor, generator: torch.Generator,
            config: AugmentConfig = AugmentConfig(), slices_per_source: int = 1):
    """Randomly transformed copies of (sources (B, C, H, W), target (B, 1, H, W),
    masks (B, K, H, W) bool: the brain mask first, then any others, such as a lesion map,
    moved alike); values stay in [-1, 1] with background -1. With 2.5D input each source is
    ``slices_per_source`` consecutive channels, jittered alike."""
    b, c, h, w = sources.shape
    if c % slices_per_source:
        raise ValueError(f"{c} source channels are not whole groups of {slices_per_source} slices")
    m = c // slices_per_source
    dev = sources.device

    def uniform(*shape, low=-1.0, high=1.0):
        return torch.rand(*shape, generator=generator).mul(high - low).add(low).to(dev)

    angle = uniform(b) * math.radians(config.max_rotation_degrees)
    zoom = 1.0 + uniform(b) * config.max_scale
    flip = torch.where(torch.rand(b, generator=generator).to(dev) < config.flip_probability, -1.0, 1.0)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos * flip, -sin, torch.zeros_like(cos)], -1),
                         torch.stack([sin * flip, cos, torch.zeros_like(cos)], -1)], 1)
    grid = F.affine_grid(theta, (b, 1, h, w), align_corners=False)

    def warp(images, mode):
        # Shift so that background (-1) is 0 and zero padding fills it.
        return F.grid_sample(images.float() - BACKGROUND, grid, mode=mode, padding_mode="zeros",
                             align_corners=False) + BACKGROUND

    masks_out = warp(masks.float() * 2 - 1, "nearest") > 0
    brain_out = masks_out[:, :1]
    target_out = warp(target, "bilinear").clamp(-1, 1)
    src = warp(sources, "bilinear").clamp(-1, 1)

    # Intensity jitter, per sample and source, inside the brain only.
    unit = (src + 1) / 2
    if config.max_contrast > 0:  # drawn only when on, so runs without it keep their random stream
        exponent = torch.exp(uniform(b, m, 1, 1) * config.max_contrast)
        if slices_per_source > 1:
            exponent = exponent.repeat_interleave(slices_per_source, dim=1)
        unit = median_anchored_contrast(unit, brain_out, exponent)
    if config.max_blur > 0:  # drawn only when on, like the contrast
        sigma = torch.rand(b, m, generator=generator).mul(config.max_blur)
        if slices_per_source > 1:
            sigma = sigma.repeat_interleave(slices_per_source, dim=1)
        unit = blur_inside(unit, brain_out, sigma.to(dev))
    gamma = torch.exp(uniform(b, m, 1, 1) * config.max_gamma)
    scale = 1.0 + uniform(b, m, 1, 1) * config.max_intensity_scale
    coarse = 1.0 + uniform(b, m, 4, 4) * config.max_bias
    bias = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)
    if slices_per_source > 1:  # one draw per source, shared by its slices
        gamma, scale, bias = (t.repeat_interleave(slices_per_source, dim=1) for t in (gamma, scale, bias))
    unit = (unit.clamp_min(0) ** gamma * scale * bias).clamp(0, 1)
    src = torch.where(brain_out, unit * 2 - 1, torch.full_like(src, BACKGROUND))
    # Background stays background in the sources: a voxel outside the brain is -1 exactly.
    return src, target_out, masks_out
