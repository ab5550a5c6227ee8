"""The synthesis worker process (MRISynthesisLib.worker) and why the panel uses it.

Slicer's main thread holds the GIL while Qt's event loop waits in C, so a Python thread in
Slicer's interpreter runs only while the main thread runs Python. The loop below reproduces
that: between two polls the main thread sleeps in C with the GIL held
(``ctypes.PyDLL(None).usleep``, unlike ``time.sleep``, keeps it), as a 100 ms QTimer tick does.
"""

import ctypes
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "MRISynthesis"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

slicer = pytest.importorskip("slicer", reason="the PyPI slicer-core package is needed (pip install slicer-core)")

import worker_fakes  # noqa: E402
from conftest import make_bundle, wait_gone  # noqa: E402
from slicer_testdata import brain_like  # noqa: E402
from MRISynthesisLib.models import shipped_bundles  # noqa: E402
from MRISynthesisLib.volumes import Volume  # noqa: E402
from MRISynthesisLib.worker import WorkerClient, decode_event, encode_event, request_message, serve  # noqa: E402
from SlicerMRISynthesisLib.jobs import DONE, SynthesisJob  # noqa: E402
from SlicerMRISynthesisLib.scene import SynthesisSceneLogic, updateNodeFromArray  # noqa: E402

TICK_US = 100_000  # Slicer's panel timer: 100 ms


def gil_holding_sleep():
    """Sleep one timer tick in C without releasing the GIL, as Qt's event loop does in Slicer."""
    try:
        return ctypes.PyDLL(None).usleep
    except (OSError, AttributeError):
        pytest.skip("usleep from the C library is needed to hold the GIL while waiting")


def test_protocol_lines_and_a_served_request(tmp_path, one_thread):
    assert decode_event(encode_event({"event": "x", "id": 3})) == {"event": "x", "id": 3}
    assert decode_event("Warning: something printed by a library\n") is None
    bundle = str(make_bundle(tmp_path / "t1.safetensors", ("t1",)))
    t1 = Volume(brain_like((24, 20, 8), 0, low=100, high=500), np.diag([2.0, 2.0, 3.0, 1.0]))
    folder = tmp_path / "job"
    folder.mkdir()
    good = request_message(1, str(folder), {"t1": t1}, "none", bundle, device="cpu", precision="fp32")
    needs_t2 = request_message(2, str(folder), {"t1": t1}, "none",
                               str(make_bundle(tmp_path / "t1t2.safetensors", ("t1", "t2"))), device="cpu")
    import json

    events = []
    serve([json.dumps(good), "", json.dumps(needs_t2), json.dumps({"op": "exit"}), json.dumps(good)], events.append)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "ready" and events[0]["pid"] == os.getpid() and events[0]["torch"]
    done = [e for e in events if e["event"] == "done"]
    assert len(done) == 1 and done[0]["id"] == 1  # nothing served after "exit"
    progress = [e for e in events if e["event"] == "progress" and e["id"] == 1]
    assert progress and progress[-1]["done"] == progress[-1]["total"] > 0  # the brain slices
    output = np.load(done[0]["output"]["file"])
    assert output.shape == (24, 20, 8) and output.dtype == np.float32 and 0 < output.max() <= 1000
    np.testing.assert_allclose(done[0]["output"]["affine"], t1.affine)
    assert done[0]["mask_decision"]["source"] == "none"
    error = [e for e in events if e["event"] == "error"]
    assert len(error) == 1 and error[0]["id"] == 2 and error[0]["kind"] == "input"
    assert "needs t1, t2" in error[0]["message"] and "\n" not in error[0]["message"]


@pytest.fixture
def t1t2_scene():
    """T1 + T2 of 20 slices and the shipped T1+T2 model (width 16): a real synthesis of seconds."""
    bundle = shipped_bundles().get("t1_t2_to_flair")
    if bundle is None:
        pytest.skip("the shipped t1_t2_to_flair bundle is missing")
    scene = slicer.vtkMRMLScene()
    affine = np.diag([1.8, 1.8, 2.5, 1.0])
    nodes = []
    for seed, name in ((0, "case t1"), (1, "case t2")):
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        updateNodeFromArray(node, brain_like((96, 112, 20), seed, low=100, high=500), affine)
        nodes.append(node)
    return scene, nodes[0], nodes[1], str(bundle)


def test_synthesis_in_a_slicer_like_event_loop_runs_at_full_speed(t1t2_scene, monkeypatch):
    usleep = gil_holding_sleep()
    scene, t1, t2, bundle = t1t2_scene
    monkeypatch.setenv("MRISYNTHESIS_THREADS", "1")  # the same one network thread on both sides
    logic = SynthesisSceneLogic(scene)
    request = logic.prepare(t1=t1, t2=t2, model=bundle, device="cpu", precision="auto")
    logic.compute(request)  # warm: the network is built and kept, as in the worker below

    def direct():
        start = time.perf_counter()
        logic.compute(request)
        return time.perf_counter() - start

    # Today's failure, reproduced: a thread of this interpreter, while the main thread waits
    # in C holding the GIL between 100 ms polls, is several times slower than direct. Given
    # twice the direct time it is still far from done; then it is cancelled.
    def thread_under_the_event_loop_unfinished_after(limit):
        stop, finished = threading.Event(), threading.Event()

        def run():
            try:
                logic.compute(request, cancel=stop.is_set)
                finished.set()
            except Exception:
                pass

        worker = threading.Thread(target=run)
        start = time.perf_counter()
        worker.start()
        while worker.is_alive() and time.perf_counter() - start < limit:
            usleep(TICK_US)
        unfinished = not finished.is_set()
        stop.set()
        worker.join(60)
        return unfinished

    worker = WorkerClient(worker_fakes.launcher())
    worker.start()
    worker.wait_ready()

    def in_process_under_the_event_loop():
        start = time.perf_counter()
        job = SynthesisJob(logic, request, worker)
        job.start()
        while job.poll():
            usleep(TICK_US)
        node = job.finish()
        assert job.state == DONE and node is not None
        scene.RemoveNode(node)
        return time.perf_counter() - start

    try:
        in_process_under_the_event_loop()  # the worker builds its network once
        direct_s = direct()
        process_s = in_process_under_the_event_loop()
        thread_unfinished = thread_under_the_event_loop_unfinished_after(2.0 * direct_s)
    finally:
        worker.kill()
    print(f"direct {direct_s:.2f} s, worker process under the loop {process_s:.2f} s")
    assert thread_unfinished, "the loop did not reproduce Slicer's condition (a thread was not slowed down)"
    assert process_s <= 1.5 * direct_s, (process_s, direct_s)


def test_the_worker_keeps_its_network_and_kill_ends_its_whole_tree(tmp_path, one_thread):
    child_pid_file = tmp_path / "child.pid"
    worker = WorkerClient(worker_fakes.launcher(MRISYNTHESIS_TEST_CHILD=child_pid_file))
    worker.start()
    info = worker.wait_ready()
    assert info["pid"] != os.getpid()
    bundle = str(make_bundle(tmp_path / "t1.safetensors", ("t1",)))
    t1 = Volume(brain_like((24, 20, 8), 0, low=100, high=500), np.eye(4))
    builds = []
    for request_id in (1, 2):
        folder = tmp_path / f"job{request_id}"
        folder.mkdir()
        worker.send(request_message(request_id, str(folder), {"t1": t1}, "none", bundle, device="cpu"))
        end = time.time() + 60
        done = []
        while not done:
            done = [e for e in worker.events() if e["event"] in ("done", "error")]
            assert time.time() < end
            time.sleep(0.02)
        assert done[0]["event"] == "done", done
        builds.append(done[0]["generator_builds"])
    assert builds == [1, 1] and worker.alive  # one process, one network for both requests
    end = time.time() + 10
    while not child_pid_file.exists():
        assert time.time() < end
        time.sleep(0.02)
    pids = [worker.pid, int(child_pid_file.read_text())]
    start = time.perf_counter()
    worker.kill()
    assert time.perf_counter() - start < 0.1  # the GUI does not wait
    wait_gone(pids)
    assert not worker.alive


def test_a_worker_that_dies_is_reported_by_the_job(tmp_path, one_thread):
    scene = slicer.vtkMRMLScene()
    t1 = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "t1")
    updateNodeFromArray(t1, brain_like((24, 20, 8), 0, low=100, high=500), np.eye(4))
    logic = SynthesisSceneLogic(scene)
    gate = tmp_path / "gate"
    worker = WorkerClient(worker_fakes.launcher(MRISYNTHESIS_TEST_GATE=gate))
    job = SynthesisJob(logic, logic.prepare(t1=t1, model=str(make_bundle(tmp_path / "t1.safetensors", ("t1",))),
                                            device="cpu"), worker)
    before = scene.GetNumberOfNodes()
    job.start()
    end = time.time() + 60
    while job.poll() and job.progress[0] < 1:
        assert time.time() < end
        time.sleep(0.02)
    import signal

    os.kill(worker.pid, signal.SIGKILL)  # e.g. the system ran out of memory
    while job.poll():
        assert time.time() < end
        time.sleep(0.02)
    from MRISynthesisLib.errors import MRISynthesisError

    with pytest.raises(MRISynthesisError, match="synthesis process ended"):
        job.finish()
    assert scene.GetNumberOfNodes() == before
