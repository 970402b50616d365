"""dtype="auto": bfloat16 where the device computes it natively, float32 elsewhere.

Native means matrix units or instructions for bfloat16: any CUDA GPU that supports it, and CPUs
with AVX512-BF16 or AMX (their bfloat16 matrix products ran about 3x faster than float32 on the
2-core machine we benchmark on). Elsewhere bfloat16 is emulated and slower than float32.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """The dtype the engine computes in: `dtype` itself unless it is "auto"."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if has_native_bf16(device) else "float32"


def has_native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(cpu_flags() & set(CPU_BF16_FLAGS))


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux's /proc/cpuinfo); empty where that cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()
