"""Database backups: SQLite through the sqlite3 online backup API (a consistent copy while other
processes write), PostgreSQL through `pg_dump -Fc`. Files are named `pipeline-<UTC time>.<ext>`."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from contextlib import closing
from datetime import datetime
from pathlib import Path

from sqlalchemy import make_url

from db.base import utcnow


class BackupError(RuntimeError):
    """A backup could not be made; the message says why and what to do."""


def backup_database(database_url: str, backups_dir: Path, *, now: datetime | None = None) -> Path:
    """Back up the database at `database_url` into `backups_dir` (created if missing) and return the
    file. The file appears under its final name only once complete. Raises BackupError."""
    url = make_url(database_url)
    stamp = (now or utcnow()).strftime("%Y%m%dT%H%M%SZ")
    backups_dir.mkdir(parents=True, exist_ok=True)
    backend = url.get_backend_name()
    if backend == "sqlite":
        if not url.database or url.database == ":memory:":
            raise BackupError("an in-memory SQLite database cannot be backed up; use a file database")
        target = backups_dir / f"pipeline-{stamp}.sqlite3"
        partial = target.with_name(target.name + ".partial")
        with closing(sqlite3.connect(url.database)) as source, closing(sqlite3.connect(partial)) as copy:
            source.backup(copy)
    elif backend == "postgresql":
        target = backups_dir / f"pipeline-{stamp}.dump"
        partial = target.with_name(target.name + ".partial")
        _pg_dump(database_url, partial)
    else:
        raise BackupError(f"cannot back up a {backend} database; SQLite and PostgreSQL are supported")
    partial.replace(target)
    return target


def _pg_dump(database_url: str, target: Path) -> None:
    pg_dump = shutil.which("pg_dump")
    if pg_dump is None:
        raise BackupError("pg_dump is not on PATH; install the PostgreSQL client tools (same major version "
                          "as the server) where beat runs")
    url = make_url(database_url)
    # The password goes through the environment, not the command line (visible to `ps`).
    env = dict(os.environ)
    if url.password is not None:
        env["PGPASSWORD"] = str(url.password)
    conninfo = url.set(drivername="postgresql", password=None).render_as_string(hide_password=False)
    result = subprocess.run([pg_dump, "-Fc", "--file", str(target), "--dbname", conninfo], env=env,
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        target.unlink(missing_ok=True)
        detail = (result.stderr.strip().splitlines() or ["no message"])[-1]
        raise BackupError(f"pg_dump exited with {result.returncode}: {detail}")
