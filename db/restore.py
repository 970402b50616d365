"""Restoring a backup of `db/backup.py` into an empty database: SQLite from a `.sqlite3.gz` (or a
plain `.sqlite3`), PostgreSQL from a `pg_dump -Fc` archive through `pg_restore`.

A target that already holds tables is refused unless `force` (then it is replaced: the SQLite file
swapped atomically, the PostgreSQL objects dropped and recreated). A corrupted backup is refused
before the target changes: gzip's CRC and SQLite's integrity check for SQLite; for PostgreSQL,
`pg_restore --list` reads the archive's table of contents, and the restore runs in one transaction
(`--single-transaction --exit-on-error`), so a dump damaged in its data leaves the target as it was.
"""

from __future__ import annotations

import gzip
import os
import shutil
import sqlite3
import subprocess
import tempfile
import zlib
from contextlib import closing
from pathlib import Path

from sqlalchemy import inspect, make_url

from db.backup import FILE_MODE, POSTGRES_SUFFIX, SQLITE_SUFFIX, libpq_conninfo
from db.session import make_engine


class RestoreError(RuntimeError):
    """A backup could not be restored; the message is one line saying why and what to do."""


def restore_database(backup: Path, database_url: str, *, force: bool = False) -> None:
    """Restores `backup` into the database at `database_url`. Raises RestoreError."""
    if not backup.is_file():
        raise RestoreError(f"{backup}: no such backup file")
    url = make_url(database_url)
    backend = url.get_backend_name()
    name = backup.name
    if name.endswith((SQLITE_SUFFIX, ".sqlite3")):
        if backend != "sqlite":
            raise RestoreError(f"{backup}: a SQLite backup restores into a SQLite database, not {backend}")
        _restore_sqlite(backup, url.database, force)
    elif name.endswith(POSTGRES_SUFFIX):
        if backend != "postgresql":
            raise RestoreError(f"{backup}: a PostgreSQL backup (pg_dump) restores into PostgreSQL, not {backend}")
        _restore_postgres(backup, database_url, force)
    else:
        raise RestoreError(f"{backup}: not a pipeline backup (expected {SQLITE_SUFFIX} or {POSTGRES_SUFFIX})")


def table_names(database_url: str) -> list[str]:
    engine = make_engine(database_url)
    try:
        return sorted(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _refuse_non_empty(database_url: str, shown: str, force: bool) -> None:
    tables = table_names(database_url)
    if tables and not force:
        raise RestoreError(f"{shown} is not empty ({len(tables)} tables, e.g. {tables[0]}); restore into an empty "
                           "database, or pass --force to replace its contents")


def _restore_sqlite(backup: Path, database: str | None, force: bool) -> None:
    if not database or database == ":memory:":
        raise RestoreError("cannot restore into an in-memory SQLite database; set a file database URL")
    target = Path(database)
    if not target.parent.is_dir():
        raise RestoreError(f"{target}: the folder {target.parent} does not exist; create it first")
    if target.exists() and target.stat().st_size > 0:
        _refuse_non_empty(f"sqlite:///{target}", str(target), force)
    with tempfile.TemporaryDirectory(prefix=".pipeline-restore-", dir=target.parent) as private:  # 0700
        copy = Path(private) / "restored.sqlite3"
        fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        try:
            with os.fdopen(fd, "wb") as out:
                if backup.name.endswith(".gz"):
                    with gzip.open(backup, "rb") as packed:
                        shutil.copyfileobj(packed, out, 1 << 20)
                else:
                    with open(backup, "rb") as raw:
                        shutil.copyfileobj(raw, out, 1 << 20)
                out.flush()
                os.fsync(out.fileno())
        except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
            raise RestoreError(f"{backup}: corrupted backup ({type(e).__name__}: {e}); use another backup") from None
        _check_sqlite(copy, backup)
        for stale in (target.with_name(target.name + "-wal"), target.with_name(target.name + "-shm")):
            stale.unlink(missing_ok=True)  # a replaced database's journal would be replayed onto the copy
        os.replace(copy, target)


def _check_sqlite(copy: Path, backup: Path) -> None:
    try:
        with closing(sqlite3.connect(copy)) as db:
            status = db.execute("PRAGMA integrity_check").fetchone()[0]
            has_schema = db.execute(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'alembic_version'").fetchone()[0]
    except sqlite3.DatabaseError as e:
        raise RestoreError(f"{backup}: corrupted backup (not a SQLite database: {e}); use another backup") from None
    if status != "ok":
        raise RestoreError(f"{backup}: corrupted backup (integrity check: {status}); use another backup")
    if not has_schema:
        raise RestoreError(f"{backup}: not a pipeline database backup (no alembic_version table)")


def _restore_postgres(backup: Path, database_url: str, force: bool) -> None:
    pg_restore = shutil.which("pg_restore")
    if pg_restore is None:
        raise RestoreError("pg_restore is not on PATH; install the PostgreSQL client tools (same major version "
                           "as the server or newer)")
    conninfo, password, sslpassword = libpq_conninfo(database_url)
    if sslpassword is not None:
        raise RestoreError("restoring over a client key with a passphrase (sslpassword) is not supported; "
                           "restore with a key without one")
    listed = subprocess.run([pg_restore, "--list", str(backup)], capture_output=True, text=True, check=False)
    if listed.returncode != 0:
        raise RestoreError(f"{backup}: corrupted backup ({_last_line(listed.stderr)}); use another backup")
    shown = make_url(database_url).render_as_string(hide_password=True)
    _refuse_non_empty(database_url, shown, force)
    env = dict(os.environ)
    if password is not None:
        env["PGPASSWORD"] = password
    args = [pg_restore, "--no-owner", "--exit-on-error", "--single-transaction", "--dbname", conninfo]
    if force:
        args += ["--clean", "--if-exists"]
    result = subprocess.run([*args, str(backup)], env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RestoreError(f"{backup}: pg_restore failed, nothing restored ({_last_line(result.stderr)}); "
                           "the backup may be corrupted: use another one")


def _last_line(stderr: str) -> str:
    """pg_restore's first error line (its last line may be a summary), else its last line."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    return (errors or lines or ["no message"])[0 if errors else -1]
