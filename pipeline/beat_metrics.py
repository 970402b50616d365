"""Beat's Prometheus endpoint: the depth of each queue, exported by one process per deployment
(beat, of which there is one) rather than by every worker, so a sum over scrapes is not N times
the truth."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import redis
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pipeline.metrics_server import serve_registry
from pipeline.queue_depth import queue_depths

log = logging.getLogger(__name__)


class QueueDepthCollector(Collector):
    """Reads the queue lengths from Redis at each scrape; a Redis outage gives no sample (and a log
    line), not a failed scrape."""

    def __init__(self, client: redis.Redis, key_prefix: str) -> None:
        self.client = client
        self.key_prefix = key_prefix

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily("pipeline_queue_depth", "Tasks waiting in each queue.", labels=["queue"])
        try:
            depths = queue_depths(self.client, self.key_prefix)
        except redis.RedisError as e:
            log.warning("cannot read queue depths from Redis: %s", e)
            depths = {}
        for queue, n in depths.items():
            depth.add_metric([queue], n)
        yield depth


def serve_queue_depths(broker_url: str, key_prefix: str, ports: range) -> int:
    """Serve `pipeline_queue_depth` on the first free port of `ports`; returns it."""
    registry = CollectorRegistry()
    client = redis.Redis.from_url(broker_url, socket_timeout=5, socket_connect_timeout=5)
    registry.register(QueueDepthCollector(client, key_prefix))
    return serve_registry(registry, ports)
