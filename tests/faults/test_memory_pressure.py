"""More concurrent work than the KV pool holds, through the whole pipeline: a pool of 256 blocks
(4,096 tokens, the least that fits one sequence of the tiny model's context), three chunks of two
1,500-token prompts running at once on one worker, prefilled 512 tokens a step so that several are
admitted before any is whole. The scheduler preempts and recomputes instead
of failing, every line completes with the text of a run with a large pool, and a prompt longer
than the model's context fails alone, saying how long it is and what the model accepts."""

from __future__ import annotations

import json

import pytest

from workers import EngineConfig, LLMEngine, SamplingParams

from line_outcomes import COMPLETED, error_messages, line_outcomes

SMALL_POOL = 256 * 32 * 1024  # 256 blocks of 32 KiB (tiny model, block size 16, float32)
STEP_TOKENS = 512
LONG = [{"custom_id": f"long-{i}", "text": f"{i} " + f"memory pressure story {i} " * 64, "max_tokens": 8,
         "temperature": 0} for i in range(6)]
TOO_LONG = {"custom_id": "too-long", "text": "a" * 5000, "max_tokens": 4}  # 5,001 byte tokens


def _texts(path) -> dict[str, str]:
    return {x["custom_id"]: x["response"]["body"]["choices"][0]["text"]
            for x in map(json.loads, path.read_text().splitlines())}


def test_this_pool_is_too_small_for_the_work_at_once() -> None:
    """The premise, on an engine built from the same settings: all six prompts at once preempt."""
    engine = LLMEngine(EngineConfig(dtype="float32", kv_cache_memory_bytes=SMALL_POOL, max_num_batched_tokens=STEP_TOKENS))
    assert engine.kv_manager.pool.num_blocks == 256
    engine.generate([line["text"] for line in LONG], SamplingParams(max_tokens=8))
    assert engine.stats()["num_preemptions"] > 0


@pytest.mark.workers
def test_memory_pressure_preempts_and_every_line_matches_a_large_pool(services) -> None:
    s = services(PIPELINE_KV_CACHE_MEMORY_BYTES=str(SMALL_POOL), PIPELINE_MAX_NUM_BATCHED_TOKENS=str(STEP_TOKENS))
    lines = [*LONG[:3], TOO_LONG, *LONG[3:]]
    ids = [line["custom_id"] for line in lines]
    (s.cwd / "in.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    s.start_worker("w1", concurrency=3)
    job_id = s.submit(s.cwd / "in.jsonl")

    s.wait(lambda: '"status": "completed"' in s.cli("status", job_id, "--json").stdout, "the job completed")
    assert line_outcomes(s, job_id, ids) == {**{i: COMPLETED for i in ids}, "too-long": "prompt_too_long"}
    assert error_messages(s, job_id)["too-long"].startswith("prompt has 5001 tokens, the model accepts 4095")
    reference = s.run_embedded(s.cwd / "in.jsonl", PIPELINE_KV_CACHE_MEMORY_BYTES=str(64 * SMALL_POOL),
                               PIPELINE_MAX_NUM_BATCHED_TOKENS="2048")
    assert _texts(s.cwd / f"{job_id}.jsonl") == _texts(reference)
