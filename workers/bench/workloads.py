"""Seeded benchmark workloads: token-id prompts, how many tokens each asks for, and how they share
prefixes. Every generator takes its sizes as arguments; `make_workload` holds the two presets."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FIRST_TOKEN = 3  # ids 0-2 are pad, EOS and BOS in the benchmark tokenizer
WORKLOADS = ("shared-prefix", "distinct", "multi-turn", "skewed")
SCALES = ("full", "small")


@dataclass(frozen=True, slots=True)
class Workload:
    """Prompts in submission order. `prefix_ids[i]` names the shared prefix prompt i starts with
    (None: it shares none) and `prefix_lens[i]` its length. `waves` splits the prompts into groups
    run to completion one after the other (None: all submitted at once). `num_kv_blocks` is the KV
    pool the workload asks for (None: the engine sizes it)."""

    name: str
    prompts: list[list[int]]
    max_tokens: list[int]
    prefix_ids: list[int | None]
    prefix_lens: list[int]
    waves: list[list[int]] | None = None
    num_kv_blocks: int | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def num_requested_tokens(self) -> int:
        return sum(self.max_tokens)

    def ideal_cached_tokens(self) -> list[int]:
        """Prompt tokens an ideal prefix cache serves: every later use of a shared prefix."""
        seen: set[int] = set()
        cached = []
        for prefix, n in zip(self.prefix_ids, self.prefix_lens):
            cached.append(n if prefix in seen else 0)
            if prefix is not None:
                seen.add(prefix)
        return cached


def shared_prefix(
    vocab_size: int, num_prompts: int = 64, prefix_len: int = 256, own_len: tuple[int, int] = (16, 64),
    new_tokens: int = 64, seed: int = 0,
) -> Workload:
    """One shared prefix, then `own_len` (inclusive range) tokens of each prompt's own."""
    rng = np.random.default_rng(seed)
    prefix = _tokens(rng, vocab_size, prefix_len)
    prompts = [prefix + _tokens(rng, vocab_size, _length(rng, own_len)) for _ in range(num_prompts)]
    return Workload("shared-prefix", prompts, [new_tokens] * num_prompts, [0] * num_prompts, [prefix_len] * num_prompts)


def distinct(
    vocab_size: int, num_prompts: int = 64, prompt_len: tuple[int, int] = (32, 320),
    new_tokens: tuple[int, int] = (8, 128), seed: int = 1,
) -> Workload:
    """Unrelated prompts of varied lengths asking for varied numbers of tokens (inclusive ranges)."""
    rng = np.random.default_rng(seed)
    prompts = [_tokens(rng, vocab_size, _length(rng, prompt_len)) for _ in range(num_prompts)]
    max_tokens = [int(n) for n in rng.integers(new_tokens[0], new_tokens[1] + 1, size=num_prompts)]
    return Workload("distinct", prompts, max_tokens, [None] * num_prompts, [0] * num_prompts)


def skewed(
    vocab_size: int, block_size: int, num_requests: int = 256, num_hot: int = 4, prefix_len: int = 128,
    own_len: tuple[int, int] = (8, 16), new_tokens: int = 4, hot_fraction: float = 0.5, wave_size: int = 8,
    spare_hot_sets: float = 1.5, seed: int = 2,
) -> Workload:
    """A few hot prefixes, picked with Zipf weights 1, 1/2, 1/3, ... for `hot_fraction` of the
    requests, amid a stream of one-off prefixes; each request adds `own_len` tokens of its own.

    Requests go in waves of `wave_size`, each run to completion before the next, so what the cache
    keeps between waves decides the hits. The pool holds the largest wave plus `spare_hot_sets`
    times the hot prefixes' blocks: far fewer than all the prefixes the stream brings, so a policy
    must choose what to keep.
    """
    rng = np.random.default_rng(seed)
    hot = [_tokens(rng, vocab_size, prefix_len) for _ in range(num_hot)]
    weights = 1.0 / np.arange(1, num_hot + 1)
    weights /= weights.sum()
    prompts, prefix_ids = [], []
    for i in range(num_requests):
        if rng.random() < hot_fraction:
            k = int(rng.choice(num_hot, p=weights))
            prefix, prefix_id = hot[k], k
        else:
            prefix, prefix_id = _tokens(rng, vocab_size, prefix_len), num_hot + i
        prompts.append(prefix + _tokens(rng, vocab_size, _length(rng, own_len)))
        prefix_ids.append(prefix_id)
    max_tokens = [new_tokens] * num_requests
    waves = [list(range(s, min(s + wave_size, num_requests))) for s in range(0, num_requests, wave_size)]
    blocks = lambda i: -(-(len(prompts[i]) + max_tokens[i]) // block_size)  # noqa: E731
    largest_wave = max(sum(blocks(i) for i in wave) for wave in waves)
    hot_blocks = num_hot * (prefix_len // block_size)
    num_kv_blocks = largest_wave + int(spare_hot_sets * hot_blocks)
    return Workload("skewed", prompts, max_tokens, prefix_ids, [prefix_len] * num_requests, waves, num_kv_blocks)


def multi_turn(
    vocab_size: int, num_conversations: int = 16, num_turns: int = 4, first_len: int = 200, assistant_len: int = 32,
    user_len: int = 48, new_tokens: int = 32, seed: int = 3,
) -> Workload:
    """Conversations submitted turn by turn: wave t holds every conversation's turn t, run to
    completion before the next. Turn 0 is `first_len` tokens; each later turn is the previous
    turn's prompt plus `assistant_len` "assistant" tokens plus `user_len` new user tokens.

    The assistant tokens are fixed seeded tokens, not the engine's own previous output: every
    system (ours, transformers, vLLM) then sees identical prompts whatever it generated, so the
    peers stay comparable and the workload is known before any run. A cache can reuse the previous
    turn's prompt, not its generated tokens (they differ from the fixed ones)."""
    rng = np.random.default_rng(seed)
    prompts, prefix_ids, prefix_lens = [], [], []
    history = [_tokens(rng, vocab_size, first_len) for _ in range(num_conversations)]
    for turn in range(num_turns):
        for c in range(num_conversations):
            if turn > 0:
                previous = history[c]
                history[c] = previous + _tokens(rng, vocab_size, assistant_len) + _tokens(rng, vocab_size, user_len)
            prompts.append(history[c])
            prefix_ids.append(c)
            prefix_lens.append(0 if turn == 0 else len(prompts[-1]) - assistant_len - user_len)
    waves = [list(range(t * num_conversations, (t + 1) * num_conversations)) for t in range(num_turns)]
    max_tokens = [new_tokens] * len(prompts)
    return Workload("multi-turn", prompts, max_tokens, prefix_ids, prefix_lens, waves)


def make_workload(name: str, scale: str, vocab_size: int, block_size: int) -> Workload:
    """The benchmark's workload `name` at `scale` ("full": the issue's sizes; "small": a smoke run)."""
    if name not in WORKLOADS:
        raise ValueError(f"workload {name!r} is unknown; use one of {', '.join(WORKLOADS)}")
    if scale not in SCALES:
        raise ValueError(f"scale {scale!r} is unknown; use one of {', '.join(SCALES)}")
    small = scale == "small"
    if name == "shared-prefix":
        if small:
            return shared_prefix(vocab_size, num_prompts=8, prefix_len=32, own_len=(4, 12), new_tokens=8)
        return shared_prefix(vocab_size)
    if name == "distinct":
        if small:
            return distinct(vocab_size, num_prompts=8, prompt_len=(8, 40), new_tokens=(2, 16))
        return distinct(vocab_size)
    if name == "multi-turn":
        if small:
            return multi_turn(vocab_size, num_conversations=4, num_turns=3, first_len=24, assistant_len=8, user_len=8,
                              new_tokens=8)
        return multi_turn(vocab_size)
    if small:
        return skewed(vocab_size, block_size, num_requests=32, num_hot=2, prefix_len=32, own_len=(2, 6), wave_size=4)
    return skewed(vocab_size, block_size)


def _tokens(rng: np.random.Generator, vocab_size: int, n: int) -> list[int]:
    return [int(t) for t in rng.integers(FIRST_TOKEN, vocab_size, size=n)]


def _length(rng: np.random.Generator, bounds: tuple[int, int]) -> int:
    return int(rng.integers(bounds[0], bounds[1] + 1))  # both ends included
