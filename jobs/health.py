"""Diagnostic tasks: `ping` proves a worker takes tasks from a queue end to end; `record_order`
lets a test see the order in which a worker takes tasks from its queues."""

from __future__ import annotations

import os
from typing import Any

import redis
from celery import shared_task

MAX_HOLD_S = 60.0  # a diagnostic may block its worker this long at most
DIAGNOSTICS_TTL_S = 86_400  # diagnostic lists expire on their own


def diagnostics_key(key_prefix: str, list_name: str) -> str:
    """The Redis key of the diagnostic list `list_name` under a deployment's key prefix."""
    return f"{key_prefix}diagnostics:{list_name}"


def gate_key(key_prefix: str, list_name: str) -> str:
    """The Redis list a held `record_order` waits on; push anything to it to release the worker."""
    return f"{key_prefix}diagnostics:{list_name}:gate"


@shared_task(name="jobs.health.ping", bind=True, ignore_result=False)
def ping(self: Any) -> dict[str, Any]:
    """Which worker process took this task, from which queue. The only task that stores a result."""
    return {"worker": self.request.hostname, "pid": os.getpid(),
            "queue": (self.request.delivery_info or {}).get("routing_key")}


@shared_task(name="jobs.health.record_order", bind=True)
def record_order(self: Any, list_name: str, value: str, hold_s: float = 0.0) -> None:
    """Append `value` to the diagnostic list `list_name`, then, if `hold_s` > 0, keep this worker busy
    until the list's gate is pushed to or `hold_s` seconds pass."""
    if not 0.0 <= hold_s <= MAX_HOLD_S:
        raise ValueError(f"hold_s={hold_s} must be between 0 and {MAX_HOLD_S} seconds")
    prefix = self.app.conf.broker_transport_options.get("global_keyprefix", "")
    client = redis.Redis.from_url(self.app.conf.broker_url)
    try:
        key = diagnostics_key(prefix, list_name)
        client.rpush(key, value)
        client.expire(key, DIAGNOSTICS_TTL_S)
        if hold_s > 0:
            client.blpop([gate_key(prefix, list_name)], timeout=hold_s)
    finally:
        client.close()
