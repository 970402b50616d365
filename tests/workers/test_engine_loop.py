"""Concurrent callers share one engine: same outputs as the engine alone, batched together."""

from __future__ import annotations

import threading

import pytest

from workers import EngineConfig, LLMEngine, SamplingParams
from workers.engine_loop import EngineLoop
from workers.errors import RequestEngineError

PARAMS = SamplingParams(max_tokens=12, ignore_eos=True)


@pytest.fixture()
def loop():
    loop = EngineLoop(lambda: LLMEngine(EngineConfig(dtype="float32", num_kv_blocks=128)))
    yield loop
    loop.close()


def test_threads_share_steps_and_get_the_engine_alone_outputs(loop):
    prompts = [[i, i + 1, i + 2] * (i + 1) for i in range(8)]
    reference = [o.token_ids for o in LLMEngine(EngineConfig(dtype="float32", num_kv_blocks=128)).generate(prompts, PARAMS)]
    results: dict[int, list[int]] = {}
    start = threading.Barrier(4)

    def caller(part: int) -> None:
        mine = list(range(part, 8, 4))
        start.wait()
        outs = loop.generate([prompts[i] for i in mine], [PARAMS] * len(mine))
        results.update({i: o.token_ids for i, o in zip(mine, outs)})

    threads = [threading.Thread(target=caller, args=(p,)) for p in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [results[i] for i in range(8)] == reference
    # 8 requests of 12 tokens each, run one by one, would need 96 steps; batched, far fewer.
    assert loop.engine.stats()["num_steps"] < 40


def test_a_refused_prompt_fails_alone(loop):
    outs = loop.generate([[1, 2, 3], [7] * 5000], [PARAMS, PARAMS])
    assert len(outs[0].token_ids) == 12
    assert isinstance(outs[1], ValueError)
    assert "prompt has 5000 tokens, the model accepts 4095" in str(outs[1])


def test_a_failing_step_runs_its_requests_again_alone(loop, monkeypatch):
    real_step = loop.engine.step
    calls = {"n": 0}

    def broken_once():
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("device lost")
        return real_step()

    reference = loop.submit([5, 6, 7], PARAMS).result(timeout=30).token_ids
    monkeypatch.setattr(loop.engine, "step", broken_once)
    # The step failed once, not because of the request: run again alone, it completes unchanged.
    assert loop.submit([5, 6, 7], PARAMS).result(timeout=30).token_ids == reference
    assert calls["n"] > 1 and not loop.engine.has_unfinished_requests()


CORRUPT_TOKEN = 9


@pytest.fixture(scope="module")
def corrupted_model(tmp_path_factory):
    """A real poison: a checkpoint whose embedding row 9 is NaN (sampling from NaN logits raises)."""
    from hf_models import save_corrupted_bench_model

    return save_corrupted_bench_model(tmp_path_factory.mktemp("corrupted"), CORRUPT_TOKEN)


POISON_PARAMS = SamplingParams(max_tokens=12, temperature=0.8, seed=0, ignore_eos=True)


def test_a_poison_request_fails_alone_and_the_requests_sharing_its_steps_complete(corrupted_model):
    config = EngineConfig(dtype="float32", model=str(corrupted_model), num_kv_blocks=128)
    prompts = [[i + 20, i + 21, i + 22] * (i + 2) for i in range(4)]
    reference = [o.token_ids for o in LLMEngine(config).generate(prompts, PARAMS)]
    loop = EngineLoop(lambda: LLMEngine(config))
    results: dict[int, object] = {}
    start = threading.Barrier(2)

    def caller(part: int) -> None:  # two callers, as two tasks of one worker: their requests share steps
        mine = [part, part + 2]
        start.wait()
        poison = [30, CORRUPT_TOKEN, 31]
        outs = loop.generate([prompts[i] for i in mine] + [poison if part == 0 else [40, 41, 42]],
                             [PARAMS, PARAMS, POISON_PARAMS])
        results.update({i: o for i, o in zip([*mine, f"extra{part}"], outs)})

    threads = [threading.Thread(target=caller, args=(p,)) for p in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [results[i].token_ids for i in range(4)] == reference
    assert len(results["extra1"].token_ids) == 12
    poison = results["extra0"]
    assert isinstance(poison, RequestEngineError)
    assert str(poison).startswith("the engine failed on this request run alone: RuntimeError: logits of rows [0] "
                                  "hold inf or NaN")
    assert "in sample" in poison.traceback
    assert not loop.engine.has_unfinished_requests()
    assert len(loop.submit([5, 6, 7], PARAMS).result(timeout=30).token_ids) == 12  # the loop goes on
    loop.close()


def test_closed_loop_refuses_work():
    loop = EngineLoop(lambda: LLMEngine(EngineConfig(dtype="float32", num_kv_blocks=16)))
    loop.close()
    with pytest.raises(RuntimeError, match="closed"):
        loop.submit([1], PARAMS)


def test_the_loop_thread_builds_the_engine():
    builders: list[str] = []

    def build() -> LLMEngine:
        builders.append(threading.current_thread().name)
        return LLMEngine(EngineConfig(dtype="float32", num_kv_blocks=16))

    loop = EngineLoop(build, name="the-loop")
    loop.close()
    assert builders == ["the-loop"]


def test_a_failed_build_is_raised_by_the_constructor():
    def build() -> LLMEngine:
        raise ValueError("model folder /nowhere has no config.json")

    with pytest.raises(ValueError, match="no config.json"):
        EngineLoop(build)
