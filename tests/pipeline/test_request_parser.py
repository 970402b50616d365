"""`parse_request` and the field checks on decoded objects, without files: the shapes, content
parts, the tolerated OpenAI fields, and the strict JSON decoder."""

from __future__ import annotations

import pytest

from pipeline.limits import InputLimits
from pipeline.request_fields import MIN_TOP_P, InvalidField, decode_json
from pipeline.request_parser import is_openai_shape, parse_request
from pipeline.request_spec import LineError, RequestSpec


def parse(obj: dict, line: int = 5, **limits) -> RequestSpec | LineError:
    return parse_request(obj, path="in.jsonl", line=line, limits=InputLimits(**limits), default_max_tokens=16)


def test_shape_detection():
    assert is_openai_shape({"url": "/v1/completions"})
    assert is_openai_shape({"body": {}})
    assert not is_openai_shape({"text": "a", "custom_id": "x"})


def test_simple_prompt_alias_and_metadata_is_ignored():
    assert parse({"prompt": "p", "metadata": {"label": 3}}) == RequestSpec(
        line=5, custom_id="5", endpoint="completions", prompt="p", messages=None, max_tokens=16)


def test_content_parts_are_joined_with_newlines_and_name_is_ignored():
    spec = parse({"messages": [{"role": "user", "name": "ann", "content": [{"type": "text", "text": "a"},
                                                                           {"type": "text", "text": "b"}]}]})
    assert spec.messages == ({"role": "user", "content": "a\nb"},)


def test_openai_completion_line_with_every_field():
    spec = parse({"custom_id": "r1", "method": "POST", "url": "/v1/completions",
                  "body": {"model": "m", "prompt": "p", "max_tokens": 3, "temperature": 0, "top_p": 0.5, "seed": 0,
                           "stop": "x", "presence_penalty": 0.0, "echo": False, "store": True}})
    assert spec == RequestSpec(line=5, custom_id="r1", endpoint="completions", prompt="p", messages=None,
                               max_tokens=3, temperature=0.0, top_p=0.5, seed=0, stop=("x",), model="m")
    assert isinstance(spec.temperature, float)


def test_method_defaults_to_post():
    spec = parse({"url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "u"}]}})
    assert spec.endpoint == "chat.completions"


def test_error_keeps_a_valid_custom_id_but_not_an_invalid_one():
    assert parse({"text": "", "custom_id": "x"}).custom_id == "x"
    assert parse({"text": "a", "custom_id": ""}).custom_id is None


def test_neutral_values_must_really_be_neutral():
    body = {"prompt": "p", "stream": 0}  # 0 is falsy but not the boolean false
    error = parse({"url": "/v1/completions", "body": body})
    assert (error.field, error.code) == ("body.stream", "unsupported_field")


def test_limits_come_from_the_limits_object():
    error = parse({"text": "a", "max_tokens": 11}, max_tokens=10)
    assert (error.code, error.message) == ("out_of_range", "must be between 1 and 10 (the max_tokens limit), got 11")
    error = parse({"text": "a", "stop": ["a", "b", "c"]}, max_stop_strings=2)
    assert (error.field, error.code) == ("stop", "too_many")
    error = parse({"text": "a", "session_id": "s" * 9}, max_id_chars=8)
    assert (error.field, error.code) == ("session_id", "too_long")


def test_seed_upper_bound_matches_the_engine():
    assert parse({"text": "a", "seed": 2**63 - 1}).seed == 2**63 - 1
    assert parse({"text": "a", "seed": 2**63}).code == "out_of_range"


def test_top_p_bounds_match_the_engine():
    from workers.sampling import MIN_TOP_P as ENGINE_MIN_TOP_P

    assert MIN_TOP_P == ENGINE_MIN_TOP_P
    assert parse({"text": "a", "top_p": MIN_TOP_P}).top_p == MIN_TOP_P
    error = parse({"text": "a", "top_p": 5e-324})
    assert (error.field, error.code, error.message) == (
        "top_p", "out_of_range",
        "is 5e-324, which the engine's float32 sampler rounds to 0 (keeping no token); use at least 1.18e-38")
    assert parse({"text": "a", "top_p": 0}).message == "must be in (0, 1], got 0"


def test_nan_from_parquet_floats_is_out_of_range():
    error = parse({"text": "a", "temperature": float("nan")})
    assert (error.field, error.code, error.message) == ("temperature", "out_of_range", "must be in [0, 2], got nan")


def test_decode_json_is_strict():
    assert decode_json('{"a": [1, 2.5, "x", null, true]}') == {"a": [1, 2.5, "x", None, True]}
    with pytest.raises(InvalidField) as info:
        decode_json('{"a": {"b": 1, "b": 2}}')
    assert (info.value.field, info.value.code) == ("b", "duplicate_key")
    with pytest.raises(InvalidField) as info:
        decode_json('{"a": {"b": 1, "b": 2}}', "body")
    assert (info.value.field, info.value.code) == ("body", "duplicate_key")
    assert 'the key "b" appears twice' in info.value.message
    with pytest.raises(InvalidField) as info:
        decode_json("[Infinity]", "messages")
    assert (info.value.field, info.value.code) == ("messages", "invalid_json")
    assert "Infinity is not a JSON number" in info.value.message
