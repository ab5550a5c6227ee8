"""A per-voxel map of where a synthetic image is unsure, without retraining: test-time
augmentation (TTA), and the measures that validate such a map against the real error.

The shipped models have no dropout to sample (the FD-GAN generator) and one set of weights
each, so the map is made at test time: every brain slice goes through the network once as
it is (that pass IS the synthetic image: its output is unchanged by asking for a map) and
once per augmentation of its input, each output is mapped back (the augmentation undone),
and the map is the per-voxel standard deviation over all passes, in the synthetic image's
units (0 outside the brain mask). The augmentations act on the network's input slices
(256x256, normalised), so they are exactly invertible:

- ``flip``: left-right mirror (the brain is nearly symmetric; the network's left-right
  behaviour is not constrained to be);
- ``shift`` (dx, dy): a shift by whole network pixels (the LAF grid and the stride-2
  layers make the network not exactly shift-equivariant);
- ``scale`` (one factor per source): intensity jitter of the normalised inputs,
  (x + 1) * s - 1, clipped to [-1, 1] (background -1 stays background): how much the
  result depends on the normalisation window.

Extra cost: one network pass per augmentation. The shipped set (``DEFAULT_SET``, flip +
four shifts) runs the network 6 times instead of once: a 155-slice T1+T2 ``predict`` on one
thread of an AMD EPYC took 84 s instead of 15 s (docs/uncertainty.md).

What the map is worth is measured, not assumed (docs/uncertainty.md,
``scripts/validate_uncertainty.py``): per subject, the Spearman rank correlation between
the map and the absolute error inside the brain, and the share of the error held by the
10 % most uncertain voxels, against trivial maps made without any extra pass
(``trivial_maps``: the synthetic intensity, nearness to the brain's edge, the image
gradient, distance from the middle slice). ``spearman``, ``top_share`` and
``trivial_maps`` are the one definition of those measures. What they found: on the 12 test
subjects the spread ranks voxels by error no better than the synthetic image's gradient
magnitude, so it is an experimental option named for what it is (the TTA spread: file
headers say "TTA spread", the record says it is not a confidence map), not a confidence map.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np

# Population standard deviation over the passes (ddof 0): with 2 passes, half their difference.
STATISTIC = "standard deviation over the network passes (the plain pass and each augmentation), in the synthetic " \
            "image's units"
NAME = "test-time augmentation spread"
# What scripts/validate_uncertainty.py measured for the shipped set and model (docs/uncertainty.md).
VALIDATION = ("not a confidence map: measured for the shipped t1_t2_to_flair only, on the 12 test subjects its "
              "Spearman correlation with the "
              "absolute error inside the brain was 0.28 +- 0.05, no better than the synthetic image's gradient "
              "magnitude (0.27 +- 0.05; better on 7 of 12 subjects, p = 0.62); docs/uncertainty.md")


@dataclass(frozen=True)
class Augmentation:
    """One test-time augmentation of the network's input slices (N, C, H, W); H runs
    right-left (RAS x), W posterior-anterior."""

    name: str
    flip: bool = False
    shift: Tuple[int, int] = (0, 0)
    scale: Tuple[float, ...] = ()  # per source (empty: none)

    def apply(self, x, num_sources: int):
        """The augmented input (a new tensor; ``x`` is left as it is)."""
        import torch

        if self.scale:
            if len(self.scale) != num_sources:
                raise ValueError(f"augmentation {self.name}: {len(self.scale)} scale factors for {num_sources} sources")
            per = x.shape[1] // num_sources  # 2.5D models: each source's neighbouring slices together
            factors = torch.tensor(self.scale, dtype=x.dtype).repeat_interleave(per).view(1, -1, 1, 1)
            x = ((x + 1.0) * factors - 1.0).clamp(-1.0, 1.0)
        if self.flip:
            x = torch.flip(x, dims=[-2])
        if self.shift != (0, 0):
            x = torch.roll(x, shifts=self.shift, dims=(-2, -1))
        return x

    def undo(self, y):
        """The network output of the augmented input, mapped back onto the plain input."""
        import torch

        if self.shift != (0, 0):
            y = torch.roll(y, shifts=(-self.shift[0], -self.shift[1]), dims=(-2, -1))
        if self.flip:
            y = torch.flip(y, dims=[-2])
        return y


FLIP = Augmentation("flip", flip=True)
SHIFTS = tuple(Augmentation(f"shift{dx:+d}{dy:+d}", shift=(dx, dy)) for dx, dy in ((3, 0), (-3, 0), (0, 3), (0, -3)))


def intensity_jitters(num_sources: int, amount: float = 0.05) -> Tuple[Augmentation, ...]:
    """Four intensity jitters of +-``amount``: all sources up, all down, and (with several
    sources) the first up and the others down, and the reverse."""
    up, down = 1.0 + amount, 1.0 - amount
    combos = [(up,) * num_sources, (down,) * num_sources]
    if num_sources > 1:
        combos += [(up,) + (down,) * (num_sources - 1), (down,) + (up,) * (num_sources - 1)]
    return tuple(Augmentation("scale" + "".join("+" if s > 1 else "-" for s in c), scale=c) for c in combos)


# The candidate sets compared on the validation split (scripts/validate_uncertainty.py). The
# shipped DEFAULT_SET was chosen there, before the test split was run: "all" (10 passes) had
# the highest mean rank correlation with the error (0.293), "flip+shift" (6 passes) 0.284;
# 0.009 was not worth 4 more network passes, and neither beat the gradient map (0.294).
CANDIDATE_SETS = ("flip", "shift", "intensity", "flip+shift", "all")
DEFAULT_SET = "flip+shift"


def augmentation_set(name: str, num_sources: int) -> Tuple[Augmentation, ...]:
    """The augmentations of a named candidate set for a model with ``num_sources`` inputs."""
    sets = {
        "flip": (FLIP,),
        "shift": SHIFTS,
        "intensity": intensity_jitters(num_sources),
        "flip+shift": (FLIP,) + SHIFTS,
    }
    sets["all"] = sets["flip+shift"] + sets["intensity"]
    if name not in sets:
        raise ValueError(f"unknown augmentation set {name!r}; expected one of {', '.join(sets)}")
    return sets[name]


@dataclass(frozen=True)
class TTAConfig:
    """How ``synthesize_with_details(uncertainty=...)`` makes the map. ``augmentations``:
    None = the ``DEFAULT_SET``; ``keep_passes``: also return each augmented pass's volume
    (validation; one volume-sized array per pass)."""

    augmentations: Optional[Tuple[Augmentation, ...]] = None
    keep_passes: bool = False
    set_name: Optional[str] = field(default=None)

    def resolve(self, num_sources: int) -> Tuple[Augmentation, ...]:
        if self.augmentations is not None:
            return tuple(self.augmentations)
        return augmentation_set(self.set_name or DEFAULT_SET, num_sources)


UncertaintySpec = Union[bool, None, str, TTAConfig]


def tta_config(spec: UncertaintySpec) -> Optional[TTAConfig]:
    """``uncertainty=`` of the API: False/None (no map), True (the default set), a set name
    (``CANDIDATE_SETS``) or a TTAConfig."""
    if spec is None or spec is False:
        return None
    if spec is True:
        return TTAConfig()
    if isinstance(spec, str):
        if spec not in CANDIDATE_SETS:
            raise ValueError(f"unknown uncertainty method {spec!r}; expected one of {', '.join(CANDIDATE_SETS)}")
        return TTAConfig(set_name=spec)
    if isinstance(spec, TTAConfig):
        return spec
    raise TypeError(f"uncertainty: expected a bool, a set name or a TTAConfig, got {type(spec).__name__}")


def describe(augmentations: Sequence[Augmentation]) -> dict:
    """The ``Uncertainty`` entry of the provenance record."""
    return {
        "Name": NAME,
        "Method": "test-time augmentation: " + ", ".join(a.name for a in augmentations),
        "Augmentations": [a.name for a in augmentations],
        "NetworkPasses": 1 + len(augmentations),
        "Statistic": STATISTIC,
        "Validation": VALIDATION,
    }


def spread(passes: np.ndarray) -> np.ndarray:
    """Per-voxel standard deviation (ddof 0) over the first axis (the passes), float32."""
    passes = np.asarray(passes, dtype=np.float64)
    return passes.std(axis=0).astype(np.float32)


# ----------------------------------------------------------------------------- validation


def _ranks(values: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(values)  # average ranks for ties


def spearman(uncertainty: np.ndarray, error: np.ndarray) -> float:
    """Spearman rank correlation of two 1-D samples (ties: average ranks); nan if one is constant."""
    a, b = _ranks(np.ravel(uncertainty)), _ranks(np.ravel(error))
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def top_share(uncertainty: np.ndarray, error: np.ndarray, fraction: float = 0.1, seed: int = 0) -> float:
    """Share of the total absolute error held by the ``fraction`` of voxels with the highest
    uncertainty (ties broken at random, seeded: a constant map scores ``fraction`` on average)."""
    u, e = np.ravel(uncertainty), np.abs(np.ravel(error)).astype(np.float64)
    count = max(1, int(round(fraction * u.size)))
    tiebreak = np.random.default_rng(seed).random(u.size)
    order = np.lexsort((tiebreak, -u.astype(np.float64)))  # highest uncertainty first
    total = e.sum()
    return float(e[order[:count]].sum() / total) if total > 0 else float("nan")


def oracle_share(error: np.ndarray, fraction: float = 0.1) -> float:
    """The best any map can do: the share of the error in the ``fraction`` largest errors."""
    e = np.sort(np.abs(np.ravel(error)).astype(np.float64))[::-1]
    count = max(1, int(round(fraction * e.size)))
    return float(e[:count].sum() / e.sum()) if e.sum() > 0 else float("nan")


TRIVIAL_MAPS = ("intensity", "edge", "gradient", "slice position")


def trivial_maps(synthetic: np.ndarray, mask: np.ndarray, spacing: Sequence[float], axial_axis: int = 2
                 ) -> Dict[str, np.ndarray]:
    """Maps that need no extra network pass, each "higher = expected less reliable":

    - ``intensity``: the synthetic intensity (bright lesions and CSF/edges are where it errs);
    - ``edge``: nearness to the brain's edge, minus the distance (mm) to the outside of ``mask``;
    - ``gradient``: the synthetic image's gradient magnitude (per mm, 3D);
    - ``slice position``: the distance (mm) of the voxel's axial slice from the middle brain
      slice (the models are weaker on the top and bottom slices).
    ``axial_axis``: the voxel axis closest to superior-inferior.
    """
    from scipy import ndimage

    spacing = np.asarray(spacing, dtype=float)
    synthetic = np.asarray(synthetic, dtype=np.float32)
    maps = {"intensity": synthetic}
    maps["edge"] = -ndimage.distance_transform_edt(np.pad(mask, 1), sampling=spacing)[1:-1, 1:-1, 1:-1].astype(
        np.float32)
    grads = np.gradient(synthetic, *spacing)
    maps["gradient"] = np.sqrt(sum(g.astype(np.float64) ** 2 for g in grads)).astype(np.float32)
    slices = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axial_axis)))
    middle = 0.5 * (slices[0] + slices[-1]) if slices.size else 0.0
    position = np.abs(np.arange(mask.shape[axial_axis]) - middle) * spacing[axial_axis]
    shape = [1, 1, 1]
    shape[axial_axis] = -1
    maps["slice position"] = np.broadcast_to(position.reshape(shape), mask.shape).astype(np.float32)
    return maps
