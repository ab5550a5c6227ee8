"""Time what a Slicer user waits for after pressing Apply, on slicer-core.

    python scripts/bench_slicer_apply.py DATA_DIR [--case brats18-cbica-abm] [--repeats 3]

Loads DATA_DIR/CASE/t1.nii.gz and t2.nii.gz into an MRML scene through storage nodes (as
Slicer's Add Data does) and times two ways of synthesising, alternating, so that both see the
same machine state:

- ``worker``: what the panel runs. An ``ApplyRun`` in the worker process
  (MRISynthesisLib.worker), polled as the panel's 100 ms QTimer does, with Slicer's condition
  reproduced: between polls the main thread waits in C holding the GIL
  (``ctypes.PyDLL(None).usleep``), as Qt's event loop does in Slicer. The first Apply includes
  starting the worker (importing PyTorch) and building the network; later ones reuse both.
- ``in-process``: ``SynthesisSceneLogic.synthesizeWithDetails`` in this interpreter, joined
  (the console API; what this script measured before the worker process existed), with the
  network cached after its first call.

Prints every Apply's seconds, the medians of the later Applies and their ratio, the brain-mask
decision, and /proc/loadavg before and after (a busy machine is slower: say so with the
figures). A measurement, not a test.
"""

import argparse
import ctypes
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "MRISynthesis"))

import SlicerMRISynthesisLib  # noqa: E402,F401  (makes MRISynthesisLib importable)

TICK_US = 100_000


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unavailable"


def apply_in_worker(logic, scene, nodes, args, worker, usleep):
    """One Apply as the panel runs it in Slicer; returns (seconds, ApplyRun)."""
    from SlicerMRISynthesisLib.jobs import ApplyRun

    start = time.perf_counter()
    request = logic.prepare(**nodes, model=args.model, device=args.device, precision=args.precision,
                            brainMask=args.brain_mask)
    run = ApplyRun(logic, request, scene, worker)
    while run.poll():
        usleep(TICK_US)  # Qt's event loop: waiting in C with the GIL held
    seconds = time.perf_counter() - start
    if run.failed or run.output is None:
        raise SystemExit(f"Apply failed: {run.message}")
    scene.RemoveNode(run.output)
    return seconds, run


def apply_in_process(logic, scene, nodes, args):
    start = time.perf_counter()
    result = logic.synthesizeWithDetails(**nodes, model=args.model, device=args.device, precision=args.precision,
                                         brainMask=args.brain_mask)
    seconds = time.perf_counter() - start
    scene.RemoveNode(result.output)
    return seconds, result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir")
    parser.add_argument("--case", default="brats18-cbica-abm")
    parser.add_argument("--model", default="t1_t2_to_flair")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--brain-mask", default="auto", choices=("auto", "none"))
    parser.add_argument("--repeats", type=int, default=3, help="rounds of later Applies (default 3)")
    args = parser.parse_args(argv)

    import slicer

    from MRISynthesisLib.worker import WorkerClient
    from SlicerMRISynthesisLib.scene import SynthesisSceneLogic, loadVolumeNode

    usleep = ctypes.PyDLL(None).usleep
    folder = os.path.join(args.data_dir, args.case)
    print(f"load before: {loadavg()} (1, 5, 15 min; {os.cpu_count()} CPUs)", flush=True)
    scene = slicer.vtkMRMLScene()
    start = time.perf_counter()
    nodes = {m: loadVolumeNode(scene, os.path.join(folder, f"{m}.nii.gz"), f"{args.case} {m}") for m in ("t1", "t2")}
    dims = nodes["t1"].GetImageData().GetDimensions()
    print(f"{args.case}: T1 {dims[0]}x{dims[1]}x{dims[2]} read into the scene in {time.perf_counter() - start:.2f} s",
          flush=True)

    logic = SynthesisSceneLogic(scene)
    worker = WorkerClient()
    try:
        seconds, run = apply_in_worker(logic, scene, nodes, args, worker, usleep)
        print(f"worker Apply 1 (starts the process, imports PyTorch, builds the network): {seconds:.2f} s; "
              f"{run.result.maskDecision.description}; worker: PyTorch {worker.info['torch']}, pid {worker.pid}",
              flush=True)
        seconds, _ = apply_in_process(logic, scene, nodes, args)
        print(f"in-process Apply 1 (builds the network): {seconds:.2f} s", flush=True)
        later = {"worker": [], "in-process": []}
        for i in range(args.repeats):
            for mode in ("worker", "in-process") if i % 2 == 0 else ("in-process", "worker"):
                if mode == "worker":
                    seconds, run = apply_in_worker(logic, scene, nodes, args, worker, usleep)
                    builds = run.job._event["generator_builds"]
                else:
                    seconds, _ = apply_in_process(logic, scene, nodes, args)
                    builds = logic.generatorCache.builds
                later[mode].append(seconds)
                print(f"round {i + 1}: {mode} Apply {seconds:.2f} s (networks built so far: {builds})", flush=True)
    finally:
        worker.kill()
    medians = {mode: statistics.median(values) for mode, values in later.items()}
    for mode, values in later.items():
        print(f"{mode}: median of the later Applies {medians[mode]:.2f} s (min {min(values):.2f}, "
              f"max {max(values):.2f}, n {len(values)})")
    print(f"worker / in-process: {medians['worker'] / medians['in-process']:.2f}")
    print(f"load after: {loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
