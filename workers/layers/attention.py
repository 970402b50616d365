"""The attention layer: hands q, k and v to the step's attention backend (`workers/attention/`),
which writes k and v into the paged KV cache and attends over each sequence's blocks."""

from __future__ import annotations

from typing import Protocol

import torch


class AttentionStep(Protocol):
    """One step of an attention backend: prepared once, called by every layer."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, H, D]; k, v [T, KVH, D] -> [T, H * D]."""
        ...


class PagedAttention(torch.nn.Module):
    def __init__(self, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: AttentionStep) -> torch.Tensor:
        return step.attend(self.layer_idx, q, k, v)
