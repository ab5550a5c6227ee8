"""MRISynthesisLib.processes with real process trees: a launcher that starts the real
program as its child (as Slicer's PythonSlicer does), killed as a whole without waiting; an
output reader that survives undecodable bytes and keeps the pipe drained."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import pid_alive
from MRISynthesisLib import processes

pytestmark = pytest.mark.skipif(os.name == "nt", reason="POSIX process groups (Windows: taskkill, not testable here)")

# Like the CTK launcher: start the real interpreter as a child, wait for it, pass its exit status on.
LAUNCHER = textwrap.dedent("""
    import subprocess, sys
    sys.exit(subprocess.Popen([sys.executable, *sys.argv[1:]]).wait())
""")
SLEEPER = textwrap.dedent("""
    import os, sys, time
    with open(sys.argv[1], "w") as f:
        f.write(str(os.getpid()))
    print("child started", flush=True)
    time.sleep(120)
""")


def wait_until(condition, limit=10.0):
    end = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def launch_tree(tmp_path):
    (tmp_path / "launcher.py").write_text(LAUNCHER)
    (tmp_path / "sleeper.py").write_text(SLEEPER)
    pidfile = tmp_path / "child.pid"
    process = processes.popen_new_group([sys.executable, str(tmp_path / "launcher.py"), str(tmp_path / "sleeper.py"),
                                         str(pidfile)], stdin=subprocess.DEVNULL)
    wait_until(lambda: pidfile.exists() and pidfile.read_text())
    return process, int(pidfile.read_text())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_process_tree_kills_the_launcher_and_its_child_at_once(tmp_path):
    process, child = launch_tree(tmp_path)
    reader = processes.LineReader(process.stdout)
    assert os.getpgid(process.pid) == process.pid and os.getpgid(child) == process.pid  # a group of its own
    assert pid_alive(process.pid) and pid_alive(child) and processes.process_tree_alive(process)
    # What the old code did (terminate the Popen) stops only the launcher; the child goes on.
    start = time.perf_counter()
    processes.kill_process_tree(process)
    assert time.perf_counter() - start < 0.1  # no waiting
    wait_until(lambda: not processes.process_tree_alive(process), limit=5)
    assert not pid_alive(process.pid) and not pid_alive(child)
    assert process.returncode == -signal.SIGKILL  # reaped by process_tree_alive
    reader.wait(5)
    assert reader.finished and reader.drain() == ["child started"]
    processes.kill_process_tree(process)  # again, on a finished tree: harmless


def test_terminating_only_the_launcher_leaves_the_child_running(tmp_path):
    """Why a tree: the bug of issue 18 item 5, reproduced with the same launcher."""
    process, child = launch_tree(tmp_path)
    try:
        process.terminate()
        process.wait(5)
        time.sleep(0.2)
        assert pid_alive(child)
        assert processes.process_tree_alive(process.pid)  # the group still has the child
    finally:
        processes.kill_process_tree(process.pid)
    wait_until(lambda: not pid_alive(child), limit=5)


def test_line_reader_replaces_undecodable_bytes_and_keeps_reading(tmp_path):
    code = ("import sys\nout = sys.stdout.buffer\nout.write(b'caf\\xe9 \\xff\\xfe invalid\\r\\n')\n"
            "for i in range(20000): out.write(b'line %d of valid output\\n' % i)\n"
            "out.write('d\\u00e9j\\u00e0 vu\\n'.encode())\nout.flush()\n")
    process = processes.popen_new_group([sys.executable, "-c", code], stdin=False)
    reader = processes.LineReader(process.stdout)
    lines = []
    end = time.monotonic() + 30
    while not (reader.finished and process.poll() is not None):  # 400 kB: the pipe would fill if nobody read
        lines += reader.drain()
        assert time.monotonic() < end, "output reader stopped: the child blocks on a full pipe"
        time.sleep(0.01)
    lines += reader.drain()
    assert process.returncode == 0 and reader.error is None
    assert lines[0] == "caf\ufffd \ufffd\ufffd invalid"
    assert lines[1] == "line 0 of valid output" and lines[-2] == "line 19999 of valid output"
    assert lines[-1] == "d\u00e9j\u00e0 vu" and len(lines) == 20002


def test_line_reader_drain_never_blocks_and_stdin_pipe(tmp_path):
    process = processes.popen_new_group([sys.executable, "-c", "import sys; print(sys.stdin.readline().strip().upper())"],
                                        stdin=True)
    reader = processes.LineReader(process.stdout)
    start = time.perf_counter()
    assert reader.drain() == [] and time.perf_counter() - start < 0.05 and not reader.finished
    process.stdin.write(b"hello\n")
    process.stdin.close()
    assert reader.wait(10) and process.wait(10) == 0
    assert reader.drain() == ["HELLO"]


def test_process_tree_alive_after_a_normal_exit():
    process = processes.popen_new_group([sys.executable, "-c", "print('x')"], stdin=False)
    reader = processes.LineReader(process.stdout)
    wait_until(lambda: not processes.process_tree_alive(process))
    assert process.returncode == 0 and reader.wait(5)
