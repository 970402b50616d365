"""Beat's scheduler: the schedule is code and settings (`celery_app.beat_schedule`); the only state
that must outlive a restart, each entry's last run time, lives in Redis as JSON.

Celery's default scheduler keeps its state in a `shelve` file, that is pickle: whoever can write that
file runs code in beat. Here nothing is unpickled and nothing is written to disk. A Redis hash under
the deployment's key prefix maps an entry's name to `{"last_run_at": "<ISO 8601, UTC>"}`; a value
that is not that is ignored (and logged), so the worst a writer of Redis can do is make an entry run
early or late, which the beat lock (`jobs.beat_lock`) already bounds to once per slot.

Restored last run times keep intervals across restarts (a beat restarted every 50 minutes still
runs the hourly session cleanup) and let a crontab entry missed while beat was down run when it
comes back, as Celery's own persistent scheduler does. With Redis unreachable beat starts with no
state (each entry's interval counts from now) and keeps sending; the state is written again once
Redis is back.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import Any

import redis
from celery.beat import Scheduler

logger = logging.getLogger(__name__)

STATE_KEY = "beat-schedule"  # after the key prefix
SWEEP_ENTRY = "lost-chunk-sweep"  # sent every sweep interval: its last run time says beat is alive


def state_key(key_prefix: str) -> str:
    return f"{key_prefix}{STATE_KEY}"


def encode_last_run(last_run_at: datetime) -> str:
    return json.dumps({"last_run_at": last_run_at.astimezone(timezone.utc).isoformat()})


def decode_last_run(raw: bytes | str) -> datetime | None:
    """The last run time in a stored value, or None for anything that is not one (aware, in UTC)."""
    try:
        value = json.loads(raw)
        last_run_at = datetime.fromisoformat(value["last_run_at"])
    except (ValueError, TypeError, KeyError):
        return None
    if last_run_at.tzinfo is None:
        return None
    return last_run_at.astimezone(timezone.utc)


def beat_is_alive(client: redis.Redis, key_prefix: str, sweep_interval_s: int, *,
                  now: datetime | None = None) -> tuple[bool, str]:
    """(alive, why): a beat serving this deployment has sent the lost-chunk sweep (or started)
    within two sweep intervals and a minute. Beat writes that time when it starts and each time it
    sends the sweep, so a hung or stopped beat, or one that cannot reach Redis, goes stale."""
    raw = client.hget(state_key(key_prefix), SWEEP_ENTRY)
    last_run_at = decode_last_run(raw) if raw is not None else None
    if last_run_at is None:
        return False, f"no beat has written its state to {state_key(key_prefix)}"
    age_s = ((now or datetime.now(timezone.utc)) - last_run_at).total_seconds()
    limit_s = 2 * sweep_interval_s + 60
    if age_s > limit_s:
        return False, f"beat last sent {SWEEP_ENTRY} {age_s:.0f} s ago (more than {limit_s} s)"
    return True, f"beat sent {SWEEP_ENTRY} {max(0.0, age_s):.0f} s ago"


class RedisStateScheduler(Scheduler):
    """`celery.beat.Scheduler` with last run times in Redis (see the module docstring)."""

    # Write the state after every task sent, not every 3 minutes: a restart then repeats nothing.
    def __init__(self, app: Any, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("sync_every_tasks", 1)
        options = app.conf.broker_transport_options or {}
        self._key = state_key(options.get("global_keyprefix", ""))
        self._client = redis.Redis.from_url(app.conf.broker_url, socket_timeout=10, socket_connect_timeout=10)
        super().__init__(app, *args, **kwargs)

    def setup_schedule(self) -> None:
        self.install_default_entries(self.data)
        self.merge_inplace(self.app.conf.beat_schedule)
        for name, last_run_at in self._stored().items():
            entry = self.schedule.get(name)
            if entry is not None:
                entry.last_run_at = last_run_at
        self.sync()

    def _stored(self) -> dict[str, datetime]:
        try:
            raw = self._client.hgetall(self._key)
        except redis.RedisError as e:
            logger.warning("beat: cannot read the last run times from Redis (%s); starting from now", e)
            return {}
        stored: dict[str, datetime] = {}
        for field, value in raw.items():
            name = field.decode(errors="replace")
            last_run_at = decode_last_run(value)
            if last_run_at is None:
                logger.warning("beat: ignoring the stored state of %r in %s: not a last run time", name, self._key)
                continue
            stored[name] = last_run_at
        return stored

    def sync(self) -> None:
        state = {name: encode_last_run(entry.last_run_at) for name, entry in self.schedule.items()}
        try:
            with self._client.pipeline() as pipe:
                pipe.delete(self._key)  # entries removed from the settings leave no stale state
                if state:
                    pipe.hset(self._key, mapping=state)
                pipe.execute()
        except redis.RedisError as e:
            logger.warning("beat: cannot write the last run times to Redis (%s); will try again", e)

    def close(self) -> None:
        super().close()  # syncs
        self._client.close()

    @property
    def info(self) -> str:
        return f"    . state -> redis {self._key} (JSON last run times)"
