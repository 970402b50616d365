"""SamplingParams: every bad value is a ValueError that names its field."""

from __future__ import annotations

import pytest

from workers.sampling import MAX_STOP_STRINGS, MIN_TOP_P, SamplingParams

NAN = float("nan")
INF = float("inf")

BAD = [
    *(("max_tokens", v) for v in (0, -1, 1.5, "16", None, True)),
    *(("temperature", v) for v in (-0.1, 100.5, NAN, INF, -INF, "0.7", None, True)),
    *(("top_p", v) for v in (0, 0.0, -0.5, 1.01, NAN, INF, "1", None, True, 5e-324, 1e-40)),
    *(("top_k", v) for v in (0, -1, 1.5, "5", True, False)),
    *(("seed", v) for v in (-1, 2**63, 1.0, "7", True)),
    *(("stop", v) for v in ("", [""], ["ok", ""], [1], [None], b"x", ["a"] * (MAX_STOP_STRINGS + 1))),
    *(("stop", v) for v in (123, 0, {"a": 1}, {"a"}, b"")),
]


@pytest.mark.parametrize(("field", "value"), BAD, ids=[f"{f}={v!r}"[:40] for f, v in BAD])
def test_bad_value_names_its_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        SamplingParams(**{field: value})


def test_defaults() -> None:
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed, p.stop, p.ignore_eos) == (
        16, 0.0, 1.0, None, None, (), False
    )
    assert p.greedy


GOOD = [
    dict(max_tokens=1),
    dict(temperature=0),
    dict(temperature=100),
    dict(temperature=0.7, top_p=0.9, top_k=50, seed=0),
    dict(top_p=1),
    dict(top_p=MIN_TOP_P),
    dict(top_k=1),
    dict(seed=2**63 - 1),
    dict(stop=["a"] * MAX_STOP_STRINGS),
    dict(stop=[]),
]


@pytest.mark.parametrize("kwargs", GOOD, ids=[str(k)[:40] for k in GOOD])
def test_edge_values_are_accepted(kwargs: dict) -> None:
    p = SamplingParams(**kwargs)
    for field, value in kwargs.items():
        assert getattr(p, field) == (tuple(value) if field == "stop" else value)


@pytest.mark.parametrize(
    ("stop", "expected"), [(None, ()), ("END", ("END",)), (["a", "b"], ("a", "b")), (("x",), ("x",))]
)
def test_stop_is_normalized_to_a_tuple(stop: object, expected: tuple[str, ...]) -> None:
    assert SamplingParams(stop=stop).stop == expected


def test_a_top_p_that_float32_rounds_to_zero_is_refused_saying_why() -> None:
    with pytest.raises(ValueError, match=r"^top_p=5e-324 is 0 in the sampler's float32 arithmetic \(it would keep "
                                         r"no token\); use at least 1.18e-38$"):
        SamplingParams(temperature=0.8, top_p=5e-324)


def test_the_smallest_top_p_samples_the_top_token() -> None:
    import torch

    from workers.layers.sampler import sample

    logits = torch.tensor([[0.5, 3.0, -1.0], [2.0, 1.0, 0.0]])
    params = [SamplingParams(temperature=1.0, top_p=MIN_TOP_P, seed=s) for s in (0, 1)]
    generators = [torch.Generator().manual_seed(s) for s in (0, 1)]
    assert sample(logits, params, generators) == [1, 0]


def test_greedy_at_zero_and_at_temperatures_too_small_to_divide_by() -> None:
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=9.9e-6).greedy
    assert not SamplingParams(temperature=1e-5).greedy


def test_a_tiny_temperature_samples_the_argmax_instead_of_nan() -> None:
    import torch

    from workers.layers.sampler import sample

    logits = torch.tensor([[0.5, 3.0, -1.0], [2.0, 1.0, 0.0]])
    params = [SamplingParams(temperature=1e-300), SamplingParams(temperature=1e-5, seed=0)]
    generators = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)]
    # 1e-300 is greedy; 1e-5 divides to logits 1e5 apart, a one-hot distribution: the argmax too.
    assert sample(logits, params, generators) == [1, 0]


def test_frozen() -> None:
    p = SamplingParams()
    with pytest.raises(AttributeError):
        p.max_tokens = 3  # type: ignore[misc]
