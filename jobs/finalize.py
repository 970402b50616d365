"""What happens once a job has ended: a nightly run's results are exported into `results_dir`, and
a JSON summary is POSTed to `webhook_url` (when set) for every job that completed or failed.

`job_ended` is the Celery task the worker that completes a job sends (one per job: only one
`finish_job_if_done` call completes it); beat's nightly-run task calls `finish_job` itself for a
run whose every line was rejected (a job that failed at submit). Neither the export nor the
webhook can fail the job: an export error goes to the error history, a webhook error to the log.
"""

from __future__ import annotations

import logging
import traceback
from pathlib import Path
from typing import Any

from celery import shared_task
from sqlalchemy.orm import Session, sessionmaker

from db.repository import get_job, record_error
from jobs.process_state import worker_sessions, worker_settings
from pipeline.errors import PipelineError
from pipeline.export import export_results
from pipeline.job_stats import job_extras
from pipeline.settings import Settings
from pipeline.submit import job_summary
from pipeline.webhook import post_json

log = logging.getLogger(__name__)
JOB_ENDED_TASK = "jobs.finalize.job_ended"
NIGHTLY_KEY_PREFIX = "nightly:"  # idempotency keys of nightly runs: nightly:<name>:<day>
EXPORT_ERROR_KIND = "export"
ENDED = ("completed", "failed")


@shared_task(name=JOB_ENDED_TASK)
def job_ended(job_id: str) -> None:
    """Export (nightly runs) and notify for job `job_id`, which has just ended."""
    settings = worker_settings()
    finish_job(settings, worker_sessions(settings.database_url), job_id)


def finish_job(settings: Settings, session_factory: sessionmaker[Session], job_id: str) -> dict[str, Any] | None:
    """Export a nightly run's results and POST the job's summary; returns the summary sent (None:
    the job has not ended, or no webhook is set and nothing was exported)."""
    with session_factory() as session:
        job = get_job(session, job_id)
        if job is None or job.status.value not in ENDED:
            return None
        nightly = (job.idempotency_key or "").startswith(NIGHTLY_KEY_PREFIX)
        summary = {**job_summary(session, job_id), **job_extras(session, job_id)}
    files = export_nightly(settings, session_factory, job_id) if nightly else None
    if settings.webhook_url is None:
        return None
    payload = {"event": f"job.{summary['status']}", "job": summary,
               "nightly_run": job.idempotency_key.split(":")[1] if nightly else None, "files": files}
    post_json(settings.webhook_url, payload, timeout_s=settings.webhook_timeout_s, retries=settings.webhook_retries)
    return payload


def export_nightly(settings: Settings, session_factory: sessionmaker[Session], job_id: str) -> dict[str, str] | None:
    """Write the job's results and errors into `results_dir` (`<job>.jsonl`, `<job>.errors.jsonl`);
    returns their paths, None when the export failed (recorded in the error history)."""
    folder = Path(settings.results_dir)
    out, errors = folder / f"{job_id}.jsonl", folder / f"{job_id}.errors.jsonl"
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)  # every prompt's answer: owner only
        export_results(session_factory, job_id, out, errors)
    except (PipelineError, ValueError, OSError) as e:
        message = f"exporting nightly job {job_id} into {folder} failed: {e}"
        log.error(message)
        with session_factory.begin() as session:
            record_error(session, EXPORT_ERROR_KIND, message, job_id=job_id, traceback=traceback.format_exc())
        return None
    log.info("nightly job %s exported to %s", job_id, out)
    return {"results": str(out), "errors": str(errors)}
