"""RequestSpec and LineError: JSON round trips, the sampling dict, the one-line error text."""

from __future__ import annotations

import json

import pytest

from pipeline.errors import InputError, PipelineError
from pipeline.limits import GiB, InputLimits, format_bytes
from pipeline.request_spec import LINE_ERROR_CODES, LineError, RequestSpec

CHAT = RequestSpec(
    line=7, custom_id="req-7", endpoint="chat.completions", prompt=None,
    messages=({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}),
    max_tokens=32, temperature=0.2, top_p=0.9, seed=11, stop=("\n\n", "END"), session_id="s1", priority="high",
    model="tiny",
)
COMPLETION = RequestSpec(line=1, custom_id="1", endpoint="completions", prompt="Once", messages=None, max_tokens=16)


def test_params_dict_is_the_sampling_fields_as_json():
    assert CHAT.params_dict() == {"max_tokens": 32, "temperature": 0.2, "top_p": 0.9, "seed": 11,
                                  "stop": ["\n\n", "END"]}
    assert COMPLETION.params_dict() == {"max_tokens": 16, "temperature": 1.0, "top_p": 1.0, "seed": None, "stop": []}


def test_to_json_is_plain_json():
    assert CHAT.to_json() == {
        "line": 7, "custom_id": "req-7", "endpoint": "chat.completions", "prompt": None,
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "max_tokens": 32, "temperature": 0.2, "top_p": 0.9, "seed": 11, "stop": ["\n\n", "END"],
        "session_id": "s1", "priority": "high", "model": "tiny",
    }


@pytest.mark.parametrize("spec", [CHAT, COMPLETION])
def test_json_round_trip_through_text(spec):
    assert RequestSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec


def test_prompt_and_endpoint_must_agree():
    with pytest.raises(AssertionError):
        RequestSpec(line=1, custom_id="1", endpoint="completions", prompt=None, messages=None, max_tokens=1)


def test_line_error_str_names_path_line_and_field():
    error = LineError("in.jsonl", 3, "body.max_tokens", "invalid_type", 'must be a whole number, got the string "ten"')
    assert str(error) == 'in.jsonl:3: body.max_tokens: must be a whole number, got the string "ten"'
    whole = LineError("in.jsonl", 4, None, "invalid_json", "invalid JSON: Expecting value at column 1")
    assert str(whole) == "in.jsonl:4: invalid JSON: Expecting value at column 1"


def test_line_error_json_round_trip():
    error = LineError("in.jsonl", 3, "text", "empty_prompt", "is empty", custom_id="x")
    assert error.to_json() == {"path": "in.jsonl", "line": 3, "field": "text", "code": "empty_prompt",
                               "message": "is empty", "custom_id": "x"}
    assert LineError.from_json(json.loads(json.dumps(error.to_json()))) == error


def test_line_error_codes_are_stable_snake_case():
    assert all(code.isidentifier() and code == code.lower() for code in LINE_ERROR_CODES)
    with pytest.raises(AssertionError):
        LineError("in.jsonl", 1, None, "some_new_code", "x")


def test_input_error_is_one_clean_line():
    message = "this is a JSON array; write one JSON object per line (JSONL)"
    error = InputError("data/in.json", message)
    assert isinstance(error, PipelineError)
    assert (error.path, error.message) == ("data/in.json", message)
    assert str(error) == "data/in.json: this is a JSON array; write one JSON object per line (JSONL)"
    assert error.args == ("data/in.json", error.message)  # rebuildable from its args


def test_limits_defaults_and_validation():
    limits = InputLimits()
    assert (limits.max_file_bytes, limits.max_line_bytes, limits.max_tokens, limits.max_stop_strings) == (
        10 * GiB, 8 * 2**20, 32768, 16)
    with pytest.raises(ValueError, match="max_tokens=0"):
        InputLimits(max_tokens=0)
    with pytest.raises(ValueError, match="max_messages=True"):
        InputLimits(max_messages=True)


@pytest.mark.parametrize(("n", "text"), [(10 * GiB, "10 GiB"), (8 * 2**20, "8 MiB"), (29, "29 bytes"),
                                         (100 * 2**20 + 1, "100.0 MiB"), (70_001, "70,001 bytes"),
                                         (10 * GiB + 2**29, "10.5 GiB")])
def test_format_bytes(n, text):
    assert format_bytes(n) == text
