"""Synthesis in a process of its own, driven over pipes: what the Slicer panel runs.

Why a process: Slicer's main thread holds Python's GIL while Qt's event loop runs, so a
Python worker thread there runs only in the few milliseconds of each timer tick that the
main thread spends in Python (10-20x slower than the same synthesis run directly). A
separate interpreter runs at full speed, keeps the network built between requests, and
Cancel kills it, and everything it started, at once.

Protocol: one JSON object per line, UTF-8.
- Requests, on the worker's stdin: ``{"op": "synthesize", "id": N, ...}`` (``request_message``)
  or ``{"op": "exit"}``. End of input also ends the worker, so it never outlives its client.
- Events, on its stdout, each line starting with ``PREFIX`` (anything else there, such as a
  warning or a launcher's message, is only log text):
  ``ready`` (pid, python, torch version, CUDA devices), ``stage`` (id, text), ``progress``
  (id, done, total), ``done`` (id, output and mask files, the brain-mask decision, seconds,
  generator builds so far), ``error`` (id, kind "input" or "internal", one-line message).
Volumes cross as ``.npy`` files in a folder per request (inputs written by the client, the
output and the mask used written by the worker), with their affines in the messages.

This file imports neither torch nor Slicer at import time: the client half runs inside
Slicer's interpreter, the worker half (``main``) in its own process.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np

from .brainmask import BrainMaskDecision
from .errors import MRISynthesisError
from .volumes import Volume

PREFIX = "@mrisynthesis-worker "
PROTOCOL_VERSION = 1
LOG_LINES_KEPT = 200

# Run as: python -c BOOTSTRAP CORE_PARENT_FOLDER. Only the worker's own sys.path gets the
# folder that holds MRISynthesisLib (in a source checkout: the repository root).
BOOTSTRAP = "import sys; sys.path.insert(0, sys.argv[1]); from MRISynthesisLib.worker import main; main()"


def core_parent_folder() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker_command(python: Optional[str] = None) -> List[str]:
    """The command that starts a worker with ``python`` (default: this interpreter)."""
    return [python or sys.executable, "-c", BOOTSTRAP, core_parent_folder()]


class WorkerError(MRISynthesisError):
    """The worker process failed or ended unexpectedly (the message says how)."""


# ----------------------------------------------------------------------------- messages


def encode_event(event: dict) -> str:
    return PREFIX + json.dumps(event) + "\n"


def decode_event(line: str) -> Optional[dict]:
    """The event of a protocol line, or None for any other output line."""
    if not line.startswith(PREFIX):
        return None
    try:
        event = json.loads(line[len(PREFIX):])
    except ValueError:
        return None
    return event if isinstance(event, dict) and "event" in event else None


def _save_array(folder: str, name: str, array: np.ndarray) -> str:
    path = os.path.join(folder, f"{name}.npy")
    np.save(path, np.ascontiguousarray(array))
    return path


def _volume_entry(folder: str, name: str, volume: Volume) -> dict:
    return {"file": _save_array(folder, name, volume.array), "affine": np.asarray(volume.affine).tolist()}


def _volume_from_entry(entry: dict) -> Volume:
    return Volume(np.load(entry["file"]), np.asarray(entry["affine"], dtype=np.float64))


def request_message(request_id: int, folder: str, volumes: Dict[str, Volume], mask, bundle_path: str,
                    device: str = "auto", precision: str = "auto", batch_size: int = 4,
                    reference: str = "t1", uncertainty: bool = False) -> dict:
    """Write the inputs into ``folder`` and return the request for the worker. ``mask``:
    "auto", "none" or a Volume (used as given); ``uncertainty``: also the test-time
    augmentation spread (MRISynthesisLib.uncertainty)."""
    message = {"op": "synthesize", "id": request_id, "folder": folder, "bundle": str(bundle_path),
               "device": device, "precision": precision, "batch_size": int(batch_size), "reference": reference,
               "uncertainty": bool(uncertainty),
               "inputs": {name: _volume_entry(folder, f"input_{name}", vol) for name, vol in volumes.items()}}
    if isinstance(mask, Volume):
        message["mask"] = _volume_entry(folder, "input_mask", mask)
    else:
        message["mask"] = str(mask)
    return message


@dataclass
class WorkerResult:
    """What a finished request returns to the client (the fields of
    MRISynthesisLib.inference.SynthesisResult, without importing torch)."""

    volume: Volume
    brain_mask: Volume
    mask_decision: BrainMaskDecision
    provenance: Optional[dict] = None  # how it was made (MRISynthesisLib.provenance)
    uncertainty: Optional[Volume] = None  # the test-time-augmentation spread, when asked for
    seconds: float = 0.0
    generator_builds: int = 0


def result_from_event(event: dict) -> WorkerResult:
    decision = event["mask_decision"]
    spread = event.get("uncertainty")
    return WorkerResult(_volume_from_entry(event["output"]), _volume_from_entry(event["brain_mask"]),
                        BrainMaskDecision(None, decision["source"], decision["description"],
                                          decision.get("seconds", 0.0)),
                        event.get("provenance"), None if spread is None else _volume_from_entry(spread),
                        event.get("seconds", 0.0), event.get("generator_builds", 0))


# ----------------------------------------------------------------------------- worker side


class _Worker:
    """Serves requests in this process; bundles are loaded once (the network is kept by
    MRISynthesisLib.inference.cached_generator)."""

    def __init__(self, emit: Callable[[dict], None]):
        self.emit = emit
        self.bundles: Dict[tuple, object] = {}

    def hello(self) -> dict:
        import platform

        import torch

        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
            if torch.cuda.is_available() else []
        return {"event": "ready", "protocol": PROTOCOL_VERSION, "pid": os.getpid(),
                "python": platform.python_version(), "torch": torch.__version__, "cuda_devices": gpus,
                "cuda_build": torch.version.cuda}

    def bundle(self, path: str):
        from .bundle import load_bundle

        stat = os.stat(path)
        key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
        if key not in self.bundles:
            self.bundles.clear()
            self.bundles[key] = load_bundle(path)
        return self.bundles[key]

    def synthesize(self, message: dict) -> dict:
        from .inference import device_choice, generator_builds, synthesize_with_details

        start = time.perf_counter()
        request_id, folder = message["id"], message["folder"]
        volumes = {name: _volume_from_entry(entry) for name, entry in message["inputs"].items()}
        mask = message["mask"]
        if isinstance(mask, dict):
            mask = _volume_from_entry(mask)
        _, device, context = device_choice(message["device"])
        self.emit({"event": "stage", "id": request_id, "text": "loading the model"})
        bundle = self.bundle(message["bundle"])
        self.emit({"event": "stage", "id": request_id, "text": "finding the brain"})

        def progress(done: int, total: int) -> None:
            self.emit({"event": "progress", "id": request_id, "done": int(done), "total": int(total)})

        with context:
            result = synthesize_with_details(volumes, bundle, mask=mask, reference=message.get("reference", "t1"),
                                             device=device, precision=message["precision"],
                                             batch_size=message["batch_size"], progress=progress,
                                             uncertainty=bool(message.get("uncertainty")))
        del volumes
        decision = result.mask_decision
        extra = {}
        if result.uncertainty is not None:
            extra["uncertainty"] = _volume_entry(folder, "uncertainty", result.uncertainty)
        return {"event": "done", "id": request_id, "provenance": result.provenance, **extra,
                "output": _volume_entry(folder, "output", result.volume),
                "brain_mask": _volume_entry(folder, "brain_mask", Volume(result.brain_mask.array > 0,
                                                                         result.brain_mask.affine)),
                "mask_decision": {"source": decision.source, "description": decision.description,
                                  "seconds": decision.seconds},
                "seconds": time.perf_counter() - start, "generator_builds": generator_builds()}

    def handle(self, message: dict) -> bool:
        """Serve one request; False when the worker should end."""
        op = message.get("op")
        if op == "exit":
            return False
        if op != "synthesize":
            self.emit({"event": "error", "id": message.get("id"), "kind": "internal",
                       "message": f"unknown request {op!r}"})
            return True
        try:
            self.emit(self.synthesize(message))
        except MRISynthesisError as exc:  # bad input: the user's one-line message
            self.emit({"event": "error", "id": message.get("id"), "kind": "input", "message": str(exc)})
        except Exception as exc:  # a bug or the environment: say what and where
            import traceback

            traceback.print_exc()
            self.emit({"event": "error", "id": message.get("id"), "kind": "internal",
                       "message": f"{type(exc).__name__}: {exc}"})
        return True


def serve(lines, emit: Callable[[dict], None]) -> None:
    """Announce readiness, then serve each request line until "exit" or end of input."""
    worker = _Worker(emit)
    emit(worker.hello())
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            message = json.loads(line)
        except ValueError:
            emit({"event": "error", "id": None, "kind": "internal", "message": f"not a request: {line[:80]!r}"})
            continue
        if not worker.handle(message):
            break


def main() -> None:
    """The worker process: events on the original stdout, everything else printed (by this
    process or a library, Python or C) goes to stderr, so it cannot break a protocol line."""
    protocol = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def emit(event: dict) -> None:
        protocol.write(encode_event(event))
        protocol.flush()

    serve(sys.stdin, emit)


# ----------------------------------------------------------------------------- client side


class WorkerClient:
    """One worker process, seen from its client (e.g. the Slicer panel, main thread only).

    ``launch()`` starts the process (injected: Slicer passes one that runs PythonSlicer);
    default: ``processes.popen_new_group(worker_command())``. It must return a Popen-like
    object with binary ``stdin`` and ``stdout`` pipes, in a process group of its own so that
    ``kill()`` can end the whole tree. A thread only reads the output; ``events()`` drains it
    without blocking. Nothing here waits on the worker.
    """

    def __init__(self, launch: Optional[Callable[[], object]] = None):
        self._launch = launch or (lambda: _default_launch())
        self.process = None
        self._reader = None
        self.info: Optional[dict] = None  # the "ready" event: torch version, CUDA devices
        self.log: deque = deque(maxlen=LOG_LINES_KEPT)
        self._next_id = 0
        self._pending: List[dict] = []

    @property
    def pid(self) -> Optional[int]:
        return None if self.process is None else self.process.pid

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start the process unless one is running."""
        if self.alive:
            return
        from .processes import LineReader

        self.info = None
        self._pending = []
        self.process = self._launch()
        self._reader = LineReader(self.process.stdout)

    def new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def send(self, message: dict) -> None:
        if not self.alive:
            raise WorkerError(self.ended_message())
        try:
            self.process.stdin.write((json.dumps(message) + "\n").encode("utf-8"))
            self.process.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            raise WorkerError(self.ended_message()) from None

    def events(self) -> List[dict]:
        """The events received since the last call (non-blocking); other lines go to ``log``."""
        out, self._pending = self._pending, []
        if self._reader is None:
            return out
        for line in self._reader.drain():
            event = decode_event(line)
            if event is None:
                self.log.append(line)
            elif event["event"] == "ready":
                self.info = event
            else:
                out.append(event)
        return out

    def wait_ready(self, timeout: float = 60.0, sleep: Callable[[float], None] = time.sleep) -> dict:
        """Block until the worker said it is ready (scripts and tests; the panel polls)."""
        deadline = time.monotonic() + timeout
        while self.info is None:
            self._pending.extend(self.events())
            if self.info is not None:
                break
            if not self.alive:
                self._pending.extend(self.events())
                if self.info is None:
                    raise WorkerError(self.ended_message())
            if time.monotonic() > deadline:
                raise WorkerError(f"the synthesis process did not start within {timeout:.0f} s")
            sleep(0.02)
        return self.info

    def ended_message(self) -> str:
        status = None if self.process is None else self.process.poll()
        tail = " | ".join(list(self.log)[-5:])
        how = "was not started" if self.process is None else \
            ("is still running" if status is None else f"ended (exit status {status})")
        return f"the synthesis process {how}" + (f"; its last output: {tail}" if tail else "")

    def kill(self) -> None:
        """End the worker and every process it started, now (does not wait)."""
        if self.process is not None:
            from .processes import kill_process_tree

            kill_process_tree(self.process)

    def stop(self) -> None:
        """Ask an idle worker to exit (closes its input; it ends by itself)."""
        if self.process is None:
            return
        try:
            self.process.stdin.close()
        except OSError:
            pass


def _default_launch():
    from .processes import popen_new_group

    return popen_new_group(worker_command(), stdin=True)
