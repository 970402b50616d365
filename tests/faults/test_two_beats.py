"""Two `pipeline beat` processes started by mistake: both send every periodic task, and the beat
lock (`jobs.beat_lock`) lets one copy per slot run. Real beats, a real worker, the real Redis; the
lost-chunk sweep runs every 2 s (`PIPELINE_SWEEP_INTERVAL`) so that several slots pass."""

from __future__ import annotations

import re
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from jobs.worker_process import stop_process

from fault_deployment import Services
from support.processes import PIPELINE

SWEEP = "jobs.maintenance.sweep_lost_chunks"


def _start_beat(s: Services, name: str) -> tuple[subprocess.Popen, Path]:
    folder = s.cwd / name
    folder.mkdir()
    log = folder / "beat.log"
    with log.open("w") as out:
        process = subprocess.Popen([*PIPELINE, "beat"], cwd=folder, env=s.env(), stdout=out, stderr=subprocess.STDOUT)
    return process, log


def _sweeps(log: Path) -> tuple[list[int], int, int]:
    """(slots the sweep ran for, copies skipped, copies received), from the worker's log."""
    text = log.read_text(errors="replace")
    ran = [int(n) for n in re.findall(rf"{re.escape(SWEEP)}: running for slot (\d+)", text)]
    skipped = text.count(f"{SWEEP}: already run in this slot")
    received = len(re.findall(rf"Task {re.escape(SWEEP)}\[[0-9a-f-]+\] received", text))
    return ran, skipped, received


@pytest.mark.workers
def test_two_beats_run_each_periodic_task_once_per_slot(services) -> None:
    s = services(PIPELINE_SWEEP_INTERVAL="2s")
    worker = s.start_worker("w1")
    beats = [_start_beat(s, "beat-a"), _start_beat(s, "beat-b")]
    try:
        # Both beats have sent the sweep in at least three slots: six copies received, or more.
        s.wait(lambda: _sweeps(worker.log)[2] >= 6 and all(p.poll() is None for p, _ in beats),
               "copies of the sweep from both beats")
    finally:
        for process, _ in beats:
            stop_process(process)
    time.sleep(1.0)  # let the worker log the copies it was running when the beats stopped
    for process, log in beats:
        text = log.read_text(errors="replace")
        assert f"Scheduler: Sending due task lost-chunk-sweep ({SWEEP})" in text, text  # each beat sent it
    ran, skipped, received = _sweeps(worker.log)
    assert len(ran) >= 2 and max(Counter(ran).values()) == 1, ran  # never twice in one slot
    assert skipped >= 2 and len(ran) + skipped == received, (ran, skipped, received)
