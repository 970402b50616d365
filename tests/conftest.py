"""Shared fixtures: random-weight Hugging Face models, and a fresh PostgreSQL database per test.

PostgreSQL comes from PIPELINE_TEST_POSTGRES_URL (default: the local server, trust auth). Each
test gets its own database, created through an AUTOCOMMIT connection to the `postgres` database
and dropped afterwards; tests that need it are skipped, with the reason, if the server is down.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, make_url, text
from sqlalchemy.exc import OperationalError

sys.path.insert(0, str(Path(__file__).parent))  # `import hf_models`, `support` from any test folder

from support.markers import markers_for, require_marker, track  # noqa: E402


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Marks each test `postgres`, `redis` or `workers` from the fixtures it uses (support/markers.py)."""
    for item in items:
        for name in sorted(markers_for(item)):
            if item.get_closest_marker(name) is None:
                item.add_marker(name)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    track(item)  # before its fixtures: they may start services that need a marker


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    track(None)


@pytest.fixture(scope="session")
def hf_model_dirs(tmp_path_factory):
    """arch -> (folder, transformers model); built once per session, lazily per architecture."""
    from hf_models import save_random_model

    root = tmp_path_factory.mktemp("hf")
    built: dict[str, tuple[Path, object]] = {}

    def get(arch: str):
        if arch not in built:
            folder = root / arch
            built[arch] = (folder, save_random_model(arch, folder))
        return built[arch]

    return get


POSTGRES_URL = os.environ.get("PIPELINE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[Engine]:
    engine = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect():
            pass
    except OperationalError as e:
        engine.dispose()
        pytest.skip(f"PostgreSQL not reachable at {make_url(POSTGRES_URL).render_as_string()}: {e.orig}")
    yield engine
    engine.dispose()


@contextmanager
def _fresh_database(pg_admin: Engine) -> Iterator[str]:
    name = f"pipeline_test_{os.getpid()}_{secrets.token_hex(4)}"
    with pg_admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    yield make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    with pg_admin.connect() as connection:
        connection.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = :name AND pid <> pg_backend_pid()"
            ),
            {"name": name},
        )
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))


@pytest.fixture
def pg_url(pg_admin: Engine) -> Iterator[str]:
    require_marker("postgres")
    with _fresh_database(pg_admin) as url:
        yield url


@pytest.fixture(scope="module")
def pg_url_module(pg_admin: Engine) -> Iterator[str]:
    """A fresh database shared by a module's tests (one set of worker processes serves them all)."""
    require_marker("postgres")
    with _fresh_database(pg_admin) as url:
        yield url


@pytest.fixture
def redis_client():
    """The real Redis the tests use; a missing one fails the test (it is part of the test setup)."""
    import redis

    require_marker("redis")
    url = os.environ.get("PIPELINE_BROKER_URL", "redis://127.0.0.1:6379/0")
    client = redis.Redis.from_url(url)
    try:
        client.ping()
    except redis.ConnectionError as e:
        pytest.fail(f"no Redis at {url}: {e}; start it (see .ci/run)")
    yield client
    client.close()
