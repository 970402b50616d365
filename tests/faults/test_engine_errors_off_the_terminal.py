"""`pipeline run` with lines that would break the engine: sampling values the engine's float32
arithmetic cannot represent are refused at submit, one clean line naming the field; a request that
makes the engine raise (a real poison: a checkpoint with a NaN embedding row) fails alone with
`engine_error`, its traceback in the error history and none on the user's terminal."""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
from bad_input_cli import run_pipeline
from hf_models import save_corrupted_bench_model
from line_outcomes import line_error

CORRUPT_TOKEN = 13  # `w13` in the word-level vocabulary of the benchmark model


def _write(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _read(path: Path) -> dict[str, dict]:
    return {x["custom_id"]: x for x in map(json.loads, path.read_text().splitlines())}


def test_a_top_p_that_is_zero_in_float32_is_refused_at_submit(tmp_path: Path) -> None:
    lines = [{"custom_id": "tiny-top-p", "text": "Hello", "max_tokens": 3, "temperature": 0.8, "top_p": 5e-324},
             {"custom_id": "fine", "text": "Hello", "max_tokens": 3, "temperature": 0.8, "top_p": 1e-30, "seed": 1}]
    result = run_pipeline(["run", str(_write(tmp_path / "in.jsonl", lines)), "-o", str(tmp_path / "out.jsonl"),
                          "--errors", str(tmp_path / "err.jsonl")], cwd=tmp_path, db_file=tmp_path / "db.sqlite3")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert list(_read(tmp_path / "out.jsonl")) == ["fine"]
    error = _read(tmp_path / "err.jsonl")["tiny-top-p"]["error"]
    assert error["code"] == "out_of_range"
    assert error["message"].endswith("top_p: is 5e-324, which the engine's float32 sampler rounds to 0 "
                                     "(keeping no token); use at least 1.18e-38")


@pytest.fixture(scope="module")
def corrupted_model(tmp_path_factory) -> Path:
    return save_corrupted_bench_model(tmp_path_factory.mktemp("corrupted-model"), CORRUPT_TOKEN)


def test_a_request_that_breaks_the_engine_prints_no_traceback(tmp_path: Path, corrupted_model: Path) -> None:
    lines = [{"custom_id": "ok", "text": "w100 w101 w102", "max_tokens": 4, "temperature": 0},
             {"custom_id": "poison", "text": f"w{CORRUPT_TOKEN} w200 w201", "max_tokens": 4, "temperature": 0.8,
              "seed": 1}]
    db_file = tmp_path / "db.sqlite3"
    result = run_pipeline(["run", str(_write(tmp_path / "in.jsonl", lines)), "-o", str(tmp_path / "out.jsonl"),
                          "--errors", str(tmp_path / "err.jsonl")], cwd=tmp_path, db_file=db_file,
                          settings={"PIPELINE_MODEL": str(corrupted_model)})
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert list(_read(tmp_path / "out.jsonl")) == ["ok"]
    assert line_error(_read(tmp_path / "err.jsonl")["poison"])["code"] == "engine_error"
    with closing(sqlite3.connect(db_file)) as connection:
        history = connection.execute("SELECT kind, custom_id, traceback FROM error_history").fetchall()
    assert [(kind, custom_id) for kind, custom_id, _ in history] == [("engine", "poison")]
    assert "in sample" in history[0][2]  # the engine's own traceback (the sampler refused NaN), kept for an operator
