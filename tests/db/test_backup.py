"""Backups keep the database's secrets: the password never reaches pg_dump's command line (a fake
`pg_dump` on PATH records what it was given), and backup files and their folder are owner-only."""

from __future__ import annotations

import gzip
import os
import sqlite3
import stat
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

import pytest

from db.backup import BackupError, backup_database
from db.migrate import upgrade

T0 = datetime(2026, 1, 5, 12, 0, 0, tzinfo=timezone.utc)
PASSWORD = "S3cr@t pw/1"
FAKE_PG_DUMP = """#!/bin/sh
# Records its arguments and the password it was given, and writes a dump's magic to --file.
printf '%s\\n' "$@" > "$FAKE_PG_DUMP_ARGS"
printf '%s' "${PGPASSWORD-<unset>}" > "$FAKE_PG_DUMP_PASSWORD"
if [ -n "$PGSERVICEFILE" ]; then
    cat "$PGSERVICEFILE" > "$FAKE_PG_DUMP_ARGS.service"
    ls -l "$PGSERVICEFILE" > "$FAKE_PG_DUMP_ARGS.mode"
    printf '%s' "$PGSERVICEFILE" > "$FAKE_PG_DUMP_ARGS.path"
fi
while [ $# -gt 0 ]; do
    if [ "$1" = "--file" ]; then shift; printf 'PGDMP' > "$1"; fi
    shift
done
"""


@pytest.fixture
def fake_pg_dump(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A `pg_dump` first on PATH; returns (its recorded arguments, its recorded PGPASSWORD)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "pg_dump"
    script.write_text(FAKE_PG_DUMP)
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.delenv("PGPASSWORD", raising=False)
    args, password = tmp_path / "args.txt", tmp_path / "password.txt"
    monkeypatch.setenv("FAKE_PG_DUMP_ARGS", str(args))
    monkeypatch.setenv("FAKE_PG_DUMP_PASSWORD", str(password))
    return args, password


@pytest.mark.parametrize("url", [
    f"postgresql+psycopg://backup:{quote(PASSWORD, safe='')}@db.example:5433/pipeline?sslmode=disable",
    f"postgresql+psycopg://backup@db.example:5433/pipeline?password={quote(PASSWORD, safe='')}&sslmode=disable",
], ids=["in the user part", "as ?password="])
def test_the_password_reaches_pg_dump_only_through_its_environment(fake_pg_dump, tmp_path: Path, url: str) -> None:
    args_file, password_file = fake_pg_dump
    path = backup_database(url, tmp_path / "backups", now=T0)
    assert path.read_bytes() == b"PGDMP"
    args = args_file.read_text().splitlines()
    for arg in args:
        for form in (PASSWORD, quote(PASSWORD, safe=""), quote(PASSWORD), "S3cr"):
            assert form not in arg, f"the password is on pg_dump's command line: {arg!r}"
    assert password_file.read_text() == PASSWORD
    dbname = args[args.index("--dbname") + 1]
    assert dbname == "postgresql://backup@db.example:5433/pipeline?sslmode=disable"


def test_a_client_keys_passphrase_reaches_pg_dump_through_a_private_service_file(fake_pg_dump, tmp_path: Path) -> None:
    args_file, password_file = fake_pg_dump
    url = (f"postgresql+psycopg://backup:{quote(PASSWORD, safe='')}@db.example/pipeline"
           f"?sslmode=verify-full&sslpassword={quote('key pass#2', safe='')}")
    backup_database(url, tmp_path / "backups", now=T0)
    args = args_file.read_text()
    assert "key pass" not in args and "key%20pass" not in args and "S3cr" not in args
    dbname = args.splitlines()[args.splitlines().index("--dbname") + 1]
    assert dbname == "postgresql://backup@db.example/pipeline?sslmode=verify-full&service=pipeline-backup"
    assert Path(f"{args_file}.service").read_text() == "[pipeline-backup]\nsslpassword=key pass#2\n"
    assert Path(f"{args_file}.mode").read_text().startswith("-rw-------")
    assert password_file.read_text() == PASSWORD
    assert not Path(Path(f"{args_file}.path").read_text()).parent.exists()  # the file went with its folder


def test_a_passphrase_with_a_line_break_is_refused_before_pg_dump_runs(fake_pg_dump, tmp_path: Path) -> None:
    args_file, _ = fake_pg_dump
    with pytest.raises(BackupError, match="sslpassword holds a line break"):
        backup_database("postgresql+psycopg://backup@db/pipeline?sslpassword=a%0Aservice%3Dother",
                        tmp_path / "backups", now=T0)
    assert not args_file.exists()
    assert list((tmp_path / "backups").glob("*")) == []


def test_without_a_password_pg_dump_keeps_the_users_own(fake_pg_dump, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    args_file, password_file = fake_pg_dump
    backup_database("postgresql+psycopg://backup@db.example/pipeline", tmp_path / "backups", now=T0)
    assert password_file.read_text() == "<unset>"  # libpq then reads ~/.pgpass, as the user set up
    monkeypatch.setenv("PGPASSWORD", "from-the-environment")
    backup_database("postgresql+psycopg://backup@db.example/pipeline", tmp_path / "backups", now=T0)
    assert password_file.read_text() == "from-the-environment"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def open_umask():
    """A umask that lets everyone read new files (0022 would too): owner-only must not rely on it."""
    old = os.umask(0o000)
    yield
    os.umask(old)


def test_backups_and_their_folder_are_owner_only(fake_pg_dump, tmp_path: Path, open_umask) -> None:
    db = tmp_path / "pipeline.sqlite3"
    upgrade(f"sqlite:///{db}")
    backups = tmp_path / "backups" / "nested"
    sqlite_copy = backup_database(f"sqlite:///{db}", backups, now=T0)
    unpacked = tmp_path / "unpacked.sqlite3"
    unpacked.write_bytes(gzip.decompress(sqlite_copy.read_bytes()))
    with closing(sqlite3.connect(unpacked)) as copy:
        assert copy.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    dump = backup_database(f"postgresql+psycopg://u:{PASSWORD}@h/pipeline", backups, now=T0)
    assert mode(backups) == 0o700
    assert (mode(sqlite_copy), mode(dump)) == (0o600, 0o600)
    assert sorted(p.name for p in backups.iterdir()) == [dump.name, sqlite_copy.name]


def test_a_failed_backup_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from db.backup import BackupError

    monkeypatch.setenv("PATH", "")
    with pytest.raises(BackupError, match="pg_dump is not on PATH"):
        backup_database("postgresql+psycopg://u:p@h/pipeline", tmp_path / "backups", now=T0)
    assert list((tmp_path / "backups").iterdir()) == []
