"""Error history, usage and cost, conversation sessions."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Select, delete, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.base import utcnow
from db.models import Job
from db.records import ErrorEvent, JobUsage, SessionRecord
from db.repository._locks import write_lock
from db.results import storable_text

ERROR_FIELDS = ("job_id", "tenant_id", "chunk_id", "line", "custom_id", "kind", "message", "traceback", "created_at")


def record_error(
    session: Session,
    kind: str,
    message: str,
    *,
    job_id: str | None = None,
    chunk_id: int | None = None,
    line: int | None = None,
    custom_id: str | None = None,
    traceback: str | None = None,
    now: datetime | None = None,
) -> ErrorEvent:
    """Add one error to the history. `message` is what users see; `traceback` is for operators.
    The row carries its job's tenant."""
    tenant_id = None if job_id is None else session.scalar(select(Job.tenant_id).where(Job.id == job_id))
    event = ErrorEvent(
        kind=kind,
        message=message,
        job_id=job_id,
        tenant_id=tenant_id,
        chunk_id=chunk_id,
        line=line,
        custom_id=custom_id,
        traceback=traceback,
        created_at=now or utcnow(),
    )
    session.add(event)
    session.flush()
    return event


def record_errors(
    session: Session, events: Iterable[Mapping[str, Any]], *, batch_size: int = 5_000, now: datetime | None = None
) -> int:
    """Bulk-add errors (e.g. every bad line of a file); keys are `ERROR_FIELDS`, kind and message
    required; give `tenant_id` with `job_id` (the job's tenant: no lookup per row here). Consumed in
    batches, like `add_requests`. Returns how many."""
    now = now or utcnow()
    total = 0
    batch: list[dict[str, Any]] = []
    for event in events:
        unknown = event.keys() - set(ERROR_FIELDS)
        if unknown or event.get("kind") is None or event.get("message") is None:
            raise ValueError(f"error events need kind and message and only {ERROR_FIELDS}; got {sorted(event)}")
        values = {field: event.get(field) for field in ERROR_FIELDS}
        values["created_at"] = values["created_at"] or now
        batch.append(values)
        if len(batch) == batch_size:
            session.execute(insert(ErrorEvent), batch)
            total, batch = total + len(batch), []
    if batch:
        session.execute(insert(ErrorEvent), batch)
        total += len(batch)
    return total


def job_errors(session: Session, job_id: str, *, kind: str | None = None) -> list[ErrorEvent]:
    """A job's error history, oldest first."""
    query = select(ErrorEvent).where(ErrorEvent.job_id == job_id)
    if kind is not None:
        query = query.where(ErrorEvent.kind == kind)
    return list(session.scalars(query.order_by(ErrorEvent.created_at, ErrorEvent.id)))


def add_usage(
    session: Session,
    job_id: str,
    *,
    prompt_tokens: int = 0,
    cached_tokens: int = 0,
    completion_tokens: int = 0,
    compute_seconds: float = 0.0,
    cost: Decimal = Decimal(0),
    currency: str = "USD",
    now: datetime | None = None,
) -> JobUsage:
    """Add to a job's usage totals (created on first use). One atomic upsert, so concurrent chunks
    of a job add up. Pass the sums from `RecordOutcome` so a redelivered chunk adds nothing.
    The row carries its job's tenant.
    A currency other than the one the job's usage is kept in raises ValueError."""
    amounts = {
        "prompt_tokens": prompt_tokens,
        "cached_tokens": cached_tokens,
        "completion_tokens": completion_tokens,
        "compute_seconds": compute_seconds,
        "cost": cost,
    }
    negative = sorted(name for name, value in amounts.items() if value < 0)
    if negative:
        raise ValueError(f"usage amounts must not be negative: {negative}")
    now = now or utcnow()
    tenant_id = session.scalar(select(Job.tenant_id).where(Job.id == job_id))
    table = JobUsage.__table__
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        statement = postgresql.insert(table)
    elif dialect == "sqlite":
        statement = sqlite.insert(table)
    else:
        raise NotImplementedError(f"add_usage supports PostgreSQL and SQLite, not {dialect}")
    statement = statement.values(job_id=job_id, tenant_id=tenant_id, currency=currency, updated_at=now, **amounts)
    statement = statement.on_conflict_do_update(
        index_elements=[table.c.job_id],
        set_={name: table.c[name] + statement.excluded[name] for name in amounts} | {"updated_at": now},
    ).returning(table.c.currency)
    stored_currency = session.execute(statement).scalar_one()
    if stored_currency != currency:
        raise ValueError(f"job {job_id}: usage is kept in {stored_currency}, cannot add {currency}")
    return session.get(JobUsage, job_id, populate_existing=True)


def get_usage(session: Session, job_id: str) -> JobUsage | None:
    return session.get(JobUsage, job_id)


def get_session(session: Session, session_id: str, *, tenant_id: str | None = None) -> SessionRecord | None:
    """The conversation `session_id` of `tenant_id` (None: the tenant-less namespace)."""
    return session.scalar(_session_query(session_id, tenant_id))


def upsert_session(
    session: Session,
    session_id: str,
    messages: Sequence[Mapping[str, str]],
    *,
    tenant_id: str | None = None,
    job_id: str | None = None,
    now: datetime | None = None,
) -> SessionRecord:
    """Append one turn's `messages` ([{"role", "content"}, ...], usually the user prompt and the
    assistant answer) to a session, creating it on first use; turns + 1, last use stamped.

    Call it for requests that `record_results` actually wrote (its `written_ids`), so a redelivered
    chunk does not append a turn twice.
    """
    for message in messages:
        if set(message) != {"role", "content"} or not all(isinstance(v, str) for v in message.values()):
            raise ValueError(f"session messages are {{'role': str, 'content': str}}, got {message!r}")
    now = now or utcnow()
    write_lock(session)
    record = session.scalar(_session_query(session_id, tenant_id).with_for_update())
    if record is None:
        record = SessionRecord(session_id=session_id, tenant_id=tenant_id, turns=0, history=[], created_at=now)
        try:
            with session.begin_nested():
                session.add(record)
        except IntegrityError:  # created concurrently: append to that one
            record = session.scalar(_session_query(session_id, tenant_id).with_for_update())
            if record is None:
                raise
    turn = [{"role": m["role"], "content": storable_text(m["content"])} for m in messages]
    record.history = [*record.history, *turn]  # a new list: JSON is not mutable-tracked
    record.turns += 1
    record.job_id = job_id
    record.last_used_at = now
    session.flush()
    return record


def delete_idle_sessions(session: Session, before: datetime) -> int:
    """Delete sessions last used before `before` (the beat cleanup); returns how many."""
    return session.execute(
        delete(SessionRecord)
        .where(SessionRecord.last_used_at < before)
        .execution_options(synchronize_session="evaluate")
    ).rowcount


def _session_query(session_id: str, tenant_id: str | None) -> Select:
    tenant = SessionRecord.tenant_id.is_(None) if tenant_id is None else SessionRecord.tenant_id == tenant_id
    return select(SessionRecord).where(SessionRecord.session_id == session_id, tenant)
