"""Chunks: grouping a job's requests into units of work, leasing them to workers, finding lost ones."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import NamedTuple

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from db.base import utcnow
from db.enums import ChunkStatus, RequestStatus
from db.models import Chunk, Job, Request
from db.repository._locks import batches, write_lock

LOST_AFTER = timedelta(minutes=10)


class _Pending(NamedTuple):
    id: int
    line: int
    prefix_key: str | None
    session_id: str | None
    turn: int | None


def assign_chunks(session: Session, job_id: str, max_requests: int, *, now: datetime | None = None) -> list[Chunk]:
    """Group the job's pending, unassigned requests into new pending chunks of at most
    `max_requests`, numbered after the job's existing chunks. Returns them in `seq` order.

    - A session's turns form one unit, in turn order, placed by its first turn's prefix key; a
      session longer than `max_requests` gets a chunk of its own (its turns must run in order).
    - Requests (and session units) with equal `prefix_key` form a group. A group that fits in one
      chunk is never split; a larger one fills consecutive chunks. Small groups share chunks.
    - Groups are placed in order of their first input line; requests without a prefix key are
      groups of their own.
    """
    if max_requests < 1:
        raise ValueError(f"max_requests must be >= 1, got {max_requests}")
    now = now or utcnow()
    write_lock(session)
    job = session.get(Job, job_id, with_for_update=True, populate_existing=True)  # one assigner at a time
    if job is None:
        raise ValueError(f"no job {job_id!r}")
    rows = session.execute(
        select(Request.id, Request.line, Request.prefix_key, Request.session_id, Request.turn)
        .where(Request.job_id == job_id, Request.status == RequestStatus.PENDING, Request.chunk_id.is_(None))
        .order_by(Request.line)
    ).all()
    packed = _pack(_prefix_groups([_Pending(*row) for row in rows]), max_requests)
    if not packed:
        return []
    first_seq = session.scalar(select(func.coalesce(func.max(Chunk.seq) + 1, 0)).where(Chunk.job_id == job_id))
    # Every column is given, None included: the ORM treats a column never set on a new object as
    # NULL for good, and a later bulk UPDATE of the row would not refresh it on this object.
    chunks = [
        Chunk(
            job_id=job_id,
            seq=first_seq + i,
            priority=job.priority,
            status=ChunkStatus.PENDING,
            num_requests=len(ids),
            attempts=0,
            created_at=now,
            enqueued_at=None,
            lease_expires_at=None,
            worker=None,
            finished_at=None,
        )
        for i, ids in enumerate(packed)
    ]
    session.add_all(chunks)
    session.flush()
    for chunk, ids in zip(chunks, packed):
        for batch in batches(ids):
            session.execute(
                update(Request)
                .where(Request.id.in_(batch))
                .values(chunk_id=chunk.id)
                .execution_options(synchronize_session="evaluate")
            )
    return chunks


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


def lost_chunks(session: Session, now: datetime | None = None, *, stale_after: timedelta = LOST_AFTER) -> list[Chunk]:
    """Unfinished chunks whose task message was probably lost, oldest first:

    - running, and the lease has expired (the worker died or hung);
    - queued more than `stale_after` ago and never leased (the broker lost the message);
    - pending (created, never sent) more than `stale_after` ago (the dispatcher died).

    The sweep re-sends their tasks and calls `mark_chunks_queued`.
    """
    now = now or utcnow()
    cutoff = now - stale_after
    query = select(Chunk).where(
        or_(
            and_(Chunk.status == ChunkStatus.RUNNING, Chunk.lease_expires_at <= now),
            and_(Chunk.status == ChunkStatus.QUEUED, Chunk.enqueued_at <= cutoff),
            and_(Chunk.status == ChunkStatus.PENDING, Chunk.created_at <= cutoff),
        )
    )
    return list(session.scalars(query.order_by(Chunk.created_at, Chunk.id)))


def _prefix_groups(rows: list[_Pending]) -> list[list[list[int]]]:
    """Rows (in line order) -> groups of units of request ids; a unit is one request or one session."""
    sessions: dict[str, list[_Pending]] = {}
    units: list[list[_Pending]] = []  # in order of first line
    for row in rows:
        if row.session_id is None:
            units.append([row])
        elif row.session_id in sessions:
            sessions[row.session_id].append(row)
        else:
            sessions[row.session_id] = [row]
            units.append(sessions[row.session_id])
    groups: dict[object, list[list[int]]] = {}
    for position, members in enumerate(units):
        members.sort(key=lambda r: (r.turn is not None, r.turn or 0, r.line))
        prefix_key = members[0].prefix_key  # a session is placed by its first turn
        key = prefix_key if prefix_key is not None else ("no prefix", position)
        groups.setdefault(key, []).append([r.id for r in members])
    return list(groups.values())


def _pack(groups: list[list[list[int]]], max_requests: int) -> list[list[int]]:
    """Greedy packing: a group goes into the current chunk if it fits, else starts a new one;
    a group larger than a chunk is split between units, never inside one."""
    chunks: list[list[int]] = []
    current: list[int] = []
    for group in groups:
        size = sum(len(unit) for unit in group)
        if current and len(current) + size > max_requests:
            chunks.append(current)
            current = []
        for unit in group:
            if current and len(current) + len(unit) > max_requests:
                chunks.append(current)
                current = []
            current.extend(unit)
    if current:
        chunks.append(current)
    return chunks
