"""What the engine charges each request (its share of the steps it ran in) and what step callbacks see."""

from __future__ import annotations

import pytest

from workers import EngineConfig, LLMEngine, SamplingParams
from workers.engine import StepReport


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return LLMEngine(EngineConfig(dtype="float32", num_kv_blocks=256, max_model_len=200))


def test_shares_of_engine_time_add_up_to_the_busy_time(engine: LLMEngine) -> None:
    busy = engine.counters.busy_seconds
    reports: list[StepReport] = []
    engine.add_step_callback(reports.append)
    try:
        outputs = engine.generate(["a short one", "a somewhat longer prompt here", "x" * 90],
                                  [SamplingParams(max_tokens=n, ignore_eos=True) for n in (3, 9, 5)])
    finally:
        engine.remove_step_callback(reports.append)
    spent = engine.counters.busy_seconds - busy
    shares = [o.metrics.engine_seconds for o in outputs]
    assert all(s > 0 for s in shares)
    # Each step's time is split, not copied: the shares sum to the steps' time, counted once.
    assert sum(shares) == pytest.approx(spent, rel=1e-6, abs=1e-6)
    assert sum(r.seconds for r in reports) == pytest.approx(spent, rel=1e-6, abs=1e-6)


def test_a_request_alone_is_charged_every_step_it_ran(engine: LLMEngine) -> None:
    reports: list[StepReport] = []
    engine.add_step_callback(reports.append)
    try:
        [out] = engine.generate(["alone"], SamplingParams(max_tokens=7, ignore_eos=True))
    finally:
        engine.remove_step_callback(reports.append)
    assert len(reports) == 7  # one prefill step sampling the first token, then six decodes
    assert out.metrics.engine_seconds == pytest.approx(sum(r.seconds for r in reports), rel=1e-9)


def test_step_callback_sees_every_token_as_it_is_sampled(engine: LLMEngine) -> None:
    streamed: dict[str, list[int]] = {}
    finished: list[str] = []

    def collect(report: StepReport) -> None:
        for request_id, token in report.sampled.items():
            streamed.setdefault(request_id, []).append(token)
        finished.extend(o.request_id for o in report.finished)

    engine.add_step_callback(collect)
    try:
        outputs = engine.generate(["one", "two prompts"], SamplingParams(max_tokens=6, ignore_eos=True))
    finally:
        engine.remove_step_callback(collect)
    assert {o.request_id: o.token_ids for o in outputs} == streamed
    assert sorted(finished) == sorted(o.request_id for o in outputs)


def test_timings_are_ordered(engine: LLMEngine) -> None:
    out = engine.generate(["timings"], SamplingParams(max_tokens=4, ignore_eos=True))[0]
    m = out.metrics
    assert m.queue_time is not None and m.ttft is not None
    assert 0 <= m.queue_time <= m.ttft <= m.latency
