"""The Celery queues, highest priority first.

A worker started on several queues drains them strictly in this order: it takes a task from `high`
only when `critical` is empty, and so on down to `low`. The Redis transport gives this ordering
because `celery_app.make_celery` sets `queue_order_strategy="priority"` and every worker lists its
queues in this order (`-Q critical,high,normal,low`, or no `-Q` at all: the app declares them so).
"""

from __future__ import annotations

import enum


class Queue(str, enum.Enum):
    """A Celery queue name; the member order is the drain order."""

    CRITICAL = "critical"  # health pings and anything an operator is waiting on
    HIGH = "high"  # interactive jobs, job bookkeeping (dispatch, finalize) and beat maintenance
    NORMAL = "normal"  # the default for jobs and tasks without a route
    LOW = "low"  # nightly and bulk runs that may wait behind everything else

    def __str__(self) -> str:
        return self.value


QUEUE_NAMES: tuple[str, ...] = tuple(queue.value for queue in Queue)  # highest priority first


def queue_for(priority: str) -> Queue:
    """The queue for a job or request `priority` ("critical", "high", "normal" or "low", exactly)."""
    try:
        return Queue(priority)
    except ValueError:
        raise ValueError(f"unknown priority {priority!r}; use one of {', '.join(QUEUE_NAMES)}") from None
