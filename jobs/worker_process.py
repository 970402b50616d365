"""Worker processes started for one run (benchmarks, tests): start them on a run's own settings,
stop them, then delete every Redis key under the run's own prefix, so runs can share a Redis."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import IO, TYPE_CHECKING

import redis

if TYPE_CHECKING:
    from pipeline.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[1]


def start_worker(settings: Settings, cwd: Path, log: IO[str], *, concurrency: int) -> subprocess.Popen:
    """`pipeline worker` on `settings`' model, database, broker, key prefix, chunk size, metrics
    port and CPU threads (passed as PIPELINE_* variables; the caller's own PIPELINE_* variables are not
    inherited), logging to `log`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    env.update(PYTHONPATH=str(REPO_ROOT), PIPELINE_MODEL=settings.model, PIPELINE_DATABASE_URL=settings.database_url,
               PIPELINE_BROKER_URL=settings.broker_url, PIPELINE_REDIS_KEY_PREFIX=settings.redis_key_prefix,
               PIPELINE_CHUNK_SIZE=str(settings.chunk_size), PIPELINE_METRICS_PORT=settings.metrics_port)
    if settings.cpu_threads is not None:
        env["PIPELINE_CPU_THREADS"] = str(settings.cpu_threads)
    return subprocess.Popen([sys.executable, "-m", "pipeline", "worker", "--concurrency", str(concurrency)],
                            cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)


def stop_process(process: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM (a warm shutdown: the worker hands back its task), SIGKILL if it does not exit in time."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def delete_prefixed_keys(client: redis.Redis, prefix: str) -> int:
    """Deletes every key that starts with `prefix`; returns how many there were."""
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    return client.delete(*keys) if keys else 0
