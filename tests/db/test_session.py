"""SQLite engines: the database file, and the -wal and -shm files SQLite makes beside it, are
owner-only when the engine creates them, whatever the umask; an existing file keeps its mode."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from sqlalchemy import text

from db.migrate import upgrade
from db.session import make_engine


@pytest.fixture
def open_umask():
    """A umask that lets everyone read and write new files: owner-only must not rely on the umask."""
    old = os.umask(0o000)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_sqlite_database_and_its_wal_files_are_owner_only(tmp_path: Path, open_umask) -> None:
    db = tmp_path / "pipeline.sqlite3"
    url = f"sqlite:///{db}"
    upgrade(url)  # the migrations create the file: `pipeline run`, `pipeline db upgrade`
    engine = make_engine(url)
    try:
        with engine.begin() as connection:  # a write, so the -wal and -shm files exist now
            connection.execute(text("CREATE TABLE t (x INTEGER)"))
            connection.execute(text("INSERT INTO t VALUES (1)"))
        files = sorted(p.name for p in tmp_path.iterdir())
        assert files == ["pipeline.sqlite3", "pipeline.sqlite3-shm", "pipeline.sqlite3-wal"]
        assert {name: mode(tmp_path / name) for name in files} == dict.fromkeys(files, 0o600)
    finally:
        engine.dispose()


def test_an_existing_database_keeps_its_mode(tmp_path: Path, open_umask) -> None:
    db = tmp_path / "shared.sqlite3"
    upgrade(f"sqlite:///{db}")
    db.chmod(0o660)  # shared with a group on purpose
    engine = make_engine(f"sqlite:///{db}")
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    finally:
        engine.dispose()
    assert mode(db) == 0o660


def test_in_memory_databases_create_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for url in ("sqlite://", "sqlite:///:memory:"):
        engine = make_engine(url)
        with engine.connect() as connection:
            assert connection.execute(text("SELECT 1")).scalar_one() == 1
        engine.dispose()
    assert list(tmp_path.iterdir()) == []
