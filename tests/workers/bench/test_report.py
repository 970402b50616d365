"""The engine bench's summary and report on constructed results: medians and ranges over the runs,
ratios against each peer, and runs under other load flagged."""

from __future__ import annotations

import pytest

from workers.bench.cpu_load import CpuLoad
from workers.bench.engine_compare import EngineComparison
from workers.bench.model_setup import SMALL_SHAPE
from workers.bench.report import format_report
from workers.bench.results import BenchResult, TimedRun, VllmInfo, WorkloadResult, summarize

QUIET = CpuLoad(1.0, 2.0, 0.01, False)
BUSY = CpuLoad(1.0, 1.5, 0.6, True)


def _runs(*seconds: float, loaded: tuple[int, ...] = ()) -> list[TimedRun]:
    return [TimedRun(s, BUSY if i in loaded else QUIET) for i, s in enumerate(seconds)]


def _workload(name: str = "shared-prefix", with_vllm: bool = True) -> WorkloadResult:
    systems = {
        # 120 tokens: 2 s, 1 s, 4 s -> 60, 120, 30 tokens/s
        "ours": summarize("ours", _runs(2.0, 1.0, 4.0), 120, hit_rate=0.75, peak_kv_bytes=1 << 20),
        "transformers": summarize("transformers", _runs(6.0, 4.0, 5.0, loaded=(1,)), 120, peak_kv_bytes=2 << 20,
                                  num_agreeing=7),
    }
    if with_vllm:
        systems["vllm"] = summarize("vllm", _runs(1.0, 1.5, 3.0, loaded=(0, 2)), 120, hit_rate=0.5, num_agreeing=8)
    for s in systems.values():
        s.roofline_fraction = 0.01
    return WorkloadResult(name, 8, 300, 120, 1e9, 0.8, systems)


def _bench(*workloads: WorkloadResult, vllm: bool = True, dtype: str = "float32",
           matmul_dtype: str | None = None) -> BenchResult:
    info = VllmInfo("0.32.0", 128, 42.0) if vllm else None
    return BenchResult("small", dtype, SMALL_SHAPE, 2, 1e11, matmul_dtype or dtype, 4, (0.1, 0.2), 3, list(workloads),
                       vllm=info)


def _row(report: str, label: str) -> list[str]:
    line = next((line for line in report.splitlines() if line.startswith(label + "  ")), None)
    assert line is not None, f"no row {label!r} in\n{report}"
    return line[len(label):].split()


def test_summary_is_the_median_and_the_range_of_tokens_per_s() -> None:
    s = summarize("ours", _runs(2.0, 1.0, 4.0), 120)
    assert (s.tokens_per_s, s.tokens_per_s_min, s.tokens_per_s_max) == (60.0, 30.0, 120.0)
    even = summarize("ours", _runs(2.0, 1.0, 4.0, 3.0), 120)
    assert even.tokens_per_s == pytest.approx((40.0 + 60.0) / 2)  # the middle two's mean
    assert summarize("ours", _runs(2.0), 120).tokens_per_s_min == 60.0
    with pytest.raises(ValueError, match="no timed runs"):
        summarize("ours", [], 120)


def test_report_rows_give_medians_ranges_ratios_and_agreement() -> None:
    report = format_report(_bench(_workload("shared-prefix"), _workload("multi-turn")))
    assert _row(report, "ours tokens/s") == ["60.0", "60.0"]
    assert _row(report, "ours tokens/s min-max") == ["30.0-120.0", "30.0-120.0"]
    assert _row(report, "transformers tokens/s") == ["24.0", "24.0"]  # 120 / 5 s
    assert _row(report, "vllm tokens/s") == ["80.0", "80.0"]  # 120 / 1.5 s
    assert _row(report, "vllm tokens/s min-max") == ["40.0-120.0", "40.0-120.0"]
    assert _row(report, "ratio ours/vllm") == ["0.75x", "0.75x"]
    assert _row(report, "ratio ours/transformers") == ["2.50x", "2.50x"]
    assert _row(report, "prefix cache hit rate") == ["75.0%", "75.0%"]
    assert _row(report, "vllm prefix cache hit rate") == ["50.0%", "50.0%"]
    assert _row(report, "greedy agreement with transformers") == ["7/8", "7/8"]
    assert _row(report, "greedy agreement with vllm") == ["8/8", "8/8"]
    assert _row(report, "vllm roofline fraction") == ["1.0%", "1.0%"]
    assert "peer: vLLM 0.32.0 (CPU), its own process, prefix caching on, block size 128" in report


def test_runs_under_other_load_are_flagged_per_run() -> None:
    report = format_report(_bench(_workload()))
    assert _row(report, "ours runs under other load") == ["0/3"]
    assert _row(report, "transformers runs under other load") == ["1/3"]
    assert _row(report, "vllm runs under other load") == ["2/3"]
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("quiet-machine check"))
    assert lines[start + 1].split() == ["shared-prefix", "ours", "0.01", "0.01", "0.01"]
    assert lines[start + 2].split() == ["transformers", "0.01", "0.60", "LOADED", "0.01"]
    assert lines[start + 3].split() == ["vllm", "0.60", "LOADED", "0.01", "0.60", "LOADED"]
    assert lines[start + 4] == ("warning: 3 of 9 timed runs ran under other load; their figures are suspect: "
                                "rerun on a quiet machine")


def test_a_quiet_run_says_so_and_a_missing_peer_leaves_its_rows_out() -> None:
    w = _workload(with_vllm=False)
    w.systems["transformers"] = summarize("transformers", _runs(5.0, 5.0, 5.0), 120)
    report = format_report(_bench(w, vllm=False))
    assert "all 6 timed runs ran on a quiet machine" in report
    assert "vllm" not in report
    assert _row(report, "ratio ours/transformers") == ["2.50x"]  # 60 / 24


def test_bf16_section_and_the_vllm_bars() -> None:
    w = _workload("multi-turn")
    w.bf16_vs_fp32 = EngineComparison("multi-turn", 36, 0.0875, 0.01369, 1.144, 34, 12, 7, 92.4, 61.0)
    result = _bench(w, dtype="bfloat16")
    report = format_report(result)
    assert "cpu bfloat16" in report.splitlines()[0]
    assert "our bfloat16 engine against our float32 engine (multi-turn):" in report
    assert "max error 0.0875, mean 0.01369 (logit std 1.144); top-1 agreement 34/36" in report
    assert "greedy outputs identical to float32's for 7/12 prompts (bfloat16)" in report
    assert "bars:" not in report  # the bars are for the full shape
    result.scale = "full"
    assert "multi-turn: 0.75x vllm, bar 1.3x: NOT met" in format_report(result)


def test_the_roofline_rate_says_when_it_is_float32s() -> None:
    # bfloat16 on a CPU that emulates it: the roofline holds it to float32's faster rate, and says so.
    first = format_report(_bench(_workload(), dtype="bfloat16", matmul_dtype="float32")).splitlines()[0]
    assert "matmul 100.0 GFLOP/s in float32 (measured; bfloat16 is emulated and slower here)" in first
    native = format_report(_bench(_workload(), dtype="bfloat16")).splitlines()[0]
    assert "matmul 100.0 GFLOP/s in bfloat16 (measured);" in native
