"""A worker killed with SIGKILL in the middle of a chunk, on real PostgreSQL, Redis and `pipeline
worker` processes.

Once: the chunk comes back (kombu restores a dead worker's unacknowledged message after the
visibility timeout, and the lost-chunk sweep resends a chunk whose lease ran out; the test runs the
sweep as beat would, only more often) and another worker finishes it, every line once.

Every time: a chunk whose every run is killed is not retried forever. After its first delivery
and `task_max_redeliveries` more, its lines fail with `worker_lost` saying how often it was tried;
the other lines of the job complete.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import select

from db.enums import JobStatus, RequestStatus
from db.models import Chunk, Request
from db.repository import job_errors

from fault_checks import job_status
from fault_deployment import Services, Worker
from line_outcomes import COMPLETED, error_messages, line_outcomes

# Long generations (short prompts) so that a chunk runs for many seconds: the test must see each
# run of it (polling the database) and kill its worker before it ends; a run of 1.5 s once slipped
# between two polls. The fast lines are the rest of the job.
SLOW = [{"custom_id": f"slow-{i}", "text": f"Slow story {i}:", "max_tokens": 2000, "temperature": 0}
        for i in range(2)]
FAST = [{"custom_id": f"fast-{i}", "text": f"Fast line {i}", "max_tokens": 6, "temperature": 0} for i in range(2)]


def _write(path: Path, lines: list[dict]) -> list[str]:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return [line["custom_id"] for line in lines]


def _slow_chunk_holder(services: Services, job_id: str) -> tuple[int, Worker] | None:
    """(chunk id, worker) while the chunk of the slow lines runs on a live worker, else None (the
    row of a killed worker's chunk says running until its lease runs out)."""
    with services.factory() as session:
        chunk_id = session.scalar(select(Request.chunk_id).where(Request.job_id == job_id,
                                                                 Request.custom_id == "slow-0"))
    node = services.running_chunks(job_id).get(chunk_id)
    if node is None or services.worker_named(node).process.poll() is not None:
        return None
    return chunk_id, services.worker_named(node)


def _pending(services: Services, job_id: str, custom_ids: list[str]) -> bool:
    with services.factory() as session:
        statuses = session.scalars(select(Request.status).where(Request.job_id == job_id,
                                                                Request.custom_id.in_(custom_ids))).all()
    return statuses == [RequestStatus.PENDING] * len(custom_ids)


def _ended(services: Services, job_id: str) -> bool:
    services.sweep()  # as beat would, every poll instead of every 10 minutes
    return job_status(services.factory, job_id) == JobStatus.COMPLETED  # the database: polls stay quick


@pytest.mark.workers
def test_a_chunk_killed_mid_run_is_finished_by_another_worker_once(services) -> None:
    s = services()
    ids = _write(s.cwd / "in.jsonl", SLOW + FAST)
    first = s.start_worker("w1")
    job_id = s.submit(s.cwd / "in.jsonl")

    chunk_id, holder = s.wait(lambda: _slow_chunk_holder(s, job_id), "the slow chunk running on w1")
    assert holder is first
    holder.kill()
    assert _pending(s, job_id, ["slow-0", "slow-1"])  # killed mid-chunk: nothing of it written
    second = s.start_worker("w2")

    s.wait(lambda: _ended(s, job_id), "the job completed after the kill")
    assert line_outcomes(s, job_id, ids) == {i: COMPLETED for i in ids}
    with s.factory() as session:
        finished_by = session.scalars(select(Request.chunk_id).where(Request.job_id == job_id,
                                                                     Request.custom_id.like("slow-%"))).all()
        assert finished_by == [chunk_id, chunk_id]
        assert job_errors(session, job_id) == []
    assert second.process.poll() is None


@pytest.mark.workers
def test_a_chunk_that_kills_every_worker_fails_after_the_redelivery_cap(services) -> None:
    s = services(PIPELINE_TASK_MAX_REDELIVERIES="1")
    ids = _write(s.cwd / "in.jsonl", SLOW + FAST)
    s.start_worker("w0")
    job_id = s.submit(s.cwd / "in.jsonl")
    kills = 0

    def doomed_chunk_ended() -> bool:
        nonlocal kills
        held = _slow_chunk_holder(s, job_id)
        if held is not None:  # it runs again: kill its worker again, and start a fresh one
            held[1].kill()
            kills += 1
            s.start_worker(f"w{kills}")
        return _ended(s, job_id)

    s.wait(doomed_chunk_ended, "the job ended with the doomed chunk given up")
    assert kills == 2, _story(s, job_id)  # its first delivery and one redelivery, never a third run
    outcomes = line_outcomes(s, job_id, ids)
    assert outcomes == {"slow-0": "worker_lost", "slow-1": "worker_lost", "fast-0": COMPLETED, "fast-1": COMPLETED}
    messages = error_messages(s, job_id)
    assert "was started 2 times and never finished" in messages["slow-0"]
    assert "pipeline retry" in messages["slow-0"]
    with s.factory() as session:
        history = [(e.kind, e.chunk_id is not None, e.message) for e in job_errors(session, job_id)]
    assert history == [("worker_lost", True, messages["slow-0"])]  # once, for the chunk


def _story(services: Services, job_id: str) -> str:
    """What happened, for a failure message: the chunks, the error history and the workers' logs."""
    with services.factory() as session:
        chunks = session.execute(select(Chunk.id, Chunk.status, Chunk.attempts, Chunk.worker)
                                 .where(Chunk.job_id == job_id)).all()
        errors = [(e.kind, e.chunk_id, e.message, e.traceback) for e in job_errors(session, job_id)]
    logs = "".join(f"\n--- {w.node} ---\n{w.log.read_text(errors='replace')[-6000:]}" for w in services.workers)
    return f"chunks {chunks}\nerrors {errors}{logs}"
