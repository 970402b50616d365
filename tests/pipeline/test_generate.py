"""`pipeline generate`: one prompt through the model in this process, streamed or not."""

from __future__ import annotations

from pathlib import Path

from support.processes import cli, cli_ok, pipeline_env


def test_streamed_and_whole_answers_are_the_same(tmp_path: Path) -> None:
    env = pipeline_env()
    whole = cli_ok(env, tmp_path, "generate", "The capital of France is", "--max-tokens", "16")
    streamed = cli_ok(env, tmp_path, "generate", "The capital of France is", "--max-tokens", "16", "--stream")
    assert whole.stdout == streamed.stdout and len(whole.stdout) > 1
    assert "Traceback" not in whole.stderr + streamed.stderr


def test_a_prompt_too_long_is_one_error_line(tmp_path: Path) -> None:
    result = cli(pipeline_env(), tmp_path, "generate", "x" * 5000, "--max-tokens", "4")
    # The tiny model's one-line warning that it is gibberish comes first.
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == "error: prompt has 5001 tokens, the model accepts 4095 (max_model_len 4096)"
