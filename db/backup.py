"""Database backups: SQLite through the sqlite3 online backup API (a consistent copy while other
processes write), PostgreSQL through `pg_dump -Fc`. Files are named `pipeline-<UTC time>.<ext>`.

A backup holds every prompt and answer: the files are created owner-only (0600), and so is the
backups folder when this module creates it (0700). The database password reaches `pg_dump` through
its environment (`PGPASSWORD`) and a client key's passphrase through a 0600 service file, never its
command line, which every local user can read.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import tempfile
from contextlib import closing
from datetime import datetime
from pathlib import Path

from sqlalchemy import URL, make_url

from db.base import utcnow

FILE_MODE = 0o600
FOLDER_MODE = 0o700


class BackupError(RuntimeError):
    """A backup could not be made; the message says why and what to do."""


_SERVICE = "pipeline-backup"


def backup_database(database_url: str, backups_dir: Path, *, now: datetime | None = None) -> Path:
    """Back up the database at `database_url` into `backups_dir` (created if missing) and return the
    file. The file appears under its final name only once complete. Raises BackupError."""
    url = make_url(database_url)
    stamp = (now or utcnow()).strftime("%Y%m%dT%H%M%SZ")
    backups_dir.mkdir(mode=FOLDER_MODE, parents=True, exist_ok=True)
    backend = url.get_backend_name()
    if backend == "sqlite":
        if not url.database or url.database == ":memory:":
            raise BackupError("an in-memory SQLite database cannot be backed up; use a file database")
        target = backups_dir / f"pipeline-{stamp}.sqlite3"
    elif backend == "postgresql":
        target = backups_dir / f"pipeline-{stamp}.dump"
    else:
        raise BackupError(f"cannot back up a {backend} database; SQLite and PostgreSQL are supported")
    partial = _private_file(target.with_name(target.name + ".partial"))
    try:
        if backend == "sqlite":
            with closing(sqlite3.connect(url.database)) as source, closing(sqlite3.connect(partial)) as copy:
                source.backup(copy)
        else:
            _pg_dump(database_url, partial)
        partial.replace(target)
    except BaseException:
        partial.unlink(missing_ok=True)  # no half backup left beside the complete ones
        raise
    return target


def _pg_dump(database_url: str, target: Path) -> None:
    pg_dump = shutil.which("pg_dump")
    if pg_dump is None:
        raise BackupError("pg_dump is not on PATH; install the PostgreSQL client tools (same major version "
                          "as the server) where beat runs")
    conninfo, password, sslpassword = libpq_conninfo(database_url)
    env = dict(os.environ)
    if password is not None:
        env["PGPASSWORD"] = password
    with tempfile.TemporaryDirectory(prefix="pipeline-pg-dump-") as private:  # 0700: ours alone
        if sslpassword is not None:
            if "\n" in sslpassword or "\r" in sslpassword:
                raise BackupError("the database URL's sslpassword holds a line break, which a libpq service "
                                  "file cannot carry; give the client key another passphrase")
            # libpq reads a client key's passphrase from no environment variable, but from a
            # connection service file, which (0600, in our own folder) no other user can read.
            service_file = Path(private) / "pg_service.conf"
            fd = os.open(service_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f"[{_SERVICE}]\nsslpassword={sslpassword}\n")
            env["PGSERVICEFILE"] = str(service_file)
            conninfo += ("&" if "?" in conninfo else "?") + f"service={_SERVICE}"
        result = subprocess.run([pg_dump, "-Fc", "--file", str(target), "--dbname", conninfo], env=env,
                                capture_output=True, text=True, check=False)
    if result.returncode != 0:
        detail = (result.stderr.strip().splitlines() or ["no message"])[-1]
        raise BackupError(f"pg_dump exited with {result.returncode}: {detail}")


def libpq_conninfo(database_url: str) -> tuple[str, str | None, str | None]:
    """(a libpq connection URI for `database_url` without its secrets, the password, the client
    key's passphrase `sslpassword`), each secret None when the URL has none.

    The password may sit in the URL's user part or in a `?password=` query parameter; it is taken
    out of both. (`URL.set(password=None)` would keep it: None there means "unchanged".)"""
    url = make_url(database_url)
    query = dict(url.query)
    in_query, sslpassword = _last(query.pop("password", None)), _last(query.pop("sslpassword", None))
    password = url.password if url.password is not None else in_query
    clean = URL.create("postgresql", username=url.username, host=url.host, port=url.port,
                       database=url.database, query=query)
    return (clean.render_as_string(hide_password=False), None if password is None else str(password),
            sslpassword)


def _last(value: str | tuple[str, ...] | None) -> str | None:
    """A query parameter's value; given twice (?password=a&password=b), libpq takes the last."""
    if isinstance(value, tuple):
        return value[-1] if value else None
    return value


def _private_file(path: Path) -> Path:
    """`path` created empty and owner-only (a leftover from a crashed backup is replaced), so the
    copy written into it is never readable by others, whatever the umask."""
    path.unlink(missing_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
    return path
