"""Installing the module's Python packages in Slicer 5.8, 5.10 and 5.12+: which steps run,
version checks, one confirmation, declining, constraints that keep Slicer's own packages,
Cancel killing the whole process tree at once, output with undecodable bytes, and the
self-test's skip. Install steps run as real process trees: a stand-in for ``PythonSlicer``
that, like the CTK launcher, starts the interpreter as a child (no qt/slicer fakes)."""

import ast
import json
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import weakref
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "MRISynthesis"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

from conftest import pid_alive  # noqa: E402
from MRISynthesisLib import processes  # noqa: E402
from MRISynthesisLib.errors import Cancelled  # noqa: E402
from SlicerMRISynthesisLib import dependencies as deps  # noqa: E402

PRESENT = {"numpy": "1.26.4", "SimpleITK": "2.4.0", "scipy": "1.13.0", "nibabel": "5.2.1", "safetensors": "0.4.5",
           "torch": "2.5.1", "deepbet": "1.0.2", "pydicom": "2.4.4", "requests": "2.32.3"}

# Slicer's PythonSlicer is a launcher that starts the real interpreter as a child and waits.
FAKE_LAUNCHER = """#!{python}
import subprocess, sys
sys.exit(subprocess.Popen([sys.executable, {interpreter!r}, *sys.argv[1:]]).wait())
"""
# The "interpreter": runs "-m pip install ..." / "-m light_the_torch install ..." against the
# fake environment's state file, as told by its "behaviour".
FAKE_INTERPRETER = textwrap.dedent("""
    import json, os, re, sys, time
    here = os.path.dirname(os.path.abspath(__file__))
    state_file = os.path.join(here, "state.json")
    with open(state_file) as f:
        state = json.load(f)
    args = sys.argv[1:]
    module, rest = args[1], args[3:]
    constraints, requirements, i = None, [], 0
    while i < len(rest):
        if rest[i] == "-c":
            with open(rest[i + 1]) as f:
                constraints = f.read()
            i += 2
            continue
        if not rest[i].startswith("-"):
            requirements.append(rest[i])
        i += 1
    with open(os.path.join(here, "calls.jsonl"), "a") as f:
        f.write(json.dumps({"module": module, "requirements": requirements, "constraints": constraints,
                            "args": args, "pid": os.getpid()}) + "\\n")
    behaviour = state.get("behaviour", {})
    out = sys.stdout.buffer
    if behaviour.get("pidfile"):
        with open(behaviour["pidfile"], "w") as f:
            f.write(str(os.getpid()))
    out.write(b"Collecting " + " ".join(requirements).encode() + b"\\n")
    out.flush()
    if behaviour.get("garbage"):
        out.write(b"Downloading caf\\xe9 \\xff\\xfe (not UTF-8)\\n")
        for i in range(behaviour["garbage"]):
            out.write(b"  progress line %d\\n" % i)
    time.sleep(behaviour.get("sleep", 0))
    if behaviour.get("fail"):
        out.write(("ERROR: " + behaviour["fail"] + "\\n").encode())
        sys.exit(1)
    if not behaviour.get("noop"):
        for requirement in requirements:
            state["versions"][re.split("[<>=!~]", requirement)[0]] = "99.0"
        with open(state_file, "w") as f:
            json.dump(state, f)
    out.write(("Successfully installed " + " ".join(requirements) + "\\n").encode())
""")


def _normal(name):
    return re.sub(r"[-_.]+", "-", name).lower()


class FakeEnvironment:
    """Installed distributions (name -> version) in a state file that the install processes
    (a fake PythonSlicer launcher and its child interpreter) change."""

    def __init__(self, loaded=(), **versions):
        self.dir = Path(tempfile.mkdtemp(prefix="mrisynthesis-fake-slicer-"))
        weakref.finalize(self, shutil.rmtree, str(self.dir), True)
        self.loaded = set(loaded)  # imported in the running session
        versions = {k.replace("_", "-"): v for k, v in dict(PRESENT, **versions).items()}
        self._write({"versions": {k: v for k, v in versions.items() if v is not None}, "behaviour": {}})
        interpreter = self.dir / "interpreter.py"
        interpreter.write_text(FAKE_INTERPRETER)
        self.launcher = self.dir / "PythonSlicer"
        self.launcher.write_text(FAKE_LAUNCHER.format(python=sys.executable, interpreter=str(interpreter)))
        self.launcher.chmod(0o755)

    def _state(self):
        return json.loads((self.dir / "state.json").read_text())

    def _write(self, state):
        (self.dir / "state.json").write_text(json.dumps(state))

    def behave(self, **behaviour):
        """How the next install processes behave: sleep=S, pidfile=PATH, fail=MESSAGE,
        garbage=N (undecodable bytes then N lines), noop=True (succeed, install nothing)."""
        state = self._state()
        state["behaviour"] = behaviour
        self._write(state)

    @property
    def versions(self):
        return self._state()["versions"]

    def version(self, distribution):
        return {_normal(k): v for k, v in self.versions.items()}.get(_normal(distribution))

    def find_spec(self, name):
        present = {_normal(k) for k in self.versions} | {"numpy", "simpleitk", "scipy"}
        return object() if _normal(name) in present else None

    @property
    def records(self):
        path = self.dir / "calls.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    @property
    def calls(self):
        """[(method, requirements)] of the install processes that ran."""
        methods = {"pip": deps.PIP_INSTALL, "light_the_torch": deps.LIGHT_THE_TORCH_INSTALL}
        return [(methods[r["module"]], r["requirements"]) for r in self.records]

    def installer(self, confirm, hasPyTorchExtension=False, launch=None):
        return deps.DependencyInstaller(
            confirm=confirm, hasPyTorchExtension=hasPyTorchExtension, python=str(self.launcher),
            launch=launch or deps.launchInstallProcess, constraintsFolder=str(self.dir),
            installedVersion=self.version, findSpec=self.find_spec, isLoaded=lambda name: name in self.loaded)


def _slow_pip(args=None):
    """A slow install process tree (launcher + child), whatever ``args`` say."""
    code = "import subprocess, sys; sys.exit(subprocess.call([sys.executable, '-c', 'import time; print(1, " \
           "flush=True); time.sleep(60)']))"
    return processes.popen_new_group([sys.executable, "-c", code], stdin=False)


def run_job(job, limit=60.0):
    end = time.monotonic() + limit
    while job.poll():
        assert time.monotonic() < end, "the install job did not finish"
        time.sleep(0.02)


@pytest.fixture(autouse=True)
def no_leftover_install_processes():
    yield
    for process in deps.runningInstallProcesses():
        processes.kill_process_tree(process)
    end = time.monotonic() + 5
    while deps.runningInstallProcesses() and time.monotonic() < end:
        time.sleep(0.02)


def test_version_parsing():
    assert deps.versionTuple("2.1.0+cu121") == (2, 1, 0)
    assert deps.versionTuple("2.10.0") > deps.versionTuple("2.9.1")
    assert deps.versionTuple("0.4.0rc1") == (0, 4, 0)
    assert deps.versionTuple("1.13.1") < deps.versionTuple("2.1")


def test_requirements_are_what_the_core_imports():
    # Not scikit-image; deepbet for the default brain mask "auto" (MRISynthesisLib.brainmask).
    assert {r.distribution for r in deps.REQUIREMENTS} == {"torch", "nibabel", "safetensors", "deepbet"}
    assert set(deps.BUNDLED_WITH_SLICER) == {"numpy", "SimpleITK", "scipy"}


def test_missing_and_old_packages_are_reported_with_versions():
    env = FakeEnvironment(torch=None, nibabel="4.0.2")
    problems = deps.checkRequirements(env.version, env.find_spec)
    assert [p.message for p in problems] == [
        "torch is not installed (MRISynthesis needs torch>=2.1)",
        "nibabel 4.0.2 is installed; MRISynthesis needs nibabel>=5.0",
    ]
    assert deps.checkRequirements(FakeEnvironment().version, FakeEnvironment().find_spec) == []


LTT, PIP = deps.LIGHT_THE_TORCH_INSTALL, deps.PIP_INSTALL


@pytest.mark.parametrize("extension, ltt, expected", [
    # The PyTorch extension installed (the default: a dependency), light-the-torch not yet.
    (True, False, [(PIP, ("light-the-torch>=0.5",)), (LTT, ("torch>=2.1", "torchvision")), (PIP, ("safetensors>=0.4",))]),
    (True, True, [(LTT, ("torch>=2.1", "torchvision")), (PIP, ("safetensors>=0.4",))]),
    (False, False, [(PIP, ("torch>=2.1", "safetensors>=0.4"))]),  # no PyTorch extension: pip for all
    (False, True, [(PIP, ("torch>=2.1", "safetensors>=0.4"))]),
])
def test_install_steps(extension, ltt, expected):
    env = FakeEnvironment(torch=None, safetensors=None, **({"light_the_torch": "0.7.5"} if ltt else {}))
    problems = deps.checkRequirements(env.version, env.find_spec)
    assert deps.hasLightTheTorch(env.version, env.find_spec) is ltt
    steps = deps.chooseInstallSteps(problems, extension, deps.hasLightTheTorch(env.version, env.find_spec))
    assert [(s.method, s.requirements) for s in steps] == expected
    _, planned = env.installer(lambda m: True, hasPyTorchExtension=extension).plan()
    assert planned == steps


def test_install_commands_are_what_slicer_and_the_pytorch_extension_run():
    pip = deps.installCommand("/slicer/bin/PythonSlicer", deps.InstallStep(PIP, ("nibabel>=5.0",)), "/tmp/c.txt")
    assert pip == ["/slicer/bin/PythonSlicer", "-m", "pip", "install", "--no-input", "--disable-pip-version-check",
                   "-c", "/tmp/c.txt", "nibabel>=5.0"]
    ltt = deps.installCommand("/slicer/bin/PythonSlicer", deps.InstallStep(LTT, ("torch>=2.1", "torchvision")),
                              "/tmp/c.txt")
    # PyTorchUtils.installTorch: _executePythonModule("light_the_torch", ["install", "torch>=...", "torchvision"]).
    assert ltt[:4] == ["/slicer/bin/PythonSlicer", "-m", "light_the_torch", "install"]
    assert ltt[-4:] == ["-c", "/tmp/c.txt", "torch>=2.1", "torchvision"]


@pytest.mark.parametrize("extension", [True, False])
def test_one_confirmation_then_install_and_verify(extension):
    env = FakeEnvironment(torch=None, safetensors="0.3.1")
    asked = []
    installer = env.installer(lambda message: asked.append(message) or True, extension)
    assert installer.ensure(wait=lambda s: time.sleep(0.01)) is True
    assert len(asked) == 1
    assert "torch is not installed" in asked[0] and "safetensors 0.3.1 is installed" in asked[0]
    if extension:
        assert env.calls == [(PIP, ["light-the-torch>=0.5"]), (LTT, ["torch>=2.1", "torchvision"]),
                             (PIP, ["safetensors>=0.4"])]
    else:
        assert env.calls == [(PIP, ["torch>=2.1", "safetensors>=0.4"])]
    asked.clear()
    assert installer.ensure() is True and asked == []  # everything there: no question


def test_installs_pass_constraints_that_keep_slicers_packages():
    env = FakeEnvironment(torch=None)
    installer = env.installer(lambda m: True, hasPyTorchExtension=True)
    assert installer.ensure(wait=lambda s: time.sleep(0.01))
    assert [r["module"] for r in env.records] == ["pip", "light_the_torch"]
    for record in env.records:  # every pip and light-the-torch process
        assert "-c" in record["args"]
        pins = set(record["constraints"].splitlines()[1:])
        assert {"numpy==1.26.4", "scipy==1.13.0", "SimpleITK==2.4.0", "pydicom==2.4.4", "requests==2.32.3"} == pins
    assert not list(env.dir.glob("MRISynthesis-constraints-*"))  # removed when the step ended
    assert {"numpy", "scipy", "SimpleITK"} <= set(deps.SLICER_PACKAGES)
    assert not {"pip", "setuptools", "wheel"} & set(deps.SLICER_PACKAGES)  # light-the-torch pins pip itself
    odd = {"numpy": "1.26.4", "scipy": "1.13.1+slicer.1", "SimpleITK": "2.4.0-g1a2b3c", "pillow": "10.3.0.post1"}.get
    assert deps.constraintLines(odd) == ["numpy==1.26.4", "scipy==1.13.1+slicer.1", "pillow==10.3.0.post1"]
    # Real packages of this environment: their installed versions, by the names pip uses.
    lines = deps.constraintLines()
    import numpy
    import scipy

    assert f"numpy=={numpy.__version__}" in lines and f"scipy=={scipy.__version__}" in lines


def test_real_pip_honours_the_constraints_file(tmp_path):
    """The command line is one real pip accepts, and the file keeps an installed package: a
    pinned numpy other than the installed one cannot be satisfied (offline: --no-index)."""
    if subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode:
        pytest.skip("pip is not installed in this environment")
    import numpy

    def pip(pinned):
        path = tmp_path / "constraints.txt"
        path.write_text(f"numpy=={pinned}\n")
        command = deps.pipInstallCommand(sys.executable, ["numpy"], str(path)) + ["--dry-run", "--no-index"]
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    kept = pip(numpy.__version__)
    assert kept.returncode == 0 and "already satisfied" in kept.stdout, kept.stdout + kept.stderr
    other = pip("1.0.0")
    assert other.returncode != 0 and "numpy==1.0.0" in other.stdout + other.stderr


def test_declining_installs_nothing():
    env = FakeEnvironment(torch=None)
    installer = env.installer(lambda message: False)
    assert installer.ensure() is False
    assert installer.askToInstall() is None
    assert env.calls == []


def test_install_that_does_not_help_is_reported():
    env = FakeEnvironment(torch=None)
    env.behave(noop=True)  # "succeeds" but installs nothing
    installer = env.installer(lambda message: True)
    with pytest.raises(RuntimeError, match="torch is not installed.*Restart Slicer"):
        installer.ensure(wait=lambda s: time.sleep(0.01))


def test_old_torch_already_loaded_asks_for_update_and_restart():
    env = FakeEnvironment(torch="1.13.1", loaded={"torch"})  # imported by another extension
    installer = env.installer(lambda message: pytest.fail("must not ask"))
    with pytest.raises(RuntimeError, match=r"torch 1\.13\.1 is installed; MRISynthesis needs torch>=2\.1.*restart"):
        installer.askToInstall()
    assert env.calls == []


def test_old_torch_installed_but_not_loaded_is_upgraded_and_the_panel_never_imports_it(tmp_path):
    """Issue 18 item 3: the panel's PyTorch line comes from metadata, so an old torch left by
    another extension is never imported by MRISynthesis and gets an upgrade plan (in a fresh
    interpreter whose only torch is an old one that must not be imported)."""
    site = tmp_path / "site"
    (site / "torch").mkdir(parents=True)
    (site / "torch" / "__init__.py").write_text("raise ImportError('MRISynthesis imported the old torch')\n")
    (site / "torch-1.13.1.dist-info").mkdir()
    (site / "torch-1.13.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 1.13.1\n")
    code = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(site)!r}); sys.path.insert(1, {str(MODULE_DIR)!r})
        import SlicerMRISynthesisLib
        from SlicerMRISynthesisLib import dependencies, modelinfo
        line = modelinfo.installedTorchStatus()           # what the panel shows on enter()
        choices = modelinfo.deviceChoices(None, current="cuda:1")
        installer = dependencies.DependencyInstaller(confirm=lambda m: True, hasPyTorchExtension=True)
        problems, steps = installer.plan()
        print(json.dumps({{"line": line, "problems": [p.message for p in problems],
                          "steps": [[s.method, list(s.requirements)] for s in steps],
                          "choices": choices, "torch_imported": "torch" in sys.modules}}))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["torch_imported"] is False
    assert out["line"] == ("PyTorch 1.13.1 is installed; MRISynthesis needs torch>=2.1: it is upgraded on the first "
                           "Apply, after asking.")
    assert "torch 1.13.1 is installed; MRISynthesis needs torch>=2.1" in out["problems"]
    assert [LTT, ["torch>=2.1", "torchvision"]] in out["steps"]
    assert [d for d, _ in out["choices"]] == ["auto", "cuda:1", "cpu"]  # a saved GPU choice stays


def test_broken_slicer_is_reported():
    env = FakeEnvironment()
    installer = env.installer(lambda message: True)
    installer.findSpec = lambda name: None if name == "SimpleITK" else object()
    with pytest.raises(RuntimeError, match="SimpleITK should come with 3D Slicer"):
        installer.problems()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_cancel_kills_the_launcher_and_the_interpreter_at_once_and_a_second_install_waits(tmp_path):
    """Issue 18 item 5: PythonSlicer is a launcher; Cancel must stop the interpreter it
    started (pip writing to site-packages), within 0.1 s, and no second install may start
    beside one that is still alive."""
    env = FakeEnvironment(torch=None)
    pidfile = tmp_path / "interpreter.pid"
    env.behave(sleep=60, pidfile=str(pidfile))
    installer = env.installer(lambda m: True)
    job = deps.InstallJob(installer, installer.askToInstall())
    assert job.poll()  # started: the panel polls, nothing waits
    end = time.monotonic() + 20
    while not (pidfile.exists() and pidfile.read_text()):
        assert job.poll() and time.monotonic() < end
        time.sleep(0.02)
    launcher, interpreter = job.current.process.pid, int(pidfile.read_text())
    assert launcher != interpreter and pid_alive(launcher) and pid_alive(interpreter)
    # A second Apply (or the console) while it runs: refused with a clear message.
    with pytest.raises(deps.InstallStillRunning, match=rf"still running \(process {launcher}\).*press Apply again"):
        env.installer(lambda m: pytest.fail("must not ask")).askToInstall()
    start = time.perf_counter()
    job.cancel()
    assert time.perf_counter() - start < 0.1
    assert job.cancelled and job.finished and not job.poll() and job.error is None
    end = time.monotonic() + 5
    while pid_alive(launcher) or pid_alive(interpreter):
        assert time.monotonic() < end, "the install process tree survived Cancel"
        time.sleep(0.02)
    assert deps.runningInstallProcesses() == []  # reaped: the next Apply may install again
    assert env.installer(lambda m: False).askToInstall() is None
    assert [m for m, _ in env.calls] == [PIP]


def test_cancel_from_the_blocking_api_kills_the_tree_too(tmp_path):
    env = FakeEnvironment(torch=None)
    pidfile = tmp_path / "interpreter.pid"
    env.behave(sleep=60, pidfile=str(pidfile))
    installer = env.installer(lambda m: True)

    def cancel():
        return pidfile.exists() and bool(pidfile.read_text())

    with pytest.raises(Cancelled):
        installer.ensure(cancel=cancel, wait=lambda s: time.sleep(0.02))
    interpreter = int(pidfile.read_text())
    end = time.monotonic() + 5
    while pid_alive(interpreter) or deps.runningInstallProcesses():
        assert time.monotonic() < end
        time.sleep(0.02)


def test_undecodable_install_output_neither_kills_the_reader_nor_hangs_the_install():
    """Issue 18 item 6: bytes that are not UTF-8 (a Windows code page, a progress bar), then
    far more output than a pipe holds: the step finishes, the lines are kept with U+FFFD."""
    env = FakeEnvironment(torch=None)
    env.behave(garbage=20000)  # about 400 kB after the bad line
    installer = env.installer(lambda m: True)
    logged = []
    installer.log = logged.append
    job = deps.InstallJob(installer, installer.askToInstall())
    run_job(job, limit=60)
    assert job.error is None and not job.cancelled and env.versions["torch"] == "99.0"
    assert "Downloading caf\ufffd \ufffd\ufffd (not UTF-8)" in logged
    assert logged[-1] == "Successfully installed torch>=2.1" and "  progress line 19999" in logged


def test_install_job_reports_a_failed_pip_with_its_output():
    env = FakeEnvironment(torch=None)
    env.behave(fail="No matching distribution found for torch>=2.1")
    installer = env.installer(lambda m: True)
    job = deps.InstallJob(installer, installer.askToInstall())
    run_job(job)
    assert isinstance(job.error, RuntimeError) and "No matching distribution" in str(job.error)
    assert "exit status 1" in str(job.error)


def test_install_job_runs_steps_in_order_and_shows_progress():
    env = FakeEnvironment(torch=None, safetensors=None)
    installer = env.installer(lambda m: True, hasPyTorchExtension=True)
    job = deps.InstallJob(installer, installer.askToInstall())
    assert job.description() == "light-the-torch>=0.5"
    seen = set()
    end = time.monotonic() + 60
    while job.poll():
        seen.add(job.description())
        assert time.monotonic() < end
        time.sleep(0.01)
    assert job.error is None and seen >= {"light-the-torch>=0.5", "torch>=2.1, torchvision", "safetensors>=0.4"}
    assert [m for m, _ in env.calls] == [PIP, LTT, PIP]


# ----------------------------------------------------------------------------- self-test (item 4)

SELF_TEST_MODULE = textwrap.dedent("""
    import unittest
    from SlicerMRISynthesisLib import dependencies

    class FakeModuleTest(dependencies.SelfTestGuard, unittest.TestCase):
        selfTests = ("test_first", "test_second")
        ran = []

        def setUpTest(self):
            self.ran.append("setUpTest")

        def test_first(self):
            import torch  # noqa: F401  (not installed: the guard must skip before this)
            self.ran.append("test_first")

        def test_second(self):
            import deepbet  # noqa: F401
            self.ran.append("test_second")
""")


def _self_test_run(tmp_path, hide):
    (tmp_path / "FakeModule.py").write_text(SELF_TEST_MODULE)
    # What slicer.testing.runUnitTest runs for slicer_add_python_unittest (ctest), in an
    # interpreter where the packages named in ``hide`` are not installed.
    code = textwrap.dedent(f"""
        import sys, unittest
        for name in {hide!r}:
            sys.modules[name] = None   # importlib.util.find_spec -> None, import -> ImportError
        sys.path[:0] = [{str(MODULE_DIR)!r}, {str(tmp_path)!r}]
        suite = unittest.TestLoader().loadTestsFromName("FakeModule")
        result = unittest.TextTestRunner(verbosity=2).run(suite)
        import FakeModule
        print("RESULT", result.testsRun, len(result.skipped), len(result.errors), len(result.failures),
              result.wasSuccessful(), FakeModule.FakeModuleTest.ran)
        for test, reason in result.skipped:
            print("SKIPPED", reason)
        # Reload and Test / Self Tests: ScriptedLoadableModule.runTest calls runTest() outside a runner.
        case = FakeModule.FakeModuleTest()
        shown = []
        case.delayDisplay = shown.append
        FakeModule.FakeModuleTest.ran.clear()
        case.runTest()
        print("GUI", repr(case.skipped), shown, FakeModule.FakeModuleTest.ran)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_self_test_is_skipped_under_ctest_and_in_the_gui_with_the_missing_packages(tmp_path):
    out = _self_test_run(tmp_path, ["torch", "deepbet"])
    assert "RESULT 2 2 0 0 True []" in out  # both tests skipped in setUp, none ran, the run succeeds
    reason = ("MRISynthesis needs Python packages that are not installed: torch is not installed (MRISynthesis "
              "needs torch>=2.1); deepbet is not installed (MRISynthesis needs deepbet>=1.0.2)")
    assert out.count(f"SKIPPED {reason}") == 2
    gui = next(line for line in out.splitlines() if line.startswith("GUI"))
    assert reason in gui and f"Self-test skipped: {reason}" in gui and gui.endswith("[]")  # reported, not failed


def test_self_test_runs_everything_when_the_packages_are_installed(tmp_path):
    out = _self_test_run(tmp_path, [])
    assert "RESULT 2 0 0 0 True" in out
    gui = next(line for line in out.splitlines() if line.startswith("GUI"))
    assert gui == "GUI None [] ['setUpTest', 'test_first', 'setUpTest', 'test_second']"


# ----------------------------------------------------------------------------- the module's wiring (static)


def _module_function(name):
    tree = ast.parse((MODULE_DIR / "MRISynthesis.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
            return node
    raise AssertionError(f"{name} not found in MRISynthesis.py")


def test_module_wires_the_installer_as_documented():
    """The Slicer-side glue (cannot run here): PythonSlicer for every step, light-the-torch
    when the PyTorch extension is there, constraints in Slicer's temporary folder, no blocking
    Slicer installer, and no installation in testing mode (dialogs answer yes there)."""
    wiring = ast.unparse(_module_function("slicerDependencyInstaller"))
    assert "hasPyTorchExtension=importlib.util.find_spec('PyTorchUtils') is not None" in wiring
    assert "python=_pythonSlicer" in wiring and "constraintsFolder=slicer.app.temporaryPath" in wiring
    assert "shutil.which('PythonSlicer')" in ast.unparse(_module_function("_pythonSlicer"))
    called = {getattr(n.func, "attr", getattr(n.func, "id", None))
              for n in ast.walk(ast.parse((MODULE_DIR / "MRISynthesis.py").read_text())) if isinstance(n, ast.Call)}
    assert "find_spec" in called  # the check sees calls
    for blocking in ("pip_ensure", "installTorch", "launchConsoleProcess", "pip_install", "_executePythonModule"):
        assert blocking not in called, f"MRISynthesis.py still calls the blocking {blocking}"
    confirm = ast.unparse(_module_function("_confirmInSlicer"))
    assert confirm.index("testingEnabled") < confirm.index("confirmOkCancelDisplay")


def test_self_test_class_uses_the_guard_and_never_installs():
    test_class = _module_function("MRISynthesisTest")
    assert ast.unparse(test_class.bases[0]) == "dependencies.SelfTestGuard"
    assert ast.unparse(test_class.bases[1]) == "ScriptedLoadableModuleTest"
    methods = {n.name for n in test_class.body if isinstance(n, ast.FunctionDef)}
    # Its own setUp or runTest would bypass the guard (ctest calls setUp, the GUI runTest).
    assert not {"setUp", "runTest"} & methods
    listed = next(ast.literal_eval(n.value) for n in test_class.body
                  if isinstance(n, ast.Assign) and n.targets[0].id == "selfTests")
    assert sorted(listed) == sorted(m for m in methods if m.startswith("test_"))
    source = ast.unparse(test_class)
    assert "ensureDependencies" not in source
    assert "confirm=lambda message: False" in source  # its logic's installer can never install
