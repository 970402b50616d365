"""Tidying up after a worker process started for one run (benchmarks, tests): stop it, then delete
every Redis key under the run's own prefix, so runs can share a Redis."""

from __future__ import annotations

import subprocess

import redis


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
