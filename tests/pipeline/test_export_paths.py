"""Output paths of `pipeline results` and `pipeline run`: refused with one `error:` line before any
work starts, never replacing anything but a regular file; and in every accepted combination of
-o and --errors each input line ends up in exactly one place."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from pipeline.cli import app

from support.workdir import clean_workdir

# Lines 1-6: 3 run (one of them fails), 2 rejected at submit (lines 2 and 5), line 4 runs.
INPUT_LINES = [
    json.dumps({"custom_id": "a", "text": "one", "max_tokens": 2}),
    "{not json",
    json.dumps({"custom_id": "b", "text": "two", "max_tokens": 2}),
    json.dumps({"custom_id": "c", "text": "three", "max_tokens": 2}),
    json.dumps({"custom_id": "bad", "text": "x", "max_tokens": -1}),
    json.dumps({"custom_id": "d", "text": "four", "max_tokens": 2}),
]
FAILING = {"c"}  # fails when run
NUM_LINES = len(INPUT_LINES)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return clean_workdir(monkeypatch, tmp_path)


@pytest.fixture
def finished_job(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A completed job in a SQLite database that PIPELINE_DATABASE_URL names: results for a, b, d,
    a failure for c, rejections for lines 2 and 5. Returns its id."""
    from db.migrate import upgrade
    from db.models import Request
    from db.repository import chunk_requests, finish_job_if_done, record_results
    from db.results import RequestResult
    from db.session import make_engine, session_factory
    from pipeline.settings import Settings
    from pipeline.submit import submit_file

    url = f"sqlite:///{workdir / 'jobs.sqlite3'}"
    monkeypatch.setenv("PIPELINE_DATABASE_URL", url)
    upgrade(url)
    engine = make_engine(url)
    factory = session_factory(engine)
    source = workdir / "in.jsonl"
    source.write_text("\n".join(INPUT_LINES) + "\n")
    chunk_ids: list[int] = []
    job_id = submit_file(Settings(database_url=url), factory, source,
                         send_chunk=lambda chunk_id, _queue: chunk_ids.append(chunk_id))["id"]
    with factory.begin() as session:
        for chunk_id in chunk_ids:
            results = []
            for request in chunk_requests(session, chunk_id):
                if request.custom_id in FAILING:
                    results.append(RequestResult(request.id, error_code="engine_error", error_message="it broke"))
                else:
                    results.append(RequestResult(request.id, text=f"answer {request.custom_id}", finish_reason="stop",
                                                 prompt_tokens=3, cached_tokens=0, completion_tokens=2))
            record_results(session, chunk_id, results)
        assert finish_job_if_done(session, job_id)
        assert len(session.scalars(select(Request.id)).all()) == 4
    engine.dispose()
    return job_id


def results_ids(path: Path) -> list[str]:
    if path.suffix == ".parquet":
        return pq.read_table(path).column("custom_id").to_pylist()
    return [json.loads(line)["custom_id"] for line in path.read_text().splitlines()]


def error_lines(path: Path) -> list[int]:
    return [json.loads(line)["line"] for line in path.read_text().splitlines()]


def one_error_line(output: str) -> str:
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    assert "Traceback" not in output
    return lines[0]


@pytest.mark.parametrize("results_name", ["out.jsonl", "out.parquet", "OUT.JSONL"])
@pytest.mark.parametrize("errors_name", [None, "err.jsonl", "sub/err.jsonl"])
@pytest.mark.parametrize("existing", [False, True])
def test_every_accepted_combination_loses_nothing(workdir: Path, finished_job: str, results_name: str,
                                                  errors_name: str | None, existing: bool) -> None:
    (workdir / "sub").mkdir()
    out = workdir / results_name
    err = None if errors_name is None else workdir / errors_name
    if existing:  # regular files from an earlier export are replaced
        for path in (out, err):
            if path is not None:
                path.write_text("stale\n")
    args = ["results", finished_job, "-o", str(out)] + ([] if err is None else ["--errors", str(err)])
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert results_ids(out) == ["a", "b", "d"]
    if err is None:
        assert "3 lines failed; pass --errors FILE to see them" in result.output
    else:
        assert error_lines(err) == [2, 4, 5]  # line 4 is c
        assert f"3 errors written to {err}" in result.output
        # Every input line in exactly one of the two files.
        assert len(results_ids(out)) + len(error_lines(err)) == NUM_LINES
    assert sorted(p.name for p in workdir.rglob(".*.tmp")) == []


def special(workdir: Path, kind: str) -> Path:
    """A path of `kind` that exists (or, for 'missing folder', whose folder does not)."""
    if kind == "fifo":
        os.mkfifo(workdir / "pipe.jsonl")
        return workdir / "pipe.jsonl"
    if kind == "symlink":
        (workdir / "target.jsonl").write_text("kept\n")
        (workdir / "link.jsonl").symlink_to(workdir / "target.jsonl")
        return workdir / "link.jsonl"
    if kind == "folder":
        (workdir / "outdir").mkdir()
        return workdir / "outdir"
    if kind == "device":  # made here: run without the check, the export would replace a real one
        if os.geteuid() != 0:
            pytest.skip("making a device node needs root")
        os.mknod(workdir / "null.jsonl", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        return workdir / "null.jsonl"
    assert kind == "missing folder"
    return workdir / "nope" / "out.jsonl"


def state(path: Path) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return stat.S_IFMT(st.st_mode), st.st_ino


REFUSALS = [  # (-o, --errors, what the error says); "IN" is the input file, "@kind" a special path
    ("IN", None, "is the input file"),
    ("out.jsonl", "IN", "is the input file"),
    ("out.jsonl", "out.jsonl", "is also the results file"),
    ("out.jsonl", "./out.jsonl", "is also the results file"),
    ("out.csv", None, "extension '.csv'; name the results file .jsonl or .parquet"),
    ("out.jsonl", "err.parquet", "the error file is JSONL"),
    ("@fifo", None, "is a named pipe"),
    ("out.jsonl", "@fifo", "is a named pipe"),
    ("@symlink", None, "is a symbolic link"),
    ("@folder", None, "is a directory"),
    ("@device", None, "is a device"),
    ("out.jsonl", "@device", "is a device"),
    ("@missing folder", None, "does not exist"),
]


def resolve(workdir: Path, name: str | None, source: Path) -> Path | None:
    if name is None:
        return None
    if name == "IN":
        return source
    if name.startswith("@"):
        return special(workdir, name[1:])
    return Path(name)


@pytest.mark.parametrize(("results_name", "errors_name", "message"), REFUSALS)
def test_results_refuses_bad_paths_and_touches_nothing(workdir: Path, finished_job: str, results_name: str,
                                                       errors_name: str | None, message: str) -> None:
    source = workdir / "in.jsonl"
    out, err = resolve(workdir, results_name, source), resolve(workdir, errors_name, source)
    before = {path: state(path) for path in (out, err) if path is not None}
    args = ["results", finished_job, "-o", str(out)] + ([] if err is None else ["--errors", str(err)])
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert message in one_error_line(result.output)
    assert {path: state(path) for path in before} == before
    assert source.read_text() == "\n".join(INPUT_LINES) + "\n"
    assert not (workdir / "out.jsonl").exists()
    if (workdir / "target.jsonl").exists():
        assert (workdir / "target.jsonl").read_text() == "kept\n"


@pytest.mark.parametrize(("results_name", "errors_name", "message"), REFUSALS)
def test_run_refuses_bad_paths_before_any_work(workdir: Path, results_name: str, errors_name: str | None,
                                               message: str) -> None:
    source = workdir / "in.jsonl"
    source.write_text("\n".join(INPUT_LINES) + "\n")
    out, err = resolve(workdir, results_name, source), resolve(workdir, errors_name, source)
    before = {path: state(path) for path in (out, err) if path is not None}
    args = ["run", str(source), "-o", str(out)] + ([] if err is None else ["--errors", str(err)])
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert message in one_error_line(result.output)
    assert not (workdir / "pipeline.sqlite3").exists()  # refused before the database was even created
    assert {path: state(path) for path in before} == before
    assert source.read_text() == "\n".join(INPUT_LINES) + "\n"
    assert not (workdir / "out.jsonl").exists()
