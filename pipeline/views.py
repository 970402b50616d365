"""Terminal views (rich) of the figures `pipeline stats` and `pipeline monitor` gather: one
renderable per section, so the one-shot command and the live dashboard show the same thing."""

from __future__ import annotations

from typing import Any

import sys

from rich.console import Console, Group, RenderableType
from rich.table import Table

PIPE_WIDTH = 200  # columns when stdout is a file or pipe: rich would otherwise wrap at 80


def console() -> Console:
    """A console for stdout: the terminal's width, or a wide fixed one for files and pipes."""
    return Console() if sys.stdout.isatty() else Console(width=PIPE_WIDTH)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:,.0f} ms" if value < 10 else f"{value:,.1f} s"


def throughput_table(data: dict[str, Any]) -> Table:
    table = Table(title=f"Last {data['window_s']:,} s", show_header=False, title_justify="left")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("lines completed / failed", f"{data['completed']:,} / {data['failed']:,}")
    table.add_row("lines/s", f"{data['lines_per_s']:,.2f}")
    table.add_row("tokens/s (generated)", f"{data['tokens_per_s']:,.1f}")
    table.add_row("prefix-cache hit rate (tokens)", f"{data['prefix_cache_hit_rate']:.1%}")
    return table


def timings_table(data: dict[str, Any]) -> Table:
    table = Table(title="Timings", title_justify="left")
    for name in ("", "P50", "P95", "P99"):
        table.add_column(name, justify="right" if name else "left")
    for label, key in (("latency", "latency_s"), ("time to first token", "ttft_s"), ("queue wait", "queue_wait_s")):
        p = data.get(key)
        table.add_row(label, *(_ms(None if p is None else p[q]) for q in ("p50", "p95", "p99")))
    return table


def queues_table(queues: dict[str, int]) -> Table:
    table = Table(title="Queues", title_justify="left")
    table.add_column("queue")
    table.add_column("waiting", justify="right")
    for name, depth in queues.items():
        table.add_row(name, f"{depth:,}")
    return table


def jobs_table(jobs: list[dict[str, Any]]) -> Table:
    """Running jobs; `rate` (lines/s) and `eta_s` columns where the caller knows them (monitor)."""
    table = Table(title="Running jobs", title_justify="left")
    for name in ("job", "priority", "done", "total", "rate", "ETA"):
        table.add_column(name, justify="left" if name in ("job", "priority") else "right")
    for job in jobs:
        done = job["completed"] + job["failed"]
        rate = job.get("lines_per_s")
        eta = job.get("eta_s")
        table.add_row(job["id"], job["priority"], f"{done:,}", f"{job['total']:,}",
                      "-" if rate is None else f"{rate:,.1f}/s", "-" if eta is None else _duration(eta))
    if not jobs:
        table.add_row("(none)", "", "", "", "", "")
    return table


def workers_table(workers: list[dict[str, Any]]) -> Table:
    table = Table(title="Workers", title_justify="left")
    for name in ("worker", "healthy", "chunks", "KV used", "KV free", "KV cached", "evictions", "hit rate"):
        table.add_column(name, justify="left" if name in ("worker", "healthy") else "right")
    for w in workers:
        e = w.get("engine") or {}
        table.add_row(w["name"], "yes" if w["healthy"] else f"no: {w.get('reason')}", str(w["active_chunks"]),
                      *(f"{e[k]:,}" if k in e else "-" for k in
                        ("kv_blocks_used", "kv_blocks_free", "kv_blocks_cached", "kv_evictions")),
                      f"{e['prefix_cache_hit_rate']:.1%}" if "prefix_cache_hit_rate" in e else "-")
    if not workers:
        table.add_row("(no worker answered)", "", "", "", "", "", "", "")
    return table


def stats_view(data: dict[str, Any]) -> RenderableType:
    return Group(throughput_table(data), timings_table(data), queues_table(data["queues"]),
                 jobs_table(data["running_jobs"]), workers_table(data["workers"]))


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
