"""`pipeline bench submit`: how fast `submit_file` ingests a JSONL file into the database, and
whether its memory stays flat as the file grows.

Ingest only: `send_chunk` counts the chunks instead of sending them, so no broker is needed. The
file is submitted twice, at a tenth of its lines and in full, each run with the process's peak RSS
reset first: flat memory means the peak grows by a few bytes per extra line, not by the line's size.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import create_engine, func, make_url, select, text

ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"  # the local server, as the tests use


@dataclass(frozen=True, slots=True)
class SubmitRun:
    num_lines: int
    num_stored: int  # request rows in the database afterwards
    num_chunks: int  # chunks handed to send_chunk
    seconds: float
    peak_rss_growth_bytes: int | None  # None where /proc cannot say

    @property
    def lines_per_s(self) -> float:
        return self.num_lines / self.seconds


@dataclass(frozen=True, slots=True)
class SubmitBenchResult:
    database: str  # the URL, password masked
    runs: list[SubmitRun]
    load_average: tuple[float, float]  # 1-minute load at start and end: other work skews the timings


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def write_lines(path: Path, num_lines: int) -> None:
    """`num_lines` simple lines with short, distinct prompts."""
    with path.open("w") as f:
        for i in range(num_lines):
            f.write(json.dumps({"custom_id": f"r{i}", "text": f"Summarise item {i} in one line.", "max_tokens": 16}))
            f.write("\n")


@contextmanager
def fresh_postgres(admin_url: str = ADMIN_URL) -> Iterator[str]:
    """A new, empty PostgreSQL database on the server of `admin_url`; dropped on exit."""
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"pipeline_bench_{os.getpid()}_{secrets.token_hex(4)}"
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as connection:
                connection.execute(
                    text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE datname = :name AND pid <> pg_backend_pid()"),
                    {"name": name},
                )
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    finally:
        admin.dispose()


def _proc_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def time_submit(database_url: str, path: Path, num_lines: int) -> SubmitRun:
    """Submits `path` once into `database_url` (already migrated) and measures it."""
    from db.models import Request
    from db.session import make_engine, session_factory
    from pipeline.settings import Settings
    from pipeline.submit import submit_file

    engine = make_engine(database_url)
    factory = session_factory(engine)
    chunks: list[int] = []
    try:
        baseline = _proc_status_kib("VmRSS") if _reset_peak_rss() else None
        started = time.perf_counter()
        summary = submit_file(Settings(database_url=database_url), factory, path,
                              send_chunk=lambda chunk_id, _queue: chunks.append(chunk_id))
        seconds = time.perf_counter() - started
        peak = _proc_status_kib("VmHWM")
        growth = None if baseline is None or peak is None else (peak - baseline) * 1024
        with factory() as session:
            stored = session.scalar(select(func.count()).select_from(Request).where(Request.job_id == summary["id"]))
    finally:
        engine.dispose()
    return SubmitRun(num_lines, int(stored or 0), len(chunks), seconds, growth)


def run_submit_bench(num_lines: int, database_url: str | None = None) -> SubmitBenchResult:
    """Submits N/10 lines, then N lines, into `database_url` (None: a fresh local PostgreSQL
    database, migrated here and dropped afterwards)."""
    if num_lines < 10:
        raise ValueError(f"--lines {num_lines}: use at least 10 (the first run submits a tenth)")
    from db.migrate import upgrade
    from pipeline.settings import mask_url

    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-submit-") as tmp, database(database_url) as url:
        upgrade(url)
        runs = []
        for n in (num_lines // 10, num_lines):
            path = Path(tmp) / f"lines-{n}.jsonl"
            write_lines(path, n)
            log(f"submitting {n} lines")
            runs.append(time_submit(url, path, n))
            path.unlink()
        shown = mask_url(url)
    return SubmitBenchResult(shown, runs, (load_start, os.getloadavg()[0]))


@contextmanager
def database(database_url: str | None) -> Iterator[str]:
    """`database_url` as it is, or (None) a fresh local PostgreSQL database dropped on exit."""
    if database_url is not None:
        yield database_url
        return
    with fresh_postgres() as url:
        yield url


def format_submit_report(result: SubmitBenchResult) -> str:
    rows = [f"submit benchmark: {result.database}",
            (f"load average (1 min) {result.load_average[0]:.2f} at start, {result.load_average[1]:.2f} at end, "
             f"{os.cpu_count()} CPUs"),
            f"{'lines':>8} {'stored':>8} {'chunks':>7} {'seconds':>8} {'lines/s':>9} {'peak RSS growth':>16}"]
    for run in result.runs:
        growth = "n/a" if run.peak_rss_growth_bytes is None else f"{run.peak_rss_growth_bytes / 2**20:.1f} MiB"
        rows.append(f"{run.num_lines:>8} {run.num_stored:>8} {run.num_chunks:>7} {run.seconds:>8.2f} "
                    f"{run.lines_per_s:>9.0f} {growth:>16}")
    small, full = result.runs[0], result.runs[-1]
    if small.peak_rss_growth_bytes is not None and full.peak_rss_growth_bytes is not None:
        # Per extra line, not a ratio: the small run's growth is often under a page and a ratio
        # over it says nothing. Flat memory reads as a few bytes per line, not the line's size.
        per_line = ((full.peak_rss_growth_bytes - small.peak_rss_growth_bytes)
                    / (full.num_lines - small.num_lines))
        rows.append(f"memory: peak growth {per_line:.0f} bytes per extra line "
                    f"from {small.num_lines} to {full.num_lines} lines")
    return "\n".join(rows)
