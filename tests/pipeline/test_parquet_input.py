"""`read_requests` on Parquet files: both line shapes as columns, `messages` as nested lists or JSON
text, `body` as a struct or JSON text, nulls as absent, and the schema and corruption errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import InputError
from pipeline.input_reader import read_requests
from pipeline.request_spec import LineError, RequestSpec

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])


def write_table(tmp_path: Path, columns: dict[str, pa.Array | list], name: str = "in.parquet", **kw) -> Path:
    path = tmp_path / name
    pq.write_table(pa.table(columns), path, **kw)
    return path


def completion(line: int, prompt: str, **kw) -> RequestSpec:
    return RequestSpec(line=line, custom_id=kw.pop("custom_id", str(line)), endpoint="completions", prompt=prompt,
                       messages=None, max_tokens=kw.pop("max_tokens", 16), **kw)


def test_simple_columns_nulls_are_absent_and_other_columns_ignored(tmp_path):
    path = write_table(tmp_path, {
        "text": ["a", "b", "c"],
        "max_tokens": pa.array([5, None, 7], pa.int64()),
        "temperature": pa.array([0.0, 0.5, None], pa.float64()),
        "stop": pa.array([["\n"], None, []], pa.list_(pa.string())),
        "custom_id": ["x", None, "z"],
        "priority": ["low", None, "critical"],
        "label": [1, 2, 3],  # the user's own column: ignored
    })
    assert list(read_requests(path)) == [
        completion(1, "a", custom_id="x", max_tokens=5, temperature=0.0, stop=("\n",), priority="low"),
        completion(2, "b", temperature=0.5),
        completion(3, "c", custom_id="z", max_tokens=7, priority="critical"),
    ]


def test_float_max_tokens_column_as_pandas_writes_it(tmp_path):
    path = write_table(tmp_path, {"text": ["a", "b"], "max_length": pa.array([100.0, 2.5])})
    ok, bad = read_requests(path)
    assert ok == completion(1, "a", max_tokens=100)
    assert (bad.line, bad.field, bad.code) == (2, "max_length", "invalid_type")


def test_messages_as_list_of_structs(tmp_path):
    messages = pa.array([[{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
                         [{"role": "robot", "content": "x"}]], pa.list_(MESSAGE))
    path = write_table(tmp_path, {"messages": messages, "session_id": ["s", "s"]})
    ok, bad = read_requests(path)
    assert ok == RequestSpec(line=1, custom_id="1", endpoint="chat.completions", prompt=None, max_tokens=16,
                             messages=({"role": "system", "content": "S"}, {"role": "user", "content": "U"}),
                             session_id="s")
    assert (bad.line, bad.field, bad.code) == (2, "messages[0].role", "unknown_role")


def test_messages_as_json_text(tmp_path):
    path = write_table(tmp_path, {"messages": [json.dumps([{"role": "user", "content": "hi"}]), "[{oops", None],
                                  "text": [None, None, "t"]})
    ok, bad, text = read_requests(path)
    assert ok.messages == ({"role": "user", "content": "hi"},)
    assert (bad.line, bad.field, bad.code) == (2, "messages", "invalid_json")
    assert "invalid JSON: Expecting property name" in bad.message
    assert text == completion(3, "t")


def test_openai_shape_with_a_struct_body_mixing_endpoints(tmp_path):
    body = pa.array([
        {"prompt": "p", "messages": None, "max_tokens": 5, "model": "m"},
        {"prompt": None, "messages": [{"role": "user", "content": "u"}], "max_tokens": None, "model": None},
    ], pa.struct([("prompt", pa.string()), ("messages", pa.list_(MESSAGE)), ("max_tokens", pa.int32()),
                  ("model", pa.string())]))
    path = write_table(tmp_path, {"custom_id": ["a", "b"], "method": ["POST", "POST"],
                                  "url": ["/v1/completions", "/v1/chat/completions"], "body": body})
    assert list(read_requests(path)) == [
        completion(1, "p", custom_id="a", max_tokens=5, model="m"),
        RequestSpec(line=2, custom_id="b", endpoint="chat.completions", prompt=None, max_tokens=16,
                    messages=({"role": "user", "content": "u"},)),
    ]


def test_openai_shape_with_a_json_body_and_no_method_column(tmp_path):
    bodies = [json.dumps({"prompt": "p", "seed": 4}), json.dumps({"prompt": "q", "n": 3})]
    path = write_table(tmp_path, {"url": ["/v1/completions", "/v1/completions"], "body": bodies})
    ok, bad = read_requests(path)
    assert ok == completion(1, "p", seed=4)
    assert (bad.line, bad.field, bad.code) == (2, "body.n", "unsupported_field")


def test_binary_text_column(tmp_path):
    path = write_table(tmp_path, {"text": pa.array([b"caf\xc3\xa9", b"\xff"], pa.binary())})
    ok, bad = read_requests(path)
    assert ok == completion(1, "café")
    assert (bad.line, bad.field, bad.code) == (2, "text", "not_utf8")


def test_duplicate_custom_id_across_rows(tmp_path):
    path = write_table(tmp_path, {"text": ["a", "b"], "custom_id": ["x", "x"]})
    _, dup = read_requests(path)
    assert (dup.line, dup.code) == (2, "duplicate_custom_id")
    assert "custom_id 'x' already used on line 1" in dup.message


def test_many_rows_stream_in_batches(tmp_path):
    n = 3000  # several record batches and row groups
    path = write_table(tmp_path, {"text": [f"p{i}" for i in range(n)]}, row_group_size=700)
    results = list(read_requests(path))
    assert [r.line for r in results] == list(range(1, n + 1))
    assert results[-1] == completion(n, f"p{n - 1}")


@pytest.mark.parametrize(("columns", "fragment"), [
    ({"question": ["a"], "answer": ["b"]}, "has no prompt column (found: question, answer); add a 'text' column"),
    ({"text": ["a"], "temprature": [0.5]}, "column 'temprature' is not a known field; did you mean 'temperature'?"),
    ({"body": ['{"prompt": "p"}']}, "has a 'body' column but no 'url' column"),
    ({"text": pa.array([], pa.string())}, "has no rows"),
])
def test_schema_errors(tmp_path, columns, fragment):
    path = write_table(tmp_path, columns)
    with pytest.raises(InputError) as info:
        read_requests(path)
    assert fragment in info.value.message


def test_not_parquet_at_all(tmp_path):
    path = tmp_path / "in.parquet"
    path.write_bytes(b'{"text": "I am JSON"}\n')
    with pytest.raises(InputError, match="is not a readable Parquet file"):
        read_requests(path)


def test_truncated_file(tmp_path):
    path = write_table(tmp_path, {"text": ["a"] * 100})
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(InputError, match="is not a readable Parquet file"):
        read_requests(path)


def test_corrupted_data_with_a_valid_footer_raises_input_error_when_reached(tmp_path):
    path = write_table(tmp_path, {"text": [f"prompt {i} " * 20 for i in range(3000)]}, row_group_size=1000)
    last = pq.ParquetFile(path).metadata.row_group(2).column(0)
    start = last.dictionary_page_offset or last.data_page_offset
    data = bytearray(path.read_bytes())
    rng = random.Random(0)
    for i in range(start + 50, start + 2050):  # inside the last row group's pages
        data[i] = rng.randrange(256)
    path.write_bytes(bytes(data))
    results = read_requests(path)  # the footer is fine: the damage shows while reading
    seen: list[RequestSpec | LineError] = []
    with pytest.raises(InputError, match=r"Parquet data is corrupted after row \d+ \(.*\); re-export the file"):
        seen.extend(results)
    assert 0 < len(seen) < 3000
    assert [r.line for r in seen] == list(range(1, len(seen) + 1))
