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
    "prompts", "prompt tokens", "generated tokens", "needed GFLOP", "ours tokens/s", "transformers tokens/s",
    "ratio ours/transformers", "prefix cache hit rate", "ideal hit rate", "ours peak KV memory",
    "transformers peak KV memory", "ours roofline fraction", "transformers roofline fraction", "greedy agreement",
]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    path = tmp_path_factory.mktemp("bench") / "result.json"
    result = CliRunner().invoke(app, ["bench", "engine", "--scale", "small", "--workload", "all", "--json", str(path)])
    assert result.exit_code == 0, result.output
    return result.stdout, json.loads(path.read_text())


def test_table_has_every_row_and_workload(small_run: tuple[str, dict]) -> None:
    stdout, _ = small_run
    lines = stdout.splitlines()
    header = next(line for line in lines if line.startswith("metric"))
    assert header.split() == ["metric", "shared-prefix", "distinct", "skewed"]
    for label in ROW_LABELS:
        row = next((line for line in lines if line.startswith(label + "  ")), None)
        assert row is not None, f"no row {label!r}"
        assert len(row[len(label):].split()) == 3 + (label.endswith("memory") * 3), row
    policy_rows = [line.split()[0] for line in lines if re.match(r"(lru|lfu|fifo|adaptive) +\d", line)]
    assert policy_rows == ["lru", "lfu", "fifo", "adaptive"]
    assert any(line.startswith("prefix caching on vs off (distinct") for line in lines)
    assert any(line.startswith("adaptive vs lru hit rate:") for line in lines)


def test_greedy_tokens_agree_with_transformers_on_every_prompt(small_run: tuple[str, dict]) -> None:
    stdout, result = small_run
    agreement = {w["name"]: (w["num_agreeing"], w["num_prompts"]) for w in result["workloads"]}
    assert agreement == {"shared-prefix": (8, 8), "distinct": (8, 8), "skewed": (32, 32)}
    row = next(line for line in stdout.splitlines() if line.startswith("greedy agreement"))
    assert row.split()[2:] == ["8/8", "8/8", "32/32"]


def test_hit_rates_are_exact(small_run: tuple[str, dict]) -> None:
    _, result = small_run
    by_name = {w["name"]: w for w in result["workloads"]}
    # 8 prompts of 32 shared + 4..12 own tokens (311 in all): the 7 after the first hit both prefix blocks.
    assert by_name["shared-prefix"]["num_prompt_tokens"] == 311
    assert by_name["shared-prefix"]["hit_rate"] == pytest.approx(7 * 32 / 311)
    assert by_name["shared-prefix"]["hit_rate"] == pytest.approx(by_name["shared-prefix"]["ideal_hit_rate"])
    assert by_name["distinct"]["hit_rate"] == 0.0
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
    assert q["workload"] == "shared-prefix"
    # small shape: 2 layers, 2 KV heads, head_dim 16, block 16 -> 4-byte floats vs 1 byte + a 4-byte scale per head
    assert (q["bytes_per_block_full"], q["bytes_per_block_int8"]) == (2 * 2 * 16 * 2 * 16 * 4, 2 * 2 * 16 * 2 * (16 + 4))
    assert q["num_contexts"] == 24
    assert 0.0 < q["max_logit_error"] < q["logit_std"]
    assert "int8 KV cache against full precision (shared-prefix, weights at init range 0.02):" in output
    assert "bars:" not in output  # the bars are for the full shape
