"""Property tests: whatever bytes a file holds, `read_requests` raises nothing but InputError, and
every non-blank line (every Parquet row) yields exactly one RequestSpec or LineError, with its own
line number. JSONL from random bytes, JSON values and line mixes; Parquet from JSON-text columns,
typed columns of every kind a writer may give, and damaged or truncated files."""

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
    check_results(path, list(results), non_blank_line_numbers(data))


def check_parquet(path: Path, num_rows: int) -> None:
    try:
        results = list(read_requests(path, limits=LIMITS))
    except InputError:
        return
    check_results(path, results, list(range(1, num_rows + 1)))


def check_results(path: Path, results: list, lines: list[int]) -> None:
    """One result per line, in order; unique ids; errors with a known code and one line that names
    the file and line; specs within the limits and serialisable."""
    assert [r.line for r in results] == lines
    custom_ids = [r.custom_id for r in results if isinstance(r, RequestSpec)]
    assert len(custom_ids) == len(set(custom_ids))
    for r in results:
        assert isinstance(r, (RequestSpec, LineError))
        if isinstance(r, LineError):
            assert r.code in LINE_ERROR_CODES and r.message and "\n" not in r.message
            assert str(r).startswith(f"{path}:{r.line}: ")
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
    check_parquet(path, len(objects))


message_struct = pa.struct([("role", pa.string()), ("content", pa.string())])
# Arrow type -> values of it, as Parquet writers (pandas, Spark, DuckDB) give them: NaN and
# infinities in floats, huge integers, binary without the UTF-8 annotation, string cells that are
# not UTF-8 (some writers do not check), lists, and structs for `messages` and `body`.
PARQUET_TYPES: dict[str, tuple[pa.DataType, st.SearchStrategy]] = {
    "int64": (pa.int64(), st.integers(-(2**63), 2**63 - 1)),
    "uint64": (pa.uint64(), st.integers(0, 2**64 - 1)),
    "float64": (pa.float64(), st.floats()),
    "bool": (pa.bool_(), st.booleans()),
    "string": (pa.string(), st.text(max_size=12) | st.sampled_from(["/v1/completions", "POST", "high", "x" * 60])),
    "binary": (pa.binary(), st.binary(max_size=12)),
    "raw-string": (pa.string(), st.binary(max_size=12)),  # bytes viewed as a string column, unchecked
    "strings": (pa.list_(pa.string()), st.lists(st.text(max_size=5), max_size=4)),
    "messages": (pa.list_(message_struct), st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "tool"]) | st.none(),
         "content": st.text(max_size=8) | st.none()}), max_size=4)),
    "body": (pa.struct([("prompt", pa.string()), ("max_tokens", pa.int64()), ("messages", pa.list_(message_struct))]),
             st.fixed_dictionaries({"prompt": st.text(max_size=8) | st.none(),
                                    "max_tokens": st.integers(-5, 200) | st.none(), "messages": st.none()})),
}
COLUMN_NAMES = ["text", "prompt", "messages", "max_tokens", "max_length", "temperature", "top_p", "seed", "stop",
                "custom_id", "session_id", "priority", "model", "url", "method", "body", "label"]


def parquet_column(kind: str, values: list) -> pa.Array:
    arrow_type, _ = PARQUET_TYPES[kind]
    if kind == "raw-string":
        return pa.array(values, pa.binary()).view(pa.string())
    return pa.array(values, arrow_type)


# A prompt column of the right type, so that most files get past the schema check to their rows.
PROMPT_COLUMNS = [{"text": "string"}, {"prompt": "string"}, {"messages": "messages"},
                  {"body": "body", "url": "string"}]


@FUZZ
@given(data=st.data(), num_rows=st.integers(1, 6), prompt=st.sampled_from(PROMPT_COLUMNS),
       others=st.dictionaries(st.sampled_from(COLUMN_NAMES), st.sampled_from(sorted(PARQUET_TYPES)), max_size=5))
def test_random_typed_parquet_columns(folder, data, num_rows, prompt, others):
    kinds = {**prompt, **others}
    columns = {}
    for name, kind in kinds.items():
        values = data.draw(st.lists(st.none() | PARQUET_TYPES[kind][1], min_size=num_rows, max_size=num_rows))
        columns[name] = parquet_column(kind, values)
    path = folder / "typed.parquet"
    pq.write_table(pa.table(columns), path)
    check_parquet(path, num_rows)


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


@FUZZ
@given(keep=st.integers(0, 10_000))
def test_truncated_parquet(folder, keep):
    # A download or copy cut short: any prefix of a valid file.
    path = folder / "truncated.parquet"
    pq.write_table(pa.table({"text": [f"prompt {i}" for i in range(300)], "max_tokens": list(range(1, 301))}), path,
                   row_group_size=100)
    data = path.read_bytes()
    path.write_bytes(data[: keep % len(data)])
    try:
        for result in read_requests(path, limits=LIMITS):
            assert isinstance(result, (RequestSpec, LineError))
    except InputError:
        pass
