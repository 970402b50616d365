"""`db.retry`: which errors are transient (real ones, from a real refused connection and a real
SQLite), the capped backoff schedule, and the attempts loop re-running a block until it succeeds."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError

from db.retry import RetryPolicy, db_attempts, is_transient


def closed_port_url() -> str:
    """A PostgreSQL URL on a port nobody listens on: connecting is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"


def _error_of(url: str, sql: str = "SELECT 1") -> DBAPIError:
    engine = create_engine(url)
    try:
        with pytest.raises(DBAPIError) as caught, engine.connect() as connection:
            connection.execute(text(sql))
        return caught.value
    finally:
        engine.dispose()


def test_a_refused_postgres_connection_is_transient() -> None:
    assert is_transient(_error_of(closed_port_url()))


def test_sqlite_errors_and_other_exceptions_are_not_transient(tmp_path: Path) -> None:
    assert not is_transient(_error_of(f"sqlite:///{tmp_path / 'x.sqlite3'}", "SELECT * FROM missing_table"))
    assert not is_transient(ValueError("not a database error"))


def test_backoff_doubles_up_to_the_cap() -> None:
    policy = RetryPolicy(max_tries=7, first_delay_s=0.5, max_delay_s=3.0)
    assert [policy.delay_s(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]
    with pytest.raises(ValueError, match="max_tries"):
        RetryPolicy(max_tries=0)
    with pytest.raises(ValueError, match="first_delay_s"):
        RetryPolicy(first_delay_s=2.0, max_delay_s=1.0)


def test_the_block_runs_again_after_transient_errors_and_each_retry_is_logged(caplog) -> None:
    refused = _error_of(closed_port_url())
    slept: list[float] = []
    runs = 0
    with caplog.at_level(logging.WARNING, logger="db.retry"):
        for attempt in db_attempts("write the results of chunk 7", RetryPolicy(5, 0.5, 10.0), slept.append):
            with attempt:
                runs += 1
                if runs < 3:
                    raise refused
    assert (runs, slept) == (3, [0.5, 1.0])
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
        "database unavailable while trying to write the results of chunk 7"] * 2


def test_the_last_transient_error_and_any_other_error_propagate() -> None:
    refused = _error_of(closed_port_url())
    slept: list[float] = []
    with pytest.raises(DBAPIError):
        for attempt in db_attempts("claim chunk 1", RetryPolicy(3, 0.1, 1.0), slept.append):
            with attempt:
                raise refused
    assert slept == [0.1, 0.2]  # three tries, two waits
    with pytest.raises(KeyError):
        for attempt in db_attempts("claim chunk 1", RetryPolicy(3, 0.1, 1.0), slept.append):
            with attempt:
                raise KeyError("a bug, not an outage")
    assert slept == [0.1, 0.2]  # not retried
