"""How many CPU threads the network runs on: the cores actually free, unless the user says.

On a shared machine OpenMP threads that wait for each other at every layer are many times
slower as soon as one core is taken by another process (docs/performance.md: 6-26 s instead
of 9.7 s on 2 cores). So the network runs as independent workers, each one PyTorch thread
on its own batches of slices (no barrier between them), and the number of workers is the
number of cores free when the network starts:

1. an explicit count (``synthesize(threads=N)``, ``mrisynthesis predict --threads N``, the
   Slicer module's setting);
2. else the environment: ``MRISYNTHESIS_THREADS``, then ``OMP_NUM_THREADS``;
3. else the cores this process may run on (``sched_getaffinity``) minus the cores other
   processes kept busy since the synthesis started, measured from ``/proc/stat`` less this
   process's own CPU time (``os.getloadavg`` where there is no ``/proc/stat``).

Torch-free, so that it can be imported anywhere.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Optional

THREADS_ENV = "MRISYNTHESIS_THREADS"
# Below this window the /proc/stat counters (1/100 s ticks) say too little; wait for it.
MIN_SAMPLE_S = 0.1


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _read_proc_stat():
    """(busy, total) ticks summed over all CPUs, or None without /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    idle = ticks[3] + ticks[4]
    return sum(ticks) - idle, sum(ticks)


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


@dataclass(frozen=True)
class CpuSample:
    """A point from which the busy cores of other processes are measured."""

    wall: float
    own_cpu: float
    stat: Optional[tuple]

    @classmethod
    def now(cls) -> "CpuSample":
        return cls(time.monotonic(), _own_cpu_seconds(), _read_proc_stat())


def cores_busy_elsewhere(since: CpuSample, wait: bool = True) -> Optional[float]:
    """Cores kept busy by other processes since ``since`` (None when not measurable).
    ``wait``: sleep until the window is at least MIN_SAMPLE_S long."""
    if since.stat is None:
        try:
            return max(0.0, os.getloadavg()[0] - 1.0)  # 1-minute average, includes us: a rough guess
        except (AttributeError, OSError):
            return None
    if wait:
        remaining = MIN_SAMPLE_S - (time.monotonic() - since.wall)
        if remaining > 0:
            time.sleep(remaining)
    now = CpuSample.now()
    if now.stat is None:
        return None
    busy, total = now.stat[0] - since.stat[0], now.stat[1] - since.stat[1]
    elapsed = now.wall - since.wall
    if total <= 0 or elapsed <= 0:
        return None
    online = os.cpu_count() or 1
    all_busy = online * busy / total  # cores busy on the whole machine, us included
    ours = (now.own_cpu - since.own_cpu) / elapsed
    return max(0.0, all_busy - ours)


@dataclass(frozen=True)
class ThreadChoice:
    count: int
    reason: str


def _positive_int(text: str, name: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not a whole number of threads") from None
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def choose_threads(requested: Optional[int] = None, since: Optional[CpuSample] = None) -> ThreadChoice:
    """The number of CPU threads for the network (see the module docstring for the order)."""
    if requested is not None:
        if int(requested) < 1:
            raise ValueError(f"threads must be >= 1, got {requested}")
        return ThreadChoice(int(requested), "requested")
    for name in (THREADS_ENV, "OMP_NUM_THREADS"):
        text = os.environ.get(name, "").strip()
        if text:
            return ThreadChoice(_positive_int(text, name), f"${name}")
    cpus = usable_cpus()
    if cpus == 1:
        return ThreadChoice(1, "one usable CPU")
    busy = cores_busy_elsewhere(since or CpuSample.now())
    if busy is None:
        return ThreadChoice(cpus, f"{cpus} usable CPUs (load not measurable)")
    free = max(1, min(cpus, int(cpus - busy + 0.5)))
    return ThreadChoice(free, f"{cpus} usable CPUs, {busy:.1f} busy with other processes")
