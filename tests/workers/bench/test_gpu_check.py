"""The prepared GPU check's pure-Python parts: token comparison, tables, the model shape, and the
clean refusal where no GPU is visible (the check itself needs one)."""

from __future__ import annotations

import pytest
import torch

from workers.bench import gpu_check
from workers.bench.gpu_check import GPU_SHAPE, Equality, Throughput, compare_tokens, format_equality, format_throughput


def test_shape_is_a_half_billion_parameter_llama() -> None:
    s = GPU_SHAPE
    assert s.hidden_size // s.num_attention_heads == 64
    per_layer = (2 * s.hidden_size * s.hidden_size + 2 * s.hidden_size * 64 * s.num_key_value_heads
                 + 3 * s.hidden_size * s.intermediate_size)
    params = s.num_hidden_layers * per_layer + 2 * s.vocab_size * s.hidden_size
    assert 0.4e9 < params < 0.6e9


def test_compare_tokens_counts_identical_prompts_and_the_first_divergence() -> None:
    ref = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert compare_tokens("float32", "triton", [r[:] for r in ref], ref) == Equality("float32", "triton", 3, 3, None)
    assert compare_tokens("bfloat16", "t", [[1, 2, 3], [4, 0, 6], [7, 8, 0]], ref) == Equality("bfloat16", "t", 3, 1, 1)
    assert compare_tokens("bfloat16", "t", [[1, 2, 3], [4, 5], [7, 8, 9]], ref).first_divergence == 2  # stopped early


def test_tables() -> None:
    eq = format_equality([Equality("float32", "triton + CUDA graphs", 16, 16, None),
                          Equality("bfloat16", "triton, no graphs", 16, 11, 5)])
    assert eq.splitlines()[2] == "| float32 | triton + CUDA graphs | 16 | 16/16 | - |"
    assert eq.splitlines()[3] == "| bfloat16 | triton, no graphs | 16 | 11/16 | token 5 |"
    row = format_throughput([Throughput("distinct", 4000, 20000.0, 10000.0, 8000.0, 5000.0, 60, 64)]).splitlines()[2]
    assert row == "| distinct | 4000 | 20000 | 10000 | 8000 | 5000 | 4.00x | 2.00x | 2.50x | 60/64 |"


def test_only_workloads_the_bench_defines() -> None:
    assert gpu_check.available_workloads(("shared-prefix", "no-such", "distinct")) == ["shared-prefix", "distinct"]


def test_repeat_must_be_positive() -> None:
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--repeat", "0"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU this would run the whole check")
def test_refuses_in_one_line_without_a_gpu(capsys) -> None:
    assert gpu_check.main([]) == 1
    err = capsys.readouterr().err
    assert err == "error: the GPU check needs a CUDA GPU visible to PyTorch; run it on a machine with one\n"


def test_the_whole_check_runs_on_the_cpu_with_small_stand_ins(monkeypatch, capsys) -> None:
    """Every step of the check, on the CPU: the small model, the small workloads, and the
    reference backend standing in for the triton kernel (so "equality" must be exact)."""
    from workers.bench.model_setup import SMALL_SHAPE

    monkeypatch.setattr(gpu_check, "DEVICE", "cpu")
    monkeypatch.setattr(gpu_check, "SCALE", "small")
    monkeypatch.setattr(gpu_check, "KERNEL_BACKEND", "reference")
    monkeypatch.setattr(gpu_check, "GPU_SHAPE", SMALL_SHAPE)
    monkeypatch.setattr(gpu_check, "NUM_KV_BLOCKS", 512)
    for name, value in (("EQUALITY_PROMPTS", 2), ("EQUALITY_LONGEST", 40), ("EQUALITY_NEW_TOKENS", 4),
                        ("EQUALITY_DTYPES", ("float32",))):
        monkeypatch.setattr(gpu_check, name, value)
    assert gpu_check.main(["--repeat", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2:4] == ["| float32 | reference + CUDA graphs | 4 | 4/4 | - |", "| float32 | reference, no graphs | 4 | 4/4 | - |"]
    rows = [line.split(" | ")[0].removeprefix("| ") for line in out[4:] if line.startswith("| ") and "---" not in line]
    assert rows == ["workload"] + gpu_check.available_workloads(gpu_check.THROUGHPUT_WORKLOADS)
