"""Validate one decoded input line (a JSON object, or a Parquet row as a dict) into a `RequestSpec`,
or say exactly what is wrong with it as a `LineError`.

Two shapes are accepted (DESIGN.md section 4):

- the OpenAI batch line `{"custom_id", "method": "POST", "url": "/v1/completions" |
  "/v1/chat/completions", "body": {...}}`, recognised by any of `body`, `url`, `method`;
- the simple line `{"text" | "prompt" | "messages", "max_length" | "max_tokens", "temperature",
  "top_p", "seed", "stop", "session_id", "priority", "model", "custom_id"}`, plus a free-form
  `metadata` the pipeline ignores (put your labels there).

Rules that hold everywhere: a JSON null (a Parquet null) means "absent"; numbers are never booleans;
a whole-number float (`10.0`, as pandas writes nullable integer columns) counts as an integer; an
unknown field is an error (with "did you mean" for typos), because a silently ignored field means
silently wrong results. The first problem found on a line is the one reported.
"""

from __future__ import annotations

import json
from typing import Any

from pipeline.limits import InputLimits
from pipeline.request_fields import (
    InvalidField, check_id, check_int, check_messages, check_model, check_priority, check_prompt, check_real,
    check_stop, check_string, check_top_p, close_match, got, short, show,
)
from pipeline.request_spec import DEFAULT_TEMPERATURE, DEFAULT_TOP_P, URL_ENDPOINTS, LineError, RequestSpec
from pipeline.served_model import ServedModel

OPENAI_KEYS = ("custom_id", "method", "url", "body")
BODY_KEYS = ("model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed",
             "stop")
# OpenAI body fields that do not change the completion: accepted and ignored.
IGNORED_BODY_KEYS = frozenset({"user", "metadata", "store", "service_tier", "stream_options"})
# OpenAI body fields we cannot honour: accepted only at the value that turns them off.
NEUTRAL_BODY_VALUES: dict[str, Any] = {
    "n": 1, "best_of": 1, "stream": False, "echo": False, "logprobs": False,
    "frequency_penalty": 0, "presence_penalty": 0,
}
SIMPLE_KEYS = ("custom_id", "text", "prompt", "messages", "max_length", "max_tokens", "temperature", "top_p",
               "seed", "stop", "session_id", "priority", "model", "metadata")
MAX_SEED = 2**63 - 1  # the engine's bound (workers/sampling.py)


def is_openai_shape(obj: dict[str, Any]) -> bool:
    """True for an OpenAI batch line (it has `body`, `url` or `method`), False for a simple line."""
    return "body" in obj or "url" in obj or "method" in obj


def parse_request(obj: dict[str, Any], *, path: str, line: int, limits: InputLimits,
                  default_max_tokens: int, served: ServedModel | None = None) -> RequestSpec | LineError:
    """Validate one line's object. `custom_id` defaults to `str(line)`; uniqueness across the file is
    the reader's job. A model the line names must be `served` (`check_model`; None: not checked).
    Never raises for bad input: every problem becomes a `LineError`."""
    custom_id: str | None = None
    try:
        custom_id = check_id(obj.get("custom_id"), "custom_id", limits)
        custom_id = str(line) if custom_id is None else custom_id
        if is_openai_shape(obj):
            return _parse_openai(obj, line, custom_id, limits, default_max_tokens, served)
        return _parse_simple(obj, line, custom_id, limits, default_max_tokens, served)
    except InvalidField as e:
        return LineError(path, line, e.field, e.code, e.message, custom_id)


def _parse_openai(obj: dict[str, Any], line: int, custom_id: str, limits: InputLimits,
                  default_max_tokens: int, served: ServedModel | None) -> RequestSpec:
    _check_keys(obj, OPENAI_KEYS, "")
    method = obj.get("method")
    # OpenAI requires "method"; we default it to POST, the only method there is, to spare Parquet
    # users a constant column.
    if method is not None and check_string(method, "method") != "POST":
        raise InvalidField("method", "unsupported_method",
                           f'method {show(method)} is not supported; batch lines use "POST"')
    url = obj.get("url")
    if url is None:
        raise InvalidField("url", "missing_field", 'add "url": "/v1/chat/completions" or "/v1/completions"')
    endpoint = URL_ENDPOINTS.get(check_string(url, "url"))
    if endpoint is None:
        raise InvalidField("url", "unknown_endpoint",
                           f'url {show(url)} is not supported; use "/v1/completions" or "/v1/chat/completions"')
    body = obj.get("body")
    if body is None:
        raise InvalidField("body", "missing_field",
                           'add a "body" object holding the request ("prompt" or "messages", ...)')
    if not isinstance(body, dict):
        raise InvalidField("body", "invalid_type", f"must be an object, {got(body)}")
    _check_body_keys(body)

    # Each endpoint takes one kind of input; the other is a mistake worth naming, not ignoring.
    wanted, other = ("prompt", "messages") if endpoint == "completions" else ("messages", "prompt")
    if body.get(other) is not None:
        raise InvalidField(f"body.{other}", "endpoint_mismatch",
                           f'"{other}" does not go to {url}; send "{wanted}" instead, or change the url')
    if body.get(wanted) is None:
        hint = '"prompt": "<your prompt>"' if wanted == "prompt" else '"messages": [{"role": "user", "content": "..."}]'
        raise InvalidField(f"body.{wanted}", "missing_field", f"add {hint}")
    prompt = check_prompt(body["prompt"], "body.prompt", limits) if wanted == "prompt" else None
    messages = check_messages(body["messages"], "body.messages", limits) if wanted == "messages" else None
    return RequestSpec(
        line=line, custom_id=custom_id, endpoint=endpoint, prompt=prompt, messages=messages,  # type: ignore[arg-type]
        max_tokens=_max_tokens(body, "body.", ("max_tokens", "max_completion_tokens"), limits, default_max_tokens),
        **_sampling(body, "body.", limits),
        model=check_model(body.get("model"), "body.model", limits, served),
    )


def _parse_simple(obj: dict[str, Any], line: int, custom_id: str, limits: InputLimits,
                  default_max_tokens: int, served: ServedModel | None) -> RequestSpec:
    _check_keys(obj, SIMPLE_KEYS, "")
    given = [k for k in ("text", "prompt", "messages") if obj.get(k) is not None]
    if not given:
        raise InvalidField("text", "missing_field", 'add "text": "<your prompt>" (or "messages": [...] for a chat)')
    if len(given) > 1:
        raise InvalidField(given[1], "conflicting_fields", f'give one of "{given[0]}" and "{given[1]}", not both')
    chat = given[0] == "messages"
    return RequestSpec(
        line=line, custom_id=custom_id, endpoint="chat.completions" if chat else "completions",
        prompt=None if chat else check_prompt(obj[given[0]], given[0], limits),
        messages=check_messages(obj["messages"], "messages", limits) if chat else None,
        max_tokens=_max_tokens(obj, "", ("max_length", "max_tokens"), limits, default_max_tokens),
        **_sampling(obj, "", limits),
        session_id=check_id(obj.get("session_id"), "session_id", limits),
        priority=check_priority(obj.get("priority")),
        model=check_model(obj.get("model"), "model", limits, served),
    )


def _sampling(data: dict[str, Any], prefix: str, limits: InputLimits) -> dict[str, Any]:
    seed = data.get("seed")
    return {
        "temperature": check_real(data.get("temperature"), prefix + "temperature", 0.0, 2.0, DEFAULT_TEMPERATURE),
        "top_p": check_top_p(data.get("top_p"), prefix + "top_p", DEFAULT_TOP_P),
        "seed": None if seed is None else check_int(seed, prefix + "seed", 0, MAX_SEED),
        "stop": check_stop(data.get("stop"), prefix + "stop", limits),
    }


def _max_tokens(data: dict[str, Any], prefix: str, names: tuple[str, str], limits: InputLimits, default: int) -> int:
    given = [n for n in names if data.get(n) is not None]
    if len(given) > 1:
        raise InvalidField(prefix + given[1], "conflicting_fields",
                           f'give either "{given[0]}" or "{given[1]}", not both')
    if not given:
        return default
    return check_int(data[given[0]], prefix + given[0], 1, limits.max_tokens, limit_name="max_tokens")


def _check_keys(obj: dict[str, Any], allowed: tuple[str, ...], prefix: str) -> None:
    for key in obj:
        if key not in allowed:
            close = close_match(key, allowed)
            hint = f'did you mean "{close}"?' if close else f"the known fields are {', '.join(allowed)}"
            raise InvalidField(prefix + short(key), "unknown_field", f"unknown field {show(key)}; {hint}")


def _check_body_keys(body: dict[str, Any]) -> None:
    for key, value in body.items():
        if key in BODY_KEYS or key in IGNORED_BODY_KEYS:
            continue
        field = "body." + short(key)
        if key in NEUTRAL_BODY_VALUES:
            neutral = NEUTRAL_BODY_VALUES[key]
            if value is None or _same_value(value, neutral):
                continue
            raise InvalidField(field, "unsupported_field",
                               f"{key}={show(value)} is not supported; remove it or set it to {json.dumps(neutral)}")
        close = close_match(key, BODY_KEYS)
        if close:  # a typo of a field we support
            raise InvalidField(field, "unknown_field", f'unknown field {show(key)}; did you mean "{close}"?')
        raise InvalidField(field, "unsupported_field", f"{show(key)} is not supported by this pipeline; remove it")


def _same_value(value: Any, neutral: Any) -> bool:
    if isinstance(neutral, bool):
        return value is neutral
    return not isinstance(value, bool) and isinstance(value, (int, float)) and value == neutral
