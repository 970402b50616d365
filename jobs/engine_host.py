"""The process-local warm engine, and the translation of a stored request into what it runs.

A worker process builds its engine once, when it starts (`pipeline worker`), and keeps it (with
its KV cache and prefix cache) for every chunk: that is what makes shared prefixes cheap across
tasks and jobs. Several task threads share the one `EngineLoop`, which batches them together.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from pipeline.request_spec import CHAT_URL, COMPLETIONS_URL
from workers.engine import LLMEngine
from workers.engine_loop import EngineLoop
from workers.sampling import SamplingParams
from workers.tokenizer import Tokenizer

if TYPE_CHECKING:
    from pipeline.settings import Settings


_lock = threading.Lock()
_loop: EngineLoop | None = None
_loop_key: tuple[tuple[str, Any], ...] | None = None


def get_engine_loop(settings: Settings) -> EngineLoop:
    """This process's engine loop, built from `settings` on first use and kept afterwards.

    Thread-safe: concurrent first callers (task threads of one worker) build one engine, not one
    each. Asking again with different engine settings is a programming error (a process serves one
    model); it raises ValueError rather than silently handing back the other engine.
    """
    from workers.config import EngineConfig

    global _loop, _loop_key
    kwargs = settings.engine_kwargs()
    key = tuple(sorted(kwargs.items()))
    with _lock:
        if _loop is None:
            _loop = EngineLoop(lambda: LLMEngine(EngineConfig(**kwargs)))
            _loop_key = key
        elif key != _loop_key:
            raise ValueError("this process already holds an engine built from other settings; "
                             "one process serves one engine configuration")
        return _loop


def current_engine_loop() -> EngineLoop | None:
    """This process's engine loop if it was built (a worker builds it when it starts), else None."""
    return _loop


def to_engine_request(endpoint: str, body: dict[str, Any], tokenizer: Tokenizer) -> tuple[list[int], SamplingParams]:
    """(prompt token ids, sampling parameters) for a stored request.

    `body` is what submit stored: `prompt` (completions) or `messages` (chat), plus the sampling
    fields of `RequestSpec.params_dict()`. Chat messages go through the model's chat template.
    Raises ValueError for an unknown endpoint or parameters the sampler refuses.
    """
    if endpoint == CHAT_URL:
        token_ids = tokenizer.encode_chat([{"role": m["role"], "content": m["content"]} for m in body["messages"]])
    elif endpoint == COMPLETIONS_URL:
        token_ids = tokenizer.encode(body["prompt"])
    else:
        raise ValueError(f"unknown endpoint {endpoint!r}; expected {COMPLETIONS_URL} or {CHAT_URL}")
    params = SamplingParams(
        max_tokens=body["max_tokens"],
        temperature=body.get("temperature", 1.0),  # OpenAI's default when a line sets none
        top_p=body.get("top_p", 1.0),
        seed=body.get("seed"),
        stop=tuple(body.get("stop") or ()) or None,
    )
    return token_ids, params
