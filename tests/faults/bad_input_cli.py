"""Run the real `pipeline` command line in a child process, as a user would, against an SQLite
database of its own; and look at what it left behind (files, job rows)."""

from __future__ import annotations

import sqlite3
import subprocess
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from support.processes import PIPELINE, pipeline_env

# Nothing listens on the discard port: a command that tried to reach this broker would fail with
# "cannot reach the broker", so seeing any other outcome proves it never tried.
DEAD_BROKER_URL = "redis://127.0.0.1:9/0"
# A guard against a hung child, not a measurement: a healthy run takes a few seconds.
CHILD_TIMEOUT_S = 600


@dataclass(frozen=True, slots=True)
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def stderr_lines(self) -> list[str]:
        return self.stderr.splitlines()


def database_url(db_file: Path) -> str:
    return f"sqlite:///{db_file}"


def run_pipeline(args: list[str], *, cwd: Path, db_file: Path, broker_url: str = DEAD_BROKER_URL,
                 settings: dict[str, str] | None = None) -> CliResult:
    """`python -m pipeline ARGS` in `cwd`, with no PIPELINE_ setting from this environment except the
    database, the broker and `settings`, so no config of the machine running the tests leaks in."""
    env = pipeline_env(PIPELINE_DATABASE_URL=database_url(db_file), PIPELINE_BROKER_URL=broker_url, **(settings or {}))
    done = subprocess.run([*PIPELINE, *args], cwd=cwd, env=env, capture_output=True, encoding="utf-8",
                          timeout=CHILD_TIMEOUT_S, check=False)
    return CliResult(done.returncode, done.stdout, done.stderr)


def jobs_in(db_file: Path) -> list[tuple[str, str, int, int]]:
    """(id, status, request_total, request_failed) of every job in the database."""
    with closing(sqlite3.connect(db_file)) as connection:
        return connection.execute("SELECT id, status, request_total, request_failed FROM jobs ORDER BY id").fetchall()


def count_rows(db_file: Path, table: str) -> int:
    with closing(sqlite3.connect(db_file)) as connection:
        return connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def files_in(folder: Path) -> set[str]:
    """Every name in `folder`, hidden ones too (an atomic writer's temporary file starts with a dot)."""
    return {path.name for path in folder.iterdir()}
