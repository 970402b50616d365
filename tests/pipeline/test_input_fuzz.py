"""Property tests: whatever bytes a file holds, `read_requests` raises nothing but InputError, and
every non-blank line yields exactly one RequestSpec or LineError, with its own line number."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.errors import InputError
from pipeline.input_reader import BOM, read_requests
from pipeline.limits import InputLimits
from pipeline.request_spec import LINE_ERROR_CODES, LineError, RequestSpec

# Small limits so that random input reaches them too.
LIMITS = InputLimits(max_line_bytes=200, max_prompt_chars=50, max_messages=3, max_stop_strings=2, max_tokens=100,
                     max_id_chars=10)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
                | st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
SIMPLE_KEYS = ["text", "prompt", "messages", "max_length", "max_tokens", "temperature", "top_p", "seed", "stop",
               "session_id", "priority", "custom_id", "model", "metadata", "temprature"]
BODY_KEYS = ["prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
             "model", "n", "logprobs", "user"]
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", 3]),
                                 "content": st.text(max_size=20) | json_values})
field_values = (json_values | st.lists(message, max_size=4) | st.sampled_from(["high", "/v1/completions", "POST", ""])
                | st.integers(0, 120) | st.floats(0, 2.5))
simple_lines = st.dictionaries(st.sampled_from(SIMPLE_KEYS), field_values, max_size=6)
openai_lines = st.fixed_dictionaries(
    {"url": st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/embeddings"])},
    optional={"custom_id": st.text(max_size=4) | st.integers(), "method": st.sampled_from(["POST", "GET"]),
              "body": st.dictionaries(st.sampled_from(BODY_KEYS), field_values, max_size=5) | json_values},
)
object_lines = (simple_lines | openai_lines).map(lambda obj: json.dumps(obj).encode())
raw_lines = st.binary(max_size=40).map(lambda b: b.replace(b"\n", b""))
blank_lines = st.sampled_from([b"", b" ", b"\t \r", BOM, BOM + b"  "])
special_lines = st.sampled_from([b'{"text": "ok"}', b'{"text": "ok", "custom_id": "1"}', b"[1]", b"{", b"null",
                                 b'{"text": "' + b"x" * 300 + b'"}', b" " * 300, b'{"text": "\xff"}', b"\x00",
                                 b'{"text": "a", "text": "b"}', b"NaN"])
any_line = object_lines | raw_lines | blank_lines | special_lines | json_values.map(lambda v: json.dumps(v).encode())


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def non_blank_line_numbers(data: bytes) -> list[int]:
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()  # the newline ends the last line; it does not start another
    return [i for i, line in enumerate(lines, start=1) if line.removeprefix(BOM).strip()]


def check_file(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    try:
        results = read_requests(path, limits=LIMITS)
    except InputError:
        return
    results = list(results)
    assert [r.line for r in results] == non_blank_line_numbers(data)
    custom_ids = [r.custom_id for r in results if isinstance(r, RequestSpec)]
    assert len(custom_ids) == len(set(custom_ids))
    for r in results:
        assert isinstance(r, (RequestSpec, LineError))
        if isinstance(r, LineError):
            assert r.code in LINE_ERROR_CODES and r.message and "\n" not in r.message
            str(r).encode("utf-8")  # printable as one line of UTF-8
        else:
            assert 1 <= r.max_tokens <= LIMITS.max_tokens
            json.dumps(r.to_json()).encode("utf-8")


@FUZZ
@given(data=st.binary(max_size=600))
def test_random_bytes(folder, data):
    check_file(folder / "bytes.jsonl", data)


@FUZZ
@given(values=st.lists(json_values, min_size=1, max_size=8))
def test_random_json_values(folder, values):
    check_file(folder / "values.jsonl", b"\n".join(json.dumps(v).encode() for v in values))


@FUZZ
@given(lines=st.lists(any_line, min_size=1, max_size=12), eol=st.sampled_from([b"\n", b"\r\n"]),
       trailing=st.booleans())
def test_random_line_mixes(folder, lines, eol, trailing):
    check_file(folder / "mix.jsonl", eol.join(lines) + (eol if trailing else b""))


@FUZZ
@given(objects=st.lists(simple_lines | openai_lines, min_size=1, max_size=8))
def test_random_requests_as_parquet_json_columns(folder, objects):
    # Every object as a row: `body` and `messages` as JSON text, the rest as JSON text in a string column
    # too, so that any mix of types fits one schema; the reader must survive whatever that gives.
    path = folder / "rows.parquet"
    names = sorted({k for obj in objects for k in obj} | {"text"})
    columns = {name: pa.array([json.dumps(obj[name]) if name in obj else None for obj in objects], pa.string())
               for name in names}
    pq.write_table(pa.table(columns), path)
    try:
        results = list(read_requests(path, limits=LIMITS))
    except InputError:
        return
    assert [r.line for r in results] == list(range(1, len(objects) + 1))


@FUZZ
@given(start=st.integers(0, 10_000), junk=st.binary(min_size=1, max_size=64))
def test_damaged_parquet(folder, start, junk):
    path = folder / "damaged.parquet"
    pq.write_table(pa.table({"text": [f"prompt {i}" for i in range(300)], "max_tokens": list(range(1, 301))}), path,
                   row_group_size=100)
    data = bytearray(path.read_bytes())
    start %= len(data)
    data[start:start + len(junk)] = junk
    path.write_bytes(bytes(data))
    try:
        for result in read_requests(path, limits=LIMITS):
            assert isinstance(result, (RequestSpec, LineError))
    except InputError:
        pass
