"""The Python packages MRISynthesis needs inside 3D Slicer, and installing them on first use.

Qt-free: asking the user and the Python executable to install with are injected (the module
passes Slicer's dialog and ``PythonSlicer``), so every decision is tested under plain Python.
Nothing here imports torch, and nothing here blocks the GUI.

Every install step is a background process (``MRISynthesisLib.processes``) that the panel
polls and Cancel kills as a whole process tree, on every Slicer version (5.8 to 5.12+):

- PyTorch, when the PyTorch extension (``PyTorchUtils``) is installed: the extension's own
  method, run by us as a process: ``PythonSlicer -m light_the_torch install torch>=2.1
  torchvision`` (light-the-torch picks the build matching the GPU's CUDA driver; torchvision as
  ``PyTorchUtils.installTorch`` installs it, so a torchvision installed with an old torch is
  upgraded with it), preceded by ``PythonSlicer -m pip install light-the-torch>=0.5`` (a step
  of its own) when light-the-torch is not installed.
- Otherwise PyTorch with the other packages: ``PythonSlicer -m pip install ...`` (the command
  ``slicer.util.pip_install`` runs).
- ``slicer.packaging.pip_ensure`` (5.12+) and ``PyTorchUtils.installTorch`` are not called:
  they block Slicer's main thread until they end, so Cancel could not stop them.

Why a process tree: ``PythonSlicer`` is a CTK launcher that starts the real interpreter as
its child; killing the launcher alone would leave pip writing to site-packages.

Every pip / light-the-torch command gets ``-c CONSTRAINTS``: a file pinning the installed
versions of the packages Slicer ships (``SLICER_PACKAGES``), so no requirement of a package
installed here can replace them (if one needs another version, pip fails and says so, and
nothing is replaced).
"""

import importlib
import importlib.metadata
import importlib.util
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
import unittest
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Union

from MRISynthesisLib.errors import Cancelled, MRISynthesisError
from MRISynthesisLib.processes import LineReader, kill_process_tree, popen_new_group, process_tree_alive

log = logging.getLogger("MRISynthesis")


@dataclass(frozen=True)
class Requirement:
    importName: str
    distribution: str  # the pip name
    minimum: str  # lowest version that works

    @property
    def pip(self) -> str:
        return f"{self.distribution}>={self.minimum}"


TORCH = Requirement("torch", "torch", "2.1")
# Exactly what MRISynthesisLib imports for synthesis (inference, preprocessing, bundle, volumes)
# and for the default brain mask "auto" (brainmask: deepbet; its customtkinter GUI requirement
# is installed by pip but never imported, so no display is needed). deepbet needs
# torch>=1.11, so pip keeps the torch installed first (by light-the-torch when present).
REQUIREMENTS = (
    TORCH,
    Requirement("nibabel", "nibabel", "5.0"),
    Requirement("safetensors", "safetensors", "0.4"),
    Requirement("deepbet", "deepbet", "1.0.2"),
)
# The PyTorch extension's installer (PyTorchUtils.installTorch installs it with this requirement).
LIGHT_THE_TORCH = Requirement("light_the_torch", "light-the-torch", "0.5")
# What PyTorchUtils.installTorch installs beside torch (no version: the one matching torch).
TORCH_COMPANIONS = ("torchvision",)

# Ship with Slicer and must import (a Slicer without them is broken: reinstall Slicer).
BUNDLED_WITH_SLICER = ("numpy", "SimpleITK", "scipy")

# Pinned to their installed versions in every install (pip -c): the packages Slicer's
# SuperBuild installs into its Python (SuperBuild/External_python-*.cmake and SimpleITK's
# "pip install ." in External_SimpleITK.cmake, read for 5.8.1, 5.10.0 and 5.12.0) that Slicer's
# own modules use: numpy, scipy, SimpleITK (compiled with Slicer); the DICOM stack
# (python-dicom-requirements); requests and its dependencies (downloads, Extensions Manager);
# cryptography/cffi (compiled); GitPython/PyGithub (Extension Wizard). Packages that are not
# installed are not pinned (e.g. highdicom before 5.12). Deliberately NOT pinned: pip, setuptools
# and wheel (light-the-torch requires pip<24.4, as PyTorchUtils' install does too; torch 2.13
# requires setuptools>=77, Slicer 5.8 ships 70.0), and the pure-Python helpers typing_extensions,
# packaging, six, pyparsing (torch and nibabel need minimum versions, newer ones stay compatible).
SLICER_PACKAGES = (
    "numpy", "scipy", "SimpleITK",
    "pydicom", "pillow", "dicomweb-client", "highdicom", "dcmqi", "pyjpegls",
    "requests", "urllib3", "certifi", "charset-normalizer", "idna",
    "cryptography", "cffi",
    "GitPython", "PyGithub",
)

PIP_INSTALL = "pip_install"  # PythonSlicer -m pip install ...
LIGHT_THE_TORCH_INSTALL = "light_the_torch"  # PythonSlicer -m light_the_torch install ...
# Never prompt (stdin is not a terminal) and skip pip's self-update check.
PIP_OPTIONS = ("--no-input", "--disable-pip-version-check")


def versionTuple(version: str) -> Tuple[int, ...]:
    """(2, 1, 0) for "2.1.0+cu121"; enough for ">= minimum" checks of release versions."""
    numbers = []
    for part in re.split(r"[.+-]", version):
        match = re.match(r"\d+", part)
        if not match:
            break
        numbers.append(int(match.group()))
        if match.group() != part:
            break
    return tuple(numbers)


def installedVersion(distribution: str) -> Optional[str]:
    """The installed version of a distribution from its metadata (nothing is imported)."""
    for name in dict.fromkeys((distribution, distribution.replace("-", "_"), distribution.replace("_", "-"))):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


_installedVersion = installedVersion  # the name used before


@dataclass(frozen=True)
class Problem:
    requirement: Requirement
    installed: Optional[str]  # None: not installed

    @property
    def message(self) -> str:
        if self.installed is None:
            return f"{self.requirement.distribution} is not installed (MRISynthesis needs {self.requirement.pip})"
        return (f"{self.requirement.distribution} {self.installed} is installed; "
                f"MRISynthesis needs {self.requirement.pip}")


def checkRequirements(installedVersion: Callable[[str], Optional[str]] = installedVersion,
                      findSpec: Callable = importlib.util.find_spec) -> List[Problem]:
    """The required packages that are missing or too old (versions from the installed
    distributions' metadata; nothing is imported)."""
    problems = []
    for requirement in REQUIREMENTS:
        version = installedVersion(requirement.distribution)
        if version is None or findSpec(requirement.importName) is None:
            problems.append(Problem(requirement, None))
        elif versionTuple(version) < versionTuple(requirement.minimum):
            problems.append(Problem(requirement, version))
    return problems


def brokenSlicerPackages(findSpec: Callable = importlib.util.find_spec) -> List[str]:
    return [name for name in BUNDLED_WITH_SLICER if findSpec(name) is None]


def hasLightTheTorch(installedVersion: Callable[[str], Optional[str]] = installedVersion,
                     findSpec: Callable = importlib.util.find_spec) -> bool:
    version = installedVersion(LIGHT_THE_TORCH.distribution)
    return (version is not None and findSpec(LIGHT_THE_TORCH.importName) is not None
            and versionTuple(version) >= versionTuple(LIGHT_THE_TORCH.minimum))


@dataclass(frozen=True)
class InstallStep:
    method: str  # PIP_INSTALL or LIGHT_THE_TORCH_INSTALL
    requirements: Tuple[str, ...]


def chooseInstallSteps(problems: Sequence[Problem], hasPyTorchExtension: bool,
                       lightTheTorchInstalled: bool = False) -> List[InstallStep]:
    """What runs, in order, to fix ``problems`` (see the module docstring)."""
    steps = []
    pip = []
    for problem in problems:
        if problem.requirement.importName == TORCH.importName and hasPyTorchExtension:
            if not lightTheTorchInstalled:
                steps.append(InstallStep(PIP_INSTALL, (LIGHT_THE_TORCH.pip,)))
            steps.append(InstallStep(LIGHT_THE_TORCH_INSTALL, (problem.requirement.pip, *TORCH_COMPANIONS)))
        else:
            pip.append(problem.requirement.pip)
    if pip:
        steps.append(InstallStep(PIP_INSTALL, tuple(pip)))
    return steps


# A PEP 440 version (pip refuses a constraints file with anything else in it).
_PEP440 = re.compile(r"\d+(\.\d+)*((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?(\+[a-z0-9]+(\.[a-z0-9]+)*)?", re.I)


def constraintLines(installedVersion: Callable[[str], Optional[str]] = installedVersion) -> List[str]:
    """``name==version`` for each package of SLICER_PACKAGES that is installed (a version that
    is not PEP 440, e.g. of a package built by hand, is left out: pip would reject the file)."""
    lines = []
    for name in SLICER_PACKAGES:
        version = installedVersion(name)
        if version and _PEP440.fullmatch(version):
            lines.append(f"{name}=={version}")
        elif version:
            log.warning("MRISynthesis: %s %s is not a PEP 440 version; not pinned", name, version)
    return lines


def writeConstraints(folder: Optional[str] = None,
                     installedVersion: Callable[[str], Optional[str]] = installedVersion) -> str:
    """A pip constraints file (in ``folder``, default the system's temporary folder) keeping
    the packages Slicer ships at their installed versions; returns its path."""
    descriptor, path = tempfile.mkstemp(prefix="MRISynthesis-constraints-", suffix=".txt", dir=folder)
    with os.fdopen(descriptor, "w", encoding="utf-8") as f:
        f.write("# Packages that come with 3D Slicer: MRISynthesis never lets pip replace them.\n")
        f.write("".join(line + "\n" for line in constraintLines(installedVersion)))
    return path


def installCommand(python: str, step: InstallStep, constraintsFile: Optional[str] = None) -> List[str]:
    """``PythonSlicer -m pip install ...`` (what slicer.util.pip_install runs) or
    ``PythonSlicer -m light_the_torch install ...`` (what PyTorchUtils.installTorch runs), with
    the constraints file."""
    module = {PIP_INSTALL: "pip", LIGHT_THE_TORCH_INSTALL: "light_the_torch"}.get(step.method)
    if module is None:
        raise ValueError(f"unknown install method {step.method!r}")
    constraints = ["-c", constraintsFile] if constraintsFile else []
    return [python, "-m", module, "install", *PIP_OPTIONS, *constraints, *step.requirements]


def pipInstallCommand(python: str, requirements: Sequence[str], constraintsFile: Optional[str] = None) -> List[str]:
    return installCommand(python, InstallStep(PIP_INSTALL, tuple(requirements)), constraintsFile)


def installEnvironment() -> dict:
    """Slicer's environment (as launchConsoleProcess(useStartupEnvironment=False)), with the
    child's output in UTF-8, unbuffered."""
    return dict(os.environ, PYTHONIOENCODING="utf-8", PYTHONUNBUFFERED="1")


def launchInstallProcess(args: Sequence[str]) -> subprocess.Popen:
    """The default launcher: a process tree of its own, output read as bytes, no input."""
    return popen_new_group(args, env=installEnvironment(), stdin=subprocess.DEVNULL)


def confirmationMessage(problems: Sequence[Problem], steps: Sequence[InstallStep]) -> str:
    lines = "\n".join(f"- {p.message}" for p in problems)
    how = []
    for step in steps:
        if step.method == LIGHT_THE_TORCH_INSTALL:
            how.append("PyTorch with light-the-torch, as the PyTorch extension does (it picks the build for your GPU)")
        elif step.requirements != (LIGHT_THE_TORCH.pip,):
            how.append(f"{', '.join(step.requirements)} with pip")
    return (f"MRISynthesis needs these Python packages:\n{lines}\n\nInstall {'; '.join(how)} now? PyTorch is "
            "a download of several hundred MB and can take a few minutes; Cancel stops it. The packages that come "
            "with Slicer (numpy, scipy, SimpleITK...) are kept as they are. Choosing Cancel here leaves Slicer "
            "unchanged.")


# Install process trees started in this Slicer session (every installer shares it): a second
# install is refused while one of them is still alive.
_installProcesses: List[subprocess.Popen] = []


def runningInstallProcesses() -> List[subprocess.Popen]:
    """The install processes whose tree is still alive (ended ones are reaped and forgotten)."""
    _installProcesses[:] = [p for p in _installProcesses if process_tree_alive(p)]
    return list(_installProcesses)


class InstallStillRunning(MRISynthesisError):
    """An earlier install process (or a process it started) is still running."""


class ProcessStep:
    """A running install process tree: a LineReader thread reads its output (undecodable
    bytes replaced), ``poll()`` logs the new lines; the main thread asks ``done`` (never
    waits); ``cancel`` kills the whole tree and returns at once."""

    EOF_GRACE_S = 2.0  # after the launcher exits, wait at most this long for the pipe to close

    def __init__(self, process, log: Callable[[str], None] = log.info, constraintsFile: Optional[str] = None):
        self.process = process
        self.lines: List[str] = []
        self._log = log
        self.constraintsFile = constraintsFile
        self.cancelled = False
        self._exitedAt: Optional[float] = None
        self._reader = LineReader(getattr(process, "stdout", None), name="MRISynthesis install output")

    def poll(self) -> None:
        """Collect (and log) the output read so far."""
        for line in self._reader.drain():
            self.lines.append(line)
            self._log(line)

    @property
    def lastLine(self) -> str:
        return next((line for line in reversed(self.lines) if line.strip()), "")

    @property
    def done(self) -> bool:
        self.poll()
        if self.process.poll() is None:
            return False
        if self._exitedAt is None:
            self._exitedAt = time.monotonic()
        # The pipe closes when every process holding it has ended; do not wait for a stray one.
        return self._reader.finished or time.monotonic() - self._exitedAt > self.EOF_GRACE_S

    def cancel(self) -> None:
        """Kill the process and everything it started; does not wait (the tree stays in
        ``runningInstallProcesses`` until it has gone)."""
        self.cancelled = True
        kill_process_tree(self.process)
        self._removeConstraints()

    def finish(self) -> None:
        """Raise RuntimeError (with the last output lines) if the process failed."""
        self.poll()
        self._removeConstraints()
        if self.process.returncode is None:
            self.process.poll()
        if self.process.returncode != 0:
            tail = "\n".join(self.lines[-15:])
            raise RuntimeError(f"installing Python packages failed (exit status {self.process.returncode}):\n{tail}")

    def _removeConstraints(self) -> None:
        if self.constraintsFile:
            try:
                os.remove(self.constraintsFile)
            except OSError:
                pass  # Windows: still open by a dying pip; it is in the temporary folder
            self.constraintsFile = None


class DependencyInstaller:
    """Checks the packages and, after one confirmation, installs what is missing or too old.

    Injected: ``confirm(message) -> bool`` (Slicer's OK/Cancel dialog); ``python``: the
    interpreter to install with (Slicer: the path of ``PythonSlicer``, or a callable returning
    it, asked when a step starts); ``hasPyTorchExtension`` (PyTorchUtils is installed: PyTorch
    by light-the-torch); ``launch(args) -> Popen`` (default: ``launchInstallProcess``, a
    process tree of its own); ``constraintsFolder`` (where the constraints file is written,
    default the temporary folder); ``installedVersion``, ``findSpec`` and ``isLoaded`` (already
    imported in this session) describe the environment.
    """

    def __init__(self, confirm: Callable[[str], bool], hasPyTorchExtension: bool = False,
                 python: Union[None, str, Callable[[], str]] = None,
                 launch: Callable[[Sequence[str]], subprocess.Popen] = launchInstallProcess,
                 constraintsFolder: Optional[str] = None,
                 installedVersion: Callable[[str], Optional[str]] = installedVersion,
                 findSpec: Callable = importlib.util.find_spec,
                 isLoaded: Callable[[str], bool] = lambda name: name in sys.modules,
                 log: Callable[[str], None] = log.info):
        self.confirm = confirm
        self.hasPyTorchExtension = hasPyTorchExtension
        self.python = python
        self.launch = launch
        self.constraintsFolder = constraintsFolder
        self.installedVersion = installedVersion
        self.findSpec = findSpec
        self.isLoaded = isLoaded
        self.log = log

    def problems(self) -> List[Problem]:
        broken = brokenSlicerPackages(self.findSpec)
        if broken:
            raise RuntimeError(f"{', '.join(broken)} should come with 3D Slicer but cannot be imported; "
                               "this Slicer installation looks broken (reinstall Slicer)")
        return checkRequirements(self.installedVersion, self.findSpec)

    def plan(self) -> Tuple[List[Problem], List[InstallStep]]:
        problems = self.problems()
        oldImported = [p for p in problems if p.installed is not None and self.isLoaded(p.requirement.importName)]
        if oldImported:
            # Imported by another extension (MRISynthesis never imports torch for the panel):
            # replacing it needs a restart in any case.
            names = "; ".join(p.message for p in oldImported)
            raise RuntimeError(f"{names}. It is already loaded in this Slicer session by another module: update it "
                               "(PyTorch: with the 'PyTorch Util' module), restart Slicer and press Apply again.")
        ltt = hasLightTheTorch(self.installedVersion, self.findSpec)
        return problems, chooseInstallSteps(problems, self.hasPyTorchExtension, ltt)

    def refuseWhileInstalling(self) -> None:
        running = runningInstallProcesses()
        if running:
            raise InstallStillRunning(
                "An installation of Python packages started earlier is still running (process "
                f"{', '.join(str(p.pid) for p in running)}); wait until it has ended and press Apply again "
                "(if it does not end, restart Slicer).")

    def askToInstall(self) -> Optional[List[InstallStep]]:
        """[] when nothing is needed; the steps to run when the user agreed; None when
        declined. Raises InstallStillRunning while an earlier install process tree lives."""
        self.refuseWhileInstalling()
        problems, steps = self.plan()
        if not problems:
            return []
        if not self.confirm(confirmationMessage(problems, steps)):
            log.info("MRISynthesis: installing %s declined", ", ".join(p.requirement.pip for p in problems))
            return None
        return steps

    def pythonExecutable(self) -> str:
        python = self.python() if callable(self.python) else self.python
        if not python:
            raise RuntimeError("no Python executable to install packages with (PythonSlicer not found)")
        return python

    def start(self, step: InstallStep) -> ProcessStep:
        """Start a step as a background process tree."""
        self.refuseWhileInstalling()
        constraints = writeConstraints(self.constraintsFolder, self.installedVersion)
        command = installCommand(self.pythonExecutable(), step, constraints)
        log.info("MRISynthesis: installing %s: %s", ", ".join(step.requirements), " ".join(command))
        try:
            process = self.launch(command)
        except BaseException:
            os.remove(constraints)
            raise
        _installProcesses.append(process)
        return ProcessStep(process, self.log, constraints)

    def verify(self) -> None:
        importlib.invalidate_caches()
        still = checkRequirements(self.installedVersion, self.findSpec)
        if still:
            raise RuntimeError("installation finished but: " + "; ".join(p.message for p in still)
                               + ". Restart Slicer and try again.")

    def ensure(self, cancel: Optional[Callable[[], bool]] = None, wait: Callable[[float], None] = None) -> bool:
        """Blocking (Python console, scripts): True when everything is installed, False when
        the user declined. ``cancel()`` is checked between steps and while a process runs
        (then its tree is killed and Cancelled raised)."""
        wait = wait or time.sleep
        steps = self.askToInstall()
        if steps is None:
            return False
        for step in steps:
            if cancel is not None and cancel():
                raise Cancelled("installation cancelled")
            process = self.start(step)
            while not process.done:
                if cancel is not None and cancel():
                    process.cancel()
                    raise Cancelled("installation cancelled")
                wait(0.1)
            process.finish()
        if steps:
            self.verify()
        return True


class InstallJob:
    """The install steps, advanced by ``poll()`` from the panel's timer (main thread; each
    call returns within milliseconds): Cancel kills the running process tree at once and
    skips the remaining steps."""

    def __init__(self, installer: DependencyInstaller, steps: Sequence[InstallStep]):
        self.installer = installer
        self.steps = list(steps)
        self.current: Optional[ProcessStep] = None
        self.cancelled = False
        self.error: Optional[BaseException] = None
        self.finished = not self.steps

    def description(self) -> str:
        return ", ".join(self.steps[0].requirements) if self.steps else ""

    @property
    def lastLine(self) -> str:
        """The last output line of the running step (for a status line), or ""."""
        return self.current.lastLine if self.current is not None else ""

    def poll(self) -> bool:
        """Advance; True while work remains."""
        if self.finished:
            return False
        try:
            if self.current is not None:
                if not self.current.done:
                    return True
                process, self.current = self.current, None
                process.finish()
                self.steps.pop(0)
            if self.steps:
                self.current = self.installer.start(self.steps[0])
                return True
            self.installer.verify()
        except Exception as exc:  # reported by the panel
            self.error = exc
        self.finished = True
        return False

    def cancel(self) -> None:
        """Kill the running step's process tree (without waiting) and skip the rest."""
        self.cancelled = True
        self.steps = []
        if self.current is not None:
            self.current.cancel()
            self.current = None
        self.finished = True


# ----------------------------------------------------------------------------- self-test


def missingPackagesMessage(problems: Sequence[Problem]) -> str:
    return "MRISynthesis needs Python packages that are not installed: " + "; ".join(p.message for p in problems)


class SelfTestGuard:
    """Mixin for the module's self-test (``class MRISynthesisTest(SelfTestGuard,
    ScriptedLoadableModuleTest)``): it never installs, and without the packages it is skipped
    with the list of what is missing, on both paths Slicer runs it:

    - ctest (``slicer_add_python_unittest``: ``unittest.TestLoader().loadTestsFromName``) runs
      each ``test_*`` method through unittest: ``setUp`` raises ``unittest.SkipTest``, so each
      test is reported as skipped, and the run succeeds.
    - Reload and Test / Self Tests call ``runTest()`` directly, outside a runner, where a
      SkipTest would show as "Test failed": ``runTest`` catches it, logs "skipped: ...",
      shows it with ``delayDisplay`` when there is one, and returns normally (``skipped`` holds
      the reason).

    The class sets ``selfTests`` (method names, in order) and may override ``setUpTest``
    (e.g. clear the scene). ``missingPackages()`` can be overridden (tests)."""

    selfTests: Tuple[str, ...] = ()
    skipped: Optional[str] = None

    def missingPackages(self) -> List[Problem]:
        return checkRequirements()

    def skipUnlessInstalled(self) -> None:
        problems = self.missingPackages()
        if problems:
            raise unittest.SkipTest(missingPackagesMessage(problems))

    def setUp(self):
        self.skipUnlessInstalled()
        self.setUpTest()

    def setUpTest(self) -> None:
        pass

    def runTest(self, **kwargs):
        self.skipped = None
        try:
            for name in self.selfTests:
                self.setUp()
                getattr(self, name)()
                self.tearDown()
        except unittest.SkipTest as exc:
            self.skipped = str(exc)
            log.warning("MRISynthesis self-test skipped: %s", exc)
            display = getattr(self, "delayDisplay", None)
            if display is not None:
                display(f"Self-test skipped: {exc}")
