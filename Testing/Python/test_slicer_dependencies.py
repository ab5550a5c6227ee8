"""Installing the module's Python packages in Slicer 5.8, 5.10 and 5.12+: which installer
runs, version checks, one confirmation, declining, and Cancel during a pip process. Slicer's
functions are injected (no qt/slicer fakes); pip processes are real subprocesses."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "MRISynthesis"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

from MRISynthesisLib.errors import Cancelled  # noqa: E402
from SlicerMRISynthesisLib import dependencies as deps  # noqa: E402

PRESENT = {"numpy": "1.26.4", "SimpleITK": "2.4.0", "scipy": "1.13.0", "nibabel": "5.2.1", "safetensors": "0.4.5",
           "torch": "2.5.1", "deepbet": "1.0.2"}


class FakeEnvironment:
    """Installed distributions (name -> version) that the injected installers change."""

    def __init__(self, loaded=(), **versions):
        self.loaded = set(loaded)  # imported in the running session
        self.versions = dict(PRESENT, **versions)
        self.versions = {k: v for k, v in self.versions.items() if v is not None}
        self.calls = []

    def version(self, distribution):
        return self.versions.get(distribution)

    def find_spec(self, name):
        return object() if name in self.versions or name in ("numpy", "SimpleITK", "scipy") else None

    def install(self, method):
        def run(requirements):
            requirements = [requirements] if isinstance(requirements, str) else list(requirements)
            self.calls.append((method, requirements))
            for r in requirements:
                self.versions[r.split(">=")[0]] = "99.0"
        return run

    def installer(self, confirm, hasPyTorchUtils=False, hasPipEnsure=False, launchPip=None):
        return deps.DependencyInstaller(
            confirm=confirm, hasPyTorchUtils=hasPyTorchUtils, hasPipEnsure=hasPipEnsure,
            installTorchWithPyTorchUtils=self.install("pytorchutils"), pipEnsure=self.install("pip_ensure"),
            launchPip=launchPip or self._launch, installedVersion=self.version, findSpec=self.find_spec,
            isLoaded=lambda name: name in self.loaded)

    def _launch(self, requirements):
        self.install("pip_install")(requirements)
        return subprocess.Popen([sys.executable, "-c", "print('Successfully installed')"], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, universal_newlines=True)


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


@pytest.mark.parametrize("pytorchutils, pipensure, expected", [
    (True, True, [("pytorchutils", ("torch>=2.1",)), ("pip_ensure", ("safetensors>=0.4",))]),   # 5.12 + extension
    (False, True, [("pip_ensure", ("torch>=2.1", "safetensors>=0.4"))]),                        # 5.12+
    (False, False, [("pip_install", ("torch>=2.1", "safetensors>=0.4"))]),                      # 5.8-5.10
    (True, False, [("pytorchutils", ("torch>=2.1",)), ("pip_install", ("safetensors>=0.4",))]),  # 5.8-5.10 + ext.
])
def test_installer_per_slicer_version(pytorchutils, pipensure, expected):
    env = FakeEnvironment(torch=None, safetensors=None)
    problems = deps.checkRequirements(env.version, env.find_spec)
    steps = deps.chooseInstallSteps(problems, hasPyTorchUtils=pytorchutils, hasPipEnsure=pipensure)
    assert [(s.method, s.requirements) for s in steps] == expected


@pytest.mark.parametrize("pytorchutils, pipensure", [(True, True), (False, True), (False, False)])
def test_one_confirmation_then_install_and_verify(pytorchutils, pipensure):
    env = FakeEnvironment(torch=None, safetensors="0.3.1")
    asked = []
    installer = env.installer(lambda message: asked.append(message) or True, pytorchutils, pipensure)
    assert installer.ensure(wait=lambda s: None) is True
    assert len(asked) == 1
    assert "torch is not installed" in asked[0] and "safetensors 0.3.1 is installed" in asked[0]
    methods = [method for method, _ in env.calls]
    assert methods == (["pytorchutils"] if pytorchutils else []) + ["pip_ensure" if pipensure else "pip_install"]
    assert sorted(r for _, reqs in env.calls for r in reqs) == ["safetensors>=0.4", "torch>=2.1"]
    asked.clear()
    assert installer.ensure() is True and asked == []  # everything there: no question


def test_declining_installs_nothing():
    env = FakeEnvironment(torch=None)
    installer = env.installer(lambda message: False, hasPipEnsure=True)
    assert installer.ensure() is False
    assert installer.askToInstall() is None
    assert env.calls == []


def test_install_that_does_not_help_is_reported():
    env = FakeEnvironment(torch=None)
    installer = env.installer(lambda message: True, hasPipEnsure=True)
    installer.pipEnsure = lambda requirements: None  # "succeeds" but installs nothing
    with pytest.raises(RuntimeError, match="torch is not installed.*Restart Slicer"):
        installer.ensure()


def test_old_torch_already_loaded_asks_for_update_and_restart():
    env = FakeEnvironment(torch="1.13.1", loaded={"torch"})  # imported by another extension
    installer = env.installer(lambda message: pytest.fail("must not ask"), hasPipEnsure=True)
    with pytest.raises(RuntimeError, match=r"torch 1\.13\.1 is installed; MRISynthesis needs torch>=2\.1.*restart"):
        installer.askToInstall()
    assert env.calls == []


def test_broken_slicer_is_reported():
    env = FakeEnvironment()
    installer = env.installer(lambda message: True)
    installer.findSpec = lambda name: None if name == "SimpleITK" else object()
    with pytest.raises(RuntimeError, match="SimpleITK should come with 3D Slicer"):
        installer.problems()


def test_pip_command_is_the_one_slicer_util_pip_install_runs():
    assert deps.pipInstallCommand("/slicer/bin/PythonSlicer", ["torch>=2.1", "nibabel>=5.0"]) == [
        "/slicer/bin/PythonSlicer", "-m", "pip", "install", "torch>=2.1", "nibabel>=5.0"]


def _slow_pip(requirements):
    code = "import sys, time\nprint('Collecting torch', flush=True)\ntime.sleep(60)\n"
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            universal_newlines=True)


def test_cancel_stops_a_running_pip_process_blocking_api():
    env = FakeEnvironment(torch=None)
    launched = []
    installer = env.installer(lambda m: True, launchPip=lambda r: launched.append(_slow_pip(r)) or launched[-1])
    polls = []

    def cancel():
        polls.append(1)
        return len(polls) > 3

    with pytest.raises(Cancelled):
        installer.ensure(cancel=cancel, wait=lambda s: None)
    assert launched[0].poll() is not None  # terminated, nothing left running


def test_install_job_cancel_from_the_panel_terminates_pip():
    env = FakeEnvironment(torch=None)
    launched = []
    installer = env.installer(lambda m: True, hasPyTorchUtils=True,
                              launchPip=lambda r: launched.append(_slow_pip(r)) or launched[-1])
    env.versions.pop("safetensors")
    steps = installer.askToInstall()
    assert [s.method for s in steps] == ["pytorchutils", "pip_install"]
    job = deps.InstallJob(installer, steps)
    assert job.poll()  # runs the blocking PyTorch-extension step
    assert job.poll()  # starts pip
    assert job.poll() and launched and launched[0].poll() is None  # pip running, panel free
    reader = job.current._reader
    job.cancel()
    assert job.cancelled and job.finished and not job.poll()
    assert launched[0].poll() is not None and not reader.is_alive()


def test_install_job_is_not_reentered_by_a_blocking_installer_and_cancel_inside_it_stops():
    """pip_ensure / PyTorchUtils run an event loop (progress dialog, processEvents), so the
    panel's timer calls poll() again inside them; and Cancel can be pressed there."""
    env = FakeEnvironment(torch=None, safetensors=None)
    calls = []
    installer = env.installer(lambda m: True, hasPyTorchUtils=True, hasPipEnsure=True)
    job = deps.InstallJob(installer, installer.askToInstall())

    def torch_installer(requirement):
        calls.append(requirement)
        assert job.poll() is True  # nested timer tick: no second install
        job.cancel()  # the user presses Cancel while the extension installs

    installer.installTorchWithPyTorchUtils = torch_installer
    assert job.poll() is False
    assert calls == ["torch>=2.1"] and job.cancelled and job.error is None
    assert not job.poll()  # nothing else runs: pip_ensure never called
    assert [m for m, _ in env.calls] == []


def test_install_job_reports_a_failed_pip_with_its_output():
    env = FakeEnvironment(torch=None)

    def failing(requirements):
        return subprocess.Popen([sys.executable, "-c", "print('ERROR: No matching distribution for torch>=2.1');"
                                 "raise SystemExit(1)"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                universal_newlines=True)

    installer = env.installer(lambda m: True, launchPip=failing)
    job = deps.InstallJob(installer, installer.askToInstall())
    for _ in range(200):
        if not job.poll():
            break
        import time
        time.sleep(0.05)
    assert isinstance(job.error, RuntimeError) and "No matching distribution" in str(job.error)


def _module_function(name):
    tree = ast.parse((MODULE_DIR / "MRISynthesis.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
            return node
    raise AssertionError(f"{name} not found in MRISynthesis.py")


def test_module_wires_slicer_installers_as_documented():
    """The Slicer-side glue (cannot run here): pip_ensure with prompt_install=False (already
    asked once), pip through launchConsoleProcess, PyTorchUtils without a second question, and
    no installation in testing mode (confirmation dialogs answer yes there)."""
    calls = {}
    for node in ast.walk(_module_function("_pipEnsure")):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "pip_ensure":
            calls = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
    assert calls.get("prompt_install") is False
    launch = ast.unparse(_module_function("_launchPip"))
    assert "launchConsoleProcess" in launch and "useStartupEnvironment=False" in launch and "PythonSlicer" in launch
    torch = ast.unparse(_module_function("_installTorchWithPyTorchUtils"))
    assert "askConfirmation=False" in torch and "torchVersionRequirement" in torch
    confirm = ast.unparse(_module_function("_confirmInSlicer"))
    assert confirm.index("testingEnabled") < confirm.index("confirmOkCancelDisplay")


def test_self_test_never_installs_and_skips_with_the_list():
    test_class = _module_function("MRISynthesisTest")
    run = ast.unparse(next(n for n in test_class.body if getattr(n, "name", "") == "runTest"))
    assert run.index("missingRequirements") < run.index("skipTest") < run.index("test_SynthesisGeometryAndValues")
    source = ast.unparse(test_class)
    assert "ensureDependencies" not in source
    assert "confirm=lambda message: False" in source  # its logic's installer can never install
