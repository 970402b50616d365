"""The quiet-machine check sees a real process spinning beside the benchmarked one, and counts the
benchmarked process's own children as its own. Detection, not timing: the spinner's CPU time is
read from /proc and must show up on the right side of the ledger."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from workers.bench.cpu_load import CLOCK_TICKS, CpuMeter, tree_ticks

SPIN = "while True: pass"


@pytest.fixture
def spinner() -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen([sys.executable, "-c", SPIN])
    yield proc
    proc.kill()
    proc.wait()


def _spinner_seconds(proc: subprocess.Popen) -> float:
    return tree_ticks(proc.pid) / CLOCK_TICKS


def _measure(meter: CpuMeter, proc: subprocess.Popen, seconds: float = 1.5) -> tuple[float, object]:
    """Runs the meter while `proc` spins; returns the spinner's CPU seconds over that stretch."""
    time.sleep(0.2)  # let the interpreter start
    before = _spinner_seconds(proc)
    meter.start()
    time.sleep(seconds)
    load = meter.stop()
    return _spinner_seconds(proc) - before, load


def test_a_process_spinning_outside_the_benchmarked_tree_flags_the_run(spinner: subprocess.Popen) -> None:
    idle = subprocess.Popen(["sleep", "30"])  # the "benchmarked" process: it uses nothing
    try:
        spun, load = _measure(CpuMeter(root_pid=idle.pid), spinner)
    finally:
        idle.kill()
        idle.wait()
    assert spun > 0.1  # it did run (it gets its share of a core even on a busy machine)
    assert load.own_cpu_seconds == 0.0
    # Every tick the spinner used is someone else's; a tick or two of rounding on each side.
    assert load.other_cpu_seconds >= spun - 3 / CLOCK_TICKS
    assert load.is_loaded
    assert load.other_cores > 0.1


def test_the_benchmarked_process_children_are_its_own_time(spinner: subprocess.Popen) -> None:
    spun, load = _measure(CpuMeter(root_pid=os.getpid()), spinner)  # the spinner is this process's child
    assert spun > 0.1
    assert load.own_cpu_seconds >= spun - 3 / CLOCK_TICKS


def test_an_exited_child_keeps_counting_through_its_parent() -> None:
    meter = CpuMeter()
    meter.start()
    child = subprocess.run([sys.executable, "-c", "import time\nt = time.process_time()\n"
                            "while time.process_time() - t < 0.5: pass"])
    load = meter.stop()
    assert child.returncode == 0
    assert load.own_cpu_seconds >= 0.5 - 3 / CLOCK_TICKS  # reaped: its time sits in our cutime


def test_stop_before_start_is_a_bug() -> None:
    with pytest.raises(RuntimeError, match="before start"):
        CpuMeter().stop()
