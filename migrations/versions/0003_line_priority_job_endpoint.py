"""A request line's own priority (its chunk goes to that queue) and a job's endpoint (the batch
object's `endpoint`). Cancelled and expired lines now count as failed (as OpenAI counts them): the
counts of jobs closed before are brought in line.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03 18:00:00.000000+00:00

Batch mode: SQLite cannot add a CHECK constraint to an existing table, so there the table is
copied; PostgreSQL gets plain ALTER TABLE statements.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PRIORITIES = "priority IN ('critical', 'high', 'normal', 'low')"


def upgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        batch.add_column(sa.Column("priority", sa.String(length=16), nullable=True))
        batch.create_check_constraint(op.f("ck_requests_priority"), PRIORITIES)
    op.add_column("jobs", sa.Column("endpoint", sa.String(length=64), server_default="", nullable=False))
    # Each job's URLs as submit now records them (an index scan per job, once).
    op.execute("UPDATE jobs SET endpoint = COALESCE((SELECT MIN(endpoint) FROM requests "
               "WHERE requests.job_id = jobs.id), '')")
    op.execute("UPDATE jobs SET endpoint = '/v1/chat/completions,/v1/completions' WHERE EXISTS (SELECT 1 FROM "
               "requests WHERE requests.job_id = jobs.id AND requests.endpoint <> jobs.endpoint)")
    op.execute("UPDATE jobs SET request_failed = request_total - request_completed "
               "WHERE status IN ('cancelled', 'expired')")


def downgrade() -> None:
    op.drop_column("jobs", "endpoint")
    with op.batch_alter_table("requests") as batch:
        batch.drop_constraint(op.f("ck_requests_priority"), type_="check")
        batch.drop_column("priority")
