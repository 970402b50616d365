"""Whether a running chunk is moving: what the lease keeper's watchdog reads.

A chunk moves while its thread builds prompts (each one built, or refused, touches its progress)
and, while it waits for the engine, while the engine completes steps (the engine loop counts them;
the steps may be other chunks' too, which is fine: an engine that steps serves every request in
turn). A template that never finishes, an engine step that never returns, a deadlock: nothing
moves, and `stalled_s()` grows until the watchdog gives the chunk up (`jobs.lease_keeper`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class ChunkProgress:
    """The last moment a chunk's run moved. `engine_steps` returns the engine's step count."""

    def __init__(self, engine_steps: Callable[[], int]) -> None:
        self._engine_steps = engine_steps
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self._steps_seen: int | None = None  # None: not waiting for the engine

    def touch(self) -> None:
        """The chunk's own thread did something (built a prompt, say)."""
        with self._lock:
            self._last = time.monotonic()

    @contextmanager
    def waiting_for_engine(self) -> Iterator[None]:
        """Inside it, each engine step completed counts as progress."""
        with self._lock:
            self._steps_seen, self._last = self._engine_steps(), time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                self._steps_seen, self._last = None, time.monotonic()

    def stalled_s(self) -> float:
        """Seconds since the chunk last moved (called from the lease keeper's thread)."""
        with self._lock:
            now = time.monotonic()
            if self._steps_seen is not None:
                steps = self._engine_steps()
                if steps != self._steps_seen:
                    self._steps_seen, self._last = steps, now
            return now - self._last
