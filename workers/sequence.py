"""One request's state inside the engine."""

from __future__ import annotations

import enum
import time

import torch

from workers.block_pool import KVBlock
from workers.hashing import BlockHash
from workers.sampling import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """Tokens (prompt then output), how many of them have KV in the cache, and the blocks holding it."""

    __slots__ = (
        "request_id", "prompt_token_ids", "output_token_ids", "params", "status", "num_computed_tokens",
        "blocks", "block_hashes", "root_hash", "num_cached_tokens", "finish_reason", "generator",
        "arrival_time", "first_scheduled_time", "first_token_time", "finished_time",
        "num_preemptions", "num_registered_blocks", "keep_logits", "last_logits", "engine_seconds",
    )

    def __init__(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, root_hash: BlockHash,
        generator: torch.Generator | None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.output_token_ids: list[int] = []
        self.params = params
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.blocks: list[KVBlock] = []
        self.block_hashes: list[BlockHash] = []  # of every full block of known tokens, computed lazily
        self.root_hash = root_hash
        self.num_cached_tokens: int | None = None  # prompt tokens served by the prefix cache, set once
        self.finish_reason: str | None = None
        self.generator = generator  # per-request RNG: sampling does not depend on the batch
        self.arrival_time = time.perf_counter()
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.finished_time: float | None = None
        # This sequence's share of the steps it ran in (see LLMEngine.step): what it cost the engine.
        self.engine_seconds = 0.0
        self.num_preemptions = 0
        self.num_registered_blocks = 0  # leading blocks already offered to the prefix cache
        self.keep_logits = False  # evaluation: keep the full logits of the last sampled position
        self.last_logits: torch.Tensor | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_range(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]

    def token_view(self, end: int | None = None) -> TokenView:
        """The first `end` tokens (all by default), sliced on demand without copying the lists."""
        return TokenView(self, self.num_tokens if end is None else end)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED


class TokenView:
    """A read-only, sliceable prefix of a sequence's tokens (prompt then output): hashing the
    blocks a sequence fills reads only the new block, not a fresh copy of every token so far."""

    __slots__ = ("_seq", "_len")

    def __init__(self, seq: Sequence, length: int) -> None:
        self._seq, self._len = seq, length

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: slice) -> list[int]:
        start, stop, step = index.indices(self._len)
        assert step == 1, "TokenView supports contiguous slices only"
        return self._seq.token_range(start, stop)
