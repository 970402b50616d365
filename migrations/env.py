"""Alembic environment: the models' metadata is the target; the URL comes from the Config
(`db.migrate` sets it), else `-x url=...`, else the PIPELINE_DATABASE_URL environment variable."""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection

from db import Base
from db.session import make_engine

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name)

target_metadata = Base.metadata


def database_url() -> str:
    url = config.get_main_option("sqlalchemy.url") or context.get_x_argument(as_dictionary=True).get("url")
    url = url or os.environ.get("PIPELINE_DATABASE_URL")
    if not url:
        raise SystemExit("no database URL: pass -x url=... or set PIPELINE_DATABASE_URL")
    return url


def configure(**kwargs: object) -> None:
    context.configure(
        target_metadata=target_metadata,
        compare_type=True,
        # SQLite alters tables by copying them ("batch mode"); PostgreSQL alters in place.
        **kwargs,
    )


def run_migrations_offline() -> None:
    """Write the SQL to stdout (`alembic upgrade head --sql`)."""
    url = database_url()
    configure(
        url=url, literal_binds=True, dialect_opts={"paramstyle": "named"}, render_as_batch=url.startswith("sqlite")
    )
    with context.begin_transaction():
        context.run_migrations()


def run_with_connection(connection: Connection) -> None:
    configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:  # a caller's open connection (e.g. inside a test transaction)
        run_with_connection(connection)
        return
    engine = make_engine(database_url())
    try:
        with engine.connect() as connection:
            if connection.dialect.name == "sqlite":
                run_with_foreign_keys_off(connection)
            else:
                run_with_connection(connection)
    finally:
        engine.dispose()


def run_with_foreign_keys_off(connection: Connection) -> None:
    """SQLite's batch mode alters a table by copying it and dropping the old one; with foreign keys
    on, dropping `jobs` would delete every row that refers to it (their ON DELETE CASCADE). So the
    keys are off while migrating (SQLite's own recipe for schema changes; the pragma only works
    outside a transaction), and the result is checked before they are turned on again."""
    raw = connection.connection.driver_connection  # in autocommit: no BEGIN before the pragma
    raw.execute("PRAGMA foreign_keys = OFF")
    try:
        run_with_connection(connection)
        broken = raw.execute("PRAGMA foreign_key_check").fetchall()
        if broken:
            raise RuntimeError(f"the migration left rows whose foreign keys point nowhere: {broken[:5]}")
    finally:
        raw.execute("PRAGMA foreign_keys = ON")


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
