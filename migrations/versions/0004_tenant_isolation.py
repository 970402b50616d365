"""Tenants as a boundary: a tenant can be disabled, error history and usage rows carry the job's
tenant, and an idempotency key is unique per tenant (one tenant's key never finds another's job).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06 03:30:00.000000+00:00

Batch mode: SQLite cannot add a foreign key or swap a unique constraint in place, so there the
tables are copied; PostgreSQL gets plain ALTER TABLE statements. Rows written before this revision
get their job's tenant. The downgrade fails if two tenants have used one idempotency key.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TENANT_OF_JOB = "(SELECT jobs.tenant_id FROM jobs WHERE jobs.id = {table}.job_id)"


def upgrade() -> None:
    op.add_column("tenants", sa.Column("disabled_at", sa.DateTime(timezone=True), nullable=True))
    for table in ("error_history", "job_usage"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("tenant_id", sa.String(length=64), nullable=True))
            batch.create_foreign_key(op.f(f"fk_{table}_tenant_id_tenants"), "tenants", ["tenant_id"], ["id"],
                                     ondelete="CASCADE")
            batch.create_index(op.f(f"ix_{table}_tenant_id"), ["tenant_id"])
        op.execute(f"UPDATE {table} SET tenant_id = {TENANT_OF_JOB.format(table=table)} WHERE job_id IS NOT NULL")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint(op.f("uq_jobs_idempotency_key"), type_="unique")
        batch.create_unique_constraint(op.f("uq_jobs_tenant_id_idempotency_key"), ["tenant_id", "idempotency_key"])
    op.create_index("uq_jobs_idempotency_key_no_tenant", "jobs", ["idempotency_key"], unique=True,
                    sqlite_where=sa.text("tenant_id IS NULL"), postgresql_where=sa.text("tenant_id IS NULL"))


def downgrade() -> None:
    op.drop_index("uq_jobs_idempotency_key_no_tenant", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint(op.f("uq_jobs_tenant_id_idempotency_key"), type_="unique")
        batch.create_unique_constraint(op.f("uq_jobs_idempotency_key"), ["idempotency_key"])
    for table in ("job_usage", "error_history"):
        with op.batch_alter_table(table) as batch:
            batch.drop_index(op.f(f"ix_{table}_tenant_id"))
            batch.drop_constraint(op.f(f"fk_{table}_tenant_id_tenants"), type_="foreignkey")
            batch.drop_column("tenant_id")
    op.drop_column("tenants", "disabled_at")
