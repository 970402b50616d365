"""The operations surface on real services: a `pipeline worker` and `pipeline beat` against a fresh
PostgreSQL database and Redis under a key prefix of the test's own. The worker's Prometheus endpoint
and beat's are scraped over HTTP and parsed with prometheus_client's own parser; `stats`, `health`,
`usage`, `errors` and `status` run as a user runs them."""

from __future__ import annotations

import json
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from db.models import Request
from db.records import JobUsage
from jobs.worker_process import delete_prefixed_keys
from pipeline.celery_app import make_celery
from pipeline.queue_depth import queue_depths
from pipeline.settings import load_settings

from support.processes import (
    BROKER_URL, PIPELINE, background, cli, cli_ok, key_prefix, pipeline_env, settings_vars, wait_until, worker,
)

LINES = [{"custom_id": f"c{i}", "text": f"Prompt {i}: tell me about caches " * (1 + i % 3), "max_tokens": 5 + i,
          "temperature": 0.8, "seed": i} for i in range(6)]
BAD_LINE = '{"custom_id": "bad", "max_tokens": 3}'  # no prompt: rejected at submit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[str, dict]:
    """Metric family name -> {sample name + sorted labels: value}, as prometheus_client parses it."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    families: dict[str, dict] = {}
    for family in text_string_to_metric_families(text):
        families[family.name] = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}
    return families


@dataclass
class Deployment:
    env: dict[str, str]
    cwd: Path
    worker_port: int
    beat_port: int
    worker_name: str
    worker_log: Path
    pg_url: str
    job_id: str


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, pg_url_module: str) -> Iterator[Deployment]:
    """One worker and one beat, and one finished job of 6 good lines and 1 rejected one."""
    pg_url = pg_url_module
    cwd = tmp_path_factory.mktemp("ops")
    prefix = key_prefix()
    worker_port, beat_port = free_port(), free_port()
    base = dict(PIPELINE_DATABASE_URL=pg_url, PIPELINE_BROKER_URL=BROKER_URL, PIPELINE_REDIS_KEY_PREFIX=prefix,
                PIPELINE_SWEEP_INTERVAL="2s", PIPELINE_PRICE_PER_1K_PROMPT_TOKENS="0.5",
                PIPELINE_PRICE_PER_1K_COMPLETION_TOKENS="2")
    env = pipeline_env(**base)
    cli_ok(env, cwd, "db", "upgrade")
    name = f"ops-{prefix.strip(':')}@localhost"
    client = redis.Redis.from_url(BROKER_URL)
    try:
        with worker(pipeline_env(**base, PIPELINE_METRICS_PORT=str(worker_port)), cwd, cwd / "worker.log",
                    "--concurrency", "2", "--name", name), \
             background([*PIPELINE, "beat"], pipeline_env(**base, PIPELINE_METRICS_PORT=str(beat_port)), cwd,
                        cwd / "beat.log"):
            source = cwd / "in.jsonl"
            source.write_text("".join(json.dumps(line) + "\n" for line in LINES) + BAD_LINE + "\n")
            job_id = cli_ok(env, cwd, "submit", str(source), "--wait", "--quiet").stdout.strip()
            yield Deployment(env, cwd, worker_port, beat_port, name, cwd / "worker.log", pg_url, job_id)
    finally:
        delete_prefixed_keys(client, prefix)
        client.close()


def _rows(pg_url: str, job_id: str) -> list[Request]:
    engine = create_engine(pg_url)
    try:
        with Session(engine) as session:
            return list(session.scalars(select(Request).where(Request.job_id == job_id)))
    finally:
        engine.dispose()


def _usage(pg_url: str, job_id: str) -> JobUsage:
    engine = create_engine(pg_url)
    try:
        with Session(engine) as session:
            return session.get(JobUsage, job_id)
    finally:
        engine.dispose()


@pytest.mark.workers
def test_worker_metrics_match_the_results_it_wrote(deployment: Deployment) -> None:
    rows = _rows(deployment.pg_url, deployment.job_id)
    m = scrape(deployment.worker_port)
    assert m["pipeline_requests"][("pipeline_requests_total", (("outcome", "completed"),))] == len(LINES)
    assert m["pipeline_prompt_tokens"][("pipeline_prompt_tokens_total", ())] == sum(r.prompt_tokens for r in rows)
    assert m["pipeline_cached_prompt_tokens"][("pipeline_cached_prompt_tokens_total", ())] == sum(
        r.cached_tokens for r in rows)
    assert m["pipeline_completion_tokens"][("pipeline_completion_tokens_total", ())] == sum(
        r.completion_tokens for r in rows)
    assert ("pipeline_preemptions_total", ()) in m["pipeline_preemptions"]
    assert ("pipeline_kv_evictions_total", ()) in m["pipeline_kv_evictions"]
    blocks = {labels[0][1]: v for (_, labels), v in m["pipeline_kv_blocks"].items()}
    assert set(blocks) == {"used", "free", "cached"} and blocks["used"] == 0 and blocks["cached"] > 0
    assert m["pipeline_running_sequences"][("pipeline_running_sequences", ())] == 0
    assert m["pipeline_waiting_sequences"][("pipeline_waiting_sequences", ())] == 0
    for family in ("pipeline_request_latency_seconds", "pipeline_time_to_first_token_seconds"):
        assert m[family][(f"{family}_count", ())] == len(LINES)
        assert m[family][(f"{family}_sum", ())] > 0
    assert m["pipeline_engine_step_seconds"][("pipeline_engine_step_seconds_count", ())] >= max(l["max_tokens"]
                                                                                                  for l in LINES)
    assert "pipeline_queue_depth" not in m  # exported once, by beat


@pytest.mark.workers
def test_beat_exports_the_queue_depths(deployment: Deployment) -> None:
    m = scrape(deployment.beat_port)
    depths = {labels[0][1]: v for (_, labels), v in m["pipeline_queue_depth"].items()}
    assert depths == {"critical": 0, "high": 0, "normal": 0, "low": 0}  # the worker drained them
    assert "pipeline_requests" not in m


def test_queue_depths_count_the_tasks_waiting(redis_client) -> None:
    prefix = key_prefix()
    settings = load_settings(env={"PIPELINE_BROKER_URL": BROKER_URL, "PIPELINE_REDIS_KEY_PREFIX": prefix})
    app = make_celery(settings)
    try:
        for queue, n in (("high", 2), ("low", 3)):  # no worker consumes this prefix: they stay queued
            for _ in range(n):
                app.send_task("jobs.health.ping", queue=queue, ignore_result=True)
        assert queue_depths(redis_client, prefix) == {"critical": 0, "high": 2, "normal": 0, "low": 3}
    finally:
        delete_prefixed_keys(redis_client, prefix)


@pytest.mark.workers
def test_results_keep_timings_and_stats_reads_them(deployment: Deployment) -> None:
    rows = [r for r in _rows(deployment.pg_url, deployment.job_id) if r.text is not None]
    assert len(rows) == len(LINES)
    assert all(r.latency_s > 0 and 0 < r.ttft_s <= r.latency_s and r.queue_wait_s >= 0 and r.engine_s > 0
               for r in rows)
    data = json.loads(cli_ok(deployment.env, deployment.cwd, "stats", "--since", "1h", "--json").stdout)
    assert (data["completed"], data["failed"]) == (len(LINES), 0)
    assert data["completion_tokens"] == sum(r.completion_tokens for r in rows)
    assert data["prefix_cache_hit_rate"] == pytest.approx(sum(r.cached_tokens for r in rows) /
                                                          sum(r.prompt_tokens for r in rows), abs=1e-6)
    latencies = sorted(r.latency_s for r in rows)
    assert data["latency_s"]["p50"] == latencies[2] and data["latency_s"]["p99"] == latencies[-1]
    assert data["queues"] == {"critical": 0, "high": 0, "normal": 0, "low": 0}
    assert data["running_jobs"] == []
    [w] = data["workers"]
    assert w["name"] == deployment.worker_name and w["healthy"] and w["active_chunks"] == 0
    assert w["engine"]["metrics_port"] == deployment.worker_port
    assert w["engine"]["kv_blocks_used"] == 0 and w["engine"]["kv_blocks_cached"] > 0
    text = cli_ok(deployment.env, deployment.cwd, "stats").stdout
    assert "prefix-cache hit rate" in text and deployment.worker_name in text and "Queues" in text


@pytest.mark.workers
def test_health_probes(deployment: Deployment) -> None:
    env, cwd = deployment.env, deployment.cwd
    result = cli(env, cwd, "health", "--json")
    report = json.loads(result.stdout)
    assert result.returncode == 0 and report["healthy"], report
    names = [c["name"] for c in report["checks"]]
    assert names == ["broker", "database", "beat", f"worker {deployment.worker_name}"]
    assert "lost-chunk-sweep" in report["checks"][2]["last_run_s_ago"]
    assert cli(env, cwd, "health", "--worker", deployment.worker_name).returncode == 0
    assert cli(env, cwd, "health", "--beat").returncode == 0
    gone = cli(env, cwd, "health", "--worker", "celery@nowhere", "--timeout", "0.5")
    assert gone.returncode == 1 and "FAIL  worker celery@nowhere: did not answer" in gone.stdout
    # Another deployment's prefix: a broker that answers, but no beat and no worker behind it.
    empty = pipeline_env(**{**settings_vars(env), "PIPELINE_REDIS_KEY_PREFIX": key_prefix()})
    lonely = cli(empty, cwd, "health", "--timeout", "0.5", "--json")
    assert lonely.returncode == 1
    failed = {c["name"] for c in json.loads(lonely.stdout)["checks"] if not c["ok"]}
    assert failed == {"beat", "workers"}
    down = pipeline_env(**{**settings_vars(env), "PIPELINE_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"})
    result = cli(down, cwd, "health")
    assert result.returncode == 1 and result.stdout.startswith("FAIL  broker: cannot reach Redis")
    assert "Traceback" not in result.stderr


@pytest.mark.workers
def test_usage_bills_engine_time_and_prices(deployment: Deployment) -> None:
    env, cwd, job_id = deployment.env, deployment.cwd, deployment.job_id
    rows = [r for r in _rows(deployment.pg_url, job_id) if r.text is not None]
    usage = _usage(deployment.pg_url, job_id)
    assert usage.compute_seconds == pytest.approx(sum(r.engine_s for r in rows), rel=1e-9)
    [row] = json.loads(cli_ok(env, cwd, "usage", "--by", "job", "--json").stdout)
    prompt, cached, completion = (sum(getattr(r, f) for r in rows)
                                  for f in ("prompt_tokens", "cached_tokens", "completion_tokens"))
    assert row["job"] == job_id and (row["prompt_tokens"], row["cached_tokens"], row["completion_tokens"]) == (
        prompt, cached, completion)
    assert float(row["cost"]) == pytest.approx(((prompt - cached) * 0.5 + completion * 2) / 1000)
    assert row["compute_seconds"] == pytest.approx(usage.compute_seconds, abs=1e-6)
    for by, key in (("tenant", "default"), ("model", "tiny")):
        [grouped] = json.loads(cli_ok(env, cwd, "usage", "--by", by, "--json").stdout)
        assert grouped[by] == key and grouped["jobs"] == 1
    [day] = json.loads(cli_ok(env, cwd, "usage", "--by", "day", "--json").stdout)
    assert len(day["day"]) == 10 and day["day"][4] == "-"
    csv_lines = cli_ok(env, cwd, "usage", "--csv").stdout.splitlines()
    assert csv_lines[0] == "job,jobs,prompt_tokens,cached_tokens,completion_tokens,compute_seconds,cost"
    assert csv_lines[1].startswith(f"{job_id},1,{prompt},{cached},{completion},")
    bad = cli(env, cwd, "usage", "--since", "yesterday")
    assert bad.returncode == 1 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr


@pytest.mark.workers
def test_errors_and_status(deployment: Deployment) -> None:
    env, cwd, job_id = deployment.env, deployment.cwd, deployment.job_id
    shown = cli_ok(env, cwd, "errors", job_id).stdout.splitlines()
    assert len(shown) == 1 and "validation line 7 (bad)" in shown[0]
    events = json.loads(cli_ok(env, cwd, "errors", job_id, "--kind", "validation", "--json").stdout)
    assert [(e["kind"], e["line"], e["custom_id"]) for e in events] == [("validation", 7, "bad")]
    assert json.loads(cli_ok(env, cwd, "errors", job_id, "--kind", "engine", "--json").stdout) == []
    unknown = cli(env, cwd, "errors", "batch_nope")
    assert unknown.returncode == 1 and unknown.stderr.startswith("error: no job 'batch_nope'")

    status = json.loads(cli_ok(env, cwd, "status", job_id, "--json").stdout)
    usage = _usage(deployment.pg_url, job_id)
    assert status["cost"]["amount"] == f"{usage.cost:f}" and status["cost"]["compute_seconds"] == pytest.approx(
        usage.compute_seconds, abs=1e-6)
    assert status["usage"]["output_tokens"] == usage.completion_tokens  # OpenAI's own usage object is kept
    assert status["stats"]["prefix_cache_hit_rate"] == pytest.approx(usage.cached_tokens / usage.prompt_tokens,
                                                                     abs=1e-6)
    assert status["stats"]["lines_per_s"] > 0 and status["stats"]["eta_s"] is None  # finished: no ETA
    text = cli_ok(env, cwd, "status", job_id).stdout
    assert f"cost {usage.cost:f} USD" in text and "hit rate" in text and "lines/s" in text


@pytest.mark.workers
def test_monitor_shows_a_running_job_and_quits_on_q(deployment: Deployment) -> None:
    """Last in this module: it leaves a second (cancelled) job behind, which the other tests would count."""
    import pexpect

    env, cwd = deployment.env, deployment.cwd
    source = cwd / "long.jsonl"
    source.write_text("".join(json.dumps({"custom_id": f"l{i}", "text": f"long job line {i}", "max_tokens": 64,
                                          "temperature": 0.9, "seed": i}) + "\n" for i in range(1000)))
    child = pexpect.spawn(PIPELINE[0], [*PIPELINE[1:], "monitor", "--interval", "0.5"], cwd=str(cwd), env=env,
                          dimensions=(60, 200), encoding="utf-8", timeout=60)
    job_id = None
    try:
        child.expect("pipeline monitor")
        child.expect("Running jobs")
        # Submitted once the monitor draws: a job submitted first could finish (16 chunks on 2
        # processes) before a slow machine's monitor has started.
        job_id = cli_ok(env, cwd, "submit", str(source), "--priority", "low").stdout.strip()
        # The job's row once it has results: its id, priority, lines done, rate and ETA.
        child.expect(rf"{job_id}\s*│\s*low\s*│\s*[\d,]+\s*│\s*1,000\s*│\s*[\d,.]+/s\s*│\s*\d+[smh]")
        child.expect(deployment.worker_name)
        child.expect("Queues")
        child.send("q")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
        if job_id:  # its remaining lines would keep the worker busy until the module's teardown
            cancelled = cli(env, cwd, "cancel", job_id)  # a fast worker may have finished it already
            assert cancelled.returncode == 0 or "cannot go from completed" in cancelled.stderr, cancelled.stderr
    assert child.exitstatus == 0
    result = subprocess.run([*PIPELINE, "monitor"], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stderr.startswith("error: pipeline monitor needs a terminal")
