"""Run the real synthesis worker (MRISynthesisLib.worker) in a test process, with optional
fakes chosen by environment variables, so tests can act while a run is in the middle:

- MRISYNTHESIS_TEST_GATE=FILE: the network runs one slice per batch and, after the first
  batch, waits until FILE exists (the test cancels, closes the scene... meanwhile).
- MRISYNTHESIS_TEST_BRAIN=FILE.npy: deepbet is replaced by this boolean mask.
- MRISYNTHESIS_TEST_CHILD=FILE: the worker starts a child process that sleeps and writes its
  pid to FILE (a process tree, as under Slicer's PythonSlicer launcher).

``launcher(**env)`` returns the launch function that WorkerClient takes.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BOOT = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; "
        "import worker_fakes; worker_fakes.main()")


def launcher(**env):
    from MRISynthesisLib.processes import popen_new_group

    environment = dict(os.environ, OMP_NUM_THREADS="1", MRISYNTHESIS_THREADS="1",
                       **{k: str(v) for k, v in env.items()})
    return lambda: popen_new_group([sys.executable, "-c", BOOT, str(REPO), str(HERE)], env=environment, stdin=True)


def main():
    from MRISynthesisLib import brainmask, inference, worker

    gate = os.environ.get("MRISYNTHESIS_TEST_GATE")
    if gate:
        real = inference.synthesize_with_details

        def gated(*args, progress=None, **kwargs):
            def hold(done, total):
                if progress:
                    progress(done, total)
                if done > 0:
                    while not os.path.exists(gate):
                        time.sleep(0.01)

            kwargs["batch_size"] = 1
            return real(*args, progress=hold, **kwargs)

        inference.synthesize_with_details = gated
    brain = os.environ.get("MRISYNTHESIS_TEST_BRAIN")
    if brain:
        import numpy as np

        mask = np.load(brain)
        brainmask.extract_brain = lambda volume, device="cpu", name="t1", **kwargs: mask
    child = os.environ.get("MRISYNTHESIS_TEST_CHILD")
    if child:
        code = f"import os, time; open({child!r}, 'w').write(str(os.getpid())); time.sleep(600)"
        subprocess.Popen([sys.executable, "-c", code])
    worker.main()
