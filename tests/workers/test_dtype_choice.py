"""dtype="auto": bfloat16 only where the device computes it natively."""

from __future__ import annotations

import torch

from workers import EngineConfig, LLMEngine
from workers.dtype_choice import CPU_BF16_FLAGS, cpu_flags, has_native_bf16, resolve_dtype


def test_explicit_dtypes_are_kept() -> None:
    for dtype in ("float32", "bfloat16", "float16"):
        assert resolve_dtype(dtype, torch.device("cpu")) == dtype


def test_auto_follows_the_cpus_bf16_instructions() -> None:
    native = bool(cpu_flags() & set(CPU_BF16_FLAGS))
    assert has_native_bf16(torch.device("cpu")) is native
    assert resolve_dtype("auto", torch.device("cpu")) == ("bfloat16" if native else "float32")


def test_the_engine_resolves_auto_and_reports_it() -> None:
    engine = LLMEngine(EngineConfig(num_kv_blocks=8))
    expected = resolve_dtype("auto", torch.device("cpu"))
    assert engine.stats()["dtype"] == expected
    assert engine.kv_cache.kv.dtype == getattr(torch, expected)
    assert engine.config.dtype == "auto"  # the config keeps what was asked
