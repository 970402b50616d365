"""Database backups: SQLite through the sqlite3 online backup API (a consistent copy while other
processes write), gzipped; PostgreSQL through `pg_dump -Fc` (compressed by pg_dump). Files are named
`pipeline-<UTC time>.sqlite3.gz` or `pipeline-<UTC time>.dump`; `prune_backups` keeps the newest N.

A backup holds every prompt and answer: the files are created owner-only (0600), and so is the
backups folder when this module creates it (0700). The database password reaches `pg_dump` through
its environment (`PGPASSWORD`) and a client key's passphrase through a 0600 service file, never its
command line, which every local user can read.
"""

from __future__ import annotations

import gzip
import os
import re
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


SQLITE_SUFFIX = ".sqlite3.gz"
POSTGRES_SUFFIX = ".dump"
# A backup's files share its stamp: the database's, and the KV snapshots' archive (pipeline/kv_backup.py).
_BACKUP_NAME = re.compile(r"pipeline-(\d{8}T\d{6}Z)(\.sqlite3\.gz|\.sqlite3|\.dump|\.kv\.tar\.gz)")


def backup_database(database_url: str, backups_dir: Path, *, now: datetime | None = None,
                    output: Path | None = None) -> Path:
    """Back up the database at `database_url` into `backups_dir` (created if missing), or into the
    file `output` when given, and return the file. The file appears under its final name only once
    complete. Raises BackupError."""
    url = make_url(database_url)
    stamp = (now or utcnow()).strftime("%Y%m%dT%H%M%SZ")
    backend = url.get_backend_name()
    if backend == "sqlite":
        if not url.database or url.database == ":memory:":
            raise BackupError("an in-memory SQLite database cannot be backed up; use a file database")
        suffix = SQLITE_SUFFIX
    elif backend == "postgresql":
        suffix = POSTGRES_SUFFIX
    else:
        raise BackupError(f"cannot back up a {backend} database; SQLite and PostgreSQL are supported")
    if output is None:
        backups_dir.mkdir(mode=FOLDER_MODE, parents=True, exist_ok=True)
        target = backups_dir / f"pipeline-{stamp}{suffix}"
    else:
        target = output
        if not "".join(target.suffixes[-2:]).endswith(suffix):
            raise BackupError(f"{target}: a backup of this {backend} database is a {suffix} file; name it so")
        if not target.parent.is_dir():
            raise BackupError(f"{target}: the folder {target.parent} does not exist; create it first")
        if target.exists() and not target.is_file():
            raise BackupError(f"{target}: exists and is not a regular file; choose another path")
    partial = _private_file(target.with_name(target.name + ".partial"))
    try:
        if backend == "sqlite":
            _sqlite_backup(url.database, partial)
        else:
            _pg_dump(database_url, partial)
        partial.replace(target)
    except BaseException:
        partial.unlink(missing_ok=True)  # no half backup left beside the complete ones
        raise
    return target


def prune_backups(backups_dir: Path, keep: int) -> list[Path]:
    """Deletes all but the newest `keep` backups in `backups_dir` (the files this module names, a
    backup's database file and KV archive together); returns the deleted files. Other files there
    are left alone."""
    if keep < 1:
        raise ValueError(f"keep={keep} must be at least 1")
    if not backups_dir.is_dir():
        return []
    by_stamp: dict[str, list[Path]] = {}
    for path in backups_dir.iterdir():
        match = _BACKUP_NAME.fullmatch(path.name)
        if match and path.is_file():
            by_stamp.setdefault(match[1], []).append(path)
    deleted = [path for stamp in sorted(by_stamp, reverse=True)[keep:] for path in sorted(by_stamp[stamp])]
    for path in deleted:
        path.unlink(missing_ok=True)
    return deleted


def _sqlite_backup(database: str, target: Path) -> None:
    """A consistent copy through the online backup API, then gzipped into `target`."""
    with tempfile.TemporaryDirectory(prefix="pipeline-backup-", dir=target.parent) as private:  # 0700
        copy_path = Path(private) / "copy.sqlite3"
        with closing(sqlite3.connect(database)) as source, closing(sqlite3.connect(copy_path)) as copy:
            source.backup(copy)
        with open(copy_path, "rb") as raw, open(target, "wb") as out, \
                gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0) as packed:
            shutil.copyfileobj(raw, packed, 1 << 20)
            # gzip's CRC over the whole copy is what tells a corrupted backup at restore
        with open(target, "rb+") as f:
            os.fsync(f.fileno())


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
