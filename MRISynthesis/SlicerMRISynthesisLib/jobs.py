"""Synthesis off the GUI thread: a worker thread runs the network on copies of the voxels,
the panel polls it from a timer, and the result reaches the scene only on the main thread.

Qt-free, so tested on real MRML with slicer-core. MRML is touched only by ``prepare``
(before the thread starts) and ``finish`` (after it ended), both called on the main thread.

    job = SynthesisJob(sceneLogic, request)
    watcher = SceneWatcher(scene, job)        # closing the scene / removing an input cancels
    job.start()
    ...  # from a QTimer: job.poll() -> True while running, progress in job.progress
    node = job.finish()                       # joins; the output node, or None if cancelled
    job.result                                # SceneResult: + mask label map, mask decision
    watcher.stop()

``ApplyRun`` is what the panel's Apply starts: the dependency installation (an
``dependencies.InstallJob``) and then the synthesis job, as one thing to poll and cancel.
"""

import threading
from typing import Optional, Tuple

import vtk

from MRISynthesisLib.errors import Cancelled, MRISynthesisError

PENDING, RUNNING, DONE, FAILED, CANCELLED = "pending", "running", "done", "failed", "cancelled"


class SynthesisJob:
    def __init__(self, sceneLogic, request):
        self.sceneLogic = sceneLogic
        self.request = request
        self.state = PENDING
        self.progress: Tuple[int, int] = (0, 0)
        self.error: Optional[BaseException] = None
        self.cancelReason: Optional[str] = None
        self._cancel = threading.Event()
        self._result = None
        self.result = None  # the SceneResult once applied
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        self.state = RUNNING
        self._thread = threading.Thread(target=self._run, name="MRISynthesis synthesis", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._result = self.sceneLogic.compute(self.request, self._onProgress, self._cancel.is_set)
        except Cancelled:
            pass
        except BaseException as exc:  # handed to the main thread by finish()
            self.error = exc

    def _onProgress(self, done: int, total: int) -> None:
        self.progress = (done, total)

    def cancel(self, reason: str = "cancelled") -> None:
        """Ask the worker to stop at the next batch; the result will not be applied."""
        if self.cancelReason is None:
            self.cancelReason = reason
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def poll(self) -> bool:
        """True while the worker runs (progress in ``self.progress``)."""
        return self.running

    def finish(self, timeout: Optional[float] = None):
        """Join the worker and apply its result (main thread). Returns the output node, or
        None when cancelled (the scene is then unchanged); re-raises the worker's error."""
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError("the synthesis thread did not stop")
        if self.cancelled or self._inputsGone():
            self.cancel(self.cancelReason or "an input was removed")
            self.state = CANCELLED
            return None
        if self.error is not None:
            self.state = FAILED
            raise self.error
        if self._result is None:
            self.state = CANCELLED
            return None
        self.result = self.sceneLogic.store(self.request, self._result)
        self._result = None
        self.state = DONE
        return self.result.output

    def _inputsGone(self) -> bool:
        scene = self.sceneLogic.scene or self.request.referenceNode.GetScene()
        return any(node.GetScene() is None or not scene.IsNodePresent(node) for node in self.request.sceneNodes)


class SceneWatcher:
    """Cancels a job when its scene is closed or one of the nodes it depends on is removed."""

    def __init__(self, scene, job):
        self.scene = scene
        self.job = job
        self._watched = job.request.sceneNodes
        self._tags = [
            scene.AddObserver(scene.StartCloseEvent, self._onClose),
            scene.AddObserver(scene.NodeAboutToBeRemovedEvent, self._onNodeRemoved),
        ]

    def _onClose(self, caller, event) -> None:
        self.job.cancel("the scene was closed")

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def _onNodeRemoved(self, caller, event, node) -> None:
        if node is not None and any(node is n for n in self._watched):
            self.job.cancel(f"'{node.GetName()}' was removed from the scene")

    def stop(self) -> None:
        for tag in self._tags:
            self.scene.RemoveObserver(tag)
        self._tags = []


INSTALLING, SYNTHESIZING, FINISHED = "installing", "synthesizing", "finished"


class ApplyRun:
    """One Apply: install the missing Python packages (``installJob``, may be None), then
    synthesise in the background; advanced by ``poll()`` from the panel's timer, stopped by
    ``cancel(reason)``. Qt-free. When finished: ``output`` (the new or chosen node, or None),
    ``message`` for the status line (with the brain-mask decision), ``failed`` and ``result``
(the SceneResult: FLAIR node, brain-mask label map or None, mask decision).
    """

    def __init__(self, sceneLogic, request, scene, installJob=None, onInstalled=None):
        self.sceneLogic = sceneLogic
        self.request = request
        self.scene = scene
        self.installJob = installJob
        self.onInstalled = onInstalled  # e.g. refresh the PyTorch line of the panel
        self.job: Optional[SynthesisJob] = None
        self.watcher: Optional[SceneWatcher] = None
        self.output = None
        self.result = None
        self.message = ""
        self.failed = False
        self.phase = INSTALLING
        if installJob is None or installJob.finished:
            self._startSynthesis()

    @property
    def progress(self) -> Optional[Tuple[int, int]]:
        """(done, total) slices while synthesising; None while busy otherwise."""
        return self.job.progress if self.job is not None and self.job.progress[1] else None

    @property
    def status(self) -> str:
        if self.phase == INSTALLING:
            return f"Installing {self.installJob.description()}..."
        if self.phase == SYNTHESIZING:
            done, total = self.job.progress
            # Before the first slice: the model loads and the brain mask is decided (extraction: seconds).
            return f"Synthesising slice {done} of {total}..." if total else "Loading the model, finding the brain..."
        return self.message

    def _startSynthesis(self) -> None:
        self.phase = SYNTHESIZING
        self.job = SynthesisJob(self.sceneLogic, self.request)
        self.watcher = SceneWatcher(self.scene, self.job)
        self.job.start()

    def poll(self) -> bool:
        """Advance; True while running. Safe to call re-entrantly (see InstallJob.poll)."""
        if self.phase == INSTALLING:
            job = self.installJob
            if job.poll():
                return True
            if self.phase != INSTALLING:  # finished by cancel() inside a blocking install step
                return False
            if job.error is not None:
                return self._finish(None, f"Installing the Python packages failed: {job.error}", failed=True)
            if job.cancelled:
                return self._finish(None, "Installation cancelled; nothing was synthesised.")
            if self.onInstalled is not None:
                self.onInstalled()
            self._startSynthesis()
            return True
        if self.phase == SYNTHESIZING:
            if self.job.poll():
                return True
            return self._finishSynthesis()
        return False

    def _finishSynthesis(self) -> bool:
        self.watcher.stop()
        try:
            output = self.job.finish()
        except Exception as exc:
            return self._finish(None, str(exc) if isinstance(exc, MRISynthesisError)
                                else f"Synthesis failed: {type(exc).__name__}: {exc}", failed=True)
        if output is None:
            return self._finish(None, f"Cancelled ({self.job.cancelReason}); the scene is unchanged.")
        self.result = self.job.result
        saved = f" Brain mask saved as '{self.result.maskOutput.GetName()}'." if self.result.maskOutput else ""
        return self._finish(output, f"Done: {output.GetName()}. {_sentence(self.result.maskDecision.description)}"
                                    f"{saved}")

    def cancel(self, reason: str) -> None:
        """Stop now: a pip process is terminated, the worker stops at the next batch of
        slices and is joined; nothing is added to or changed in the scene."""
        if self.phase == INSTALLING:
            self.installJob.cancel()
            self._finish(None, f"Installation cancelled ({reason}); nothing was synthesised.")
        elif self.phase == SYNTHESIZING:
            self.job.cancel(reason)
            self._finishSynthesis()

    def _finish(self, output, message: str, failed: bool = False) -> bool:
        self.phase = FINISHED
        self.output, self.message, self.failed = output, message, failed
        return False


def _sentence(text: str) -> str:
    """'brain mask: given, 1200 ml' -> 'Brain mask: given, 1200 ml.' (for the status line)."""
    text = text.strip()
    return (text[:1].upper() + text[1:]).rstrip(".") + "."
