"""`scrub_kv_cache`: after a failed step, no garbage left in the pool reaches later requests."""

from __future__ import annotations

import pytest

from workers import EngineConfig, LLMEngine, SamplingParams

GREEDY = SamplingParams(max_tokens=8, temperature=0)


def test_nan_left_in_free_blocks_corrupts_later_requests_until_scrubbed():
    reference = LLMEngine(EngineConfig(dtype="float32", num_kv_blocks=32)).generate(["hello there"], GREEDY)[0].token_ids
    # The reference backend reads whole blocks, masked slots too (the CPU kernels skip them).
    engine = LLMEngine(EngineConfig(dtype="float32", attention_backend="reference", num_kv_blocks=32))
    engine.generate(["hello there"], GREEDY)  # a cached prefix the scrub must drop with the NaN
    # What a poisoned step leaves behind: NaN in slots a new request does not overwrite but reads
    # (masked, with weight 0: 0 x NaN is NaN), and a cached prefix whose contents are now NaN.
    engine.kv_cache.kv.fill_(float("nan"))
    with pytest.raises(RuntimeError, match="inf or NaN"):  # the hazard is real: the sampler refuses NaN logits
        engine.generate(["hello there"], GREEDY)
    for seq in list(engine.scheduler.running) + list(engine.scheduler.waiting):  # as the engine loop aborts them
        engine.abort_request(seq.request_id)
    engine.kv_cache.kv.fill_(float("nan"))
    engine.scrub_kv_cache()
    out = engine.generate(["hello there"], GREEDY)[0]
    assert out.token_ids == reference
    assert out.num_cached_tokens == 0  # the NaN prefix was not served from the cache
    assert engine.stats()["num_cached_blocks"] > 0  # and caching goes on afterwards


def test_scrub_refuses_while_a_request_holds_blocks():
    engine = LLMEngine(EngineConfig(dtype="float32", num_kv_blocks=32))
    engine.add_request("hello", GREEDY)
    engine.step()
    with pytest.raises(RuntimeError, match="every request finished or aborted first"):
        engine.scrub_kv_cache()
