"""The batched sampler: per-row filters, per-row generators, no dependence on the batch."""

from __future__ import annotations

import torch

from workers.layers.sampler import filtered_probs, sample
from workers.sampling import SamplingParams

LOGITS = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0], [0.0, 3.0, 2.9, 1.0, -2.0], [1.0, 1.0, 1.0, 1.0, 1.0]])


def _gens(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_each_row_keeps_its_own_filters() -> None:
    params = [SamplingParams(temperature=1.0, top_k=2), SamplingParams(temperature=1.0, top_p=0.5),
              SamplingParams(temperature=2.0)]
    probs = filtered_probs(LOGITS, params)
    assert (probs[0, 2:] == 0).all() and (probs[0, :2] > 0).all()  # top-2 of row 0
    # Row 1: token 1 alone holds less than half the mass, so token 2 joins it; the rest is dropped.
    assert (probs[1, [0, 3, 4]] == 0).all() and (probs[1, [1, 2]] > 0).all()
    torch.testing.assert_close(probs[2], torch.full((5,), 0.2))  # flat row, unfiltered
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))


def test_a_seeded_row_draws_the_same_token_whatever_shares_the_batch() -> None:
    seeded = SamplingParams(temperature=1.0, seed=5)
    alone = sample(LOGITS[2:], [seeded], _gens(5))[0]
    for _ in range(3):
        batch = sample(LOGITS, [SamplingParams(temperature=0.7), SamplingParams(), seeded], _gens(1, 2, 5))
        assert batch[2] == alone
        assert batch[1] == 1  # greedy row: the argmax


def test_draws_follow_the_filtered_distribution() -> None:
    params = [SamplingParams(temperature=1.0, top_k=3)] * 4000
    gen = torch.Generator().manual_seed(0)
    tokens = sample(LOGITS[:1].expand(4000, -1), params, [gen] * 4000)
    counts = torch.bincount(torch.tensor(tokens), minlength=5).float() / 4000
    expected = torch.softmax(torch.tensor([2.0, 1.0, 0.5]), -1)
    assert counts[3:].sum() == 0
    torch.testing.assert_close(counts[:3], expected, atol=0.03, rtol=0)


def test_non_finite_logits_raise_instead_of_drawing_garbage() -> None:
    import pytest

    logits = LOGITS.clone()
    logits[1, 2] = float("nan")
    with pytest.raises(RuntimeError, match=r"logits of rows \[1\] hold inf or NaN"):
        sample(logits, [SamplingParams()] * 3, _gens(0, 1, 2))
    logits[1, 2], logits[0, 0], logits[0, 1] = 1.0, float("inf"), float("-inf")  # inf - inf: a NaN sum
    with pytest.raises(RuntimeError, match=r"logits of rows \[0\] hold inf or NaN"):
        sample(logits, [SamplingParams()] * 3, _gens(0, 1, 2))


def test_finite_logits_whose_sum_overflows_still_sample() -> None:
    logits = torch.full((1, 4), 3e38)
    logits[0, 2] = 3.3e38
    assert sample(logits, [SamplingParams(temperature=0.0)], _gens(0)) == [2]
