"""Turns the logits of the sequences that need a token into tokens."""

from __future__ import annotations

import torch

from workers.sampling import SamplingParams


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> list[int]:
    """logits [N, V] float32 -> N token ids. Greedy rows take the argmax; the others draw from the
    temperature-scaled, top-k and top-p filtered distribution with their own generator, so a seeded
    request draws the same tokens whatever shares its batch."""
    tokens = _argmax(logits)
    for row, (p, gen) in enumerate(zip(params, generators)):
        if p.greedy:
            continue
        probs = filtered_probs(logits[row], p)
        tokens[row] = int(torch.multinomial(probs, 1, generator=gen).item())
    return tokens


def filtered_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """logits [V] -> probabilities [V] after temperature, top-k and top-p."""
    logits = logits.float() / p.temperature
    if p.top_k is not None and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest set whose mass reaches top_p: a token is dropped when the mass before it does.
        drop = sorted_probs.cumsum(-1) - sorted_probs >= p.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        probs = probs / probs.sum()
    return probs


def _argmax(logits: torch.Tensor) -> list[int]:
    if logits.device.type == "cpu":
        # NumPy's argmax is about ten times faster than torch's on the CPU (same first-max rule).
        return logits.detach().numpy().argmax(axis=-1).tolist()
    return logits.argmax(dim=-1).tolist()
