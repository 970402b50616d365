"""A poison request (one that makes the engine raise) in a chunk, with another chunk's requests
sharing its engine steps on the same worker: the poison line is run again alone, fails alone with
`engine_error` and the engine's traceback in the error history, and every other line completes
with the text it has in a run without the poison line.

The poison is real, not an injected fault: a checkpoint with one corrupted (NaN) row of its
embedding table, as a bad conversion or a flipped bit leaves it. A prompt holding that token gets
NaN logits, and sampling from them raises in the engine. The NaN it leaves in its KV blocks is
zeroed before anything else runs (`LLMEngine.scrub_kv_cache`, tested in tests/workers).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hf_models import save_corrupted_bench_model
from safetensors.torch import load_file

from db.repository import job_errors

from line_outcomes import COMPLETED, error_messages, line_outcomes

CORRUPT_TOKEN = 13  # `w13` in the word-level vocabulary of the benchmark model
# Short innocent prompts and a long poison, so the poison's NaN fills several blocks of the pool.
LINES = [{"custom_id": f"ok-{i}", "text": " ".join(f"w{100 + 7 * i + j}" for j in range(5)), "max_tokens": 6,
          "temperature": 0} for i in range(5)]
POISON = {"custom_id": "poison", "text": " ".join([f"w{CORRUPT_TOKEN}"] + [f"w{200 + j}" for j in range(60)]),
          "max_tokens": 6, "temperature": 0.8, "seed": 1}


@pytest.fixture(scope="module")
def corrupted_model(tmp_path_factory) -> Path:
    return save_corrupted_bench_model(tmp_path_factory.mktemp("corrupted-model"), CORRUPT_TOKEN)


def _texts(path) -> dict[str, str]:
    return {x["custom_id"]: x["response"]["body"]["choices"][0]["text"]
            for x in map(json.loads, path.read_text().splitlines())}


@pytest.mark.workers
def test_a_poison_request_fails_alone_and_its_chunk_and_step_mates_complete(services, corrupted_model) -> None:
    assert torch.isnan(load_file(corrupted_model / "model.safetensors")["model.embed_tokens.weight"]).any()
    s = services(PIPELINE_CHUNK_SIZE="3", PIPELINE_MODEL=str(corrupted_model))
    lines = [LINES[0], POISON, *LINES[1:]]  # chunks [ok-0, poison, ok-1] and [ok-2, ok-3, ok-4]
    ids = [line["custom_id"] for line in lines]
    (s.cwd / "in.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (s.cwd / "clean.jsonl").write_text("".join(json.dumps(line) + "\n" for line in LINES))
    s.start_worker("w1", concurrency=2)  # both chunks at once: their requests share engine steps
    job_id = s.submit(s.cwd / "in.jsonl")

    s.wait(lambda: '"status": "completed"' in s.cli("status", job_id, "--json").stdout, "the job completed")
    assert line_outcomes(s, job_id, ids) == {**{i: COMPLETED for i in ids}, "poison": "engine_error"}
    message = error_messages(s, job_id)["poison"]
    assert message.startswith("the engine failed on this request run alone: RuntimeError: logits of rows")
    with s.factory() as session:
        history = [(e.kind, e.custom_id, e.traceback) for e in job_errors(session, job_id)]
    assert [(kind, custom_id) for kind, custom_id, _ in history] == [("engine", "poison")]
    assert "in sample" in history[0][2]  # the engine's own traceback, for an operator

    # The innocent lines have the text of a run that never saw the poison (embedded, its own SQLite).
    clean = s.run_embedded(s.cwd / "clean.jsonl")
    assert _texts(s.cwd / f"{job_id}.jsonl") == _texts(clean)
