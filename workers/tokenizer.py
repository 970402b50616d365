"""Tokenizers: Hugging Face `tokenizer.json` through the `tokenizers` library, and the byte-level
one of the built-in tiny model. Both render chat messages to a prompt string."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from datetime import datetime
from pathlib import Path
from typing import Any

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
        """The prompt text for a conversation, ending where the assistant's answer begins."""

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
    def __init__(self, folder: Path, extra_eos_ids: tuple[int, ...] = ()) -> None:
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
        self._template_source = _chat_template(folder, self._cfg)
        self._template = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int]) -> str:
        return self._tok.decode(token_ids, skip_special_tokens=True)

    def render_chat(self, messages: list[Message]) -> str:
        if self._template_source is None:
            raise ValueError("this model has no chat template (tokenizer_config.json 'chat_template'); send completion prompts instead")
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_template_error
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._template = env.from_string(self._template_source)
        return self._template.render(
            messages=messages, add_generation_prompt=True, bos_token=self.bos_token or "", eos_token=self.eos_token or ""
        )


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", ...} in older configs
        return value.get("content")
    return value


def _chat_template(folder: Path, cfg: dict[str, Any]) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: use the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


def _raise_template_error(message: str) -> None:
    raise ValueError(f"chat template refused the messages: {message}")
