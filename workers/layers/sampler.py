"""Turns the logits of the sequences that need a token into tokens, for the whole batch at once.

Greedy rows take the argmax. The other rows are filtered together (temperature, top-k, and top-p
only for the rows that ask for it, so no full-vocabulary sort when top_p is 1) and each draws one
uniform number from its own generator, turned into a token through the row's cumulative
distribution: a seeded request draws the same tokens whatever shares its batch, and nothing calls
`.item()` per row.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from workers.sampling import SamplingParams
from workers.sequence import Sequence


# logits [N, V] -> (each row's first index of its largest logit, the rows holding inf or NaN).
FirstMax = Callable[[torch.Tensor], tuple[list[int], list[int]]]


class Sampler:
    def __init__(self, default_generator: torch.Generator) -> None:
        self.default_generator = default_generator  # for requests without a seed

    def sample(self, logits: torch.Tensor, seqs: list[Sequence], first_max: FirstMax | None = None) -> list[int]:
        return sample(logits, [s.params for s in seqs], [s.generator or self.default_generator for s in seqs],
                      first_max)


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator],
           first_max: FirstMax | None = None) -> list[int]:
    """logits [N, V] (float32, or the model's dtype) -> N token ids. Raises RuntimeError when a row
    holds inf or NaN (a corrupted weight, say): no token drawn from it would mean anything, and the
    engine loop then finds the request at fault by running each alone. `first_max` finds both in
    one pass (the CPU kernels' fused one); by default, PyTorch and NumPy's."""
    tokens, bad = (first_max or first_max_rows)(logits)
    if bad:
        raise RuntimeError(f"logits of rows {bad} hold inf or NaN; no token can be sampled from them")
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return tokens
    sub_params = [params[i] for i in rows]
    probs = filtered_probs(logits[rows], sub_params)  # [R, V]
    # One draw per row from the row's own generator: u in [0, 1), then the first token whose
    # cumulative probability exceeds u times the row's total mass.
    u = torch.stack([torch.rand((), generator=generators[i], device=logits.device) for i in rows])
    cdf = probs.cumsum(dim=-1)
    drawn = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    drawn = drawn.clamp_(max=logits.shape[-1] - 1).tolist()
    for i, token in zip(rows, drawn):
        tokens[i] = token
    return tokens


def filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """logits [R, V] -> probabilities [R, V] after each row's temperature, top-k and top-p."""
    vocab = logits.shape[-1]
    temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=logits.device)
    logits = logits.float() / temperature.unsqueeze(-1)
    top_k = [p.top_k if p.top_k is not None and p.top_k < vocab else vocab for p in params]
    if min(top_k) < vocab:
        kth_values = torch.topk(logits, max(k for k in top_k if k < vocab), dim=-1).values  # [R, Kmax]
        limited = torch.tensor([k < vocab for k in top_k], device=logits.device)
        index = torch.tensor([min(k, kth_values.shape[-1]) - 1 for k in top_k], device=logits.device)
        kth = kth_values.gather(-1, index.unsqueeze(-1)).squeeze(-1).masked_fill(~limited, float("-inf"))
        logits = logits.masked_fill(logits < kth.unsqueeze(-1), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    nucleus = [i for i, p in enumerate(params) if p.top_p < 1.0]
    if nucleus:
        top_p = torch.tensor([params[i].top_p for i in nucleus], dtype=torch.float32, device=logits.device)
        sorted_probs, order = probs[nucleus].sort(dim=-1, descending=True)
        # Keep the smallest set whose mass reaches top_p: a token is dropped when the mass before it does.
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p.unsqueeze(-1)
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        kept = torch.zeros_like(sorted_probs).scatter_(-1, order, sorted_probs)
        probs[nucleus] = kept / kept.sum(-1, keepdim=True)
    return probs


def first_max_rows(logits: torch.Tensor) -> tuple[list[int], list[int]]:
    """Each row's first index of its largest logit, and the rows that hold inf or NaN."""
    logits = logits.float()
    bad: list[int] = []
    # A row's sum is inf or NaN when the row holds one, and finite logits hardly ever overflow it:
    # one reduction (30x cheaper than isfinite over every logit) and the exact check only then.
    if not torch.isfinite(logits.sum(dim=-1)).all():
        bad = (~torch.isfinite(logits).all(dim=-1)).nonzero().flatten().tolist()
    if logits.device.type == "cpu":
        # NumPy's argmax is about ten times faster than torch's on the CPU (same first-max rule).
        return logits.detach().numpy().argmax(axis=-1).tolist(), bad
    return logits.argmax(dim=-1).tolist(), bad
