"""`jobs.inference.run_chunk`: the Celery task that runs one chunk on this process's warm engine.

Thin on purpose: it takes a chunk id, finds the process's settings, database sessions and engine
(each built once per process and kept), and calls `execute_chunk`. Late acknowledgement is set
app-wide, so a worker killed mid-chunk gets the chunk redelivered; `execute_chunk` is idempotent.
"""

from __future__ import annotations

import functools
from datetime import timedelta
from typing import Any

from celery import shared_task

from jobs.engine_host import get_engine_loop
from jobs.finalize import JOB_ENDED_TASK
from jobs.execution import Prices, execute_chunk
from jobs.process_state import worker_quotas, worker_sessions, worker_settings
from jobs.worker_health import report_unhealthy
from pipeline.celery_app import RUN_CHUNK_TASK


@shared_task(name=RUN_CHUNK_TASK, bind=True)
def run_chunk(self: Any, chunk_id: int) -> None:
    """Run chunk `chunk_id` and record its results in the database."""
    settings = worker_settings()
    execute_chunk(
        worker_sessions(settings.database_url), get_engine_loop(settings), chunk_id,
        self.request.hostname or "worker",
        prices=Prices.from_settings(settings),
        # As long as the broker waits before redelivering a dead worker's message; renewed while the
        # chunk runs, so a redelivered copy of a chunk still running finds it leased and skips it.
        lease=timedelta(seconds=settings.visibility_timeout_s),
        max_redeliveries=settings.task_max_redeliveries,
        # A chunk that makes no progress this long is given up and the worker reports itself
        # unhealthy (jobs.worker_health): a hang is recovered as a crash is.
        stall_timeout=timedelta(seconds=settings.stall_timeout_s),
        on_unhealthy=functools.partial(report_unhealthy, self.app, self.request.hostname or "worker"),
        # Each tenant's tokens of the day, for its `tokens_per_day` quota (pipeline/quotas.py).
        on_tokens=worker_quotas(settings).add_tokens,
        # Export (nightly runs) and webhook in a task of their own: a slow webhook holds no chunk slot.
        on_job_ended=lambda job_id: self.app.send_task(JOB_ENDED_TASK, args=[job_id], ignore_result=True),
    )
