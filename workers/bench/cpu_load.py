"""The quiet-machine check: CPU time that processes other than the benchmarked one (and its
descendants) used on the benchmark's cores during a timed run, read from /proc.

Standard library only: the vLLM peer script runs in vLLM's own virtual environment, which lacks
this package, and imports this file from its folder (`workers/bench/`) to measure its own runs.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

OTHER_LOAD_LIMIT = 0.10  # other processes using more than a tenth of one core flag the run
# /proc counts in clock ticks; a run is flagged only beyond a few ticks of rounding, so that very
# short runs are not flagged for the counters' coarseness.
RESOLUTION_TICKS = 3
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True, slots=True)
class CpuLoad:
    """One timed stretch: wall time, CPU time of the benchmarked process tree, and CPU time every
    other process (and the kernel on their behalf) used on the same cores."""

    wall_seconds: float
    own_cpu_seconds: float
    other_cpu_seconds: float
    is_loaded: bool  # other processes used more than OTHER_LOAD_LIMIT of a core: the timing is suspect

    @property
    def other_cores(self) -> float:
        """Other processes' CPU time as a number of cores kept busy over the run."""
        return self.other_cpu_seconds / self.wall_seconds if self.wall_seconds > 0 else 0.0


def busy_ticks(cpus: set[int]) -> int:
    """Non-idle clock ticks of `cpus` since boot, from the per-CPU lines of /proc/stat (user, nice,
    system, irq, softirq and steal; guest time is already inside user)."""
    total = 0
    with open("/proc/stat") as f:
        for line in f:
            name, *fields = line.split()
            if not name.startswith("cpu") or name == "cpu":
                continue
            if int(name[3:]) in cpus:
                user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
                total += user + nice + system + irq + softirq + steal
    return total


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None  # it exited between the listing and the read
    # The command name (field 2) may hold spaces and parentheses: split after its closing one.
    return text[text.rindex(")") + 2:].split()


def tree_ticks(root_pid: int) -> int:
    """CPU ticks of `root_pid` and every descendant alive now, each with its reaped children's
    ticks (a child that exits during the run moves its time into its parent's cutime/cstime)."""
    children: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is None:
            continue
        # After the name: state ppid ... utime(14) stime(15) cutime(16) cstime(17), counted from 1.
        pid, ppid = int(entry), int(fields[1])
        children.setdefault(ppid, []).append(pid)
        ticks[pid] = sum(int(x) for x in fields[11:15])
    total, stack = 0, [root_pid]
    while stack:
        pid = stack.pop()
        total += ticks.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


class CpuMeter:
    """Measures one stretch: `start()`, the work, `stop()`. `root_pid` is the benchmarked process
    (default: this one); `cpus` the cores it runs on (default: this process's affinity)."""

    def __init__(self, root_pid: int | None = None, cpus: set[int] | None = None) -> None:
        self.root_pid = os.getpid() if root_pid is None else root_pid
        self.cpus = set(os.sched_getaffinity(0)) if cpus is None else cpus
        self._start: tuple[float, int, int] | None = None

    def start(self) -> None:
        self._start = (time.perf_counter(), busy_ticks(self.cpus), tree_ticks(self.root_pid))

    def stop(self) -> CpuLoad:
        if self._start is None:
            raise RuntimeError("CpuMeter.stop() before start()")
        wall, busy, own = time.perf_counter(), busy_ticks(self.cpus), tree_ticks(self.root_pid)
        wall, busy, own = wall - self._start[0], busy - self._start[1], own - self._start[2]
        # Our tree may also run on cores outside `cpus` only if its affinity was widened; then
        # busy - own undercounts, never overcounts, the others' share.
        other = max(0, busy - own)
        is_loaded = other > max(OTHER_LOAD_LIMIT * wall * CLOCK_TICKS, RESOLUTION_TICKS)
        return CpuLoad(wall, own / CLOCK_TICKS, other / CLOCK_TICKS, is_loaded)
