"""The plain-text report of `pipeline bench engine`: one table, workloads as columns (medians over
the runs, then their range), the quiet-machine check, then the prefix-caching overhead, the
eviction policies, the int8 and bfloat16 error sections and the issue's bars."""

from __future__ import annotations

from collections.abc import Callable

from workers.bench.cpu_load import OTHER_LOAD_LIMIT
from workers.bench.engine_compare import EngineComparison
from workers.bench.kv_quant_bench import KVQuantResult
from workers.bench.results import BenchResult, SystemResult, WorkloadResult

SPEEDUP_BARS = {"shared-prefix": 3.0, "distinct": 1.5}  # ours over transformers
VLLM_BARS = {"shared-prefix": 1.3, "distinct": 1.0, "multi-turn": 1.3}  # ours over vLLM, same dtype
MAX_CACHING_OVERHEAD = 0.03

Row = tuple[str, Callable[[WorkloadResult], str]]


def _system_rows(system: str) -> list[Row]:
    def get(w: WorkloadResult) -> SystemResult | None:
        return w.systems.get(system)

    def cell(fmt: Callable[[SystemResult], str]) -> Callable[[WorkloadResult], str]:
        return lambda w: "-" if get(w) is None else fmt(get(w))  # type: ignore[arg-type]

    return [
        (f"{system} tokens/s", cell(lambda s: f"{s.tokens_per_s:.1f}")),
        (f"{system} tokens/s min-max", cell(lambda s: f"{s.tokens_per_s_min:.1f}-{s.tokens_per_s_max:.1f}")),
    ]


def rows(peers: list[str]) -> list[Row]:
    """The table's rows for our engine and `peers` ("transformers", and "vllm" when it ran)."""
    out: list[Row] = [
        ("prompts", lambda w: str(w.num_prompts)),
        ("prompt tokens", lambda w: str(w.num_prompt_tokens)),
        ("generated tokens", lambda w: str(w.num_requested_tokens)),
        ("needed GFLOP", lambda w: f"{w.needed_flops / 1e9:.1f}"),
    ]
    for system in ["ours", *peers]:
        out += _system_rows(system)
    for peer in reversed(peers):  # ours/vllm first: the figure
        out.append((f"ratio ours/{peer}", lambda w, p=peer: _ratio(w.ratio(p))))
    out.append(("prefix cache hit rate", lambda w: _pct(w.systems["ours"].hit_rate)))
    if "vllm" in peers:
        out.append(("vllm prefix cache hit rate", lambda w: _pct(w.systems["vllm"].hit_rate if "vllm" in w.systems
                                                                 else None)))
    out.append(("ideal hit rate", lambda w: f"{w.ideal_hit_rate:.1%}"))
    out += [
        ("ours peak KV memory", lambda w: _mib(w.systems["ours"].peak_kv_bytes)),
        ("transformers peak KV memory", lambda w: _mib(w.systems["transformers"].peak_kv_bytes)),
    ]
    for system in ["ours", *peers]:
        out.append((f"{system} roofline fraction", lambda w, s=system: _pct(
            w.systems[s].roofline_fraction if s in w.systems else None)))
    for peer in peers:
        out.append((f"greedy agreement with {peer}", lambda w, p=peer: _agreement(w, p)))
    for system in ["ours", *peers]:
        out.append((f"{system} runs under other load", lambda w, s=system: _loaded(w, s)))
    return out


def format_report(result: BenchResult) -> str:
    s = result.shape
    peers = ["transformers"] + (["vllm"] if result.vllm is not None else [])
    lines = [
        f"pipeline bench engine: scale {result.scale}, cpu {result.dtype}, {result.num_threads} threads, "
        f"matmul {result.matmul_flops / 1e9:.1f} GFLOP/s in {result.matmul_dtype} (measured"
        f"{'' if result.matmul_dtype == result.dtype else f'; {result.dtype} is emulated and slower here'}); "
        f"{result.repeat} timed run(s) of each system: median, then min-max",
        f"model: Llama hidden {s.hidden_size}, {s.num_hidden_layers} layers, {s.num_attention_heads} heads, "
        f"{s.num_key_value_heads} KV heads, intermediate {s.intermediate_size}, vocab {s.vocab_size}",
        f"peer: transformers generate, static batches of {result.hf_batch_size}, left padding, greedy, in this process",
    ]
    if result.vllm is not None:
        v = result.vllm
        lines.append(f"peer: vLLM {v.version} (CPU), its own process, prefix caching on, block size {v.block_size}, "
                     f"greedy; start-up {v.startup_seconds:.1f}s, not counted")
    lines += [f"load average (1 min) at start {result.load_average[0]:.2f}, at end {result.load_average[1]:.2f}", ""]
    table = rows(peers)
    names = [w.name for w in result.workloads]
    label_width = max(len(label) for label, _ in table)
    widths = [max(14, len(n)) for n in names]
    lines.append("metric".ljust(label_width) + "".join(f"  {n:>{w}}" for n, w in zip(names, widths)))
    for label, cell in table:
        cells = "".join(f"  {cell(wl):>{w}}" for wl, w in zip(result.workloads, widths))
        lines.append(label.ljust(label_width) + cells)
    lines += ["", *quiet_machine_lines(result)]
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
    for w in result.workloads:
        if w.bf16_vs_fp32 is not None:
            lines += ["", f"our bfloat16 engine against our float32 engine ({w.name}):",
                      *_comparison_lines(w.bf16_vs_fp32, "float32", "bfloat16")]
    bars = _bars(result) if result.scale == "full" else []  # the bars hold for the full shape only
    if bars:
        lines += ["", "bars:"] + [f"  {b}" for b in bars]
    return "\n".join(lines)


def quiet_machine_lines(result: BenchResult) -> list[str]:
    """Per workload and system, the cores other processes kept busy during each timed run; a run
    where they used more than OTHER_LOAD_LIMIT of a core is marked LOADED, and a last line warns."""
    lines = [f"quiet-machine check: cores used by other processes during each timed run "
             f"(LOADED: over {OTHER_LOAD_LIMIT:.2f} of a core)"]
    num_runs = num_loaded = 0
    width = max(len(w.name) for w in result.workloads)
    for w in result.workloads:
        for i, (name, system) in enumerate(w.systems.items()):
            cells = [f"{run.load.other_cores:.2f}" + (" LOADED" if run.load.is_loaded else "") for run in system.runs]
            label = w.name if i == 0 else ""
            lines.append(f"  {label:<{width}}  {name:<12}  " + "  ".join(cells))
            num_runs += len(system.runs)
            num_loaded += system.num_loaded_runs
    if num_loaded:
        lines.append(f"warning: {num_loaded} of {num_runs} timed runs ran under other load; their figures are "
                     "suspect: rerun on a quiet machine")
    else:
        lines.append(f"all {num_runs} timed runs ran on a quiet machine")
    return lines


def _bars(result: BenchResult) -> list[str]:
    out = []
    for w in result.workloads:
        for peer, bars in (("transformers", SPEEDUP_BARS), ("vllm", VLLM_BARS)):
            bar, ratio = bars.get(w.name), w.ratio(peer)
            if bar is not None and ratio is not None:
                out.append(f"{w.name}: {ratio:.2f}x {peer}, bar {bar:.1f}x: {_verdict(ratio >= bar)}")
        if w.caching_overhead is not None:
            out.append(f"prefix caching overhead {w.caching_overhead:+.1%}, bar < {MAX_CACHING_OVERHEAD:.0%}: "
                       f"{_verdict(w.caching_overhead < MAX_CACHING_OVERHEAD)}")
        if w.adaptive_vs_lru is not None:
            out.append(f"adaptive hit rate {w.adaptive_vs_lru * 100:+.1f} points over lru: "
                       f"{_verdict(w.adaptive_vs_lru > 0)}")
    return out


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / (1 << 20):.1f} MiB"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _agreement(w: WorkloadResult, peer: str) -> str:
    system = w.systems.get(peer)
    return "-" if system is None or system.num_agreeing is None else f"{system.num_agreeing}/{w.num_prompts}"


def _loaded(w: WorkloadResult, system: str) -> str:
    s = w.systems.get(system)
    return "-" if s is None else f"{s.num_loaded_runs}/{len(s.runs)}"


def _comparison_lines(c: EngineComparison, ref: str, got: str) -> list[str]:
    return [
        f"  next-token logits on {c.num_contexts} contexts (same tokens for both): max error {c.max_logit_error:.4f}, "
        f"mean {c.mean_logit_error:.5f} (logit std {c.logit_std:.3f}); top-1 agreement "
        f"{c.num_top1_agreeing}/{c.num_contexts}",
        f"  generation: {c.tokens_per_s_got:.1f} tokens/s ({ref} {c.tokens_per_s_ref:.1f}, one run each); greedy "
        f"outputs identical to {ref}'s for {c.num_outputs_identical}/{c.num_prompts} prompts ({got})",
    ]


def _kv_quant_lines(q: KVQuantResult) -> list[str]:
    return [
        f"int8 KV cache against full precision ({q.comparison.workload}, weights at init range {q.init_range}):",
        f"  bytes per block {q.bytes_per_block_full} -> {q.bytes_per_block_int8} "
        f"({q.bytes_per_block_full / q.bytes_per_block_int8:.2f}x the blocks in the same memory); "
        f"peak KV {_mib(q.peak_kv_bytes_full)} -> {_mib(q.peak_kv_bytes_int8)}",
        *_comparison_lines(q.comparison, "full precision", "int8"),
    ]
