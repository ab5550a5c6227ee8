"""Small generated volumes for the Slicer-module tests (test_slicer_*.py)."""

import numpy as np


def brain_like(shape, seed, low=200.0, high=500.0, margin=(1.5, 1.5, 1.0)):
    """A small skull-stripped "brain": uniform noise in [low, high) inside an ellipsoid that
    keeps ``margin`` voxels from each face, exact 0 outside. Round and with tissue contrast,
    so the default brain mask "auto" (MRISynthesisLib.brainmask) counts it as already
    skull-stripped, the same as mode "none"; a box would be refused as "not a brain"."""
    rng = np.random.default_rng(seed)
    centre = (np.asarray(shape) - 1) / 2.0
    radii = centre - np.asarray(margin) + 0.5
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    inside = (((grid - centre) / radii) ** 2).sum(-1) <= 1.0
    return np.where(inside, low + (high - low) * rng.random(shape), 0.0).astype(np.float32)
