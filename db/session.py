"""Engines and sessions: SQLite (embedded default) safe for several processes, PostgreSQL pinged.

Repository functions never commit; the caller owns one transaction per unit of work:

    factory = session_factory(make_engine(url))
    with factory.begin() as session:
        record_results(session, chunk_id, results)
"""

from __future__ import annotations

import os
from typing import Any

from sqlalchemy import URL, Engine, create_engine, event, make_url
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 30_000  # a writer waits this long for another process's write to finish
SQLITE_FILE_MODE = 0o600


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for `url`; extra keyword arguments go to `sqlalchemy.create_engine`.

    SQLite: WAL journal (readers never block the writer), foreign keys enforced (they are off by
    default there, and the schema relies on ON DELETE CASCADE), a busy timeout, and transactions
    begun by SQLAlchemy itself (the sqlite3 module's implicit ones break SAVEPOINT). Transactions
    begin DEFERRED, so a session that only reads never holds the write lock; repository functions
    that write take it as their first statement (see `db.repository._locks`).

    A SQLite database file this creates is owner-only (0600), whatever the umask: it holds every
    prompt and answer. SQLite gives its -wal and -shm files the database file's permissions.

    PostgreSQL: connections are pinged before use, so a restarted server costs one reconnect
    instead of one failed task.
    """
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        kwargs.setdefault("connect_args", {}).setdefault("timeout", SQLITE_BUSY_TIMEOUT_MS / 1000)
        engine = create_engine(url, **kwargs)
        _configure_sqlite(engine, _sqlite_file(parsed))
        return engine
    if backend == "postgresql":
        kwargs.setdefault("pool_pre_ping", True)
    return create_engine(url, **kwargs)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions whose objects stay readable after commit (handed to tasks, printed by the CLI)."""
    return sessionmaker(engine, expire_on_commit=False)


def _configure_sqlite(engine: Engine, database_file: str | None) -> None:
    if database_file is not None:
        @event.listens_for(engine, "do_connect")
        def _before_connect(*_args: Any) -> None:
            _create_private(database_file)

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


def _sqlite_file(url: URL) -> str | None:
    """The file of a SQLite URL, None for an in-memory database or a `file:` URI (its own mode)."""
    database = url.database
    if not database or database == ":memory:" or url.query.get("uri") or database.startswith("file:"):
        return None
    return database


def _create_private(path: str) -> None:
    """Create the database file owner-only before SQLite would create it with 0644; an existing
    file keeps its permissions (an administrator may have shared it with a group on purpose)."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, SQLITE_FILE_MODE))
    except FileExistsError:
        pass
    except OSError:  # no such folder, no permission: SQLite's own error says it on connect
        pass
