"""Attention backends behind one seam: each owns its KV layout (`make_cache`) and turns a step's
`AttentionMetadata` into a step object whose `attend(layer, q, k, v)` every layer calls.

- `reference`: gathers blocks and attends with matmuls or SDPA; the one others are tested against.
- `cpu`: C++ kernels reading blocks in place (needs a C++ compiler, found at first use).
- `triton`: Triton kernels for CUDA GPUs (also run on the CPU by Triton's interpreter in tests).
"""

from __future__ import annotations

import warnings

import torch

from workers.attention.metadata import AttentionMetadata
from workers.attention.reference import ReferenceBackend
from workers.config import ATTENTION_BACKENDS


def make_backend(name: str, device: torch.device, num_heads: int, num_kv_heads: int, head_dim: int):
    """The backend `name` for `device`; "auto" picks the fastest one that can run there."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend={name!r} is unknown; use one of {', '.join(ATTENTION_BACKENDS)}")
    if name == "reference":
        return ReferenceBackend(num_heads, num_kv_heads, head_dim)
    if name == "triton" or (name == "auto" and device.type == "cuda"):
        from workers.attention.triton_backend import TritonBackend, triton_available

        if triton_available():
            return TritonBackend(num_heads, num_kv_heads, head_dim)
        if name == "triton":
            raise ValueError("attention_backend='triton' needs a CUDA GPU and the triton package (pip install triton)")
        warnings.warn("triton is not installed: the engine uses the slower reference attention backend",
                      RuntimeWarning, stacklevel=2)
        return ReferenceBackend(num_heads, num_kv_heads, head_dim)
    if device.type != "cpu":
        if name == "cpu":
            raise ValueError(f"attention_backend='cpu' runs on the CPU; device is {device}")
        return ReferenceBackend(num_heads, num_kv_heads, head_dim)
    from workers.attention.cpu_backend import CpuBackend
    from workers.native_kernels import load_cpu_kernels

    library = load_cpu_kernels()  # warns once when it cannot be built
    if library is None:
        if name == "cpu":
            raise ValueError("attention_backend='cpu' needs a C++ compiler (g++, or set CXX) to build its kernels; "
                             "install one or use attention_backend='auto'")
        return ReferenceBackend(num_heads, num_kv_heads, head_dim)
    return CpuBackend(num_heads, num_kv_heads, head_dim, library)


__all__ = ["ATTENTION_BACKENDS", "AttentionMetadata", "make_backend"]
