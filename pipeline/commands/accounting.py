"""Accounting commands: `pipeline usage` (tokens, compute seconds and cost by group), `pipeline
errors JOB` (a job's error history) and `pipeline report JOB` (its HTML report)."""

from __future__ import annotations

import csv
import enum
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.commands.common import JsonOption, fail, guarded, sessions


def register(app: typer.Typer) -> None:
    app.command("usage")(usage)
    app.command("errors")(errors)
    app.command("report")(report)


class UsageGroup(str, enum.Enum):
    job = "job"
    tenant = "tenant"
    day = "day"
    model = "model"


def usage(
    by: Annotated[UsageGroup, typer.Option("--by", help="Group by job, tenant, day (UTC) or model.")] = UsageGroup.job,
    since: Annotated[str, typer.Option("--since", help="Jobs created in this window: '24h', '7d', '90m'.")] = "7d",
    as_json: JsonOption = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="CSV instead of text.")] = False,
) -> None:
    """Prompt, cached and completion tokens, compute seconds (engine time actually used) and cost."""
    from datetime import datetime, timedelta, timezone

    from db.repository.analytics import usage_by
    from pipeline.settings import duration_s, load_settings

    if as_json and as_csv:
        raise fail("--json and --csv each pick an output format; give one of them")

    def action():
        settings = load_settings()
        start = datetime.now(timezone.utc) - timedelta(seconds=duration_s(since))
        with sessions(settings.database_url)() as session:
            return usage_by(session, by.value, since=start)

    rows = [r.as_dict() for r in guarded(action)]
    for row in rows:
        row[by.value] = row.pop("key")
    columns = [by.value, "jobs", "prompt_tokens", "cached_tokens", "completion_tokens", "compute_seconds", "cost"]
    if as_json:
        typer.echo(json.dumps([{c: row[c] for c in columns} for row in rows], indent=2))
        return
    if as_csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return
    from rich.table import Table

    from pipeline.views import console

    table = Table(title=f"Usage by {by.value}, jobs created in the last {since}", title_justify="left")
    for c in columns:
        table.add_column(c.replace("_", " "), justify="left" if c == by.value else "right")
    for row in rows:
        table.add_row(str(row[by.value] if row[by.value] is not None else "(none)"), f"{row['jobs']:,}",
                      f"{row['prompt_tokens']:,}", f"{row['cached_tokens']:,}", f"{row['completion_tokens']:,}",
                      f"{row['compute_seconds']:,.2f}", row["cost"])
    console().print(table)


def errors(
    job_id: Annotated[str, typer.Argument(help="The job id (batch_...).")],
    kind: Annotated[Optional[str], typer.Option(
        "--kind", help="Only errors of this kind: validation, engine, stalled, worker_lost, ...")] = None,
    traceback: Annotated[bool, typer.Option("--traceback", help="Show each error's traceback where kept.")] = False,
    as_json: JsonOption = False,
) -> None:
    """A job's error history, oldest first: when, kind, line, custom id and message."""
    from db.repository import get_job, job_errors
    from pipeline.printable import printable
    from pipeline.settings import load_settings

    def action():
        settings = load_settings()
        with sessions(settings.database_url)() as session:
            if get_job(session, job_id) is None:
                raise ValueError(f"no job {job_id!r}; `pipeline list` shows the jobs")
            return [{"created_at": e.created_at.isoformat(), "kind": e.kind, "line": e.line, "custom_id": e.custom_id,
                     "chunk_id": e.chunk_id, "message": e.message, **({"traceback": e.traceback} if traceback else {})}
                    for e in job_errors(session, job_id, kind=kind)]

    events = guarded(action)
    if as_json:
        typer.echo(json.dumps(events, indent=2))
        return
    for e in events:
        where = f" line {e['line']}" if e["line"] is not None else ""
        who = f" ({printable(e['custom_id'])})" if e["custom_id"] is not None else ""
        typer.echo(f"{e['created_at']}  {e['kind']}{where}{who}: {printable(e['message'])}")
        if traceback and e.get("traceback"):
            typer.echo("    " + e["traceback"].rstrip().replace("\n", "\n    "))
    if not events:
        typer.echo(f"{job_id}: no errors" + (f" of kind {kind!r}" if kind else ""), err=True)


def report(
    job_id: Annotated[str, typer.Argument(help="The job id (batch_...).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="The report: an .html file.")],
) -> None:
    """One self-contained HTML page of plots: throughput, latency and TTFT, hit rate, tokens and cost
    by endpoint, errors by code."""
    from pipeline.output_paths import check_destination
    from pipeline.output_writer import AtomicFile
    from pipeline.prices import Prices
    from pipeline.report import render_report
    from pipeline.report_data import load_report_data
    from pipeline.settings import load_settings

    def action() -> None:
        if output.suffix.lower() not in (".html", ".htm"):
            raise ValueError(f"{output}: a report is an .html file")
        check_destination(output)
        settings = load_settings()
        with sessions(settings.database_url)() as session:
            data = load_report_data(session, job_id)
        page = render_report(data, Prices.from_settings(settings))
        with AtomicFile(output) as file:
            file.write(page)

    guarded(action)
    typer.echo(f"wrote {output}", err=True)
