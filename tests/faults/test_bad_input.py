"""Bad lines through the real CLI: `pipeline run FILE -o OUT --errors ERR` on one file that holds
every kind of bad line between good ones, run once; then one test per line, on the errors file and
on stderr. The file starts with a UTF-8 BOM, has CRLF line ends, a second BOM mid-file (as `cat a b`
leaves it) and ends in a truncated line with no line end: the good lines must still run.

Also `--strict`, which must run nothing, exit 1 and write no file."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from bad_input_cli import CliResult, count_rows, files_in, jobs_in, run_pipeline

from pipeline.input_reader import BOM
from pipeline.limits import MiB
from pipeline.request_spec import LINE_ERROR_CODES, LineError
from pipeline.submit import _error_row, split_validation_message

HUGE_LINE_BYTES = 100 * MiB  # written in pieces by the fixture, never held in memory


def js(obj: object) -> bytes:
    return json.dumps(obj).encode()


def openai(url: str, body: object, custom_id: str, method: str = "POST") -> bytes:
    return js({"custom_id": custom_id, "method": method, "url": url, "body": body})


USER = [{"role": "user", "content": "Hi"}]


@dataclass(frozen=True, slots=True)
class Line:
    """One line of the input and what must come of it. `code` None: a good (or blank) line, which
    gives a result under `custom_id`; else an error with that code, on `field`, under `custom_id`,
    whose message holds each of `says` (what is wrong and what to do)."""

    name: str
    content: bytes | None  # None: the 100 MB line
    field: str | None = None
    code: str | None = None
    says: tuple[str, ...] = ()
    custom_id: str | None = None
    rejected: bool = True  # False: accepted at submit, failed by the worker (in --errors, not on stderr)


LINES: list[Line] = [
    Line("good-plain", BOM + js({"custom_id": "good-plain", "text": "Hello", "max_tokens": 3, "temperature": 0}),
         custom_id="good-plain"),
    Line("blank", b""),
    Line("not-utf8", b'{"text": "caf\xe9"}', None, "not_utf8",
         ("byte 0xe9 at column 14 is not valid UTF-8", "save the file as UTF-8")),
    Line("nul-byte", b'{"text": "a\x00b"}', None, "nul_byte", ("NUL byte at column 12", "save it as UTF-8 text")),
    Line("broken-json", b'{"text": "cut off', None, "invalid_json",
         ("invalid JSON: Unterminated string starting at column 10; write one complete JSON object per line",)),
    Line("array-line", js([{"text": "a"}, {"text": "b"}]), None, "not_an_object",
         ("holds an array, not a JSON object", "write one object per line")),
    Line("whitespace", b"   \t"),
    Line("100-mb-line", None, None, "line_too_long",
         ("the line is 100.0 MiB, over the 8 MiB limit (max_line_bytes)", "make the request smaller")),
    Line("max-tokens-string", js({"text": "a", "max_tokens": "ten"}), "max_tokens", "invalid_type",
         ('must be a whole number, got the string "ten"',)),
    Line("max-tokens-bool", js({"text": "a", "max_tokens": True}), "max_tokens", "invalid_type", ("got true",)),
    Line("max-tokens-absurd", js({"text": "a", "max_tokens": 10**12}), "max_tokens", "out_of_range",
         ("must be between 1 and 32768 (the max_tokens limit), got 1000000000000",)),
    Line("max-tokens-negative", js({"text": "a", "max_tokens": -1}), "max_tokens", "out_of_range",
         ("must be between 1 and 32768, got -1",)),
    Line("temperature-negative", js({"text": "a", "temperature": -1}), "temperature", "out_of_range",
         ("must be in [0, 2], got -1",)),
    Line("top-p-two", js({"text": "a", "top_p": 2}), "top_p", "out_of_range", ("must be in (0, 1], got 2",)),
    Line("missing-prompt", js({"max_tokens": 3}), "text", "missing_field", ('add "text": "<your prompt>"',)),
    Line("openai-missing-prompt", openai("/v1/completions", {"max_tokens": 3}, "no-prompt"), "body.prompt",
         "missing_field", ('add "prompt": "<your prompt>"',), "no-prompt"),
    Line("empty-messages", js({"messages": []}), "messages", "empty_messages",
         ('is empty; give at least one {"role": "user", "content": "..."}',)),
    Line("openai-empty-messages", openai("/v1/chat/completions", {"messages": []}, "no-messages"),
         "body.messages", "empty_messages", ("is empty; give at least one",), "no-messages"),
    Line("unknown-role", js({"messages": [{"role": "robot", "content": "hi"}]}), "messages[0].role", "unknown_role",
         ('role "robot" is not supported; use "system", "user" or "assistant"',)),
    Line("unknown-endpoint", openai("/v1/embeddings", {"input": "a"}, "embed"), "url", "unknown_endpoint",
         ('url "/v1/embeddings" is not supported; use "/v1/completions" or "/v1/chat/completions"',), "embed"),
    Line("unsupported-method", openai("/v1/completions", {"prompt": "a"}, "get", method="GET"), "method",
         "unsupported_method", ('method "GET" is not supported; batch lines use "POST"',), "get"),
    Line("duplicate-custom-id", js({"custom_id": "good-plain", "text": "again"}), "custom_id", "duplicate_custom_id",
         ("custom_id 'good-plain' already used on line 1; give each request its own custom_id",)),
    Line("openai-absurd-max-tokens", openai("/v1/completions", {"prompt": "a", "max_tokens": 10**12}, "huge-max"),
         "body.max_tokens", "out_of_range", ("(the max_tokens limit), got 1000000000000",), "huge-max"),
    Line("good-chat", openai("/v1/chat/completions", {"messages": USER, "max_tokens": 2, "temperature": 0},
                             "good-chat"), custom_id="good-chat"),
    Line("prompt-over-limit", js({"text": "x" * (MiB + 1)}), "text", "too_long",
         ("is 1,048,577 characters; at most 1,048,576 are allowed (max_prompt_chars)",)),
    Line("duplicate-key", b'{"text": "a", "text": "b"}', "text", "duplicate_key",
         ('the key "text" appears twice in one object; keep one',)),
    Line("good-after-bom", BOM + openai("/v1/completions", {"prompt": "Once", "max_tokens": 2, "temperature": 0},
                                        "good-after-bom"), custom_id="good-after-bom"),
    # Fits max_prompt_chars but not the tiny model's 4096-token context: the worker fails it.
    Line("prompt-over-context", js({"custom_id": "long", "text": "y" * 5000, "max_tokens": 2}), None,
         "prompt_too_long", ("the model accepts",), "long", rejected=False),
    Line("good-default-id", js({"text": "Bye", "max_tokens": 2, "temperature": 0})),
    Line("truncated-last-line", b'{"text": "the file was cut', None, "invalid_json", ("Unterminated string",)),
]
LINE_NUMBERS = {line.name: number for number, line in enumerate(LINES, start=1)}
INPUT = "in.jsonl"


def is_blank(line: Line) -> bool:
    return line.content is not None and not line.content.strip()


# Found before the line is a JSON object whose custom_id can be read, or about the custom_id itself.
NO_ID_CODES = {"not_utf8", "nul_byte", "invalid_json", "not_an_object", "duplicate_key", "line_too_long",
               "duplicate_custom_id"}


def expected_custom_id(line: Line) -> str | None:
    """The id the result or error carries: the line's own, its number by default, None when the
    line could not be read or its id is a duplicate."""
    if line.custom_id is not None:
        return line.custom_id
    return None if line.code in NO_ID_CODES else str(LINE_NUMBERS[line.name])


GOOD = [line for line in LINES if line.code is None and not is_blank(line)]
REJECTED = [line for line in LINES if line.code is not None and line.rejected]
BAD = [line for line in LINES if line.code is not None]


def write_input(path: Path, lines: list[Line], eol: bytes, cut_last: bool) -> None:
    """Each line followed by `eol`, except the last when `cut_last` (a file cut off mid-write)."""
    with open(path, "wb") as f:
        for number, line in enumerate(lines, start=1):
            if line.content is None:
                f.write(b'{"text": "')
                for _ in range(HUGE_LINE_BYTES // MiB):
                    f.write(b"z" * MiB)
                f.write(b'"}')
            else:
                f.write(line.content)
            if number < len(lines) or not cut_last:
                f.write(eol)


@dataclass(frozen=True, slots=True)
class Outcome:
    result: CliResult
    folder: Path
    results: dict[str, dict]  # custom_id -> output line
    errors: dict[int, dict]  # input line -> error line


@pytest.fixture(scope="module")
def outcome(tmp_path_factory: pytest.TempPathFactory) -> Outcome:
    folder = tmp_path_factory.mktemp("bad_lines")
    write_input(folder / INPUT, LINES, eol=b"\r\n", cut_last=True)
    result = run_pipeline(["run", INPUT, "-o", "out.jsonl", "--errors", "err.jsonl"], cwd=folder,
                          db_file=folder / "x.sqlite3")
    assert result.returncode == 0, result.stderr
    (folder / INPUT).unlink()  # 100 MB: no need to keep it
    results = [json.loads(text) for text in (folder / "out.jsonl").read_text().splitlines()]
    errors = [json.loads(text) for text in (folder / "err.jsonl").read_text().splitlines()]
    assert len({e["line"] for e in errors}) == len(errors), "one error per line"
    return Outcome(result, folder, {r["custom_id"]: r for r in results}, {e["line"]: e for e in errors})


def test_good_lines_run_despite_bom_crlf_blank_lines_and_bad_neighbours(outcome: Outcome) -> None:
    assert list(outcome.results) == [expected_custom_id(line) for line in GOOD]  # in input order
    for custom_id, result in outcome.results.items():
        assert result["error"] is None, custom_id
        assert result["response"]["status_code"] == 200
        assert result["response"]["body"]["usage"]["completion_tokens"] > 0


def test_every_bad_line_is_in_the_errors_file_and_nothing_else_is(outcome: Outcome) -> None:
    assert sorted(outcome.errors) == [LINE_NUMBERS[line.name] for line in BAD]


@pytest.mark.parametrize("line", BAD, ids=[line.name for line in BAD])
def test_bad_line_error_names_line_field_code_and_fix(outcome: Outcome, line: Line) -> None:
    error = outcome.errors[LINE_NUMBERS[line.name]]
    assert error["custom_id"] == expected_custom_id(line)
    if line.rejected:  # never ran: no response, an error
        assert error["response"] is None
        detail = error["error"]
    else:  # ran and failed on its own: OpenAI's failed request, a 400 with an error body
        assert error["error"] is None and error["response"]["status_code"] == 400
        detail = error["response"]["body"]["error"]
    assert detail["code"] == line.code
    message = detail["message"]
    # The errors file has no field column: the message starts with the field, as on stderr.
    if line.field is not None:
        assert message.startswith(f"{line.field}: "), message
    for fragment in line.says:
        assert fragment in message, message
    assert "\n" not in message


def test_stderr_shows_the_first_20_rejected_lines_as_file_line_field_message_code(outcome: Outcome) -> None:
    expected = [f"{INPUT}:{LINE_NUMBERS[line.name]}: {outcome.errors[LINE_NUMBERS[line.name]]['error']['message']}"
                f" [{line.code}]" for line in REJECTED]
    shown = [text for text in outcome.result.stderr_lines if text.startswith(f"{INPUT}:")]
    assert len(REJECTED) > 20  # so that the cut-off is tested too
    assert shown == expected[:20]
    # Blank lines are not lines of the job; the worker's failure is not a rejection.
    num_lines = len(LINES) - sum(map(is_blank, LINES))
    assert (f"{len(REJECTED)} of {num_lines} lines rejected ({len(REJECTED) - 20} not shown); "
            "see err.jsonl for them all") in outcome.result.stderr_lines


def test_no_traceback_and_no_temporary_file(outcome: Outcome) -> None:
    assert "Traceback" not in outcome.result.stderr
    assert files_in(outcome.folder) == {"x.sqlite3", "out.jsonl", "err.jsonl"}


def test_job_counts_every_non_blank_line(outcome: Outcome) -> None:
    [(_, status, total, failed)] = jobs_in(outcome.folder / "x.sqlite3")
    assert (status, total, failed) == ("completed", len(GOOD) + len(BAD), len(BAD))


@pytest.mark.parametrize("code", sorted(LINE_ERROR_CODES))
def test_every_line_error_code_survives_the_error_history(code: str) -> None:
    # Rejected lines are stored as "[code] field: message"; a code the parser cannot read back
    # would reach the errors file as "invalid_request".
    error = LineError("in.jsonl", 3, "body.max_tokens", code, "must be a whole number")
    assert split_validation_message(_error_row("job", "tenant", error)["message"]) == (
        code, "body.max_tokens: must be a whole number")


# ---- --strict: one bad line and nothing runs ----

STRICT_LINES = [LINES[0], LINES[LINE_NUMBERS["max-tokens-string"] - 1], LINES[LINE_NUMBERS["good-chat"] - 1]]


def test_strict_runs_nothing_exits_1_and_writes_no_file(tmp_path: Path) -> None:
    write_input(tmp_path / INPUT, STRICT_LINES, eol=b"\n", cut_last=False)
    result = run_pipeline(["run", INPUT, "-o", "out.jsonl", "--errors", "err.jsonl", "--strict"], cwd=tmp_path,
                          db_file=tmp_path / "x.sqlite3")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    [(job_id, status, total, failed)] = jobs_in(tmp_path / "x.sqlite3")
    assert (status, total, failed) == ("failed", 0, 0)
    assert count_rows(tmp_path / "x.sqlite3", "requests") == 0  # nothing could reach a worker
    assert result.stderr_lines[-3:] == [
        f'{INPUT}:2: max_tokens: must be a whole number, got the string "ten" [invalid_type]',
        f"1 line rejected; `pipeline results {job_id} -o out.jsonl --errors err.jsonl` lists them all",
        f"error: {INPUT}: 1 line rejected and --strict is set, so nothing ran (job {job_id}); fix those lines, "
        "or drop --strict to run the good ones",
    ]
    assert files_in(tmp_path) == {INPUT, "x.sqlite3"}
