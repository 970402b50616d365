"""Bad files through the real CLI, `pipeline run` and `pipeline submit`, one child process each.

A file that cannot be read as a whole must give exactly one line on stderr, `error: FILE: what is
wrong; what to do`, exit code 1, no job row, no output or temporary file, and (for submit) no
contact with the broker: the broker URL points at a port where nothing listens, so any attempt to
send would end in "cannot reach the broker" instead. A file whose every line is rejected (Latin-1
text, binary data) keeps its job, which holds the errors, but also exits 1 and writes no file."""

from __future__ import annotations

import json
import re
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from bad_input_cli import CliResult, database_url, files_in, jobs_in, run_pipeline

from db.migrate import upgrade
from jobs.worker_process import delete_prefixed_keys
from pipeline.input_reader import BOM
from pipeline.limits import DEFAULT_LIMITS

DB = "x.sqlite3"


def write(name: str, data: bytes) -> Callable[[Path], None]:
    def make(folder: Path) -> None:
        (folder / name).write_bytes(data)

    return make


def write_parquet(name: str, columns: dict[str, list]) -> Callable[[Path], None]:
    def make(folder: Path) -> None:
        pq.write_table(pa.table(columns), folder / name)

    return make


def make_directory(folder: Path) -> None:
    (folder / "folder.jsonl").mkdir()


def make_sparse_file_over_the_limit(folder: Path) -> None:
    # Sparse: the default 10 GiB limit is tested as it ships, at no disk cost. The size check comes
    # first, so not a byte of it is read.
    with open(folder / "huge.jsonl", "wb") as f:
        f.truncate(DEFAULT_LIMITS.max_file_bytes + 1)


def damaged_parquet(name: str, *, keep: float | None = None) -> Callable[[Path], None]:
    """A valid Parquet file of 3000 rows, then cut to its first `keep` share, or (keep None) with
    64 bytes in the middle of its data overwritten, which its footer cannot reveal."""

    def make(folder: Path) -> None:
        path = folder / name
        pq.write_table(pa.table({"text": [f"prompt {i}" for i in range(3000)], "max_tokens": list(range(1, 3001))}),
                       path, row_group_size=500)
        data = bytearray(path.read_bytes())
        if keep is not None:
            del data[int(len(data) * keep):]
        else:
            middle = len(data) // 2
            data[middle:middle + 64] = b"\xff" * 64
        path.write_bytes(bytes(data))

    return make


@dataclass(frozen=True, slots=True)
class BadFile:
    """`make(folder)` writes the file (or leaves it missing); `error` matches the one stderr line."""

    name: str
    file: str
    make: Callable[[Path], None] | None
    error: str  # a regular expression for the whole line
    submit_too: bool = False  # also driven through `pipeline submit`


def exact(text: str) -> str:
    return re.escape(text)


BAD_FILES = [
    BadFile("missing", "missing.jsonl", None, exact("error: missing.jsonl: no such file; check the path"), True),
    BadFile("directory", "folder.jsonl", make_directory,
            exact("error: folder.jsonl: is a directory; give the path of a .jsonl or .parquet file"), True),
    BadFile("empty", "empty.jsonl", write("empty.jsonl", b""),
            exact("error: empty.jsonl: is empty; write one JSON request per line")),
    BadFile("only-blank-lines", "blank.jsonl", write("blank.jsonl", BOM + b"\n  \r\n\t\n"),
            exact("error: blank.jsonl: has only blank lines; write one JSON request per line")),
    BadFile("json-array", "array.json", write("array.json", b'[\n  {"text": "a"},\n  {"text": "b"}\n]\n'),
            exact("error: array.json: this is a JSON array; write one JSON object per line (JSONL)"), True),
    BadFile("pretty-printed-object", "pretty.json",
            write("pretty.json", json.dumps({"text": "a", "max_tokens": 3}, indent=2).encode()),
            exact("error: pretty.json: holds a JSON object spread over several lines; write each request as one "
                  "JSON object on a single line (JSONL)")),
    BadFile("utf-16", "utf16.jsonl", write("utf16.jsonl", '{"text": "a"}\n'.encode("utf-16")),
            exact("error: utf16.jsonl: is UTF-16 text; save it as UTF-8"), True),
    BadFile("csv", "prompts.csv", write("prompts.csv", b"text\nhello\n"),
            exact("error: prompts.csv: unsupported file type '.csv'; convert it: use .jsonl (one JSON object per "
                  "line) or .parquet")),
    BadFile("over-max-file-bytes", "huge.jsonl", make_sparse_file_over_the_limit,
            exact("error: huge.jsonl: is 10.0 GiB (10,737,418,241 bytes), over the 10 GiB limit (max_file_bytes); "
                  "split it into several jobs"), True),
    BadFile("parquet-wrong-schema", "schema.parquet",
            write_parquet("schema.parquet", {"question": ["q"], "answer": [1]}),
            exact("error: schema.parquet: has no prompt column (found: question, answer); add a 'text' column, or "
                  "'prompt', 'messages', or an OpenAI-style 'body' with 'url'"), True),
    BadFile("parquet-misspelt-column", "typo.parquet",
            write_parquet("typo.parquet", {"text": ["a"], "temprature": [0.5]}),
            exact("error: typo.parquet: column 'temprature' is not a known field; did you mean 'temperature'? "
                  "Rename it (columns with unrelated names are ignored)")),
    BadFile("parquet-no-rows", "none.parquet", write_parquet("none.parquet", {"text": pa.array([], pa.string())}),
            exact("error: none.parquet: has no rows; nothing to run")),
    BadFile("parquet-not-parquet", "text.parquet", write("text.parquet", b'{"text": "a"}\n'),
            exact("error: text.parquet: is not a readable Parquet file (") + ".+"
            + exact("); check that it is complete, or re-export it")),
    BadFile("parquet-truncated", "cut.parquet", damaged_parquet("cut.parquet", keep=0.5),
            exact("error: cut.parquet: is not a readable Parquet file (") + ".+"
            + exact("); check that it is complete, or re-export it")),
    # Found only once rows were read and stored: the submit's one transaction must leave nothing.
    BadFile("parquet-corrupted-data", "damaged.parquet", damaged_parquet("damaged.parquet"),
            exact("error: damaged.parquet: Parquet data is corrupted after row ") + r"\d+ \(.+\)"
            + exact("; re-export the file"), True),
]


@pytest.fixture(scope="module")
def migrated_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty database with the schema, copied for each submit (which never migrates)."""
    db_file = tmp_path_factory.mktemp("schema") / DB
    upgrade(database_url(db_file))
    return db_file


def pipeline(command: str, file: str, folder: Path, migrated_db: Path, *extra: str) -> CliResult:
    if command == "submit":
        shutil.copy(migrated_db, folder / DB)
        return run_pipeline(["submit", file, *extra], cwd=folder, db_file=folder / DB)
    return run_pipeline(["run", file, "-o", "out.jsonl", "--errors", "err.jsonl", *extra], cwd=folder,
                        db_file=folder / DB)


CASES = [pytest.param("run", case, id=f"run-{case.name}") for case in BAD_FILES] + [
    pytest.param("submit", case, id=f"submit-{case.name}") for case in BAD_FILES if case.submit_too]


@pytest.mark.parametrize(("command", "case"), CASES)
def test_bad_file_is_one_error_line_exit_1_and_leaves_nothing(tmp_path: Path, migrated_db: Path, command: str,
                                                              case: BadFile) -> None:
    if case.make is not None:
        case.make(tmp_path)
    inputs = files_in(tmp_path)
    result = pipeline(command, case.file, tmp_path, migrated_db)
    assert result.returncode == 1, result.stderr
    assert len(result.stderr_lines) == 1, result.stderr  # no traceback, no progress, nothing else
    assert re.fullmatch(case.error, result.stderr_lines[0]), result.stderr_lines[0]
    assert result.stdout == ""  # no job id: there is no job
    assert jobs_in(tmp_path / DB) == []
    assert files_in(tmp_path) == inputs | {DB}  # no output file, no temporary file


# ---- files whose every line is rejected ----

ALL_REJECTED = [
    pytest.param("latin1.jsonl", '{"text": "café"}\n{"text": "naïve"}\n'.encode("latin-1"), [
        "latin1.jsonl:1: byte 0xe9 at column 14 is not valid UTF-8; save the file as UTF-8 [not_utf8]",
        "latin1.jsonl:2: byte 0xef at column 13 is not valid UTF-8; save the file as UTF-8 [not_utf8]",
    ], id="not-utf8"),
    pytest.param("video.jsonl", b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00", [
        "video.jsonl:1: NUL byte at column 1; the file looks binary or UTF-16: save it as UTF-8 text [nul_byte]",
    ], id="nul-bytes"),
]


@pytest.mark.parametrize("command", ["run", "submit"])
@pytest.mark.parametrize(("name", "data", "shown"), ALL_REJECTED)
def test_file_with_every_line_rejected_exits_1_keeps_its_errors_and_writes_nothing(
        tmp_path: Path, migrated_db: Path, command: str, name: str, data: bytes, shown: list[str]) -> None:
    (tmp_path / name).write_bytes(data)
    result = pipeline(command, name, tmp_path, migrated_db)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    [(job_id, status, total, failed)] = jobs_in(tmp_path / DB)
    assert (status, total, failed) == ("completed", len(shown), len(shown))
    count = f"{len(shown)} line" if len(shown) == 1 else f"{len(shown)} lines"
    assert result.stderr_lines[-len(shown) - 2:] == [
        *shown,
        f"{len(shown)} of {count} rejected; `pipeline results {job_id} -o out.jsonl --errors err.jsonl` lists them all",
        f"error: {name}: every line was rejected ({count}), so nothing ran (job {job_id}); fix them and submit "
        "the file again",
    ]
    # submit still names the job on stdout, so a script can fetch its errors; run has no such output.
    assert result.stdout == (f"{job_id}\n" if command == "submit" else "")
    assert files_in(tmp_path) == {name, DB}


def test_strict_submit_exits_1_without_touching_the_broker(tmp_path: Path, migrated_db: Path) -> None:
    (tmp_path / "in.jsonl").write_text('{"text": "fine"}\n{"text": "a", "top_p": 2}\n')
    result = pipeline("submit", "in.jsonl", tmp_path, migrated_db, "--strict")
    assert result.returncode == 1, result.stderr
    [(job_id, status, _, _)] = jobs_in(tmp_path / DB)
    assert status == "failed"
    assert result.stderr_lines[-3:] == [
        "in.jsonl:2: top_p: must be in (0, 1], got 2 [out_of_range]",
        f"1 line rejected; `pipeline results {job_id} -o out.jsonl --errors err.jsonl` lists them all",
        f"error: in.jsonl: 1 line rejected and --strict is set, so nothing ran (job {job_id}); fix those lines, "
        "or drop --strict to run the good ones",
    ]
    assert result.stdout == f"{job_id}\n"


def test_submit_names_its_rejected_lines_and_queues_only_the_good_ones(tmp_path: Path, migrated_db: Path,
                                                                       redis_client) -> None:
    # The one case that reaches the broker: the real Redis, under keys of this test's own.
    prefix = f"test-bad-input-{secrets.token_hex(4)}:"
    (tmp_path / "in.jsonl").write_text('{"text": "fine"}\n{"text": "a", "max_tokens": "ten"}\n{"text": "ok"}\n')
    shutil.copy(migrated_db, tmp_path / DB)
    try:
        result = run_pipeline(["submit", "in.jsonl"], cwd=tmp_path, db_file=tmp_path / DB,
                              broker_url="redis://127.0.0.1:6379/0", settings={"PIPELINE_REDIS_KEY_PREFIX": prefix})
        queued = redis_client.llen(f"{prefix}normal")
    finally:
        delete_prefixed_keys(redis_client, prefix)
    assert result.returncode == 0, result.stderr
    [(job_id, status, total, failed)] = jobs_in(tmp_path / DB)
    assert (status, total, failed) == ("in_progress", 3, 1)
    assert result.stdout == f"{job_id}\n"
    assert [line for line in result.stderr_lines if line.startswith("in.jsonl")] == [
        'in.jsonl:2: max_tokens: must be a whole number, got the string "ten" [invalid_type]']
    assert (f"1 of 3 lines rejected; `pipeline results {job_id} -o out.jsonl --errors err.jsonl` lists them all"
            in result.stderr_lines)
    assert "Traceback" not in result.stderr
    assert queued == 1  # one chunk, holding the two good lines
