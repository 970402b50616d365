"""Export a finished job: results to JSONL (OpenAI batch output lines) or Parquet, chosen by the
output file's extension, and failures to a separate JSONL error file.

Every input line ends up in exactly one of the two files: a completed request in the results, a
failed, cancelled or expired request and every line rejected at submit (error_history, kind
"validation") in the errors, each error line carrying its input `"line"`. Both files are written
in input order (the request rows are read by line, which their unique index serves).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from db.enums import RequestStatus
from db.models import Request
from db.records import ErrorEvent
from db.repository import iter_requests, job_errors
from db.repository.jobs import CLOSED_ERRORS
from pipeline.errors import PipelineError
from pipeline.output_paths import check_output_paths
from pipeline.line_ids import rejected_line_ids, request_line_ids
from pipeline.output_writer import JsonlResultWriter, ParquetResultWriter, ResultRecord
from pipeline.request_spec import URL_ENDPOINTS
from pipeline.submit import VALIDATION_KIND, require_job, split_validation_message

PROGRESS_EVERY = 1_000  # lines between two `on_progress` calls


@dataclass(frozen=True, slots=True)
class ExportCounts:
    """How many lines went to each file (errors are counted even when no error file was asked for)."""

    results: int
    errors: int


class JobNotFinished(PipelineError):
    """Export asked for a job that is still running: its files would miss lines."""


def export_results(
    session_factory: sessionmaker[Session],
    job_id: str,
    out_path: str | Path,
    errors_path: str | Path | None = None,
    ordered: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
    tenant_id: str | None = None,
) -> ExportCounts:
    """Write job `job_id`'s results to `out_path` (.jsonl: OpenAI batch lines; .parquet: flat
    columns) and its failures to `errors_path` (.jsonl) when given. Output is always in input
    order, so `ordered` costs nothing and is accepted for the CLI's sake.

    Raises ValueError for an unknown job (or one of another tenant than `tenant_id`, when given), JobNotFinished for one that is not finished, OutputError
    for a path `check_output_paths` refuses (checked before anything is read) or a file that cannot
    be created. Files are written atomically (never half a file).
    `on_progress(lines written, lines of the job)` is called as the files are written.
    """
    del ordered  # always in order: see the docstring
    with session_factory() as session:
        job = require_job(session, job_id, tenant_id=tenant_id)
        paths = check_output_paths(out_path, errors_path, input_file=job.input_file)
        if not job.status.is_terminal:
            raise JobNotFinished(f"job {job_id} is {job.status.value} ({job.request_completed + job.request_failed}"
                                 f"/{job.request_total} lines done); wait for it with `pipeline status {job_id}`")
        # Bad lines are few next to the file; held in memory to merge them into input order.
        rejected = job_errors(session, job_id, kind=VALIDATION_KIND)
        rejected.sort(key=lambda e: e.line or 0)
        out_cls = ParquetResultWriter if paths.results_format == "parquet" else JsonlResultWriter
        results, errors = 0, 0
        with out_cls(paths.results) as out:
            err = JsonlResultWriter(paths.errors, include_line=True) if paths.errors is not None else None
            try:
                pos = 0
                next_report = PROGRESS_EVERY  # rejected lines join in bulk: a threshold, not a modulo
                for request in iter_requests(session, job_id):
                    while pos < len(rejected) and (rejected[pos].line or 0) < request.line:
                        errors += _write_error(err, _rejected_record(job_id, job.model, rejected[pos]))
                        pos += 1
                    record = _request_record(request, job_id, job.model)
                    if record.ok:
                        out.write(record)
                        results += 1
                    else:
                        errors += _write_error(err, record)
                    if on_progress is not None and results + errors >= next_report:
                        on_progress(results + errors, job.request_total)
                        next_report += PROGRESS_EVERY
                for event in rejected[pos:]:
                    errors += _write_error(err, _rejected_record(job_id, job.model, event))
            except BaseException:
                if err is not None:
                    err.abort()
                raise
            if err is not None:
                err.close()
    return ExportCounts(results=results, errors=errors)


def _write_error(writer: JsonlResultWriter | None, record: ResultRecord) -> int:
    if writer is not None:
        writer.write(record)
    return 1


def _request_record(request: Request, job_id: str, model: str) -> ResultRecord:
    created = int(request.completed_at.timestamp()) if request.completed_at is not None else 0
    common = dict(custom_id=request.custom_id, line=request.line, ids=request_line_ids(job_id, request.id),
                  endpoint=URL_ENDPOINTS[request.endpoint], model=model, created=created,
                  queue_wait_s=request.queue_wait_s, latency_s=request.latency_s, ttft_s=request.ttft_s)
    if request.status == RequestStatus.COMPLETED:
        return ResultRecord(**common, text=request.text or "", finish_reason=request.finish_reason,
                            prompt_tokens=request.prompt_tokens or 0, cached_tokens=request.cached_tokens or 0,
                            completion_tokens=request.completion_tokens or 0)
    if request.status == RequestStatus.FAILED:  # it ran (or was tried) and failed on its own
        return ResultRecord(**common, error_code=request.error_code or "failed",
                            error_message=request.error_message or "the request failed")
    if request.status in CLOSED_ERRORS:
        # Cancel and expiry put their own code on the lines they close (`CLOSED_ERRORS`); rows
        # closed before they did carry none, and get the same code here.
        code, message = CLOSED_ERRORS[request.status]
        return ResultRecord(**common, error_code=request.error_code or code,
                            error_message=request.error_message or message, never_ran=True)
    # A job can only be finished with pending rows through cancel or expiry, which close them; a
    # pending row left here would be a bug, reported rather than dropped.
    return ResultRecord(**common, error_code="not_run", error_message=f"the request was not run ({request.status.value})",
                        never_ran=True)


def _rejected_record(job_id: str, model: str, event: ErrorEvent) -> ResultRecord:
    code, message = split_validation_message(event.message)
    return ResultRecord(custom_id=event.custom_id, line=event.line or 0, ids=rejected_line_ids(job_id, event.line or 0),
                        endpoint="completions", model=model, created=int(event.created_at.timestamp()),
                        error_code=code, error_message=message, never_ran=True)
