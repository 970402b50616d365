"""Retrying a unit of database work through a brief outage (a restarted or failed-over server).

Which errors are transient, how often to try and how long to wait between tries, in one place.
A unit of work is a block that opens, does and commits its own transaction, so a retry runs
the whole block again on a fresh connection. It must be safe to repeat: a commit whose reply was
lost runs again (the result write only writes requests still pending, so a repeat writes nothing).

    for attempt in db_attempts(f"write the results of chunk {chunk_id}"):
        with attempt, session_factory.begin() as session:
            record_results(session, chunk_id, results)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType

from sqlalchemy.exc import DBAPIError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Up to `max_tries` tries; waits `first_delay_s`, doubling each time, never more than `max_delay_s`.

    The defaults ride out about a minute without the server (0.5 + 1 + 2 + 4 + 8 + 4 x 10 s), long
    enough for a restart or a managed failover, short enough that a server that is really gone
    fails the task instead of hanging it.
    """

    max_tries: int = 10
    first_delay_s: float = 0.5
    max_delay_s: float = 10.0

    def __post_init__(self) -> None:
        if self.max_tries < 1:
            raise ValueError(f"max_tries must be at least 1, got {self.max_tries}")
        if not 0 <= self.first_delay_s <= self.max_delay_s:
            raise ValueError(f"expected 0 <= first_delay_s <= max_delay_s, got {self.first_delay_s}, {self.max_delay_s}")

    def delay_s(self, failed_tries: int) -> float:
        """Seconds to wait after the `failed_tries`-th failed try (1-based)."""
        return min(self.max_delay_s, self.first_delay_s * 2 ** (failed_tries - 1))


DEFAULT_POLICY = RetryPolicy()


def is_transient(error: BaseException) -> bool:
    """True for errors that running the same transaction again may cure: the connection was lost
    (SQLAlchemy invalidated it), or PostgreSQL refused or dropped it (psycopg's OperationalError:
    server down, starting up or shutting down, admin shutdown; also serialization failures and
    deadlocks). SQLite's OperationalError ("no such table", a busy timeout already waited out) and
    every other DB-API error (a constraint, a bad statement) are not: trying again cannot help."""
    if not isinstance(error, DBAPIError):
        return False
    if error.connection_invalidated:
        return True
    try:
        import psycopg  # only PostgreSQL deployments have it
    except ImportError:
        return False
    return isinstance(error.orig, psycopg.OperationalError)


class Attempt:
    """One try of a unit of work; as a context manager it swallows a transient error when tries
    remain (after logging it and waiting), so the `db_attempts` loop runs the body again."""

    def __init__(self, what: str, tries: int, policy: RetryPolicy, sleep: Callable[[float], None]) -> None:
        self.what, self.tries, self.policy, self.sleep = what, tries, policy, sleep
        self.succeeded = False

    def __enter__(self) -> Attempt:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, _tb: TracebackType | None) -> bool:
        if error is None:
            self.succeeded = True
            return False
        if not is_transient(error) or self.tries == self.policy.max_tries:
            return False
        delay = self.policy.delay_s(self.tries)
        orig = getattr(error, "orig", None)
        reason = str(orig).strip().splitlines()[0] if orig is not None and str(orig).strip() else type(error).__name__
        log.warning("database unavailable while trying to %s (try %d of %d: %s); retrying in %.1f s",
                    self.what, self.tries, self.policy.max_tries, reason, delay)
        self.sleep(delay)
        return True


def db_attempts(what: str, policy: RetryPolicy = DEFAULT_POLICY,
                sleep: Callable[[float], None] = time.sleep) -> Iterator[Attempt]:
    """Tries of one unit of work, run again after a transient database error (`is_transient`)
    with capped exponential backoff; each retry is logged as a warning naming `what`. The last
    try's error, and any other error, propagate. A `return` in the body ends the loop too:

        for attempt in db_attempts(f"claim chunk {chunk_id}"):
            with attempt, session_factory.begin() as session:
                ...
    """
    for tries in range(1, policy.max_tries + 1):
        attempt = Attempt(what, tries, policy, sleep)
        yield attempt
        if attempt.succeeded:
            return
