"""`pipeline run`: a whole job in one process on embedded SQLite and the built-in tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app

from support.workdir import clean_workdir

LINES = [
    {"custom_id": "cmpl", "method": "POST", "url": "/v1/completions",
     "body": {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}},
    {"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "tiny", "messages": [{"role": "system", "content": "Be terse."},
                                            {"role": "user", "content": "Hello there"}],
              "max_tokens": 6, "temperature": 0}},
    "{not json",  # line 3: invalid_json
    {"custom_id": "simple", "text": "Summarise: caches", "max_length": 5, "temperature": 0},
    {"custom_id": "bad-max", "text": "x", "max_tokens": -3},  # line 5: out of range
    {"text": "no id here", "max_tokens": 4, "temperature": 0},  # custom_id defaults to "6"
]
GOOD_IDS = ["cmpl", "chat", "simple", "6"]


def write_input(path: Path) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in LINES))
    return path


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return clean_workdir(monkeypatch, tmp_path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def expected_greedy_outputs() -> dict[str, tuple[str, int]]:
    """What the engine gives for the good lines when called directly, one request at a time."""
    from pipeline.settings import load_settings
    from workers import EngineConfig, LLMEngine, SamplingParams

    engine = LLMEngine(EngineConfig(**load_settings().engine_kwargs()))
    tok = engine.tokenizer
    prompts = {
        "cmpl": (tok.encode("Once upon a time"), 8),
        "chat": (tok.encode_chat([{"role": "system", "content": "Be terse."},
                                  {"role": "user", "content": "Hello there"}]), 6),
        "simple": (tok.encode("Summarise: caches"), 5),
        "6": (tok.encode("no id here"), 4),
    }
    outputs = {cid: engine.generate([ids], SamplingParams(max_tokens=n, temperature=0.0))[0]
               for cid, (ids, n) in prompts.items()}
    return {cid: (out.text, len(out.token_ids)) for cid, out in outputs.items()}


def test_run_writes_one_result_per_good_line_and_one_error_per_bad_line(workdir: Path) -> None:
    source = write_input(workdir / "in.jsonl")
    result = CliRunner().invoke(app, ["run", str(source), "-o", "out.jsonl", "--errors", "err.jsonl"])
    assert result.exit_code == 0, result.output
    assert (workdir / "pipeline.sqlite3").exists()  # the embedded default database

    out = read_jsonl(workdir / "out.jsonl")
    assert [line["custom_id"] for line in out] == GOOD_IDS  # input order
    for line in out:
        assert line["error"] is None
        assert line["response"]["status_code"] == 200
        usage = line["response"]["body"]["usage"]
        assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert "cached_tokens" in usage["prompt_tokens_details"]
    bodies = {line["custom_id"]: line["response"]["body"] for line in out}
    assert bodies["chat"]["object"] == "chat.completion" and bodies["cmpl"]["object"] == "text_completion"
    got = {cid: (b["choices"][0]["message"]["content"] if b["object"] == "chat.completion"
                 else b["choices"][0]["text"], b["usage"]["completion_tokens"]) for cid, b in bodies.items()}
    assert got == expected_greedy_outputs()

    errors = read_jsonl(workdir / "err.jsonl")
    assert [(e["line"], e["custom_id"], e["error"]["code"]) for e in errors] == [
        (3, None, "invalid_json"), (5, "bad-max", "out_of_range")]
    assert all(e["response"] is None and e["error"]["message"] for e in errors)


def test_run_of_a_missing_file_is_one_error_line(workdir: Path) -> None:
    result = CliRunner().invoke(app, ["run", "nope.jsonl", "-o", "out.jsonl"])
    assert result.exit_code == 1
    assert result.output.startswith("error: ") and "nope.jsonl" in result.output
    assert "Traceback" not in result.output
    assert not (workdir / "out.jsonl").exists()
