"""When a job ends: a nightly run's results land in `results_dir`, and the webhook gets a JSON
summary (retried, with a timeout, never fatal), against a real HTTP server on the loopback."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from db.migrate import upgrade
from db.session import make_engine, session_factory
from jobs.engine_host import get_engine_loop
from jobs.execution import execute_chunk
from jobs.finalize import finish_job
from pipeline.settings import Settings
from pipeline.submit import submit_file
from pipeline.webhook import post_json

TOKEN = "s3cr3t-t0ken"


class Hook:
    """A webhook receiver: answers each POST with the next of `statuses` (then 200), after `delay_s`."""

    def __init__(self, statuses: list[int] | None = None, delay_s: float = 0.0) -> None:
        self.received: list[dict] = []
        self.statuses = list(statuses or [])
        self.delay_s = delay_s
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.received.append({"path": self.path, "type": self.headers["Content-Type"],
                                      "json": json.loads(body)})
                time.sleep(hook.delay_s)
                self.send_response(hook.statuses.pop(0) if hook.statuses else 200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/{TOKEN}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook() -> Iterator[Hook]:
    h = Hook()
    yield h
    h.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_job(settings: Settings, tmp_path: Path, key: str | None) -> str:
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"custom_id": "a", "text": "hello", "max_tokens": 4, "temperature": 0}) + "\n"
                      + '{"custom_id": "b"}\n')
    factory = session_factory(make_engine(settings.database_url))
    sent: list[int] = []
    summary = submit_file(settings, factory, source, idempotency_key=key,
                          send_chunk=lambda chunk_id, queue: sent.append(chunk_id))
    ended: list[str] = []
    for chunk in sent:
        execute_chunk(factory, get_engine_loop(settings), chunk, "w", on_job_ended=ended.append)
    assert ended == [summary["id"]]  # called once, by the chunk that completed the job
    return summary["id"]


def _settings(tmp_path: Path, **overrides) -> Settings:
    url = f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
    upgrade(url)
    return Settings(database_url=url, results_dir=tmp_path / "results", **overrides)


def test_a_nightly_run_is_exported_and_reported(tmp_path: Path, hook: Hook) -> None:
    settings = _settings(tmp_path, webhook_url=hook.url)
    job_id = _run_job(settings, tmp_path, "nightly:evals:2026-12-06")
    payload = finish_job(settings, session_factory(make_engine(settings.database_url)), job_id)

    results, errors = settings.results_dir / f"{job_id}.jsonl", settings.results_dir / f"{job_id}.errors.jsonl"
    assert [json.loads(line)["custom_id"] for line in results.read_text().splitlines()] == ["a"]
    assert [json.loads(line)["custom_id"] for line in errors.read_text().splitlines()] == ["b"]
    assert settings.results_dir.stat().st_mode & 0o777 == 0o700
    [received] = hook.received
    assert received["path"] == f"/hooks/{TOKEN}" and received["type"] == "application/json"
    body = received["json"]
    assert body == payload
    assert body["event"] == "job.completed" and body["nightly_run"] == "evals"
    assert body["job"]["id"] == job_id and body["job"]["request_counts"] == {"total": 2, "completed": 1, "failed": 1}
    assert body["files"] == {"results": str(results), "errors": str(errors)}
    assert "amount" in body["job"]["cost"] and body["job"]["stats"]["completed"] == 1


def test_other_jobs_are_reported_but_not_exported(tmp_path: Path, hook: Hook) -> None:
    settings = _settings(tmp_path, webhook_url=hook.url)
    job_id = _run_job(settings, tmp_path, None)
    finish_job(settings, session_factory(make_engine(settings.database_url)), job_id)
    assert [r["json"]["job"]["id"] for r in hook.received] == [job_id]
    assert hook.received[0]["json"]["files"] is None and not settings.results_dir.exists()


def test_a_dead_webhook_is_logged_without_its_token_and_changes_nothing(tmp_path: Path, caplog) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/hooks/{TOKEN}"
    settings = _settings(tmp_path, webhook_url=url, webhook_retries=1, webhook_timeout_s=2)
    job_id = _run_job(settings, tmp_path, "nightly:evals:2026-12-07")
    with caplog.at_level(logging.WARNING):
        payload = finish_job(settings, session_factory(make_engine(settings.database_url)), job_id)
    assert payload is not None and (settings.results_dir / f"{job_id}.jsonl").exists()
    messages = [r.getMessage() for r in caplog.records if r.name == "pipeline.webhook"]
    assert len(messages) == 3 and "gave up after 2 tries" in messages[-1]  # two tries, then the verdict
    assert all("127.0.0.1" in m and TOKEN not in m for m in messages)


def test_post_json_retries_and_times_out(caplog) -> None:
    flaky = Hook(statuses=[500, 503])
    slow = Hook(delay_s=2.0)
    try:
        assert post_json(flaky.url, {"n": 1}, timeout_s=5, retries=2, backoff_s=0.01)
        assert [r["json"] for r in flaky.received] == [{"n": 1}] * 3
        with caplog.at_level(logging.WARNING):
            assert not post_json(slow.url, {"n": 3}, timeout_s=0.2, retries=1, backoff_s=0.01)
        assert len(slow.received) == 2  # each try reached it, and each timed out
        assert any("timed out" in r.getMessage() for r in caplog.records)
    finally:
        flaky.close()
        slow.close()
