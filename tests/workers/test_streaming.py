"""`TokenStream`: the text of a request handed out piece by piece as its tokens are sampled."""

from __future__ import annotations

import pytest

from workers import EngineConfig, LLMEngine, SamplingParams
from workers.streaming import TokenStream


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return LLMEngine(EngineConfig(dtype="float32", num_kv_blocks=128, max_model_len=200))


def test_pieces_add_up_to_the_final_text_and_arrive_during_the_run(engine: LLMEngine) -> None:
    pieces: list[tuple[int, str]] = []  # (steps run before the piece, piece)
    steps = 0
    request_id = engine.add_request("Stream me", SamplingParams(max_tokens=24, ignore_eos=True))
    stream = TokenStream(engine, request_id, lambda piece: pieces.append((steps, piece)))
    engine.add_step_callback(stream)
    try:
        final = None
        while final is None:
            for output in engine.step():
                final = output
            steps += 1
    finally:
        engine.remove_step_callback(stream)
    assert "".join(p for _, p in pieces) == final.text
    assert len({s for s, _ in pieces}) > 1  # handed out over several steps, not at the end
    assert all("\ufffd" not in p for _, p in pieces) or "\ufffd" in final.text


def test_a_character_split_over_tokens_is_held_back_until_complete(engine: LLMEngine) -> None:
    # The tiny model's byte tokenizer: "é" is two byte tokens; a stream must never emit half of it.
    ids = engine.tokenizer.encode("é", add_special_tokens=False)
    assert len(ids) == 2
    pieces: list[str] = []
    stream = TokenStream(engine, "r", pieces.append)
    from workers.engine import StepReport

    stream(StepReport(0.0, 1, {"r": ids[0]}, []))
    assert pieces == []
    stream(StepReport(0.0, 1, {"r": ids[1]}, []))
    assert pieces == ["é"]
