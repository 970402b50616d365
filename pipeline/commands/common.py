"""Helpers shared by the command modules: the `error:` line for domain errors, database sessions,
and waiting on a job with a progress line on stderr."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from pipeline.printable import printable
from pipeline.progress import Progress, bar

T = TypeVar("T")
POLL_S = 0.5
JsonOption = Annotated[bool, typer.Option("--json", help="JSON instead of text.")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr.")]
TenantFilter = Annotated[str | None, typer.Option(
    "--tenant", help="Only this tenant's jobs: another tenant's job id is answered as unknown.")]


def fail(message: str) -> typer.Exit:
    """The one `error:` line on stderr; what the message quotes from the input is shown `printable`."""
    typer.echo(f"error: {printable(message)}", err=True)
    return typer.Exit(1)


def guarded(action: Callable[[], T]) -> T:
    """Run `action()`; the user's and the environment's errors become one `error:` line, exit 1."""
    from kombu.exceptions import OperationalError as BrokerError
    from redis.exceptions import RedisError
    from sqlalchemy.exc import OperationalError, ProgrammingError

    from pipeline.errors import PipelineError

    try:
        return action()
    except (PipelineError, ValueError) as e:
        raise fail(str(e)) from None
    except ProgrammingError as e:  # e.g. a missing table: the schema was never created
        raise fail(f"the database is not set up ({e.orig}); run `pipeline db upgrade`") from None
    except OperationalError as e:
        message = str(e.orig).strip().splitlines()[0] if e.orig else str(e)
        if "no such table" in message:
            raise fail("the database is not set up; run `pipeline db upgrade`") from None
        raise fail(f"cannot use the database ({message}); check PIPELINE_DATABASE_URL") from None
    except (BrokerError, RedisError) as e:
        raise fail(f"cannot reach the broker ({e}); check PIPELINE_BROKER_URL and that Redis runs") from None


def sessions(database_url: str):
    from db.session import make_engine, session_factory

    return session_factory(make_engine(database_url))


def print_job(summary: dict[str, Any], as_json: bool) -> None:
    """A job on stdout: its JSON object, or one line (id, status, counts)."""
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    counts = summary["request_counts"]
    typer.echo(f"{summary['id']}  {summary['status']}  {counts['completed']} completed, {counts['failed']} failed, "
               f"{counts['total']} lines")


def progress_line(summary: dict[str, Any], lines_per_s: float | None = None) -> str:
    """`[#####.....] 12/40 lines  in_progress  3.1 lines/s  ETA 9s`: lines done (completed or failed)
    of the total, and, once measured, the rate and the time left at it."""
    from pipeline.job_stats import eta_s

    counts = summary["request_counts"]
    done = counts["completed"] + counts["failed"]
    line = f"{bar(done, counts['total'])} lines  {summary['status']}"
    if lines_per_s is None:
        return line
    eta = eta_s(counts["total"] - done, lines_per_s)
    return f"{line}  {lines_per_s:.1f} lines/s" + ("" if eta is None else f"  ETA {eta:.0f}s")


def tenant_id_of(factory, name: str | None) -> str | None:
    """The id of the tenant named `name` (None for None); ValueError for an unknown name."""
    if name is None:
        return None
    from db.repository import require_tenant

    with factory() as session:
        return require_tenant(session, name).id


def wait_for_job(factory, job_id: str, *, quiet: bool = False, notice_after_s: int | None = None,
                 tenant_id: str | None = None) -> dict[str, Any]:
    """Poll the job until it ends; unless `quiet`, its progress on stderr. When its counts have not
    moved for `notice_after_s` seconds and no worker has taken any of its chunks, say so once (even
    when quiet: it is a warning, not progress) and wait on: a worker may still come."""
    from pipeline.submit import chunks_taken, job_summary

    progress = Progress(job_id, enabled=not quiet)
    counts, since = None, time.monotonic()
    noticed = notice_after_s is None
    first: tuple[float, int] | None = None  # (when, lines done) at the first poll: the rate's origin
    while True:
        with factory() as session:
            summary = job_summary(session, job_id, tenant_id=tenant_id)
            done = summary["request_counts"]["completed"] + summary["request_counts"]["failed"]
            now = time.monotonic()
            first = first or (now, done)
            rate = (done - first[1]) / (now - first[0]) if done > first[1] else None
            if summary["status"] in ("completed", "failed", "expired", "cancelled"):
                progress.finish(progress_line(summary))
                return summary
            if summary["request_counts"] != counts:
                counts, since = summary["request_counts"], time.monotonic()
            elif not noticed and time.monotonic() - since >= notice_after_s and not chunks_taken(session, job_id):
                noticed = True
                progress.note(no_worker_notice(summary, notice_after_s))
        progress.update(progress_line(summary, rate))
        time.sleep(POLL_S)


def no_worker_notice(summary: dict[str, Any], waited_s: int) -> str:
    """What to say when no worker has taken the job: what is likely wrong, and how to check."""
    job_id, queue = summary["id"], summary["priority"]
    return (f"{job_id}: no worker has taken this job in {waited_s}s; is a worker running against this database "
            f"and broker, serving the {queue!r} queue (or busy with earlier jobs)? Check with `pipeline status "
            f"{job_id}`, Flower, or `celery -A pipeline.celery_app inspect active_queues`; start one with "
            "`pipeline worker`. Still waiting (Ctrl-C stops waiting, not the job).")


def ingest_progress(file: Path, quiet: bool) -> tuple[Progress, Callable[[int, int], None]]:
    """(the progress of validating `file`, the `on_progress` callback `submit_file` takes)."""
    progress = Progress(f"reading {file.name}", enabled=not quiet)
    return progress, lambda read, rejected: progress.update(f"{read:,} lines, {rejected:,} rejected")


def export_with_progress(factory, job_id: str, output: Path, errors: Path | None, quiet: bool,
                         tenant_id: str | None = None):
    """`export_results` of the job, with its progress on stderr; returns its ExportCounts."""
    from pipeline.export import export_results

    progress = Progress(f"writing {output.name}", enabled=not quiet)
    counts = export_results(factory, job_id, output, errors, tenant_id=tenant_id,
                            on_progress=lambda done, total: progress.update(f"{bar(done, total)} lines"))
    progress.finish(f"{counts.results + counts.errors:,} lines")
    return counts
