"""A restarted worker starts warm: SIGTERM writes a KV snapshot into the worker's own folder, the
next start of the same node loads it, and the first request after the restart is served partly
from the cache (`cached_tokens` > 0). The `pipeline cache` commands reach the live worker through
Celery remote control and come back with its answer."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import redis

from jobs.worker_process import delete_prefixed_keys
from pipeline.worker_registry import registered_workers

from support.processes import BROKER_URL, cli, cli_ok, key_prefix, log_count, pipeline_env, wait_until, worker

SYSTEM = "You are a careful assistant who answers in one short sentence. " * 3  # 189 bytes: 11 full blocks


def _line(custom_id: str, question: str) -> str:
    return json.dumps({"custom_id": custom_id, "text": SYSTEM + question, "max_tokens": 4, "temperature": 0}) + "\n"


def _chat_line(custom_id: str, question: str) -> str:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return json.dumps({"custom_id": custom_id, "messages": messages, "max_tokens": 4, "temperature": 0}) + "\n"


def _submit(env: dict[str, str], cwd: Path, name: str, lines: list[str], tenant: str = "default") -> str:
    """Submits `lines` as `tenant` and waits for the job; returns its id."""
    path = cwd / f"{name}.jsonl"
    path.write_text("".join(lines))
    return cli_ok(env, cwd, "submit", str(path), "--tenant", tenant, "--wait", "--quiet").stdout.strip().split()[0]


def _run_job(env: dict[str, str], cwd: Path, name: str, lines: list[str], tenant: str = "default") -> dict[str, dict]:
    """Submits `lines` as `tenant`, waits for the job, returns custom_id -> its result line."""
    job_id = _submit(env, cwd, name, lines, tenant)
    cli_ok(env, cwd, "results", job_id, "--tenant", tenant, "-o", str(cwd / f"{name}.out.jsonl"))
    return {r["custom_id"]: r for r in map(json.loads, (cwd / f"{name}.out.jsonl").read_text().splitlines())}


def _cached(result: dict) -> int:
    return result["response"]["body"]["usage"]["prompt_tokens_details"]["cached_tokens"]


@pytest.fixture
def env(pg_url: str, tmp_path: Path, redis_client):
    prefix = key_prefix()
    env = pipeline_env(PIPELINE_DATABASE_URL=pg_url, PIPELINE_BROKER_URL=BROKER_URL, PIPELINE_REDIS_KEY_PREFIX=prefix,
                       PIPELINE_CACHE_DIR=str(tmp_path / "kv"), PIPELINE_KV_CACHE_MEMORY_BYTES="64MiB",
                       PIPELINE_CPU_THREADS="1")
    cli_ok(env, tmp_path, "db", "upgrade")
    yield env
    delete_prefixed_keys(redis_client, prefix)


@pytest.mark.workers
def test_a_restarted_worker_serves_its_first_request_from_the_snapshot(env, tmp_path: Path) -> None:
    node = f"warm@{socket.gethostname()}"
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    system = tmp_path / "system.jsonl"
    system.write_text(_line("s", ""))  # the system prompt alone: 11 full blocks
    with worker(env, tmp_path, first_log, "--name", "warm@%h"):
        assert log_count(first_log, "starting cold") == 1
        first = _run_job(env, tmp_path, "before", [_line("a", "What is a cache?")])
        assert _cached(first["a"]) == 0
        cli_ok(env, tmp_path, "cache", "pin", str(system))
    # SIGTERM (the helper's stop) wrote a snapshot into this node's own folder.
    assert log_count(first_log, "KV snapshot") >= 1 and "written" in first_log.read_text()
    snapshots = sorted((tmp_path / "kv" / node).glob("snapshot-*"))
    assert len(snapshots) == 1 and (snapshots[0] / "manifest.json").is_file()

    with worker(env, tmp_path, second_log, "--name", "warm@%h"):
        assert log_count(second_log, f"KV snapshot {snapshots[0]} loaded") == 1
        assert log_count(second_log, "11 pinned again") == 1  # the pin survived the restart
        assert json.loads(cli_ok(env, tmp_path, "cache", "stats", "--json").stdout)[node]["num_pinned_blocks"] == 11
        after = _run_job(env, tmp_path, "after", [_line("b", "And what is a prefix?")])
    # The shared system prompt's full blocks came from the snapshot: 11 blocks of 16 tokens.
    assert _cached(after["b"]) == 176


@pytest.mark.workers
def test_cache_commands_reach_the_live_worker(env, tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    prompts = tmp_path / "system.jsonl"
    prompts.write_text(_line("s", ""))  # the system prompt alone: 11 full blocks
    bad = tmp_path / "bad.jsonl"
    bad.write_text(_line("s", "") + "not json\n")
    client = redis.Redis.from_url(BROKER_URL)
    prefix = env["PIPELINE_REDIS_KEY_PREFIX"]
    with worker(env, tmp_path, log, "--name", "cmds@%h"):
        node = f"cmds@{socket.gethostname()}"
        # Registered once it takes commands: the cache commands wait for its answer, not a timeout.
        wait_until(lambda: registered_workers(client, prefix) == [node], "the worker's registration", log)
        stats = json.loads(cli_ok(env, tmp_path, "cache", "stats", "--json").stdout)
        assert list(stats) == [node] and stats[node]["num_pinned_blocks"] == 0
        assert stats[node]["num_cached_blocks"] == 0

        pinned = json.loads(cli_ok(env, tmp_path, "cache", "pin", str(prompts), "--json").stdout)[node]
        assert pinned["pinned_blocks"] == 11 and pinned["num_pinned_blocks"] == 11
        cleared = json.loads(cli_ok(env, tmp_path, "cache", "clear", "--json").stdout)[node]
        assert cleared["num_pinned_blocks"] == 11 and cleared["num_cached_blocks"] == 11  # pins survive a clear
        table = cli_ok(env, tmp_path, "cache", "stats").stdout.splitlines()
        assert table[1].split()[:1] == [node] and table[1].split()[4] == "11"

        persisted = json.loads(cli_ok(env, tmp_path, "cache", "persist", "--json").stdout)[node]
        assert persisted["num_blocks"] == 11 and Path(persisted["path"]).parent == tmp_path / "kv" / node

        unpinned = json.loads(cli_ok(env, tmp_path, "cache", "unpin", "--json").stdout)[node]
        assert unpinned == {"unpinned_blocks": 11, "num_pinned_blocks": 0}
        cleared = json.loads(cli_ok(env, tmp_path, "cache", "clear", "--json").stdout)[node]
        assert cleared["dropped_blocks"] == 11 and cleared["num_cached_blocks"] == 0

        warmed = json.loads(cli_ok(env, tmp_path, "cache", "warm", str(prompts), "--json").stdout)[node]
        assert warmed["cached_blocks"] == 11 and warmed["failed"] == 0
        # Warmed under the default tenant's cache salt: its next job is served from those blocks, and
        # another tenant's job with the same prompt is not (blocks are never hits across tenants).
        assert _cached(_run_job(env, tmp_path, "hit", [_line("h", "Why warm a cache?")])["h"]) == 176
        assert _cached(_run_job(env, tmp_path, "miss", [_line("m", "Why warm a cache?")], tenant="acme")["m"]) == 0
        # For a tenant named nowhere, every worker answers with one line and nothing is warmed.
        unknown = cli(env, tmp_path, "cache", "warm", str(prompts), "--tenant", "nosuch", "--json")
        assert unknown.returncode == 1 and "no tenant 'nosuch'" in json.loads(unknown.stdout)[node]["error"]

        refused = cli(env, tmp_path, "cache", "warm", str(bad))
        assert refused.returncode == 1 and refused.stderr.startswith(f"error: {bad}: line 2:")
        assert len(refused.stderr.strip().splitlines()) == 1

        # A job's system prompt, warmed for the job's own tenant: the tenant's next chat job starts
        # with it cached. What is warmed is where the lines' roles part ("<|system|>\n...\n<|"):
        # with the BOS, 204 tokens, 12 full blocks.
        chats = _submit(env, tmp_path, "chats", [_chat_line("c1", "What is a cache?"), _chat_line("c2", "Why?")],
                        tenant="acme")
        cli_ok(env, tmp_path, "cache", "clear")
        before = json.loads(cli_ok(env, tmp_path, "cache", "stats", "--json").stdout)[node]
        for args, message in ((["--job", chats, "--tenant", "acme"], "--tenant does not go with --job"),
                              (["--job", "nosuch"], "no job 'nosuch'"),
                              ([str(prompts), "--job", chats], "give FILE or --job, not both"),
                              ([], "give a request FILE or --job JOB")):
            refused = cli(env, tmp_path, "cache", "warm", *args)
            assert refused.returncode == 1 and refused.stderr.startswith(f"error: {message}")
            assert len(refused.stderr.strip().splitlines()) == 1
        assert json.loads(cli_ok(env, tmp_path, "cache", "stats", "--json").stdout)[node] == before  # nothing warmed
        assert before["num_cached_blocks"] == 0

        from_job = cli_ok(env, tmp_path, "cache", "warm", "--job", chats, "--json")
        assert json.loads(from_job.stdout)[node]["cached_blocks"] == 12
        assert from_job.stderr.strip() == f"job {chats} (tenant acme): 1 shared prefix; lines starting with each: 2 (of 2)"
        assert _cached(_run_job(env, tmp_path, "next", [_chat_line("n", "And a block?")], tenant="acme")["n"]) == 192
    # A warm shutdown (the helper's SIGTERM) takes the registration with it.
    assert registered_workers(client, prefix) == []
    client.close()
