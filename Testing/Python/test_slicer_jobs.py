"""The Slicer module's background synthesis on real MRML (slicer-core, no Qt): the worker
process, cancelling (Cancel, removing an input, closing the scene), applying the result only on
the main thread, the generator cache; and how the module side reaches MRISynthesisLib."""

import os
import subprocess
import sys
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
from MRISynthesisLib.inference import synthesize as core_synthesize  # noqa: E402
from MRISynthesisLib.worker import WorkerClient  # noqa: E402
from SlicerMRISynthesisLib import dependencies as deps  # noqa: E402
from SlicerMRISynthesisLib.jobs import CANCELLED, DONE, FAILED, ApplyRun, SceneWatcher, SynthesisJob  # noqa: E402
from test_slicer_dependencies import FakeEnvironment, _slow_pip  # noqa: E402
from SlicerMRISynthesisLib.scene import SynthesisSceneLogic, updateNodeFromArray  # noqa: E402

AFFINE = np.array([[0.0, -1.1, 0.0, 30.0], [0.9, 0.0, 0.0, -12.0], [0.0, 0.0, 2.0, 7.0], [0.0, 0.0, 0.0, 1.0]])
SHAPE = (24, 20, 10)


def brain(seed):
    return brain_like(SHAPE, seed, low=100, high=500)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return str(make_bundle(tmp_path_factory.mktemp("b") / "t1_t2.safetensors", ("t1", "t2")))


@pytest.fixture
def scene():
    scene = slicer.vtkMRMLScene()
    t1 = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "case t1")
    updateNodeFromArray(t1, brain(0), AFFINE)
    t2 = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "case t2")
    updateNodeFromArray(t2, brain(1), AFFINE)
    return scene, t1, t2


class Gate:
    """A worker process that runs the real synthesis but stops after the first batch until
    released (a file appears), so the test acts while the worker is mid-run."""

    def __init__(self, folder):
        self.file = Path(folder) / "release"
        self.worker = WorkerClient(worker_fakes.launcher(MRISYNTHESIS_TEST_GATE=self.file))

    def release(self):
        self.file.write_text("go")


def wait_started(job, limit=60.0):
    end = time.time() + limit
    while job.poll() and job.progress[0] < 1:
        assert time.time() < end, "the worker did not start"
        time.sleep(0.02)
    assert job.running and job.progress[0] >= 1


def finish_when_done(job, limit=60.0):
    end = time.time() + limit
    while job.poll():
        assert time.time() < end, "the job did not finish"
        time.sleep(0.02)
    return job.finish()


def node_state(scene):
    return sorted((n.GetID(), n.GetName(), n.GetMTime()) for n in
                  (scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())))


def start_job(scene, t1, t2, bundle, gate, outputNode=None):
    logic = SynthesisSceneLogic(scene)
    request = logic.prepare(t1=t1, t2=t2, model=bundle, device="cpu", outputNode=outputNode)
    job = SynthesisJob(logic, request, gate.worker)
    watcher = SceneWatcher(scene, job)
    job.start()
    wait_started(job)
    return job, watcher


def test_job_runs_in_the_worker_process_and_applies_only_when_finished(scene, bundle, tmp_path):
    scene, t1, t2 = scene
    gate = Gate(tmp_path)
    before = scene.GetNumberOfNodes()
    job, watcher = start_job(scene, t1, t2, bundle, gate)
    assert job.poll() and job.progress[0] >= 1 and job.progress[1] > 1  # running, with progress
    assert gate.worker.pid != os.getpid() and gate.worker.info["pid"] == gate.worker.pid
    assert scene.GetNumberOfNodes() == before  # nothing in the scene while it runs
    gate.release()
    output = finish_when_done(job)
    watcher.stop()
    assert job.state == DONE and not job.running
    assert output.GetName() == "case t1 synthetic FLAIR" and output.GetScene() is scene
    values = slicer_array(output)
    assert values.shape == SHAPE[::-1]
    assert 0 <= values.min() and 0 < values.max() <= 1000
    # The same numbers as the core run directly.
    expected = core_synthesize({"t1": job.request.volumes["t1"], "t2": job.request.volumes["t2"]}, bundle,
                               device="cpu", mask="auto", reference="t1")
    np.testing.assert_allclose(values, expected.array.transpose(2, 1, 0), atol=0.05)
    gate.worker.kill()


@pytest.mark.parametrize("how", ["cancel", "remove t2", "close scene", "remove output"])
def test_cancel_mid_run_is_immediate_leaves_the_scene_unchanged_and_no_process(scene, bundle, how, tmp_path):
    scene, t1, t2 = scene
    output = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "chosen output") if how == "remove output" else None
    gate = Gate(tmp_path)
    job, watcher = start_job(scene, t1, t2, bundle, gate, outputNode=output)
    pid = gate.worker.pid
    before = node_state(scene)
    start = time.perf_counter()
    if how == "cancel":
        job.cancel("Cancel pressed")
    elif how == "remove t2":
        scene.RemoveNode(t2)
    elif how == "remove output":
        scene.RemoveNode(output)
    else:
        scene.Clear(0)  # File > Close Scene
    if how != "cancel":
        before = node_state(scene)
    assert time.perf_counter() - start < 0.1  # the GUI is not blocked
    assert job.cancelled, f"{how} did not cancel the job"
    assert not job.poll() and job.finish() is None
    watcher.stop()
    assert job.state == CANCELLED and not job.running
    assert node_state(scene) == before  # no node added or changed
    assert {"remove t2": "'case t2' was removed", "close scene": "scene was closed",
            "cancel": "Cancel pressed", "remove output": "'chosen output' was removed"}[how] in job.cancelReason
    wait_gone([pid])  # the worker's process is gone (the next job starts a new one)


def test_watcher_ignores_other_nodes_and_stops_observing(scene, bundle, tmp_path):
    scene, t1, t2 = scene
    other = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "unrelated")
    gate = Gate(tmp_path)
    job, watcher = start_job(scene, t1, t2, bundle, gate)
    scene.RemoveNode(other)
    assert not job.cancelled
    gate.release()
    assert finish_when_done(job) is not None
    watcher.stop()
    scene.RemoveNode(t2)  # after stop(): no effect on the finished job
    assert job.state == DONE
    gate.worker.kill()


def test_worker_errors_are_one_line_and_nothing_is_added(scene, tmp_path):
    scene, t1, t2 = scene
    logic = SynthesisSceneLogic(scene)
    worker = WorkerClient(worker_fakes.launcher())
    # A bundle file that breaks between Apply and the worker's load: the core's one-line error.
    bad = tmp_path / "t1.safetensors"
    make_bundle(bad, ("t1",))
    request = logic.prepare(t1=t1, model=str(bad), device="cpu")
    bad.write_bytes(b"not a bundle")
    job = SynthesisJob(logic, request, worker)
    before = scene.GetNumberOfNodes()
    job.start()
    from MRISynthesisLib.errors import MRISynthesisError

    with pytest.raises(MRISynthesisError) as error:
        finish_when_done(job)
    assert job.state == FAILED and scene.GetNumberOfNodes() == before
    assert "\n" not in str(error.value) and str(bad) in str(error.value)
    assert worker.alive  # an input error does not end the worker
    worker.kill()


def test_generator_is_built_once_across_applies(scene, bundle, tmp_path):
    scene, t1, t2 = scene
    logic = SynthesisSceneLogic(scene)  # console path: in Slicer's interpreter, cached network
    first = logic.synthesize(t1=t1, t2=t2, model=bundle, device="cpu", precision="fp32")
    second = logic.synthesize(t1=t1, t2=t2, model=bundle, device="cpu", precision="fp32")
    assert logic.generatorCache.builds == 1
    assert first is not second  # each Apply a new output node
    np.testing.assert_array_equal(slicer_array(first), slicer_array(second))
    expected = core_synthesize({"t1": logic.prepare(t1=t1).volumes["t1"], "t2": logic.prepare(t1=t2).volumes["t1"]},
                               bundle, device="cpu", precision="fp32")
    np.testing.assert_allclose(slicer_array(first), expected.array.transpose(2, 1, 0), atol=1e-4)
    logic.synthesize(t1=t1, t2=t2, model=bundle, device="cpu", precision="bf16")
    assert logic.generatorCache.builds == 2  # precision changed
    other = str(make_bundle(tmp_path / "other.safetensors", ("t1", "t2"), seed=1))
    logic.synthesize(t1=t1, t2=t2, model=other, device="cpu", precision="bf16")
    assert logic.generatorCache.builds == 3  # another bundle
    make_bundle(other, ("t1", "t2"), seed=2)  # same path, new content (digest)
    logic.synthesize(t1=t1, t2=t2, model=other, device="cpu", precision="bf16")
    assert logic.generatorCache.builds == 4
    # The panel's path: one worker process, its network built once for two Applies.
    worker = WorkerClient(worker_fakes.launcher())
    outputs = []
    for _ in range(2):
        job = SynthesisJob(logic, logic.prepare(t1=t1, t2=t2, model=bundle, device="cpu", precision="fp32"), worker)
        job.start()
        outputs.append(finish_when_done(job))
        assert job._event["generator_builds"] == 1
    assert outputs[0] is not outputs[1]
    np.testing.assert_allclose(slicer_array(outputs[1]), slicer_array(first), atol=1e-4)
    worker.kill()


def slicer_array(node):
    from vtk.util import numpy_support

    dims = node.GetImageData().GetDimensions()
    return numpy_support.vtk_to_numpy(node.GetImageData().GetPointData().GetScalars()).reshape(dims[::-1])


def test_cuda_device_names_are_accepted_and_fall_back_without_gpu(scene, bundle, caplog):
    scene, t1, t2 = scene
    logic = SynthesisSceneLogic(scene, cudaAvailable=lambda: False)
    assert logic.resolveDevice("cuda:1") == "cpu" and "no CUDA GPU" in caplog.text
    assert SynthesisSceneLogic(scene, cudaAvailable=lambda: True).resolveDevice("cuda:1") == "cuda:1"
    from MRISynthesisLib.errors import InputError

    with pytest.raises(InputError, match="cuda:N"):
        logic.resolveDevice("gpu0")


def test_module_side_makes_only_mrisynthesislib_importable(tmp_path):
    """Source-tree use: Slicer puts the module folder on sys.path. Importing the helper package
    must make MRISynthesisLib importable (from this checkout) without adding the repository
    root, so ``training`` and the other top-level folders shadow nothing."""
    code = "\n".join([
        "import sys",
        f"sys.path[:] = [{str(MODULE_DIR)!r}] + [p for p in sys.path if 'site-packages' not in p and p]",
        "before = list(sys.path)",
        "import importlib.util",
        "assert importlib.util.find_spec('MRISynthesisLib') is None, 'precondition: core not importable yet'",
        "import SlicerMRISynthesisLib, MRISynthesisLib, MRISynthesisLib.errors, MRISynthesisLib.models",
        "assert sys.path == before, 'sys.path changed'",
        "for name in ('training', 'scripts', 'Testing', 'docs'):",
        "    assert importlib.util.find_spec(name) is None, name + ' became importable'",
        "print(MRISynthesisLib.__file__)",
        "print(len(MRISynthesisLib.models.shipped_bundles()))",
    ])
    result = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=60,
                            cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    path, shipped = result.stdout.split()
    assert Path(path) == REPO / "MRISynthesisLib" / "__init__.py" and int(shipped) == 4


def test_module_side_prefers_the_installed_copy_beside_it(tmp_path):
    """Installed layout (qt-scripted-modules/): MRISynthesisLib sits beside the helper package."""
    import shutil

    lib = tmp_path / "qt-scripted-modules"
    shutil.copytree(MODULE_DIR / "SlicerMRISynthesisLib", lib / "SlicerMRISynthesisLib")
    shutil.copytree(REPO / "MRISynthesisLib", lib / "MRISynthesisLib")
    code = (f"import sys; sys.path[:] = [{str(lib)!r}] + [p for p in sys.path if 'site-packages' not in p and p]\n"
            "import SlicerMRISynthesisLib, MRISynthesisLib; print(MRISynthesisLib.__file__)")
    result = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=60,
                            cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == lib / "MRISynthesisLib" / "__init__.py"
    shutil.rmtree(lib / "MRISynthesisLib")
    (tmp_path / "elsewhere").mkdir()
    result = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=60,
                            cwd=str(tmp_path / "elsewhere"))
    assert result.returncode != 0 and "incompletely installed" in result.stderr


def poll_until_done(run, limit=60.0):
    import time

    end = time.time() + limit
    while run.poll():
        assert time.time() < end, "the run did not finish"
        time.sleep(0.02)


def test_apply_run_installs_then_synthesises(scene, bundle):
    scene, t1, t2 = scene
    env = FakeEnvironment(torch=None)
    installer = env.installer(lambda m: True)
    installed = []
    logic = SynthesisSceneLogic(scene)
    worker = WorkerClient(worker_fakes.launcher())
    run = ApplyRun(logic, logic.prepare(t1=t1, t2=t2, model=bundle, device="cpu"), scene, worker,
                   deps.InstallJob(installer, installer.askToInstall()), onInstalled=lambda: installed.append(1))
    assert run.status.startswith("Installing torch>=2.1")
    assert worker.process is None  # no worker before the packages are there
    poll_until_done(run)
    assert [m for m, _ in env.calls] == [deps.PIP_INSTALL] and installed == [1]
    assert not run.failed and run.output.GetName() == "case t1 synthetic FLAIR" and run.message.startswith("Done")
    assert not run.job.running
    worker.kill()


def test_apply_run_cancel_during_install_stops_pip_and_synthesises_nothing(scene, bundle):
    scene, t1, t2 = scene
    env = FakeEnvironment(torch=None)
    launched = []
    installer = env.installer(lambda m: True, launch=lambda args: launched.append(_slow_pip(args)) or launched[-1])
    logic = SynthesisSceneLogic(scene)
    worker = WorkerClient(worker_fakes.launcher())
    before = node_state(scene)
    run = ApplyRun(logic, logic.prepare(t1=t1, t2=t2, model=bundle, device="cpu"), scene, worker,
                   deps.InstallJob(installer, installer.askToInstall()))
    assert run.poll() and run.poll() and launched[0].poll() is None  # pip running
    start = time.perf_counter()
    run.cancel("the scene was closed")
    assert time.perf_counter() - start < 0.1
    assert not run.poll() and run.output is None and run.job is None and worker.process is None
    assert "Installation cancelled (the scene was closed)" in run.message
    end = time.time() + 10
    while deps.runningInstallProcesses():  # the whole install tree is gone
        assert time.time() < end
        time.sleep(0.02)
    assert node_state(scene) == before


def test_apply_run_cancel_during_synthesis(scene, bundle, tmp_path):
    scene, t1, t2 = scene
    gate = Gate(tmp_path)
    logic = SynthesisSceneLogic(scene)
    before = node_state(scene)
    run = ApplyRun(logic, logic.prepare(t1=t1, t2=t2, model=bundle, device="cpu"), scene, gate.worker)
    wait_started(run.job)
    assert run.poll() and run.progress[0] >= 1
    pid = gate.worker.pid
    start = time.perf_counter()
    run.cancel("you pressed Cancel")
    assert time.perf_counter() - start < 0.1
    assert not run.job.running and run.output is None and not run.failed
    assert run.message == "Cancelled (you pressed Cancel); the scene is unchanged."
    assert node_state(scene) == before
    wait_gone([pid])
    # The next Apply starts a new worker and succeeds.
    gate.release()
    run = ApplyRun(logic, logic.prepare(t1=t1, t2=t2, model=bundle, device="cpu"), scene, gate.worker)
    poll_until_done(run)
    assert not run.failed and run.output is not None and gate.worker.pid != pid
    gate.worker.kill()


def test_apply_run_reports_a_failed_install_and_does_not_synthesise(scene, bundle):
    scene, t1, t2 = scene
    env = FakeEnvironment(torch=None)
    env.behave(fail="no network")
    installer = env.installer(lambda m: True)
    logic = SynthesisSceneLogic(scene)
    worker = WorkerClient(worker_fakes.launcher())
    run = ApplyRun(logic, logic.prepare(t1=t1, t2=t2, model=bundle, device="cpu"), scene, worker,
                   deps.InstallJob(installer, installer.askToInstall()))
    poll_until_done(run)
    assert run.failed and "no network" in run.message and run.job is None and run.output is None
    assert worker.process is None


@pytest.fixture
def head(tmp_path):
    """A raw "head" T1 (> 2200 ml non-zero: auto extracts), and a worker whose deepbet is
    replaced by a fake returning the mask in ``masks.npy`` (the real one runs in
    test_slicer_batch)."""
    scene = slicer.vtkMRMLScene()
    t1 = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "head t1")
    shape = (40, 40, 24)
    updateNodeFromArray(t1, 100 + 400 * np.random.default_rng(0).random(shape).astype(np.float32),
                        np.diag([4.0, 4.0, 4.0, 1.0]))
    mask_file = tmp_path / "mask.npy"
    np.save(mask_file, brain_like(shape, 0, margin=(6, 6, 4)) > 0)
    return scene, t1, mask_file


def test_apply_run_extracts_in_the_worker_and_reports_the_mask_decision(head, tmp_path):
    scene, t1, mask_file = head
    bundle = str(make_bundle(tmp_path / "t1.safetensors", ("t1",)))
    logic = SynthesisSceneLogic(scene)
    worker = WorkerClient(worker_fakes.launcher(MRISYNTHESIS_TEST_BRAIN=mask_file))
    run = ApplyRun(logic, logic.prepare(t1=t1, model=bundle, device="cpu", saveMask=True, uncertainty=True), scene,
                   worker)
    poll_until_done(run)
    assert not run.failed, run.message
    assert "Brain mask: extracted from t1 with deepbet" in run.message and "\n" not in run.message
    assert f"Brain mask saved as '{run.result.maskOutput.GetName()}'" in run.message
    assert run.result.maskDecision.source == "extracted (deepbet)" and run.result.output is run.output
    np.testing.assert_array_equal(slicer_array(run.result.maskOutput).transpose(2, 1, 0) > 0,
                                  np.load(mask_file))
    # Made in the worker process, marked in the scene (issue 19): provenance and the TTA spread.
    from MRISynthesisLib import provenance
    from SlicerMRISynthesisLib.scene import nodeRecord

    record = nodeRecord(run.output)
    assert record["Synthetic"] is True and record["BrainMask"]["Source"] == "extracted (deepbet)"
    assert nodeRecord(run.result.maskOutput)["Kind"] == provenance.KIND_MASK
    spread = run.result.uncertaintyOutput
    assert nodeRecord(spread)["Kind"] == provenance.KIND_UNCERTAINTY and "not a confidence map" in run.message
    assert slicer_array(spread).max() > 0
    worker.kill()


def test_apply_run_empty_extracted_mask_is_one_line_and_scene_unchanged(head, tmp_path):
    scene, t1, mask_file = head
    np.save(mask_file, np.zeros_like(np.load(mask_file)))
    bundle = str(make_bundle(tmp_path / "t1.safetensors", ("t1",)))
    logic = SynthesisSceneLogic(scene)
    worker = WorkerClient(worker_fakes.launcher(MRISYNTHESIS_TEST_BRAIN=mask_file))
    before = node_state(scene)
    run = ApplyRun(logic, logic.prepare(t1=t1, model=bundle, device="cpu", saveMask=True), scene, worker)
    poll_until_done(run)
    assert run.failed and run.output is None and "is empty: no brain found" in run.message
    assert "\n" not in run.message and not run.message.startswith("Synthesis failed")  # the core's own line
    assert node_state(scene) == before
    worker.kill()
