"""Progress lines: redrawn in place on a terminal, a line now and then elsewhere, nothing when quiet."""

from __future__ import annotations

import io

import pytest

from pipeline import progress as progress_module
from pipeline.progress import Progress, bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def clock(monkeypatch):
    """A settable monotonic clock for the module under test."""
    now = [100.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: now[0])
    return now


def test_bar():
    assert bar(12, 40) == "[#########.....................] 12/40"
    assert bar(0, 0) == f"[{'#' * 30}] 0/0"
    assert bar(5, 4) == f"[{'#' * 30}] 5/4"  # more done than expected: full, never an overlong bar
    assert bar(1_234, 10_000) == "[###...........................] 1,234/10,000"


def test_a_terminal_gets_one_line_redrawn_and_throttled(clock):
    out = Terminal()
    progress = Progress("reading in.jsonl", stream=out)
    progress.update("1,000 lines")  # within the first interval: short work shows only its end
    clock[0] += 0.25
    progress.update("2,000 lines")
    clock[0] += 0.1
    progress.update("3,000 lines")  # too soon after the last one
    clock[0] += 0.25
    progress.update("4,000 lines")
    progress.finish("4,200 lines")
    assert out.getvalue() == ("\rreading in.jsonl: 2,000 lines\x1b[K\rreading in.jsonl: 4,000 lines\x1b[K"
                              "\rreading in.jsonl: 4,200 lines\x1b[K\n")


def test_a_log_gets_a_line_every_ten_seconds_and_the_last(clock):
    out = io.StringIO()
    progress = Progress("writing out.jsonl", stream=out)
    for _ in range(25):
        clock[0] += 1.0
        progress.update(f"{clock[0] - 100:.0f} s")
    progress.finish("done")
    assert out.getvalue().splitlines() == ["writing out.jsonl: 10 s", "writing out.jsonl: 20 s",
                                           "writing out.jsonl: done"]


def test_quiet_writes_nothing(clock):
    out = Terminal()
    progress = Progress("x", enabled=False, stream=out)
    clock[0] += 60
    progress.update("1")
    progress.finish("2")
    assert out.getvalue() == ""


def test_submit_and_export_report_their_progress(tmp_path):
    import json

    from db.migrate import upgrade
    from db.enums import JobStatus
    from db.repository import fail_requests, set_status
    from db.models import Request
    from db.session import make_engine, session_factory
    from pipeline.export import export_results
    from pipeline.settings import Settings
    from pipeline.submit import submit_file
    from sqlalchemy import select

    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    upgrade(url)
    engine = make_engine(url)
    factory = session_factory(engine)
    path = tmp_path / "in.jsonl"
    lines = [json.dumps({"text": f"line {i}", "max_tokens": 2}) if i % 500 else "not json" for i in range(1, 2501)]
    path.write_text("\n".join(lines) + "\n")
    read: list[tuple[int, int]] = []
    summary = submit_file(Settings(database_url=url), factory, path, send_chunk=lambda *_: None,
                          on_progress=lambda n, bad: read.append((n, bad)))
    assert read == [(1000, 1), (2000, 3)]  # lines 500, 1000, 1500 are bad; counted as they are read
    with factory.begin() as session:  # finish the job without a worker: every line failed
        fail_requests(session, session.scalars(select(Request.id)).all(), code="test", message="not run")
        set_status(session, summary["id"], JobStatus.FINALIZING)
        set_status(session, summary["id"], JobStatus.COMPLETED)
    written: list[tuple[int, int]] = []
    export_results(factory, summary["id"], tmp_path / "out.jsonl", tmp_path / "err.jsonl",
                   on_progress=lambda n, total: written.append((n, total)))
    engine.dispose()
    # Rejected line 1000 is written just before request line 1001, in the same step: 1,001 lines.
    assert written == [(1001, 2500), (2001, 2500)]


def test_a_note_is_a_line_of_its_own_even_when_quiet(clock):
    out = Terminal()
    progress = Progress("batch_1", stream=out)
    clock[0] += 0.25
    progress.update("0/2 lines")
    progress.note("no worker has taken this job")
    clock[0] += 0.25
    progress.update("0/2 lines")
    # The note replaces the redrawn line; the progress is drawn again below it.
    assert out.getvalue() == ("\rbatch_1: 0/2 lines\x1b[K\r\x1b[Kno worker has taken this job\n"
                              "\rbatch_1: 0/2 lines\x1b[K")
    log = io.StringIO()
    Progress("batch_1", enabled=False, stream=log).note("a\x1b]0;x\x07")
    assert log.getvalue() == "a\\x1b]0;x\\x07\n"


def test_watch_shows_the_rate_and_the_time_left_once_measured():
    from pipeline.commands.common import progress_line

    summary = {"request_counts": {"total": 40, "completed": 9, "failed": 1}, "status": "in_progress"}
    assert progress_line(summary) == f"{bar(10, 40)} lines  in_progress"
    assert progress_line(summary, 2.0) == f"{bar(10, 40)} lines  in_progress  2.0 lines/s  ETA 15s"
    assert progress_line(summary, 0.0) == f"{bar(10, 40)} lines  in_progress  0.0 lines/s"


def test_monitor_rate_and_eta_of_running_jobs_before_and_after_their_first_results():
    """A running job with nothing done yet has no rate and no ETA (the monitor drew a traceback
    there); after 30 of 300 lines in 60 s, 0.5 lines/s and 540 s left."""
    from datetime import datetime, timedelta, timezone

    from pipeline.commands.monitor import add_rate_and_eta
    from pipeline.views import jobs_table
    from rich.console import Console

    submitted = datetime(2026, 1, 1, tzinfo=timezone.utc)
    fresh = {"id": "batch_a", "priority": "low", "total": 300, "completed": 0, "failed": 0,
             "created_at": submitted.isoformat()}
    started = {**fresh, "id": "batch_b", "completed": 28, "failed": 2}
    for job in (fresh, started):
        add_rate_and_eta(job, submitted + timedelta(seconds=60))
    assert (fresh["lines_per_s"], fresh["eta_s"]) == (None, None)
    assert (started["lines_per_s"], started["eta_s"]) == (0.5, 540.0)
    console = Console(width=120, record=True)
    console.print(jobs_table([fresh, started]))
    text = console.export_text()
    assert "│ batch_a │ low      │    0 │   300 │     - │     - │" in text
    assert "│ batch_b │ low      │   30 │   300 │ 0.5/s │ 9m00s │" in text
