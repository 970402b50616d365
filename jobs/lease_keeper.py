"""Keeping a chunk's lease alive while it runs: a heartbeat thread that renews it.

The lease (the visibility timeout) says how long a worker may go silent before its chunk is taken
over. Renewed every third of it while the chunk runs, it only runs out when the worker is gone
(killed, hung, cut off from the database), so a chunk that takes longer than the lease is never
taken over and computed twice, and the lease can be short enough for a dead worker's chunk to come
back within seconds. A renewal that fails (the database briefly away) is logged and tried again at
the next beat; one that finds the lease taken is logged once: the results write stays idempotent.

A hung worker is not dead, though: its heartbeat thread would renew the lease of a chunk that never
finishes. So a `Watchdog` can ride along: when the chunk has made no progress for a while
(`jobs.chunk_progress`), renewals stop and the hang is recovered like a crash.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy.orm import Session, sessionmaker

from db.repository import renew_lease
from jobs.chunk_progress import ChunkProgress

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Watchdog:
    """Gives a chunk up when it makes no progress: after `stall_timeout` without `progress` moving,
    the lease is no longer renewed and `on_stall(seconds stalled)` is called, once."""

    progress: ChunkProgress
    stall_timeout: timedelta
    on_stall: Callable[[float], None]


@contextmanager
def keep_lease(session_factory: sessionmaker[Session], chunk_id: int, worker: str, lease: timedelta,
               watchdog: Watchdog | None = None) -> Iterator[None]:
    """Renew `worker`'s lease on `chunk_id` every `lease / 3` until the block ends, or until the
    `watchdog` finds the chunk stalled: then its lease runs out as a dead worker's would, and the
    chunk is taken over (the thread that hangs cannot be stopped, but it holds nothing)."""
    stop = threading.Event()
    every_s = lease.total_seconds() / 3
    stall_s = None if watchdog is None else watchdog.stall_timeout.total_seconds()
    tick_s = every_s if stall_s is None else min(every_s, stall_s / 2)

    def beat() -> None:
        renew_at = time.monotonic() + every_s
        while not stop.wait(max(0.0, min(tick_s, renew_at - time.monotonic()))):
            if watchdog is not None and (stalled := watchdog.progress.stalled_s()) >= stall_s:
                log.error("chunk %s made no progress for %.0f s; no longer renewing its lease", chunk_id, stalled)
                try:
                    watchdog.on_stall(stalled)
                except Exception:  # noqa: BLE001 - the lease is given up all the same
                    log.exception("chunk %s: reporting the stall failed", chunk_id)
                return
            if time.monotonic() < renew_at:
                continue
            renew_at = time.monotonic() + every_s
            try:
                with session_factory.begin() as session:
                    held = renew_lease(session, chunk_id, worker=worker, lease=lease)
            except Exception:  # noqa: BLE001 - a missed beat is retried at the next; the lease has slack
                log.warning("could not renew the lease of chunk %s; trying again in %.1f s", chunk_id, every_s,
                            exc_info=True)
                continue
            if not held:
                log.warning("chunk %s: lease lost (expired or taken over); its results are still written once",
                            chunk_id)
                return

    thread = threading.Thread(target=beat, name=f"lease-{chunk_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
