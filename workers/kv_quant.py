"""Quantized KV storage: one scale per token and KV head (absmax over head_dim)."""

from __future__ import annotations

import torch

# Largest magnitude each storage type holds; the scale maps a head's absmax onto it.
_QMAX = {"int8": 127.0, "fp8": 448.0}  # fp8 = float8_e4m3fn
_VALUES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
# fp8 is kept as its raw bytes: index_copy_ has no float8 kernel, and a view costs nothing.
_STORAGE = {"int8": torch.int8, "fp8": torch.uint8}


def storage_dtype(kind: str) -> torch.dtype:
    return _STORAGE[kind]


def to_storage(values: torch.Tensor, kind: str) -> torch.Tensor:
    return values.view(_STORAGE[kind])


def from_storage(raw: torch.Tensor, kind: str) -> torch.Tensor:
    return raw.view(_VALUES[kind])


def quantize(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (values [..., D] in the storage type, scales [...] float32)."""
    x = x.float()
    scale = x.abs().amax(dim=-1).clamp(min=1e-8) / _QMAX[kind]
    scaled = x / scale.unsqueeze(-1)
    if kind == "int8":
        return scaled.round_().clamp_(-127, 127).to(torch.int8), scale
    return scaled.to(torch.float8_e4m3fn), scale


def dequantize(values: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (values.to(torch.float32) * scale.unsqueeze(-1)).to(dtype)
