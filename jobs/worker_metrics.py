"""A worker process's Prometheus endpoint, and what it tells `pipeline stats` and `pipeline health`.

Each worker serves its own metrics (`workers.metrics` for the engine; here the outcome of each
request it wrote) on the first free port of `metrics_port` (a range, so several workers share a
host without a port each in their settings). Queue depths are not here: they are the broker's, the
same for every worker, and exported once by beat (`pipeline.beat_metrics`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, ProcessCollector

from db.results import RequestResult
from pipeline.metrics_server import serve_registry
from workers.engine_loop import EngineLoop
from workers.metrics import EngineMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EngineStatus:
    """A worker's engine as `pipeline stats`/`health` show it (the `engine_stats` inspect command)."""

    metrics_port: int | None
    num_steps: int
    seconds_since_step: float | None  # None: no step yet
    requests_in_flight: int
    kv_blocks_used: int
    kv_blocks_free: int
    kv_blocks_cached: int
    kv_evictions: int
    preemptions: int
    prefix_cache_hit_rate: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class WorkerMetrics:
    """The process's registry: the engine's metrics and the requests it wrote, by outcome."""

    def __init__(self, loop: EngineLoop) -> None:
        self.loop = loop
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # CPU seconds, resident memory, open files
        self.engine = EngineMetrics(loop.engine, self.registry)
        self.requests = Counter("pipeline_requests", "Requests written, by outcome: 'completed' or the "
                                "error code.", ["outcome"], registry=self.registry)
        self.port: int | None = None

    def count(self, results: Iterable[RequestResult]) -> None:
        for result in results:
            self.requests.labels(result.error_code or "completed").inc()

    def serve(self, ports: range) -> int:
        """Serve on the first free port of `ports`; returns it. Raises OSError when all are taken."""
        self.port = serve_registry(self.registry, ports)
        return self.port

    def status(self) -> EngineStatus:
        engine = self.loop.engine
        pool = engine.kv_manager.pool
        kv = engine.kv_manager
        last = self.engine.last_step_time
        return EngineStatus(
            metrics_port=self.port, num_steps=self.loop.num_steps,
            seconds_since_step=None if last is None else round(time.monotonic() - last, 3),
            requests_in_flight=self.loop.num_in_flight,
            kv_blocks_used=pool.num_blocks - pool.num_free_blocks, kv_blocks_free=pool.num_free_blocks,
            kv_blocks_cached=pool.num_cached_blocks, kv_evictions=pool.num_evictions,
            preemptions=engine.scheduler.num_preemptions,
            prefix_cache_hit_rate=kv.prefix_cache_hits / kv.prefix_cache_queries if kv.prefix_cache_queries else 0.0,
        )


_lock = threading.Lock()
_metrics: WorkerMetrics | None = None


def install(loop: EngineLoop) -> WorkerMetrics:
    """This process's metrics, created on first use (the worker command, or a test)."""
    global _metrics
    with _lock:
        if _metrics is None or _metrics.loop is not loop:
            _metrics = WorkerMetrics(loop)
        return _metrics


def current() -> WorkerMetrics | None:
    """This process's metrics, None where none were installed (`pipeline run`, tests)."""
    return _metrics
