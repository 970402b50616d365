"""The server's own endpoints: `/healthz` and `/metrics` (Prometheus text), neither needing a key;
metrics name routes by their templates, never by the ids (or tenants) in the path."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from support.http import call


def test_health_and_metrics(server) -> None:
    assert call(f"{server.url}/healthz").body == {"status": "ok"}
    key = server.tenant("acme")
    for _ in range(2):
        assert call(f"{server.url}/v1/files", key=key).status == 200
    assert call(f"{server.url}/v1/files/file-{'0' * 32}", key=key).status == 404
    assert call(f"{server.url}/v1/files").status == 401
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=30) as response:
        assert response.headers["content-type"].startswith("text/plain")
        text = response.read().decode()
    assert 'pipeline_api_requests_total{method="GET",route="/v1/files",status="200"} 2' in text
    assert 'pipeline_api_requests_total{method="GET",route="/v1/files",status="401"} 1' in text
    assert 'pipeline_api_requests_total{method="GET",route="/v1/files/{file_id}",status="404"} 1' in text
    assert 'pipeline_api_request_seconds_count{route="/v1/files"} 3' in text
    assert "file-0000" not in text and key not in text
    peak = next(line for line in text.splitlines() if line.startswith("pipeline_api_peak_memory_bytes "))
    assert int(peak.split()[1]) > 10 * 2**20


def test_the_compose_health_check_passes_against_a_real_server(server) -> None:
    """docker-compose.yml's check of the `serve` service, run as the container runs it, against this
    server (the port swapped for its own): it passes here, and fails where nothing answers."""
    yaml = pytest.importorskip("yaml", reason="PyYAML parses docker-compose.yml (it comes with transformers)")
    compose = yaml.safe_load((Path(__file__).resolve().parents[2] / "docker-compose.yml").read_text())
    serve = compose["services"]["serve"]
    port = serve["command"][serve["command"].index("--port") + 1]
    code = serve["healthcheck"]["test"][3]
    ours = code.replace(f"http://127.0.0.1:{port}", server.url)
    assert ours != code
    assert subprocess.run([sys.executable, "-c", ours], capture_output=True, timeout=60).returncode == 0
    nothing = code.replace(f"http://127.0.0.1:{port}", "http://127.0.0.1:9")  # the discard port: refused
    assert subprocess.run([sys.executable, "-c", nothing], capture_output=True, timeout=60).returncode != 0
