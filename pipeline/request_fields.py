"""Checks for the individual fields of a request line, and a strict JSON decoder. Each check
returns the clean value or raises `InvalidField` naming the field, a stable code and a message that
says what to do; `pipeline.request_parser` turns it into a `LineError`.
"""

from __future__ import annotations

import difflib
import json
import re
from typing import Any

from pipeline.limits import InputLimits
from pipeline.served_model import ServedModel
from pipeline.request_spec import PRIORITIES, ROLE_ALIASES, ROLES

_SURROGATE = re.compile("[\ud800-\udfff]")
MIN_TOP_P = 2.0**-126  # the engine's bound (workers/sampling.py): float32's smallest normal number


class InvalidField(Exception):
    """What is wrong with a line, before it is a LineError (which also needs the path and line)."""

    def __init__(self, field: str | None, code: str, message: str) -> None:
        super().__init__(message)
        self.field, self.code, self.message = field, code, message


def decode_json(text: str, field: str | None = None) -> Any:
    """`json.loads`, strictly: NaN/Infinity and an object with a key twice are errors (Python would
    accept the first and keep the last of the second, silently). Raises InvalidField on `field`
    (None for a whole line; a duplicate key in a whole line names the key)."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except InvalidField as e:  # from the hooks, which do not know `field`
        raise InvalidField(e.field if field is None else field, e.code, e.message) from None
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":
            raise InvalidField(field, "invalid_json",
                               "more than one JSON value; put each request on its own line") from None
        # json's "Unterminated string starting at" already ends in "at": no "at at column 10".
        reason = e.msg.removesuffix(" at")
        message = f"invalid JSON: {reason} at column {e.colno}; write one complete JSON object per line"
        raise InvalidField(field, "invalid_json", message) from None
    except RecursionError:
        raise InvalidField(field, "invalid_json", "invalid JSON: nested too deeply to read") from None
    except ValueError as e:  # an integer of more than 4300 digits
        raise InvalidField(field, "invalid_json", f"invalid JSON: {str(e).split(':')[0]}") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise InvalidField(short(key), "duplicate_key", f"the key {show(key)} appears twice in one object; keep one")
    return obj


def _no_constant(name: str) -> Any:
    raise InvalidField(None, "invalid_json", f"invalid JSON: {name} is not a JSON number; write a number or null")


def check_int(value: Any, field: str, low: int, high: int, limit_name: str | None = None) -> int:
    """An integer in [low, high]; a whole-number float counts, a boolean does not."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidField(field, "invalid_type", f"must be a whole number, {got(value)}")
    if not low <= value <= high:
        note = f" (the {limit_name} limit)" if limit_name and value > high else ""
        raise InvalidField(field, "out_of_range", f"must be between {low} and {high}{note}, got {value}")
    return value


def check_real(value: Any, field: str, low: float, high: float, default: float, low_open: bool = False) -> float:
    """A number in [low, high] (or (low, high] when `low_open`); `default` when absent."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidField(field, "invalid_type", f"must be a number, {got(value)}")
    ok = (low < value if low_open else low <= value) and value <= high  # False for NaN (Parquet floats)
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise InvalidField(field, "out_of_range", f"must be in {interval}, got {value!r}")
    return float(value)


def check_top_p(value: Any, field: str, default: float) -> float:
    """A top_p in (0, 1] that the engine's float32 sampler does not round to 0; `default` when absent."""
    top_p = check_real(value, field, 0.0, 1.0, default, low_open=True)
    if top_p < MIN_TOP_P:
        raise InvalidField(field, "out_of_range", f"is {top_p!r}, which the engine's float32 sampler rounds to 0 "
                                                  f"(keeping no token); use at least {MIN_TOP_P:.3g}")
    return top_p


def check_string(value: Any, field: str) -> str:
    """A string that can be stored and encoded: no NUL, no lone surrogate."""
    if not isinstance(value, str):
        raise InvalidField(field, "invalid_type", f"must be a string, {got(value)}")
    # Both would break downstream: PostgreSQL text refuses NUL, and a lone surrogate (from a JSON
    # escape like "\ud800") cannot be encoded as UTF-8 for the database or the output file.
    if "\x00" in value:
        raise InvalidField(field, "nul_byte", "holds a NUL character (\\u0000); remove it")
    if _SURROGATE.search(value):
        raise InvalidField(field, "not_utf8",
                           "holds a lone UTF-16 surrogate escape (like \\ud800); fix the text's encoding")
    return value


def check_id(value: Any, field: str, limits: InputLimits) -> str | None:
    """An identifier (custom_id, session_id, model): a non-empty string of at most `max_id_chars`."""
    if value is None:
        return None
    text = check_string(value, field)
    if not text:
        raise InvalidField(field, "invalid_value", "must not be empty; leave it out instead")
    if len(text) > limits.max_id_chars:
        raise InvalidField(field, "too_long",
                           f"is {len(text):,} characters; at most {limits.max_id_chars} are allowed")
    return text


def check_priority(value: Any) -> str | None:
    """One of the queue priorities, or None when absent."""
    if value is not None and check_string(value, "priority") not in PRIORITIES:
        raise InvalidField("priority", "invalid_value", f"{show(value)} is not one of {', '.join(PRIORITIES)}")
    return value


def check_model(value: Any, field: str, limits: InputLimits, served: ServedModel | None) -> str | None:
    """A line's model as the served name it stands for (None when absent). A name the workers do not
    serve is `model_not_found`; with `served` None (a file only read, not submitted) any name passes."""
    name = check_id(value, field, limits)
    if name is None or served is None:
        return name
    resolved = served.resolve(name)
    if resolved is None:
        raise InvalidField(field, "model_not_found",
                           f"model {show(name)} is not served here (the workers serve {show(served.name)}); "
                           f'remove "{field.rpartition(".")[2]}", name that model, or add {show(name)} to the '
                           "model_aliases setting (PIPELINE_MODEL_ALIASES)")
    return resolved


def check_prompt(value: Any, field: str, limits: InputLimits) -> str:
    """A completion prompt: one non-empty string of at most `max_prompt_chars`."""
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        raise InvalidField(field, "multiple_prompts",
                           f"holds a list of {len(value)} prompts; send one prompt per line (one request per line)")
    if isinstance(value, list) and value and all(type(v) is int for v in value):
        raise InvalidField(field, "invalid_type", "token ids are not supported; send the prompt as text")
    text = check_string(value, field)
    if not text:
        raise InvalidField(field, "empty_prompt", "is empty; give the text to complete")
    if len(text) > limits.max_prompt_chars:
        raise InvalidField(field, "too_long",
                           f"is {len(text):,} characters; at most {limits.max_prompt_chars:,} are allowed "
                           "(max_prompt_chars)")
    return text


def check_messages(value: Any, field: str, limits: InputLimits) -> tuple[dict[str, str], ...]:
    """Chat messages as `{"role", "content"}` dicts, content parts joined to one string."""
    if not isinstance(value, list):
        raise InvalidField(field, "invalid_type", f'must be a list of {{"role", "content"}} objects, {got(value)}')
    if not value:
        raise InvalidField(field, "empty_messages", 'is empty; give at least one {"role": "user", "content": "..."}')
    if len(value) > limits.max_messages:
        raise InvalidField(field, "too_many",
                           f"holds {len(value):,} messages; at most {limits.max_messages} are allowed")
    out: list[dict[str, str]] = []
    for i, message in enumerate(value):
        at = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise InvalidField(at, "invalid_type", f'must be an object {{"role", "content"}}, {got(message)}')
        for key in message:
            if key not in ("role", "content", "name"):  # "name" is OpenAI's, harmless, ignored
                raise InvalidField(f"{at}.{short(key)}", "unsupported_field",
                                   f'{show(key)} is not supported; a message has "role" and "content"')
        role = message.get("role")
        if role is None:
            raise InvalidField(f"{at}.role", "missing_field", 'add "role": "user" (or "system", "assistant")')
        role = ROLE_ALIASES.get(check_string(role, f"{at}.role"), role)
        if role not in ROLES:
            raise InvalidField(f"{at}.role", "unknown_role",
                               f'role {show(role)} is not supported; use "system", "user" or "assistant" '
                               '("developer" counts as "system")')
        out.append({"role": role, "content": _content(message.get("content"), f"{at}.content")})
    total = sum(len(m["content"]) for m in out)
    if total > limits.max_prompt_chars:
        raise InvalidField(field, "too_long", f"hold {total:,} characters in all; at most "
                                              f"{limits.max_prompt_chars:,} are allowed (max_prompt_chars)")
    return tuple(out)


def _content(value: Any, field: str) -> str:
    if value is None:
        raise InvalidField(field, "missing_field", 'add "content": "<the message text>"')
    if not isinstance(value, list):
        if not isinstance(value, str):
            raise InvalidField(field, "invalid_type", f"must be a string or a list of text parts, {got(value)}")
        return check_string(value, field)
    texts = []
    for j, part in enumerate(value):
        at = f"{field}[{j}]"
        if not isinstance(part, dict):
            raise InvalidField(at, "invalid_type", f'must be an object {{"type": "text", "text": ...}}, {got(part)}')
        if part.get("type") != "text":
            raise InvalidField(f"{at}.type", "unsupported_content",
                               f'content parts of type {show(part.get("type"))} are not supported; '
                               'only "text" parts are')
        if part.get("text") is None:
            raise InvalidField(f"{at}.text", "missing_field", 'add "text": "<the text>"')
        texts.append(check_string(part["text"], f"{at}.text"))
    return "\n".join(texts)  # how OpenAI-compatible servers (vLLM) join text parts


def check_stop(value: Any, field: str, limits: InputLimits) -> tuple[str, ...]:
    """Stop strings: one string or a list of at most `max_stop_strings` non-empty strings."""
    if value is None:
        return ()
    if isinstance(value, str):
        items, fields = [value], [field]
    elif isinstance(value, list):
        if len(value) > limits.max_stop_strings:
            raise InvalidField(field, "too_many",
                               f"holds {len(value)} stop strings; at most {limits.max_stop_strings} are allowed")
        items, fields = value, [f"{field}[{i}]" for i in range(len(value))]
    else:
        raise InvalidField(field, "invalid_type", f"must be a string or a list of strings, {got(value)}")
    for item, at in zip(items, fields, strict=True):
        if not check_string(item, at):
            raise InvalidField(at, "invalid_value", "an empty stop string would stop at once; remove it")
    return tuple(items)


def short(text: str, limit: int = 40) -> str:
    """`text` cut to `limit` characters for a message."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def show(value: Any) -> str:
    """A value as the user wrote it in JSON, cut short; ASCII-escaped if it holds lone surrogates."""
    if isinstance(value, str):
        value = short(value)
        return json.dumps(value, ensure_ascii=bool(_SURROGATE.search(value)))
    if value is None or isinstance(value, (bool, int, float)):
        return json.dumps(value) if not isinstance(value, float) else repr(value)
    return type(value).__name__


def got(value: Any) -> str:
    """The end of a type error message: "got the string \"ten\"", "got an array"."""
    if isinstance(value, list):
        return "got an array"
    if isinstance(value, dict):
        return "got an object"
    if isinstance(value, str):
        return f"got the string {show(value)}"
    return f"got {show(value)}"


def close_match(key: str, allowed: tuple[str, ...]) -> str | None:
    """The allowed name `key` is most likely a typo of, or None."""
    # difflib is quadratic-ish: only try it on keys of a sensible length.
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.75) if len(key) <= 64 else []
    return close[0] if close else None
