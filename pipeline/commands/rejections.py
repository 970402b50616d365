"""What `submit` and `run` tell the user about the lines their file had rejected, on stderr, and
when those rejections mean that nothing runs (an exit code of 1).

Rejected lines live in error_history (kind "validation", see `pipeline.submit`), so they are read
back from there rather than from the reader: the report is the same for a new job and for one
returned by an idempotency key. Each shown line reads like a compiler's,
`FILE:LINE: FIELD: what is wrong and what to do [code]`; then one line says how many were rejected.
A run of lines rejected with the same message (a binary or UTF-16 file rejects every line alike) is
one line, `FILE:FIRST-LAST: ... [code] (N lines)`. What came from the file is shown `printable`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session, sessionmaker

from db.records import ErrorEvent
from pipeline.errors import PipelineError
from pipeline.printable import printable
from pipeline.submit import VALIDATION_KIND, split_validation_message

# Enough to see the pattern of a bad file; a million bad lines must not flood the terminal.
MAX_SHOWN = 20  # shown lines, each one rejected line or one run of alike ones


class NothingToRun(PipelineError):
    """Every line of the file was rejected, or one was and `--strict` was given: the job runs nothing."""


@dataclass(frozen=True, slots=True)
class RejectedRun:
    """`count` rejected lines from `first_line` to `last_line`, all with the same `code` and
    `detail` ("field: message"), and no line rejected otherwise between them (good lines may be)."""

    first_line: int
    last_line: int
    count: int
    code: str
    detail: str


@dataclass(frozen=True, slots=True)
class Rejections:
    """The lines of job `job_id` rejected at submit: how many, of how many non-blank lines (None
    when not known: a strict job stops counting its lines), and the first `MAX_SHOWN` runs of them."""

    job_id: str
    num_rejected: int
    num_lines: int | None
    first: tuple[RejectedRun, ...]
    strict_failed: bool

    def nothing_runs(self, file: Path) -> NothingToRun | None:
        """The error to exit with when no line of `file` will run; None when the good lines run."""
        if self.strict_failed:
            return NothingToRun(f"{file}: {lines(self.num_rejected)} rejected and --strict is set, so nothing ran "
                                f"(job {self.job_id}); fix those lines, or drop --strict to run the good ones")
        if self.num_lines is not None and self.num_rejected == self.num_lines:
            return NothingToRun(f"{file}: every line was rejected ({lines(self.num_lines)}), so nothing ran "
                                f"(job {self.job_id}); fix them and submit the file again")
        return None


def find_rejections(factory: sessionmaker[Session], summary: dict[str, Any]) -> Rejections:
    """The rejected lines of the job `summary` describes (a `job_summary` taken right after submit)."""
    job_id = summary["id"]
    rejected = (ErrorEvent.job_id == job_id, ErrorEvent.kind == VALIDATION_KIND)
    with factory() as session:
        num_rejected = session.scalar(select(func.count()).select_from(ErrorEvent).where(*rejected)) or 0
        first = tuple(RejectedRun(first_line, last_line, count, *split_validation_message(message))
                      for first_line, last_line, count, message in session.execute(_runs(rejected)))
    strict_failed = summary["status"] == "failed" and num_rejected > 0  # only --strict fails a job at submit
    # A strict job with a bad line keeps a total of 0 (it stores no request), so its size is unknown.
    num_lines = None if strict_failed else summary["request_counts"]["total"]
    return Rejections(job_id, num_rejected, num_lines, first, strict_failed)


def _runs(rejected: tuple[Any, ...]) -> Select[Any]:
    """The first MAX_SHOWN runs of alike rejections as (first line, last line, count, message).

    Gaps and islands, in the database so a million bad lines are not read back: along the lines
    in order, a row's number among all rejections minus its number among those with its message
    stays the same while the message repeats, and changes where another message comes between."""
    order = (ErrorEvent.line, ErrorEvent.id)
    numbered = select(
        func.coalesce(ErrorEvent.line, 0).label("line"), ErrorEvent.id, ErrorEvent.message,
        (func.row_number().over(order_by=order)
         - func.row_number().over(partition_by=ErrorEvent.message, order_by=order)).label("run"),
    ).where(*rejected).subquery()
    return (select(func.min(numbered.c.line), func.max(numbered.c.line), func.count(), numbered.c.message)
            .group_by(numbered.c.message, numbered.c.run)
            .order_by(func.min(numbered.c.line), func.min(numbered.c.id))
            .limit(MAX_SHOWN))


def print_rejections(rejections: Rejections, file: Path, full_list: str) -> None:
    """On stderr: the first rejected lines, naming `file` as the user typed it, then their count and
    `full_list` (where to find them all). Nothing when no line was rejected."""
    if not rejections.num_rejected:
        return
    for run in rejections.first:
        if run.count == 1:
            shown = f"{file}:{run.first_line}: {run.detail} [{run.code}]"
        else:
            shown = f"{file}:{run.first_line}-{run.last_line}: {run.detail} [{run.code}] ({run.count} lines)"
        typer.echo(printable(shown), err=True)
    hidden = rejections.num_rejected - sum(run.count for run in rejections.first)
    more = f" ({hidden} not shown)" if hidden else ""
    rejected = (lines(rejections.num_rejected) if rejections.num_lines is None
                else f"{rejections.num_rejected} of {lines(rejections.num_lines)}")
    typer.echo(f"{rejected} rejected{more}; {printable(full_list)}", err=True)


def lines(count: int) -> str:
    """'1 line', '3 lines'."""
    return f"{count} line" if count == 1 else f"{count} lines"
