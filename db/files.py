"""Files of the API server (`pipeline serve`): a tenant's uploads and its batches' output files."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from db.base import Base, utcnow

UPLOAD_PURPOSE = "batch"  # OpenAI's purpose of a batch input file
OUTPUT_PURPOSE = "batch_output"  # OpenAI's purpose of a batch's output and error files


class StoredFile(Base):
    """A file kept on disk at `storage_path`, owned by one tenant. An upload (`purpose` "batch") is
    stored as it arrived; a finished batch's output and error files ("batch_output", with `job_id`)
    are its export, written once, named `<batch id>_output.jsonl` and `<batch id>_error.jsonl`."""

    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    purpose: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str] = mapped_column(String(255))
    bytes: Mapped[int] = mapped_column(BigInteger)
    storage_path: Mapped[str] = mapped_column(Text)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (UniqueConstraint("job_id", "filename"),)  # one output and one error file per batch

    def __repr__(self) -> str:
        return f"StoredFile({self.id!r}, tenant={self.tenant_id!r}, {self.purpose!r}, {self.bytes} bytes)"
