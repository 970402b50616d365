"""Each result's timings (queue wait, latency, time to first token, engine seconds), so reports and
`pipeline stats` are computed from the database; an index on `requests.completed_at` for windows.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06 03:40:00.000000+00:00

Plain ADD COLUMN on both databases: nullable columns without a default, so no table is rewritten
(rows written before stay NULL: their timings were never measured).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ("queue_wait_s", "latency_s", "ttft_s", "engine_s")


def upgrade() -> None:
    for name in COLUMNS:
        op.add_column("requests", sa.Column(name, sa.Double(), nullable=True))
    op.create_index(op.f("ix_requests_completed_at"), "requests", ["completed_at"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_requests_completed_at"), table_name="requests")
    with op.batch_alter_table("requests") as batch:  # SQLite drops columns by copying the table
        for name in COLUMNS:
            batch.drop_column(name)
