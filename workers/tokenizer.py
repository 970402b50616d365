"""Tokenizers: Hugging Face `tokenizer.json` through the `tokenizers` library, and the byte-level
one of the built-in tiny model. Both render chat messages to a prompt string."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers.chat_template import RENDER_BUDGET_S, ChatTemplate
from workers.errors import ChatTemplateError

Message = dict[str, Any]


class Tokenizer(ABC):
    eos_token_ids: frozenset[int]

    @abstractmethod
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    @abstractmethod
    def decode(self, token_ids: list[int]) -> str:
        """Text of the tokens, special tokens left out."""

    @abstractmethod
    def render_chat(self, messages: list[Message]) -> str:
        """The prompt text for a conversation, ending where the assistant's answer begins. Raises
        ChatTemplateError when it cannot be rendered (that request's error alone)."""

    def encode_chat(self, messages: list[Message]) -> list[int]:
        # The template writes any BOS itself, so the tokenizer must not add another.
        return self.encode(self.render_chat(messages), add_special_tokens=False)


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0-255, then BOS and EOS. Every string round-trips."""

    BOS = 256
    EOS = 257
    VOCAB_SIZE = 258

    def __init__(self) -> None:
        self.eos_token_ids = frozenset({self.EOS})

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.BOS, *ids] if add_special_tokens else ids

    def decode(self, token_ids: list[int]) -> str:
        return bytes(t for t in token_ids if t < 256).decode("utf-8", errors="replace")

    def render_chat(self, messages: list[Message]) -> str:
        turns = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
        return f"{turns}<|assistant|>\n"

    def encode_chat(self, messages: list[Message]) -> list[int]:
        return [self.BOS, *self.encode(self.render_chat(messages), add_special_tokens=False)]


class HFTokenizer(Tokenizer):
    def __init__(self, folder: Path, extra_eos_ids: tuple[int, ...] = (),
                 chat_template_budget_s: float = RENDER_BUDGET_S) -> None:
        """Raises ValueError for a folder without tokenizer.json or with a broken chat template
        (`ChatTemplate` compiles it here, so a broken one stops the model from loading)."""
        from tokenizers import Tokenizer as RustTokenizer

        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"{folder}: tokenizer.json is missing; the model folder needs the Hugging Face fast tokenizer file")
        self._tok = RustTokenizer.from_file(str(path))
        cfg_path = folder / "tokenizer_config.json"
        self._cfg: dict[str, Any] = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self.bos_token = _token_text(self._cfg.get("bos_token"))
        self.eos_token = _token_text(self._cfg.get("eos_token"))
        eos = set(extra_eos_ids)
        if self.eos_token is not None and self._tok.token_to_id(self.eos_token) is not None:
            eos.add(self._tok.token_to_id(self.eos_token))
        self.eos_token_ids = frozenset(eos)
        source = _chat_template(folder, self._cfg)
        self._template = None if source is None else ChatTemplate(
            source.text, source.origin, bos_token=self.bos_token or "", eos_token=self.eos_token or "",
            budget_s=chat_template_budget_s)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int]) -> str:
        return self._tok.decode(token_ids, skip_special_tokens=True)

    def render_chat(self, messages: list[Message]) -> str:
        """Raises ChatTemplateError when the model has no template or it cannot render `messages`."""
        if self._template is None:
            raise ChatTemplateError("this model has no chat template (tokenizer_config.json 'chat_template'); "
                                    "send completion prompts instead", "missing")
        return self._template.render(messages)


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", ...} in older configs
        return value.get("content")
    return value


@dataclass(frozen=True, slots=True)
class _TemplateSource:
    text: str
    origin: str  # the file it came from, for messages


def _chat_template(folder: Path, cfg: dict[str, Any]) -> _TemplateSource | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return _TemplateSource(jinja.read_text(), str(jinja))
    origin = str(folder / "tokenizer_config.json")
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: use the default one
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    if template is None:
        return None
    if not isinstance(template, str):
        raise ValueError(f"{origin}: 'chat_template' must be a Jinja template string; fix it or remove it")
    return _TemplateSource(template, origin)
