"""jobs.input_digest: the SHA-256 of the file a job was submitted with under an idempotency key, so a
different file under the same key is refused instead of silently answered with the first job.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03 17:50:00+00:00

Nullable: jobs submitted before this revision (and jobs without a key) have no digest, and a key
of such a job returns it as before. Adding a nullable column is in place on SQLite and PostgreSQL;
dropping it uses batch mode, which SQLite needs for the jobs table's constraints.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("input_digest", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("input_digest")
