"""Time what a Slicer user waits for after pressing Apply (issue 11 item 4), on slicer-core.

    python scripts/bench_slicer_apply.py DATA_DIR [--case brats18-cbica-abm] [--repeats 3]

Loads DATA_DIR/CASE/t1.nii.gz and t2.nii.gz into an MRML scene through storage nodes (as
Slicer's Add Data does), then runs Apply the way the panel does: ``prepare`` on the main
thread, an ``ApplyRun`` (worker thread) polled every 0.1 s like the panel's QTimer, until the
result node is in the scene. The first Apply includes loading and building the network; the
next ones reuse the generator cached by ``SynthesisSceneLogic`` (the script checks it was
built once). Prints each Apply's seconds, the median of the cached ones, the brain-mask
decision, the torch thread count and /proc/loadavg before and after (a busy machine is slower:
say so with the figures). A measurement, not a test.
"""

import argparse
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "MRISynthesis"))

import SlicerMRISynthesisLib  # noqa: E402,F401  (makes MRISynthesisLib importable)


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unavailable"


def apply(logic, scene, nodes, args):
    """One Apply as the panel runs it; returns (seconds, ApplyRun)."""
    from SlicerMRISynthesisLib.jobs import ApplyRun

    start = time.perf_counter()
    request = logic.prepare(**nodes, model=args.model, device=args.device, precision=args.precision,
                            brainMask=args.brain_mask)
    run = ApplyRun(logic, request, scene)
    while run.poll():
        time.sleep(0.1)  # the panel's timer interval
    seconds = time.perf_counter() - start
    if run.failed or run.output is None:
        raise SystemExit(f"Apply failed: {run.message}")
    return seconds, run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir")
    parser.add_argument("--case", default="brats18-cbica-abm")
    parser.add_argument("--model", default="t1_t2_to_flair")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--brain-mask", default="auto", choices=("auto", "none"))
    parser.add_argument("--repeats", type=int, default=3, help="Applies after the first (default 3)")
    args = parser.parse_args(argv)

    import slicer
    import torch

    from SlicerMRISynthesisLib.scene import SynthesisSceneLogic, loadVolumeNode

    folder = os.path.join(args.data_dir, args.case)
    print(f"load before: {loadavg()} (1, 5, 15 min; {os.cpu_count()} CPUs); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)
    scene = slicer.vtkMRMLScene()
    start = time.perf_counter()
    nodes = {m: loadVolumeNode(scene, os.path.join(folder, f"{m}.nii.gz"), f"{args.case} {m}") for m in ("t1", "t2")}
    dims = nodes["t1"].GetImageData().GetDimensions()
    print(f"{args.case}: T1 {dims[0]}x{dims[1]}x{dims[2]} read into the scene in {time.perf_counter() - start:.2f} s",
          flush=True)

    logic = SynthesisSceneLogic(scene)
    first, run = apply(logic, scene, nodes, args)
    print(f"Apply 1 (loads the model): {first:.2f} s -> '{run.output.GetName()}'; {run.result.maskDecision.description}",
          flush=True)
    cached = []
    for i in range(args.repeats):
        seconds, run = apply(logic, scene, nodes, args)
        cached.append(seconds)
        print(f"Apply {i + 2} (cached generator): {seconds:.2f} s", flush=True)
    builds = logic.generatorCache.builds
    print(f"generator built {builds} time(s) for {1 + args.repeats} Applies")
    if cached:
        print(f"median of the cached Applies: {statistics.median(cached):.2f} s "
              f"(min {min(cached):.2f}, max {max(cached):.2f})")
    print(f"load after: {loadavg()}")
    return 0 if builds == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
