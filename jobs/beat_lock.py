"""One run per scheduled slot: a guard against two beat processes started by mistake.

Each beat sends every periodic task on its own clock, so a second beat means a second message for
the same run. A task first takes a Redis key named for the task and for the slot its schedule puts
`now` in (`SET NX PX`); the run that finds the key taken returns without work. The key expires at
the end of the slot, so nothing has to release it, and a crashed run blocks nothing beyond its slot.

Slots: an interval entry of N seconds has slots [k*N, (k+1)*N) of unix time; two beats with
different phases still send at most once per slot each, and the lock keeps one of them. A crontab
entry fires at most once a minute, so its slot is the minute.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta

import redis

from db.base import utcnow
from pipeline.celery_app import periodic_tasks
from pipeline.settings import Settings

CRONTAB_SLOT_S = 60  # a crontab's resolution


def slot_seconds(settings: Settings, task_name: str) -> int:
    """Length of `task_name`'s slots: its beat interval, or a minute for crontab and unscheduled tasks."""
    for task, every in periodic_tasks(settings).values():
        if task == task_name and isinstance(every, timedelta):
            return max(1, int(every.total_seconds()))
    return CRONTAB_SLOT_S


def lock_key(key_prefix: str, task_name: str, slot: int) -> str:
    return f"{key_prefix}beat-lock:{task_name}:{slot}"


def take_slot(client: redis.Redis, settings: Settings, task_name: str, *, now: datetime | None = None) -> int | None:
    """Take `task_name`'s lock for the slot holding `now`: the slot's number for the first caller
    in the slot, None for every later one until the slot ends."""
    key_prefix = settings.redis_key_prefix
    seconds = slot_seconds(settings, task_name)
    now_ms = int((now or utcnow()).timestamp() * 1000)
    slot = now_ms // (seconds * 1000)
    remaining_ms = (slot + 1) * seconds * 1000 - now_ms
    owner = f"{os.uname().nodename}:{os.getpid()}"  # who ran it, for an operator reading Redis
    taken = client.set(lock_key(key_prefix, task_name, slot), owner, nx=True, px=max(1, remaining_ms))
    return slot if taken else None
