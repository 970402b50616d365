"""Tenants are isolated inside the workers, on real services (PostgreSQL, Redis, a `pipeline
worker` process), driven through `pipeline submit --tenant`: the two leaks found by an outside test.

1. Sessions: a second tenant naming the first one's `session_id` starts a new conversation; it
   never gets the first tenant's history (a secret) in its prompt.
2. The prefix cache: a probe by another tenant with the victim's first 63 characters (64 tokens
   with BOS: four full 16-token blocks of the tiny model) gets `cached_tokens` 0, while the same
   probe by the victim's own tenant hits those four blocks. That control is what makes the
   isolation assertion able to fail.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import select

from db.records import JobUsage, SessionRecord
from db.repository import get_tenant
from db.session import make_engine, session_factory
from jobs.worker_process import delete_prefixed_keys

from support.processes import BROKER_URL, assert_one_error_line, cli, cli_ok, key_prefix, pipeline_env, worker

SECRET = "The vault code is 7-3-1-9, never tell anyone. "
VICTIM_PREFIX = "Confidential memo for the board: the merger with Initech closes"  # 63 characters
assert len(VICTIM_PREFIX) == 63


@pytest.fixture
def services(pg_url: str, tmp_path: Path, redis_client):
    """(env for CLI processes, the database URL) with one worker running; Redis keys deleted after."""
    prefix = key_prefix()
    env = pipeline_env(PIPELINE_DATABASE_URL=pg_url, PIPELINE_BROKER_URL=BROKER_URL, PIPELINE_REDIS_KEY_PREFIX=prefix)
    cli_ok(env, tmp_path, "db", "upgrade")
    try:
        with worker(env, tmp_path, tmp_path / "worker.log", "--concurrency", "1"):
            yield env, pg_url
    finally:
        delete_prefixed_keys(redis_client, prefix)


def _run_job(env: dict[str, str], cwd: Path, tenant: str, name: str, lines: list[dict]) -> dict[str, dict]:
    """Submit `lines` as `tenant`, wait for the job, and return its results by custom_id (the
    results read back as the same tenant)."""
    path = cwd / f"{name}.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    summary = json.loads(cli_ok(env, cwd, "submit", str(path), "--tenant", tenant, "--wait", "--quiet", "--json").stdout)
    assert summary["status"] == "completed" and summary["request_counts"]["failed"] == 0, summary
    out = cwd / f"{name}-out.jsonl"
    cli_ok(env, cwd, "results", summary["id"], "-o", str(out), "--tenant", tenant, "--quiet")
    results = {}
    for line in out.read_text().splitlines():
        record = json.loads(line)
        results[record["custom_id"]] = record["response"]["body"]
    results["_job"] = summary
    return results


def _line(custom_id: str, text: str, **extra) -> dict:
    return {"custom_id": custom_id, "text": text, "max_tokens": 4, "temperature": 0, **extra}


@pytest.mark.workers
def test_a_session_id_is_scoped_per_tenant(services, tmp_path: Path) -> None:
    env, db_url = services
    _run_job(env, tmp_path, "alice", "alice-1", [_line("a1", SECRET, session_id="support-42")])

    question = "What did I tell you before?"
    bob = _run_job(env, tmp_path, "bob", "bob-1", [_line("b1", question, session_id="support-42")])
    # Bob's prompt is his own line alone (BOS + its bytes): no history of alice's session in it.
    assert bob["b1"]["usage"]["prompt_tokens"] == 1 + len(question.encode())

    # The control: alice's own next turn does get her history in front of the question.
    alice = _run_job(env, tmp_path, "alice", "alice-2", [_line("a2", question, session_id="support-42")])
    assert alice["a2"]["usage"]["prompt_tokens"] > 1 + len(SECRET.encode()) + len(question.encode())

    factory = session_factory(make_engine(db_url))
    with factory() as session:
        alice_id, bob_id = get_tenant(session, "alice").id, get_tenant(session, "bob").id
        rows = {r.tenant_id: r for r in session.scalars(select(SessionRecord)
                                                        .where(SessionRecord.session_id == "support-42"))}
        assert set(rows) == {alice_id, bob_id}
        assert rows[alice_id].turns == 2 and rows[bob_id].turns == 1
        assert all(SECRET not in m["content"] for m in rows[bob_id].history)
        # Usage rows carry the tenant of their job.
        usage = {u.job_id: u.tenant_id for u in session.scalars(select(JobUsage))}
        assert usage[bob["_job"]["id"]] == bob_id and usage[alice["_job"]["id"]] == alice_id


@pytest.mark.workers
def test_another_tenants_prefix_is_never_a_cache_hit(services, tmp_path: Path) -> None:
    env, _ = services
    _run_job(env, tmp_path, "victim", "victim", [_line("v", VICTIM_PREFIX + " next Tuesday at noon.")])

    # The probe's own tenant has never sent this prefix: only the victim's blocks could serve it.
    probe = _run_job(env, tmp_path, "mallory", "probe", [_line("probe", VICTIM_PREFIX + "!")])
    assert probe["probe"]["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    # The control: the victim's own tenant shares its blocks (63 characters + BOS = 4 blocks of 16).
    own = _run_job(env, tmp_path, "victim", "victim-probe", [_line("probe", VICTIM_PREFIX + "!")])
    assert own["probe"]["usage"]["prompt_tokens_details"]["cached_tokens"] == 64


@pytest.mark.workers
def test_status_results_and_list_filter_by_tenant(services, tmp_path: Path) -> None:
    env, _ = services
    alice = _run_job(env, tmp_path, "alice", "alice", [_line("a", "hello")])["_job"]["id"]
    bob = _run_job(env, tmp_path, "bob", "bob", [_line("b", "hello")])["_job"]["id"]

    listed = json.loads(cli_ok(env, tmp_path, "list", "--tenant", "bob", "--json").stdout)
    assert [job["id"] for job in listed] == [bob]
    assert {job["id"] for job in json.loads(cli_ok(env, tmp_path, "list", "--json").stdout)} == {alice, bob}
    # Another tenant's job is answered exactly as a job that does not exist.
    assert_one_error_line(cli(env, tmp_path, "status", alice, "--tenant", "bob"), mentions=f"no job '{alice}'")
    assert_one_error_line(cli(env, tmp_path, "status", "batch_nope", "--tenant", "bob"),
                          mentions="no job 'batch_nope'")
    out = tmp_path / "stolen.jsonl"
    assert_one_error_line(cli(env, tmp_path, "results", alice, "-o", str(out), "--tenant", "bob"),
                          mentions=f"no job '{alice}'")
    assert not out.exists()
    assert_one_error_line(cli(env, tmp_path, "list", "--tenant", "nobody"), mentions="no tenant 'nobody'")

    # An operator's submit without --tenant runs as `default`; a disabled tenant can submit nothing.
    (tmp_path / "d.jsonl").write_text(json.dumps(_line("d", "hi")) + "\n")
    default_job = cli_ok(env, tmp_path, "submit", str(tmp_path / "d.jsonl"), "--quiet").stdout.strip()
    assert [j["id"] for j in json.loads(cli_ok(env, tmp_path, "list", "--tenant", "default", "--json").stdout)] == [
        default_job]
    cli_ok(env, tmp_path, "tenant", "disable", "bob")
    refused = cli(env, tmp_path, "submit", str(tmp_path / "d.jsonl"), "--tenant", "bob", "--quiet")
    assert_one_error_line(refused, mentions="tenant 'bob' is disabled")
    assert len(json.loads(cli_ok(env, tmp_path, "list", "--tenant", "bob", "--json").stdout)) == 1
