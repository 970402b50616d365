"""What `pipeline status` adds to a job's batch object: its cost and compute time, prefix-cache hit
rate, rate and ETA, and timing percentiles, all from the database."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from db.repository import get_usage
from db.repository.jobs import get_job
from pipeline.fleet_stats import window_figures

UNFINISHED = ("validating", "in_progress", "finalizing", "cancelling")


def eta_s(remaining: int, lines_per_s: float | None) -> float | None:
    """Seconds until `remaining` lines are done at `lines_per_s`; None when there is no rate yet (None
    or 0: a running job before its first results)."""
    return remaining / lines_per_s if lines_per_s else None


def job_extras(session: Session, job_id: str) -> dict[str, Any]:
    """{"cost": {...}, "stats": {...}} of a job (which exists)."""
    job = get_job(session, job_id)
    usage = get_usage(session, job_id)
    figures = window_figures(session, job_id=job_id)
    stats = figures.as_dict()
    remaining = job.request_total - job.request_completed - job.request_failed
    stats["eta_s"] = eta_s(remaining, figures.lines_per_s) if job.status.value in UNFINISHED else None
    # f"{cost:f}": plain digits, never "0E-8".
    cost = {"amount": "0" if usage is None else f"{usage.cost:f}", "currency": "USD" if usage is None else usage.currency,
            "compute_seconds": 0.0 if usage is None else round(usage.compute_seconds, 6)}
    return {"cost": cost, "stats": stats}


def extras_line(extras: dict[str, Any]) -> str:
    """One line for the text `status`: tokens, hit rate, compute, cost, rate and ETA."""
    s, c = extras["stats"], extras["cost"]
    eta = "" if s["eta_s"] is None else f", ETA {s['eta_s']:.0f} s"
    return (f"usage: {s['prompt_tokens']:,} prompt tokens ({s['prefix_cache_hit_rate']:.1%} hit rate), "
            f"{s['completion_tokens']:,} completion tokens; {c['compute_seconds']:.2f} s compute; cost {c['amount']} "
            f"{c['currency']}; {s['lines_per_s']:.2f} lines/s{eta}")
