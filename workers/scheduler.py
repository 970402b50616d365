"""Continuous batching: which sequences run in the next step, and how many tokens each."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
import time

from workers.kv_cache_manager import KVCacheManager
from workers.sequence import Sequence, SequenceStatus
from workers.stop_checker import StopChecker


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens whose KV this step computes (a prefill chunk, or 1 for a decode)
    start: int  # position of the first of them

    @property
    def samples(self) -> bool:
        """True when this step computes the sequence's last known token, whose logits give the next."""
        return self.start + self.num_new_tokens == self.seq.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    num_batched_tokens: int = 0
    preempted: list[Sequence] = field(default_factory=list)


class Scheduler:
    """Each step fills a token budget: running sequences first (decodes and unfinished prefill
    chunks, oldest first), then waiting ones in arrival order. When the KV pool runs short the
    newest running sequence is preempted: its blocks are freed and it is recomputed later from its
    prompt and the tokens it already produced, so its output does not change."""

    def __init__(
        self, kv: KVCacheManager, stop_checker: StopChecker, max_num_seqs: int, max_num_batched_tokens: int
    ) -> None:
        self.kv = kv
        self.stop_checker = stop_checker
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.kv.allocate_slots(seq, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                out.scheduled.append(ScheduledSeq(seq, num_new, seq.num_computed_tokens))
                budget -= num_new
                i += 1
                continue
            break

        # Admitting new work in a step that had to preempt would only thrash the pool.
        while not out.preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            hits, num_hit_tokens = self.kv.get_computed_blocks(seq)
            num_new = min(seq.num_tokens - num_hit_tokens, budget)
            if not self.kv.allocate_slots(seq, num_new, hits):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            seq.num_computed_tokens = num_hit_tokens
            if seq.num_cached_tokens is None:  # count the first admission only, not recomputes
                seq.num_cached_tokens = num_hit_tokens
                self.kv.record_lookup(seq.num_prompt_tokens, num_hit_tokens)
                seq.first_scheduled_time = time.perf_counter()
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, num_new, num_hit_tokens))
            budget -= num_new

        out.num_batched_tokens = self.max_num_batched_tokens - budget
        return out

    def _preempt(self, seq: Sequence) -> None:
        self.kv.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Sequence]:
        """Advances every scheduled sequence by the tokens it computed, appends the sampled tokens
        and returns the sequences that finished."""
        finished: list[Sequence] = []
        now = time.perf_counter()
        for item in out.scheduled:
            seq = item.seq
            seq.num_computed_tokens += item.num_new_tokens
            token = sampled.get(seq.request_id)
            if token is None:
                continue
            seq.output_token_ids.append(token)
            if seq.first_token_time is None:
                seq.first_token_time = now
            reason = self.stop_checker.check(seq)
            if reason is not None:
                self._finish(seq, reason, now)
                finished.append(seq)
        if finished:
            done = {id(s) for s in finished}
            self.running = [s for s in self.running if id(s) not in done]
        return finished

    def _finish(self, seq: Sequence, reason: str, now: float) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.finished_time = now
        self.kv.free(seq)

    def abort(self, request_id: str) -> Sequence | None:
        for queue in (self.running, self.waiting):
            for seq in queue:
                if seq.request_id == request_id:
                    queue.remove(seq)
                    if seq.status is SequenceStatus.RUNNING:
                        self.kv.free(seq)
                    seq.status = SequenceStatus.FINISHED
                    seq.finish_reason = "abort"
                    return seq
        return None
