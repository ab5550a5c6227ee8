"""The Python packages MRISynthesis imports inside 3D Slicer, and installing them on first use.

Qt-free: asking the user, Slicer's installers and the process launcher are injected (the
module passes Slicer's dialog and functions), so every decision is tested under plain Python.
Nothing here imports torch.

Which installer runs (Slicer's own functions, read from Slicer 5.8, 5.10 and 5.12):
- PyTorch: the PyTorch extension (``PyTorchUtils``) when it is installed: it picks the build
  matching the GPU's CUDA driver. Otherwise with the other packages, below.
- Slicer 5.12+ (``slicer.packaging.pip_ensure`` exists): ``pip_ensure(..., prompt_install=False)``
  (MRISynthesis has already asked; without ``prompt_install=False`` it asks again and a "no"
  raises). It is a blocking call with Slicer's own progress dialog.
- Slicer 5.8-5.10: the command ``slicer.util.pip_install`` runs (``PythonSlicer -m pip install``
  through ``slicer.util.launchConsoleProcess``), started as a background process that the
  panel polls, so Cancel stops it.
"""

import importlib
import importlib.metadata
import importlib.util
import logging
import re
import sys
import threading
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

from MRISynthesisLib.errors import Cancelled

log = logging.getLogger("MRISynthesis")


@dataclass(frozen=True)
class Requirement:
    importName: str
    distribution: str  # the pip name
    minimum: str  # lowest version that works

    @property
    def pip(self) -> str:
        return f"{self.distribution}>={self.minimum}"


# Exactly what MRISynthesisLib imports for synthesis (inference, preprocessing, bundle, volumes)
# and for the default brain mask "auto" (brainmask: deepbet; its customtkinter GUI requirement
# is installed by pip but never imported, so no display is needed). deepbet needs
# torch>=1.11, so pip keeps the torch installed first (by PyTorchUtils when present).
REQUIREMENTS = (
    Requirement("torch", "torch", "2.1"),
    Requirement("nibabel", "nibabel", "5.0"),
    Requirement("safetensors", "safetensors", "0.4"),
    Requirement("deepbet", "deepbet", "1.0.2"),
)
# Ship with Slicer and must not be replaced by pip (Slicer's SimpleITK has Slicer-specific IO;
# scipy is used by brainmask.grow_mask and the resampling).
BUNDLED_WITH_SLICER = ("numpy", "SimpleITK", "scipy")

PYTORCHUTILS = "pytorchutils"
PIP_ENSURE = "pip_ensure"
PIP_INSTALL = "pip_install"


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


def _installedVersion(distribution: str) -> Optional[str]:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


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


def checkRequirements(installedVersion: Callable[[str], Optional[str]] = _installedVersion,
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


@dataclass(frozen=True)
class InstallStep:
    method: str  # PYTORCHUTILS, PIP_ENSURE or PIP_INSTALL
    requirements: Tuple[str, ...]


def chooseInstallSteps(problems: Sequence[Problem], hasPyTorchUtils: bool, hasPipEnsure: bool) -> List[InstallStep]:
    """What runs, in order, to fix ``problems`` on this Slicer (see the module docstring)."""
    steps = []
    pip = []
    for problem in problems:
        if problem.requirement.importName == "torch" and hasPyTorchUtils:
            steps.append(InstallStep(PYTORCHUTILS, (problem.requirement.pip,)))
        else:
            pip.append(problem.requirement.pip)
    if pip:
        steps.append(InstallStep(PIP_ENSURE if hasPipEnsure else PIP_INSTALL, tuple(pip)))
    return steps


def pipInstallCommand(python: str, requirements: Sequence[str]) -> List[str]:
    """The command slicer.util.pip_install runs (5.8-5.10: PythonSlicer -m pip install ...)."""
    return [python, "-m", "pip", "install", *requirements]


def confirmationMessage(problems: Sequence[Problem], steps: Sequence[InstallStep]) -> str:
    lines = "\n".join(f"- {p.message}" for p in problems)
    how = []
    for step in steps:
        if step.method == PYTORCHUTILS:
            how.append("PyTorch with the PyTorch extension (it picks the CUDA build for your GPU)")
        else:
            how.append(f"{', '.join(step.requirements)} with pip")
    return (f"MRISynthesis needs these Python packages:\n{lines}\n\nInstall {'; '.join(how)} now? PyTorch is "
            "a download of several hundred MB and can take a few minutes. Cancel leaves Slicer unchanged.")


class ProcessStep:
    """A running install process (Popen-like): its output is read by a thread, the main
    thread polls ``done``; ``cancel`` terminates it."""

    def __init__(self, process, log: Callable[[str], None] = log.info):
        self.process = process
        self.lines: List[str] = []
        self._log = log
        self._reader = threading.Thread(target=self._read, name="MRISynthesis pip output", daemon=True)
        self._reader.start()

    def _read(self):
        stream = getattr(self.process, "stdout", None)
        if stream is None:
            return
        for line in iter(stream.readline, ""):
            if not line:
                break
            self.lines.append(line.rstrip())
        stream.close()

    @property
    def done(self) -> bool:
        return self.process.poll() is not None

    def cancel(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except Exception:
                self.process.kill()
                self.process.wait()
        self._reader.join(timeout=10)

    def finish(self) -> None:
        """Raise RuntimeError (with the last output lines) if the process failed."""
        self.process.wait()
        self._reader.join(timeout=10)
        for line in self.lines:
            self._log(line)
        if self.process.returncode != 0:
            tail = "\n".join(self.lines[-15:])
            raise RuntimeError(f"installing Python packages failed (exit status {self.process.returncode}):\n{tail}")


class DependencyInstaller:
    """Checks the packages and, after one confirmation, installs what is missing or too old.

    Injected: ``confirm(message) -> bool`` (Slicer's OK/Cancel dialog),
    ``installTorchWithPyTorchUtils(requirement)``, ``pipEnsure([requirements])`` (5.12+),
    ``launchPip([requirements]) -> Popen-like`` (5.8-5.10), and whether the PyTorch
    extension and pip_ensure exist; ``installedVersion``, ``findSpec`` and ``isLoaded``
    (already imported in this session) describe the environment. Blocking installers raise
    on failure.
    """

    def __init__(self, confirm: Callable[[str], bool], hasPyTorchUtils: bool = False, hasPipEnsure: bool = False,
                 installTorchWithPyTorchUtils: Optional[Callable[[str], None]] = None,
                 pipEnsure: Optional[Callable[[Sequence[str]], None]] = None,
                 launchPip: Optional[Callable[[Sequence[str]], object]] = None,
                 installedVersion: Callable[[str], Optional[str]] = _installedVersion,
                 findSpec: Callable = importlib.util.find_spec,
                 isLoaded: Callable[[str], bool] = lambda name: name in sys.modules):
        self.confirm = confirm
        self.isLoaded = isLoaded
        self.hasPyTorchUtils = hasPyTorchUtils
        self.hasPipEnsure = hasPipEnsure
        self.installTorchWithPyTorchUtils = installTorchWithPyTorchUtils
        self.pipEnsure = pipEnsure
        self.launchPip = launchPip
        self.installedVersion = installedVersion
        self.findSpec = findSpec

    def problems(self) -> List[Problem]:
        broken = brokenSlicerPackages(self.findSpec)
        if broken:
            raise RuntimeError(f"{', '.join(broken)} should come with 3D Slicer but cannot be imported; "
                               "this Slicer installation looks broken (reinstall Slicer)")
        return checkRequirements(self.installedVersion, self.findSpec)

    def plan(self) -> Tuple[List[Problem], List[InstallStep]]:
        problems = self.problems()
        oldImportedTorch = [p for p in problems if p.installed is not None and self.isLoaded(p.requirement.importName)]
        if oldImportedTorch:
            # Already imported (by another extension): replacing it needs a restart in any case.
            names = "; ".join(p.message for p in oldImportedTorch)
            raise RuntimeError(f"{names}. It is already loaded in this Slicer session: update it (PyTorch: with "
                               "the 'PyTorch Util' module), restart Slicer and press Apply again.")
        return problems, chooseInstallSteps(problems, self.hasPyTorchUtils, self.hasPipEnsure)

    def askToInstall(self) -> Optional[List[InstallStep]]:
        """[] when nothing is needed; the steps to run when the user agreed; None when declined."""
        problems, steps = self.plan()
        if not problems:
            return []
        if not self.confirm(confirmationMessage(problems, steps)):
            log.info("MRISynthesis: installing %s declined", ", ".join(p.requirement.pip for p in problems))
            return None
        return steps

    def start(self, step: InstallStep) -> Optional[ProcessStep]:
        """Run a blocking step now (returns None) or start a process step (returns it)."""
        log.info("MRISynthesis: installing %s (%s)", ", ".join(step.requirements), step.method)
        if step.method == PYTORCHUTILS:
            self.installTorchWithPyTorchUtils(step.requirements[0])
        elif step.method == PIP_ENSURE:
            self.pipEnsure(list(step.requirements))
        elif step.method == PIP_INSTALL:
            return ProcessStep(self.launchPip(list(step.requirements)))
        else:
            raise ValueError(f"unknown install method {step.method!r}")
        return None

    def verify(self) -> None:
        importlib.invalidate_caches()
        still = checkRequirements(self.installedVersion, self.findSpec)
        if still:
            raise RuntimeError("installation finished but: " + "; ".join(p.message for p in still)
                               + ". Restart Slicer and try again.")

    def ensure(self, cancel: Optional[Callable[[], bool]] = None, wait: Callable[[float], None] = None) -> bool:
        """Blocking (Python console, scripts): True when everything is installed, False when
        the user declined. ``cancel()`` is checked between steps and while a process runs
        (then it is terminated and Cancelled raised)."""
        import time

        wait = wait or time.sleep
        steps = self.askToInstall()
        if steps is None:
            return False
        for step in steps:
            if cancel is not None and cancel():
                raise Cancelled("installation cancelled")
            process = self.start(step)
            if process is not None:
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
    """The install steps, advanced by ``poll()`` from the panel's timer (main thread):
    Cancel terminates a running pip process and skips the remaining steps."""

    def __init__(self, installer: DependencyInstaller, steps: Sequence[InstallStep]):
        self.installer = installer
        self.steps = list(steps)
        self.current: Optional[ProcessStep] = None
        self.cancelled = False
        self.error: Optional[BaseException] = None
        self.finished = not self.steps
        self._inStep = False

    def description(self) -> str:
        return ", ".join(self.steps[0].requirements) if self.steps else ""

    def poll(self) -> bool:
        """Advance; True while work remains. Re-entrant calls (a blocking Slicer installer
        runs an event loop, so the panel's timer fires inside it) return at once."""
        if self.finished:
            return False
        if self._inStep:
            return True
        try:
            if self.current is not None:
                if not self.current.done:
                    return True
                process, self.current = self.current, None
                process.finish()
                self.steps.pop(0)
            if self.steps:
                self._inStep = True
                try:
                    started = self.installer.start(self.steps[0])
                finally:
                    self._inStep = False
                if self.cancelled:  # Cancel was pressed while a blocking step ran
                    if started is not None:
                        started.cancel()
                    return False
                if started is None:  # blocking step: already done
                    self.steps.pop(0)
                self.current = started
                return True
            self.installer.verify()
        except BaseException as exc:  # reported by the panel
            self.error = exc
        self.finished = True
        return False

    def cancel(self) -> None:
        self.cancelled = True
        self.steps = []
        if self.current is not None:
            self.current.cancel()
            self.current = None
        self.finished = True
