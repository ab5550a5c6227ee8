"""Speed and memory benchmark: how fast the generators run against what the machine can do.

    python -m MRISynthesisLib.benchmark [--width 64] [--quick] [-o benchmark.json]
    (also ``mrisynthesis bench-network``; ``mrisynthesis bench`` is the end-to-end benchmark)

What it measures, on the CPU always and on CUDA when PyTorch sees a GPU:

- the machine's own peak: a dense matmul and a 3x3 convolution (256 -> 256 channels on
  64x64, the generator's dominant layer), fp32 and bf16, best of contiguous and
  channels-last memory layouts;
- per model (paper generator with M = 1, 2, 3 sources and the pix2pix U-Net with
  M = 2), fp32 and bf16: per-slice time, slices/s, time for a 155-slice volume, the
  generator's FLOPs per slice, achieved GFLOP/s and its fraction of the measured peaks
  (training throughput is measured by the training package: ``python -m training bench``);
- an inference-variant sweep on one model (precision, inference mode, channels-last,
  batch size, threads): the before/after of each optimisation in one run;
- end-to-end ``synthesize`` on synthetic volumes of 155 and 310 slices, each in a fresh
  subprocess so that its peak resident memory (ru_maxrss) is its own;
- optionally (``--data`` or MRISYNTHESIS_DATA) bf16 vs fp32 output PSNR on real cases.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode``: convolutions and
matrix products only (1 multiply-accumulate = 2 FLOPs); norms, activations and other
element-wise work are not counted, so GFLOP/s slightly understates the work done.
Times are medians of repeated runs after warm-up. The load average is recorded because
the machine may be shared.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
from torch import nn

from .networks import ModelConfig, build_generator, init_weights

SCHEMA = "mrisynthesis-benchmark/1"
VOLUME_SLICES = 155  # a BraTS-sized axial stack, the "whole volume" of the issue
FLOP_CONVENTION = ("FLOPs counted by torch.utils.flop_counter.FlopCounterMode over convolutions and "
                   "matrix products; 1 multiply-accumulate = 2 FLOPs; norms, activations and "
                   "element-wise operations are not counted")
PAPER_WIDTH = 64
DATA_ENV = "MRISYNTHESIS_DATA"


# --------------------------------------------------------------------------- machine


def machine_info() -> dict:
    """CPU model, cores and the instruction-set flags that matter for bf16."""
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "cpu_model": platform.processor() or None}
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not info.get("cpu_model_name"):
                    info["cpu_model_name"] = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_tile", "amx_int8")
    info["isa_flags"] = {f: f in flags for f in wanted}
    info["amx"] = bool(flags & {"amx_bf16", "amx_tile"})
    if torch.cuda.is_available():
        info["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def load_average() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def _proc_status(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def current_rss_bytes() -> Optional[int]:
    return _proc_status("VmRSS")


def own_peak_rss_bytes() -> int:
    """Peak resident memory of this process image alone. ru_maxrss is inherited from the
    parent across fork/exec (a child of a 3.7 GB benchmark reports 3.7 GB), so Linux's
    per-address-space high-water mark VmHWM is used where it exists."""
    hwm = _proc_status("VmHWM")
    return hwm if hwm is not None else peak_rss_bytes()


# --------------------------------------------------------------------------- timing, FLOPs


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, warmup: int = 1, repeats: int = 3) -> List[float]:
    """Seconds per call for ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs (1 MAC = 2 FLOPs) of the convolutions and matrix products ``fn`` runs."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def generator_flops_per_slice(net: nn.Module, num_sources: int, size: int = 256) -> int:
    x = torch.zeros(1, num_sources, size, size, device=next(net.parameters()).device)
    with torch.inference_mode():
        return count_flops(lambda: net(x))


# --------------------------------------------------------------------------- peak


def measure_peak(device: torch.device, dtype: torch.dtype, quick: bool, warmup: int, repeats: int) -> dict:
    """Dense matmul and 3x3 convolution throughput (GFLOP/s) in ``dtype``."""
    n = 512 if quick else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    mm_flops = 2 * n ** 3
    with torch.inference_mode():
        t_mm = statistics.median(time_call(lambda: torch.mm(a, b), device, warmup, repeats))
        ch, hw, batch = (32, 32, 2) if quick else (256, 64, 4)
        conv = nn.Conv2d(ch, ch, 3, 1, 1).to(device=device, dtype=dtype)
        x = torch.randn(batch, ch, hw, hw, device=device, dtype=dtype)
        conv_flops = count_flops(lambda: conv(x))
        layouts = {}
        for layout in ("contiguous", "channels_last"):
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            c = copy.deepcopy(conv).to(memory_format=fmt)
            xi = x.contiguous(memory_format=fmt)
            t = statistics.median(time_call(lambda: c(xi), device, warmup, repeats))
            layouts[layout] = conv_flops / t / 1e9
    best = max(layouts, key=layouts.get)
    return {
        "dtype": str(dtype).replace("torch.", ""),
        "matmul": {"n": n, "flops": mm_flops, "seconds": t_mm, "gflops_per_s": mm_flops / t_mm / 1e9},
        "conv3x3": {"shape": [batch, ch, hw, hw], "flops": conv_flops, "gflops_per_s": layouts[best],
                    "best_layout": best, "gflops_per_s_by_layout": layouts},
    }


# --------------------------------------------------------------------------- inference variants


@dataclass(frozen=True)
class Variant:
    """One way to run the generator forward."""

    name: str
    precision: str = "fp32"  # fp32 | bf16-autocast | bf16-native
    inference_mode: bool = True  # False: torch.no_grad
    channels_last: bool = False
    batch_size: int = 4
    threads: Optional[int] = None  # None: PyTorch's default


def prepare(net: nn.Module, variant: Variant, device: torch.device) -> nn.Module:
    net = copy.deepcopy(net).to(device).eval()
    if variant.precision == "bf16-native":
        net = net.to(torch.bfloat16)
    if variant.channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net


def forward_fn(net: nn.Module, variant: Variant, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    device = x.device
    if variant.precision == "bf16-native":
        x = x.to(torch.bfloat16)
    if variant.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def run():
        grad_ctx = torch.inference_mode() if variant.inference_mode else torch.no_grad()
        amp = (torch.autocast(device_type=device.type, dtype=torch.bfloat16)
               if variant.precision == "bf16-autocast" else contextlib.nullcontext())
        with grad_ctx, amp:
            return net(x).synthetic

    return run


def time_variant(net: nn.Module, num_sources: int, variant: Variant, device: torch.device,
                 warmup: int, repeats: int, flops_per_slice: int) -> dict:
    previous_threads = torch.get_num_threads()
    if variant.threads is not None and device.type == "cpu":
        torch.set_num_threads(variant.threads)
    try:
        prepared = prepare(net, variant, device)
        gen = torch.Generator().manual_seed(0)
        x = (torch.rand(variant.batch_size, num_sources, 256, 256, generator=gen) * 2 - 1).to(device)
        times = time_call(forward_fn(prepared, variant, x), device, warmup, repeats)
    finally:
        torch.set_num_threads(previous_threads)
    per_slice = statistics.median(times) / variant.batch_size
    row = {"variant": variant.name, "precision": variant.precision, "inference_mode": variant.inference_mode,
           "channels_last": variant.channels_last, "batch_size": variant.batch_size,
           "threads": variant.threads or previous_threads, "times_s": times}
    row.update(derived_figures(per_slice, flops_per_slice))
    return row


def derived_figures(per_slice_s: float, flops_per_slice: int) -> dict:
    """Figures that follow from one per-slice time (kept in one place so they agree)."""
    return {"per_slice_s": per_slice_s, "slices_per_s": 1.0 / per_slice_s,
            "volume_155_s": VOLUME_SLICES * per_slice_s, "flops_per_slice": flops_per_slice,
            "gflops_per_s": flops_per_slice / per_slice_s / 1e9}


# --------------------------------------------------------------------------- end-to-end volume


def _synthetic_sources(num_sources: int, slices: int, size: int = 240):
    """Smooth brain-like volumes (an ellipsoid of texture in every slice), float32."""
    import numpy as np

    rng = np.random.default_rng(0)
    zz, yy, xx = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), np.linspace(-1, 1, 1),
                             indexing="ij")
    inside = ((zz / 0.8) ** 2 + (yy / 0.9) ** 2 <= 1.0)[:, :, 0]
    arrays = []
    for m in range(num_sources):
        vol = np.zeros((size, size, slices), dtype=np.float32)
        base = (rng.random((size, size)).astype(np.float32) * 200 + 300 * (m + 1)) * inside
        for k in range(slices):
            vol[:, :, k] = base * (1.0 + 0.1 * np.sin(k / 7.0))
        arrays.append(vol)
    return arrays


def volume_child(spec: dict) -> dict:
    """Run one end-to-end synthesis (in a fresh process) and report time and peak memory."""
    import numpy as np

    from .bundle import bundle_from_generator
    from .inference import synthesize
    from .volumes import Volume

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    rss_after_import = own_peak_rss_bytes()
    config = ModelConfig(architecture=spec["architecture"], num_sources=spec["num_sources"],
                         base_width=spec["width"])
    torch.manual_seed(0)
    net = init_weights(build_generator(config))
    sources = ("t1", "t2", "t1c")[: config.num_sources]
    bundle = bundle_from_generator(net, config, sources)
    del net
    arrays = _synthetic_sources(config.num_sources, spec["slices"])
    affine = np.eye(4)
    inputs = {name: Volume(a, affine) for name, a in zip(sources, arrays)}
    del arrays
    volume_bytes = spec["slices"] * 240 * 240 * 4
    rss_before = current_rss_bytes()
    start = time.perf_counter()
    # mask="none": the synthetic cylinders are no brain scans; brain extraction is timed apart.
    out = synthesize(inputs, bundle, mask="none", device=spec["device"], precision=spec["precision"],
                     batch_size=spec["batch_size"])
    seconds = time.perf_counter() - start
    result = {"slices": spec["slices"], "seconds": seconds, "per_slice_s": seconds / spec["slices"],
              "peak_rss_bytes": own_peak_rss_bytes(), "rss_after_import_bytes": rss_after_import,
              "rss_before_synthesize_bytes": rss_before, "volume_bytes": volume_bytes,
              "output_shape": list(out.array.shape)}
    if spec["device"] == "cuda":
        result["cuda_peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
    return result


def measure_volume(spec: dict, timeout: float = 1800) -> dict:
    """``volume_child`` in a subprocess: its ru_maxrss is the peak of that synthesis alone."""
    code = ("import json, sys; from MRISynthesisLib.benchmark import volume_child; "
            "print('RESULT ' + json.dumps(volume_child(json.loads(sys.argv[1]))))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True,
                          timeout=timeout, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            result.update({k: spec[k] for k in ("precision", "batch_size", "architecture", "num_sources", "width",
                                                 "device")})
            return result
    raise RuntimeError(f"volume measurement failed (exit {proc.returncode}): {proc.stderr[-2000:]}")


# --------------------------------------------------------------------------- bf16 vs fp32 output


def precision_check(data_dir: str, width: int, subjects: Sequence[str], max_slices: int, batch_size: int) -> dict:
    """bf16 vs fp32 output PSNR (fp32 output as reference) through the inference
    preprocessing on real cases, with a randomly initialised T1+T2 -> FLAIR generator
    (no trained weights exist yet, so this is a weak check of numerical agreement only)."""
    import numpy as np

    from .inference import NetworkFeed, prepare_generator
    from .metrics import psnr
    from .preprocessing import (PreprocessingConfig, SliceStack, normalize_intensity, select_middle_slices,
                                to_output_scale)
    from .volumes import load_volume

    config = ModelConfig(architecture="fdgan", num_sources=2, base_width=width)
    torch.manual_seed(0)
    net = init_weights(build_generator(config)).eval()
    device = torch.device("cpu")
    cases = []
    for subject in subjects:
        folder = os.path.join(data_dir, subject)
        paths = [os.path.join(folder, f"{m}.nii.gz") for m in ("t1", "t2")]
        if not all(os.path.isfile(p) for p in paths):
            continue
        vols = [load_volume(p, m) for p, m in zip(paths, ("t1", "t2"))]
        stack = SliceStack([v.array for v in vols], vols[0].affine, PreprocessingConfig(), names=["t1", "t2"])
        indices = select_middle_slices(stack.brain_slices, max_slices)
        outputs = {}
        for precision in ("fp32", "bf16"):  # each run the way synthesize() runs it
            out = stack.empty_output()
            feed, prepared = NetworkFeed.of(device, precision), prepare_generator(net, device, precision)
            with torch.inference_mode(), feed.context():
                for start in range(0, len(indices), batch_size):
                    chunk = indices[start:start + batch_size]
                    stack.put(out, chunk, prepared(feed.input(stack.batch(chunk))).synthetic.float())
            outputs[precision] = stack.finish(out)
        ref, test = outputs["fp32"], outputs["bf16"]
        # Brain voxels of the measured slices, in the file's voxel order (as finish() returns).
        selected = np.zeros(stack.mask.shape, dtype=bool)
        selected[..., indices] = True
        region = stack.orientation.inverse(selected & stack.mask)
        case = {"subject": subject, "slices": int(len(indices)),
                "psnr_bf16_vs_fp32_db": psnr(ref[region], test[region]),
                "max_abs_diff": float(np.abs(ref[region] - test[region]).max()),
                "fp32_output_std_in_brain": float(ref[region].std())}
        flair_path = os.path.join(folder, "flair.nii.gz")
        if os.path.isfile(flair_path):
            # The criterion literally: PSNR against the real FLAIR (in the output
            # scale, normalised as in training) for fp32 and bf16, and their difference.
            flair = load_volume(flair_path, "flair").array
            real = to_output_scale(normalize_intensity(flair, None, PreprocessingConfig(), "flair"),
                                   PreprocessingConfig())
            case["psnr_vs_real_fp32_db"] = psnr(real[region], ref[region])
            case["psnr_vs_real_bf16_db"] = psnr(real[region], test[region])
            case["psnr_vs_real_difference_db"] = abs(case["psnr_vs_real_fp32_db"] - case["psnr_vs_real_bf16_db"])
        cases.append(case)
    if not cases:
        return {"skipped": f"no subject with t1 and t2 found in {data_dir}"}
    return {"note": f"randomly initialised width-{width} T1+T2 generator (no trained weights yet): a weak check; "
                    "PSNR of the bf16 output against the fp32 output, brain voxels of the measured slices, "
                    "MAX = max of the fp32 output, output scale [0, 1000]",
            "width": width, "cases": cases,
            "min_psnr_db": min(c["psnr_bf16_vs_fp32_db"] for c in cases),
            "max_psnr_vs_real_difference_db": max((c.get("psnr_vs_real_difference_db", 0.0) for c in cases))}


# --------------------------------------------------------------------------- the benchmark


MODELS = {
    "fdgan-m1": ("fdgan", 1),
    "fdgan-m2": ("fdgan", 2),
    "fdgan-m3": ("fdgan", 3),
    "pix2pix-m2": ("pix2pix_unet", 2),
}
PRECISIONS = ("fp32", "bf16")  # the table's rows, each run as synthesize() runs it (inference_variant)


def inference_variant(precision: str, device: torch.device, batch_size: int) -> Variant:
    """The Variant that feeds the generator as inference does at ``precision`` on ``device``
    (inference.NetworkFeed: bf16 weights on the CPU, channels-last with AMX, else autocast)."""
    from .inference import NetworkFeed

    feed = NetworkFeed.of(device, precision)
    run_as = "fp32" if feed.precision == "fp32" else "bf16-native" if feed.native_bf16 else "bf16-autocast"
    return Variant(precision, run_as, channels_last=feed.channels_last, batch_size=batch_size)


def sweep_variants(batch_size: int, cpu_threads: int, quick: bool = False) -> List[Variant]:
    """Before/after of each inference optimisation, on one model."""
    b = batch_size
    variants = [
        Variant("baseline: fp32, no_grad", "fp32", inference_mode=False, batch_size=b),
        Variant("fp32 + inference_mode", "fp32", batch_size=b),
        Variant("fp32 + inference_mode + channels_last", "fp32", channels_last=True, batch_size=b),
        Variant("bf16 autocast", "bf16-autocast", batch_size=b),
        Variant("bf16 autocast + channels_last", "bf16-autocast", channels_last=True, batch_size=b),
        Variant("bf16 native weights", "bf16-native", batch_size=b),
        Variant("bf16 native weights + channels_last", "bf16-native", channels_last=True, batch_size=b),
    ]
    if quick:  # enough to exercise every code path
        variants = [variants[0], variants[4], variants[6]]
    for size in sorted(({1} if quick else {1, 2, 8}) - {b}):
        variants.append(Variant(f"bf16 autocast, batch {size}", "bf16-autocast", batch_size=size))
    if cpu_threads > 1:
        variants.append(Variant("bf16 autocast, 1 thread", "bf16-autocast", batch_size=b, threads=1))
    return variants


def run_benchmark(width: int = PAPER_WIDTH, models: Sequence[str] = tuple(MODELS), devices: Optional[Sequence[str]] = None,
                  batch_size: int = 4, warmup: int = 1, repeats: int = 3, quick: bool = False,
                  sweep_model: Optional[str] = "fdgan-m2",
                  volume_slices: Sequence[int] = (155, 310), volume_precision: str = "bf16",
                  volume_batch_size: int = 8, data_dir: Optional[str] = None, psnr_slices: int = 24,
                  psnr_subjects: Sequence[str] = ("brats-gli-00001", "ms-mni-07"),
                  log: Callable[[str], None] = lambda s: None) -> dict:
    """Run the whole benchmark and return the result dictionary (see ``write``/``format_table``)."""
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; expected some of {list(MODELS)}")
    if devices is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for d in devices:
        if d not in ("cpu", "cuda"):
            raise ValueError(f"unknown device {d!r}; expected cpu or cuda")
        if d == "cuda" and not torch.cuda.is_available():
            raise ValueError("device cuda was requested but PyTorch sees no CUDA GPU")
    result = {"schema": SCHEMA, "flop_convention": FLOP_CONVENTION, "machine": machine_info(),
              "load_average_start": load_average(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "settings": {"width": width, "models": list(models), "batch_size": batch_size, "warmup": warmup,
                           "repeats": repeats, "quick": quick,
                           "volume_slices": list(volume_slices), "volume_precision": volume_precision,
                           "volume_batch_size": volume_batch_size, "statistic": "median"},
              "devices": {}}
    for dev_name in devices:
        device = torch.device(dev_name)
        dev = {"load_average_start": load_average()}
        log(f"[{dev_name}] peak throughput")
        dev["peak"] = {p: measure_peak(device, dtype, quick, warmup, max(repeats, 3))
                       for p, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
        rows = []
        for model in models:
            arch, m = MODELS[model]
            config = ModelConfig(architecture=arch, num_sources=m, base_width=width)
            torch.manual_seed(0)
            net = init_weights(build_generator(config)).eval()
            flops = generator_flops_per_slice(net, m)
            for precision in PRECISIONS:
                log(f"[{dev_name}] {model} {precision} inference")
                variant = inference_variant(precision, device, batch_size)
                row = time_variant(net, m, variant, device, warmup, repeats, flops)
                row.update({"model": model, "architecture": arch, "num_sources": m, "width": width,
                            "precision": precision, "run_as": variant.precision,
                            "parameters": sum(p.numel() for p in net.parameters())})
                peak = dev["peak"][precision]
                row["fraction_of_conv3x3_peak"] = row["gflops_per_s"] / peak["conv3x3"]["gflops_per_s"]
                row["fraction_of_matmul_peak"] = row["gflops_per_s"] / peak["matmul"]["gflops_per_s"]
                row["process_peak_rss_bytes"] = peak_rss_bytes()
                rows.append(row)
            del net
        dev["models"] = rows
        if sweep_model:
            arch, m = MODELS[sweep_model]
            config = ModelConfig(architecture=arch, num_sources=m, base_width=width)
            torch.manual_seed(0)
            net = init_weights(build_generator(config)).eval()
            flops = generator_flops_per_slice(net, m)
            sweep = []
            for variant in sweep_variants(batch_size, torch.get_num_threads(), quick):
                if variant.threads is not None and dev_name != "cpu":
                    continue
                log(f"[{dev_name}] sweep {sweep_model}: {variant.name}")
                row = time_variant(net, m, variant, device, warmup, repeats, flops)
                peak = dev["peak"]["fp32" if variant.precision == "fp32" else "bf16"]
                row["fraction_of_conv3x3_peak"] = row["gflops_per_s"] / peak["conv3x3"]["gflops_per_s"]
                sweep.append(row)
            base = sweep[0]["per_slice_s"]
            for row in sweep:
                row["speedup_vs_baseline"] = base / row["per_slice_s"]
            dev["sweep"] = {"model": sweep_model, "width": width, "rows": sweep}
        volumes = []
        for slices in volume_slices:
            log(f"[{dev_name}] end-to-end volume, {slices} slices (subprocess)")
            spec = {"architecture": "fdgan", "num_sources": 2, "width": width, "slices": int(slices),
                    "precision": volume_precision, "batch_size": volume_batch_size, "device": dev_name,
                    "threads": None}
            volumes.append(measure_volume(spec))
        dev["volume"] = volumes
        dev["load_average_end"] = load_average()
        result["devices"][dev_name] = dev
    if data_dir:
        log(f"bf16 vs fp32 output on real cases in {data_dir}")
        result["precision_check"] = precision_check(data_dir, width, psnr_subjects, psnr_slices, batch_size)
    result["checks"] = summarize_checks(result)
    result["load_average_end"] = load_average()
    result["process_peak_rss_bytes"] = peak_rss_bytes()
    return result


def summarize_checks(result: dict) -> dict:
    """The issue's targets, computed from the measurements (CPU)."""
    checks = {}
    cpu = result["devices"].get("cpu")
    if cpu:
        bf16 = [r for r in cpu["models"] if r["architecture"] == "fdgan" and r["precision"] == "bf16"]
        if bf16:
            worst = min(r["fraction_of_conv3x3_peak"] for r in bf16)
            checks["bf16_paper_generator_min_fraction_of_conv3x3_peak"] = worst
            checks["bf16_half_of_conv_peak"] = worst >= 0.5
        vols = sorted(cpu.get("volume", []), key=lambda v: v["slices"])
        if vols:
            v155 = [v for v in vols if v["slices"] == VOLUME_SLICES]
            if v155:
                checks["volume_155_peak_rss_gb"] = v155[0]["peak_rss_bytes"] / 1e9
                checks["volume_155_under_3gb"] = v155[0]["peak_rss_bytes"] < 3e9
            if len(vols) >= 2:
                a, b = vols[0], vols[-1]
                growth = b["peak_rss_bytes"] - a["peak_rss_bytes"]
                extra_volume = b["volume_bytes"] - a["volume_bytes"]
                checks["volume_peak_growth_bytes"] = growth
                checks["volume_extra_bytes_per_volume"] = extra_volume
                # Inputs, normalised channels, output and finish() temporaries: a handful of
                # volume-sized arrays; growth by network activations would be far larger.
                checks["volume_growth_in_volume_units"] = growth / extra_volume if extra_volume else None
    pc = result.get("precision_check")
    if pc and "min_psnr_db" in pc:
        checks["bf16_vs_fp32_min_psnr_db"] = pc["min_psnr_db"]
        checks["bf16_fp32_psnr_vs_real_max_difference_db"] = pc["max_psnr_vs_real_difference_db"]
        checks["bf16_within_0.1db"] = pc["max_psnr_vs_real_difference_db"] <= 0.1
    return checks


# --------------------------------------------------------------------------- output


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def format_table(result: dict) -> str:
    lines = []
    m = result["machine"]
    lines.append(f"machine: {m.get('cpu_model_name') or m.get('cpu_model')}, {m['cpu_count']} CPUs, "
                 f"torch {m['torch']} ({m['torch_threads']} threads), AMX: {'yes' if m['amx'] else 'no'}, "
                 f"avx512_bf16: {'yes' if m['isa_flags'].get('avx512_bf16') else 'no'}; "
                 f"load average {result['load_average_start']} -> {result.get('load_average_end')}")
    lines.append(f"FLOPs: {result['flop_convention']}")
    for dev_name, dev in result["devices"].items():
        lines.append("")
        lines.append(f"== {dev_name} ==")
        for p, peak in dev["peak"].items():
            lines.append(f"peak {p}: matmul {peak['matmul']['gflops_per_s']:.0f} GFLOP/s, 3x3 conv "
                         f"{peak['conv3x3']['gflops_per_s']:.0f} GFLOP/s ({peak['conv3x3']['best_layout']})")
        header = (f"{'model':<11} {'prec':<5} {'ms/slice':>9} {'slices/s':>9} {'155 sl. s':>9} {'GFLOP/sl':>9} "
                  f"{'GFLOP/s':>8} {'%conv':>6} {'%mm':>5} {'peakRSS MB':>10}")
        lines.append(header)
        lines.append("-" * len(header))
        ways = sorted({f"{r['precision']} as {r['run_as']}" + (" + channels_last" if r['channels_last'] else "")
                       for r in dev["models"]})
        lines.append(f"(each as synthesize() feeds it, {m['torch_threads']} PyTorch threads: {', '.join(ways)})")
        for r in dev["models"]:
            lines.append(f"{r['model']:<11} {r['precision']:<5} {1000 * r['per_slice_s']:9.1f} {r['slices_per_s']:9.2f} "
                         f"{r['volume_155_s']:9.1f} {r['flops_per_slice'] / 1e9:9.2f} {r['gflops_per_s']:8.1f} "
                         f"{100 * r['fraction_of_conv3x3_peak']:5.0f}% {100 * r['fraction_of_matmul_peak']:4.0f}% "
                         f"{r['process_peak_rss_bytes'] / 2**20:10.0f}")
        lines.append("training throughput: python -m training bench")
        if dev.get("sweep"):
            s = dev["sweep"]
            lines.append("")
            lines.append(f"inference variants, {s['model']} width {s['width']}:")
            lines.append(f"{'variant':<42} {'batch':>5} {'thr':>3} {'ms/slice':>9} {'GFLOP/s':>8} {'%conv':>6} {'speedup':>7}")
            for r in s["rows"]:
                lines.append(f"{r['variant']:<42} {r['batch_size']:5d} {r['threads']:3d} {1000 * r['per_slice_s']:9.1f} "
                             f"{r['gflops_per_s']:8.1f} {100 * r['fraction_of_conv3x3_peak']:5.0f}% "
                             f"{r['speedup_vs_baseline']:6.2f}x")
        if dev.get("volume"):
            lines.append("")
            lines.append("end-to-end synthesize (subprocess, synthetic 240x240xN volumes, paper generator M=2):")
            for v in dev["volume"]:
                lines.append(f"  {v['slices']:4d} slices {v['precision']} batch {v['batch_size']}: {v['seconds']:.1f} s "
                             f"({1000 * v['per_slice_s']:.0f} ms/slice), peak RSS {v['peak_rss_bytes'] / 2**20:.0f} MB "
                             f"(after import {v['rss_after_import_bytes'] / 2**20:.0f} MB; one volume "
                             f"{v['volume_bytes'] / 2**20:.0f} MB)")
    pc = result.get("precision_check")
    if pc:
        lines.append("")
        if "cases" in pc:
            for c in pc["cases"]:
                lines.append(f"bf16 vs fp32 output, {c['subject']} ({c['slices']} slices): PSNR "
                             f"{c['psnr_bf16_vs_fp32_db']:.1f} dB, max |diff| {c['max_abs_diff']:.2f} "
                             f"(fp32 output std in brain {c['fp32_output_std_in_brain']:.1f}); vs real FLAIR "
                             f"fp32 {_fmt(c.get('psnr_vs_real_fp32_db'), '.2f')} / bf16 "
                             f"{_fmt(c.get('psnr_vs_real_bf16_db'), '.2f')} dB")
            lines.append(f"  ({pc['note']})")
        else:
            lines.append(f"bf16 vs fp32 check skipped: {pc.get('skipped')}")
    if result.get("checks"):
        lines.append("")
        lines.append("checks: " + ", ".join(f"{k}={_fmt(v, '.3g') if isinstance(v, float) else v}"
                                            for k, v in result["checks"].items()))
    return "\n".join(lines)


def write_json(result: dict, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- command line


def add_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--width", type=int, default=PAPER_WIDTH, help="generator base width (paper: 64)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS),
                        help="models to measure (default: all)")
    parser.add_argument("--device", action="append", choices=("cpu", "cuda"), dest="devices",
                        help="device to measure (repeatable; default: cpu, and cuda when present)")
    parser.add_argument("--batch-size", type=int, default=4, help="slices per forward pass in the table (default 4)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (default 3; quick 1)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing (default 1)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and single repeats (for tests; numbers are not meaningful)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the inference-variant sweep")
    parser.add_argument("--volume-slices", type=int, nargs="*", default=None,
                        help="slice counts for the end-to-end runs (default 155 310; quick 4 8; none to skip)")
    parser.add_argument("--data", default=None,
                        help=f"real data folder for the bf16-vs-fp32 PSNR check (default ${DATA_ENV}; skipped if unset)")
    parser.add_argument("--no-data", action="store_true", help="skip the real-data check even if the env var is set")
    parser.add_argument("-o", "--output", default="benchmark.json", help="JSON output path (default benchmark.json)")
    return parser


def bench_main(args) -> int:
    if args.width < 1:
        raise ValueError(f"--width must be >= 1, got {args.width}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")
    slices = args.volume_slices if args.volume_slices is not None else ([4, 8] if args.quick else [155, 310])
    data = None if args.no_data else (args.data or os.environ.get(DATA_ENV))
    if data and not os.path.isdir(data):
        if args.data:
            raise ValueError(f"--data: not a folder: {data}")
        data = None
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise ValueError(f"output folder does not exist: {out_dir}")
    result = run_benchmark(width=args.width, models=args.models, devices=args.devices, batch_size=args.batch_size,
                           warmup=args.warmup, repeats=repeats, quick=args.quick,
                           sweep_model=None if args.no_sweep else "fdgan-m2", volume_slices=slices,
                           data_dir=data, psnr_slices=4 if args.quick else 24,
                           log=lambda s: print(s, file=sys.stderr, flush=True))
    print(format_table(result))
    write_json(result, args.output)
    print(f"wrote {args.output}")
    return 0


def command_main(add_arguments, handler, prog: str, doc: str, argv=None) -> int:
    """A benchmark's own command line: its arguments, its handler, ValueError as one line."""
    parser = add_arguments(argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0]))
    args = parser.parse_args(argv)
    try:
        return handler(args)
    except ValueError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")


def main(argv=None) -> int:
    return command_main(add_bench_arguments, bench_main, "python -m MRISynthesisLib.benchmark", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
