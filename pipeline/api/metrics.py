"""`GET /metrics`: the server's own figures in Prometheus' text format (version 0.0.4).

Requests by method, route template (never the ids in the path) and status; a latency histogram
per route; upload bytes; the process's resident and peak memory. Written out by hand: a handful of
counters does not need a client library.
"""

from __future__ import annotations

import resource
import threading
import time
from collections import defaultdict

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

# Seconds: API calls are milliseconds; uploads and the first read of a large batch take seconds.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self.latency: dict[str, list[int]] = defaultdict(lambda: [0] * (len(BUCKETS) + 1))
        self.latency_sum: dict[str, float] = defaultdict(float)
        self.upload_bytes = 0

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(method, route, status)] += 1
            counts = self.latency[route]
            counts[next((i for i, bound in enumerate(BUCKETS) if seconds <= bound), len(BUCKETS))] += 1
            self.latency_sum[route] += seconds

    def add_upload(self, size: int) -> None:
        with self._lock:
            self.upload_bytes += size

    def render(self) -> str:
        with self._lock:
            lines = ["# HELP pipeline_api_requests_total API requests by method, route and status.",
                     "# TYPE pipeline_api_requests_total counter"]
            for (method, route, status), count in sorted(self.requests.items()):
                lines.append(f'pipeline_api_requests_total{{method="{method}",route="{route}",status="{status}"}} '
                             f"{count}")
            lines += ["# HELP pipeline_api_request_seconds API request latency.",
                      "# TYPE pipeline_api_request_seconds histogram"]
            for route, counts in sorted(self.latency.items()):
                running = 0
                for bound, count in zip((*BUCKETS, "+Inf"), counts):
                    running += count
                    lines.append(f'pipeline_api_request_seconds_bucket{{route="{route}",le="{bound}"}} {running}')
                lines.append(f'pipeline_api_request_seconds_sum{{route="{route}"}} {self.latency_sum[route]:.6f}')
                lines.append(f'pipeline_api_request_seconds_count{{route="{route}"}} {running}')
            lines += ["# HELP pipeline_api_upload_bytes_total Bytes of files accepted by POST /v1/files.",
                      "# TYPE pipeline_api_upload_bytes_total counter", f"pipeline_api_upload_bytes_total {self.upload_bytes}"]
        lines += ["# HELP pipeline_api_resident_memory_bytes Resident memory of the server process.",
                  "# TYPE pipeline_api_resident_memory_bytes gauge", f"pipeline_api_resident_memory_bytes {_rss_bytes()}",
                  "# HELP pipeline_api_peak_memory_bytes Peak resident memory of the server process.",
                  "# TYPE pipeline_api_peak_memory_bytes gauge",
                  f"pipeline_api_peak_memory_bytes {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}"]
        return "\n".join(lines) + "\n"


def install_metrics(app: FastAPI) -> ServerMetrics:
    """Count every request (a middleware) and serve `/metrics` (no key: it names no tenant)."""
    metrics = ServerMetrics()

    app.add_middleware(_Observe, metrics=metrics)

    @app.get("/metrics", response_class=PlainTextResponse)
    def _metrics() -> str:
        return metrics.render()

    return metrics


class _Observe:
    """A plain ASGI middleware (no request or response wrapping: uploads and file downloads stream
    through untouched) that times each request and notes its status."""

    def __init__(self, app, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), [500]

        async def noting_status(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, noting_status)
        finally:
            # The router writes the matched route into this same scope: its template, not the ids.
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.observe(scope["method"], route, status[0], time.perf_counter() - started)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize()
    except OSError:
        return 0
