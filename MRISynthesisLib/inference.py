"""Whole-volume synthesis: volumes by modality name + a bundle -> synthetic target volume.

Used as it is by the command line, the Slicer module and evaluation.

    >>> from MRISynthesisLib.inference import synthesize
    >>> flair = synthesize({"t1": "t1.nii.gz", "t2": "t2.nii.gz"}, "model.safetensors",
    ...                    precision="bf16")
    >>> flair.array.shape, flair.affine      # the T1's grid, exactly
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Union

import numpy as np
import torch

from .brainmask import BrainMaskDecision, MaskSpec, resolve_brain_mask
from .bundle import ModelBundle, load_bundle
from .errors import Cancelled, InputError
from .preprocessing import SliceStack
from .volumes import Volume, align_to_reference, load_volume, validate_volume

log = logging.getLogger(__name__)

# "auto" picks by measurement (preferred_precision): bf16 where the hardware has it natively.
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
# Batches of 1-4 slices ran equally fast here, 8 was 5-10% slower (docs/performance.md).
DEFAULT_BATCH_SIZE = 4

VolumeLike = Union[Volume, str, os.PathLike]
ProgressCallback = Callable[[int, int], None]  # (slices done, slices total)


def resolve_device(device: str = "auto") -> torch.device:
    """"auto" -> CUDA when available, else CPU; "cuda" without a GPU is an error."""
    if device not in DEVICES:
        raise InputError(f"unknown device {device!r}; expected one of {DEVICES}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' was requested but PyTorch sees no CUDA GPU; use --device cpu or auto")
    return torch.device(device)


def preferred_precision(device: torch.device) -> str:
    """The faster precision on ``device``, by measurement (docs/performance.md): "bf16"
    where the hardware computes in bf16 natively (a CUDA GPU with bf16 support, a CPU with
    AVX512-BF16 or AMX as oneDNN reports), else "fp32" (emulated bf16 is slower)."""
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # older or non-oneDNN builds: stay on the safe side
        native = False
    return "bf16" if native else "fp32"


def resolve_precision(device: torch.device, precision: str) -> str:
    """"auto" -> preferred_precision(device); "fp32"/"bf16" as given."""
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    return preferred_precision(device) if precision == "auto" else precision


def autocast_context(device: torch.device, precision: str):
    if resolve_precision(device, precision) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _as_volume(value: VolumeLike, name: str) -> Volume:
    if isinstance(value, Volume):
        return validate_volume(value, name)
    return load_volume(value, name)


def check_inputs(inputs: Mapping[str, Optional[VolumeLike]], bundle: ModelBundle) -> dict:
    """The bundle's sources, each given exactly once; extra modalities are refused by name."""
    given = {k: v for k, v in inputs.items() if v is not None}
    missing = [s for s in bundle.sources if s not in given]
    if missing:
        raise InputError(f"the model needs {', '.join(bundle.sources)} but {', '.join(missing)} "
                         f"{'was' if len(missing) == 1 else 'were'} not given")
    extra = [s for s in given if s not in bundle.sources]
    if extra:
        raise InputError(f"the model ({' + '.join(bundle.sources)} -> {bundle.target}) cannot use "
                         f"{', '.join(extra)}; choose a model trained with those inputs or leave them out")
    return given


@dataclass
class SynthesisResult:
    """``volume``: the synthetic target; ``brain_mask``: the brain region it was computed in
    (1 inside, on the same grid); ``mask_decision``: how that mask was chosen
    (MRISynthesisLib.brainmask: source "given" / "extracted (deepbet)" / ...)."""

    volume: Volume
    brain_mask: Volume
    mask_decision: BrainMaskDecision


def synthesize(inputs: Mapping[str, Optional[VolumeLike]], bundle: Union[ModelBundle, str, os.PathLike],
               mask: MaskSpec = "auto", *args, **kwargs) -> Volume:
    """Synthesise the bundle's target contrast; see ``synthesize_with_details`` (this returns
    only the synthetic volume)."""
    return synthesize_with_details(inputs, bundle, mask, *args, **kwargs).volume


def synthesize_with_details(
    inputs: Mapping[str, Optional[VolumeLike]],
    bundle: Union[ModelBundle, str, os.PathLike],
    mask: MaskSpec = "auto",
    reference: Optional[str] = None,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[Callable[[], bool]] = None,
    generator: Optional[torch.nn.Module] = None,
) -> SynthesisResult:
    """Synthesise the bundle's target contrast on the reference volume's grid.

    inputs: modality name ("t1", "t2", "t1c") -> Volume or file path.
    reference: the modality whose grid the output takes; default the bundle's first source
        (T1). Inputs on other grids are resampled onto it in physical space, with a warning.
    mask: the brain-mask spec of MRISynthesisLib.brainmask: "auto" (default: extract the
        brain from the reference unless it is already skull-stripped), "none" (or None: the
        non-zero voxels), or a mask Volume / file (non-zero = brain). Outside the brain the
        output is background (0).
    progress(done, total) is called after each batch; cancel() returning True raises
    ``Cancelled`` between batches. ``generator`` reuses an already built network.
    Returns the float32 volume in [0, output_max] (see preprocessing), the brain mask used
    and the mask decision.
    """
    if not isinstance(bundle, ModelBundle):
        bundle = load_bundle(bundle)
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    given = check_inputs(inputs, bundle)
    reference = reference or bundle.sources[0]
    if reference not in given:
        raise InputError(f"reference modality {reference!r} is not among the inputs {sorted(given)}")
    torch_device = resolve_device(device)
    autocast = autocast_context(torch_device, precision)

    volumes = {name: _as_volume(given[name], name) for name in bundle.sources}
    volumes = align_to_reference(volumes, reference)
    ref = volumes[reference]
    decision = resolve_brain_mask(mask, ref, torch_device, reference)
    log.info(decision.description)

    stack = SliceStack([volumes[s].array for s in bundle.sources], ref.affine, bundle.preprocessing,
                       mask=decision.array, names=bundle.sources)
    del volumes
    net = generator if generator is not None else bundle.build_generator(torch_device)
    output = stack.empty_output()
    indices = stack.brain_slices
    total = len(indices)
    if progress:
        progress(0, total)
    with torch.inference_mode(), autocast:
        for start in range(0, total, batch_size):
            if cancel is not None and cancel():
                raise Cancelled("synthesis cancelled")
            chunk = indices[start : start + batch_size]
            x = stack.batch(chunk).to(torch_device, non_blocking=True)
            y = net(x).synthetic
            stack.put(output, chunk, y.float().cpu())
            if progress:
                progress(min(start + batch_size, total), total)
    used = stack.orientation.inverse(stack.mask).astype(np.float32)
    return SynthesisResult(Volume(stack.finish(output), ref.affine.copy()),
                           Volume(np.ascontiguousarray(used), ref.affine.copy()), decision)
