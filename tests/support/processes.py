"""The processes a test drives: `pipeline` commands, `pipeline worker` and other long-running
commands, with an environment of their own, and waiting on outcomes with generous deadlines
(never timing them)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import pytest

from jobs.worker_process import stop_process

from support.markers import require_marker

REPO_ROOT = Path(__file__).resolve().parents[2]
BROKER_URL = os.environ.get("PIPELINE_BROKER_URL", "redis://127.0.0.1:6379/0")
DEADLINE_S = 120.0
PIPELINE = (sys.executable, "-m", "pipeline")
T = TypeVar("T")


def key_prefix(kind: str = "test") -> str:
    """A Redis key prefix of one test's own, so tests share one Redis safely."""
    return f"pipeline-{kind}-{uuid.uuid4().hex[:12]}:"


def pipeline_env(**pipeline_vars: str) -> dict[str, str]:
    """This environment without any PIPELINE_ variable, plus `pipeline_vars`: no setting of the
    machine running the tests leaks into a child process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    env.update(PYTHONPATH=str(REPO_ROOT), **pipeline_vars)
    return env


def settings_vars(env: dict[str, str]) -> dict[str, str]:
    """The PIPELINE_ variables of `env` (what `load_settings(env=...)` reads)."""
    return {k: v for k, v in env.items() if k.startswith("PIPELINE_")}


def cli(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`pipeline ARGS`, whatever its exit status."""
    return subprocess.run([*PIPELINE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=DEADLINE_S)


def cli_ok(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`pipeline ARGS`, which must exit 0 with no traceback."""
    result = cli(env, cwd, *args)
    assert result.returncode == 0 and "Traceback" not in result.stderr, f"pipeline {' '.join(args)}:\n{result.stderr}"
    return result


def assert_one_error_line(result: subprocess.CompletedProcess, *, mentions: str) -> None:
    """A domain failure as the CLI must show it: exit 1, one `error:` line naming `mentions`."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and mentions in lines[0], result.stderr


def wait_until(check: Callable[[], T | None], what: str, log: Path | None = None,
               deadline_s: float = DEADLINE_S, process: subprocess.Popen | None = None) -> T:
    """`check()`'s first truthy value, polled until `deadline_s`; else the test fails naming `what`
    (and showing `log`). With `process`, the test fails at once if that process exits meanwhile."""
    shown = lambda: f"\n--- log ---\n{log.read_text(errors='replace')}" if log is not None else ""  # noqa: E731
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if process is not None and process.poll() is not None:
            pytest.fail(f"{what}: the process exited with {process.returncode}{shown()}")
        time.sleep(0.1)
    pytest.fail(f"{what}: not after {deadline_s} s{shown()}")


def log_count(log: Path, text: str) -> int:
    return log.read_text(errors="replace").count(text)


@contextmanager
def background(argv: Sequence[str], env: dict[str, str], cwd: Path, log: Path) -> Iterator[subprocess.Popen]:
    """A long-running command writing `log`; stopped (SIGTERM, then SIGKILL) after."""
    with log.open("w") as out:
        process = subprocess.Popen(list(argv), cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            yield process
        finally:
            stop_process(process)


@contextmanager
def worker(env: dict[str, str], cwd: Path, log: Path, *args: str,
           command: Sequence[str] = (*PIPELINE, "worker")) -> Iterator[subprocess.Popen]:
    """A `pipeline worker ARGS` process (or another Celery worker `command`) writing `log`, ready
    (consuming) when this yields; stopped after. Only a test marked `workers` may start one."""
    require_marker("workers")
    with background([*command, *args], env, cwd, log) as process:
        wait_until(lambda: process.poll() is not None or log_count(log, " ready.") > 0, "worker ready", log)
        assert process.poll() is None, f"the worker exited with {process.returncode}:\n{log.read_text()}"
        yield process


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def api_server(env: dict[str, str], cwd: Path, log: Path) -> Iterator[str]:
    """A `pipeline serve` process on a free 127.0.0.1 port, writing `log`; yields its base URL once
    `/healthz` answers, stopped after."""
    import urllib.request

    port = free_port()
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    with background([*PIPELINE, "serve", "--host", "127.0.0.1", "--port", str(port)], env, cwd, log) as process:
        wait_until(healthy, "the API server answering /healthz", log, process=process)
        yield url
