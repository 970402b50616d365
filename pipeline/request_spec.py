"""What reading an input file produces: one `RequestSpec` per good line, one `LineError` per bad one.

Both are plain data that travel as JSON (`to_json`/`from_json`): into request rows, Celery
messages and error files. Never pickle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pipeline.queues import QUEUE_NAMES

Endpoint = Literal["completions", "chat.completions"]
ENDPOINTS: tuple[str, ...] = ("completions", "chat.completions")
# The URL of each endpoint in OpenAI batch lines; stored requests keep the URL, specs the name.
COMPLETIONS_URL = "/v1/completions"
CHAT_URL = "/v1/chat/completions"
ENDPOINT_URLS: dict[str, str] = {"completions": COMPLETIONS_URL, "chat.completions": CHAT_URL}
URL_ENDPOINTS: dict[str, str] = {url: name for name, url in ENDPOINT_URLS.items()}
PRIORITIES: tuple[str, ...] = QUEUE_NAMES  # a line's priority names the queue its chunk goes to
ROLES: tuple[str, ...] = ("system", "user", "assistant")
# Other names of a role, as OpenAI accepts them: "developer" is its newer name for "system".
ROLE_ALIASES: dict[str, str] = {"developer": "system"}

# OpenAI's defaults for a request that does not set them.
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0

# The stable `LineError.code` values. Users and scripts match on them, so never rename one.
LINE_ERROR_CODES: frozenset[str] = frozenset({
    # the line itself
    "line_too_long", "not_utf8", "nul_byte", "invalid_json", "not_an_object", "duplicate_key",
    # the shape of the request
    "missing_field", "unknown_field", "unsupported_field", "conflicting_fields",
    "unknown_endpoint", "unsupported_method", "endpoint_mismatch", "duplicate_custom_id",
    # field values
    "invalid_type", "invalid_value", "out_of_range", "too_long", "too_many",
    "empty_prompt", "multiple_prompts", "empty_messages", "unknown_role", "unsupported_content",
    # what the line asks of the workers
    "model_not_found",
})


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """One validated request, ready for the database and a worker.

    `line` is the 1-based physical line of a JSONL file (blank lines count) or the row number + 1
    of a Parquet file. Exactly one of `prompt` (completions) and `messages` (chat.completions) is
    set; `messages` holds `{"role", "content"}` dicts with the content already joined to one string
    (and a role alias such as "developer" already made "system"). `max_tokens` counts generated
    tokens only. `priority` is the line's own queue (None: the job's). `model` is the served name
    the line's model resolved to (`ServedModel.resolve`), None when the line names none.
    """

    line: int
    custom_id: str
    endpoint: Endpoint
    prompt: str | None
    messages: tuple[dict[str, str], ...] | None
    max_tokens: int
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    seed: int | None = None
    stop: tuple[str, ...] = ()
    session_id: str | None = None
    priority: str | None = None
    model: str | None = None

    def __post_init__(self) -> None:
        # Internal invariants: the reader only builds valid specs, so these are asserts, not errors.
        assert self.endpoint in ENDPOINTS, self.endpoint
        assert (self.prompt is None) == (self.endpoint == "chat.completions"), "prompt iff completions"
        assert (self.messages is None) == (self.endpoint == "completions"), "messages iff chat"
        assert self.priority is None or self.priority in PRIORITIES, self.priority

    def params_dict(self) -> dict[str, Any]:
        """The sampling fields as a JSON-able dict; its keys are `workers.sampling.SamplingParams`
        arguments, so a worker can call `SamplingParams(**spec.params_dict())`."""
        return {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "stop": list(self.stop),
        }

    def to_json(self) -> dict[str, Any]:
        """Every field as plain JSON types (tuples become lists)."""
        return {
            "line": self.line,
            "custom_id": self.custom_id,
            "endpoint": self.endpoint,
            "prompt": self.prompt,
            "messages": None if self.messages is None else [dict(m) for m in self.messages],
            **self.params_dict(),
            "session_id": self.session_id,
            "priority": self.priority,
            "model": self.model,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RequestSpec:
        """The inverse of `to_json`. The data is our own (a database row, a task message), so it is
        trusted: a missing key raises KeyError."""
        messages = data["messages"]
        return cls(
            line=data["line"],
            custom_id=data["custom_id"],
            endpoint=data["endpoint"],
            prompt=data["prompt"],
            messages=None if messages is None else tuple(
                {"role": m["role"], "content": m["content"]} for m in messages),
            max_tokens=data["max_tokens"],
            temperature=data["temperature"],
            top_p=data["top_p"],
            seed=data["seed"],
            stop=tuple(data["stop"]),
            session_id=data["session_id"],
            priority=data["priority"],
            model=data["model"],
        )


@dataclass(frozen=True, slots=True)
class LineError:
    """Why one input line was rejected. The job still runs its other lines (unless `--strict`).

    `field` is a dotted path into the line ("body.max_tokens", "messages[2].role") or None when the
    line as a whole is bad (not JSON, too long). `code` is one of `LINE_ERROR_CODES`. `message` is
    one line that says what is wrong and what to do. `custom_id` is the line's id when it could be
    read and is not a duplicate, so an error file can name the request; None otherwise.
    """

    path: str
    line: int
    field: str | None
    code: str
    message: str
    custom_id: str | None = None

    def __post_init__(self) -> None:
        assert self.code in LINE_ERROR_CODES, self.code

    def __str__(self) -> str:
        if self.field is None:
            return f"{self.path}:{self.line}: {self.message}"
        return f"{self.path}:{self.line}: {self.field}: {self.message}"

    def to_json(self) -> dict[str, Any]:
        """Every field as plain JSON types."""
        return {
            "path": self.path,
            "line": self.line,
            "field": self.field,
            "code": self.code,
            "message": self.message,
            "custom_id": self.custom_id,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LineError:
        """The inverse of `to_json`."""
        return cls(
            path=data["path"],
            line=data["line"],
            field=data["field"],
            code=data["code"],
            message=data["message"],
            custom_id=data.get("custom_id"),
        )
