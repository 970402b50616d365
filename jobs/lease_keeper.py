"""Keeping a chunk's lease alive while it runs: a heartbeat thread that renews it.

The lease (the visibility timeout) says how long a worker may go silent before its chunk is taken
over. Renewed every third of it while the chunk runs, it only runs out when the worker is gone
(killed, hung, cut off from the database), so a chunk that takes longer than the lease is never
taken over and computed twice, and the lease can be short enough for a dead worker's chunk to come
back within seconds. A renewal that fails (the database briefly away) is logged and tried again at
the next beat; one that finds the lease taken is logged once: the results write stays idempotent.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

from sqlalchemy.orm import Session, sessionmaker

from db.repository import renew_lease

log = logging.getLogger(__name__)


@contextmanager
def keep_lease(session_factory: sessionmaker[Session], chunk_id: int, worker: str, lease: timedelta) -> Iterator[None]:
    """Renew `worker`'s lease on `chunk_id` every `lease / 3` until the block ends."""
    stop = threading.Event()
    every_s = lease.total_seconds() / 3

    def beat() -> None:
        while not stop.wait(every_s):
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
