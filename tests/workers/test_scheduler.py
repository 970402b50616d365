"""Scheduler: token budget, chunked prefill, preemption and finishing, with a real KV cache
manager and tokens fed in by hand (no model)."""

from __future__ import annotations

from dataclasses import dataclass

from workers.hashing import root_hash
from workers.kv_cache_manager import KVCacheManager
from workers.sampling import SamplingParams
from workers.scheduler import Scheduler
from workers.sequence import Sequence, SequenceStatus
from workers.stop_checker import StopChecker

EOS = 3
X = ord("x")  # an ordinary token


def decode(token_ids: list[int]) -> str:
    return "".join(chr(t) for t in token_ids)


def make_scheduler(
    num_blocks: int = 32, block_size: int = 4, budget: int = 64, max_num_seqs: int = 8, max_model_len: int = 1000
) -> Scheduler:
    kv = KVCacheManager(num_blocks, block_size)
    return Scheduler(kv, StopChecker(frozenset({EOS}), decode, max_model_len), max_num_seqs, budget)


def make_seq(request_id: str, prompt: list[int], **params) -> Sequence:
    return Sequence(request_id, prompt, SamplingParams(**params), root_hash("m", None), None)


@dataclass
class Step:
    """What one step scheduled, captured before `update` moves the sequences on."""

    plan: list[tuple[str, int, int]]  # (request id, tokens computed this step, position of the first)
    samples: list[str]  # request ids that sampled a token
    preempted: list[Sequence]
    num_batched_tokens: int
    finished: list[str]


def step(sched: Scheduler, tokens: dict[str, int] | None = None) -> Step:
    """Schedules, then samples `X` (or the given token) for every sequence that samples this step."""
    out = sched.schedule()
    plan = [(s.seq.request_id, s.num_new_tokens, s.start) for s in out.scheduled]
    tokens = tokens or {}
    sampled = {s.seq.request_id: tokens.get(s.seq.request_id, X) for s in out.scheduled if s.samples}
    finished = sched.update(out, sampled)
    return Step(plan, list(sampled), out.preempted, out.num_batched_tokens, [s.request_id for s in finished])


def block_ids(seq: Sequence) -> list[int]:
    return [b.block_id for b in seq.blocks]


# -- token budget and chunked prefill ------------------------------------------------------------


def test_token_budget_is_filled_and_never_exceeded() -> None:
    sched = make_scheduler(budget=8)
    for i, rid in enumerate("abc"):
        sched.add(make_seq(rid, [10 * i + t for t in range(10, 15)], max_tokens=50))  # no shared prefix
    out = step(sched)
    assert out.plan == [("a", 5, 0), ("b", 3, 0)]  # b gets a 3-token chunk, c waits
    assert out.num_batched_tokens == 8
    assert out.samples == ["a"]
    assert [s.request_id for s in sched.waiting] == ["c"]
    out = step(sched)
    assert out.plan == [("a", 1, 5), ("b", 2, 3), ("c", 5, 0)]
    assert out.num_batched_tokens == 8
    out = step(sched)
    assert out.plan == [("a", 1, 6), ("b", 1, 5), ("c", 1, 5)]
    assert out.num_batched_tokens == 3


def test_long_prompt_is_prefilled_in_chunks() -> None:
    sched = make_scheduler(budget=8)
    seq = make_seq("a", list(range(10, 30)), max_tokens=50)
    sched.add(seq)
    chunks = []
    for _ in range(4):
        out = step(sched)
        chunks.append((out.plan, out.samples, seq.num_computed_tokens))
    assert chunks == [
        ([("a", 8, 0)], [], 8),
        ([("a", 8, 8)], [], 16),
        ([("a", 4, 16)], ["a"], 20),
        ([("a", 1, 20)], ["a"], 21),
    ]
    assert seq.output_token_ids == [X, X]
    assert block_ids(seq) == [0, 1, 2, 3, 4, 5]


def test_decodes_are_scheduled_before_new_prefills() -> None:
    sched = make_scheduler(budget=8)
    sched.add(make_seq("a", [10, 11, 12], max_tokens=50))
    step(sched)
    sched.add(make_seq("b", list(range(10, 30)), max_tokens=50))
    out = step(sched)
    assert out.plan == [("a", 1, 3), ("b", 7, 0)]
    out = step(sched)
    # a's decode first, then b's unfinished prefill, which was admitted earlier.
    assert out.plan == [("a", 1, 4), ("b", 7, 7)]


def test_max_num_seqs_caps_admission() -> None:
    sched = make_scheduler(max_num_seqs=2)
    for rid in "abc":
        sched.add(make_seq(rid, [10, 11], max_tokens=2))
    out = step(sched)
    assert out.plan == [("a", 2, 0), ("b", 2, 0)]
    out = step(sched)
    assert out.plan == [("a", 1, 2), ("b", 1, 2)]
    assert out.finished == ["a", "b"]
    out = step(sched)
    assert out.plan == [("c", 2, 0)]


def test_prefix_hits_skip_computed_tokens_and_are_counted_once() -> None:
    sched = make_scheduler()
    a = make_seq("a", list(range(10, 19)), max_tokens=50)
    b = make_seq("b", list(range(10, 19)), max_tokens=50)
    sched.add(a)
    sched.add(b)
    out = step(sched)
    # b hits the two blocks a registers in this same step; its last token is computed for logits.
    assert out.plan == [("a", 9, 0), ("b", 1, 8)]
    assert (sched.kv.prefix_cache_queries, sched.kv.prefix_cache_hits) == (18, 8)
    assert (a.num_cached_tokens, b.num_cached_tokens) == (0, 8)
    assert [blk.block_id for blk in b.blocks] == [0, 1, 3]


# -- preemption ----------------------------------------------------------------------------------


def test_short_pool_preempts_the_newest_running_sequence() -> None:
    # 4 blocks of 4 tokens. a and b take two blocks each; c cannot be admitted.
    sched = make_scheduler(num_blocks=4, block_size=4)
    a = make_seq("a", list(range(10, 17)), max_tokens=4)
    b = make_seq("b", list(range(20, 27)), max_tokens=50)
    c = make_seq("c", [30, 31, 32], max_tokens=50)
    for seq in (a, b, c):
        sched.add(seq)

    out = step(sched)
    assert out.plan == [("a", 7, 0), ("b", 7, 0)]
    assert (block_ids(a), block_ids(b)) == ([0, 1], [2, 3])
    assert list(sched.waiting) == [c]

    out = step(sched)  # 8 tokens each still fit in two blocks
    assert out.plan == [("a", 1, 7), ("b", 1, 7)]
    assert out.preempted == []

    # a's 9th token needs a third block: b, the newest, is preempted and recomputed later.
    out = step(sched)
    assert out.plan == [("a", 1, 8)]
    assert out.preempted == [b]
    assert sched.running == [a]
    assert list(sched.waiting) == [b, c]  # back at the front, ahead of c
    assert (b.status, b.num_computed_tokens, b.blocks, b.num_preemptions) == (SequenceStatus.WAITING, 0, [], 1)
    assert b.output_token_ids == [X, X]  # kept: the recompute continues from them
    assert sched.num_preemptions == 1
    # b's blocks were freed tail first; a took block 3, the tail, so b's head block is still cached.
    assert block_ids(a) == [0, 1, 3]
    assert sched.kv.pool.num_evictions == 1

    # b would hit its head block but needs 3 blocks; only 1 is free, so it keeps waiting.
    out = step(sched)
    assert out.plan == [("a", 1, 9)]
    assert out.finished == ["a"]  # 4 tokens: "length"
    assert a.finish_reason == "length"

    out = step(sched)
    assert out.plan == [("b", 5, 4), ("c", 3, 0)]  # b recomputes its 9 tokens after the 4-token hit
    assert block_ids(b) == [2, 3, 1]
    assert block_ids(c) == [0]
    assert b.num_preemptions == 1
    # Only first admissions count as prefix-cache lookups.
    assert b.num_cached_tokens == 0
    assert (sched.kv.prefix_cache_queries, sched.kv.prefix_cache_hits) == (17, 0)


def test_preempted_blocks_go_to_the_older_sequence_in_the_same_step() -> None:
    sched = make_scheduler(num_blocks=3, block_size=4)
    a = make_seq("a", list(range(10, 18)), max_tokens=50)  # 2 blocks
    b = make_seq("b", list(range(20, 24)), max_tokens=50)  # 1 block
    sched.add(a)
    sched.add(b)
    step(sched)
    out = step(sched)
    # a needs a third block for its 9th token: b is preempted and a gets b's block 2 at once.
    assert out.plan == [("a", 1, 8)]
    assert out.preempted == [b]
    assert out.num_batched_tokens == 1
    assert block_ids(a) == [0, 1, 2]


def test_the_only_running_sequence_that_cannot_grow_preempts_itself() -> None:
    # (The engine refuses such a request up front; the scheduler must still not loop or crash.)
    sched = make_scheduler(num_blocks=2, block_size=4)
    solo = make_seq("solo", list(range(10, 17)), max_tokens=50)
    other = make_seq("other", [20, 21, 22, 23, 24], max_tokens=50)
    sched.add(solo)
    step(sched)  # solo: 8 tokens, 2 blocks
    sched.add(other)
    out = step(sched)
    assert out.plan == [("solo", 1, 7)]  # no block left for other
    out = step(sched)
    # solo is its own victim, and nothing runs this step.
    assert out.plan == []
    assert out.preempted == [solo]
    assert out.num_batched_tokens == 0
    assert sched.running == []
    assert list(sched.waiting) == [solo, other]
    assert sched.kv.pool.num_free_blocks == 2


# -- finishing -----------------------------------------------------------------------------------


def test_finish_on_max_tokens() -> None:
    sched = make_scheduler()
    seq = make_seq("a", [10, 11, 12], max_tokens=3)
    sched.add(seq)
    assert [step(sched).finished for _ in range(3)] == [[], [], ["a"]]
    assert (seq.status, seq.finish_reason, seq.output_token_ids) == (SequenceStatus.FINISHED, "length", [X, X, X])
    assert seq.blocks == []
    assert sched.running == []
    assert not sched.has_unfinished()
    assert sched.kv.pool.num_free_blocks == 32


def test_finish_on_max_model_len() -> None:
    sched = make_scheduler(max_model_len=5)
    seq = make_seq("a", [10, 11, 12], max_tokens=50)
    sched.add(seq)
    assert [step(sched).finished for _ in range(2)] == [[], ["a"]]
    assert (seq.finish_reason, seq.num_tokens) == ("length", 5)


def test_finish_on_eos() -> None:
    sched = make_scheduler()
    seq = make_seq("a", [10, 11, 12], max_tokens=50)
    sched.add(seq)
    step(sched)
    out = step(sched, {"a": EOS})
    assert out.finished == ["a"]
    assert (seq.finish_reason, seq.output_token_ids) == ("stop", [X, EOS])


def test_eos_wins_over_length_on_the_last_token() -> None:
    sched = make_scheduler()
    seq = make_seq("a", [10], max_tokens=1)
    sched.add(seq)
    assert step(sched, {"a": EOS}).finished == ["a"]
    assert seq.finish_reason == "stop"


def test_ignore_eos_runs_to_max_tokens() -> None:
    sched = make_scheduler()
    seq = make_seq("a", [10, 11, 12], max_tokens=3, ignore_eos=True)
    sched.add(seq)
    assert [step(sched, {"a": EOS}).finished for _ in range(3)] == [[], [], ["a"]]
    assert (seq.finish_reason, seq.output_token_ids) == ("length", [EOS, EOS, EOS])


def test_finish_on_stop_string() -> None:
    sched = make_scheduler()
    checker = sched.stop_checker
    seq = make_seq("a", [10, 11, 12], max_tokens=50, stop=["yz", "never"])
    sched.add(seq)
    results = [step(sched, {"a": ord(ch)}).finished for ch in "qqxyz"]
    assert results == [[], [], [], [], ["a"]]
    assert seq.finish_reason == "stop"
    assert checker.final_text(seq) == "qqx"


def test_stop_string_split_across_many_checks() -> None:
    sched = make_scheduler()
    seq = make_seq("a", [10], max_tokens=50, stop="abc")
    sched.add(seq)
    results = [step(sched, {"a": ord(ch)}).finished for ch in "qqqqabc"]
    assert results == [[]] * 6 + [["a"]]
    assert sched.stop_checker.final_text(seq) == "qqqq"


def test_finished_sequence_frees_only_its_own_blocks() -> None:
    sched = make_scheduler()
    a = make_seq("a", [10, 11, 12], max_tokens=1)
    b = make_seq("b", [20, 21, 22], max_tokens=50)
    sched.add(a)
    sched.add(b)
    out = step(sched)
    assert out.finished == ["a"]
    assert sched.running == [b]
    assert block_ids(b) == [1]
    assert sched.kv.pool.num_free_blocks == 31


# -- abort ---------------------------------------------------------------------------------------


def test_abort_running_and_waiting() -> None:
    sched = make_scheduler(max_num_seqs=1)
    a = make_seq("a", list(range(10, 19)), max_tokens=50)
    b = make_seq("b", [20, 21], max_tokens=50)
    sched.add(a)
    sched.add(b)
    step(sched)
    assert block_ids(a) == [0, 1, 2]
    assert sched.abort("a") is a
    assert (a.status, a.finish_reason, a.blocks) == (SequenceStatus.FINISHED, "abort", [])
    assert sched.running == []
    assert sched.kv.pool.num_free_blocks == 32
    assert sched.abort("b") is b
    assert (b.status, b.finish_reason) == (SequenceStatus.FINISHED, "abort")
    assert list(sched.waiting) == []
    assert not sched.has_unfinished()
    assert sched.abort("missing") is None
    assert sched.schedule().scheduled == []


def test_stop_check_decodes_a_window_not_the_whole_output() -> None:
    """Each check decodes a bounded window (4 x the longest stop string + 8 tokens), so a long
    generation's checks cost linear time; the full-output decode it replaced grew every step."""
    decoded_lengths: list[int] = []

    def decode(ids: list[int]) -> str:
        decoded_lengths.append(len(ids))
        return "".join(chr(i) for i in ids)

    checker = StopChecker(frozenset({EOS}), decode, max_model_len=4096)
    seq = make_seq("a", [10], max_tokens=1000, stop=["xyz"])
    for ch in "q" * 600 + "xyz":
        seq.output_token_ids.append(ord(ch))
        reason = checker.check(seq)
    assert reason == "stop"
    assert max(decoded_lengths) == 4 * 3 + 8
