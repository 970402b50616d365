"""One test's deployment: a fresh PostgreSQL database (migrated), a Redis key prefix of its own and
any number of real `pipeline worker` processes started with the environment the test asks for.
Workers are told apart by node name (`--name`), which is what the chunks table records as
`worker`, so a test can kill exactly the worker that holds a chunk. The `services` fixture
(conftest.py) builds it and tears it down.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TypeVar

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db import make_engine, session_factory
from db.enums import ChunkStatus
from db.migrate import upgrade
from db.models import Chunk
from jobs.maintenance import resend_lost_chunks
from pipeline.celery_app import chunk_sender, make_celery
from pipeline.settings import Settings, load_settings

from fault_checks import PRICES
from support.processes import BROKER_URL, DEADLINE_S, cli_ok, key_prefix, pipeline_env, wait_until, worker

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Worker:
    """A running `pipeline worker`: `node` is its Celery node name, as the chunks table shows it."""

    node: str
    process: subprocess.Popen
    log: Path

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> int:
        """Sends `sig` and waits for the process to end; returns its exit status."""
        self.process.send_signal(sig)
        return self.process.wait(timeout=DEADLINE_S)


class Services:
    """PostgreSQL, Redis and workers for one test; see the module docstring."""

    def __init__(self, database_url: str, cwd: Path, stack: ExitStack, **env_vars: str) -> None:
        self.database_url = database_url
        self.cwd = cwd
        self.prefix = key_prefix("fault")
        # Chunks of 2 and a visibility timeout (also the chunk lease) of 5 s: a killed worker's chunk
        # comes back within seconds. Prices make a line billed twice show in the cost too.
        self.env_vars = {"PIPELINE_DATABASE_URL": database_url, "PIPELINE_BROKER_URL": BROKER_URL,
                         "PIPELINE_REDIS_KEY_PREFIX": self.prefix, "PIPELINE_CHUNK_SIZE": "2",
                         "PIPELINE_VISIBILITY_TIMEOUT_S": "5", **PRICES, **env_vars}
        self.workers: list[Worker] = []
        self._stack = stack
        upgrade(database_url)
        engine = make_engine(database_url)
        stack.callback(engine.dispose)
        self.factory: sessionmaker[Session] = session_factory(engine)
        self.settings: Settings = load_settings(env=self.env_vars, config_path=None)
        self.app = make_celery(self.settings)
        stack.callback(self.app.close)

    def env(self, **overrides: str) -> dict[str, str]:
        return pipeline_env(**{**self.env_vars, **overrides})

    def start_worker(self, name: str, *, concurrency: int = 1, **env_overrides: str) -> Worker:
        """A worker named `name@faults`, consuming when this returns; stopped (SIGTERM) at the end."""
        node = f"{name}@faults"
        log = self.cwd / f"{name}.log"
        process = self._stack.enter_context(
            worker(self.env(**env_overrides), self.cwd, log, "--concurrency", str(concurrency), "--name", node))
        started = Worker(node, process, log)
        self.workers.append(started)
        return started

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return cli_ok(self.env(), self.cwd, *args)

    def run_embedded(self, path: Path, **env_overrides: str) -> Path:
        """`pipeline run` of `path` in one process on a SQLite database of its own (a reference run
        with no services and no faults); returns its results file."""
        out = path.with_suffix(".embedded.jsonl")
        database = f"sqlite:///{path.with_suffix('.embedded.sqlite3')}"
        cli_ok(self.env(PIPELINE_DATABASE_URL=database, **env_overrides), self.cwd, "run", str(path), "-o", str(out))
        return out

    def submit(self, path: Path, *args: str) -> str:
        return self.cli("submit", str(path), *args).stdout.strip()

    def sweep(self, *, now: datetime | None = None) -> list[int]:
        """The lost-chunk sweep as beat runs it, with this deployment's redelivery cap."""
        return resend_lost_chunks(self.factory, chunk_sender(self.app), now=now,
                                  max_redeliveries=self.settings.task_max_redeliveries)

    def running_chunks(self, job_id: str) -> dict[int, str]:
        """chunk id -> node name of the worker holding it, for the job's running chunks."""
        with self.factory() as session:
            rows = session.execute(select(Chunk.id, Chunk.worker).where(
                Chunk.job_id == job_id, Chunk.status == ChunkStatus.RUNNING, Chunk.worker.is_not(None)))
            return {chunk_id: node for chunk_id, node in rows}

    def worker_named(self, node: str) -> Worker:
        return next(w for w in self.workers if w.node == node)

    def wait(self, check: Callable[[], T | None], what: str, deadline_s: float = DEADLINE_S) -> T:
        """`check()`'s first truthy value; else the test fails showing every worker's log."""
        try:
            return wait_until(check, what, deadline_s=deadline_s)
        except pytest.fail.Exception as e:
            logs = "".join(f"\n--- {w.node} ---\n{w.log.read_text(errors='replace')}" for w in self.workers)
            pytest.fail(f"{e}{logs}")
