"""The job side as a user runs it, on real services: PostgreSQL (a fresh database), Redis (a key
prefix of our own) and a `pipeline worker` process. `pipeline db upgrade`, `submit` (JSONL and
Parquet), `status --json` until completed, `results`: every line accounted for exactly once, and
the same completions as `pipeline run` on the same file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from jobs.worker_process import delete_prefixed_keys, stop_process

REPO_ROOT = Path(__file__).resolve().parents[2]
BROKER_URL = os.environ.get("PIPELINE_BROKER_URL", "redis://127.0.0.1:6379/0")
JOB_TIMEOUT_S = 120

JSONL_LINES = [
    {"custom_id": "cmpl", "method": "POST", "url": "/v1/completions",
     "body": {"model": "tiny", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}},
    {"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "temperature": 0}},
    {"custom_id": "seeded", "text": "Once upon a time", "max_tokens": 6, "temperature": 0.8, "seed": 7},
    "[1, 2]",  # line 4: not an object
    {"custom_id": "s2", "text": "Summarise: caches", "max_length": 5, "temperature": 0},
]
GOOD_JSONL_IDS = ["cmpl", "chat", "seeded", "s2"]


def _env(**pipeline_vars: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    env.update(PYTHONPATH=str(REPO_ROOT), **pipeline_vars)
    return env


def _pipeline(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, f"pipeline {' '.join(args)}:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return result


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _completions(lines: list[dict]) -> dict[str, tuple]:
    """custom_id -> (text, prompt tokens, completion tokens, finish reason); cached tokens and ids
    legitimately differ between a warm worker and a fresh process."""
    out = {}
    for line in lines:
        body = line["response"]["body"]
        choice = body["choices"][0]
        text = choice["message"]["content"] if body["object"] == "chat.completion" else choice["text"]
        out[line["custom_id"]] = (text, body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"],
                                  choice["finish_reason"])
    return out


@pytest.fixture
def services(pg_url: str, tmp_path: Path, redis_client):
    """(env for CLI processes, the worker process): Redis keys under the prefix deleted after."""
    prefix = f"pipeline-test-{uuid.uuid4().hex[:12]}:"
    env = _env(PIPELINE_DATABASE_URL=pg_url, PIPELINE_BROKER_URL=BROKER_URL, PIPELINE_REDIS_KEY_PREFIX=prefix)
    _pipeline(env, tmp_path, "db", "upgrade")
    log_path = tmp_path / "worker.log"
    log = log_path.open("w")
    worker = subprocess.Popen([sys.executable, "-m", "pipeline", "worker", "--concurrency", "2"],
                              cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield env, worker, log_path
    finally:
        stop_process(worker)
        log.close()
        delete_prefixed_keys(redis_client, prefix)
        assert list(redis_client.scan_iter(match=f"{prefix}*")) == []


def _wait_completed(env: dict[str, str], cwd: Path, job_id: str, worker: subprocess.Popen, log: Path) -> dict:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        status = json.loads(_pipeline(env, cwd, "status", job_id, "--json").stdout)
        if status["status"] == "completed":
            return status
        assert status["status"] == "in_progress", status
        if worker.poll() is not None:
            pytest.fail(f"the worker exited with {worker.returncode}:\n{log.read_text()}")
        time.sleep(0.3)
    pytest.fail(f"job {job_id} not completed after {JOB_TIMEOUT_S} s:\n{log.read_text()}")


def test_submit_worker_status_results_on_real_services(services, tmp_path: Path) -> None:
    env, worker, log = services
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in JSONL_LINES))
    parquet = tmp_path / "in.parquet"
    pq.write_table(pa.table({"custom_id": ["p1", "p2", "p3"], "text": ["alpha", "beta", "gamma"],
                             "max_tokens": [4, 5, 6], "temperature": [0.0, 0.0, 0.0]}), parquet)

    job_a = json.loads(_pipeline(env, tmp_path, "submit", str(jsonl), "--priority", "high", "--json").stdout)
    job_b_id = _pipeline(env, tmp_path, "submit", str(parquet), "--idempotency-key", "k1").stdout.strip()
    again = json.loads(_pipeline(env, tmp_path, "submit", str(parquet), "--idempotency-key", "k1", "--json").stdout)
    assert again["id"] == job_b_id  # the same job, not submitted twice
    assert job_a["priority"] == "high" and job_a["request_counts"] == {"total": 5, "completed": 0, "failed": 1}

    status_a = _wait_completed(env, tmp_path, job_a["id"], worker, log)
    assert status_a["request_counts"] == {"total": 5, "completed": 4, "failed": 1}
    assert status_a["in_progress_at"] <= status_a["finalizing_at"] <= status_a["completed_at"]
    status_b = _wait_completed(env, tmp_path, job_b_id, worker, log)
    assert status_b["request_counts"] == {"total": 3, "completed": 3, "failed": 0}

    _pipeline(env, tmp_path, "results", job_a["id"], "-o", "a.jsonl", "--errors", "a_err.jsonl", "--ordered")
    out_a, err_a = _read_jsonl(tmp_path / "a.jsonl"), _read_jsonl(tmp_path / "a_err.jsonl")
    assert [x["custom_id"] for x in out_a] == GOOD_JSONL_IDS
    assert [(e["line"], e["error"]["code"]) for e in err_a] == [(4, "not_an_object")]
    _pipeline(env, tmp_path, "results", job_b_id, "-o", "b.parquet", "--errors", "b_err.jsonl")
    table = pq.read_table(tmp_path / "b.parquet").to_pydict()
    assert table["custom_id"] == ["p1", "p2", "p3"] and all(table["text"])
    assert (tmp_path / "b_err.jsonl").read_text() == ""

    # The same file in one process (its own SQLite): the same completions, line for line.
    embedded = _env(PIPELINE_DATABASE_URL=f"sqlite:///{tmp_path / 'embedded.sqlite3'}")
    _pipeline(embedded, tmp_path, "run", str(jsonl), "-o", "run.jsonl", "--errors", "run_err.jsonl")
    assert _completions(_read_jsonl(tmp_path / "run.jsonl")) == _completions(out_a)
    assert [(e["line"], e["error"]) for e in _read_jsonl(tmp_path / "run_err.jsonl")] == [
        (e["line"], e["error"]) for e in err_a]
    assert worker.poll() is None


def test_status_of_an_unknown_job_is_one_error_line(services, tmp_path: Path) -> None:
    env, _, _ = services
    result = subprocess.run([sys.executable, "-m", "pipeline", "status", "batch_nope"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and "batch_nope" in result.stderr and "Traceback" not in result.stderr
