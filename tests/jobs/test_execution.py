"""`to_engine_request` and `execute_chunk` on SQLite with the tiny model: idempotent, finalizing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from db.enums import ChunkStatus, JobStatus
from db.migrate import upgrade
from db.models import Chunk, Job
from db.repository import get_usage, job_counts, job_errors
from db.session import make_engine, session_factory
from jobs.engine_host import get_engine_loop, to_engine_request
from jobs.execution import execute_chunk
from pipeline.settings import Settings
from pipeline.submit import submit_file
from workers.tokenizer import ByteTokenizer


def test_completions_body_becomes_prompt_tokens_and_params() -> None:
    tok = ByteTokenizer()
    body = {"prompt": "hi", "max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "seed": 3, "stop": ["\n"]}
    ids, params = to_engine_request("/v1/completions", body, tok)
    assert ids == [ByteTokenizer.BOS, ord("h"), ord("i")]
    assert (params.max_tokens, params.temperature, params.top_p, params.seed, params.stop) == (7, 0.5, 0.9, 3, ("\n",))


def test_chat_body_goes_through_the_chat_template() -> None:
    tok = ByteTokenizer()
    messages = [{"role": "user", "content": "yo"}]
    ids, params = to_engine_request("/v1/chat/completions", {"messages": messages, "max_tokens": 2, "stop": []}, tok)
    assert ids == tok.encode_chat(messages)
    assert params.stop == () and params.temperature == 1.0 and params.seed is None


def test_unknown_endpoint_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="/v1/embeddings"):
        to_engine_request("/v1/embeddings", {"input": "x", "max_tokens": 1}, ByteTokenizer())


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    url = f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
    upgrade(url)
    return Settings(database_url=url, chunk_size=2)


def test_a_chunk_run_twice_records_nothing_new_and_the_job_completes(settings: Settings, tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    long_prompt = "x" * 5000  # more tokens than the tiny model's context: refused by the engine
    source.write_text("".join(json.dumps(line) + "\n" for line in [
        {"custom_id": "a", "text": "alpha", "max_tokens": 3, "temperature": 0},
        {"custom_id": "b", "text": long_prompt, "max_tokens": 3, "temperature": 0},
        {"custom_id": "c", "text": "gamma", "max_tokens": 3, "temperature": 0},
    ]))
    factory = session_factory(make_engine(settings.database_url))
    sent: list[tuple[int, str]] = []
    summary = submit_file(settings, factory, source, priority="high", send_chunk=lambda c, q: sent.append((c, q)))
    assert summary["status"] == "in_progress" and summary["request_counts"]["total"] == 3
    assert [q for _, q in sent] == ["high"] * len(sent) and len(sent) == 2  # chunk_size 2
    loop = get_engine_loop(settings)

    execute_chunk(factory, loop, sent[0][0], "w1")
    with factory() as session:
        first = job_counts(session, summary["id"])
        usage = get_usage(session, summary["id"])
        tokens = (usage.prompt_tokens, usage.completion_tokens)
        assert session.get(Job, summary["id"]).status == JobStatus.IN_PROGRESS  # the other chunk is pending

    execute_chunk(factory, loop, sent[0][0], "w2")  # a redelivery: done chunk, nothing to do
    with factory() as session:
        assert job_counts(session, summary["id"]) == first
        usage = get_usage(session, summary["id"])
        assert (usage.prompt_tokens, usage.completion_tokens) == tokens

    execute_chunk(factory, loop, sent[1][0], "w1")
    with factory() as session:
        job = session.get(Job, summary["id"])
        counts = job_counts(session, summary["id"])
        assert (job.status, job.request_completed, job.request_failed) == (JobStatus.COMPLETED, 2, 1)
        assert (counts.completed, counts.failed, counts.pending) == (2, 1, 0)
        assert job.finalizing_at is not None and job.completed_at is not None
        assert all(c.status == ChunkStatus.DONE for c in session.query(Chunk).filter_by(job_id=job.id))
        [event] = job_errors(session, job.id, kind="engine")
        assert (event.custom_id, event.line) == ("b", 2) and "prompt_too_long" in event.message


def test_a_claim_beyond_the_redelivery_cap_fails_the_chunk_without_running_it(settings: Settings,
                                                                              tmp_path: Path) -> None:
    """The worker side of the cap (the sweep's side is in tests/faults/test_worker_kill.py): a chunk
    whose earlier runs all died is claimed once more than allowed and given up, not run."""
    from datetime import timedelta

    from db.repository import claim_chunk

    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"custom_id": c, "text": c, "max_tokens": 2}) + "\n" for c in ("a", "b")))
    factory = session_factory(make_engine(settings.database_url))
    sent: list[int] = []
    job_id = submit_file(settings, factory, source, send_chunk=lambda c, q: sent.append(c))["id"]
    with factory.begin() as session:  # one run that died: claimed, its lease long gone
        chunk = claim_chunk(session, sent[0], worker="dead", lease=timedelta(seconds=1))
        chunk.lease_expires_at = chunk.created_at

    execute_chunk(factory, get_engine_loop(settings), sent[0], "w1", max_redeliveries=0)
    with factory() as session:
        job = session.get(Job, job_id)
        assert (job.status, job.request_completed, job.request_failed) == (JobStatus.COMPLETED, 0, 2)
        assert get_usage(session, job_id) is None  # nothing ran, nothing billed
        [event] = job_errors(session, job_id)
        assert event.kind == "worker_lost" and "was started 1 time and never finished" in event.message


def test_giving_up_a_chunk_takes_the_job_lock_without_holding_the_chunks(pg_url: str, tmp_path: Path) -> None:
    """Every writer locks a job before its chunks. A sweep giving up the same chunk holds the job
    row and then wants the chunk's: the worker's give-up must not hold the chunk (as its claim
    does) while it waits for the job, or the two deadlock."""
    import threading
    import time
    from datetime import timedelta

    from sqlalchemy import select

    from db.repository import claim_chunk

    upgrade(pg_url)
    settings = Settings(database_url=pg_url, chunk_size=2)
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"custom_id": c, "text": c, "max_tokens": 2}) + "\n" for c in ("a", "b")))
    engine = make_engine(pg_url)
    factory = session_factory(engine)
    sent: list[int] = []
    job_id = submit_file(settings, factory, source, send_chunk=lambda c, q: sent.append(c))["id"]
    with factory.begin() as session:  # one run that died: claimed, its lease long gone
        chunk = claim_chunk(session, sent[0], worker="dead", lease=timedelta(seconds=1))
        chunk.lease_expires_at = chunk.created_at

    with factory.begin() as sweep:  # as the sweep's give-up: the job's row first
        sweep.execute(select(Job.id).where(Job.id == job_id).with_for_update())
        worker = threading.Thread(target=execute_chunk,
                                  args=(factory, get_engine_loop(settings), sent[0], "w1"),
                                  kwargs={"max_redeliveries": 0})
        worker.start()
        deadline = time.monotonic() + 30
        while True:  # the worker's claim commits without the job's lock
            with factory() as other:
                if other.get(Chunk, sent[0]).attempts == 2:
                    break
            assert time.monotonic() < deadline, "the worker's claim waits for the job row it should not need"
            time.sleep(0.05)
        # ... so the chunk's row is free for the sweep, which then sees nothing left to give up.
        sweep.execute(select(Chunk.id).where(Chunk.id == sent[0]).with_for_update())
    worker.join(timeout=30)
    assert not worker.is_alive()
    with factory() as session:
        job = session.get(Job, job_id)
        assert (job.status, job.request_failed) == (JobStatus.COMPLETED, 2)
        assert [e.kind for e in job_errors(session, job_id)] == ["worker_lost"]
    engine.dispose()
