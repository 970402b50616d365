"""The plain-text report of `pipeline bench engine`: one table, workloads as columns, then the
prefix-caching overhead, the eviction policies and the issue's bars."""

from __future__ import annotations

from collections.abc import Callable

from workers.bench.engine_bench import BenchResult, WorkloadResult
from workers.bench.kv_quant_bench import KVQuantResult

SPEEDUP_BARS = {"shared-prefix": 3.0, "distinct": 1.5}
MAX_CACHING_OVERHEAD = 0.03

Row = tuple[str, Callable[[WorkloadResult], str]]

ROWS: list[Row] = [
    ("prompts", lambda w: str(w.num_prompts)),
    ("prompt tokens", lambda w: str(w.num_prompt_tokens)),
    ("generated tokens", lambda w: str(w.num_requested_tokens)),
    ("needed GFLOP", lambda w: f"{w.needed_flops / 1e9:.1f}"),
    ("ours tokens/s", lambda w: f"{w.ours.tokens_per_s:.1f}"),
    ("transformers tokens/s", lambda w: f"{w.hf.tokens_per_s:.1f}"),
    ("ratio ours/transformers", lambda w: f"{w.speedup:.2f}x"),
    ("prefix cache hit rate", lambda w: f"{w.hit_rate:.1%}"),
    ("ideal hit rate", lambda w: f"{w.ideal_hit_rate:.1%}"),
    ("ours peak KV memory", lambda w: _mib(w.ours.peak_kv_bytes)),
    ("transformers peak KV memory", lambda w: _mib(w.hf.peak_kv_bytes)),
    ("ours roofline fraction", lambda w: f"{w.ours.roofline_fraction:.1%}"),
    ("transformers roofline fraction", lambda w: f"{w.hf.roofline_fraction:.1%}"),
    ("greedy agreement", lambda w: f"{w.num_agreeing}/{w.num_prompts}"),
]


def format_report(result: BenchResult) -> str:
    s = result.shape
    lines = [
        f"pipeline bench engine: scale {result.scale}, cpu float32, {result.num_threads} threads, "
        f"matmul {result.matmul_flops / 1e9:.1f} GFLOP/s (measured)",
        f"model: Llama hidden {s.hidden_size}, {s.num_hidden_layers} layers, {s.num_attention_heads} heads, "
        f"{s.num_key_value_heads} KV heads, intermediate {s.intermediate_size}, vocab {s.vocab_size}",
        f"peer: transformers generate, static batches of {result.hf_batch_size}, left padding, greedy",
        f"load average (1 min) at start {result.load_average[0]:.2f}, at end {result.load_average[1]:.2f}",
        "",
    ]
    names = [w.name for w in result.workloads]
    label_width = max(len(label) for label, _ in ROWS)
    widths = [max(14, len(n)) for n in names]
    lines.append("metric".ljust(label_width) + "".join(f"  {n:>{w}}" for n, w in zip(names, widths)))
    for label, cell in ROWS:
        cells = "".join(f"  {cell(wl):>{w}}" for wl, w in zip(result.workloads, widths))
        lines.append(label.ljust(label_width) + cells)
    for w in result.workloads:
        if w.caching_overhead is not None:
            lines += ["", f"prefix caching on vs off ({w.name}, nothing shared, two alternating runs each, best of "
                      "each): "
                      f"on {w.cache_on_tokens_per_s:.1f} tokens/s, off {w.no_cache_tokens_per_s:.1f} tokens/s, "
                      f"overhead {w.caching_overhead:+.1%}"]
        if w.policies:
            lines += ["", f"eviction policies ({w.name}: {w.num_prompts} requests in waves, "
                      f"a pool of {w.num_kv_blocks} blocks that cannot hold every prefix)"]
            lines.append(f"{'policy':<10}  {'hit rate':>8}  {'tokens/s':>9}  {'evictions':>9}  {'preemptions':>11}")
            for p in w.policies:
                lines.append(f"{p.policy:<10}  {p.hit_rate:>8.1%}  {p.tokens_per_s:>9.1f}  {p.num_evictions:>9}  "
                             f"{p.num_preemptions:>11}")
            lines.append(f"{'ideal':<10}  {w.ideal_hit_rate:>8.1%}  (every repeat of a prefix served from the cache)")
            lines.append(f"adaptive vs lru hit rate: {w.adaptive_vs_lru * 100:+.1f} points")
    for q in result.kv_quant:
        lines += ["", *_kv_quant_lines(q)]
    bars = _bars(result) if result.scale == "full" else []  # the bars hold for the full shape only
    if bars:
        lines += ["", "bars:"] + [f"  {b}" for b in bars]
    return "\n".join(lines)


def _bars(result: BenchResult) -> list[str]:
    out = []
    for w in result.workloads:
        bar = SPEEDUP_BARS.get(w.name)
        if bar is not None:
            out.append(f"{w.name}: {w.speedup:.2f}x transformers, bar {bar:.1f}x: {_verdict(w.speedup >= bar)}")
        if w.caching_overhead is not None:
            out.append(f"prefix caching overhead {w.caching_overhead:+.1%}, bar < {MAX_CACHING_OVERHEAD:.0%}: "
                       f"{_verdict(w.caching_overhead < MAX_CACHING_OVERHEAD)}")
        if w.adaptive_vs_lru is not None:
            out.append(f"adaptive hit rate {w.adaptive_vs_lru * 100:+.1f} points over lru: "
                       f"{_verdict(w.adaptive_vs_lru > 0)}")
    return out


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _kv_quant_lines(q: KVQuantResult) -> list[str]:
    return [
        f"int8 KV cache against full precision ({q.workload}, weights at init range {q.init_range}):",
        f"  bytes per block {q.bytes_per_block_full} -> {q.bytes_per_block_int8} "
        f"({q.bytes_per_block_full / q.bytes_per_block_int8:.2f}x the blocks in the same memory); "
        f"peak KV {_mib(q.peak_kv_bytes_full)} -> {_mib(q.peak_kv_bytes_int8)}",
        f"  next-token logits on {q.num_contexts} contexts (same tokens for both): max error {q.max_logit_error:.4f}, "
        f"mean {q.mean_logit_error:.5f} (logit std {q.logit_std:.3f}); top-1 agreement "
        f"{q.num_top1_agreeing}/{q.num_contexts}",
        f"  generation: {q.tokens_per_s_int8:.1f} tokens/s (full precision {q.tokens_per_s_full:.1f}); greedy "
        f"outputs identical for {q.num_outputs_identical}/{q.num_prompts} prompts",
    ]
