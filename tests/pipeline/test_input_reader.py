"""`read_requests` on JSONL files: whole-file errors, every kind of bad line (exact line, field, code
and message), duplicates, BOM/CRLF, long lines in bounded memory. Parquet is in test_parquet_input.py."""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest

from pipeline.errors import InputError
from pipeline.input_reader import CHUNK_BYTES, read_requests
from pipeline.limits import InputLimits, MiB
from pipeline.request_spec import LineError, RequestSpec
from pipeline.served_model import ServedModel

GOOD = '{"text": "ok"}'


def write_lines(tmp_path: Path, lines: list[str | bytes], name: str = "in.jsonl", eol: bytes = b"\n") -> Path:
    path = tmp_path / name
    path.write_bytes(b"".join((ln if isinstance(ln, bytes) else ln.encode()) + eol for ln in lines))
    return path


def spec(line: int, prompt: str = "ok", **kw) -> RequestSpec:
    return RequestSpec(line=line, custom_id=kw.pop("custom_id", str(line)), endpoint="completions", prompt=prompt,
                       messages=None, max_tokens=kw.pop("max_tokens", 16), **kw)


# ---- whole-file errors: raised by the call itself, before anything is yielded ----

def assert_input_error(path: Path, fragment: str, **kw) -> None:
    with pytest.raises(InputError) as info:
        read_requests(path, **kw)  # no next(): the error must come from the call
    assert info.value.path == str(path)
    assert fragment in info.value.message
    assert str(info.value) == f"{path}: {info.value.message}"


def test_missing_file(tmp_path):
    assert_input_error(tmp_path / "nope.jsonl", "no such file")


def test_directory(tmp_path):
    (tmp_path / "d.jsonl").mkdir()
    assert_input_error(tmp_path / "d.jsonl", "is a directory")


def test_empty_file(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"")
    assert_input_error(path, "is empty; write one JSON request per line")


def test_only_blank_lines_is_an_input_error(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\xef\xbb\xbf\n  \r\n\t\n\n")
    assert_input_error(path, "has only blank lines")


def test_file_over_max_file_bytes(tmp_path):
    path = write_lines(tmp_path, [GOOD, GOOD])
    assert_input_error(path, "is 30 bytes, over the 29 bytes limit (max_file_bytes)",
                       limits=InputLimits(max_file_bytes=29))
    assert len(list(read_requests(path, limits=InputLimits(max_file_bytes=30)))) == 2


@pytest.mark.parametrize("content", [b'[{"text": "a"}]', b'\xef\xbb\xbf\n  [\n{"text": "a"}\n]\n'])
def test_json_array(tmp_path, content):
    path = tmp_path / "in.json"
    path.write_bytes(content)
    assert_input_error(path, "this is a JSON array; write one JSON object per line (JSONL)")


def test_pretty_printed_object(tmp_path):
    path = tmp_path / "in.json"
    path.write_text(json.dumps({"text": "a", "max_tokens": 3}, indent=2))
    assert_input_error(path, "spread over several lines")


def test_first_line_starting_with_brace_at_chunk_end_is_not_pretty_printed(tmp_path):
    # The first chunk ends right after "{": the reader must look further before calling it pretty-printed.
    path = tmp_path / "in.jsonl"
    path.write_bytes(b" " * (CHUNK_BYTES - 1) + b'{"text": "a"}\n')
    assert list(read_requests(path)) == [spec(1, "a")]


def test_utf16_file(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes((GOOD + "\n").encode("utf-16"))
    assert_input_error(path, "is UTF-16 text; save it as UTF-8")


@pytest.mark.parametrize(("name", "fragment"), [
    ("in.csv", "unsupported file type '.csv'; convert it"),
    ("in.jsonl.gz", "unsupported file type '.gz'; decompress it first"),
    ("in", "unsupported file type '(no extension)'"),
])
def test_unknown_extension(tmp_path, name, fragment):
    assert_input_error(write_lines(tmp_path, [GOOD], name=name), fragment)


def test_extensions_are_case_insensitive_and_json_means_lines(tmp_path):
    for name in ("a.JSONL", "b.json", "c.ndjson"):
        assert list(read_requests(write_lines(tmp_path, [GOOD], name=name))) == [spec(1)]


def test_default_max_tokens_must_fit_the_limit(tmp_path):
    with pytest.raises(ValueError, match="default_max_tokens=100"):
        read_requests(write_lines(tmp_path, [GOOD]), limits=InputLimits(max_tokens=50), default_max_tokens=100)


# ---- files that simply work ----

def test_bom_crlf_and_blank_lines_keep_physical_line_numbers(tmp_path):
    path = write_lines(tmp_path, [b'\xef\xbb\xbf{"text": "a"}', b"", b"   \t", b'{"text": "b"}', b'{"text": "c"}'],
                       eol=b"\r\n")
    assert list(read_requests(path)) == [spec(1, "a"), spec(4, "b"), spec(5, "c")]


def test_last_line_without_newline_and_bom_mid_file(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"text": "a"}\n\xef\xbb\xbf{"text": "b"}')  # as `cat a.jsonl b.jsonl` makes
    assert list(read_requests(path)) == [spec(1, "a"), spec(2, "b")]


def test_both_shapes_and_their_defaults(tmp_path):
    path = write_lines(tmp_path, [
        json.dumps({"text": "t", "max_length": 7, "temperature": 0.5, "top_p": 0.9, "seed": 3, "stop": "\n",
                    "session_id": "s1", "priority": "high", "custom_id": "a", "model": "tiny"}),
        json.dumps({"custom_id": "b", "method": "POST", "url": "/v1/chat/completions",
                    "body": {"model": "m", "messages": [{"role": "system", "content": "S"},
                                                        {"role": "user", "content": "U"}],
                             "max_completion_tokens": 9, "stop": ["x", "y"]}}),
    ])
    assert list(read_requests(path, default_max_tokens=4)) == [
        RequestSpec(line=1, custom_id="a", endpoint="completions", prompt="t", messages=None, max_tokens=7,
                    temperature=0.5, top_p=0.9, seed=3, stop=("\n",), session_id="s1", priority="high", model="tiny"),
        RequestSpec(line=2, custom_id="b", endpoint="chat.completions", prompt=None,
                    messages=({"role": "system", "content": "S"}, {"role": "user", "content": "U"}),
                    max_tokens=9, temperature=1.0, top_p=1.0, seed=None, stop=("x", "y"), model="m"),
    ]


# ---- bad lines: each is line 2 of three, and the lines around it still work ----

def openai(body: object, **top) -> dict:
    return {"custom_id": "c", "method": "POST", "url": "/v1/completions", "body": body, **top}


def chat(body: object, **top) -> dict:
    return openai(body, url="/v1/chat/completions", **top)


BAD_LINES: list[tuple[object, str | None, str, str]] = [
    # (line, field, code, message fragment); a dict is written as JSON, a str or bytes as is
    # -- the line itself
    ("hello", None, "invalid_json", "invalid JSON: Expecting value at column 1"),
    ('{"text": "abc', None, "invalid_json", "invalid JSON: Unterminated string"),
    ('{"text": "a"', None, "invalid_json", "write one complete JSON object per line"),
    ('{"text": "a"} {"text": "b"}', None, "invalid_json", "more than one JSON value; put each request on its own line"),
    ('{"text": NaN}', None, "invalid_json", "NaN is not a JSON number"),
    ('{"max_tokens": ' + "9" * 5000 + "}", None, "invalid_json", "Exceeds the limit (4300 digits)"),
    ("[" * 100_000, None, "invalid_json", "nested too deeply"),
    ('{"text": "a", "text": "b"}', "text", "duplicate_key", 'the key "text" appears twice'),
    ("5", None, "not_an_object", "the line holds the value 5, not a JSON object"),
    ('"text"', None, "not_an_object", "holds a string"),
    ("[1]", None, "not_an_object", "holds an array"),
    (b'{"text": "caf\xe9"}', None, "not_utf8", "byte 0xe9 at column 14 is not valid UTF-8"),
    (b'{"text": "a\x00"}', None, "nul_byte", "NUL byte at column 12"),
    # -- simple lines
    ({}, "text", "missing_field", 'add "text"'),
    ({"max_tokens": 3}, "text", "missing_field", 'add "text"'),
    ({"text": "a", "messages": [{"role": "user", "content": "b"}]}, "messages", "conflicting_fields", "not both"),
    ({"text": "a", "max_tokens": "ten"}, "max_tokens", "invalid_type", 'must be a whole number, got the string "ten"'),
    ({"text": "a", "max_tokens": True}, "max_tokens", "invalid_type", "got true"),
    ({"text": "a", "max_tokens": 10.5}, "max_tokens", "invalid_type", "got 10.5"),
    ({"text": "a", "max_tokens": 0}, "max_tokens", "out_of_range", "must be between 1 and 32768, got 0"),
    ({"text": "a", "max_length": 40000}, "max_length", "out_of_range", "32768 (the max_tokens limit), got 40000"),
    ({"text": "a", "max_length": 5, "max_tokens": 5}, "max_tokens", "conflicting_fields",
     'give either "max_length" or "max_tokens"'),
    ({"text": "a", "temperature": 2.5}, "temperature", "out_of_range", "must be in [0, 2], got 2.5"),
    ({"text": "a", "temperature": "hot"}, "temperature", "invalid_type", "must be a number"),
    ({"text": "a", "temperature": False}, "temperature", "invalid_type", "got false"),
    ({"text": "a", "top_p": 0}, "top_p", "out_of_range", "must be in (0, 1], got 0"),
    ({"text": "a", "top_p": 1.01}, "top_p", "out_of_range", "got 1.01"),
    ({"text": "a", "seed": -1}, "seed", "out_of_range", "between 0 and 9223372036854775807"),
    ({"text": "a", "seed": "7"}, "seed", "invalid_type", "whole number"),
    ({"text": "a", "stop": 5}, "stop", "invalid_type", "must be a string or a list of strings, got 5"),
    ({"text": "a", "stop": ["a", ""]}, "stop[1]", "invalid_value", "empty stop string"),
    ({"text": "a", "stop": ""}, "stop", "invalid_value", "empty stop string"),
    ({"text": "a", "stop": ["a", 3]}, "stop[1]", "invalid_type", "must be a string, got 3"),
    ({"text": "a", "stop": [str(i) for i in range(17)]}, "stop", "too_many", "holds 17 stop strings; at most 16"),
    ({"text": ""}, "text", "empty_prompt", "is empty"),
    ({"text": ["a", "b"]}, "text", "multiple_prompts", "send one prompt per line"),
    ({"text": 5}, "text", "invalid_type", "must be a string, got 5"),
    ({"text": "a\u0000b"}, "text", "nul_byte", "NUL character"),
    ('{"text": "\\ud800"}', "text", "not_utf8", "lone UTF-16 surrogate"),
    ({"text": "a", "temprature": 1}, "temprature", "unknown_field",
     'unknown field "temprature"; did you mean "temperature"?'),
    ({"text": "a", "colour": 1}, "colour", "unknown_field", "the known fields are custom_id, text,"),
    ({"text": "a", "priority": "urgent"}, "priority", "invalid_value",
     '"urgent" is not one of critical, high, normal, low'),
    ({"text": "a", "session_id": ""}, "session_id", "invalid_value", "must not be empty"),
    ({"text": "a", "custom_id": 42}, "custom_id", "invalid_type", "must be a string, got 42"),
    ({"text": "a", "custom_id": "x" * 513}, "custom_id", "too_long", "is 513 characters; at most 512"),
    ({"messages": []}, "messages", "empty_messages", "give at least one"),
    ({"messages": "hi"}, "messages", "invalid_type", 'must be a list of {"role", "content"} objects'),
    ({"messages": ["hi"]}, "messages[0]", "invalid_type", "must be an object"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "unknown_role",
     'role "tool" is not supported; use "system", "user" or "assistant"'),
    ({"messages": [{"content": "x"}]}, "messages[0].role", "missing_field", 'add "role"'),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user"}]}, "messages[1].content", "missing_field",
     'add "content"'),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "invalid_type", "got 5"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0].type", "unsupported_content", 'type "image_url" are not supported'),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text", "missing_field",
     'add "text"'),
    ({"messages": [{"role": "assistant", "content": "x", "tool_calls": []}]}, "messages[0].tool_calls",
     "unsupported_field", '"tool_calls" is not supported'),
    # -- OpenAI batch lines
    (openai({"prompt": "p"}, method="GET"), "method", "unsupported_method",
     'method "GET" is not supported; batch lines use "POST"'),
    (openai({"prompt": "p"}, url="/v1/embeddings"), "url", "unknown_endpoint",
     'url "/v1/embeddings" is not supported; use "/v1/completions" or "/v1/chat/completions"'),
    ({"custom_id": "c", "method": "POST", "body": {"prompt": "p"}}, "url", "missing_field", 'add "url"'),
    ({"custom_id": "c", "method": "POST", "url": "/v1/completions"}, "body", "missing_field", 'add a "body"'),
    (openai("p"), "body", "invalid_type", 'must be an object, got the string "p"'),
    (openai({"prompt": "p"}, priority="high"), "priority", "unknown_field",
     "the known fields are custom_id, method, url, body"),
    (chat({"prompt": "p"}), "body.prompt", "endpoint_mismatch",
     '"prompt" does not go to /v1/chat/completions; send "messages" instead'),
    (openai({"messages": [{"role": "user", "content": "u"}]}), "body.messages", "endpoint_mismatch",
     'send "prompt" instead'),
    (openai({"max_tokens": 3}), "body.prompt", "missing_field", 'add "prompt"'),
    (chat({}), "body.messages", "missing_field", 'add "messages"'),
    (chat({"messages": [{"role": "user", "content": "u"}], "max_tokens": "ten"}), "body.max_tokens", "invalid_type",
     'got the string "ten"'),
    (chat({"messages": [{"role": "user", "content": "u"}], "max_tokens": 1, "max_completion_tokens": 1}),
     "body.max_completion_tokens", "conflicting_fields", "not both"),
    (openai({"prompt": ["a", "b"]}), "body.prompt", "multiple_prompts",
     "holds a list of 2 prompts; send one prompt per line"),
    (openai({"prompt": [1, 2, 3]}), "body.prompt", "invalid_type", "token ids are not supported"),
    (openai({"prompt": "p", "temperature": 3}), "body.temperature", "out_of_range", "[0, 2]"),
    (openai({"prompt": "p", "logprobs": 3}), "body.logprobs", "unsupported_field", "logprobs=3 is not supported"),
    (openai({"prompt": "p", "n": 2}), "body.n", "unsupported_field", "remove it or set it to 1"),
    (openai({"prompt": "p", "tools": []}), "body.tools", "unsupported_field",
     '"tools" is not supported by this pipeline'),
    (openai({"prompt": "p", "max_token": 5}), "body.max_token", "unknown_field", 'did you mean "max_tokens"?'),
    (openai({"prompt": "p", "model": 3}), "body.model", "invalid_type", "must be a string"),
]


@pytest.mark.parametrize(("bad", "field", "code", "fragment"), BAD_LINES,
                         ids=[f"{i}-{c}" for i, (_, _, c, _) in enumerate(BAD_LINES)])
def test_bad_line(tmp_path, bad, field, code, fragment):
    line = json.dumps(bad) if isinstance(bad, dict) else bad
    path = write_lines(tmp_path, [GOOD, line, GOOD])
    first, error, third = read_requests(path)
    assert (first, third) == (spec(1), spec(3))
    assert isinstance(error, LineError), error
    assert (error.path, error.line, error.field, error.code) == (str(path), 2, field, code)
    assert fragment in error.message, error.message
    prefix = f"{path}:2: " if field is None else f"{path}:2: {field}: "
    assert str(error) == prefix + error.message


def test_accepted_openai_extras_and_whole_number_floats(tmp_path):
    path = write_lines(tmp_path, [json.dumps(openai({"prompt": "p", "n": 1, "stream": False, "logprobs": None,
                                                     "user": "u1", "metadata": {"k": "v"}, "max_tokens": 5.0}))])
    assert list(read_requests(path)) == [spec(1, "p", custom_id="c", max_tokens=5)]


def test_limits_on_prompt_chars_and_messages(tmp_path):
    limits = InputLimits(max_prompt_chars=10, max_messages=2)
    user = {"role": "user", "content": "abcdef"}
    path = write_lines(tmp_path, [json.dumps({"text": "x" * 10}), json.dumps({"text": "x" * 11}),
                                  json.dumps({"messages": [user, user]}), json.dumps({"messages": [user] * 3})])
    ok, long_prompt, long_chat, many = read_requests(path, limits=limits)
    assert ok == spec(1, "x" * 10)
    assert (long_prompt.field, long_prompt.code) == ("text", "too_long")
    assert "is 11 characters; at most 10 are allowed (max_prompt_chars)" in long_prompt.message
    assert (long_chat.field, long_chat.code) == ("messages", "too_long")
    assert "hold 12 characters in all" in long_chat.message
    assert (many.field, many.code) == ("messages", "too_many")
    assert "holds 3 messages; at most 2" in many.message


# ---- duplicate custom_ids name both lines ----

def test_duplicate_custom_id_names_the_first_line(tmp_path):
    path = write_lines(tmp_path, ['{"text": "a", "custom_id": "x"}', "", '{"text": "b", "custom_id": "x"}'])
    first, dup = read_requests(path)
    assert first == spec(1, "a", custom_id="x")
    assert (dup.line, dup.field, dup.code, dup.custom_id) == (3, "custom_id", "duplicate_custom_id", None)
    assert dup.message == "custom_id 'x' already used on line 1; give each request its own custom_id"


def test_default_custom_id_collides_with_an_explicit_one(tmp_path):
    path = write_lines(tmp_path, ['{"text": "a", "custom_id": "2"}', GOOD])
    _, dup = read_requests(path)
    assert (dup.line, dup.code) == (2, "duplicate_custom_id")
    assert "custom_id '2' (the default: this line's number) already used on line 1" in dup.message


def test_a_rejected_line_still_claims_its_custom_id(tmp_path):
    path = write_lines(tmp_path, ['{"text": "", "custom_id": "x"}', '{"text": "b", "custom_id": "x"}'])
    bad, dup = read_requests(path)
    assert (bad.code, bad.custom_id) == ("empty_prompt", "x")
    assert (dup.code, dup.message.split(";")[0]) == ("duplicate_custom_id", "custom_id 'x' already used on line 1")


# ---- long lines ----

@pytest.mark.parametrize("eol", [b"\n", b"\r\n"])
def test_line_length_limit_is_exact_across_chunks(tmp_path, eol):
    limit = CHUNK_BYTES + 1000  # forces the multi-chunk path
    fitting = b'{"text": "' + b"a" * (limit - 12) + b'"}'
    assert len(fitting) == limit
    too_long = b'{"text": "' + b"a" * (limit - 11) + b'"}'
    path = write_lines(tmp_path, [fitting, too_long, GOOD.encode()], eol=eol)
    ok, error, last = read_requests(path, limits=InputLimits(max_line_bytes=limit))
    assert isinstance(ok, RequestSpec) and len(ok.prompt) == limit - 12
    assert (error.line, error.field, error.code) == (2, None, "line_too_long")
    assert f"the line is {limit + 1:,} bytes, over the {limit:,} bytes limit (max_line_bytes)" in error.message
    assert last == spec(3)


def test_short_line_limit(tmp_path):
    path = write_lines(tmp_path, ['{"text": "abcdef"}', GOOD])
    error, ok = read_requests(path, limits=InputLimits(max_line_bytes=15))
    assert (error.line, error.code, ok) == (1, "line_too_long", spec(2))
    assert "the line is 18 bytes, over the 15 bytes limit" in error.message


def test_100_mb_line_is_one_error_read_in_bounded_memory(tmp_path):
    path = tmp_path / "big.jsonl"
    with open(path, "wb") as f:
        f.write(b'{"text": "')
        block = b"x" * MiB
        for _ in range(100):
            f.write(block)
        f.write(b'"}\n' + GOOD.encode() + b"\n")
    tracemalloc.start()
    try:
        results = list(read_requests(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(results) == 2
    error, ok = results
    assert (error.line, error.field, error.code) == (1, None, "line_too_long")
    assert "the line is 100.0 MiB, over the 8 MiB limit (max_line_bytes)" in error.message
    assert ok == spec(2)
    assert peak < 20 * MiB, f"peak {peak / MiB:.1f} MiB"


def test_reading_and_writing_never_import_torch():
    modules = "pipeline.input_reader, pipeline.output_writer, pipeline.errors"
    code = f"import sys, {modules}; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


# ---- what a line asks of the workers: its model, its priority ----

SERVED = ServedModel("tiny", aliases=("gpt-4o-mini",))


def test_a_model_the_workers_do_not_serve_is_model_not_found_unless_it_is_an_alias(tmp_path):
    path = write_lines(tmp_path, [
        json.dumps({"text": "a", "model": "tiny"}),
        json.dumps(openai({"prompt": "b", "model": "gpt-4o-mini"})),
        json.dumps(openai({"prompt": "c", "model": "gpt-4o"}, custom_id="d")),
        json.dumps({"text": "e", "model": "llama"}),
        GOOD,
    ])
    served, alias, unknown_body, unknown, absent = read_requests(path, served=SERVED)
    assert (served.model, alias.model, absent.model) == ("tiny", "tiny", None)  # an alias is the served name
    assert (unknown_body.line, unknown_body.field, unknown_body.code, unknown_body.custom_id) == (
        3, "body.model", "model_not_found", "d")
    assert unknown_body.message == ('model "gpt-4o" is not served here (the workers serve "tiny"); remove "model", '
                                    'name that model, or add "gpt-4o" to the model_aliases setting '
                                    "(PIPELINE_MODEL_ALIASES)")
    assert (unknown.field, unknown.code) == ("model", "model_not_found")


def test_aliases_hold_only_for_a_job_of_the_settings_model():
    assert ServedModel.for_job(None, "tiny", ("gpt-4o-mini",)) == SERVED
    assert ServedModel.for_job("gpt-4o-mini", "tiny", ("gpt-4o-mini",)) == SERVED  # --model may be an alias
    other = ServedModel.for_job("/models/llama", "tiny", ("gpt-4o-mini",))
    assert other == ServedModel("/models/llama") and other.resolve("gpt-4o-mini") is None


def test_developer_is_openai_s_newer_name_for_system(tmp_path):
    messages = [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}]
    path = write_lines(tmp_path, [json.dumps({"messages": messages}),
                                  json.dumps(openai({"messages": messages}, url="/v1/chat/completions"))])
    plain, batch = read_requests(path)
    assert plain.messages == batch.messages == ({"role": "system", "content": "be brief"},
                                                 {"role": "user", "content": "hi"})


def test_a_line_keeps_its_priority_and_a_session_keeps_one(tmp_path):
    path = write_lines(tmp_path, [
        json.dumps({"text": "a", "priority": "high"}),
        json.dumps({"text": "b", "session_id": "s", "priority": "low"}),
        json.dumps({"text": "c", "session_id": "s", "priority": "low"}),
        json.dumps({"text": "d", "session_id": "s", "custom_id": "x"}),
        json.dumps({"text": "e", "session_id": "t"}),
        json.dumps({"text": "f", "session_id": "t", "priority": "critical"}),
    ])
    a, b, c, d, e, f = read_requests(path)
    assert (a.priority, b.priority, c.priority, e.priority) == ("high", "low", "low", None)
    assert (d.line, d.field, d.code, d.custom_id) == (4, "priority", "conflicting_fields", "x")
    assert d.message == ('priority null differs from "low" on line 2, the first line of session "s"; a session runs '
                         "on one queue: give its lines the same priority")
    assert (f.code, f.message.split(";")[0]) == (
        "conflicting_fields", 'priority "critical" differs from null on line 5, the first line of session "t"')
