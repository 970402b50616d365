"""The server's own endpoints: `/healthz` and `/metrics` (Prometheus text), neither needing a key;
metrics name routes by their templates, never by the ids (or tenants) in the path."""

from __future__ import annotations

import urllib.request

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
