"""Identical deterministic requests of a job are computed once: submit's `dedupe_key`, and
`execute_chunk` giving every duplicate in a chunk the one result (billed as fully cached)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import select

from db.migrate import upgrade
from db.models import Request
from db.repository import get_usage
from db.session import make_engine, session_factory
from jobs.engine_host import get_engine_loop
from jobs.execution import execute_chunk
from pipeline.settings import Settings
from pipeline.submit import submit_file

GREEDY = {"text": "The same question, asked five times", "max_tokens": 6, "temperature": 0}


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    url = f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
    upgrade(url)
    return Settings(database_url=url, chunk_size=20)


def _submit(settings: Settings, tmp_path: Path, lines: list[dict]):
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    factory = session_factory(make_engine(settings.database_url))
    sent: list[int] = []
    summary = submit_file(settings, factory, source, send_chunk=lambda chunk_id, queue: sent.append(chunk_id))
    with factory() as session:
        rows = {r.custom_id: r for r in session.scalars(select(Request).where(Request.job_id == summary["id"]))}
    return factory, summary["id"], sent, rows


def test_submit_keys_only_deterministic_session_less_requests(settings: Settings, tmp_path: Path) -> None:
    _, _, _, rows = _submit(settings, tmp_path, [
        {"custom_id": "g1", **GREEDY},
        {"custom_id": "g2", **GREEDY},
        {"custom_id": "longer", **GREEDY, "max_tokens": 7},
        {"custom_id": "chat", "messages": [{"role": "user", "content": GREEDY["text"]}], "max_tokens": 6,
         "temperature": 0},
        {"custom_id": "seeded1", "text": "x", "max_tokens": 6, "temperature": 0.9, "seed": 1},
        {"custom_id": "seeded2", "text": "x", "max_tokens": 6, "temperature": 0.9, "seed": 1},
        {"custom_id": "seed2", "text": "x", "max_tokens": 6, "temperature": 0.9, "seed": 2},
        {"custom_id": "random", "text": "x", "max_tokens": 6, "temperature": 0.9},
        {"custom_id": "session", **GREEDY, "session_id": "s"},
    ])
    keys = {custom_id: row.dedupe_key for custom_id, row in rows.items()}
    assert keys["g1"] == keys["g2"] and len(keys["g1"]) == 64
    assert keys["seeded1"] == keys["seeded2"]
    distinct = [keys[c] for c in ("g1", "longer", "chat", "seeded1", "seed2")]
    assert None not in distinct and len(set(distinct)) == len(distinct)
    assert keys["random"] is None and keys["session"] is None
    assert len({row.chunk_id for row in rows.values()}) == 1


def test_duplicates_run_once_and_share_the_result(settings: Settings, tmp_path: Path) -> None:
    random = {"text": "Pick at random", "max_tokens": 6, "temperature": 0.8}
    factory, job_id, sent, rows = _submit(settings, tmp_path, [
        *({"custom_id": f"g{i}", **GREEDY} for i in range(5)),
        {"custom_id": "r1", **random},
        {"custom_id": "r2", **random},
    ])
    assert len(sent) == 1  # equal prompts share a prefix key, hence a chunk
    loop = get_engine_loop(settings)
    finished = loop.engine.stats()["num_finished_requests"]

    execute_chunk(factory, loop, sent[0], "w1")

    assert loop.engine.stats()["num_finished_requests"] - finished == 1 + 2  # random duplicates both run
    with factory() as session:
        done = {r.custom_id: r for r in session.scalars(select(Request).where(Request.job_id == job_id))}
        usage = get_usage(session, job_id)
    first, *copies = (done[f"g{i}"] for i in range(5))
    prompt_tokens = 1 + len(GREEDY["text"])  # BOS + bytes
    assert (first.prompt_tokens, first.completion_tokens) == (prompt_tokens, 6)
    for copy in copies:
        assert (copy.text, copy.finish_reason, copy.completion_tokens) == (first.text, first.finish_reason, 6)
        assert copy.prompt_tokens == copy.cached_tokens == prompt_tokens  # billed as fully cached
    assert done["r1"].text is not None and done["r2"].text is not None
    assert usage.prompt_tokens == sum(r.prompt_tokens for r in done.values())
    assert usage.cached_tokens == sum(r.cached_tokens for r in done.values())
    assert usage.cached_tokens >= 4 * prompt_tokens
