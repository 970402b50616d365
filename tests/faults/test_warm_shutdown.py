"""A worker stopped with SIGTERM in the middle of a chunk (a deploy, a scale-down): Celery's warm
shutdown lets the running chunk finish and write its results, hands back the messages it had not
started, and exits cleanly; a worker started after it runs the rest. Every line exactly once."""

from __future__ import annotations

import json
import signal

import pytest

from line_outcomes import COMPLETED, line_outcomes
from test_worker_kill import FAST, SLOW, _pending, _slow_chunk_holder


@pytest.mark.workers
def test_sigterm_mid_chunk_finishes_it_and_another_worker_runs_the_rest(services) -> None:
    s = services()
    lines = [*SLOW, *FAST, *({**line, "custom_id": f"more-{i}"} for i, line in enumerate(FAST))]
    ids = [line["custom_id"] for line in lines]
    (s.cwd / "in.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    first = s.start_worker("w1")
    job_id = s.submit(s.cwd / "in.jsonl")

    chunk_id, holder = s.wait(lambda: _slow_chunk_holder(s, job_id), "the slow chunk running on w1")
    assert holder is first and _pending(s, job_id, ["slow-0", "slow-1"])
    assert first.kill(signal.SIGTERM) == 0  # returns once the warm shutdown is over
    assert not _pending(s, job_id, ["slow-0"])  # it finished the chunk it was running...
    assert _pending(s, job_id, ["more-0", "more-1"])  # ...and started nothing after the signal

    s.start_worker("w2")
    s.wait(lambda: '"status": "completed"' in s.cli("status", job_id, "--json").stdout, "the job completed")
    assert line_outcomes(s, job_id, ids) == {i: COMPLETED for i in ids}
    assert s.running_chunks(job_id) == {}
    log = first.log.read_text()
    assert "Traceback" not in log and "warm shutdown" in log.lower()
