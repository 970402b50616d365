"""Locking, so that concurrent writers wait for each other instead of failing or deadlocking.

Every writer takes its locks in one order: job -> chunks -> requests, each by ascending id.

SQLite has one write lock for the whole database. A DEFERRED transaction that reads and then
writes fails at once with "database is locked" if another process committed in between (the busy
timeout cannot help it), so functions that read before they write take the write lock first,
with an UPDATE that matches no row. That makes the transaction behave as BEGIN IMMEDIATE when the
function opens it; callers should start a write unit with the repository call, not with reads.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from sqlalchemy import false, select, update
from sqlalchemy.orm import Session

from db.models import Chunk, Job

IN_LIST_SIZE = 1_000


def batches(ids: Sequence, size: int = IN_LIST_SIZE) -> Iterator[Sequence]:
    """Bounded IN lists."""
    for start in range(0, len(ids), size):
        yield ids[start : start + size]


def write_lock(session: Session) -> None:
    """SQLite: take the database write lock now (waiting up to the busy timeout). Elsewhere a no-op."""
    if session.get_bind().dialect.name == "sqlite":
        session.execute(update(Job).where(false()).values(id=Job.id).execution_options(synchronize_session=False))


def lock_rows(session: Session, model: type[Job | Chunk], ids: Sequence) -> None:
    """Lock these rows until the transaction ends (FOR UPDATE on PostgreSQL; the write lock on SQLite)."""
    if session.get_bind().dialect.name == "sqlite":
        write_lock(session)
        return
    for batch in batches(sorted(ids)):
        session.execute(select(model.id).where(model.id.in_(batch)).order_by(model.id).with_for_update())
