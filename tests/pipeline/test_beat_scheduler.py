"""`pipeline beat` keeps no pickle: a real beat process on the real Redis writes no file, keeps each
entry's last run time in Redis as JSON, resumes from it after a restart, and ignores a stored value
that is not JSON (such as a pickle) instead of loading it."""

from __future__ import annotations

import json
import pickle
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

from jobs.worker_process import delete_prefixed_keys
from pipeline.beat_scheduler import beat_is_alive, decode_last_run, encode_last_run, state_key

from support.processes import (BROKER_URL, PIPELINE, assert_one_error_line, background, cli, cli_ok, key_prefix,
                               log_count, pipeline_env, wait_until)

SWEEP = "lost-chunk-sweep"  # every 2 s here
CLEANUP = "session-cleanup"  # hourly: it runs at once only if a stored last run is over an hour old
START_DEADLINE_S = 300.0  # beat imports the task modules (torch among them): slow on a busy machine


def _sent(log: Path, entry: str) -> int:
    return len(re.findall(rf"Scheduler: Sending due task {re.escape(entry)} ", log.read_text(errors="replace")))


def test_beat_is_alive_while_its_sweep_time_is_recent(redis_client) -> None:
    prefix = key_prefix()
    now = datetime(2026, 1, 5, 3, 0, tzinfo=timezone.utc)
    try:
        assert beat_is_alive(redis_client, prefix, 120, now=now) == (
            False, f"no beat has written its state to {state_key(prefix)}")
        redis_client.hset(state_key(prefix), SWEEP, encode_last_run(now - timedelta(seconds=300)))
        assert beat_is_alive(redis_client, prefix, 120, now=now) == (True, f"beat sent {SWEEP} 300 s ago")
        assert beat_is_alive(redis_client, prefix, 120, now=now + timedelta(seconds=1)) == (
            False, f"beat last sent {SWEEP} 301 s ago (more than 300 s)")
    finally:
        delete_prefixed_keys(redis_client, prefix)


def test_a_last_run_time_round_trips_and_anything_else_is_refused() -> None:
    at = datetime(2026, 1, 5, 3, 0, tzinfo=timezone.utc)
    assert decode_last_run(encode_last_run(at)) == at
    assert json.loads(encode_last_run(at)) == {"last_run_at": "2026-01-05T03:00:00+00:00"}
    for bad in (pickle.dumps({"last_run_at": at}), b"not json", b"[]", b'{"last_run_at": 3}',
                b'{"last_run_at": "2026-01-05T03:00:00"}'):  # a naive time: ambiguous, refused
        assert decode_last_run(bad) is None, bad


def test_beat_writes_no_file_and_keeps_its_last_run_times_in_redis_as_json(tmp_path: Path, redis_client) -> None:
    prefix = key_prefix()
    key = state_key(prefix)
    env = pipeline_env(PIPELINE_BROKER_URL=BROKER_URL, PIPELINE_REDIS_KEY_PREFIX=prefix,
                       PIPELINE_DATABASE_URL=f"sqlite:///{tmp_path / 'unused.sqlite3'}", PIPELINE_SWEEP_INTERVAL="2s")
    two_hours_ago = datetime.now(timezone.utc) - timedelta(hours=2)
    redis_client.hset(key, mapping={CLEANUP: encode_last_run(two_hours_ago),
                                    "job-expiry": pickle.dumps({"last_run_at": two_hours_ago})})
    folder = tmp_path / "beat"  # beat's working folder: Celery's default scheduler writes its shelve here
    folder.mkdir()
    first, second = tmp_path / "first.log", tmp_path / "second.log"
    try:
        with background([*PIPELINE, "beat"], env, folder, first) as process:
            # The cleanup, last run two hours ago by the stored state, is due at once; the sweep fires on its own.
            wait_until(lambda: _sent(first, CLEANUP) == 1 and _sent(first, SWEEP) >= 2,
                       "beat sending the stored-due cleanup and the sweep", first, START_DEADLINE_S, process)
        assert log_count(first, "ignoring the stored state of 'job-expiry'") == 1
        assert _sent(first, "job-expiry") == 0  # the bad value was dropped, not read as a last run
        state = {name.decode(): json.loads(value) for name, value in redis_client.hgetall(key).items()}
        assert set(state) == {SWEEP, CLEANUP, "job-expiry", "database-backup", "kv-cache-checkpoint"}
        assert all(set(value) == {"last_run_at"} for value in state.values())
        assert decode_last_run(redis_client.hget(key, CLEANUP)) > two_hours_ago + timedelta(hours=1)
        # The messages are in Redis (maintenance tasks go to `high`; no worker takes them here).
        queued = [json.loads(m)["headers"]["task"] for k in redis_client.scan_iter(match=f"{prefix}high*")
                  if redis_client.type(k) == b"list" for m in redis_client.lrange(k, 0, -1)]
        assert "jobs.maintenance.cleanup_sessions" in queued and "jobs.maintenance.sweep_lost_chunks" in queued

        # The health check reads that state: alive now; an empty prefix has no beat.
        assert cli_ok(env, tmp_path, "beat", "--check").stderr.startswith(f"beat sent {SWEEP} ")
        nobody = cli({**env, "PIPELINE_REDIS_KEY_PREFIX": key_prefix()}, tmp_path, "beat", "--check")
        assert_one_error_line(nobody, mentions="no beat has written its state")

        # Restarted, beat resumes from Redis: the cleanup it just ran is not due again for an hour.
        with background([*PIPELINE, "beat"], env, folder, second) as process:
            wait_until(lambda: _sent(second, SWEEP) >= 1, "the restarted beat sending the sweep", second,
                       START_DEADLINE_S, process)
        assert _sent(second, CLEANUP) == 0
        assert list(folder.iterdir()) == []  # no schedule file, no shelve, nothing
    finally:
        delete_prefixed_keys(redis_client, prefix)
