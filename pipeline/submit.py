"""Submit an input file as a job: validate it line by line, store its requests, cut them into
chunks and hand each chunk to `send_chunk` (a Celery task in production, a list in `pipeline run`).

The schema must already exist (`pipeline db upgrade`); this module never migrates.

Bad lines: each becomes an `error_history` row (kind "validation", with its line number and
custom_id) and counts in the job's `request_total` and `request_failed`, so `status` adds up and
`results --errors` lists it. They are not request rows: nothing bad can reach a worker, and
`retry_failed` (which re-runs failed request rows) can never resend them. The error code is kept
at the start of the message, `[code] field: message`, since error_history has no code column.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from kombu.exceptions import OperationalError as KombuOperationalError
from redis.exceptions import RedisError
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from db.enums import JobStatus, Priority
from db.models import Chunk, Job, Request
from db.repository import (
    DEFAULT_TENANT,
    add_requests,
    assign_chunks,
    create_job,
    ensure_tenant,
    get_job,
    get_usage,
    mark_chunks_queued,
    record_errors,
    set_status,
)
from pipeline.batch_object import batch_object
from pipeline.errors import ChunksNotQueued, InputError, TenantDisabled
from pipeline.input_reader import read_requests
from pipeline.queues import queue_for
from pipeline.request_spec import ENDPOINT_URLS, LineError, RequestSpec
from pipeline.served_model import ServedModel
from pipeline.settings import Settings

SendChunk = Callable[[int, str], None]  # (chunk id, queue name)
OnProgress = Callable[[int, int], None]  # (lines read, lines rejected so far)

VALIDATION_KIND = "validation"
BATCH_SIZE = 5_000
PROGRESS_EVERY = 1_000  # lines between two `on_progress` calls
MAX_JOB_ERRORS = 100  # line errors copied onto a strict job's `errors` (all are in error_history)
DIGEST_READ_BYTES = 1024 * 1024
PREFIX_CHARS = 256  # requests whose prompts agree on this many leading characters share a chunk
# Codes may hold digits ("not_utf8"): without 0-9 such a line was exported as "invalid_request"
# with "[not_utf8]" left in its message.
_CODED = re.compile(r"\[([a-z0-9_]+)\] (.*)", re.DOTALL)


def submit_file(
    settings: Settings,
    session_factory: sessionmaker[Session],
    path: str | Path,
    *,
    priority: str = "normal",
    model: str | None = None,
    idempotency_key: str | None = None,
    strict: bool = False,
    completion_window: timedelta | None = None,
    tenant: str = DEFAULT_TENANT,
    metadata: dict[str, str] | None = None,
    input_file: str | None = None,
    send_chunk: SendChunk,
    on_progress: OnProgress | None = None,
) -> dict[str, Any]:
    """Submit `path` and return the job summary (`job_summary`). `on_progress(read, rejected)` is
    called as lines are validated and stored.

    One transaction stores the job, its requests, its errors and its chunks, so a crash midway
    leaves no half job behind (and a retried submit with the same idempotency key starts afresh).
    Tasks are sent only after that commit, so no worker can look for rows that are not there yet.
    A key used before returns that job as it is now, sending nothing, when the file is the same
    (its SHA-256 is stored with the job); another file raises IdempotencyKeyReused, naming the job.
    `model` (None: the settings' model) may be one of `settings.model_aliases`; a line naming a
    model not served is rejected.
    The job belongs to the tenant named `tenant` (created on first use): its sessions, idempotency
    keys and prefix-cache blocks are its own. `input_file` is what the job records as its input
    (default: the file's absolute path; the API server gives its file id).
    Raises InputError when the file cannot be read at all, ValueError for a bad priority or tenant
    name, TenantDisabled for a disabled tenant.
    """
    job_priority = Priority(queue_for(priority).value)  # queue_for raises ValueError naming the choices
    path = Path(path)
    served = ServedModel.for_job(model, settings.model, settings.model_aliases)
    specs = read_requests(path, served=served)  # raises InputError now for an unreadable file
    # One more read of the file, only with a key: its digest must be known before the job is looked up.
    digest = file_digest(path) if idempotency_key is not None else None
    with session_factory.begin() as session:
        owner = ensure_tenant(session, tenant)
        if owner.is_disabled:
            raise TenantDisabled(tenant)
        job = create_job(session, input_file=input_file or str(path.resolve()), model=served.name,
                         priority=job_priority, idempotency_key=idempotency_key, input_digest=digest,
                         strict=strict, completion_window=completion_window, tenant_id=owner.id,
                         metadata=metadata)
        if job.status != JobStatus.VALIDATING or job.request_total > 0:  # an earlier submit with this key
            return job_summary(session, job.id)
        job_id = job.id
        num_bad, first_errors = _ingest(session, job_id, owner.id, specs, strict, on_progress)
        if strict and num_bad:
            session.get(Job, job_id).errors = first_errors
            set_status(session, job_id, JobStatus.FAILED)
            return job_summary(session, job_id)
        chunks = assign_chunks(session, job_id, settings.chunk_size)
        set_status(session, job_id, JobStatus.IN_PROGRESS)
        if not chunks:  # every line was bad: nothing will run, so the job is finished now
            set_status(session, job_id, JobStatus.FINALIZING)
            set_status(session, job_id, JobStatus.COMPLETED)
        sends = [(chunk.id, chunk.priority.value) for chunk in chunks]
    try:
        send_chunks(session_factory, sends, send_chunk)
    except (OSError, KombuOperationalError, RedisError) as e:  # what sending raises with Redis away
        raise ChunksNotQueued(
            f"job {job_id} is stored, but its tasks could not be queued ({e}); beat's lost-chunk sweep "
            "queues them once the broker is back (check PIPELINE_BROKER_URL and that Redis runs). Do not "
            "submit the file again without --idempotency-key: that would make a second job") from e
    with session_factory.begin() as session:
        return job_summary(session, job_id)


def file_digest(path: Path) -> str:
    """The SHA-256 of the file's bytes (hex), read in pieces. Raises InputError if it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while piece := f.read(DIGEST_READ_BYTES):
                digest.update(piece)
    except OSError as e:
        raise InputError(path, f"cannot read it ({e.strerror})") from None
    return digest.hexdigest()


def send_chunks(session_factory: sessionmaker[Session], sends: list[tuple[int, str]], send_chunk: SendChunk,
                *, now: datetime | None = None) -> int:
    """Send a task for each (chunk id, queue), then mark the chunks queued; returns how many were
    marked. Used by submit and by the lost-chunk sweep. Sent before marked: a crash in between
    leaves chunks that the sweep finds and sends again (a duplicate delivery is harmless)."""
    for chunk_id, queue in sends:
        send_chunk(chunk_id, queue)
    with session_factory.begin() as session:
        return mark_chunks_queued(session, [chunk_id for chunk_id, _ in sends], now=now)


def require_job(session: Session, job_id: str, *, tenant_id: str | None = None) -> Job:
    """The job `job_id` (of `tenant_id` when given); ValueError, saying where ids come from, for an
    unknown one. Another tenant's job is answered exactly as a job that does not exist."""
    job = get_job(session, job_id)
    if job is None or (tenant_id is not None and job.tenant_id != tenant_id):
        raise ValueError(f"no job {job_id!r}; `pipeline submit` prints the ids of new jobs")
    return job


def job_summary(session: Session, job_id: str, *, tenant_id: str | None = None) -> dict[str, Any]:
    """The job as `pipeline status --json` shows it: OpenAI's batch object (`batch_object`),
    timestamps in unix seconds. Raises ValueError for an unknown id (or one of another tenant than
    `tenant_id`, when given)."""
    job = require_job(session, job_id, tenant_id=tenant_id)
    session.refresh(job)
    usage = get_usage(session, job_id)
    if usage is not None:
        session.refresh(usage)
    return batch_object(job, usage)


def chunks_taken(session: Session, job_id: str) -> bool:
    """Whether a worker has ever leased a chunk of the job (a chunk with an attempt)."""
    return session.scalar(select(Chunk.id).where(Chunk.job_id == job_id, Chunk.attempts > 0).limit(1)) is not None


def split_validation_message(message: str) -> tuple[str, str]:
    """(code, message) of a validation error stored by submit; ("invalid_request", message) otherwise."""
    match = _CODED.fullmatch(message)
    return (match[1], match[2]) if match else ("invalid_request", message)


def _ingest(session: Session, job_id: str, tenant_id: str, specs: Any, strict: bool,
            on_progress: OnProgress | None) -> tuple[int, list[dict[str, Any]]]:
    """Store every good line as a request and every bad one as an error; returns (bad lines, the
    first `MAX_JOB_ERRORS` of them as job errors). Strict mode stops storing requests at the first
    bad line but reads on, so the user learns of every bad line at once."""
    rows: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    first_errors: list[dict[str, Any]] = []
    num_bad = 0
    turns: dict[str, int] = {}  # session_id -> turns seen: a session's lines run in file order
    endpoints: set[str] = set()
    for num_read, item in enumerate(specs, 1):
        if on_progress is not None and num_read % PROGRESS_EVERY == 0:
            on_progress(num_read, num_bad)
        if isinstance(item, LineError):
            num_bad += 1
            if len(first_errors) < MAX_JOB_ERRORS:
                first_errors.append({"code": item.code, "message": str(item), "line": item.line})
            errors.append(_error_row(job_id, tenant_id, item))
        elif not (strict and num_bad):
            rows.append(_request_row(item, turns))
            endpoints.add(rows[-1]["endpoint"])
        if len(rows) >= BATCH_SIZE:
            add_requests(session, job_id, rows)
            rows = []
        if len(errors) >= BATCH_SIZE:
            record_errors(session, errors)
            errors = []
    if rows and not (strict and num_bad):
        add_requests(session, job_id, rows)
    if errors:
        record_errors(session, errors)
    if strict and num_bad:
        # A strict job with a bad line runs nothing: the requests stored before that line go again,
        # and the counts stay at zero (the job's `errors` and error_history say why).
        session.execute(delete(Request).where(Request.job_id == job_id))
        session.execute(update(Job).where(Job.id == job_id).values(request_total=0)
                        .execution_options(synchronize_session="fetch"))
    else:
        session.execute(
            update(Job).where(Job.id == job_id)
            .values(request_total=Job.request_total + num_bad, request_failed=Job.request_failed + num_bad,
                    endpoint=",".join(sorted(endpoints)))
            .execution_options(synchronize_session="fetch")
        )
    return num_bad, first_errors


def _request_row(spec: RequestSpec, turns: dict[str, int]) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": spec.prompt} if spec.prompt is not None else {
        "messages": [dict(m) for m in spec.messages or ()]}
    body.update(spec.params_dict())
    body["model"] = spec.model
    endpoint = ENDPOINT_URLS[spec.endpoint]
    turn = None
    if spec.session_id is not None:
        turn = turns.get(spec.session_id, 0)
        turns[spec.session_id] = turn + 1
    return {
        "line": spec.line,
        "custom_id": spec.custom_id,
        "endpoint": endpoint,
        "body": body,
        "prefix_key": _prefix_key(spec),
        "dedupe_key": _dedupe_key(endpoint, body) if spec.session_id is None else None,
        "session_id": spec.session_id,
        "turn": turn,
        "priority": spec.priority,
    }


def _dedupe_key(endpoint: str, body: dict[str, Any]) -> str | None:
    """Equal for requests whose answers are equal (same endpoint, prompt or messages, sampling
    parameters and model), which only holds when sampling is deterministic: greedy, or seeded.
    None otherwise. A session turn has none: its prompt includes the session's history."""
    if body["temperature"] != 0 and body["seed"] is None:
        return None
    canonical = json.dumps([endpoint, body], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


def _prefix_key(spec: RequestSpec) -> str:
    # Characters, not tokens: submit has no tokenizer (and must not load torch). Chat requests are
    # keyed on their rendered-order messages so a shared system prompt groups them.
    text = spec.prompt if spec.prompt is not None else json.dumps(list(spec.messages or ()), ensure_ascii=False)
    return hashlib.sha256(f"{spec.endpoint}\0{text[:PREFIX_CHARS]}".encode("utf-8", "surrogatepass")).hexdigest()


def _error_row(job_id: str, tenant_id: str, error: LineError) -> dict[str, Any]:
    detail = error.message if error.field is None else f"{error.field}: {error.message}"
    return {"job_id": job_id, "tenant_id": tenant_id, "line": error.line, "custom_id": error.custom_id, "kind": VALIDATION_KIND,
            "message": f"[{error.code}] {detail}"}
