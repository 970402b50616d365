"""What an input file can make the CLI print: no control character of its reaches the terminal
(issue: a key "\\u001b]0;owned\\u0007" retitled the terminal, one holding "\\n" forged a line), and a
file whose lines are all rejected alike (UTF-16, binary) gives one line per run, not twenty."""

from __future__ import annotations

import json
import shutil
import unicodedata
from pathlib import Path

import pytest
from bad_input_cli import CliResult, database_url, jobs_in, run_pipeline

from db.migrate import upgrade

DB = "x.sqlite3"
FILE = "in\x1b]0;name\x07.jsonl"  # the file name itself holds an escape sequence
FILE_SHOWN = "in\\x1b]0;name\\x07.jsonl"


@pytest.fixture(scope="module")
def migrated_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    db_file = tmp_path_factory.mktemp("schema") / DB
    upgrade(database_url(db_file))
    return db_file


def submit(folder: Path, migrated_db: Path, name: str, data: bytes) -> CliResult:
    """`pipeline submit` of a file whose every line is rejected: no chunk, so no broker is needed."""
    (folder / name).write_bytes(data)
    shutil.copy(migrated_db, folder / DB)
    return run_pipeline(["submit", name], cwd=folder, db_file=folder / DB)


def unsafe(text: str) -> list[str]:
    """The characters of `text` a terminal would act on, or treat as a line break, besides "\\n"."""
    return [ch for ch in text if ch != "\n" and (unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp"))]


def test_nothing_from_the_input_reaches_the_terminal_raw(tmp_path: Path, migrated_db: Path) -> None:
    lines = [
        {"text": "a", "\u001b]0;owned\u0007": 1},  # a field name that retitles the terminal
        {"text": "a", "x\nerror: all good, nothing was rejected": 1},  # a field name that forges a line
        {"text": "a", "priority": "\u2028high\u0085\u009b2J"},  # Unicode line breaks and CSI in a value
        {"messages": [{"role": "\u202euser", "content": "hi"}]},  # a bidi override in a value
        {"text": "a", "max_tokens": 0, "custom_id": "id\x7f\u202e"},
        {"text": "b", "custom_id": "id\x7f\u202e"},  # its duplicate: the message quotes the id
    ]
    result = submit(tmp_path, migrated_db, FILE, "".join(json.dumps(line, ensure_ascii=False) + "\n"
                                                         for line in lines).encode())
    assert result.returncode == 1, result.stderr
    assert unsafe(result.stderr) == []
    assert unsafe(result.stdout) == []
    [(job_id, _, _, _)] = jobs_in(tmp_path / DB)
    # One line each, nothing forged: progress, six rejected lines, the count, the error.
    shown = result.stderr_lines
    assert shown[0] == f"reading {FILE_SHOWN}: 6 lines"
    assert shown[1].startswith(f'{FILE_SHOWN}:1: \\x1b]0;owned\\x07: unknown field "\\u001b]0;owned\\u0007"')
    assert shown[2].startswith(f'{FILE_SHOWN}:2: x\\nerror: all good, nothing was rejected: unknown field "x\\n')
    assert shown[3] == (f'{FILE_SHOWN}:3: priority: "\\u2028high\\x85\\x9b2J" is not one of critical, high, '
                        "normal, low [invalid_value]")
    assert shown[4].startswith(f'{FILE_SHOWN}:4: messages[0].role: role "\\u202euser" is not supported')
    assert shown[6].startswith(f"{FILE_SHOWN}:6: custom_id: custom_id 'id\\x7f\\u202e' already used on line 5")
    assert shown[7].startswith("6 of 6 lines rejected; ")
    assert shown[8] == (f"error: {FILE_SHOWN}: every line was rejected (6 lines), so nothing ran (job {job_id}); "
                        "fix them and submit the file again")
    assert len(shown) == 9


def test_a_utf16_file_without_bom_shows_its_alike_lines_as_one_run(tmp_path: Path, migrated_db: Path) -> None:
    # UTF-16-LE with no BOM: line 1 is "{\0..." (NUL at column 2), every later line "\0{\0..." (column 1),
    # and the trailing "\0" of the last line ending is a line 31 of its own.
    result = submit(tmp_path, migrated_db, "utf16.jsonl", ('{"text": "a"}\n' * 30).encode("utf-16-le"))
    assert result.returncode == 1, result.stderr
    [(job_id, _, total, failed)] = jobs_in(tmp_path / DB)
    assert (total, failed) == (31, 31)
    looks_binary = "the file looks binary or UTF-16: save it as UTF-8 text [nul_byte]"
    assert result.stderr_lines[1:] == [
        f"utf16.jsonl:1: NUL byte at column 2; {looks_binary}",
        f"utf16.jsonl:2-31: NUL byte at column 1; {looks_binary} (30 lines)",
        f"31 of 31 lines rejected; `pipeline results {job_id} -o out.jsonl --errors err.jsonl` lists them all",
        f"error: utf16.jsonl: every line was rejected (31 lines), so nothing ran (job {job_id}); fix them and "
        "submit the file again",
    ]
