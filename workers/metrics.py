"""Prometheus metrics of one engine: counters and gauges read from the engine when scraped,
histograms fed by a step callback.

Counters the engine already keeps (tokens, preemptions, evictions) are read at scrape time rather
than mirrored, so a metric can never drift from `LLMEngine.stats()`, and the engine loop pays only
for the histograms: a few bisects per step and per finished request.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from workers.engine import LLMEngine, StepReport

# Seconds; requests of a batch job take from milliseconds (tiny model, cached prompt) to minutes.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class EngineMetrics:
    """Registers `engine`'s metrics in `registry` and observes its steps from now on."""

    def __init__(self, engine: LLMEngine, registry: CollectorRegistry) -> None:
        self.engine = engine
        self.last_step_time: float | None = None  # time.monotonic() of the last step; None: none yet
        self.latency = Histogram("pipeline_request_latency_seconds", "Seconds from a request entering the "
                                 "engine to its last token.", buckets=LATENCY_BUCKETS, registry=registry)
        self.ttft = Histogram("pipeline_time_to_first_token_seconds", "Seconds from a request entering the "
                              "engine to its first token.", buckets=LATENCY_BUCKETS, registry=registry)
        self.step = Histogram("pipeline_engine_step_seconds", "Seconds of one engine step.",
                              buckets=STEP_BUCKETS, registry=registry)
        registry.register(_EngineCollector(engine))
        engine.add_step_callback(self.observe)

    def observe(self, report: StepReport) -> None:
        """The step callback (on the engine loop's thread)."""
        self.last_step_time = time.monotonic()
        self.step.observe(report.seconds)
        for output in report.finished:
            self.latency.observe(output.metrics.latency)
            if output.metrics.ttft is not None:
                self.ttft.observe(output.metrics.ttft)


class _EngineCollector(Collector):
    """Reads the engine's counters and KV pool when scraped (from the HTTP server's thread: plain int
    reads, which the engine's own thread may change between two of them; a scrape is a snapshot of
    approximately one moment, as every Prometheus scrape is)."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        engine = self.engine
        kv = engine.kv_manager
        pool = kv.pool
        stats = engine.counters
        yield _counter("pipeline_prompt_tokens", "Prompt tokens of finished requests.", stats.num_prompt_tokens)
        yield _counter("pipeline_cached_prompt_tokens", "Prompt tokens served from the prefix cache.",
                       kv.prefix_cache_hits)
        yield _counter("pipeline_completion_tokens", "Tokens generated.", stats.num_generated_tokens)
        yield _counter("pipeline_preemptions", "Sequences preempted for lack of KV blocks (recomputed later).",
                       engine.scheduler.num_preemptions)
        yield _counter("pipeline_kv_evictions", "Cached prefix blocks whose contents were reused for others.",
                       pool.num_evictions)
        blocks = GaugeMetricFamily("pipeline_kv_blocks", "KV cache blocks by state: used (held by a running "
                                   "sequence), cached (free but still holding a prefix), free (all free ones, "
                                   "cached included).", labels=["state"])
        blocks.add_metric(["used"], pool.num_blocks - pool.num_free_blocks)
        blocks.add_metric(["free"], pool.num_free_blocks)
        blocks.add_metric(["cached"], pool.num_cached_blocks)
        yield blocks
        yield GaugeMetricFamily("pipeline_running_sequences", "Sequences the scheduler is running.",
                                value=len(engine.scheduler.running))
        yield GaugeMetricFamily("pipeline_waiting_sequences", "Sequences waiting for a place in a step.",
                                value=len(engine.scheduler.waiting))


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)  # exposed as `<name>_total`
