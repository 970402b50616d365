"""Sessions through `submit_file` and `execute_chunk` with the tiny model (byte tokenizer, block
size 16), on SQLite and PostgreSQL: turns run in order, each prompt is the session's history plus
the turn, the prefix cache serves the earlier turns, and the history outlives chunks and jobs."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from db.migrate import upgrade
from db.models import Request
from db.repository import DEFAULT_TENANT, get_session, get_tenant
from db.session import make_engine, session_factory
from jobs.engine_host import get_engine_loop
from jobs.execution import execute_chunk
from pipeline.settings import Settings
from pipeline.submit import submit_file
from workers.tokenizer import ByteTokenizer

BLOCK_SIZE = 16  # the tiny model's default KV block size
TOK = ByteTokenizer()
CHAT_1 = [{"role": "user", "content": "Hello there, how are you today? Tell me a story."}]
CHAT_2 = [{"role": "user", "content": "And then?"}]
TEXT_1 = "Once upon a time, in a land far away, there lived a"
TEXT_2 = " And so"
LINES = [
    {"custom_id": "a1", "session_id": "chat", "messages": CHAT_1, "max_tokens": 8, "temperature": 0},
    {"custom_id": "solo", "text": "no session here", "max_tokens": 4, "temperature": 0},
    {"custom_id": "b1", "session_id": "text", "text": TEXT_1, "max_tokens": 8, "temperature": 0},
    {"custom_id": "a2", "session_id": "chat", "messages": CHAT_2, "max_tokens": 8, "temperature": 0},
    {"custom_id": "b2", "session_id": "text", "text": TEXT_2, "max_tokens": 8, "temperature": 0},
]


@pytest.fixture(params=["sqlite", "postgresql"])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    url = f"sqlite:///{tmp_path / 'jobs.sqlite3'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    upgrade(url)
    return Settings(database_url=url, chunk_size=10)


@pytest.fixture
def loop(settings: Settings):
    """The process's shared engine loop with an empty prefix cache (other tests, and the other
    database's run of this one, leave blocks that would add hits). The loop is idle here, so
    touching its engine from this thread is safe."""
    shared = get_engine_loop(settings)
    shared.engine.reset_prefix_cache()
    return shared


class EngineSpy:
    """Wraps the shared loop's `generate`: records each call's prompts (token ids) and outputs."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, loop, on_call=None) -> None:
        self.calls: list[tuple[list[list[int]], list]] = []
        self._generate = loop.generate
        self._on_call = on_call
        monkeypatch.setattr(loop, "generate", self)

    def __call__(self, prompts, params, cache_salt=None):
        if self._on_call is not None:
            on_call, self._on_call = self._on_call, None  # once: the nested run goes straight through
            on_call()
        outputs = self._generate(prompts, params, cache_salt)
        self.calls.append((list(prompts), outputs))
        return outputs


def _submit(settings: Settings, factory, path: Path, lines: list[dict]) -> tuple[str, list[int]]:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    sent: list[int] = []
    summary = submit_file(settings, factory, path, send_chunk=lambda chunk_id, queue: sent.append(chunk_id))
    return summary["id"], sent


def _session(session, session_id: str):
    """The conversation `session_id` of the tenant `submit_file` ran the jobs as (its default)."""
    return get_session(session, session_id, tenant_id=get_tenant(session, DEFAULT_TENANT).id)


def _rows(factory, job_id: str) -> dict[str, Request]:
    with factory() as session:
        return {r.custom_id: r for r in session.scalars(select(Request).where(Request.job_id == job_id))}


def _expected_cached(previous_prompt: list[int], previous_output, prompt: list[int]) -> int:
    # The earlier turn left its prompt and all but its last generated token in full cached blocks
    # (the last sampled token is never fed back); the hit is the common prefix, in whole blocks, at
    # most len(prompt) - 1 tokens (the last prompt token is always computed).
    seen = previous_prompt + previous_output.token_ids[:-1]
    common = 0
    while common < min(len(seen), len(prompt)) and seen[common] == prompt[common]:
        common += 1
    return min(common, len(prompt) - 1) // BLOCK_SIZE * BLOCK_SIZE


def test_turns_run_in_order_on_the_history_and_reuse_its_kv(
    settings: Settings, loop, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    factory = session_factory(make_engine(settings.database_url))
    job_id, sent = _submit(settings, factory, tmp_path / "in.jsonl", LINES)
    assert len(sent) == 1
    spy = EngineSpy(monkeypatch, loop)

    execute_chunk(factory, loop, sent[0], "w1")

    rows = _rows(factory, job_id)
    a1, b1, a2, b2 = (rows[c].text for c in ("a1", "b1", "a2", "b2"))
    # Call 1: the session-less request and every session's first turn; call 2: the second turns.
    [(prompts_1, outputs_1), (prompts_2, outputs_2)] = spy.calls
    assert prompts_1 == [TOK.encode("no session here"), TOK.encode_chat(CHAT_1), TOK.encode(TEXT_1)]
    chat_history = [*CHAT_1, {"role": "assistant", "content": a1}]
    assert prompts_2 == [TOK.encode_chat([*chat_history, *CHAT_2]), TOK.encode(TEXT_1 + b1 + TEXT_2)]

    # Turn 2's prompt = turn 1's prompt + its answer + turn 2 under the template ("<|role|>\n...\n").
    turn_1 = 1 + len(f"<|user|>\n{CHAT_1[0]['content']}\n<|assistant|>\n".encode())
    assert rows["a1"].prompt_tokens == turn_1
    assert rows["a2"].prompt_tokens == turn_1 + len(f"{a1}\n<|user|>\n{CHAT_2[0]['content']}\n<|assistant|>\n".encode())
    assert rows["b2"].prompt_tokens == 1 + len((TEXT_1 + b1 + TEXT_2).encode())

    # The prefix cache serves turn 1's blocks to turn 2: at least its prompt's whole blocks.
    assert rows["a2"].cached_tokens == _expected_cached(prompts_1[1], outputs_1[1], prompts_2[0])
    assert rows["b2"].cached_tokens == _expected_cached(prompts_1[2], outputs_1[2], prompts_2[1])
    assert rows["a2"].cached_tokens >= turn_1 // BLOCK_SIZE * BLOCK_SIZE == 64
    assert rows["b2"].cached_tokens >= (1 + len(TEXT_1)) // BLOCK_SIZE * BLOCK_SIZE == 48
    assert [o.num_cached_tokens for o in outputs_2] == [rows["a2"].cached_tokens, rows["b2"].cached_tokens]

    with factory() as session:
        chat, text = _session(session, "chat"), _session(session, "text")
        assert (chat.turns, chat.job_id) == (2, job_id)
        assert chat.history == [*chat_history, *CHAT_2, {"role": "assistant", "content": a2}]
        assert text.turns == 2
        assert text.history == [{"role": "user", "content": TEXT_1}, {"role": "assistant", "content": b1},
                                {"role": "user", "content": TEXT_2}, {"role": "assistant", "content": b2}]


def test_history_carries_over_to_a_later_job(settings: Settings, loop, tmp_path: Path, monkeypatch) -> None:
    factory = session_factory(make_engine(settings.database_url))
    first_job, sent = _submit(settings, factory, tmp_path / "one.jsonl", LINES[:1])
    execute_chunk(factory, loop, sent[0], "w1")
    a1 = _rows(factory, first_job)["a1"].text

    third = [{"role": "user", "content": "Again?"}]
    second_job, sent = _submit(settings, factory, tmp_path / "two.jsonl", [
        {"custom_id": "a3", "session_id": "chat", "messages": third, "max_tokens": 4, "temperature": 0}])
    spy = EngineSpy(monkeypatch, loop)
    execute_chunk(factory, loop, sent[0], "w1")

    history = [*CHAT_1, {"role": "assistant", "content": a1}]
    [([prompt], _)] = spy.calls
    assert prompt == TOK.encode_chat([*history, *third])
    a3 = _rows(factory, second_job)["a3"]
    assert a3.prompt_tokens == len(prompt) and a3.cached_tokens >= 64
    with factory() as session:
        record = _session(session, "chat")
        assert (record.turns, record.job_id) == (2, second_job)
        assert record.history == [*history, *third, {"role": "assistant", "content": a3.text}]


def test_a_redelivered_chunk_appends_no_turn_twice(settings: Settings, loop, tmp_path: Path, monkeypatch) -> None:
    # The first run's lease runs out while it generates; a second worker takes the chunk over and
    # finishes it. The first run then writes nothing, so it appends nothing to the session either.
    factory = session_factory(make_engine(settings.database_url))
    job_id, sent = _submit(settings, factory, tmp_path / "in.jsonl", [LINES[0], LINES[3]])
    blink = timedelta(microseconds=1)
    spy = EngineSpy(monkeypatch, loop, on_call=lambda: execute_chunk(factory, loop, sent[0], "w2", lease=blink))

    execute_chunk(factory, loop, sent[0], "w1", lease=blink)

    assert len(spy.calls) == 4  # both runs ran both turns
    rows = _rows(factory, job_id)
    with factory() as session:
        record = _session(session, "chat")
        assert record.turns == 2
        assert record.history == [*CHAT_1, {"role": "assistant", "content": rows["a1"].text},
                                   *CHAT_2, {"role": "assistant", "content": rows["a2"].text}]
