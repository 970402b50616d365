"""Job control as a user runs it: `pipeline cancel | retry | list`, `status --watch`,
`submit --completion-window` and expiry. Real PostgreSQL (a fresh database per test), Redis under a
key prefix of our own and, where lines must run, a real `pipeline worker` process."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from db.enums import RequestStatus
from db.migrate import upgrade
from db.models import Chunk, Job, Request
from db.repository import expire_jobs, get_job, job_errors
from db.session import make_engine, session_factory
from pipeline.settings import duration_s, load_settings
from pipeline.submit import submit_file
from jobs.worker_process import delete_prefixed_keys, stop_process

from support.processes import BROKER_URL, cli, cli_ok, key_prefix, pipeline_env, settings_vars, wait_until, worker

JOB_TIMEOUT_S = 300  # a guard against a hang, generous for a loaded machine
TOO_LONG = "a" * 5000  # byte tokens: longer than the tiny model's 4096-token context


def _write_jsonl(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _status(env: dict[str, str], cwd: Path, job_id: str) -> dict:
    return json.loads(cli_ok(env, cwd, "status", job_id, "--json").stdout)


@pytest.fixture
def env(pg_url: str, tmp_path: Path, redis_client):
    """Env for CLI processes on a fresh, migrated database and a Redis key prefix (deleted after)."""
    prefix = key_prefix()
    upgrade(pg_url)
    yield pipeline_env(PIPELINE_DATABASE_URL=pg_url, PIPELINE_BROKER_URL=BROKER_URL, PIPELINE_REDIS_KEY_PREFIX=prefix,
                       PIPELINE_CHUNK_SIZE="4")
    delete_prefixed_keys(redis_client, prefix)


@pytest.fixture
def worker_log(env: dict[str, str], tmp_path: Path):
    """(a running worker, its log)."""
    log = tmp_path / "worker.log"
    with worker(env, tmp_path, log, "--concurrency", "2") as process:
        yield process, log


def _wait_until(env: dict[str, str], cwd: Path, job_id: str, worker_log, done) -> dict:
    process, log = worker_log

    def reached() -> dict | None:
        status = _status(env, cwd, job_id)
        return status if done(status) else None

    return wait_until(reached, f"job {job_id} at the expected point", log, process=process)


def _factory(env: dict[str, str]):
    return session_factory(make_engine(env["PIPELINE_DATABASE_URL"]))


@pytest.mark.workers
def test_cancel_while_a_worker_is_busy_keeps_finished_results(env, worker_log, tmp_path: Path) -> None:
    # Enough lines that the worker cannot finish them between the status poll and the cancel (each
    # a CLI call of about a second): a job completed first cannot be cancelled.
    total = 600
    ids = [f"r{i}" for i in range(total)]
    path = _write_jsonl(tmp_path / "in.jsonl", [
        {"custom_id": c, "text": f"Story {i}: once upon a time", "max_tokens": 48, "temperature": 0}
        for i, c in enumerate(ids)])
    job_id = cli_ok(env, tmp_path, "submit", str(path)).stdout.strip()
    _wait_until(env, tmp_path, job_id, worker_log, lambda s: s["request_counts"]["completed"] >= 4)

    cancelled = cli_ok(env, tmp_path, "cancel", job_id, "--json")
    at_cancel = json.loads(cancelled.stdout)
    assert at_cancel["status"] == "cancelled"
    completed = at_cancel["request_counts"]["completed"]
    assert 4 <= completed < total
    assert cancelled.stderr.strip() == f"{total - completed} lines cancelled"
    time.sleep(3)  # a chunk still running on the worker ends, and must write nothing
    # The cancelled lines count as failed, as OpenAI counts them.
    assert _status(env, tmp_path, job_id)["request_counts"] == {"total": total, "completed": completed,
                                                                "failed": total - completed}

    cli_ok(env, tmp_path, "results", job_id, "-o", "out.jsonl", "--errors", "err.jsonl")
    out, err = _read_jsonl(tmp_path / "out.jsonl"), _read_jsonl(tmp_path / "err.jsonl")
    assert len(out) == completed and len(err) == total - completed
    assert all(line["response"]["status_code"] == 200 for line in out)
    assert {e["error"]["code"] for e in err} == {"batch_cancelled"}
    assert sorted([x["custom_id"] for x in out] + [e["custom_id"] for e in err]) == sorted(ids)
    # Cancelling twice touches nothing; the CLI says so without an error.
    again = cli_ok(env, tmp_path, "cancel", job_id)
    assert again.stderr.strip() == "0 lines cancelled"
    assert again.stdout.split()[:2] == [job_id, "cancelled"]


@pytest.mark.workers
def test_retry_runs_only_the_failed_lines_again(env, worker_log, tmp_path: Path) -> None:
    lines = [{"custom_id": f"ok{i}", "text": f"Hello {i}", "max_tokens": 4, "temperature": 0} for i in range(4)]
    lines[1:1] = [{"custom_id": "long1", "text": TOO_LONG, "max_tokens": 4}]
    lines.append({"custom_id": "long2", "text": TOO_LONG + "b", "max_tokens": 4})
    job_id = cli_ok(env, tmp_path, "submit", str(_write_jsonl(tmp_path / "in.jsonl", lines))).stdout.strip()
    first = _wait_until(env, tmp_path, job_id, worker_log, lambda s: s["status"] == "completed")
    assert first["request_counts"] == {"total": 6, "completed": 4, "failed": 2}
    factory = _factory(env)
    with factory() as session:
        before = {r.custom_id: (r.status, r.completed_at, r.chunk_id) for r in
                  session.scalars(select(Request).where(Request.job_id == job_id))}
        num_chunks = len(session.scalars(select(Chunk).where(Chunk.job_id == job_id)).all())

    retried = cli_ok(env, tmp_path, "retry", job_id, "--json")
    assert retried.stderr.strip() == "2 failed lines sent again"
    assert json.loads(retried.stdout)["request_counts"] == {"total": 6, "completed": 4, "failed": 0}
    second = _wait_until(env, tmp_path, job_id, worker_log, lambda s: s["status"] == "completed")
    assert second["request_counts"] == {"total": 6, "completed": 4, "failed": 2}

    with factory() as session:
        after = {r.custom_id: (r.status, r.completed_at, r.chunk_id) for r in
                 session.scalars(select(Request).where(Request.job_id == job_id))}
        new_chunks = session.scalars(select(Chunk).where(Chunk.job_id == job_id, Chunk.seq >= num_chunks)).all()
        engine_errors = [e.custom_id for e in job_errors(session, job_id, kind="engine")]
    for custom_id in ("ok0", "ok1", "ok2", "ok3"):
        assert after[custom_id] == before[custom_id]  # not run again
    for custom_id in ("long1", "long2"):
        assert after[custom_id][0] == RequestStatus.FAILED
        assert after[custom_id][2] in {c.id for c in new_chunks}  # run again, in a new chunk
    assert sum(c.num_requests for c in new_chunks) == 2
    assert sorted(engine_errors) == ["long1", "long1", "long2", "long2"]  # each failed once per run
    cli_ok(env, tmp_path, "results", job_id, "-o", "out.jsonl", "--errors", "err.jsonl")
    assert [e["custom_id"] for e in _read_jsonl(tmp_path / "err.jsonl")] == ["long1", "long2"]
    # Lines that ran and failed are OpenAI's failed requests: a 400 response with an error body.
    assert {(e["response"]["status_code"], e["response"]["body"]["error"]["code"])
            for e in _read_jsonl(tmp_path / "err.jsonl")} == {(400, "prompt_too_long")}
    assert len(_read_jsonl(tmp_path / "out.jsonl")) == 4


def _submit_here(env: dict[str, str], path: Path, window: timedelta | None = None) -> str:
    """Submit in this process with no broker: the chunks are not sent (no worker runs here)."""
    settings = load_settings(env=settings_vars(env))
    return submit_file(settings, _factory(env), path, completion_window=window,
                       send_chunk=lambda _chunk_id, _queue: None)["id"]


def test_list_filters_by_status(env, tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "in.jsonl", [{"text": "hi", "max_tokens": 2}])
    first, second, third = (_submit_here(env, path) for _ in range(3))
    cli_ok(env, tmp_path, "cancel", second)

    listed = json.loads(cli_ok(env, tmp_path, "list", "--json").stdout)
    assert [job["id"] for job in listed] == [third, second, first]  # newest first
    assert [job["id"] for job in json.loads(cli_ok(env, tmp_path, "list", "--status", "in_progress", "--json").stdout)
            ] == [third, first]
    text = cli_ok(env, tmp_path, "list", "--status", "cancelled").stdout.splitlines()
    assert text == [f"{second}  cancelled  0 completed, 1 failed, 1 lines"]
    assert cli_ok(env, tmp_path, "list", "--status", "completed").stdout == ""
    bad = cli(env, tmp_path, "list", "--status", "done")
    assert bad.returncode == 1 and bad.stderr.startswith("error: unknown status 'done'")


def test_completion_window_parsing() -> None:
    assert [duration_s(x) for x in ("90s", "30m", "24h", "7d")] == [90, 1800, 86400, 604800]
    for bad in ("24", "0h", "1.5h", "h", "24 h", "3w", "-1d"):
        with pytest.raises(ValueError, match="expected a duration"):
            duration_s(bad)


def test_submit_refuses_a_bad_completion_window(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "in.jsonl", [{"text": "hi"}])
    result = cli(pipeline_env(), tmp_path, "submit", str(path), "--completion-window", "3w")
    assert result.returncode == 1
    assert result.stderr == "error: '3w': expected a duration such as '24h', '90m', '7d' or '30s'\n"


def test_expired_job_shows_in_status_and_its_lines_in_the_errors(env, tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "in.jsonl", [{"custom_id": "a", "text": "hi"}, {"custom_id": "b"},
                                                 {"custom_id": "c", "text": "there"}])
    job_id = _submit_here(env, path, window=timedelta(hours=1))
    factory = _factory(env)
    with factory.begin() as session:
        job = get_job(session, job_id)
        assert job.expires_at - job.created_at == timedelta(hours=1)
        created = job.created_at
        assert expire_jobs(session, now=created + timedelta(minutes=59)) == []
        assert expire_jobs(session, now=created + timedelta(hours=1)) == [job_id]

    status = cli_ok(env, tmp_path, "status", job_id)
    assert status.stdout == (f"{job_id}  expired  0 completed, 3 failed, 3 lines\n"  # and its usage: none ran
                             "usage: 0 prompt tokens (0.0% hit rate), 0 completion tokens; 0.00 s compute; cost 0 USD; "
                             "0.00 lines/s\n")
    watched = cli_ok(env, tmp_path, "status", job_id, "--watch")  # an ended job: returns at once
    assert watched.stdout == status.stdout and "3 lines  expired" in watched.stderr
    assert cli_ok(env, tmp_path, "status", job_id, "--watch", "--quiet").stderr == ""
    cli_ok(env, tmp_path, "results", job_id, "-o", "out.jsonl", "--errors", "err.jsonl")
    assert (tmp_path / "out.jsonl").read_text() == ""
    errors = [(e["custom_id"], e["line"], e["error"]["code"]) for e in _read_jsonl(tmp_path / "err.jsonl")]
    assert errors == [("a", 1, "batch_expired"), ("b", 2, "missing_field"), ("c", 3, "batch_expired")]
    refused = cli(env, tmp_path, "retry", job_id)
    assert refused.returncode == 1 and refused.stderr == f"error: job {job_id}: cannot retry a job that is expired\n"


@pytest.mark.workers
def test_submit_stores_the_completion_window_and_waits_with_progress(env, worker_log, tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "in.jsonl", [{"text": f"Hi {i}", "max_tokens": 3} for i in range(6)])
    result = cli_ok(env, tmp_path, "submit", str(path), "--completion-window", "90s", "--wait", "--json")
    job = json.loads(result.stdout)
    assert job["status"] == "completed" and job["request_counts"] == {"total": 6, "completed": 6, "failed": 0}
    # Not a terminal: the lines read, then the job's last progress line (redrawing is for terminals,
    # tests/pipeline/test_progress.py).
    assert result.stderr.splitlines() == ["reading in.jsonl: 6 lines",
                                          f"{job['id']}: [{'#' * 30}] 6/6 lines  completed"], result.stderr
    with _factory(env)() as session:
        stored = get_job(session, job["id"])
        assert stored.expires_at - stored.created_at == timedelta(seconds=90)
    quiet = cli_ok(env, tmp_path, "submit", str(path), "--wait", "--quiet")
    assert quiet.stderr == "completed: 6 completed, 0 failed, 6 lines\n"  # the outcome, no progress


def test_an_idempotency_key_returns_its_job_only_for_the_same_file(env, tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "in.jsonl", [{"text": "hi", "max_tokens": 2}])
    first = cli_ok(env, tmp_path, "submit", str(path), "--idempotency-key", "k1").stdout.strip()
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(path.read_bytes())
    assert cli_ok(env, tmp_path, "submit", str(copy), "--idempotency-key", "k1").stdout.strip() == first
    _write_jsonl(path, [{"text": "another prompt", "max_tokens": 2}])  # the same name, another file
    refused = cli(env, tmp_path, "submit", str(path), "--idempotency-key", "k1")
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr == (
        f"error: idempotency key 'k1' was used for job {first} with another file ({path.resolve()}); submit this "
        f"file with a new key (or none), or see the first job with `pipeline status {first}`\n")
    with _factory(env)() as session:
        assert [job.id for job in session.scalars(select(Job))] == [first]
    assert cli_ok(env, tmp_path, "submit", str(path), "--idempotency-key", "k2").stdout.strip() != first


@pytest.mark.workers
def test_submit_wait_with_no_worker_says_so_once_and_keeps_waiting(env, tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "in.jsonl", [{"text": f"Hi {i}", "max_tokens": 2} for i in range(2)])
    env = env | {"PIPELINE_NO_WORKER_NOTICE_AFTER": "1s"}
    submit = subprocess.Popen([sys.executable, "-m", "pipeline", "submit", str(path), "--wait"], cwd=tmp_path,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    guard = threading.Timer(JOB_TIMEOUT_S, submit.kill)  # a guard against a hang, not a measurement
    guard.start()
    seen: list[str] = []
    worker = None
    try:
        for line in submit.stderr:  # no worker yet: the job waits at 0/2 until the notice comes
            seen.append(line)
            if "no worker has taken" in line:
                break
        assert seen and "no worker has taken" in seen[-1], "".join(seen)
        # The wait goes on: once a worker comes, the job finishes and submit exits 0.
        worker = subprocess.Popen([sys.executable, "-m", "pipeline", "worker", "--concurrency", "1"], cwd=tmp_path,
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        stdout, rest = submit.communicate()
    finally:
        guard.cancel()
        submit.kill()
        if worker is not None:
            stop_process(worker)
    job_id = stdout.strip()
    assert submit.returncode == 0, "".join(seen) + rest
    assert seen[-1] == (
        f"{job_id}: no worker has taken this job in 1s; is a worker running against this database and broker, "
        f"serving the 'normal' queue (or busy with earlier jobs)? Check with `pipeline status {job_id}`, Flower, "
        "or `celery -A pipeline.celery_app inspect active_queues`; start one with `pipeline worker`. Still "
        "waiting (Ctrl-C stops waiting, not the job).\n")
    assert "no worker has taken" not in rest  # once
    assert rest.splitlines()[-1] == "completed: 2 completed, 0 failed, 2 lines"
