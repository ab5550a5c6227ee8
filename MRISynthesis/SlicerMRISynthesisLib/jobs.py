"""Synthesis off the GUI, in a worker process: the panel polls it from a timer, and the
result reaches the scene only on the main thread.

Why a process, not a thread: Slicer's main thread holds Python's GIL while it runs Qt's
event loop, so a worker thread in Slicer's interpreter runs only in the few milliseconds of
each timer tick that the main thread spends in Python (measured 10-20x slower than the same
synthesis run directly). The worker (MRISynthesisLib.worker) is a separate interpreter: it
runs at full speed, keeps the network built between Applies, and Cancel kills its whole
process tree at once, so the GUI never waits for it.

Qt-free, so tested on real MRML with slicer-core. MRML is touched only by ``prepare`` (before
the job starts: the voxels are copied into files for the worker) and ``finish`` (after it
ended), both on the main thread.

    worker = WorkerClient(launch)             # one per module; started once, reused
    job = SynthesisJob(sceneLogic, request, worker)
    watcher = SceneWatcher(scene, job)        # closing the scene / removing an input cancels
    job.start()
    ...  # from a QTimer: job.poll() -> True while running, progress in job.progress
    node = job.finish()                       # the output node, or None if cancelled
    job.result                                # SceneResult: + mask label map, mask decision
    watcher.stop()

``ApplyRun`` is what the panel's Apply starts: the dependency installation (an
``dependencies.InstallJob``) and then the synthesis job, as one thing to poll and cancel.
"""

import shutil
import tempfile
from typing import Optional, Tuple

import vtk

from MRISynthesisLib.errors import InputError, MRISynthesisError
from MRISynthesisLib.worker import WorkerClient, WorkerError, request_message, result_from_event

PENDING, RUNNING, DONE, FAILED, CANCELLED = "pending", "running", "done", "failed", "cancelled"


class SynthesisJob:
    """One synthesis in the worker process. ``start``, ``poll``, ``cancel`` and ``finish``
    return at once (no wait on the worker); ``cancel`` kills the worker's process tree, and
    the next job starts a new worker."""

    def __init__(self, sceneLogic, request, worker: WorkerClient):
        self.sceneLogic = sceneLogic
        self.request = request
        self.worker = worker
        self.state = PENDING
        self.progress: Tuple[int, int] = (0, 0)
        self.stage = ""
        self.error: Optional[BaseException] = None
        self.cancelReason: Optional[str] = None
        self.result = None  # the SceneResult once applied
        self._event = None  # the worker's "done" event
        self._folder: Optional[str] = None
        self._id: Optional[int] = None

    def start(self) -> None:
        """Start the worker if needed and hand it the request (inputs as files)."""
        if self.cancelReason is not None:
            self.state = CANCELLED
            return
        self.state = RUNNING
        try:
            self.worker.start()
            self._folder = tempfile.mkdtemp(prefix="MRISynthesis-")
            self._id = self.worker.new_id()
            r = self.request
            self.worker.send(request_message(self._id, self._folder, r.volumes, r.mask, r.bundlePath,
                                             device=r.device, precision=r.precision, batch_size=r.batchSize,
                                             uncertainty=r.uncertainty))
        except Exception as exc:
            self.error = exc
            self.state = FAILED
            self._cleanup()

    def poll(self) -> bool:
        """Read the worker's news; True while the job runs."""
        if self.state != RUNNING:
            return False
        alive = self.worker.alive  # before reading: a worker that ended has written all it will
        self._handle(self.worker.events())
        if self.state == RUNNING and not alive:
            # The worker died (killed from outside, out of memory...): say so, with its last words.
            self._handle(self.worker.events())
            if self.state == RUNNING:
                self.error = WorkerError(self.worker.ended_message())
                self.state = FAILED
        return self.state == RUNNING

    def _handle(self, events) -> None:
        for event in events:
            if event.get("id") != self._id or self.state != RUNNING:
                continue
            kind = event["event"]
            if kind == "progress":
                self.progress = (event["done"], event["total"])
            elif kind == "stage":
                self.stage = event["text"]
            elif kind == "done":
                self._event = event
                self.state = DONE
            elif kind == "error":
                message = event["message"]
                self.error = InputError(message) if event.get("kind") == "input" else \
                    WorkerError(f"synthesis failed: {message}")
                self.state = FAILED

    def cancel(self, reason: str = "cancelled") -> None:
        """Stop now: the worker and everything it started are killed (no wait); the result
        will not be applied."""
        if self.cancelReason is None:
            self.cancelReason = reason
        if self.state in (PENDING, RUNNING):
            if self.state == RUNNING:
                self.worker.kill()
            self.state = CANCELLED

    @property
    def cancelled(self) -> bool:
        return self.state == CANCELLED

    @property
    def running(self) -> bool:
        return self.state == RUNNING

    def finish(self):
        """Apply the worker's result (main thread). Returns the output node, or None when
        cancelled (the scene is then unchanged); raises the worker's error."""
        try:
            if self.state == RUNNING:
                raise RuntimeError("finish() called while the synthesis is still running")
            if self.cancelled or (self.state == DONE and self._inputsGone()):
                self.cancel(self.cancelReason or "an input was removed")
                self.state = CANCELLED
                return None
            if self.state == FAILED:
                raise self.error
            result = result_from_event(self._event)
            self.result = self.sceneLogic.store(self.request, result)
            self.sceneLogic.log.info("%s", result.mask_decision.description)
            return self.result.output
        finally:
            self._cleanup()

    def _cleanup(self) -> None:
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

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
    synthesise in the ``worker`` process; advanced by ``poll()`` from the panel's timer, stopped by
    ``cancel(reason)``. Qt-free. When finished: ``output`` (the new or chosen node, or None),
    ``message`` for the status line (with the brain-mask decision), ``failed`` and ``result``
(the SceneResult: FLAIR node, brain-mask label map or None, mask decision).
    """

    def __init__(self, sceneLogic, request, scene, worker: WorkerClient, installJob=None, onInstalled=None):
        self.sceneLogic = sceneLogic
        self.request = request
        self.scene = scene
        self.worker = worker
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
            if total:
                return f"Synthesising slice {done} of {total}..."
            if self.worker.info is None:
                return "Starting the synthesis process (PyTorch)..."
            # Before the first slice: the model loads and the brain mask is decided (extraction: seconds).
            return f"{(self.job.stage or 'loading the model').capitalize()}..."
        return self.message

    def _startSynthesis(self) -> None:
        self.phase = SYNTHESIZING
        self.job = SynthesisJob(self.sceneLogic, self.request, self.worker)
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
        if self.result.uncertaintyOutput is not None:
            saved += (f" Test-time-augmentation spread saved as '{self.result.uncertaintyOutput.GetName()}' "
                      "(where the output changes under small input changes; not a confidence map).")
        return self._finish(output, f"Done: {output.GetName()}. {_sentence(self.result.maskDecision.description)}"
                                    f"{saved}")

    def cancel(self, reason: str) -> None:
        """Stop now, without waiting: an install process or the synthesis worker is killed
        with every process it started; nothing is added to or changed in the scene."""
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
