"""Engines and sessions: SQLite (embedded default) safe for several processes, PostgreSQL pinged.

Repository functions never commit; the caller owns one transaction per unit of work:

    factory = session_factory(make_engine(url))
    with factory.begin() as session:
        record_results(session, chunk_id, results)
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 30_000  # a writer waits this long for another process's write to finish


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for `url`; extra keyword arguments go to `sqlalchemy.create_engine`.

    SQLite: WAL journal (readers never block the writer), foreign keys enforced (they are off by
    default there, and the schema relies on ON DELETE CASCADE), a busy timeout, and transactions
    begun by SQLAlchemy itself (the sqlite3 module's implicit ones break SAVEPOINT). Transactions
    begin DEFERRED, so a session that only reads never holds the write lock; repository functions
    that write take it as their first statement (see `db.repository._locks`).

    PostgreSQL: connections are pinged before use, so a restarted server costs one reconnect
    instead of one failed task.
    """
    backend = make_url(url).get_backend_name()
    if backend == "sqlite":
        kwargs.setdefault("connect_args", {}).setdefault("timeout", SQLITE_BUSY_TIMEOUT_MS / 1000)
        engine = create_engine(url, **kwargs)
        _configure_sqlite(engine)
        return engine
    if backend == "postgresql":
        kwargs.setdefault("pool_pre_ping", True)
    return create_engine(url, **kwargs)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions whose objects stay readable after commit (handed to tasks, printed by the CLI)."""
    return sessionmaker(engine, expire_on_commit=False)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # no implicit transactions: the "begin" hook below
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA journal_mode = WAL")  # stays "memory" for :memory: databases
            cursor.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: consistent after a crash
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN")
