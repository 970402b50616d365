"""The `services` fixture: `services(**PIPELINE_vars)` builds a `fault_deployment.Services` (a fresh
PostgreSQL database, a Redis key prefix of the test's own, workers on demand); after the test its
workers are stopped and its Redis keys deleted, and checked gone."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from jobs.worker_process import delete_prefixed_keys

from fault_deployment import Services


@pytest.fixture
def services(pg_url: str, tmp_path: Path, redis_client) -> Iterator[Callable[..., Services]]:
    """`services(**PIPELINE_vars)` -> Services (call it once per test, with extra settings if any)."""
    with ExitStack() as stack:
        made: list[Services] = []

        def make(**env_vars: str) -> Services:
            made.append(Services(pg_url, tmp_path, stack, **env_vars))
            return made[-1]

        yield make
        stack.close()  # the workers first, then the keys they may still write
        for s in made:
            delete_prefixed_keys(redis_client, s.prefix)
            assert list(redis_client.scan_iter(match=f"{s.prefix}*")) == []
