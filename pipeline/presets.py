"""Named bundles of settings overrides, applied under pipeline.toml and the environment.

A preset only tunes the engine and the task shape; it never invents a database or broker URL (give
those in pipeline.toml or as PIPELINE_DATABASE_URL / PIPELINE_BROKER_URL).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

MiB = 2**20


@dataclass(frozen=True, slots=True)
class Preset:
    name: str
    description: str
    overrides: Mapping[str, Any]


def _preset(name: str, description: str, **overrides: Any) -> Preset:
    return Preset(name, description, MappingProxyType(overrides))


PRESETS: Mapping[str, Preset] = MappingProxyType({p.name: p for p in (
    _preset(
        "development",
        "One machine, the built-in tiny model on the CPU, small chunks so a job shows progress at once.",
        model="tiny", device="cpu", dtype="float32", chunk_size=8, max_num_seqs=16,
        max_num_batched_tokens=512, kv_cache_memory_bytes=256 * MiB,
    ),
    _preset(
        "production",
        "GPU workers in bfloat16 with the engine's default batch shape; chunks sized so a redelivery "
        "repeats little work.",
        device="cuda", dtype="bfloat16", chunk_size=128, task_max_redeliveries=3,
    ),
    _preset(
        "high_performance",
        "Throughput on a large GPU: more sequences and tokens per step, big chunks, the adaptive "
        "eviction policy (keeps often-reused prefixes through floods of one-off prompts).",
        device="cuda", dtype="bfloat16", max_num_seqs=512, max_num_batched_tokens=8192, chunk_size=512,
        eviction_policy="adaptive",
    ),
    _preset(
        "memory_efficient",
        "A small GPU or a shared CPU: int8 KV cache (about 2x the blocks of bfloat16, 3.8x float32), "
        "fewer sequences and tokens per step, small chunks.",
        kv_cache_dtype="int8", max_num_seqs=64, max_num_batched_tokens=1024, chunk_size=32,
    ),
    _preset(
        "bulk_processing",
        "Large overnight files: very large chunks (fewer tasks, more prefix sharing within a chunk), "
        "adaptive eviction for the shared system prompts.",
        chunk_size=1024, max_num_batched_tokens=4096, eviction_policy="adaptive",
    ),
)})
