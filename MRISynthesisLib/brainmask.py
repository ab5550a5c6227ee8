"""The brain-mask policy: which voxels are brain, for the CLI, the Python API, the Slicer
module and the batch script (one home; they all call ``resolve_brain_mask``).

The shipped models were trained on skull-stripped scans, normalised inside the brain
(preprocessing). A whole head normalised over all its non-zero voxels puts scalp fat and
skull into the intensity window and the network sees something it never saw in training.
So the mask spec (``--brain-mask``) is one of:

- a mask (a ``Volume`` or a file; non-zero = brain): used as given ("given");
- ``"none"``: no mask, the non-zero voxels of the inputs are the brain (the behaviour
  before automatic extraction; right for skull-stripped inputs);
- ``"auto"`` (the default): when the T1 is already skull-stripped (rule below) the same as
  ``"none"`` ("input already skull-stripped"); otherwise the brain is extracted from the T1
  with deepbet (Fisch et al. 2024, https://github.com/wwu-mmll/deepbet; MIT, weights in
  its wheel) on the device synthesis runs on, and grown by ``EXTRACTION_MARGIN_MM`` (2 mm)
  ("extracted (deepbet)"). The margin is there because the output is background outside
  the mask: brain the mask misses is deleted from the synthetic image, while a thin rim of
  extra CSF/meninges costs little. On the four raw heads of ../shared/data deepbet's own
  mask missed 2-2.4% of the dataset's brain masks (to the edge slices mostly) and scored
  1.0-1.8 dB below them on two sessions; with 2 mm it misses under 1% and the mean gap is
  0.06 dB (larger margins pull skull into the intensity window and score lower;
  docs/clinical_input.md). The margin was chosen on these four sessions, the only raw
  heads available.

"Already skull-stripped" rule (``skull_stripped``): the T1's non-zero voxels add up to at
most ``STRIPPED_MAX_ML`` = 2200 ml. Skull stripping sets everything outside the brain to
exactly 0, leaving the intracranial volume: adult values lie about 1100-2000 ml. A whole
head with its scalp and skull is well above that, even where the scanner zeroes the air
(as in the clinical scans of ../shared/data). Measured on the T1s of ../shared/data:
skull-stripped BraTS / MS-MNI / TCGA cases 1016-1747 ml, the demo's ICBM152 case 1887 ml,
the un-stripped ms-long heads 2672-3368 ml (docs/clinical_input.md). A raw head with noisy
(non-zero) air is whole-FOV sized and always extracted. Known limit: a raw scan covering
only a thin slab of the head (under 2200 ml of non-zero voxels) counts as stripped; give
its mask with ``--brain-mask FILE``.

Outside the brain mask the synthetic output is background (0 in output units): the
network only learnt brain, and a made-up skull would look real without being so.

An image that is not a brain scan (e.g. a phantom cube) is refused (``check_brain_like``)
when its brain region (the stripped input's non-zero voxels, or the extracted mask):
- extracted: is smaller than ``MIN_BRAIN_ML`` (100 ml) or larger than ``STRIPPED_MAX_ML``;
- fills more than ``BOX_FILL_MAX`` (0.8) of its bounding box: a box. A brain or head is
  rounder (0.36-0.63 on ../shared/data; an ellipse fills pi/4 = 0.79 of its rectangle,
  so even a thin slab of brain stays under 0.8);
- has no tissue contrast: (95th - 5th percentile) / median of the T1 inside it below
  ``MIN_CONTRAST`` (0.3; brains on ../shared/data: 0.50-2.65); grey and white matter and CSF differ more.
deepbet itself finds a brain-sized blob in anything bright, so these checks are ours.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

from .errors import InputError
from .volumes import Volume, load_volume, mask_bounding_box, masked_values, resample_to_reference, validate_volume

log = logging.getLogger(__name__)

BRAIN_MASK_MODES = ("auto", "none")
EXTRACTION_MARGIN_MM = 2.0
STRIPPED_MAX_ML = 2200.0
BOX_FILL_MAX = 0.8
MIN_BRAIN_ML = 100.0
MIN_CONTRAST = 0.3

SOURCE_GIVEN = "given"
SOURCE_EXTRACTED = "extracted (deepbet)"
SOURCE_STRIPPED = "input already skull-stripped"
SOURCE_NONE = "none"

MaskSpec = Union[str, os.PathLike, Volume, None]


@dataclass
class BrainMaskDecision:
    """What ``resolve_brain_mask`` decided.

    array: boolean brain mask on the reference grid, or None: the inputs' non-zero voxels
        are the brain (modes "none" and "input already skull-stripped").
    source: one of "given", "extracted (deepbet)", "input already skull-stripped", "none".
    description: one line for the user, e.g. "brain mask: extracted from t1 (deepbet), 1549 ml".
    seconds: time spent deciding/extracting.
    """

    array: Optional[np.ndarray]
    source: str
    description: str
    seconds: float = 0.0


def voxel_ml(volume: Volume) -> float:
    return float(abs(np.linalg.det(volume.affine[:3, :3]))) / 1000.0


def nonzero_ml(volume: Volume) -> float:
    """Physical volume (ml) of the non-zero voxels."""
    return float(np.count_nonzero(volume.array)) * voxel_ml(volume)


def skull_stripped(volume: Volume) -> bool:
    """True if ``volume`` looks skull-stripped: its non-zero voxels total at most
    STRIPPED_MAX_ML (see the module docstring for the rule and its measurements)."""
    return nonzero_ml(volume) <= STRIPPED_MAX_ML


def box_fill(mask: np.ndarray) -> float:
    """Fraction of the mask's bounding box (voxel axes) that the mask fills."""
    bounds = mask_bounding_box(mask)
    if bounds is None:
        return 0.0
    box = np.prod([float(last - first + 1) for first, last in bounds])
    return float(np.count_nonzero(mask)) / box


def tissue_contrast(volume: Volume, mask: np.ndarray) -> float:
    """(95th - 5th percentile) / |median| of ``volume`` inside ``mask``."""
    low, mid, high = np.percentile(masked_values(volume.array, mask), [5, 50, 95])
    return float((high - low) / max(abs(mid), 1e-12))


def check_brain_like(mask: np.ndarray, reference: Volume, what: str, extracted: bool) -> None:
    """Refuse a brain region that cannot be a brain (see module docstring); ``what`` names it.
    The size limits apply to ``extracted`` masks only (a stripped input may be a part of a brain)."""
    ml = float(np.count_nonzero(mask)) * voxel_ml(reference)
    if ml == 0:
        raise InputError(f"{what} is empty: no brain found; give a brain mask with --brain-mask FILE")
    not_brain = "the image does not look like a brain scan; give a brain mask with --brain-mask FILE if it is one"
    if extracted and ml < MIN_BRAIN_ML:
        raise InputError(f"{what} is {ml:.0f} ml, too small for a brain (< {MIN_BRAIN_ML:.0f} ml): {not_brain}")
    if extracted and ml > STRIPPED_MAX_ML:
        raise InputError(f"{what} is {ml:.0f} ml, too large for a brain (> {STRIPPED_MAX_ML:.0f} ml): {not_brain}")
    fill = box_fill(mask)
    if fill > BOX_FILL_MAX:
        raise InputError(f"{what} fills {100 * fill:.0f}% of its bounding box (a box, not a brain): {not_brain}")
    contrast = tissue_contrast(reference, mask)
    if contrast < MIN_CONTRAST:
        raise InputError(f"{what} has almost uniform intensity (contrast {contrast:.2f} < {MIN_CONTRAST}), "
                         f"no grey/white matter: {not_brain}")


@functools.lru_cache(maxsize=2)
def _deepbet(device_str: str):
    """deepbet's two networks on ``device`` (loaded once per device). Only deepbet.bet is
    imported: its GUI (customtkinter) is never loaded, so no display is needed."""
    import warnings

    import torch
    from deepbet.bet import BrainExtraction

    with warnings.catch_warnings():  # deepbet ships TorchScript; torch 2.9+ calls jit.load deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        bet = BrainExtraction(no_gpu=True)  # load on the CPU, then move to the synthesis device
    device = torch.device(device_str)
    bet.model.to(device)
    bet.bbox_model.to(device)
    return bet


def extract_brain(volume: Volume, device="cpu", name: str = "t1", margin_mm: float = EXTRACTION_MARGIN_MM
                  ) -> np.ndarray:
    """Boolean brain mask of ``volume`` on its own grid, by deepbet (threshold 0.5, largest
    component, holes filled: deepbet's defaults), computed on ``device``, grown by ``margin_mm``."""
    import nibabel as nib
    import torch

    bet = _deepbet(str(torch.device(device)))
    image = nib.Nifti1Image(np.asarray(volume.array, dtype=np.float32), volume.affine)
    try:
        _, mask_image, _ = bet.run(image)
    except (AssertionError, ValueError) as exc:  # deepbet's ways of saying "no foreground"
        raise InputError(f"{name}: brain extraction (deepbet) found no brain ({exc}); give a brain mask with "
                         "--brain-mask FILE") from exc
    mask = np.asarray(mask_image.dataobj) > 0
    if mask.shape != volume.shape:  # deepbet returns the input's voxel order; guard anyway
        raise InputError(f"{name}: brain extraction returned shape {mask.shape} for a {volume.shape} volume")
    return grow_mask(mask, volume.spacing, margin_mm)


def grow_mask(mask: np.ndarray, spacing, margin_mm: float) -> np.ndarray:
    """``mask`` plus every voxel within ``margin_mm`` (physical distance) of it."""
    from scipy import ndimage

    if margin_mm <= 0 or not mask.any():
        return mask
    spacing = np.asarray(spacing, dtype=float)
    pad = np.ceil(margin_mm / spacing).astype(int) + 1
    box = tuple(slice(max(first - p, 0), last + p + 1) for (first, last), p in zip(mask_bounding_box(mask), pad))
    grown = mask.copy()  # the distance transform only in the mask's bounding box + margin: fast
    grown[box] |= ndimage.distance_transform_edt(~mask[box], sampling=spacing) <= margin_mm
    return grown


def _given_mask(spec, reference: Volume, reference_name: str) -> np.ndarray:
    """A given mask (Volume or file) as a boolean array on the reference grid."""
    mask = validate_volume(spec, "mask") if isinstance(spec, Volume) else load_volume(spec, "mask")
    if not mask.same_grid(reference):
        log.warning("mask is on a different grid than %s; resampling it (nearest neighbour)", reference_name)
        mask = resample_to_reference(mask, reference, "mask", interpolation="nearest")
    array = mask.array > 0
    if not array.any():
        raise InputError("mask: no voxel is inside the mask")
    return array


def brain_mask_spec(text: str) -> str:
    """A command-line value checked: "auto", "none" or an existing mask file (or DICOM folder)."""
    if text in BRAIN_MASK_MODES or os.path.exists(text):
        return text
    raise InputError(f"--brain-mask {text!r}: expected {' or '.join(BRAIN_MASK_MODES)} or an existing mask file")


def resolve_brain_mask(spec: MaskSpec, reference: Volume, device="cpu", reference_name: str = "t1"
                       ) -> BrainMaskDecision:
    """Decide the brain mask for a subject whose reference (T1) volume is ``reference``.

    spec: "auto" | "none" | a mask Volume | a mask file path (None means "none", as before).
    device: the torch device synthesis runs on (extraction runs there too).
    Raises InputError with one line for an empty or non-brain mask or a non-brain image.
    """
    start = time.perf_counter()
    if spec is None or (isinstance(spec, str) and spec == "none"):
        return BrainMaskDecision(None, SOURCE_NONE, "brain mask: none (the non-zero voxels of the inputs)")
    if isinstance(spec, str) and spec == "auto":
        ml = nonzero_ml(reference)
        if skull_stripped(reference):
            check_brain_like(reference.array != 0, reference, f"the non-zero region of {reference_name}", extracted=False)
            return BrainMaskDecision(None, SOURCE_STRIPPED,
                                     f"brain mask: {reference_name} is already skull-stripped (non-zero region "
                                     f"{ml:.0f} ml <= {STRIPPED_MAX_ML:.0f} ml); using its non-zero voxels",
                                     time.perf_counter() - start)
        array = extract_brain(reference, device, reference_name)
        check_brain_like(array, reference, f"the brain extracted from {reference_name}", extracted=True)
        seconds = time.perf_counter() - start
        return BrainMaskDecision(array, SOURCE_EXTRACTED,
                                 f"brain mask: extracted from {reference_name} with deepbet "
                                 f"({np.count_nonzero(array) * voxel_ml(reference):.0f} ml, {seconds:.1f} s; "
                                 f"non-zero region {ml:.0f} ml > {STRIPPED_MAX_ML:.0f} ml: not skull-stripped)",
                                 seconds)
    if isinstance(spec, (str, os.PathLike, Volume)):
        if isinstance(spec, (str, os.PathLike)) and not os.path.exists(os.fspath(spec)):
            raise InputError(f"brain mask: {os.fspath(spec)!r} is neither {' nor '.join(BRAIN_MASK_MODES)} "
                             "nor an existing mask file")
        array = _given_mask(spec, reference, reference_name)
        where = "" if isinstance(spec, Volume) else f" ({os.fspath(spec)})"
        return BrainMaskDecision(array, SOURCE_GIVEN,
                                 f"brain mask: given{where}, {np.count_nonzero(array) * voxel_ml(reference):.0f} ml",
                                 time.perf_counter() - start)
    raise InputError(f"brain mask: expected {', '.join(BRAIN_MASK_MODES)}, a Volume or a file, got {type(spec).__name__}")
