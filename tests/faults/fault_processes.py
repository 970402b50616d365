"""The processes a fault test drives: `pipeline` commands and a `pipeline worker`, with their
environment, and waiting on outcomes with generous deadlines (never timing them)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import pytest

from jobs.worker_process import stop_process

REPO_ROOT = Path(__file__).resolve().parents[2]
DEADLINE_S = 120.0
T = TypeVar("T")


def pipeline_env(**pipeline_vars: str) -> dict[str, str]:
    """This environment without any PIPELINE_ variable, plus `pipeline_vars`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    env.update(PYTHONPATH=str(REPO_ROOT), **pipeline_vars)
    return env


def cli(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`pipeline ARGS`, whatever its exit status."""
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=DEADLINE_S)


def cli_ok(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess:
    result = cli(env, cwd, *args)
    assert result.returncode == 0 and "Traceback" not in result.stderr, f"pipeline {' '.join(args)}:\n{result.stderr}"
    return result


def assert_one_error_line(result: subprocess.CompletedProcess, *, mentions: str) -> None:
    """A domain failure as the CLI must show it: exit 1, one `error:` line naming `mentions`."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and mentions in lines[0], result.stderr


def wait_until(check: Callable[[], T | None], what: str, log: Path | None = None,
               deadline_s: float = DEADLINE_S) -> T:
    """`check()`'s first truthy value, polled until `deadline_s`; else the test fails naming `what`
    (and showing the worker log)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    shown = f"\n--- worker log ---\n{log.read_text()}" if log is not None else ""
    pytest.fail(f"{what}: not after {deadline_s} s{shown}")


def log_count(log: Path, text: str) -> int:
    return log.read_text(errors="replace").count(text)


@contextmanager
def worker(env: dict[str, str], cwd: Path, log: Path, *args: str) -> Iterator[subprocess.Popen]:
    """A `pipeline worker ARGS` process writing `log`, ready (consuming) when this yields; stopped
    after."""
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "pipeline", "worker", *args], cwd=cwd, env=env,
                                   stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: process.poll() is not None or log_count(log, " ready.") > 0, "worker ready", log)
            assert process.poll() is None, f"the worker exited with {process.returncode}:\n{log.read_text()}"
            yield process
        finally:
            stop_process(process)
