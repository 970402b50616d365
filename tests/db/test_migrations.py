"""The Alembic migrations build exactly the schema the models describe, on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import CheckConstraint, Column, Integer, MetaData, inspect, text
from sqlalchemy.exc import IntegrityError

from db import Base, make_engine
from db.migrate import alembic_config, current, downgrade, upgrade

ROOT = Path(__file__).resolve().parents[2]
TABLES = {"api_keys", "chunks", "error_history", "files", "job_usage", "jobs", "requests", "sessions", "tenants"}


def head() -> str:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def differences(url: str, metadata: MetaData = Base.metadata) -> list:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return compare_metadata(MigrationContext.configure(connection), metadata)
    finally:
        engine.dispose()


def table_names(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_upgrade_to_head_matches_the_models(db_url):
    assert current(db_url) is None
    upgrade(db_url)
    assert current(db_url) == head() == "0006"
    assert table_names(db_url) == TABLES
    assert differences(db_url) == []


def test_comparison_reports_drift(db_url):
    """The no-difference check above can fail: a column the database lacks is reported."""
    upgrade(db_url)
    drifted = MetaData(naming_convention=Base.metadata.naming_convention)
    for table in Base.metadata.sorted_tables:
        table.to_metadata(drifted)
    drifted.tables["jobs"].append_column(Column("surprise", Integer))
    diffs = differences(db_url, drifted)
    assert [(d[0], d[2], d[3].name) for d in diffs] == [("add_column", "jobs", "surprise")]


def test_check_constraints_match_the_models(db_url):
    """Alembic's comparison ignores CHECK constraints; compare names and enum values here."""
    upgrade(db_url)
    engine = make_engine(db_url)
    try:
        inspector = inspect(engine)
        for table in Base.metadata.sorted_tables:
            expected = {c.name: str(c.sqltext) for c in table.constraints if isinstance(c, CheckConstraint)}
            reflected = {c["name"]: c["sqltext"] for c in inspector.get_check_constraints(table.name)}
            assert set(reflected) == set(expected), table.name
            for name, sqltext in expected.items():
                for value in sqltext.split("'")[1::2]:  # the quoted enum values
                    assert f"'{value}'" in reflected[name], (table.name, name, value)
    finally:
        engine.dispose()


def test_downgrade_to_base_and_upgrade_again(db_url):
    upgrade(db_url)
    engine = make_engine(db_url)
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO jobs (id, status, input_file, model, priority, strict, request_total, "
                "request_completed, request_failed, errors, metadata, created_at) VALUES "
                "('batch_1', 'validating', 'in.jsonl', 'tiny', 'normal', false, 0, 0, 0, '[]', '{}', "
                "'2025-01-01 00:00:00')"
            )
        )
    engine.dispose()

    downgrade(db_url, "base")
    assert current(db_url) is None
    assert table_names(db_url) == set()

    upgrade(db_url)
    assert current(db_url) == head()
    assert table_names(db_url) == TABLES
    assert differences(db_url) == []


def test_0002_adds_the_input_digest_to_existing_jobs_and_drops_it_again(db_url):
    """A database of the first release migrates with its jobs kept (their digest unknown), and back."""
    upgrade(db_url, "0001")
    engine = make_engine(db_url)
    try:
        with engine.begin() as connection:
            connection.execute(text(
                "INSERT INTO jobs (id, status, input_file, model, priority, idempotency_key, strict, request_total, "
                "request_completed, request_failed, errors, metadata, created_at) VALUES "
                "('batch_1', 'completed', 'in.jsonl', 'tiny', 'normal', 'k', false, 0, 0, 0, '[]', '{}', "
                "'2025-01-01 00:00:00')"))
        upgrade(db_url)  # through 0002, to head
        with engine.connect() as connection:
            assert connection.execute(text("SELECT id, idempotency_key, input_digest FROM jobs")).all() == [
                ("batch_1", "k", None)]
        assert differences(db_url) == []
        downgrade(db_url, "0001")
        assert current(db_url) == "0001"
        columns = {c["name"] for c in inspect(engine).get_columns("jobs")}
        assert "input_digest" not in columns and "idempotency_key" in columns
        with engine.connect() as connection:
            assert connection.execute(text("SELECT id, idempotency_key FROM jobs")).all() == [("batch_1", "k")]
        # The copy SQLite's batch mode makes keeps the constraints: a second job with the key is refused.
        with engine.connect() as connection, pytest.raises(IntegrityError, match="idempotency_key"):
            connection.execute(text(
                "INSERT INTO jobs (id, status, input_file, model, priority, idempotency_key, strict, request_total, "
                "request_completed, request_failed, errors, metadata, created_at) VALUES "
                "('batch_2', 'completed', 'in.jsonl', 'tiny', 'normal', 'k', false, 0, 0, 0, '[]', '{}', "
                "'2025-01-01 00:00:00')"))
    finally:
        engine.dispose()


def test_0004_gives_error_and_usage_rows_their_jobs_tenant(db_url):
    """Rows recorded before tenants were copied onto them get their job's tenant; the idempotency
    key becomes unique per tenant, so two tenants may use one key."""
    upgrade(db_url, "0003")
    engine = make_engine(db_url)
    job = ("INSERT INTO jobs (id, status, input_file, model, priority, idempotency_key, strict, tenant_id, "
           "request_total, request_completed, request_failed, errors, metadata, created_at, endpoint) VALUES "
           "('{id}', 'completed', 'in.jsonl', 'tiny', 'normal', 'k', false, '{tenant}', 0, 0, 0, '[]', '{{}}', "
           "'2025-01-01 00:00:00', '')")
    try:
        with engine.begin() as connection:
            connection.execute(text("INSERT INTO tenants (id, name, cache_salt, created_at) VALUES "
                                    "('t1', 'one', 's1', '2025-01-01 00:00:00'), "
                                    "('t2', 'two', 's2', '2025-01-01 00:00:00')"))
            connection.execute(text(job.format(id="batch_1", tenant="t1")))
            connection.execute(text("INSERT INTO error_history (job_id, kind, message, created_at) VALUES "
                                    "('batch_1', 'engine', 'boom', '2025-01-01 00:00:00'), "
                                    "(NULL, 'backup', 'no disk', '2025-01-01 00:00:00')"))
            connection.execute(text("INSERT INTO job_usage (job_id, prompt_tokens, cached_tokens, completion_tokens, "
                                    "compute_seconds, cost, currency, updated_at) VALUES "
                                    "('batch_1', 1, 0, 1, 0.5, 0, 'USD', '2025-01-01 00:00:00')"))
        upgrade(db_url)
        with engine.begin() as connection:
            assert connection.execute(text("SELECT kind, tenant_id FROM error_history ORDER BY id")).all() == [
                ("engine", "t1"), ("backup", None)]
            assert connection.execute(text("SELECT job_id, tenant_id FROM job_usage")).all() == [("batch_1", "t1")]
            connection.execute(text(job.format(id="batch_2", tenant="t2")))  # the same key, another tenant
        with engine.connect() as connection, pytest.raises(IntegrityError, match="idempotency_key"):
            connection.execute(text(job.format(id="batch_3", tenant="t1")))
        assert differences(db_url) == []
    finally:
        engine.dispose()


def test_status_check_constraint_rejects_unknown_values(db_url):
    upgrade(db_url)
    engine = make_engine(db_url)
    try:
        with engine.connect() as connection, pytest.raises(IntegrityError, match="ck_jobs_status"):
            connection.execute(
                text(
                    "INSERT INTO jobs (id, status, input_file, model, priority, strict, request_total, "
                    "request_completed, request_failed, errors, metadata, created_at) VALUES "
                    "('batch_1', 'sleeping', 'in.jsonl', 'tiny', 'normal', false, 0, 0, 0, '[]', '{}', "
                    "'2025-01-01 00:00:00')"
                )
            )
    finally:
        engine.dispose()


def test_alembic_command_line_takes_the_url_from_x_or_the_environment(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PIPELINE_DATABASE_URL"}
    x_url = f"sqlite:///{tmp_path / 'x.db'}"
    run = subprocess.run(
        [sys.executable, "-m", "alembic", "-x", f"url={x_url}", "upgrade", "head"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert current(x_url) == head()

    env_url = f"sqlite:///{tmp_path / 'env.db'}"
    run = subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=ROOT,
        env=env | {"PIPELINE_DATABASE_URL": env_url},
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert current(env_url) == head()

    run = subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode != 0
    assert "no database URL" in run.stderr
