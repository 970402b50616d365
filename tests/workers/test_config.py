"""EngineConfig: every bad value is a ValueError that names its field."""

from __future__ import annotations

import dataclasses

import pytest

from workers.config import EVICTION_POLICIES, KV_CACHE_DTYPES, SUPPORTED_DTYPES, EngineConfig

BAD = [
    ("model", ""),
    *(("device", v) for v in ("gpu", "CUDA", "cuda:", "cuda:x", "cuda:0:1", "cuda:-1", "cuda:²", "", "mps", "cpu:0")),
    *(("dtype", v) for v in ("fp16", "float64", "int8", "Auto", "")),
    ("attention_backend", "flash"),
    *(("cuda_graphs", v) for v in (1, "yes", None)),
    *(("kv_cache_dtype", v) for v in ("int4", "float16", "")),
    *(("eviction_policy", v) for v in ("arc", "LRU", "mru", "")),
    *(("block_size", v) for v in (0, -16, 257, 1024)),
    *(("num_kv_blocks", v) for v in (1, 0, -5)),
    *(("kv_cache_memory_bytes", v) for v in (0, -1)),
    *(("gpu_memory_utilization", v) for v in (0.0, -0.5, 1.01, float("nan"))),
    *(("max_num_seqs", v) for v in (0, -1)),
    *(("max_num_batched_tokens", v) for v in (15, 0, -1)),
    *(("max_model_len", v) for v in (1, 0, -1)),
    *(("seed", v) for v in (-1, 2**63, 1.5, "0", None, True)),
    *(("chat_template_timeout_s", v) for v in (0, -1.0, 3601, float("nan"), "10", None, True)),
    *(("max_pinned_fraction", v) for v in (-0.1, 1.0, float("nan"), "0.5", None, True)),
]


@pytest.mark.parametrize(("field", "value"), BAD, ids=[f"{f}={v!r}" for f, v in BAD])
def test_bad_value_names_its_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        EngineConfig(**{field: value})


def test_fp8_kv_cache_is_refused_on_the_cpu() -> None:
    with pytest.raises(ValueError, match=r"^kv_cache_dtype='fp8' needs a CUDA GPU"):
        EngineConfig(kv_cache_dtype="fp8")


def test_budget_below_block_size_names_both_fields() -> None:
    with pytest.raises(ValueError, match=r"^max_num_batched_tokens=31 must be at least block_size=32$"):
        EngineConfig(block_size=32, max_num_batched_tokens=31)


def test_defaults() -> None:
    c = EngineConfig()
    assert dataclasses.asdict(c) == dict(
        model="tiny", device="cpu", dtype="auto", block_size=16, num_kv_blocks=None, kv_cache_memory_bytes=None,
        gpu_memory_utilization=0.9, enable_prefix_caching=True, eviction_policy="lru", max_pinned_fraction=0.5, kv_cache_dtype="auto",
        attention_backend="auto", cuda_graphs=True,
        max_num_seqs=256, max_num_batched_tokens=2048, max_model_len=None, seed=0, cpu_threads=None,
        chat_template_timeout_s=10.0,
    )


GOOD = [
    *(dict(device=d) for d in ("cpu", "cuda", "cuda:0", "cuda:12")),
    *(dict(dtype=d) for d in SUPPORTED_DTYPES),
    *(dict(kv_cache_dtype=d) for d in KV_CACHE_DTYPES if d != "fp8"),
    dict(kv_cache_dtype="fp8", device="cuda:1"),
    *(dict(eviction_policy=p) for p in EVICTION_POLICIES),
    dict(block_size=1, max_num_batched_tokens=1),
    dict(block_size=256, max_num_batched_tokens=256),
    dict(num_kv_blocks=2),
    dict(kv_cache_memory_bytes=1),
    dict(gpu_memory_utilization=1.0),
    dict(max_num_seqs=1),
    dict(max_model_len=2),
    dict(cpu_threads=1),
    dict(model="/models/llama", seed=2**63 - 1, enable_prefix_caching=False),
]


@pytest.mark.parametrize("kwargs", GOOD, ids=[str(k) for k in GOOD])
def test_edge_values_are_accepted(kwargs: dict) -> None:
    c = EngineConfig(**kwargs)
    assert {f: getattr(c, f) for f in kwargs} == kwargs


def test_frozen() -> None:
    c = EngineConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.block_size = 32  # type: ignore[misc]


@pytest.mark.parametrize("value", [0, -2, True, 1.5, "4"])
def test_cpu_threads_must_be_a_positive_integer(value: object) -> None:
    with pytest.raises(ValueError, match=r"cpu_threads=.* must be a positive integer, or None for one per core"):
        EngineConfig(cpu_threads=value)  # type: ignore[arg-type]


def test_cpu_threads_sets_the_process_pool() -> None:
    import torch

    from workers import LLMEngine

    before = torch.get_num_threads()
    try:
        LLMEngine(EngineConfig(num_kv_blocks=8, cpu_threads=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
