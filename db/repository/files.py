"""The API server's files. Every lookup takes the tenant: another tenant's file is not found."""

from __future__ import annotations

import operator
import uuid
from datetime import datetime

from sqlalchemy import and_, delete, or_, select
from sqlalchemy.orm import Session

from db.base import utcnow
from db.files import OUTPUT_PURPOSE, StoredFile


def new_file_id() -> str:
    return "file-" + uuid.uuid4().hex


def add_file(session: Session, *, file_id: str, tenant_id: str, purpose: str, filename: str, size: int,
             storage_path: str, job_id: str | None = None, now: datetime | None = None) -> StoredFile:
    """Record a file already written to `storage_path`."""
    row = StoredFile(id=file_id, tenant_id=tenant_id, purpose=purpose, filename=filename, bytes=size,
                     storage_path=storage_path, job_id=job_id, created_at=now or utcnow())
    session.add(row)
    session.flush()
    return row


def get_file(session: Session, tenant_id: str, file_id: str) -> StoredFile | None:
    """The tenant's file `file_id`, or None (also for another tenant's)."""
    return session.scalar(select(StoredFile).where(StoredFile.id == file_id, StoredFile.tenant_id == tenant_id))


def list_files(session: Session, tenant_id: str, *, purpose: str | None = None, after: StoredFile | None = None,
               limit: int | None = None, newest_first: bool = True) -> list[StoredFile]:
    """The tenant's files, newest first (oldest first when not `newest_first`), only those of
    `purpose` when given, at most `limit`; with `after`, only those listed after that file (a
    page's last file: the cursor of the next)."""
    query = select(StoredFile).where(StoredFile.tenant_id == tenant_id)
    if purpose is not None:
        query = query.where(StoredFile.purpose == purpose)
    if after is not None:
        beyond = operator.lt if newest_first else operator.gt  # listed after it: older, or newer when ascending
        query = query.where(or_(beyond(StoredFile.created_at, after.created_at),
                                and_(StoredFile.created_at == after.created_at, beyond(StoredFile.id, after.id))))
    columns = (StoredFile.created_at, StoredFile.id)
    return list(session.scalars(query.order_by(*(c.desc() if newest_first else c.asc() for c in columns)).limit(limit)))


def delete_file(session: Session, tenant_id: str, file_id: str) -> StoredFile | None:
    """Delete the tenant's file row and return it (the caller removes it from disk once the
    transaction commits); None if there is none."""
    row = get_file(session, tenant_id, file_id)
    if row is not None:
        session.execute(delete(StoredFile).where(StoredFile.id == file_id))
    return row


def job_output_files(session: Session, job_id: str) -> dict[str, StoredFile]:
    """A batch's output files by file name (`<job>_output.jsonl`, `<job>_error.jsonl`), if written."""
    rows = session.scalars(select(StoredFile).where(StoredFile.job_id == job_id,
                                                    StoredFile.purpose == OUTPUT_PURPOSE))
    return {row.filename: row for row in rows}
