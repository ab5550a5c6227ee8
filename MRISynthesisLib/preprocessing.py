"""Preprocessing shared by training and inference (one implementation, used by both).

1. Intensity: each volume is normalised on its own, robustly: the ``lower_percentile``
   and ``upper_percentile`` of the voxels inside the brain mask (or the non-zero voxels
   when no mask is given) map to -1 and 1, values are clipped to [-1, 1], and voxels
   outside the mask are set to -1 (background). With ``intensity_reference="median"``
   the upper end is instead ``low + median_span * (median - low)`` (median of the brain):
   a large bright lesion moves the upper percentile (so normal brain comes out darker in
   one scan than another) but hardly the median, and headroom above normal brain keeps
   lesions unclipped.
   Optionally (a bundle's ``histogram_landmarks``) a source's histogram is standardised
   first (Nyul & Udupa 2000): its brain values at ``HISTOGRAM_PERCENTILES``, in window
   units, are mapped piecewise linearly onto the landmarks stored in the bundle (the mean
   over the model's training subjects). A scan with half the usual tissue contrast (an old
   scanner's T1) otherwise reaches the network unlike anything it trained on, and T1 models
   drew whole lobes of such scans black (docs/learning_curves.md, "T1: black regions").
2. Orientation: volumes are reoriented from their affine to the closest RAS axis order so
   that slices along the third axis are truly axial whatever the storage order; the
   inverse puts results back in the file's own voxel order.
3. In-plane size: each axial slice is padded symmetrically to a square physical field of
   view of at least ``min_field_of_view_mm`` and resized to ``image_size`` pixels
   (240x240 @ 1 mm, 182x218, 334x352 @ 0.72 mm all become 256x256), and back.
4. Slices whose mask (or foreground) is empty are not sent to the network.

The synthetic target comes out in [-1, 1] and is mapped to the documented output scale
[0, ``output_max``]: 0 is background, ``output_max`` is the intensity of the
``upper_percentile`` of the brain in a real target scan.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from nibabel import orientations

from .errors import InputError
from .volumes import masked_values


INTENSITY_REFERENCES = ("percentile", "median")
RESIZE_INTERPOLATIONS = ("bilinear", "bicubic")
# Brain-histogram landmarks of the standardisation (percentiles; the lower end of the window
# is a fixed point below them, and the median, 50, maps onto the mean median).
HISTOGRAM_PERCENTILES = (2.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 95.0, 98.0)


@dataclass(frozen=True)
class PreprocessingConfig:
    """Settings stored in every model bundle so that inference repeats training exactly."""

    lower_percentile: float = 0.5
    upper_percentile: float = 99.5
    image_size: int = 256
    min_field_of_view_mm: float = 240.0
    output_max: float = 1000.0
    # "percentile": [lower, upper percentile] -> [-1, 1]; "median": [lower percentile,
    # low + median_span * (median - low)] -> [-1, 1] (lesion-robust, see above).
    intensity_reference: str = "percentile"
    median_span: float = 2.5
    # How slices are resized onto the network's grid (SliceResizer.forward). Bundles made
    # before this setting existed were trained on bilinear slices; the trainer now defaults
    # to bicubic, which keeps the detail that bilinear upsampling blurs away.
    resize_interpolation: str = "bilinear"
    # Per source modality, the landmarks (values at HISTOGRAM_PERCENTILES, in normalised units
    # before clipping) its histogram is standardised onto; None or a missing modality: none.
    # Stored as ((modality, landmarks), ...) so that the config stays immutable.
    histogram_landmarks: Optional[Tuple[Tuple[str, Tuple[float, ...]], ...]] = None

    def __post_init__(self):
        if self.histogram_landmarks is not None:
            given = (self.histogram_landmarks.items() if isinstance(self.histogram_landmarks, dict)
                     else self.histogram_landmarks)
            landmarks = tuple(sorted((str(m), tuple(float(v) for v in values)) for m, values in given))
            for modality, values in landmarks:
                if len(values) != len(HISTOGRAM_PERCENTILES):
                    raise ValueError(f"histogram_landmarks[{modality!r}]: {len(values)} values, expected "
                                     f"{len(HISTOGRAM_PERCENTILES)} (at percentiles {HISTOGRAM_PERCENTILES})")
                if not (values[0] > -1.0 and all(b > a for a, b in zip(values, values[1:]))):
                    raise ValueError(f"histogram_landmarks[{modality!r}] must increase strictly from above -1")
            object.__setattr__(self, "histogram_landmarks", landmarks or None)
        if not 0.0 <= self.lower_percentile < self.upper_percentile <= 100.0:
            raise ValueError("need 0 <= lower_percentile < upper_percentile <= 100")
        if self.intensity_reference not in INTENSITY_REFERENCES:
            raise ValueError(f"intensity_reference must be one of {INTENSITY_REFERENCES}, "
                             f"got {self.intensity_reference!r}")
        if not self.min_field_of_view_mm > 0:
            raise ValueError(f"min_field_of_view_mm must be > 0, got {self.min_field_of_view_mm}")
        if not self.median_span > 1.0:
            raise ValueError("median_span must be > 1")
        if self.resize_interpolation not in RESIZE_INTERPOLATIONS:
            raise ValueError(f"resize_interpolation must be one of {RESIZE_INTERPOLATIONS}, "
                             f"got {self.resize_interpolation!r}")

    def _window_text(self) -> str:
        if self.intensity_reference == "median":
            return (f"brain {self.lower_percentile}th percentile -> -1, that percentile + {self.median_span:g} x "
                    "(brain median - that percentile) -> 1")
        return f"brain {self.lower_percentile}th percentile -> -1, {self.upper_percentile}th percentile -> 1"

    def window_text(self, with_standardization: bool = True) -> str:
        """The normalisation in words, for `mrisynthesis info` and the model cards."""
        return self._window_text() + (self.standardization_text() if with_standardization else "")

    def standardization_text(self) -> str:
        """The histogram standardisation in words ("" without one), after the window's."""
        if not self.histogram_landmarks:
            return ""
        return (f"; {', '.join(m.upper() for m, _ in self.histogram_landmarks)} histogram standardised first "
                f"(brain percentiles {HISTOGRAM_PERCENTILES[0]:g}-{HISTOGRAM_PERCENTILES[-1]:g} mapped piecewise "
                "linearly onto the training subjects' mean)")

    def landmarks_for(self, modality: str) -> Optional[np.ndarray]:
        """The landmarks a source of this modality is standardised onto, or None."""
        for name, values in self.histogram_landmarks or ():
            if name == modality:
                return np.asarray(values, dtype=np.float64)
        return None

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        if self.histogram_landmarks is not None:
            values["histogram_landmarks"] = {m: list(v) for m, v in self.histogram_landmarks}
        else:  # bundles without it read as before (and older readers are not handed a new key)
            del values["histogram_landmarks"]
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "PreprocessingConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown preprocessing keys: {sorted(unknown)}")
        return cls(**values)


# ------------------------------------------------------------------------- intensity


@dataclass(frozen=True)
class IntensityWindow:
    low: float
    high: float


def foreground_mask(array: np.ndarray) -> np.ndarray:
    """Voxels that hold signal: non-zero (skull-stripped scans have exact-zero background)."""
    return array != 0


def intensity_window(array: np.ndarray, mask: Optional[np.ndarray], config: PreprocessingConfig,
                     name: str = "volume", foreground: Optional[np.ndarray] = None) -> IntensityWindow:
    """``foreground``: ``foreground_mask(array)`` when the caller already has it."""
    if mask is not None:
        region = mask
    else:
        region = foreground if foreground is not None else foreground_mask(array)
    values = masked_values(array, region)
    if values.size == 0:
        raise InputError(f"{name}: no voxels inside the {'brain mask' if mask is not None else 'non-zero region'}")
    if config.intensity_reference == "median":
        low, median = np.percentile(values, [config.lower_percentile, 50.0])
        high = low + config.median_span * (median - low)
    else:
        low, high = np.percentile(values, [config.lower_percentile, config.upper_percentile])
    if not high > low:
        raise InputError(f"{name}: constant intensity inside the brain; cannot normalise")
    return IntensityWindow(float(low), float(high))


def normalize_intensity(array: np.ndarray, mask: Optional[np.ndarray], config: PreprocessingConfig,
                        name: str = "volume", foreground: Optional[np.ndarray] = None,
                        out: Optional[np.ndarray] = None, landmarks: Optional[np.ndarray] = None) -> np.ndarray:
    """Map a volume to [-1, 1] robustly (see module docstring); float32 output, written
    into ``out`` when given (same shape; any memory layout). ``foreground``:
    ``foreground_mask(array)`` when the caller already has it (computed once, not twice).
    ``landmarks``: standardise the histogram onto these first (``config.landmarks_for``)."""
    if mask is None and foreground is None:
        foreground = foreground_mask(array)
    window = intensity_window(array, mask, config, name, foreground)
    # In place, one volume-sized buffer: the same float32 arithmetic as
    # (array.astype(float32) - low) * float32(2 / (high - low)) - 1.
    out = np.subtract(array, np.float32(window.low), out=out, dtype=np.float32)
    out *= np.float32(2.0 / (window.high - window.low))
    out -= np.float32(1.0)
    region = foreground if mask is None else mask
    if landmarks is not None:
        standardize_histogram(out, region, landmarks, name)
    np.clip(out, -1.0, 1.0, out=out)
    out[~region] = -1.0
    return out


def histogram_landmarks(array: np.ndarray, mask: Optional[np.ndarray], config: PreprocessingConfig,
                        name: str = "volume") -> np.ndarray:
    """A raw volume's landmarks: its brain values at HISTOGRAM_PERCENTILES in normalised units
    before clipping (the mean over a model's training subjects is what its bundle stores)."""
    region = mask if mask is not None else foreground_mask(array)
    window = intensity_window(array, mask, config, name, region)
    values = np.percentile(masked_values(array, region), HISTOGRAM_PERCENTILES)
    return (values - window.low) * (2.0 / (window.high - window.low)) - 1.0


def standardize_histogram(normalized: np.ndarray, region: np.ndarray, landmarks: np.ndarray,
                          name: str = "volume") -> None:
    """Map ``normalized`` (unclipped window units) inside ``region`` in place, piecewise
    linearly, so that its brain landmarks land on ``landmarks``; -1 (the window's lower end)
    stays fixed, and beyond the outer landmarks the end segments' slopes continue (lesions
    keep their brightness relative to the brightest normal tissue). Voxels outside
    ``region`` are left as they are (normalisation sets them to background)."""
    values = normalized[region]  # the brain only: a fraction of the volume's memory
    own = np.percentile(values, HISTOGRAM_PERCENTILES)
    xs, ys = [-1.0], [-1.0]
    for x, y in zip(own, landmarks):  # ties (few distinct values) would give a vertical segment
        if x > xs[-1] and y > ys[-1]:
            xs.append(float(x))
            ys.append(float(y))
    if len(xs) < 4:
        raise InputError(f"{name}: too few distinct intensities inside the brain to standardise its histogram")
    xs, ys = np.asarray(xs), np.asarray(ys)
    mapped = np.interp(values, xs, ys)
    above = values > xs[-1]
    mapped[above] = ys[-1] + (values[above] - xs[-1]) * ((ys[-1] - ys[-2]) / (xs[-1] - xs[-2]))
    below = values < xs[0]
    mapped[below] = ys[0] + (values[below] - xs[0]) * ((ys[1] - ys[0]) / (xs[1] - xs[0]))
    normalized[region] = mapped


def to_output_scale(normalized, config: PreprocessingConfig):
    """[-1, 1] network output -> documented output scale [0, output_max]."""
    return (normalized + 1.0) * (config.output_max / 2.0)


def real_target_in_output_units(array: np.ndarray, mask: Optional[np.ndarray], config: PreprocessingConfig,
                                name: str = "target") -> np.ndarray:
    """A real target scan on the synthetic output's scale [0, output_max]: normalised
    exactly as in training, then mapped like the network output. Metrics compare the
    synthetic volume against this (one definition for evaluation and the demo)."""
    return to_output_scale(normalize_intensity(array, mask, config, name), config)


# ------------------------------------------------------------------------- orientation


class AxialReorientation:
    """Permute/flip a (I, J, K) volume into RAS order (X, Y, Z) from its affine, and back."""

    def __init__(self, affine: np.ndarray):
        self.to_ras = orientations.io_orientation(affine)
        self.from_ras = orientations.ornt_transform(orientations.axcodes2ornt("RAS"), self.to_ras)
        spacing = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
        self.ras_spacing = np.empty(3)
        for axis, (target, _) in enumerate(self.to_ras):
            self.ras_spacing[int(target)] = spacing[axis]

    def forward(self, array: np.ndarray) -> np.ndarray:
        return orientations.apply_orientation(array, self.to_ras)

    def inverse(self, array: np.ndarray) -> np.ndarray:
        return orientations.apply_orientation(array, self.from_ras)


# ------------------------------------------------------------------------- in-plane size


# Below this ratio of slice-grid to network-grid pixels the inverse resize filters out what
# the coarser grid cannot hold (aliasing); above it, filtering only blurs (240/256 = 0.94).
STRONG_REDUCTION = 0.75


class SliceResizer:
    """Pad slices (X, Y) to a square physical field of view, resize to image_size, and back."""

    def __init__(self, shape: Sequence[int], spacing: Sequence[float], config: PreprocessingConfig):
        self.shape = tuple(int(n) for n in shape)
        self.size = config.image_size
        self.mode = config.resize_interpolation
        extent = max(self.shape[0] * spacing[0], self.shape[1] * spacing[1], config.min_field_of_view_mm)
        self.padded = tuple(max(n, int(round(extent / s))) for n, s in zip(self.shape, spacing))
        self.pad_before = tuple((p - n) // 2 for p, n in zip(self.padded, self.shape))

    def forward(self, slices: torch.Tensor, fill: float = -1.0) -> torch.Tensor:
        """(N, C, X, Y) -> (N, C, size, size)."""
        (px, py), (bx, by) = self.padded, self.pad_before
        ax, ay = px - self.shape[0] - bx, py - self.shape[1] - by
        x = F.pad(slices, (by, ay, bx, ax), value=fill)
        if x.shape[-2:] == (self.size, self.size):
            return x
        downsampling = px > self.size or py > self.size
        x = F.interpolate(x, size=(self.size, self.size), mode=self.mode, align_corners=False, antialias=downsampling)
        # Bicubic overshoots at edges; the network's slices stay in [-1, 1] as normalised.
        return x.clamp_(-1.0, 1.0) if self.mode == "bicubic" else x

    def inverse(self, slices: torch.Tensor) -> torch.Tensor:
        """(N, C, size, size) -> (N, C, X, Y). Bicubic, low-pass filtered only where the slice
        grid is much coarser than the network's: a bilinear, antialiased 240 -> 256 -> 240
        round trip alone leaves a real FLAIR with 0.75 of its sharpness, this inverse with
        0.85 (docs/learning_curves.md). Bicubic overshoots at edges: callers clip to [-1, 1]
        (``SliceStack.finish``)."""
        (px, py), (bx, by) = self.padded, self.pad_before
        x = slices
        if (px, py) != (self.size, self.size):
            reduction = min(px, py) / self.size
            x = F.interpolate(x, size=(px, py), mode="bicubic", align_corners=False,
                              antialias=reduction < STRONG_REDUCTION)
        return x[..., bx : bx + self.shape[0], by : by + self.shape[1]]


# ------------------------------------------------------------------------- one subject


class SliceStack:
    """Co-registered volumes of one subject, normalised and cut into axial slices.

    ``arrays`` are on one grid with ``affine``; ``mask`` (optional) is the brain mask on
    that grid. ``brain_slices`` lists the axial indices that contain brain; ``batch``
    returns network-ready (N, C, size, size) tensors for chosen indices, and ``assemble``
    puts network outputs back into a volume in the original voxel order.
    """

    def __init__(self, arrays: Sequence[np.ndarray], affine: np.ndarray, config: PreprocessingConfig,
                 mask: Optional[np.ndarray] = None, names: Optional[Sequence[str]] = None,
                 modalities: Optional[Sequence[str]] = None):
        """``modalities``: each array's modality, for the histogram standardisation of those
        the config has landmarks for (None: no standardisation)."""
        names = list(names) if names is not None else [f"volume {i}" for i in range(len(arrays))]
        landmarks = [config.landmarks_for(m) for m in modalities] if modalities is not None else [None] * len(arrays)
        self.config = config
        self.orientation = AxialReorientation(affine)
        self.input_shape = tuple(arrays[0].shape)
        ras_mask = None if mask is None else self.orientation.forward(np.asarray(mask) > 0)
        ras = [self.orientation.forward(a) for a in arrays]  # views, no copies
        shape = ras[0].shape
        # Normalise in RAS order into (C, X, Y, Z) float32, one home for the intensity rule.
        # Stored slice-major (each axial slice one contiguous block) so that batches of
        # slices are read, and results written, without striding through the volume.
        self.channels = _slice_major((len(ras),) + shape)
        foregrounds = [foreground_mask(a) for a in ras] if ras_mask is None else [None] * len(ras)
        for i, (a, name) in enumerate(zip(ras, names)):
            normalize_intensity(a, ras_mask, config, name, foreground=foregrounds[i], out=self.channels[i],
                                landmarks=landmarks[i])
        if ras_mask is None:
            ras_mask = foregrounds[0]
            for fg in foregrounds[1:]:
                ras_mask |= fg
        self.mask = ras_mask
        self.brain_slices = np.flatnonzero(ras_mask.any(axis=(0, 1)))
        if self.brain_slices.size == 0:
            raise InputError("no axial slice contains brain (the mask or the volumes are empty)")
        self.resizer = SliceResizer(shape[:2], self.orientation.ras_spacing[:2], config)

    @property
    def num_slices(self) -> int:
        return self.mask.shape[-1]

    def batch(self, indices: Sequence[int], channels: Optional[Sequence[int]] = None, context: int = 0) -> torch.Tensor:
        """Network-ready slices (N, C, size, size) for axial indices, channels selectable.
        With ``context`` k (2.5D input) each channel brings the k slices on either side too,
        (N, C * (2k + 1), size, size), channel by channel in axial order; beyond the end of
        the volume the nearest slice repeats."""
        if self.channels is None:
            raise RuntimeError("the slice stack's channels were released (release_channels)")
        data = self.channels if channels is None else self.channels[list(channels)]
        if context == 0:
            x = torch.from_numpy(np.stack([data[..., k] for k in indices]))  # (N, C, X, Y), C-contiguous
        else:
            last = self.num_slices - 1
            x = torch.from_numpy(np.stack([
                np.stack([plane[..., min(max(k + d, 0), last)] for plane in data for d in range(-context, context + 1)])
                for k in indices]))
        return self.resizer.forward(x)

    def release_channels(self) -> None:
        """Free the normalised input channels once every slice has been through the network
        (two or three volume-sized arrays); ``batch`` cannot be called afterwards."""
        self.channels = None

    def empty_output(self) -> np.ndarray:
        """A background-filled RAS-ordered output volume (X, Y, Z) in network units."""
        output = _slice_major(self.mask.shape)
        output.fill(-1.0)
        return output

    def put(self, output: np.ndarray, indices: Sequence[int], slices: torch.Tensor) -> None:
        """Write network outputs (N, 1, size, size) for ``indices`` into ``output`` (RAS order)."""
        back = self.resizer.inverse(slices.float()).numpy()[:, 0]  # (N, X, Y)
        for plane, k in zip(back, indices):
            output[..., k] = plane

    def finish(self, output: np.ndarray) -> np.ndarray:
        """Background outside the brain, map to the output scale, original voxel order.
        Works in place on ``output`` (which it consumes). The result is Fortran-ordered
        (i fastest), the order NIfTI stores and Slicer's (k, j, i) arrays view without a copy."""
        output = np.asarray(output, dtype=np.float32)
        np.clip(output, -1.0, 1.0, out=output)
        output[~self.mask] = -1.0
        # to_output_scale, in place: the same float32 arithmetic.
        output += np.float32(1.0)
        output *= np.float32(self.config.output_max / 2.0)
        return np.asfortranarray(self.orientation.inverse(output))


def _slice_major(shape: Sequence[int]) -> np.ndarray:
    """A float32 array of ``shape`` (..., X, Y, Z) whose axial slices [..., k] are contiguous."""
    n = len(shape)
    order = list(range(n - 3)) + [n - 1, n - 2, n - 3]  # memory: (..., Z, Y, X)
    return np.empty([shape[i] for i in order], dtype=np.float32).transpose(np.argsort(order))


def select_middle_slices(brain_slices: Sequence[int], count: Optional[int]) -> np.ndarray:
    """The ``count`` middle entries of the brain slices (all if count is None or larger)."""
    brain_slices = np.asarray(brain_slices)
    if count is None or count >= brain_slices.size:
        return brain_slices
    start = (brain_slices.size - count) // 2
    return brain_slices[start : start + count]
