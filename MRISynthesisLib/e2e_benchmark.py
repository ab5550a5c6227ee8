"""End-to-end benchmark: the whole path a user waits for, stage by stage, idle and busy.

    mrisynthesis bench [--data DIR] [--case brats18-cbica-abm] [--repeats 3] [-o e2e.json]
    python -m MRISynthesisLib.e2e_benchmark ...            (the same)

Each run is a fresh process doing what ``mrisynthesis predict`` does (import, model load,
read, resample, brain mask, normalise, network, inverse, write) on a real case, for each
shipped model whose inputs the case has. It prints every stage in seconds and as a share of
the total (median over the runs), and the network stage against its arithmetic floor: the
generator's FLOPs for the brain slices divided by the machine's measured 3x3-convolution
peak in that precision (``benchmark.measure_peak``).

Contention (``--contention``, on by default): the T1+T2 model again, each thread policy run
idle and then with one core kept busy by a process this benchmark starts (a Python busy
loop), interleaved so that drifting load affects both alike; busy/idle is the issue's
figure. Policies: ``default`` (what users get: one worker per usable core,
inference.choose_threads), ``1`` and ``2`` workers, and ``openmp-2`` (one worker with 2
OpenMP threads: the behaviour before workers).

The load average and /proc/stat's busy cores are recorded with every run. Without the data
folder the benchmark says so and stops (exit 0); ``--quick`` runs on a small synthetic case
with a tiny random model instead (for tests: plumbing only, figures meaningless).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence

DATA_ENV = "MRISYNTHESIS_DATA"
DEFAULT_CASE = "brats18-cbica-abm"  # BraTS 2018, 240x240x155 at 1 mm, T1/T2/T1c/FLAIR
SCHEMA = "mrisynthesis-e2e-benchmark/1"
STAGES = ("start-up", "model load", "read", "resample", "brain mask", "normalise", "network", "inverse",
          "write")
POLICIES = {  # name -> (threads, one worker with OpenMP threads, bf16 by autocast as before, CPU layout)
    "default": (None, False, False, None),
    "1": (1, False, False, None),
    "2": (2, False, False, None),
    "3": (3, False, False, None),
    "4": (4, False, False, None),
    "openmp-2": (2, True, False, None),
    # For before/after tables only (--policies ...): the network path as it was, or a layout forced.
    "openmp-2-autocast": (2, True, True, None),
    "default-autocast": (None, False, True, None),
    "default-contiguous": (None, False, False, "contiguous"),
    "default-channels-last": (None, False, False, "channels_last"),
}
DEFAULT_POLICIES = ("default", "1", "openmp-2")

# The child: the same imports as the mrisynthesis command, then predict's calls, timed.
_CHILD = r"""
import time
_start = time.monotonic()
import json, sys
from MRISynthesisLib import cli  # what the mrisynthesis entry point imports
from MRISynthesisLib import inference
from MRISynthesisLib.volumes import save_volume
_imported = time.monotonic()
spec = json.loads(sys.argv[1])
inference.INTRA_OP_PARALLEL = spec["openmp"]
if spec["autocast"]:
    inference.runs_native_bf16 = lambda device, precision: False
if spec["layout"]:
    inference.CPU_LAYOUT = spec["layout"]
timings, slices = {}, []
result = inference.synthesize(spec["inputs"], spec["model"], device=spec["device"], precision=spec["precision"],
                              threads=spec["threads"], timings=timings, progress=lambda d, t: slices.append(t))
t = time.perf_counter()
save_volume(result, spec["output"])
timings["write"] = time.perf_counter() - t
import torch
print("RESULT " + json.dumps({"start": _start, "imported": _imported, "end": time.monotonic(), "timings": timings,
                              "slices": slices[0], "shape": list(result.array.shape),
                              "torch_threads": torch.get_num_threads()}))
sys.stdout.flush()
import os
os._exit(0)  # as mrisynthesis predict ends (cli.entry)
"""


def _read_proc_stat():
    """(busy, total) ticks summed over all CPUs, or None without /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    idle = ticks[3] + ticks[4]
    return sum(ticks) - idle, sum(ticks)


def busy_cores() -> Optional[float]:
    """Cores busy on the whole machine over the last 0.5 s (None without /proc/stat)."""
    a = _read_proc_stat()
    time.sleep(0.5)
    b = _read_proc_stat()
    if a is None or b is None or b[1] == a[1]:
        return None
    return round((os.cpu_count() or 1) * (b[0] - a[0]) / (b[1] - a[1]), 2)


def load_average() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run_child(spec: dict, timeout: float = 900) -> dict:
    """One end-to-end run in a fresh process; stage seconds with start-up measured from launch."""
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MRISYNTHESIS_THREADS"):  # the policy under test decides
        env.pop(name, None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    load = load_average()
    launch = time.monotonic()  # CLOCK_MONOTONIC: one clock for parent and child on Linux
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(spec)], capture_output=True, text=True,
                          timeout=timeout, env=env)
    total = time.monotonic() - launch
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            child = json.loads(line[len("RESULT "):])
            stages = {"start-up": child["imported"] - launch, **child["timings"]}
            stages["other"] = max(0.0, total - sum(stages.values()))  # argument handling, interpreter exit
            return {"total_s": total, "stages_s": stages, "slices": child["slices"], "shape": child["shape"],
                    "load_average": load}
    raise RuntimeError(f"end-to-end run failed (exit {proc.returncode}): {proc.stderr[-2000:]}")


def median_stages(runs: Sequence[dict]) -> dict:
    keys = list(STAGES) + ["other"]
    return {k: statistics.median(r["stages_s"].get(k, 0.0) for r in runs) for k in keys}


class BusyCore:
    """Another process keeping one core busy (a Python busy loop), for as long as the block runs."""

    def __enter__(self):
        # Spins until this process ends, even if it is killed before __exit__ runs.
        self.proc = subprocess.Popen([sys.executable, "-c",
                                      f"import os\nwhile os.getppid() == {os.getpid()}: pass"])
        time.sleep(0.3)
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(timeout=10)


def network_floor(model_path: str, slices: int, peaks: dict) -> dict:
    """FLOPs of the generator for ``slices`` slices and the time they take at each measured peak."""
    import torch

    from .benchmark import generator_flops_per_slice
    from .bundle import load_bundle

    bundle = load_bundle(model_path)
    net = bundle.build_generator("cpu")
    flops = generator_flops_per_slice(net, bundle.model.num_sources, bundle.model.image_size)
    del torch
    return {"flops_per_slice": flops, "slices": slices, "flops": flops * slices,
            "floor_s": {p: flops * slices / (v * 1e9) for p, v in peaks.items()},
            "width": bundle.model.base_width, "architecture": bundle.model.architecture}


def measure_peaks(device: str, quick: bool) -> dict:
    import torch

    from .benchmark import measure_peak

    dev = torch.device(device)
    return {p: measure_peak(dev, dt, quick, 1, 3)["conv3x3"]["gflops_per_s"]
            for p, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}


def quick_case(folder: str) -> tuple:
    """A small synthetic T1+T2 case and a tiny random width-4 T1+T2 model, written to ``folder``."""
    import numpy as np

    from .benchmark import _synthetic_sources
    from .bundle import bundle_from_generator, save_bundle
    from .networks import ModelConfig, build_generator, init_weights
    from .volumes import Volume, save_volume

    import torch

    config = ModelConfig(num_sources=2, base_width=4)
    torch.manual_seed(0)
    bundle = bundle_from_generator(init_weights(build_generator(config)), config, ("t1", "t2"))
    model = os.path.join(folder, "t1_t2_to_flair.safetensors")
    save_bundle(bundle, model)
    inputs = {}
    for name, array in zip(("t1", "t2"), _synthetic_sources(2, 6)):
        inputs[name] = os.path.join(folder, f"{name}.nii.gz")
        save_volume(Volume(array, np.eye(4)), inputs[name])
    return inputs, {"t1_t2_to_flair": model}


def run(case_dir: Optional[str], repeats: int = 3, models: Optional[Sequence[str]] = None,
        devices: Optional[Sequence[str]] = None, precision: str = "auto", contention: bool = True,
        policies: Sequence[str] = DEFAULT_POLICIES, quick: bool = False, stage_policy: str = "default",
        log: Callable[[str], None] = lambda s: None) -> dict:
    from .models import shipped_bundles

    with tempfile.TemporaryDirectory(prefix="mrisynthesis-bench-") as tmp:
        if quick:
            inputs, shipped = quick_case(tmp)
            case = "synthetic (quick)"
        else:
            case = os.path.basename(os.path.normpath(case_dir))
            inputs = {m: os.path.join(case_dir, f"{m}.nii.gz") for m in ("t1", "t2", "t1c")
                      if os.path.isfile(os.path.join(case_dir, f"{m}.nii.gz"))}
            shipped = {k: str(v) for k, v in shipped_bundles().items()}
        usable = {name: path for name, path in shipped.items()
                  if all(s in inputs for s in name.split("_to_")[0].split("_"))}
        if models:
            unknown = [m for m in models if m not in usable]
            if unknown:
                raise ValueError(f"model(s) {unknown} not shipped or not usable with {case} "
                                 f"(usable: {', '.join(sorted(usable))})")
            usable = {m: usable[m] for m in models}
        if not usable:
            raise ValueError(f"no shipped model takes the inputs of {case} ({', '.join(inputs)})")
        if devices is None:
            import torch

            devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        result = {"schema": SCHEMA, "case": case, "stage_policy": stage_policy, "inputs": sorted(inputs), "repeats": repeats,
                  "statistic": "median", "cpu_count": os.cpu_count(), "load_average_start": load_average(),
                  "busy_cores_start": busy_cores(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "devices": {}}
        output = os.path.join(tmp, "out.nii.gz")

        def spec(model: str, device: str, policy: str) -> dict:
            threads, openmp, autocast, layout = POLICIES[policy]
            sources = model.split("_to_")[0].split("_")
            return {"inputs": {s: inputs[s] for s in sources}, "model": usable[model], "device": device,
                    "precision": precision, "threads": threads, "openmp": openmp, "autocast": autocast,
                    "layout": layout, "output": output}

        for device in devices:
            log(f"[{device}] peak throughput")
            peaks = measure_peaks(device, quick)
            dev = {"peak_conv3x3_gflops_per_s": peaks, "models": {}}
            for model in usable:
                runs = []
                for r in range(repeats):
                    log(f"[{device}] {model} run {r + 1}/{repeats}")
                    runs.append(run_child(spec(model, device, stage_policy)))
                entry = {"runs": runs, "stages_s": median_stages(runs),
                         "total_s": statistics.median(r["total_s"] for r in runs), "slices": runs[0]["slices"],
                         "shape": runs[0]["shape"]}
                entry["floor"] = network_floor(usable[model], entry["slices"], peaks)
                dev["models"][model] = entry
            result["devices"][device] = dev
        target = "t1_t2_to_flair" if "t1_t2_to_flair" in usable else next(iter(usable))
        if contention and "cpu" in devices:
            rows = {p: {"idle": [], "busy": []} for p in policies}
            for r in range(repeats):
                for policy in policies:
                    log(f"[cpu] contention {target}, policy {policy}, run {r + 1}/{repeats}: idle, busy")
                    rows[policy]["idle"].append(run_child(spec(target, "cpu", policy)))
                    with BusyCore():
                        rows[policy]["busy"].append(run_child(spec(target, "cpu", policy)))
            result["contention"] = {"model": target, "policies": {
                p: {"idle_s": statistics.median(x["total_s"] for x in v["idle"]),
                    "busy_s": statistics.median(x["total_s"] for x in v["busy"]),
                    "idle_network_s": statistics.median(x["stages_s"]["network"] for x in v["idle"]),
                    "busy_network_s": statistics.median(x["stages_s"]["network"] for x in v["busy"]),
                    "runs": v} for p, v in rows.items()}}
            for row in result["contention"]["policies"].values():
                row["busy_over_idle"] = row["busy_s"] / row["idle_s"]
        result["load_average_end"] = load_average()
        result["busy_cores_end"] = busy_cores()
    return result


def format_table(result: dict) -> str:
    lines = [f"end to end: {result['case']} ({', '.join(result['inputs'])}), median of {result['repeats']} fresh "
             f"processes, policy {result['stage_policy']}; {result['cpu_count']} CPUs; load average {result['load_average_start']} -> "
             f"{result['load_average_end']}, busy cores before {result['busy_cores_start']} after "
             f"{result['busy_cores_end']}"]
    for device, dev in result["devices"].items():
        peaks = ", ".join(f"{p} {v:.0f}" for p, v in dev["peak_conv3x3_gflops_per_s"].items())
        lines.append(f"== {device} == (3x3-conv peak GFLOP/s: {peaks})")
        for model, entry in dev["models"].items():
            total = entry["total_s"]
            floor = entry["floor"]
            lines.append(f"{model} ({floor['architecture']} width {floor['width']}), {entry['slices']} brain slices "
                         f"of {entry['shape']}: total {total:.2f} s")
            for stage in list(STAGES) + ["other"]:
                seconds = entry["stages_s"][stage]
                note = ""
                if stage == "network":
                    note = "   floor " + ", ".join(f"{p} {f:.2f} s" for p, f in floor["floor_s"].items()) + \
                           f" ({floor['flops'] / 1e12:.2f} TFLOP)"
                if stage == "brain mask":
                    note = "   (brain extraction or a given mask; 0 when none)"
                lines.append(f"  {stage:<11} {seconds:7.2f} s {100 * seconds / total:5.1f}%{note}")
    c = result.get("contention")
    if c:
        lines.append(f"contention, {c['model']}: one core kept busy by another process (median seconds):")
        lines.append(f"  {'policy':<10} {'idle':>7} {'busy':>7} {'busy/idle':>9} {'net idle':>9} {'net busy':>9}")
        for p, row in c["policies"].items():
            lines.append(f"  {p:<10} {row['idle_s']:7.2f} {row['busy_s']:7.2f} {row['busy_over_idle']:9.2f} "
                         f"{row['idle_network_s']:9.2f} {row['busy_network_s']:9.2f}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--data", default=None, help=f"real data folder (default ${DATA_ENV})")
    parser.add_argument("--case", default=DEFAULT_CASE, help=f"subject folder in --data (default {DEFAULT_CASE})")
    parser.add_argument("--models", nargs="+", default=None, help="shipped model names (default: all the case fits)")
    parser.add_argument("--device", action="append", choices=("cpu", "cuda"), dest="devices",
                        help="repeatable; default cpu, and cuda when PyTorch sees a GPU")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per figure (default 3)")
    parser.add_argument("--policies", nargs="+", choices=list(POLICIES), default=list(DEFAULT_POLICIES),
                        help="thread policies in the contention comparison (default: %(default)s; "
                             "*-autocast: bf16 by autocast as before; default-contiguous / -channels-last: "
                             "that CPU layout forced; for before/after tables)")
    parser.add_argument("--stage-policy", choices=list(POLICIES), default="default",
                        help="policy of the stage table (default: what users get)")
    parser.add_argument("--no-contention", action="store_true", help="skip the idle-vs-busy comparison")
    parser.add_argument("--quick", action="store_true",
                        help="synthetic 6-slice case and a tiny random model (tests; figures meaningless)")
    parser.add_argument("-o", "--output", default=None, help="also write everything as JSON here")
    return parser


def bench_main(args) -> int:
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    case_dir = None
    if not args.quick:
        data = args.data or os.environ.get(DATA_ENV)
        case_dir = os.path.join(data, args.case) if data else None
        if not case_dir or not os.path.isfile(os.path.join(case_dir, "t1.nii.gz")):
            where = f"{case_dir} has no t1.nii.gz" if case_dir else f"no --data and ${DATA_ENV} is unset"
            print(f"end-to-end benchmark skipped: it needs a real case ({where}); "
                  f"pass --data DIR [--case NAME], or --quick for a synthetic smoke run")
            return 0
    result = run(case_dir, repeats=args.repeats, models=args.models, devices=args.devices,
                 precision=args.precision, contention=not args.no_contention, policies=args.policies,
                 stage_policy=args.stage_policy,
                 quick=args.quick, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(format_table(result))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.output}")
    return 0


def main(argv=None) -> int:
    from .benchmark import command_main

    return command_main(add_arguments, bench_main, "mrisynthesis bench", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
