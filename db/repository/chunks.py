"""Chunks: grouping a job's requests into units of work, leasing them to workers, finding lost ones."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta

from sqlalchemy import Select, and_, case, func, or_, select, update
from sqlalchemy.orm import Session

from db.base import utcnow
from db.enums import ChunkStatus, Priority, RequestStatus
from db.models import Chunk, Job, Request
from db.repository._locks import batches, write_lock
from db.repository.jobs import finish_job_if_done
from db.repository.records import record_error
from db.repository.requests import fail_requests

LOST_AFTER = timedelta(minutes=10)
# Error code (and error-history kind) of the requests of a chunk that used up its deliveries.
WORKER_LOST = "worker_lost"


ASSIGN_FETCH_SIZE = 2_000  # rows per fetch while packing: memory stays flat however large the job


def assign_chunks(session: Session, job_id: str, max_requests: int, *, now: datetime | None = None) -> list[Chunk]:
    """Group the job's pending, unassigned requests into new pending chunks of at most
    `max_requests`, numbered after the job's existing chunks. Returns them in `seq` order.

    - A session's turns form one unit, in turn order, placed by its first turn's prefix key; a
      session longer than `max_requests` gets a chunk of its own (its turns must run in order).
    - Requests (and session units) with equal `prefix_key` form a group. A group that fits in one
      chunk is never split; a larger one fills consecutive chunks. Small groups share chunks.
    - Groups are placed in order of their first input line; requests without a prefix key are
      groups of their own.
    - A chunk holds requests of one priority (a request's own, else its job's) and gets that
      priority, so each line goes to the queue it asked for; the highest priority is packed first.
      (Submit makes a session's lines share one priority.)

    The grouping is done by the database (window functions, `_packing_order`), which streams the
    requests in packing order; Python only holds the chunk being filled, so a job of millions of
    requests is cut in constant memory.
    """
    if max_requests < 1:
        raise ValueError(f"max_requests must be >= 1, got {max_requests}")
    now = now or utcnow()
    write_lock(session)
    job = session.get(Job, job_id, with_for_update=True, populate_existing=True)  # one assigner at a time
    if job is None:
        raise ValueError(f"no job {job_id!r}")
    next_seq = session.scalar(select(func.coalesce(func.max(Chunk.seq) + 1, 0)).where(Chunk.job_id == job_id))
    chunks: list[Chunk] = []
    priorities = list(Priority)  # a chunk's rank in `_packing_order` is its index here

    def close(ids: list[int]) -> None:
        chunks.append(_new_chunk(session, job, next_seq + len(chunks), ids, priorities[rank], now))

    current: list[int] = []
    rank: int = -1
    group: object = None
    unit: object = None
    rows = session.execute(_packing_order(job_id, job.priority).execution_options(yield_per=ASSIGN_FETCH_SIZE))
    for request_id, row_rank, group_key, group_size, unit_key, unit_size in rows:
        if row_rank != rank:  # a chunk goes to one queue: a new priority starts a new chunk
            if current:
                close(current)
                current = []
            rank, group, unit = row_rank, None, None
        if group_key != group:  # a new group goes whole into the current chunk if it fits
            group = group_key
            if current and len(current) + group_size > max_requests:
                close(current)
                current = []
        if unit_key != unit:  # a group larger than a chunk is split between units, never inside one
            unit = unit_key
            if current and len(current) + unit_size > max_requests:
                close(current)
                current = []
        current.append(request_id)
    if current:
        close(current)
    return chunks


def _packing_order(job_id: str, job_priority: Priority) -> Select:
    """The job's pending, unassigned requests in packing order, each with (id, priority rank, group
    key, group size, unit key, unit size): by priority (rank: index in `Priority`, highest first),
    then groups by their first line, units within a group by their first line, a session's turns in
    turn order. Groups never span two priorities."""
    pending = and_(Request.job_id == job_id, Request.status == RequestStatus.PENDING, Request.chunk_id.is_(None))
    rank = case(*((Request.priority == p, i) for i, p in enumerate(Priority)),
                else_=list(Priority).index(job_priority))
    # A unit is a session, or a request on its own: (session_id, NULL) or (NULL, id).
    unit = (Request.session_id, case((Request.session_id.is_(None), Request.id)))
    turn_order = (Request.turn.asc().nulls_first(), Request.line)
    units = (
        select(
            Request.id,
            Request.line,
            Request.turn,
            rank.label("rank"),
            func.min(Request.line).over(partition_by=unit).label("unit_line"),
            func.count().over(partition_by=unit).label("unit_size"),
            # A session is placed by its first turn's prefix key.
            func.first_value(Request.prefix_key).over(partition_by=unit, order_by=turn_order).label("unit_prefix"),
        )
        .where(pending)
        .subquery()
    )
    # A group is the units of one priority and prefix key, or a keyless unit on its own.
    group = (units.c.rank, units.c.unit_prefix, case((units.c.unit_prefix.is_(None), units.c.unit_line)))
    grouped = select(
        units.c.id,
        units.c.line,
        units.c.turn,
        units.c.rank,
        units.c.unit_line,
        units.c.unit_size,
        func.min(units.c.unit_line).over(partition_by=group).label("group_line"),
        func.count().over(partition_by=group).label("group_size"),
    ).subquery()
    return select(grouped.c.id, grouped.c.rank, grouped.c.group_line, grouped.c.group_size, grouped.c.unit_line,
                  grouped.c.unit_size).order_by(grouped.c.rank, grouped.c.group_line, grouped.c.unit_line,
                                                grouped.c.turn.asc().nulls_first(), grouped.c.line)


def _new_chunk(session: Session, job: Job, seq: int, request_ids: list[int], priority: Priority,
               now: datetime) -> Chunk:
    # Every column is given, None included: the ORM treats a column never set on a new object as
    # NULL for good, and a later bulk UPDATE of the row would not refresh it on this object.
    chunk = Chunk(job_id=job.id, seq=seq, priority=priority, status=ChunkStatus.PENDING,
                  num_requests=len(request_ids), attempts=0, created_at=now, enqueued_at=None,
                  lease_expires_at=None, worker=None, finished_at=None)
    session.add(chunk)
    session.flush()
    for batch in batches(request_ids):
        session.execute(update(Request).where(Request.id.in_(batch)).values(chunk_id=chunk.id)
                        .execution_options(synchronize_session=False))
    return chunk


def get_chunk(session: Session, chunk_id: int) -> Chunk | None:
    return session.get(Chunk, chunk_id)


def mark_chunks_queued(session: Session, chunk_ids: Iterable[int], *, now: datetime | None = None) -> int:
    """Record that tasks were sent for these chunks (first dispatch or a re-enqueue of lost ones):
    status queued, `enqueued_at` now, any expired lease cleared. Done chunks and chunks under a live
    lease are left alone. Returns how many changed."""
    now = now or utcnow()
    ids = list(chunk_ids)
    if not ids:
        return 0
    return session.execute(
        update(Chunk)
        .where(
            Chunk.id.in_(ids),
            Chunk.status != ChunkStatus.DONE,
            or_(Chunk.lease_expires_at.is_(None), Chunk.lease_expires_at <= now),
        )
        .values(status=ChunkStatus.QUEUED, enqueued_at=now, lease_expires_at=None, worker=None)
        .execution_options(synchronize_session="fetch")
    ).rowcount


def claim_chunk(
    session: Session, chunk_id: int, *, worker: str, lease: timedelta, now: datetime | None = None
) -> Chunk | None:
    """Lease a chunk to `worker` until now + `lease`: status running, attempts + 1 (also on its
    pending requests). None if the chunk is done or another worker holds a live lease (a duplicate
    delivery); an expired lease can be taken over. One conditional UPDATE, so two workers racing
    for a chunk never both win."""
    if lease <= timedelta(0):
        raise ValueError(f"lease must be positive, got {lease}")
    now = now or utcnow()
    claimed = session.execute(
        update(Chunk)
        .where(
            Chunk.id == chunk_id,
            Chunk.status != ChunkStatus.DONE,
            or_(Chunk.lease_expires_at.is_(None), Chunk.lease_expires_at <= now),
        )
        .values(status=ChunkStatus.RUNNING, attempts=Chunk.attempts + 1, lease_expires_at=now + lease, worker=worker)
        .execution_options(synchronize_session=False)
    ).rowcount
    if claimed != 1:
        return None
    session.execute(
        update(Request)
        .where(Request.chunk_id == chunk_id, Request.status == RequestStatus.PENDING)
        .values(attempts=Request.attempts + 1)
        .execution_options(synchronize_session="evaluate")
    )
    return session.get(Chunk, chunk_id, populate_existing=True)


def deliveries_used_up(attempts: int, max_redeliveries: int | None) -> bool:
    """True when a chunk claimed `attempts` times may not be claimed again: its first delivery and
    `max_redeliveries` more were all started and none finished. None: no cap."""
    return max_redeliveries is not None and attempts >= 1 + max_redeliveries


def fail_lost_chunk(session: Session, chunk_id: int, *, tries: int, now: datetime | None = None) -> int:
    """Give up on a chunk started `tries` times that never finished (each time its worker died,
    was killed, or the run failed): its pending requests fail with `WORKER_LOST`, the error history
    says so once for the chunk, and the job completes if nothing else is pending. Returns how many
    requests were failed: 0 when another giver-up (the beat's sweep and a redelivered task race for
    an expired lease) got there first, and then nothing is recorded again."""
    chunk = session.get(Chunk, chunk_id)
    if chunk is None:
        raise ValueError(f"no chunk {chunk_id}")
    times = "1 time" if tries == 1 else f"{tries} times"
    message = (f"chunk {chunk_id} was started {times} and never finished (its worker was killed, "
               "ran out of memory or crashed each time); it is not tried again. Look for the cause in the "
               "worker logs and the error history, then run `pipeline retry` for the job")
    pending = select(Request.id).where(Request.chunk_id == chunk_id, Request.status == RequestStatus.PENDING)
    failed = fail_requests(session, list(session.scalars(pending)), code=WORKER_LOST, message=message, now=now)
    if failed:
        record_error(session, WORKER_LOST, message, job_id=chunk.job_id, chunk_id=chunk_id, now=now)
    finish_job_if_done(session, chunk.job_id)
    return failed


def renew_lease(session: Session, chunk_id: int, *, worker: str, lease: timedelta, now: datetime | None = None) -> bool:
    """Extend `worker`'s lease on a running chunk (a heartbeat during a long chunk). False if the
    worker no longer holds it (the lease expired and another worker took the chunk, or it is done)."""
    now = now or utcnow()
    return (
        session.execute(
            update(Chunk)
            .where(
                Chunk.id == chunk_id,
                Chunk.status == ChunkStatus.RUNNING,
                Chunk.worker == worker,
                Chunk.lease_expires_at > now,
            )
            .values(lease_expires_at=now + lease)
            .execution_options(synchronize_session="fetch")
        ).rowcount
        == 1
    )


def lost_chunks(session: Session, now: datetime | None = None, *, stale_after: timedelta = LOST_AFTER,
                broker_started_at: datetime | None = None) -> list[Chunk]:
    """Unfinished chunks whose task message was probably lost, oldest first:

    - running, and the lease has expired (the worker died or hung);
    - queued more than `stale_after` ago and never leased (the broker lost the message);
    - pending (created, never sent) more than `stale_after` ago (the dispatcher died);
    - queued or pending since before `broker_started_at`, however recently: a broker that keeps
      nothing on disk lost every message it held when it restarted (one that keeps them only
      costs a duplicate delivery, which is harmless).

    The sweep re-sends their tasks and calls `mark_chunks_queued`.
    """
    now = now or utcnow()
    cutoff = now - stale_after
    if broker_started_at is not None:
        cutoff = max(cutoff, broker_started_at)
    query = select(Chunk).where(
        or_(
            and_(Chunk.status == ChunkStatus.RUNNING, Chunk.lease_expires_at <= now),
            and_(Chunk.status == ChunkStatus.QUEUED, Chunk.enqueued_at <= cutoff),
            and_(Chunk.status == ChunkStatus.PENDING, Chunk.created_at <= cutoff),
        )
    )
    return list(session.scalars(query.order_by(Chunk.created_at, Chunk.id)))
