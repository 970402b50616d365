"""Beat's maintenance tasks on real services: the lost-chunk sweep against a real Redis and a real
`pipeline worker`, expiry, session cleanup and backups on real databases, and the beat lock that
keeps a second beat from running a task twice."""

from __future__ import annotations

import dataclasses
import gzip
import json
import sqlite3
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import inspect, select, text

from db import make_engine, session_factory
from db.backup import BackupError, backup_database
from db.enums import JobStatus, RequestStatus
from db.migrate import upgrade
from db.models import Job, Request
from db.records import ErrorEvent, SessionRecord
from db.repository import LOST_AFTER, create_job, upsert_session
from jobs import maintenance
from jobs.beat_lock import lock_key, slot_seconds
from jobs.maintenance import cleanup_idle_sessions, resend_lost_chunks, run_once
from pipeline.celery_app import chunk_sender, make_celery
from pipeline.queues import QUEUE_NAMES
from pipeline.settings import Settings, load_settings
from pipeline.submit import job_summary, submit_file
from jobs.worker_process import delete_prefixed_keys

from support.processes import BROKER_URL, key_prefix, pipeline_env, wait_until, worker

T0 = datetime(2026, 1, 5, 12, 0, 0, tzinfo=timezone.utc)



@pytest.fixture
def prefix(redis_client) -> str:
    """A Redis key prefix of this test's own; its keys are deleted after."""
    prefix = key_prefix()
    yield prefix
    delete_prefixed_keys(redis_client, prefix)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'pipeline.sqlite3'}"
    upgrade(url)
    return url


@pytest.fixture
def task_settings(sqlite_url: str, prefix: str, tmp_path: Path, monkeypatch) -> Settings:
    """The settings the maintenance tasks see in this process."""
    settings = Settings(database_url=sqlite_url, broker_url=BROKER_URL, redis_key_prefix=prefix,
                        backups_dir=tmp_path / "backups", session_idle_timeout="7d")
    monkeypatch.setattr(maintenance, "worker_settings", lambda: settings)
    return settings


def _write_lines(path: Path, n: int) -> list[str]:
    ids = [f"req-{i}" for i in range(n)]
    path.write_text("".join(json.dumps({"custom_id": cid, "text": f"Line {i} says", "max_tokens": 3,
                                        "temperature": 0}) + "\n" for i, cid in enumerate(ids)))
    return ids


# -- the lost-chunk sweep ---------------------------------------------------------------------------


@pytest.mark.workers
def test_sweep_resends_lost_chunks_and_the_job_completes_once(pg_url: str, prefix: str, redis_client,
                                                              tmp_path: Path) -> None:
    env_vars = {"PIPELINE_DATABASE_URL": pg_url, "PIPELINE_BROKER_URL": BROKER_URL,
                "PIPELINE_REDIS_KEY_PREFIX": prefix, "PIPELINE_CHUNK_SIZE": "2"}
    upgrade(pg_url)
    settings = load_settings(env=env_vars, config_path=None)
    engine = make_engine(pg_url)
    factory = session_factory(engine)
    app = make_celery(settings)
    ids = _write_lines(tmp_path / "in.jsonl", 5)
    try:
        # No worker yet: the three chunk messages wait in Redis, then are lost.
        job_id = submit_file(settings, factory, tmp_path / "in.jsonl", priority="high",
                             send_chunk=chunk_sender(app))["id"]
        queue_keys = [f"{prefix}{name}" for name in QUEUE_NAMES]
        assert [redis_client.llen(key) for key in queue_keys] == [0, 3, 0, 0]
        assert redis_client.delete(*queue_keys) == 1

        assert resend_lost_chunks(factory, chunk_sender(app)) == []  # queued just now: not lost yet
        later = datetime.now(timezone.utc) + LOST_AFTER + timedelta(seconds=1)
        resent = resend_lost_chunks(factory, chunk_sender(app), now=later)
        assert len(resent) == 3
        assert redis_client.llen(f"{prefix}high") == 3  # on the job's priority queue again
        assert resend_lost_chunks(factory, chunk_sender(app), now=later) == []  # marked queued at `later`

        def completed() -> dict | None:
            with factory() as session:
                summary = job_summary(session, job_id)
            return summary if summary["status"] == "completed" else None

        log = tmp_path / "worker.log"
        with worker(pipeline_env(**env_vars), tmp_path, log, "--concurrency", "2") as process:
            summary = wait_until(completed, f"job {job_id} completed", log, process=process)
        assert summary["request_counts"] == {"total": 5, "completed": 5, "failed": 0}
        with factory() as session:
            rows = session.execute(select(Request.custom_id, Request.status, Request.text)
                                   .where(Request.job_id == job_id).order_by(Request.line)).all()
        assert [row.custom_id for row in rows] == ids  # every line exactly once
        assert all(row.status == RequestStatus.COMPLETED and row.text is not None for row in rows)
    finally:
        app.close()
        engine.dispose()


def test_after_a_broker_restart_the_sweep_resends_at_once_what_was_queued_before_it(task_settings: Settings,
                                                                                    tmp_path: Path) -> None:
    settings = dataclasses.replace(task_settings, chunk_size=2)
    factory = session_factory(make_engine(settings.database_url))
    sent: list[int] = []

    def send(chunk_id: int, queue: str) -> None:
        sent.append(chunk_id)

    _write_lines(tmp_path / "a.jsonl", 4)
    _write_lines(tmp_path / "b.jsonl", 2)
    submit_file(settings, factory, tmp_path / "a.jsonl", send_chunk=send)
    queued_before, sent[:] = list(sent), []
    restart = datetime.now(timezone.utc)  # Redis came back empty here
    submit_file(settings, factory, tmp_path / "b.jsonl", send_chunk=send)  # queued in the new Redis
    queued_after, sent[:] = list(sent), []
    assert len(queued_before) == 2 and len(queued_after) == 1

    assert resend_lost_chunks(factory, send) == [] == sent  # nothing is LOST_AFTER old yet
    assert resend_lost_chunks(factory, send, broker_started_at=restart) == queued_before == sent
    # Marked queued again after the restart: the next sweep leaves them alone.
    assert resend_lost_chunks(factory, send, broker_started_at=restart) == []


# -- expiry and sessions ------------------------------------------------------------------------------


def test_expire_jobs_task_expires_only_jobs_past_their_window(task_settings: Settings) -> None:
    factory = session_factory(make_engine(task_settings.database_url))
    past = datetime.now(timezone.utc) - timedelta(hours=2)
    with factory.begin() as session:
        due = create_job(session, input_file="a.jsonl", model="tiny", completion_window=timedelta(hours=1),
                         now=past).id
        fresh = create_job(session, input_file="b.jsonl", model="tiny", completion_window=timedelta(hours=24),
                           now=past).id
    assert maintenance.expire_jobs() == [due]
    with factory() as session:
        assert session.get(Job, due).status == JobStatus.EXPIRED
        assert session.get(Job, fresh).status == JobStatus.VALIDATING


def test_cleanup_removes_exactly_the_stale_sessions(sqlite_url: str) -> None:
    factory = session_factory(make_engine(sqlite_url))
    turn = [{"role": "user", "content": "hi"}]
    with factory.begin() as session:
        upsert_session(session, "old", turn, now=T0 - timedelta(days=8))
        upsert_session(session, "edge", turn, now=T0 - timedelta(days=7))  # exactly the limit: kept
        upsert_session(session, "recent", turn, now=T0 - timedelta(days=1))
        upsert_session(session, "revived", turn, now=T0 - timedelta(days=30))
        upsert_session(session, "revived", turn, now=T0 - timedelta(hours=1))
    assert cleanup_idle_sessions(factory, timedelta(days=7), now=T0) == 1
    with factory() as session:
        assert sorted(session.scalars(select(SessionRecord.session_id))) == ["edge", "recent", "revived"]


# -- backups ----------------------------------------------------------------------------------------


def _row_counts(url_or_connection) -> dict[str, int]:
    engine = make_engine(url_or_connection)
    try:
        with engine.connect() as connection:
            return {table: connection.execute(text(f'SELECT count(*) FROM "{table}"')).scalar_one()
                    for table in inspect(connection).get_table_names()}
    finally:
        engine.dispose()


def test_sqlite_backup_opens_with_the_same_rows(task_settings: Settings, tmp_path: Path) -> None:
    factory = session_factory(make_engine(task_settings.database_url))
    _write_lines(tmp_path / "in.jsonl", 7)
    (tmp_path / "in.jsonl").write_text((tmp_path / "in.jsonl").read_text() + "not json\n")
    submit_file(task_settings, factory, tmp_path / "in.jsonl", send_chunk=lambda c, q: None)
    path = Path(maintenance.backup_database())
    assert path.parent == task_settings.backups_dir and path.name.startswith("pipeline-")
    assert path.name.endswith(".sqlite3.gz") and list(task_settings.backups_dir.iterdir()) == [path]
    unpacked = tmp_path / "unpacked.sqlite3"
    unpacked.write_bytes(gzip.decompress(path.read_bytes()))
    with sqlite3.connect(unpacked) as copy:
        assert copy.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    counts = _row_counts(task_settings.database_url)
    assert counts["requests"] == 7 and counts["error_history"] == 1 and counts["jobs"] == 1
    assert _row_counts(f"sqlite:///{unpacked}") == counts


def test_postgres_backup_is_a_pg_dump_archive(pg_url: str, tmp_path: Path) -> None:
    upgrade(pg_url)
    path = backup_database(pg_url, tmp_path / "backups", now=T0)
    assert path.name == "pipeline-20260105T120000Z.dump"
    assert path.read_bytes()[:5] == b"PGDMP"  # pg_dump's custom format


def test_backup_without_pg_dump_is_a_clear_error_in_the_history(task_settings: Settings, pg_url: str,
                                                                 monkeypatch) -> None:
    with pytest.raises(BackupError, match="pg_dump is not on PATH"):
        monkeypatch.setenv("PATH", "")
        backup_database(pg_url, task_settings.backups_dir)
    # Through the task: logged and recorded, not raised.
    upgrade(pg_url)
    monkeypatch.setattr(maintenance, "worker_settings", lambda: Settings(
        database_url=pg_url, broker_url=BROKER_URL, redis_key_prefix=task_settings.redis_key_prefix,
        backups_dir=task_settings.backups_dir))
    assert maintenance.backup_database() is None
    with session_factory(make_engine(pg_url))() as session:
        rows = session.execute(select(ErrorEvent.kind, ErrorEvent.message)).all()
    assert [(kind, message.split(";")[0]) for kind, message in rows] == [
        ("backup", "database backup failed: pg_dump is not on PATH")]


# -- the beat lock ----------------------------------------------------------------------------------


def _concurrently(n: int, call) -> list:
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        results[i] = call()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_the_lock_runs_a_slot_once_and_the_next_slot_again(task_settings: Settings, redis_client) -> None:
    task = "jobs.maintenance.sweep_lost_chunks"
    assert slot_seconds(task_settings, task) == 600
    assert slot_seconds(task_settings, "jobs.maintenance.backup_database") == 60
    assert slot_seconds(Settings(sweep_interval="45s"), task) == 45
    ran: list[int] = []

    def work() -> str:
        ran.append(1)
        time.sleep(0.2)  # still running when the other copy arrives
        return "done"

    now = T0 + timedelta(minutes=3)  # slot [12:00, 12:10)
    assert sorted(_concurrently(2, lambda: run_once(task_settings, task, work, now=now)), key=lambda r: r is None) == ["done", None]
    assert ran == [1]
    assert run_once(task_settings, task, work, now=T0 + timedelta(minutes=9, seconds=59)) is None  # same slot
    key = lock_key(task_settings.redis_key_prefix, task, int(T0.timestamp()) // 600)
    assert redis_client.exists(key) == 1
    assert run_once(task_settings, task, work, now=T0 + timedelta(minutes=10)) == "done"  # the next slot
    assert ran == [1, 1]


def test_two_beats_sending_the_same_task_run_it_once(task_settings: Settings) -> None:
    factory = session_factory(make_engine(task_settings.database_url))
    with factory.begin() as session:
        upsert_session(session, "stale", [{"role": "user", "content": "hi"}],
                       now=datetime.now(timezone.utc) - timedelta(days=30))
    results = _concurrently(2, maintenance.cleanup_sessions)
    assert sorted(results, key=lambda r: r is None) == [1, None]  # one copy deleted the session, the other did nothing


# -- nightly runs -----------------------------------------------------------------------------------


def test_a_nightly_run_is_submitted_once_per_day(task_settings: Settings, tmp_path: Path) -> None:
    ids = _write_lines(tmp_path / "nightly.jsonl", 3)
    factory = session_factory(make_engine(task_settings.database_url))
    sent: list[tuple[int, str]] = []
    day = datetime(2026, 3, 1).date()

    def submit(on: object) -> dict:
        return maintenance.submit_nightly_run(task_settings, factory, lambda chunk, queue: sent.append((chunk, queue)),
                                              name="evals", input_path=str(tmp_path / "nightly.jsonl"),
                                              priority="low", day=on)

    first = submit(day)
    again = submit(day)  # a second beat, or the task redelivered
    next_day = submit(day + timedelta(days=1))
    assert again["id"] == first["id"] != next_day["id"]
    assert first["request_counts"]["total"] == len(ids)
    assert {queue for _, queue in sent} == {"low"}
    assert len(sent) == len({chunk for chunk, _ in sent}) >= 2  # two jobs' chunks, each sent exactly once
    with factory() as session:
        assert session.scalar(select(Job.idempotency_key).where(Job.id == first["id"])) == "nightly:evals:2026-03-01"


def test_a_nightly_run_whose_file_is_missing_is_recorded_not_raised(task_settings: Settings, tmp_path: Path,
                                                                   monkeypatch) -> None:
    app = make_celery(task_settings)
    monkeypatch.setattr(maintenance, "worker_sessions", lambda url: session_factory(make_engine(url)))
    result = maintenance.start_nightly_run.run("evals", str(tmp_path / "gone.jsonl"), "low")
    assert result is None
    with session_factory(make_engine(task_settings.database_url))() as session:
        event = session.scalars(select(ErrorEvent)).one()
    assert event.kind == "nightly_run"
    assert event.message.startswith("nightly run 'evals' was not submitted: ") and "gone.jsonl" in event.message
    app.close()
