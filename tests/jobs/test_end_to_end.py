"""The job side as a user runs it, on real services: PostgreSQL (a fresh database), Redis (a key
prefix of our own) and a `pipeline worker` process. `pipeline db upgrade`, `submit` (JSONL and
Parquet), `status --json` until completed, `results`: every line accounted for exactly once, and
the same completions as `pipeline run` on the same file."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.worker_process import delete_prefixed_keys

from support.processes import BROKER_URL, cli, cli_ok, key_prefix, pipeline_env, wait_until, worker

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
    prefix = key_prefix()
    env = pipeline_env(PIPELINE_DATABASE_URL=pg_url, PIPELINE_BROKER_URL=BROKER_URL, PIPELINE_REDIS_KEY_PREFIX=prefix)
    cli_ok(env, tmp_path, "db", "upgrade")
    log = tmp_path / "worker.log"
    try:
        with worker(env, tmp_path, log, "--concurrency", "2") as process:
            yield env, process, log
    finally:
        delete_prefixed_keys(redis_client, prefix)
        assert list(redis_client.scan_iter(match=f"{prefix}*")) == []


def _wait_completed(env: dict[str, str], cwd: Path, job_id: str, worker: subprocess.Popen, log: Path) -> dict:
    def completed() -> dict | None:
        status = json.loads(cli_ok(env, cwd, "status", job_id, "--json").stdout)
        assert status["status"] in ("in_progress", "completed"), status
        return status if status["status"] == "completed" else None

    return wait_until(completed, f"job {job_id} completed", log, process=worker)


@pytest.mark.workers
def test_submit_worker_status_results_on_real_services(services, tmp_path: Path) -> None:
    env, worker, log = services
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in JSONL_LINES))
    parquet = tmp_path / "in.parquet"
    pq.write_table(pa.table({"custom_id": ["p1", "p2", "p3"], "text": ["alpha", "beta", "gamma"],
                             "max_tokens": [4, 5, 6], "temperature": [0.0, 0.0, 0.0]}), parquet)

    job_a = json.loads(cli_ok(env, tmp_path, "submit", str(jsonl), "--priority", "high", "--json").stdout)
    job_b_id = cli_ok(env, tmp_path, "submit", str(parquet), "--idempotency-key", "k1").stdout.strip()
    again = json.loads(cli_ok(env, tmp_path, "submit", str(parquet), "--idempotency-key", "k1", "--json").stdout)
    assert again["id"] == job_b_id  # the same job, not submitted twice
    assert job_a["priority"] == "high" and job_a["request_counts"] == {"total": 5, "completed": 0, "failed": 1}

    status_a = _wait_completed(env, tmp_path, job_a["id"], worker, log)
    assert status_a["request_counts"] == {"total": 5, "completed": 4, "failed": 1}
    assert status_a["in_progress_at"] <= status_a["finalizing_at"] <= status_a["completed_at"]
    status_b = _wait_completed(env, tmp_path, job_b_id, worker, log)
    assert status_b["request_counts"] == {"total": 3, "completed": 3, "failed": 0}

    cli_ok(env, tmp_path, "results", job_a["id"], "-o", "a.jsonl", "--errors", "a_err.jsonl", "--ordered")
    out_a, err_a = _read_jsonl(tmp_path / "a.jsonl"), _read_jsonl(tmp_path / "a_err.jsonl")
    assert [x["custom_id"] for x in out_a] == GOOD_JSONL_IDS
    assert [(e["line"], e["error"]["code"]) for e in err_a] == [(4, "not_an_object")]
    cli_ok(env, tmp_path, "results", job_b_id, "-o", "b.parquet", "--errors", "b_err.jsonl")
    table = pq.read_table(tmp_path / "b.parquet").to_pydict()
    assert table["custom_id"] == ["p1", "p2", "p3"] and all(table["text"])
    assert (tmp_path / "b_err.jsonl").read_text() == ""

    # The same file in one process (its own SQLite): the same completions, line for line.
    embedded = pipeline_env(PIPELINE_DATABASE_URL=f"sqlite:///{tmp_path / 'embedded.sqlite3'}")
    cli_ok(embedded, tmp_path, "run", str(jsonl), "-o", "run.jsonl", "--errors", "run_err.jsonl")
    assert _completions(_read_jsonl(tmp_path / "run.jsonl")) == _completions(out_a)
    assert [(e["line"], e["error"]) for e in _read_jsonl(tmp_path / "run_err.jsonl")] == [
        (e["line"], e["error"]) for e in err_a]
    assert worker.poll() is None


@pytest.mark.workers
def test_status_of_an_unknown_job_is_one_error_line(services, tmp_path: Path) -> None:
    env, _, _ = services
    result = cli(env, tmp_path, "status", "batch_nope")
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and "batch_nope" in result.stderr and "Traceback" not in result.stderr
