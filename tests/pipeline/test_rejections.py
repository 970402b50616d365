"""The rejected lines `submit` and `run` show: runs of alike ones collapse into one line, counted
in the database (SQLite and PostgreSQL), so a file of a million bad lines reads back 20 rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from db import make_engine, session_factory
from db.migrate import upgrade
from pipeline.commands.rejections import MAX_SHOWN, RejectedRun, find_rejections, print_rejections
from pipeline.settings import Settings
from pipeline.submit import submit_file


@pytest.fixture(params=["sqlite", "postgresql"])
def factory(request: pytest.FixtureRequest, tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'x.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    upgrade(url)
    engine = make_engine(url)
    yield session_factory(engine)
    engine.dispose()


def rejections_of(factory, tmp_path: Path, lines: list[dict | str]):
    path = tmp_path / "in.jsonl"
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    summary = submit_file(Settings(), factory, path, send_chunk=lambda chunk_id, queue: None)
    return find_rejections(factory, summary)


def test_alike_rejections_in_a_row_are_one_run(factory, tmp_path: Path) -> None:
    zero = {"text": "a", "max_tokens": 0}
    lines = [zero, zero, "", zero, {"text": "ok"}, zero, {"text": "a", "top_p": 2}, zero, zero]
    rejections = rejections_of(factory, tmp_path, lines)
    zero_detail = "max_tokens: must be between 1 and 32768, got 0"
    assert rejections.first == (
        # a blank line is no line of the job, and a good one is no rejection: neither ends a run
        RejectedRun(1, 6, 4, "out_of_range", zero_detail),
        RejectedRun(7, 7, 1, "out_of_range", "top_p: must be in (0, 1], got 2"),
        RejectedRun(8, 9, 2, "out_of_range", zero_detail),
    )
    assert rejections.num_rejected == 7


def test_at_most_max_shown_runs_are_read_and_the_rest_are_counted(factory, tmp_path: Path, capsys) -> None:
    lines = []
    for i in range(MAX_SHOWN + 5):
        lines += [{"text": "a", "max_tokens": 0, "custom_id": f"{i}a"}, {"text": "a", "top_p": 2, "custom_id": f"{i}b"}]
    rejections = rejections_of(factory, tmp_path, lines)
    assert len(rejections.first) == MAX_SHOWN
    assert [run.first_line for run in rejections.first] == list(range(1, MAX_SHOWN + 1))
    print_rejections(rejections, Path("in.jsonl"), "see err.jsonl")
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"{len(lines)} of {len(lines)} lines rejected ({len(lines) - MAX_SHOWN} not shown); see err.jsonl")
