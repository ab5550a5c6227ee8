"""Child processes that a GUI can start, read, poll and stop as a whole tree without blocking.

Stdlib only, Python 3.9 compatible, no Slicer: used by the Slicer module's package installer
(pip, light-the-torch) and usable for any worker process.

Why a process *tree*: Slicer's ``PythonSlicer`` (and ``Slicer`` itself) is a CTK launcher that
sets up the environment and starts the real interpreter as a CHILD process. Terminating the
``Popen`` of the launcher kills only the launcher; the interpreter (pip, a worker) keeps
running. So every process is started as the leader of a new process group / session and is
stopped together with everything it started:

- POSIX: ``start_new_session=True`` (the child is the leader of a new session and process
  group, ``pgid == sid == pid``); ``kill_process_tree`` sends SIGKILL to the group and, on
  Linux, to every process of the session (a descendant that made its own process group).
- Windows: ``CREATE_NEW_PROCESS_GROUP`` and a hidden window (as ``slicer.util.launchConsoleProcess``);
  ``kill_process_tree`` starts ``taskkill /F /T /PID <pid>`` (the whole tree) and does not
  wait for it.

Nothing here blocks the caller for more than a few milliseconds: killing sends signals (or
starts taskkill) and returns; the caller polls ``process_tree_alive`` later, which also reaps
the leader. Output is read by a ``LineReader`` thread that does nothing but read the pipe
(so it needs the GIL only briefly per line) and never dies on undecodable bytes.

    process = popen_new_group([python, "-m", "pip", "install", "nibabel"])
    reader = LineReader(process.stdout)
    ...                                   # on a GUI timer:
    for line in reader.drain(): log(line)
    if process.poll() is not None and reader.finished: done
    kill_process_tree(process)            # Cancel: returns at once
    process_tree_alive(process)           # later: False once every process of the tree is gone
"""

import os
import queue
import signal
import subprocess
import sys
import threading
from typing import List, Mapping, Optional, Sequence, Union

_WINDOWS = os.name == "nt"
# Windows creation flags (defined here: the subprocess constants exist only on Windows).
CREATE_NEW_PROCESS_GROUP = 0x00000200
CREATE_NO_WINDOW = 0x08000000

# taskkill processes started by kill_process_tree on Windows, reaped on later calls.
_killers: List[subprocess.Popen] = []


def popen_new_group(args: Sequence[str], env: Optional[Mapping[str, str]] = None, cwd: Optional[str] = None,
                    stdin=None) -> subprocess.Popen:
    """Start ``args`` as the leader of a new process group (POSIX: a new session), stdout a
    binary pipe with stderr merged into it. ``stdin``: True (or ``subprocess.PIPE``) a binary
    pipe to write to; False (or ``subprocess.DEVNULL``) nothing, so the child can never wait
    for input; None inherited; anything else as for ``subprocess.Popen``. ``env`` None:
    this process's environment. No console window on Windows. Read stdout with a
    ``LineReader`` (or the pipe fills and the child blocks); stop with ``kill_process_tree``."""
    if stdin is True:
        stdin = subprocess.PIPE
    elif stdin is False:
        stdin = subprocess.DEVNULL
    kwargs = dict(env=None if env is None else dict(env), cwd=cwd, stdin=stdin, stdout=subprocess.PIPE,
                  stderr=subprocess.STDOUT)
    if _WINDOWS:
        info = subprocess.STARTUPINFO()
        info.dwFlags |= subprocess.STARTF_USESHOWWINDOW
        info.wShowWindow = 0  # SW_HIDE
        kwargs.update(startupinfo=info, creationflags=CREATE_NEW_PROCESS_GROUP)
    else:
        kwargs.update(start_new_session=True)
    return subprocess.Popen(list(args), **kwargs)


def _pid(process: Union[subprocess.Popen, int]) -> int:
    return process if isinstance(process, int) else process.pid


def _linux_session_members(session: int) -> List[int]:
    """Pids of the live (not zombie) processes whose session or process group is ``session``
    (Linux /proc); [] when /proc cannot be read."""
    members = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return members
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode("ascii", "replace")
        except OSError:
            continue  # gone meanwhile
        # "pid (comm) state ppid pgrp session ...": comm may hold spaces and parentheses.
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) < 4:
            continue
        state, pgrp, sid = fields[0], int(fields[2]), int(fields[3])
        if (pgrp == session or sid == session) and state not in ("Z", "X", "x"):
            members.append(int(entry))
    return members


def kill_process_tree(process: Union[subprocess.Popen, int]) -> None:
    """Kill a process started by ``popen_new_group`` and everything it started; returns at
    once (signals are sent, taskkill is started, nothing is waited for). Safe to call again
    and on a process that has ended. Poll ``process_tree_alive`` afterwards."""
    pid = _pid(process)
    if isinstance(process, subprocess.Popen) and process.returncode is not None and _WINDOWS:
        return  # leader reaped: on Windows its tree can no longer be found by pid
    if _WINDOWS:
        _reap_killers()
        try:
            _killers.append(subprocess.Popen(["taskkill", "/F", "/T", "/PID", str(pid)], stdin=subprocess.DEVNULL,
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                             creationflags=CREATE_NO_WINDOW))
        except OSError:
            pass
        if isinstance(process, subprocess.Popen):
            try:
                process.kill()  # TerminateProcess on the leader, in case taskkill cannot run
            except OSError:
                pass
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if sys.platform.startswith("linux"):
        for member in _linux_session_members(pid):  # descendants in process groups of their own
            try:
                os.kill(member, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _reap_killers() -> None:
    _killers[:] = [k for k in _killers if k.poll() is None]


def _windows_pid_alive(pid: int) -> bool:
    import ctypes

    PROCESS_QUERY_LIMITED_INFORMATION = 0x1000
    STILL_ACTIVE = 259
    kernel32 = ctypes.windll.kernel32
    handle = kernel32.OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION, False, pid)
    if not handle:
        return False
    try:
        code = ctypes.c_ulong()
        if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
            return False
        return code.value == STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


def process_tree_alive(process: Union[subprocess.Popen, int]) -> bool:
    """Whether any process of the tree started by ``popen_new_group`` still runs (zombies
    do not count). Given the ``Popen``, the leader is reaped first (non-blocking ``poll``).

    Linux: every live process of the leader's session or process group. Other POSIX: the
    process group (``killpg(pgid, 0)``). Windows: the leader only (its children cannot be
    listed without extra packages; ``kill_process_tree`` kills them with taskkill /T)."""
    if isinstance(process, subprocess.Popen):
        leaderRunning = process.poll() is None
    else:
        leaderRunning = None
    pid = _pid(process)
    if _WINDOWS:
        _reap_killers()
        return leaderRunning if leaderRunning is not None else _windows_pid_alive(pid)
    if sys.platform.startswith("linux") and os.path.isdir("/proc/self"):
        alive = bool(_linux_session_members(pid))
        if not alive and leaderRunning:
            process.poll()  # the leader exited between poll and the scan: reap it, so returncode is set
        return alive
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LineReader(threading.Thread):
    """Reads a child's output pipe line by line in a daemon thread and puts each line, decoded
    (UTF-8, undecodable bytes replaced by U+FFFD, never an exception) and without its line
    ending, into ``lines`` (a ``queue.Queue``). The thread does nothing else, so it runs even
    when the main thread holds the GIL most of the time (Slicer's Qt event loop) and the pipe
    never fills. The main thread calls ``drain()`` (never blocks); ``finished`` is True once
    the pipe reached end of file (every process holding its write end has exited). Text-mode streams work too. Starts itself unless ``start=False``."""

    def __init__(self, stream, lines: Optional[queue.Queue] = None, name: str = "process output reader",
                 encoding: str = "utf-8", start: bool = True):
        super().__init__(name=name, daemon=True)
        self.stream = stream
        self.lines = lines if lines is not None else queue.Queue()
        self.encoding = encoding
        self.error: Optional[BaseException] = None  # why reading stopped early, if it did
        self._ended = threading.Event()
        if start:
            self.start()

    def run(self) -> None:
        stream = self.stream
        if stream is None:
            self._ended.set()
            return
        try:
            while True:
                try:
                    line = stream.readline()
                except UnicodeDecodeError:  # a text-mode stream given by the caller: skip the line
                    self.lines.put("\ufffd")
                    continue
                if not line:
                    break
                if isinstance(line, bytes):
                    line = line.decode(self.encoding, errors="replace")
                self.lines.put(line.rstrip("\r\n"))
        except (OSError, ValueError) as exc:  # closed under us (the caller closed the pipe)
            self.error = exc
        finally:
            try:
                stream.close()
            except Exception:
                pass
            self._ended.set()

    @property
    def finished(self) -> bool:
        """End of file reached (or reading failed): no more lines will be added; those
        already read may still wait in ``lines``."""
        return self._ended.is_set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait up to ``timeout`` seconds for end of file; True if reached."""
        return self._ended.wait(timeout)

    def drain(self, limit: Optional[int] = None) -> List[str]:
        """The lines read since the last call (at most ``limit``), without waiting."""
        lines = []
        while limit is None or len(lines) < limit:
            try:
                lines.append(self.lines.get_nowait())
            except queue.Empty:
                break
        return lines
