"""LLMEngine: the model, the paged KV cache and the scheduler a worker keeps warm between tasks."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from collections.abc import Callable, Sequence as Seq

import torch

from workers.attention import make_backend
from workers.layers.dense_ops import make_dense_ops
from workers.config import EngineConfig
from workers.decode_graphs import make_static_decode
from workers.dtype_choice import resolve_dtype
from workers.errors import PromptTooLongError
from workers.hashing import BlockHash, hash_full_blocks, root_hash
from workers.kv_cache import PagedKVCache
from workers.kv_cache_manager import KVCacheManager
from workers.loader import DTYPES, load_model
from workers.memory import num_kv_blocks
from workers.model_runner import ModelRunner
from workers.outputs import CompletionOutput, RequestMetrics
from workers.persistence import CacheIdentity
from workers.sampling import SamplingParams
from workers.scheduler import Scheduler, SchedulerOutput
from workers.sequence import Sequence
from workers.stats import EngineStats
from workers.stop_checker import StopChecker

Prompt = str | list[int]
StepCallback = Callable[["StepReport"], None]


@dataclass(frozen=True, slots=True)
class StepReport:
    """What one step did, for step callbacks (metrics, streaming)."""

    seconds: float
    num_batched_tokens: int
    sampled: dict[str, int]  # request id -> the token this step sampled for it
    finished: list[CompletionOutput]

# A warming request: prefill the prompt, generate one token (greedy, whatever it is).
WARM_PARAMS = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)


class LLMEngine:
    """Generates completions with continuous batching over a paged, prefix-cached KV store.

    `generate()` runs a whole batch; `add_request()` + `step()` let a caller feed work in as it
    arrives. Outputs do not depend on what else shares the batch, on the prefix cache, or on
    preemption (greedy decoding gives the same tokens as a request run alone).
    """

    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config = config or EngineConfig()
        if config.cpu_threads is not None:
            torch.set_num_threads(config.cpu_threads)
        self.device = _device(config)
        self.dtype = resolve_dtype(config.dtype, self.device)  # "auto" resolved; the config keeps what was asked
        self.loaded = load_model(config.model, self.device, self.dtype, config.max_model_len,
                                 chat_template_timeout_s=config.chat_template_timeout_s)
        cfg = self.loaded.config
        self.tokenizer = self.loaded.tokenizer
        self.max_model_len = self.loaded.max_model_len
        dtype = DTYPES[self.dtype]
        per_block = PagedKVCache.bytes_per_block(
            cfg.num_layers, config.block_size, cfg.num_kv_heads, cfg.head_dim, dtype, config.kv_cache_dtype
        )
        num_blocks = num_kv_blocks(config, self.device, per_block, self.max_model_len)
        self.attention = make_backend(config.attention_backend, self.device, cfg.num_heads, cfg.num_kv_heads,
                                      cfg.head_dim)
        # The dense layers' CPU kernels (packed linears, fused element-wise passes) come with the
        # CPU attention kernels (one library); the reference backend keeps the whole model on
        # PyTorch's operators.
        dense_ops = make_dense_ops(self.attention.library if self.attention.name == "cpu" else None)
        dense_ops.prepare(self.loaded.model)
        self.loaded.model.dense_ops = dense_ops
        # Decode steps on static inputs, recorded as CUDA graphs on a GPU (on the CPU the triton
        # backend runs only under Triton's interpreter, where the same path runs unrecorded). Their
        # padding rows write to a scratch block past the pool.
        static = config.cuda_graphs and self.attention.name == "triton"
        self.kv_cache = self.attention.make_cache(cfg.num_layers, num_blocks + static, config.block_size, dtype,
                                                  self.device, config.kv_cache_dtype)
        self.kv_manager = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching,
                                         config.eviction_policy, config.max_pinned_fraction)
        eos = frozenset(self.tokenizer.eos_token_ids | set(cfg.eos_token_ids))
        self.scheduler = Scheduler(
            self.kv_manager, StopChecker(eos, self.tokenizer.decode, self.max_model_len),
            config.max_num_seqs, config.max_num_batched_tokens,
        )
        max_blocks_per_seq = -(-self.max_model_len // config.block_size)
        static_decode = make_static_decode(
            self.loaded.model, self.attention, self.kv_cache, num_blocks, config.max_num_seqs, max_blocks_per_seq,
            record=self.device.type == "cuda",
        ) if static else None
        self.runner = ModelRunner(self.loaded.model, self.attention, self.kv_cache, self.device, config.seed,
                                  config.max_num_seqs, max_blocks_per_seq, static_decode)
        self._ids = itertools.count()
        self._live: dict[str, Sequence] = {}
        self._stats = EngineStats()
        self._step_callbacks: list[StepCallback] = []

    # -- requests --------------------------------------------------------------------------------
    def add_request(
        self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None,
        cache_salt: str | None = None,
    ) -> str:
        """Queues one request and returns its id. `cache_salt` separates prefix-cache entries (one
        tenant cannot hit another's blocks). Raises ValueError for a prompt the engine cannot serve."""
        params = params or SamplingParams()
        token_ids = self._tokens(prompt)
        self._check_fits(token_ids, params)
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self._live:
            raise ValueError(f"request id {request_id!r} is already in the engine")
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        seq = Sequence(request_id, token_ids, params, root_hash(self.loaded.fingerprint, cache_salt), generator)
        self._live[request_id] = seq
        self.scheduler.add(seq)
        return request_id

    def step(self) -> list[CompletionOutput]:
        """Runs one scheduler step and returns the requests it finished."""
        started = time.perf_counter()
        scheduled = self.scheduler.schedule()
        sampled = self.runner.execute(scheduled)
        finished = self.scheduler.update(scheduled, sampled)
        for seq in finished:
            self.runner.release(seq.request_id)
        seconds = time.perf_counter() - started
        _charge(scheduled, seconds)
        self._stats.record_step(scheduled.num_batched_tokens, len(sampled), seconds)
        outputs = [self._finish(seq) for seq in finished]
        if self._step_callbacks:
            report = StepReport(seconds, scheduled.num_batched_tokens, sampled, outputs)
            for callback in self._step_callbacks:
                callback(report)
        return outputs

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def abort_request(self, request_id: str) -> bool:
        seq = self.scheduler.abort(request_id)
        self._live.pop(request_id, None)
        self.runner.release(request_id)
        return seq is not None

    def generate(
        self, prompts: Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None = None,
        cache_salt: str | None = None,
    ) -> list[CompletionOutput]:
        """Completes every prompt; outputs come back in the order of `prompts`. All prompts are
        checked before any runs, so a bad one raises ValueError and nothing is queued."""
        params_list = self._params_per_prompt(prompts, params)
        token_lists = []
        for i, (prompt, p) in enumerate(zip(prompts, params_list)):
            try:
                token_lists.append(self._tokens(prompt))
                self._check_fits(token_lists[-1], p)
            except ValueError as e:
                raise type(e)(f"prompt {i}: {e}") from None  # keeps PromptTooLongError recognisable
        ids = [self.add_request(tokens, p, cache_salt=cache_salt) for tokens, p in zip(token_lists, params_list)]
        done: dict[str, CompletionOutput] = {}
        while len(done) < len(ids):
            for output in self.step():
                done[output.request_id] = output
        return [done[i] for i in ids]

    def next_token_logits(self, prompts: Seq[Prompt], cache_salt: str | None = None,
                          decode_steps: int = 0) -> list[torch.Tensor]:
        """Full-vocabulary float32 logits after each prompt and `decode_steps` greedy tokens,
        computed through the paged cache (for evaluation: reference checks, KV quantization and
        bf16 error, backends against each other)."""
        params = SamplingParams(max_tokens=1 + decode_steps, ignore_eos=True)
        ids = [self.add_request(p, params, cache_salt=cache_salt) for p in prompts]
        for request_id in ids:
            self._live[request_id].keep_logits = True
        seqs = [self._live[i] for i in ids]
        while any(not s.is_finished for s in seqs):
            self.step()
        return [s.last_logits for s in seqs]

    @property
    def counters(self) -> EngineStats:
        """The engine's lifetime counters (steps, tokens, busy seconds), live."""
        return self._stats

    def add_step_callback(self, callback: StepCallback) -> None:
        """Calls `callback(report)` after every step, on the thread that steps the engine
        (metrics, streaming). It must be quick: the next step waits for it."""
        self._step_callbacks.append(callback)

    def remove_step_callback(self, callback: StepCallback) -> None:
        self._step_callbacks.remove(callback)

    # -- cache -----------------------------------------------------------------------------------
    def reset_prefix_cache(self) -> int:
        """Drops every cached prefix block that no running request holds and no pin keeps; returns
        how many."""
        return self.kv_manager.pool.reset_prefix_cache()

    def scrub_kv_cache(self) -> None:
        """Drops every cached prefix and zeroes the KV pool, after a failed step's requests were
        aborted. A step that raised may have registered blocks it never wrote, or written NaN or inf
        (a corrupted weight, say) into blocks that later requests reuse; attention reads whole blocks
        and 0 x NaN is NaN, so a free slot must hold zeros, as the pool did when allocated. Pinned
        blocks keep their contents: they were complete before the step, which writes only new slots."""
        if self.scheduler.has_unfinished():
            raise RuntimeError("scrub_kv_cache needs every request finished or aborted first")
        pool = self.kv_manager.pool
        pool.reset_prefix_cache()
        self.kv_cache.clear(keep=pool.pinned_block_ids)

    def warm(self, prompts: Seq[Prompt], cache_salt: str | None = None) -> list[BlockHash]:
        """Prefills `prompts` (one token generated each) so their full blocks are cached; returns
        their hashes (for `pin`). Runs the engine to completion, so no other request may be in it:
        a caller with requests in flight (the worker's engine loop) submits the prompts as requests
        of `WARM_PARAMS` instead, then calls `prompt_block_hashes`."""
        if self.scheduler.has_unfinished():
            raise RuntimeError("warm runs the engine alone; submit WARM_PARAMS requests while others run")
        self.generate(prompts, WARM_PARAMS, cache_salt)
        return self.prompt_block_hashes(prompts, cache_salt)

    def prompt_block_hashes(self, prompts: Seq[Prompt], cache_salt: str | None = None) -> list[BlockHash]:
        """The chained hashes of every full block of `prompts`, without duplicates."""
        root = root_hash(self.loaded.fingerprint, cache_salt)
        hashes = [h for p in prompts for h in hash_full_blocks(root, self._tokens(p), self.config.block_size, [])]
        return list(dict.fromkeys(hashes))

    def pin(self, prompts: Seq[Prompt], cache_salt: str | None = None) -> list[int]:
        """Warms `prompts` and pins their full blocks: they are never evicted until `unpin`. Raises
        ValueError, pinning nothing, past `max_pinned_fraction` of the pool. Returns the ids pinned."""
        return self.kv_manager.pool.pin(self.warm(prompts, cache_salt))

    def unpin(self, prompts: Seq[Prompt] | None = None, cache_salt: str | None = None) -> list[int]:
        """Unpins the full blocks of `prompts` (every pinned block when None); returns their ids."""
        pool = self.kv_manager.pool
        return pool.unpin() if prompts is None else pool.unpin(self.prompt_block_hashes(prompts, cache_salt))

    def cache_identity(self) -> CacheIdentity:
        """What a KV snapshot must match to be loaded here (workers/persistence.py)."""
        cfg = self.loaded.config
        kv_dtype = self.config.kv_cache_dtype if self.kv_cache.quantized else self.dtype
        return CacheIdentity(self.loaded.fingerprint, self.config.block_size, kv_dtype, cfg.num_layers,
                             cfg.num_kv_heads, cfg.head_dim)

    def cache_stats(self) -> dict[str, float | int]:
        """The KV pool's blocks (used, free, cached, pinned) and the prefix cache's token hit rate."""
        pool, kv = self.kv_manager.pool, self.kv_manager
        return {
            "num_total_blocks": pool.num_blocks,
            "num_used_blocks": pool.num_blocks - pool.num_free_blocks,
            "num_free_blocks": pool.num_free_blocks,
            "num_cached_blocks": pool.num_cached_blocks,
            "num_pinned_blocks": pool.num_pinned_blocks,
            "max_pinned_blocks": pool.max_pinned_blocks,
            "num_evictions": pool.num_evictions,
            "prefix_cache_queries": kv.prefix_cache_queries,
            "prefix_cache_hits": kv.prefix_cache_hits,
            "prefix_cache_hit_rate": kv.prefix_cache_hits / kv.prefix_cache_queries if kv.prefix_cache_queries else 0.0,
        }

    def stats(self) -> dict[str, float | int | str]:
        return {
            "model": self.config.model,
            "device": str(self.device),
            "dtype": self.dtype,
            "attention_backend": self.attention.name,
            "dense_ops": self.loaded.model.dense_ops.name,
            "kv_cache_dtype": self.config.kv_cache_dtype,
            "eviction_policy": self.config.eviction_policy,
            "block_size": self.config.block_size,
            "kv_cache_bytes": self.kv_cache.nbytes,
            **self.cache_stats(),
            "peak_used_blocks": self.kv_manager.peak_used_blocks,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_cascade_steps": self.runner.num_cascade_steps,
            "num_cuda_graph_steps": self.runner.static_decode.num_steps if self.runner.static_decode else 0,
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            **self._stats.summary(),
        }

    # -- helpers ---------------------------------------------------------------------------------
    def _tokens(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if not isinstance(prompt, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise ValueError("a prompt must be a string or a list of token ids")
        vocab = self.loaded.config.vocab_size
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab})")
        return list(prompt)

    def _check_fits(self, token_ids: list[int], params: SamplingParams) -> None:
        n = len(token_ids)
        if n == 0:
            raise ValueError("the prompt is empty; send at least one token")
        if n >= self.max_model_len:
            raise PromptTooLongError(f"prompt has {n} tokens, the model accepts {self.max_model_len - 1} (max_model_len {self.max_model_len})")
        longest = min(n + params.max_tokens, self.max_model_len)
        if self.kv_manager.blocks_needed(longest) > self.kv_manager.pool.num_blocks:
            raise PromptTooLongError(
                f"prompt of {n} tokens plus max_tokens={params.max_tokens} needs "
                f"{self.kv_manager.blocks_needed(longest)} KV blocks, the pool has {self.kv_manager.pool.num_blocks}; "
                "lower max_tokens or give the engine more KV memory"
            )

    def _params_per_prompt(self, prompts: Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None) -> list[SamplingParams]:
        if params is None or isinstance(params, SamplingParams):
            return [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts; pass one, or one per prompt")
        return list(params)

    def _finish(self, seq: Sequence) -> CompletionOutput:
        self._live.pop(seq.request_id, None)
        text = self.scheduler.stop_checker.final_text(seq) if seq.params.stop else self.tokenizer.decode(seq.output_token_ids)
        metrics = RequestMetrics(seq.arrival_time, seq.first_scheduled_time, seq.first_token_time, seq.finished_time,
                                 seq.engine_seconds)
        self._stats.record_finished(seq.num_prompt_tokens, metrics)
        return CompletionOutput(
            request_id=seq.request_id,
            token_ids=list(seq.output_token_ids),
            text=text,
            finish_reason=seq.finish_reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens or 0,
            metrics=metrics,
        )


def _charge(scheduled: SchedulerOutput, seconds: float) -> None:
    """Split a step's `seconds` over the sequences it ran, by their share of its tokens: the linear
    layers, which dominate a step, cost per token. Several callers' requests share steps, so timing
    each caller's wall clock would count the same step once per caller."""
    total = scheduled.num_batched_tokens
    for s in scheduled.scheduled:
        s.seq.engine_seconds += seconds * s.num_new_tokens / total if total else seconds / len(scheduled.scheduled)


def _device(config: EngineConfig) -> torch.device:
    device = torch.device(config.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={config.device!r} but no CUDA GPU is visible to PyTorch; use device='cpu'")
        if config.kv_cache_dtype == "fp8" and torch.cuda.get_device_capability(device) < (8, 9):
            raise ValueError("kv_cache_dtype='fp8' needs a GPU of compute capability 8.9 or newer; use 'int8'")
    if device.type == "cpu" and config.dtype == "float16":
        raise ValueError("dtype='float16' is slow and inexact on the CPU; use 'float32' or 'bfloat16'")
    return device
