"""Whole-volume synthesis: volumes by modality name + a bundle -> synthetic target volume.

Used as it is by the command line, the Slicer module and evaluation.

    >>> from MRISynthesisLib.inference import synthesize
    >>> flair = synthesize({"t1": "t1.nii.gz", "t2": "t2.nii.gz"}, "model.safetensors",
    ...                    precision="bf16")
    >>> flair.array.shape, flair.affine      # the T1's grid, exactly
    >>> result = synthesize_with_details({"t1": "t1.nii.gz", "t2": "t2.nii.gz"}, "model.safetensors",
    ...                                  uncertainty=True)
    >>> result.provenance          # how it was made (MRISynthesisLib.provenance)
    >>> result.uncertainty         # the test-time-augmentation spread (MRISynthesisLib.uncertainty)
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Callable, Dict, Mapping, Optional, Union

import numpy as np
import torch

from . import provenance as provenance_mod
from . import uncertainty as uncertainty_mod
from .brainmask import BrainMaskDecision, MaskSpec, resolve_brain_mask
from .bundle import ModelBundle, load_bundle
from .errors import Cancelled, InputError
from .preprocessing import SliceStack, _slice_major
from .volumes import Volume, align_to_reference, check_not_constant, load_volume, validate_volume

log = logging.getLogger(__name__)

# "auto" picks by measurement (preferred_precision): bf16 where the hardware has it natively.
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
# Batches of 1-4 slices ran equally fast here, 8 was 5-10% slower (docs/performance.md).
DEFAULT_BATCH_SIZE = 4
# CPU threads run as independent workers of one PyTorch thread each (see the thread policy below);
# True gives the old single worker with that many OpenMP threads (kept for the benchmark).
INTRA_OP_PARALLEL = False
# Memory layout of bf16 activations on the CPU: "auto" = channels-last where the CPU has AMX
# (oneDNN's AMX convolutions work in NHWC, so channels-first pays a reorder of the input and
# output of every convolution: 10-20% of the network's time at width 16 on an AMX Xeon),
# contiguous (channels-first) elsewhere (channels-last was slower on AVX512-BF16 without
# AMX: instance norm copies it back). docs/performance.md has the measurements.
CPU_LAYOUTS = ("auto", "contiguous", "channels_last")
CPU_LAYOUT = "auto"
# The stages synthesize() reports in ``timings`` (wall seconds), in order.
STAGES = ("model load", "read", "resample", "brain mask", "normalise", "network", "inverse")

VolumeLike = Union[Volume, str, os.PathLike]
ProgressCallback = Callable[[int, int], None]  # (slices done, slices total)


# ------------------------------------------------------------------ thread policy
# How many CPU threads the network runs on: every core this process may use, unless the user says.
#
# On a shared machine OpenMP threads that wait for each other at every layer are many times
# slower as soon as one core is taken by another process (docs/performance.md: 6-26 s instead
# of 9.7 s on 2 cores). So the network runs as independent workers, each one PyTorch thread,
# each taking the next batch of slices when it is free (no barrier between them: a worker
# whose core another process also wants does fewer batches). The number of workers:
#
# 1. an explicit count (``synthesize(threads=N)``, ``mrisynthesis predict --threads N``, the
#    Slicer module's setting);
# 2. else the environment: ``MRISYNTHESIS_THREADS``, then ``OMP_NUM_THREADS``;
# 3. else the cores this process may run on (``sched_getaffinity``). Leaving out the cores
#    other processes keep busy (the policy before) was slower with a core busy (10.5 and
#    12.4 s against 9.5 and 10.2 s end to end) and no faster idle (docs/performance.md).
THREADS_ENV = "MRISYNTHESIS_THREADS"


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class ThreadChoice:
    count: int
    reason: str


def _positive_int(text: str, name: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not a whole number of threads") from None
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def choose_threads(requested: Optional[int] = None) -> ThreadChoice:
    """The number of CPU threads for the network (see the module docstring for the order)."""
    if requested is not None:
        if int(requested) < 1:
            raise ValueError(f"threads must be >= 1, got {requested}")
        return ThreadChoice(int(requested), "requested")
    for name in (THREADS_ENV, "OMP_NUM_THREADS"):
        text = os.environ.get(name, "").strip()
        if text:
            return ThreadChoice(_positive_int(text, name), f"${name}")
    cpus = usable_cpus()
    return ThreadChoice(cpus, "one usable CPU" if cpus == 1 else f"{cpus} usable CPUs")


def device_choice(device: str):
    """(torch device name, device the core takes, context to run it in) for a device choice
    that may name one GPU, as the Slicer module and the worker process offer ("auto", "cpu",
    "cuda", "cuda:N"): the core runs on "cuda" = the current GPU, which is per thread, so
    "cuda:N" becomes "cuda" inside ``torch.cuda.device(N)``."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not device.startswith("cuda"):
        return "cpu", "cpu", contextlib.nullcontext()
    index = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
    return f"cuda:{index}", "cuda", torch.cuda.device(index)


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


def runs_native_bf16(device: torch.device, precision: str) -> bool:
    """bf16 on the CPU runs with bf16 weights and activations instead of autocast: the same
    numbers (autocast computes the convolutions in bf16 already; what it adds are casts
    around every padding layer and of every weight on every call, 30% of the time at
    width 16) and ~1.3x faster (docs/performance.md). CUDA keeps autocast."""
    return torch.device(device).type == "cpu" and resolve_precision(device, precision) == "bf16"


def cpu_channels_last(device: torch.device, precision: str) -> bool:
    """Whether bf16 runs on the CPU in channels-last layout (``CPU_LAYOUT``; "auto": with AMX)."""
    if not runs_native_bf16(device, precision):
        return False
    if CPU_LAYOUT not in CPU_LAYOUTS:
        raise InputError(f"unknown CPU layout {CPU_LAYOUT!r}; expected one of {CPU_LAYOUTS}")
    if CPU_LAYOUT == "auto":
        try:
            return bool(torch.cpu._is_amx_tile_supported())
        except AttributeError:  # older PyTorch: no AMX query, keep the layout everyone supports
            return False
    return CPU_LAYOUT == "channels_last"


@dataclass(frozen=True)
class NetworkFeed:
    """How batches enter a generator that ``prepare_generator`` made ready for ``device`` and
    ``precision``: bf16 input for bf16 weights, channels-last where the weights are, and
    autocast where the weights stayed fp32 (one home for the network loop and the benchmarks)."""

    device: torch.device
    precision: str
    native_bf16: bool
    channels_last: bool

    @classmethod
    def of(cls, device: Union[str, torch.device], precision: str) -> "NetworkFeed":
        device = torch.device(device)
        precision = resolve_precision(device, precision)
        return cls(device, precision, runs_native_bf16(device, precision), cpu_channels_last(device, precision))

    def input(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.native_bf16:
            x = x.to(torch.bfloat16)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def context(self):
        """Entered around the forward passes: autocast unless the weights are bf16 already."""
        return contextlib.nullcontext() if self.native_bf16 else autocast_context(self.device, self.precision)


def prepare_generator(net: torch.nn.Module, device: torch.device, precision: str) -> torch.nn.Module:
    """``net`` ready to run at ``precision`` on ``device``: eval mode, and for native bf16 a
    bf16 copy, channels-last where that is faster (the caller's network is never changed)."""
    net = net.to(device).eval()
    feed = NetworkFeed.of(device, precision)
    if feed.native_bf16:
        if any(p.dtype != torch.bfloat16 for p in net.parameters()) or feed.channels_last:
            net = copy.deepcopy(net).to(torch.bfloat16)
        if feed.channels_last:
            net = net.to(memory_format=torch.channels_last)
    return net


# A few prepared generators, keyed by bundle digest + device + precision: the Slicer module
# and other long-lived callers build a model once and reuse it while those stay the same.
_GENERATORS: "OrderedDict[tuple, torch.nn.Module]" = OrderedDict()
_GENERATORS_KEPT = 2
_GENERATORS_LOCK = threading.Lock()
_GENERATOR_BUILDS = [0]


def generator_builds() -> int:
    """How many networks ``cached_generator`` has built in this process (a reused one is not
    counted): long-lived callers such as the worker process report it."""
    return _GENERATOR_BUILDS[0]


def cached_generator(bundle: ModelBundle, device: Union[str, torch.device] = "cpu",
                     precision: str = "auto") -> torch.nn.Module:
    """The bundle's generator prepared for ``device``/``precision``, built once per
    (bundle SHA-256, device, precision) and kept for the next call (the last two kept).
    Bundles without a digest (built in memory, not loaded) are built every time."""
    device = torch.device(device)
    precision = resolve_precision(device, precision)
    if not bundle.sha256:
        return prepare_generator(bundle.build_generator(device), device, precision)
    # Keyed on how the network is prepared too (bf16 weights or autocast, layout).
    key = (bundle.sha256, NetworkFeed.of(device, precision))
    with _GENERATORS_LOCK:
        net = _GENERATORS.get(key)
        if net is not None:
            _GENERATORS.move_to_end(key)
            return net
    net = prepare_generator(bundle.build_generator(device), device, precision)
    with _GENERATORS_LOCK:
        _GENERATOR_BUILDS[0] += 1
        _GENERATORS[key] = net
        while len(_GENERATORS) > _GENERATORS_KEPT:
            _GENERATORS.popitem(last=False)
    return net


@contextlib.contextmanager
def _one_torch_thread():
    """Small tensor work (building a model, converting weights) on one thread: with OpenMP
    each of its ~200 tiny operations waits at a barrier, which costs seconds when another
    process holds a core (1.4 s instead of 0.05 s for the model load here)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class _StageClock:
    """Adds the wall seconds of each ``with clock(stage):`` block to ``timings`` (if given)."""

    def __init__(self, timings: Optional[Dict[str, float]]):
        self.timings = timings

    @contextlib.contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - start)

    def add(self, stage: str, seconds: float) -> None:
        if self.timings is not None:
            self.timings[stage] = self.timings.get(stage, 0.0) + seconds


def _as_volume(value: VolumeLike, name: str) -> Volume:
    volume = validate_volume(value, name) if isinstance(value, Volume) else load_volume(value, name)
    # Before the brain mask: a constant volume would reach brain extraction and fail there
    # with deepbet's words ("found no brain (attempt to get argmax of an empty sequence)").
    check_not_constant(volume, name)
    return volume


def device_description(device: torch.device) -> str:
    """The device for the provenance record: "cpu", or "cuda:0 (NVIDIA H100 ...)"."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(device)


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
    (MRISynthesisLib.brainmask: source "given" / "extracted (deepbet)" / ...);
    ``provenance``: the record of how it was made (MRISynthesisLib.provenance; also set as
    ``volume.provenance`` and, for its kind, ``brain_mask.provenance`` and
    ``uncertainty.provenance``, so ``save_volume`` marks each file); ``uncertainty``: the
    per-voxel test-time-augmentation spread when asked for (MRISynthesisLib.uncertainty),
    else None; ``passes``: each augmented pass's volume, only with
    ``TTAConfig(keep_passes=True)`` (validation)."""

    volume: Volume
    brain_mask: Volume
    mask_decision: BrainMaskDecision
    provenance: Optional[dict] = None
    uncertainty: Optional[Volume] = None
    passes: Optional[Dict[str, Volume]] = None


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
    threads: Optional[int] = None,
    timings: Optional[Dict[str, float]] = None,
    uncertainty: uncertainty_mod.UncertaintySpec = False,
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
    ``Cancelled`` between batches. ``generator`` reuses an already built network
    (``cached_generator`` builds and keeps one). ``threads``: CPU threads for the network;
    default $MRISYNTHESIS_THREADS, $OMP_NUM_THREADS, else the usable cores (choose_threads).
    ``timings``: a dict that receives the wall seconds of each stage (STAGES).
    ``uncertainty``: False (default: no map, no extra cost), True (the default test-time
    augmentations of MRISynthesisLib.uncertainty: one extra network pass per augmentation),
    a set name or a ``TTAConfig``; the synthetic volume is the same either way.
    Returns the float32 volume in [0, output_max] (see preprocessing), the brain mask used,
    the mask decision, the provenance record and the uncertainty map (or None).
    A constant input (one value everywhere) is refused by name before anything else.
    """
    clock = _StageClock(timings)
    with clock("model load"):
        if not isinstance(bundle, ModelBundle):
            bundle = load_bundle(bundle)
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    if threads is not None and threads < 1:
        raise InputError(f"threads must be >= 1, got {threads}")
    given = check_inputs(inputs, bundle)
    reference = reference or bundle.sources[0]
    if reference not in given:
        raise InputError(f"reference modality {reference!r} is not among the inputs {sorted(given)}")
    torch_device = resolve_device(device)
    precision = resolve_precision(torch_device, precision)
    try:
        tta = uncertainty_mod.tta_config(uncertainty)
    except (TypeError, ValueError) as exc:
        raise InputError(str(exc)) from None
    augmentations = tta.resolve(len(bundle.sources)) if tta is not None else None

    with clock("read"):
        volumes = {name: _as_volume(given[name], name) for name in bundle.sources}
    with clock("resample"):
        volumes = align_to_reference(volumes, reference)
    ref = volumes[reference]
    with clock("brain mask"):
        decision = resolve_brain_mask(mask, ref, torch_device, reference)
    log.info(decision.description)

    with clock("normalise"):
        stack = SliceStack([volumes[s].array for s in bundle.sources], ref.affine, bundle.preprocessing,
                           mask=decision.array, names=bundle.sources, modalities=bundle.sources)
    affine = ref.affine.copy()
    # Peak memory: from here on only the normalised channels are needed, and after the
    # network only the output; each input or copy kept alive is one more volume-sized array.
    del volumes, ref
    with clock("model load"), _one_torch_thread():
        net = (prepare_generator(generator, torch_device, precision) if generator is not None
               else cached_generator(bundle, torch_device, precision))
    output = stack.empty_output()
    if torch_device.type == "cpu":
        count = choose_threads(threads).count
    else:
        count = 1
    extra = None
    if augmentations is not None:
        extra = _TTAOutputs(stack, augmentations, len(bundle.sources), keep_passes=tta.keep_passes)
    _run_network(stack, output, net, torch_device, precision, batch_size, count, progress, cancel, clock,
                 context=bundle.model.context_slices, tta=extra)
    stack.release_channels()
    with clock("inverse"):
        result = stack.finish(output)
        del output  # finish consumed it (result is a reordered copy, or the same memory)
        used = np.array(stack.orientation.inverse(stack.mask), dtype=np.float32, order="F")
        uncertainty_volume = passes = None
        if extra is not None:
            uncertainty_volume = Volume(extra.finish_map(stack), affine.copy())
            if tta.keep_passes:
                passes = {a.name: Volume(extra.finish_pass(stack, i), affine.copy())
                          for i, a in enumerate(augmentations)}
    record = provenance_mod.synthesis_record(
        bundle, given, decision, device_description(torch_device), precision,
        uncertainty=uncertainty_mod.describe(augmentations) if augmentations is not None else None, mask_spec=mask)
    synthetic = Volume(result, affine, provenance=record)
    mask_volume = Volume(used, affine.copy(), provenance=provenance_mod.record_for_kind(record, provenance_mod.KIND_MASK))
    if uncertainty_volume is not None:
        uncertainty_volume.provenance = provenance_mod.record_for_kind(record, provenance_mod.KIND_UNCERTAINTY)
    return SynthesisResult(synthetic, mask_volume, decision, record, uncertainty_volume, passes)


class _TTAOutputs:
    """Where the test-time-augmentation passes of ``_run_network`` go: the per-voxel spread
    (MRISynthesisLib.uncertainty.spread) over the plain and augmented passes, slice by slice
    in RAS order, and (``keep_passes``) each augmented pass. Each pass is mapped back to the
    slice grid and clipped to [-1, 1] as the synthetic image is (SliceStack.finish), so the
    map is in the synthetic image's units once scaled."""

    def __init__(self, stack: SliceStack, augmentations, num_sources: int, keep_passes: bool = False):
        self.augmentations = tuple(augmentations)
        self.num_sources = num_sources
        self.spread = _slice_major(stack.mask.shape)
        self.spread.fill(0.0)
        self.kept = [stack.empty_output() for _ in self.augmentations] if keep_passes else None

    def slices(self, stack: SliceStack, y: torch.Tensor) -> np.ndarray:
        """Network outputs (N, 1, size, size) -> clipped planes (N, X, Y) on the slice grid."""
        return np.clip(stack.resizer.inverse(y.float()).numpy()[:, 0], -1.0, 1.0)

    def run(self, stack: SliceStack, chunk, x: torch.Tensor, plain: torch.Tensor, forward) -> None:
        """The augmented passes of one batch: ``x`` the plain input (CPU, float32), ``plain``
        the plain output (CPU), ``forward(tensor)`` the network on a CPU batch -> CPU output."""
        planes = [self.slices(stack, plain)]
        for i, augmentation in enumerate(self.augmentations):
            y = augmentation.undo(forward(augmentation.apply(x, self.num_sources)))
            planes.append(self.slices(stack, y))
            if self.kept is not None:
                for plane, k in zip(planes[-1], chunk):
                    self.kept[i][..., k] = plane
        for plane, k in zip(uncertainty_mod.spread(np.stack(planes)), chunk):
            self.spread[..., k] = plane

    def finish_map(self, stack: SliceStack) -> np.ndarray:
        """The spread in output units, 0 outside the brain, in the input's voxel order."""
        out = self.spread
        out *= np.float32(stack.config.output_max / 2.0)
        out[~stack.mask] = 0.0
        self.spread = None
        return np.asfortranarray(stack.orientation.inverse(out))

    def finish_pass(self, stack: SliceStack, index: int) -> np.ndarray:
        """Augmented pass ``index`` as the synthetic image would be (output units, input order)."""
        out, self.kept[index] = self.kept[index], None
        return stack.finish(out)


def _run_network(stack: SliceStack, output, net: torch.nn.Module, device: torch.device, precision: str,
                 batch_size: int, threads: int, progress, cancel, clock: _StageClock, context: int = 0,
                 tta: Optional[_TTAOutputs] = None) -> None:
    """Every brain slice through ``net`` into ``output``. On the CPU ``threads`` workers of
    one PyTorch thread each take batches in turn (no OpenMP barrier between them, so a
    core taken by another process slows the run by its share, not many times); progress
    and cancel are served from the calling thread. ``context``: the model's 2.5D neighbours.
    ``tta``: also run each batch's test-time augmentations (the uncertainty map)."""
    indices = stack.brain_slices
    total = len(indices)
    chunks = [indices[start:start + batch_size] for start in range(0, total, batch_size)]
    feed = NetworkFeed.of(device, precision)
    workers = 1 if device.type != "cpu" or INTRA_OP_PARALLEL else max(1, min(threads, len(chunks)))
    nets = [net] + [copy.deepcopy(net) for _ in range(workers - 1)]  # AdaIN keeps per-call state in modules
    stop = threading.Event()
    lock = threading.Lock()
    state = {"done": 0, "seconds": [0.0, 0.0, 0.0]}  # resize in, network, resize back (thread time)
    # Workers take the next batch as they finish one (not a fixed share each): a worker whose
    # core another process also wants does fewer batches instead of holding up the end.
    queue = iter(chunks)

    def next_chunk():
        with lock:
            return next(queue, None)

    def work(worker: int, check_cancel: bool) -> None:
        seconds = [0.0, 0.0, 0.0]
        with torch.inference_mode(), feed.context():
            while (chunk := next_chunk()) is not None:
                if check_cancel and cancel is not None and cancel():
                    stop.set()
                if stop.is_set():
                    break
                t0 = time.perf_counter()
                plain_input = stack.batch(chunk, context=context)
                x = feed.input(plain_input)
                t1 = time.perf_counter()
                y = nets[worker](x).synthetic
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t2 = time.perf_counter()
                y = y.float().cpu()
                stack.put(output, chunk, y)
                augmenting = 0.0
                if tta is not None:  # counted as network time: the extra passes dominate it
                    net_worker = nets[worker]
                    start_tta = time.perf_counter()
                    tta.run(stack, chunk, plain_input, y,
                            lambda batch: net_worker(feed.input(batch)).synthetic.float().cpu())
                    augmenting = time.perf_counter() - start_tta
                t3 = time.perf_counter()
                seconds = [seconds[0] + t1 - t0, seconds[1] + t2 - t1 + augmenting,
                           seconds[2] + t3 - t2 - augmenting]
                with lock:
                    state["done"] += len(chunk)
                if check_cancel and progress:
                    progress(state["done"], total)
        with lock:
            state["seconds"] = [a + b for a, b in zip(state["seconds"], seconds)]

    previous = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(threads if workers == 1 else 1)
    start = time.perf_counter()
    try:
        if progress:
            progress(0, total)
        if workers == 1:
            work(0, check_cancel=True)
        else:
            with ThreadPoolExecutor(workers, thread_name_prefix="mrisynthesis") as pool:
                futures = [pool.submit(work, w, False) for w in range(workers)]
                reported = 0
                pending = futures
                while pending:
                    _, pending = wait(pending, timeout=0.05, return_when=FIRST_EXCEPTION)
                    if any(f.done() and f.exception() for f in futures):
                        stop.set()
                        break
                    # Asked until it says yes, as the single worker does; the workers then
                    # finish the batch they are on.
                    if cancel is not None and not stop.is_set() and cancel():
                        stop.set()
                    if progress and state["done"] != reported:
                        reported = state["done"]
                        progress(reported, total)
                for f in futures:
                    f.result()  # re-raises a worker's error here
    finally:
        if device.type == "cpu":
            torch.set_num_threads(previous)
    if stop.is_set():
        raise Cancelled("synthesis cancelled")
    # Wall time of the loop, split between the stages by their share of the thread time.
    wall = time.perf_counter() - start
    spent = sum(state["seconds"]) or 1.0
    for stage, seconds in zip(("resample", "network", "inverse"), state["seconds"]):
        clock.add(stage, wall * seconds / spent)
