"""Serving a Prometheus registry on the first free port of a range (`metrics_port`), so several
processes on one host (workers, beat) need no port each in their settings."""

from __future__ import annotations

import errno

from prometheus_client import CollectorRegistry, start_http_server


def serve_registry(registry: CollectorRegistry, ports: range) -> int:
    """Serve `registry` at /metrics on the first free port of `ports` (a daemon thread); returns the
    port. Raises OSError when every one is taken."""
    for port in ports:
        try:
            start_http_server(port, registry=registry)
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
            continue
        return port
    raise OSError(errno.EADDRINUSE, f"every metrics port in {ports.start}-{ports.stop - 1} is taken; "
                                    "widen PIPELINE_METRICS_PORT or set it to 'off'")
