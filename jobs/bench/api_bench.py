"""`pipeline bench api`: the Batch API server under load. While a large file is uploaded and its
batch runs, `clients` threads poll `GET /v1/batches/{id}` as fast as the server answers them.

Reported: the API's P50/P99 latency (the polls, over the whole upload and run), the upload's
lines/s (the multipart body streamed to disk and read through with the reader) and the server's
peak RSS (VmHWM) after a tenth of the lines and after all of them: flat memory means the big file
leaves the peak where the small one left it. The server runs as its own process (`pipeline
serve`, started here), with real workers, Redis and PostgreSQL; a measurement, never a test.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from jobs.bench.load_bench import peak_rss_bytes, write_load_file
from jobs.bench.pipeline_bench import log
from jobs.worker_process import REPO_ROOT, delete_prefixed_keys, start_worker, stop_process

JOB_TIMEOUT_S = 3 * 3600
BOUNDARY = "bench-boundary-7f3a"


@dataclass(slots=True)
class ApiRun:
    num_lines: int
    upload_seconds: float
    run_seconds: float
    latencies_s: list[float] = field(default_factory=list)
    errors: int = 0  # polls answered other than 200
    server_peak_rss_bytes: int = 0
    status: str = ""

    @property
    def upload_lines_per_s(self) -> float:
        return self.num_lines / self.upload_seconds

    def latency_percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


@dataclass(frozen=True, slots=True)
class ApiBenchResult:
    clients: int
    num_workers: int
    runs: list[ApiRun]


class _Pollers:
    """`clients` threads, each on its own keep-alive connection, polling the current batch id."""

    def __init__(self, port: int, key: str, clients: int) -> None:
        self.port, self.key, self.clients = port, key, clients
        self.batch_id: str | None = None
        self.run: ApiRun | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._poll, daemon=True) for _ in range(clients)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _poll(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        headers = {"Authorization": f"Bearer {self.key}"}
        while not self._stop.is_set():
            batch_id, run = self.batch_id, self.run
            if batch_id is None or run is None:
                time.sleep(0.01)
                continue
            started = time.perf_counter()
            try:
                connection.request("GET", f"/v1/batches/{batch_id}", headers=headers)
                response = connection.getresponse()
                response.read()
                ok = response.status == 200
            except (OSError, http.client.HTTPException):
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
                ok = False
            with self._lock:
                if ok:
                    run.latencies_s.append(time.perf_counter() - started)
                else:
                    run.errors += 1
        connection.close()


def run_api_bench(num_lines: int = 100_000, clients: int = 50, num_workers: int = 1, max_tokens: int = 1,
                  broker_url: str | None = None, database_url: str | None = None) -> ApiBenchResult:
    """A tenth of `num_lines` (at least 1,000), then `num_lines`, each uploaded and run while
    `clients` threads poll; `database_url` None: a fresh local PostgreSQL database, dropped after."""
    import redis

    from db.migrate import upgrade
    from db.repository import create_api_key, ensure_tenant
    from db.session import make_engine, session_factory
    from pipeline.bench_submit import database
    from pipeline.settings import Settings

    if clients < 1 or num_workers < 1 or num_lines < 1:
        raise ValueError("--lines, --clients and --workers must be at least 1")
    sizes = (max(1_000, num_lines // 10), num_lines)
    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp_name, database(database_url) as url:
        tmp = Path(tmp_name)
        settings = Settings(model="tiny", database_url=url, broker_url=broker_url or Settings().broker_url,
                            redis_key_prefix=f"pipeline-bench-{uuid.uuid4().hex[:12]}:", chunk_size=256,
                            cpu_threads=max(1, (os.cpu_count() or 1) // (num_workers + 1)))
        upgrade(url)
        client = redis.Redis.from_url(settings.broker_url)
        client.ping()
        db_engine = make_engine(url)
        with session_factory(db_engine).begin() as session:
            tenant = ensure_tenant(session, "bench")
            _, key = create_api_key(session, tenant.id, name="bench")
        db_engine.dispose()
        port = _free_port()
        server_log = (tmp / "server.log").open("w")
        server = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "serve", "--port", str(port), "--log-level", "warning"], cwd=tmp,
            env=_server_env(settings, tmp), stdout=server_log, stderr=subprocess.STDOUT)
        worker_logs = [(tmp / f"worker-{n}.log").open("w") for n in range(num_workers)]
        workers = [start_worker(settings, tmp, handle, concurrency=2) for handle in worker_logs]
        pollers = _Pollers(port, key, clients)
        runs: list[ApiRun] = []
        try:
            _wait_healthy(port, server)
            pollers.start()
            for n in sizes:
                path = tmp / f"api-{n}.jsonl"
                write_load_file(path, n, max_tokens, id_prefix=f"r{n}-")
                runs.append(_one_run(port, key, path, n, pollers, server))
        finally:
            pollers.stop()
            for process in (*workers, server):
                stop_process(process)
            for handle in (*worker_logs, server_log):
                handle.close()
            delete_prefixed_keys(client, settings.redis_key_prefix)
            client.close()
    return ApiBenchResult(clients, num_workers, runs)


def _one_run(port: int, key: str, path: Path, num_lines: int, pollers: _Pollers, server: subprocess.Popen) -> ApiRun:
    run = ApiRun(num_lines, 0.0, 0.0)
    if pollers.batch_id is not None:
        pollers.run = run  # polls of the earlier batch count towards this run's latencies during the upload
    log(f"api: uploading {num_lines} lines while {pollers.clients} clients poll")
    started = time.perf_counter()
    file_id = _upload(port, key, path)["id"]
    run.upload_seconds = time.perf_counter() - started
    started = time.perf_counter()
    batch = _request(port, key, "POST", "/v1/batches", json.dumps(
        {"input_file_id": file_id, "endpoint": "/v1/completions", "completion_window": "24h"}).encode())
    pollers.batch_id, pollers.run = batch["id"], run
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        status = _request(port, key, "GET", f"/v1/batches/{batch['id']}")["status"]
        if status in ("completed", "failed", "expired", "cancelled"):
            break
        time.sleep(0.5)
    run.run_seconds = time.perf_counter() - started
    run.status = status
    run.server_peak_rss_bytes = peak_rss_bytes(server.pid)
    return run


def _upload(port: int, key: str, path: Path) -> dict:
    """POST /v1/files with the file streamed from disk in pieces (the client holds none of it whole)."""
    head = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
            f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{path.name}\"\r\n"
            "Content-Type: application/jsonl\r\n\r\n").encode()
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    connection.putrequest("POST", "/v1/files")
    connection.putheader("Authorization", f"Bearer {key}")
    connection.putheader("Content-Type", f"multipart/form-data; boundary={BOUNDARY}")
    connection.putheader("Content-Length", str(len(head) + path.stat().st_size + len(tail)))
    connection.endheaders()
    connection.send(head)
    with path.open("rb") as f:
        while piece := f.read(256 * 1024):
            connection.send(piece)
    connection.send(tail)
    return _answer(connection)


def _request(port: int, key: str, method: str, url: str, body: bytes | None = None) -> dict:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    connection.request(method, url, body=body, headers=headers)
    return _answer(connection)


def _answer(connection: http.client.HTTPConnection) -> dict:
    response = connection.getresponse()
    body = json.loads(response.read() or b"{}")
    connection.close()
    if response.status != 200:
        raise RuntimeError(f"the server answered {response.status}: {body}")
    return body


def _server_env(settings, tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    env.update(PYTHONPATH=str(REPO_ROOT), PIPELINE_DATABASE_URL=settings.database_url,
               PIPELINE_BROKER_URL=settings.broker_url, PIPELINE_REDIS_KEY_PREFIX=settings.redis_key_prefix,
               PIPELINE_CHUNK_SIZE=str(settings.chunk_size), PIPELINE_FILES_DIR=str(tmp / "files"),
               PIPELINE_MAX_UPLOAD_BYTES="10GiB")
    return env


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_healthy(port: int, server: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode} (see its log)")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/healthz")
            if connection.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"the server did not answer /healthz in {timeout_s} s")


def format_api_report(result: ApiBenchResult) -> str:
    rows = [f"API benchmark: {result.clients} clients polling GET /v1/batches/{{id}}, {result.num_workers} worker(s), "
            f"tiny model, PostgreSQL + Redis, {os.cpu_count()} CPUs",
            f"{'lines':>8} {'upload s':>9} {'upload lines/s':>15} {'run s':>7} {'polls':>7} {'P50 ms':>7} "
            f"{'P99 ms':>7} {'errors':>6} {'server peak RSS':>16}  status"]
    for run in result.runs:
        rows.append(f"{run.num_lines:>8} {run.upload_seconds:>9.2f} {run.upload_lines_per_s:>15,.0f} "
                    f"{run.run_seconds:>7.1f} {len(run.latencies_s):>7} {run.latency_percentile(0.5) * 1000:>7.1f} "
                    f"{run.latency_percentile(0.99) * 1000:>7.1f} {run.errors:>6} "
                    f"{run.server_peak_rss_bytes / 2**20:>12.0f} MiB  {run.status}")
    small, full = result.runs[0], result.runs[-1]
    rows.append(f"server peak RSS {full.server_peak_rss_bytes / small.server_peak_rss_bytes:.2f}x from "
                f"{small.num_lines:,} to {full.num_lines:,} lines (flat: about 1x)")
    if full.latencies_s:
        rows.append(f"mean poll latency over the full run {statistics.fmean(full.latencies_s) * 1000:.1f} ms")
    return "\n".join(rows)
