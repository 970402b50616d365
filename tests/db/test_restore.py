"""Backups restored into fresh databases (PostgreSQL through pg_restore, a new SQLite file) hold
every row of the original, table by table; a non-empty target or a corrupted backup is refused with
one line and the target is left as it was."""

from __future__ import annotations

import gzip
import json
import os
import secrets
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
from sqlalchemy import Engine, inspect, make_url, text

from db import make_engine, session_factory
from db.backup import backup_database, prune_backups
from db.migrate import upgrade
from db.repository import record_error
from db.restore import RestoreError, restore_database, table_names
from pipeline.settings import Settings
from pipeline.submit import submit_file

from support.processes import assert_one_error_line, cli, cli_ok, pipeline_env

T0 = datetime(2026, 1, 5, 12, 0, 0, tzinfo=timezone.utc)


@pytest.fixture
def fresh_pg(pg_admin: Engine, pg_url: str) -> Iterator[Callable[[], str]]:
    """Makes more empty PostgreSQL databases of this test's own, beside `pg_url` (dropped after)."""
    made: list[str] = []

    def make() -> str:
        name = f"pipeline_restore_{os.getpid()}_{secrets.token_hex(4)}"
        with pg_admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        made.append(name)
        return make_url(pg_url).set(database=name).render_as_string(hide_password=False)

    yield make
    with pg_admin.connect() as connection:
        for name in made:
            connection.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n "
                                    "AND pid <> pg_backend_pid()"), {"n": name})
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))


def populate(url: str, tmp_path: Path) -> None:
    """A migrated database with a job (requests, chunks), a rejected line and an error event."""
    upgrade(url)
    engine = make_engine(url)
    factory = session_factory(engine)
    lines = [json.dumps({"custom_id": f"r{i}", "text": f"Line {i} ünïcode \u2028", "max_tokens": 3}) for i in range(9)]
    (tmp_path / "in.jsonl").write_text("\n".join(lines + ["not json"]) + "\n")
    submit_file(Settings(database_url=url, chunk_size=4), factory, tmp_path / "in.jsonl", send_chunk=lambda c, q: None)
    with factory.begin() as session:
        record_error(session, "backup", "a recorded failure", traceback="Traceback: line 1\nline 2")
    engine.dispose()


def all_rows(url: str) -> dict[str, list[tuple]]:
    """Every row of every table, sorted (the comparison must not depend on physical order)."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return {table: sorted((tuple(row) for row in connection.execute(text(f'SELECT * FROM "{table}"'))),
                                  key=repr)
                    for table in sorted(inspect(connection).get_table_names())}
    finally:
        engine.dispose()


def check_same(original: str, restored: str) -> None:
    before, after = all_rows(original), all_rows(restored)
    assert list(after) == list(before)
    for table in before:
        assert after[table] == before[table], table
    assert len(before["requests"]) == 9 and len(before["error_history"]) >= 2 and before["alembic_version"]


def test_postgres_backup_restores_row_by_row_into_a_fresh_database(pg_url, fresh_pg, tmp_path):
    populate(pg_url, tmp_path)
    backup = backup_database(pg_url, tmp_path / "backups", now=T0)
    target = fresh_pg()
    restore_database(backup, target)
    check_same(pg_url, target)


def test_sqlite_backup_restores_row_by_row_into_a_fresh_file(tmp_path):
    original = f"sqlite:///{tmp_path / 'original.sqlite3'}"
    populate(original, tmp_path)
    backup = backup_database(original, tmp_path / "backups", now=T0)
    assert backup.name == "pipeline-20260105T120000Z.sqlite3.gz"
    target = tmp_path / "restored" / "pipeline.sqlite3"
    target.parent.mkdir()
    restore_database(backup, f"sqlite:///{target}")
    check_same(original, f"sqlite:///{target}")
    assert target.stat().st_mode & 0o777 == 0o600


def test_a_non_empty_sqlite_target_is_refused_unless_forced(tmp_path):
    original = f"sqlite:///{tmp_path / 'original.sqlite3'}"
    populate(original, tmp_path)
    backup = backup_database(original, tmp_path / "backups", now=T0)
    target = f"sqlite:///{tmp_path / 'other.sqlite3'}"
    upgrade(target)
    with pytest.raises(RestoreError, match=r"other.sqlite3 is not empty \(\d+ tables, e.g. \w+\); restore into an "
                                           "empty database, or pass --force"):
        restore_database(backup, target)
    assert all_rows(target)["requests"] == []
    restore_database(backup, target, force=True)
    check_same(original, target)


def test_a_non_empty_postgres_target_is_refused_unless_forced(pg_url, fresh_pg, tmp_path):
    populate(pg_url, tmp_path)
    backup = backup_database(pg_url, tmp_path / "backups", now=T0)
    target = fresh_pg()
    upgrade(target)
    with pytest.raises(RestoreError, match="is not empty"):
        restore_database(backup, target)
    restore_database(backup, target, force=True)
    check_same(pg_url, target)


def corrupt(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    for i in range(at, min(at + 64, len(data))):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def test_a_corrupted_sqlite_backup_is_refused_and_the_target_untouched(tmp_path):
    original = f"sqlite:///{tmp_path / 'original.sqlite3'}"
    populate(original, tmp_path)
    backup = backup_database(original, tmp_path / "backups", now=T0)
    corrupt(backup, len(backup.read_bytes()) // 2)
    target = tmp_path / "fresh.sqlite3"
    with pytest.raises(RestoreError, match=r"corrupted backup .*; use another backup") as refused:
        restore_database(backup, f"sqlite:///{target}")
    assert "\n" not in str(refused.value)
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".pipeline-restore-")] == []


def test_a_gzip_of_something_else_is_refused(tmp_path):
    backup = tmp_path / "pipeline-20260105T120000Z.sqlite3.gz"
    backup.write_bytes(gzip.compress(b"not a database at all" * 100))
    with pytest.raises(RestoreError, match="corrupted backup"):
        restore_database(backup, f"sqlite:///{tmp_path / 'fresh.sqlite3'}")


@pytest.mark.parametrize("where", ["header", "data"])
def test_a_corrupted_postgres_backup_is_refused_and_the_target_stays_empty(pg_url, fresh_pg, tmp_path, where):
    populate(pg_url, tmp_path)
    backup = backup_database(pg_url, tmp_path / "backups", now=T0)
    size = len(backup.read_bytes())
    corrupt(backup, 0 if where == "header" else size - size // 4)
    target = fresh_pg()
    with pytest.raises(RestoreError, match=r"(corrupted backup|pg_restore failed, nothing restored)") as refused:
        restore_database(backup, target)
    assert "\n" not in str(refused.value)
    assert table_names(target) == []  # one transaction: nothing half restored


def test_a_backup_goes_only_into_its_own_kind_of_database(tmp_path, pg_url):
    original = f"sqlite:///{tmp_path / 'original.sqlite3'}"
    upgrade(original)
    backup = backup_database(original, tmp_path / "backups", now=T0)
    with pytest.raises(RestoreError, match="a SQLite backup restores into a SQLite database, not postgresql"):
        restore_database(backup, pg_url)


def test_prune_keeps_the_newest_backups_with_their_kv_archives(tmp_path):
    folder = tmp_path / "backups"
    folder.mkdir()
    names = ["pipeline-20260101T030000Z.dump", "pipeline-20260102T030000Z.dump",
             "pipeline-20260102T030000Z.kv.tar.gz", "pipeline-20260103T030000Z.sqlite3.gz", "notes.txt"]
    for name in names:
        (folder / name).write_text("x")
    deleted = prune_backups(folder, 2)
    assert [p.name for p in deleted] == ["pipeline-20260101T030000Z.dump"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(names[1:])
    assert [p.name for p in prune_backups(folder, 1)] == names[1:3]


def test_cli_backup_and_restore(tmp_path):
    original = tmp_path / "original.sqlite3"
    populate(f"sqlite:///{original}", tmp_path)
    env = pipeline_env(PIPELINE_DATABASE_URL=f"sqlite:///{original}", PIPELINE_BACKUPS_DIR=str(tmp_path / "backups"),
                       PIPELINE_CACHE_DIR=str(tmp_path / "kv"), PIPELINE_BACKUPS_KEEP="2")
    out = tmp_path / "mine.sqlite3.gz"
    assert cli_ok(env, tmp_path, "backup", "-o", str(out)).stdout.strip() == str(out)
    for _ in range(3):
        made = Path(cli_ok(env, tmp_path, "backup").stdout.strip())
        assert made.parent == tmp_path / "backups"
    assert len(list((tmp_path / "backups").iterdir())) <= 2  # backups_keep (two made in the same second share a name)

    fresh = tmp_path / "fresh.sqlite3"
    target_env = {**env, "PIPELINE_DATABASE_URL": f"sqlite:///{fresh}"}
    cli_ok(target_env, tmp_path, "restore", str(out))
    check_same(f"sqlite:///{original}", f"sqlite:///{fresh}")
    assert_one_error_line(cli(target_env, tmp_path, "restore", str(out)), mentions="is not empty")
    cli_ok(target_env, tmp_path, "restore", str(out), "--force")
    corrupt(out, 40)
    assert_one_error_line(cli({**env, "PIPELINE_DATABASE_URL": f"sqlite:///{tmp_path / 'x.sqlite3'}"}, tmp_path,
                              "restore", str(out)), mentions="corrupted backup")
    assert_one_error_line(cli(env, tmp_path, "backup", "-o", str(tmp_path / "wrong.dump")), mentions=".sqlite3.gz")
