"""Whether this worker process is fit for work, as it reports it.

A worker whose engine hung on a chunk (`jobs.lease_keeper.Watchdog`) gave that chunk up, but the
thread that hangs cannot be stopped, and the engine it shares with every other task may be what
hangs. So the worker marks itself unhealthy for good, stops taking chunks from its queues, and says
so to whoever asks: the `health` remote-control command (`pipeline.celery_app`; answered by the
worker's consumer thread, which a hung task does not block). A restart is the cure, as after a crash.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WorkerHealth:
    healthy: bool
    reason: str | None = None  # why not, when not

    def as_dict(self) -> dict[str, Any]:
        return {"healthy": self.healthy, "reason": self.reason}


_lock = threading.Lock()
_health = WorkerHealth(True)


def current() -> WorkerHealth:
    return _health


def mark_unhealthy(reason: str) -> None:
    """Record that this process is unhealthy; the first reason is kept."""
    global _health
    with _lock:
        if _health.healthy:
            _health = WorkerHealth(False, reason)


def report_unhealthy(app: Any, node: str, reason: str) -> None:
    """Mark this worker unhealthy and stop it consuming its queues, so no new chunk lands on it."""
    mark_unhealthy(reason)
    queues = sorted(app.amqp.queues.consume_from)
    log.error("worker %s is unhealthy (%s); it stops consuming %s: restart it", node, reason, ", ".join(queues))
    for queue in queues:
        app.control.cancel_consumer(queue, destination=[node], reply=False)
