"""`pipeline bench submit` and `pipeline bench pipeline` at a tiny scale, through the CLI, on real
services (the local PostgreSQL and Redis): the rows are printed and every line and request is
accounted for. No timings are asserted."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from pipeline.cli import app


def _row(output: str, name: str) -> list[str]:
    """The table row starting with `name` and a count (progress lines go to the same output)."""
    rows = [line.split() for line in output.splitlines() if re.match(rf"{re.escape(name)} +\d", line.lstrip())]
    assert len(rows) == 1, output
    return rows[0]


def test_bench_submit_stores_every_line(pg_admin) -> None:
    result = CliRunner().invoke(app, ["bench", "submit", "--lines", "2000"])
    assert result.exit_code == 0, result.output
    assert "load average (1 min)" in result.output
    # lines, stored, chunks (of 64): a tenth first, then the whole file
    assert _row(result.output, "200")[:3] == ["200", "200", "4"]
    assert _row(result.output, "2000")[:3] == ["2000", "2000", "32"]
    assert re.search(r"peak growth -?[0-9]+ bytes per extra line from 200 to 2000 lines", result.output)


@pytest.mark.workers  # the bench starts its own worker processes
def test_bench_pipeline_completes_every_request(pg_admin) -> None:
    result = CliRunner().invoke(app, ["bench", "pipeline", "--scale", "small", "--requests", "16"])
    assert result.exit_code == 0, result.output
    engine, pipeline = _row(result.output, "engine"), _row(result.output, "pipeline")
    assert engine[1] == "16" and pipeline[1] == "16"  # completed
    assert engine[2] == str(16 * 8)  # EOS ignored: every requested token
    assert 0 < int(pipeline[2]) <= 16 * 8
    assert re.search(r"pipeline / engine tokens/s: [0-9.]+$", result.output.strip())
    assert "load average (1 min)" in result.output


@pytest.mark.workers  # the bench starts its own worker processes
def test_bench_load_accounts_for_every_line_once(pg_admin) -> None:
    result = CliRunner().invoke(app, ["bench", "load", "--lines", "80", "--workers", "2", "--concurrency", "1",
                                      "--chunk-size", "8", "--max-tokens", "2"])
    assert result.exit_code == 0, result.output
    # lines, completed, failed; then seconds, lines/s and "each once": the warm-up job of two chunks
    # per task slot (32 lines), then the full job.
    warmup, full = _row(result.output, "32"), _row(result.output, "80")
    assert warmup[:3] == ["32", "32", "0"] and warmup[5] == "yes"
    assert full[:3] == ["80", "80", "0"] and full[5] == "yes"
    assert re.search(r"worker peak RSS after 80 lines is at most [0-9.]+x that after 32", result.output)


def test_bench_load_refuses_a_job_too_small_to_warm_every_worker() -> None:
    result = CliRunner().invoke(app, ["bench", "load", "--lines", "100", "--workers", "2", "--chunk-size", "64"])
    assert result.exit_code == 1
    assert "--lines 100: use at least 512" in result.output
