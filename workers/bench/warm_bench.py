"""Warm restarts measured: a restarted engine with and without a KV snapshot, and the snapshot's
load time against recomputing the same prefixes.

For each dtype, an engine runs one chunk of the shared-prefix workload (a 256-token prefix, each
prompt 16-64 tokens of its own) and writes a snapshot. The chunk measured next is another chunk of
the same job: the same prefix, other prompts. Then, on fresh engines (a restarted worker: same model, empty pool; each first runs one unrelated prompt so that
kernel set-up is not counted against either side):

- cold: the workload's first chunk of requests, as a fresh worker runs it;
- warm: the snapshot loaded (read, checksummed, imported), then the same chunk;
- recompute: the prefixes the snapshot holds, prefilled (`LLMEngine.warm`) on a fresh engine: what
  loading saves. Load must beat it, or persistence is not worth its disk.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from workers import EngineConfig, LLMEngine, SamplingParams, persistence
from workers.bench.model_setup import SHAPES, build_model
from workers.bench.workloads import shared_prefix


@dataclass(frozen=True, slots=True)
class ChunkRun:
    ttft_p50_s: float  # of the chunk's requests, from submission
    first_token_s: float  # the chunk's first token, from submission
    tokens_per_s: float  # generated tokens over the chunk's wall time
    cached_tokens: int


@dataclass(frozen=True, slots=True)
class WarmBenchResult:
    dtype: str
    prefix_len: int
    num_prompts: int
    snapshot_blocks: int
    snapshot_bytes: int
    cold: ChunkRun
    warm: ChunkRun
    load_s: float  # median: read + checksum + import
    recompute_s: float  # median: prefill of the same prompts' blocks


def run_warm_bench(dtypes: list[str], scale: str = "full", repeat: int = 3, chunk: int = 64,
                   prefix_len: int | None = None) -> list[WarmBenchResult]:
    shape = SHAPES[scale]
    prefix_len = prefix_len or (256 if scale == "full" else 64)
    if prefix_len + 64 + 64 > shape.max_position_embeddings:
        raise ValueError(f"--prefix-len {prefix_len} leaves no room in the model's "
                         f"{shape.max_position_embeddings} positions; use at most {shape.max_position_embeddings - 128}")
    workload = shared_prefix(shape.vocab_size, num_prompts=2 * chunk, prefix_len=prefix_len)
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in workload.max_tokens[:chunk]]
    before, measured = workload.prompts[:chunk], workload.prompts[chunk:]  # one job's two chunks
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-warm-") as tmp:
        folder = Path(tmp) / "model"
        _log(f"building the {scale} model")
        build_model(shape, folder)
        for dtype in dtypes:
            config = EngineConfig(model=str(folder), dtype=dtype, num_kv_blocks=4096)
            source = _fresh(config)
            source.generate(before, params)
            snapshot_dir = Path(tmp) / f"snapshots-{dtype}"
            path = persistence.write(persistence.capture(source), snapshot_dir)
            size = sum(f.stat().st_size for f in path.iterdir())
            blocks = source.kv_manager.pool.num_cached_blocks
            del source
            colds, warms, loads, recomputes = [], [], [], []
            for i in range(repeat):
                _log(f"{dtype}: run {i + 1} of {repeat}")
                colds.append(_chunk(_fresh(config), measured, params))
                engine = _fresh(config)
                started = time.perf_counter()
                loaded, refused = persistence.load_newest(engine, snapshot_dir)
                loads.append(time.perf_counter() - started)
                assert loaded is not None and not refused, refused
                warms.append(_chunk(engine, measured, params))
                engine = _fresh(config)
                started = time.perf_counter()
                engine.warm(before)  # what the snapshot holds, computed instead
                recomputes.append(time.perf_counter() - started)
            results.append(WarmBenchResult(dtype, prefix_len, chunk, blocks, size, _median_run(colds), _median_run(warms),
                                           statistics.median(loads), statistics.median(recomputes)))
    return results


def format_warm_report(results: list[WarmBenchResult]) -> str:
    lines = [f"First chunk of {results[0].num_prompts} prompts after a restart, shared prefix of "
             f"{results[0].prefix_len} tokens:" if results else "", "",
             "| dtype | restart | first token (s) | TTFT p50 (s) | tokens/s | cached tokens |",
             "|---|---|---|---|---|---|"]
    for r in results:
        for name, run in (("cold", r.cold), ("warm (snapshot)", r.warm)):
            lines.append(f"| {r.dtype} | {name} | {run.first_token_s:.3f} | {run.ttft_p50_s:.3f} | "
                         f"{run.tokens_per_s:.0f} | {run.cached_tokens} |")
    lines += ["", "| dtype | snapshot blocks | snapshot MiB | load (s) | recompute (s) | recompute / load |",
              "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.dtype} | {r.snapshot_blocks} | {r.snapshot_bytes / 2**20:.1f} | {r.load_s:.3f} | "
                     f"{r.recompute_s:.3f} | {r.recompute_s / r.load_s:.1f}x |")
    return "\n".join(lines)


def _fresh(config: EngineConfig) -> LLMEngine:
    """A restarted worker's engine: built, its kernels exercised once on an unrelated prompt, its
    cache emptied again."""
    engine = LLMEngine(config)
    engine.generate([[7] * 40], SamplingParams(max_tokens=4, ignore_eos=True))
    engine.reset_prefix_cache()
    return engine


def _chunk(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams]) -> ChunkRun:
    started = time.perf_counter()
    outputs = engine.generate(prompts, params)
    wall = time.perf_counter() - started
    ttfts = [o.metrics.ttft for o in outputs if o.metrics.ttft is not None]
    first = min(o.metrics.first_token_time for o in outputs) - min(o.metrics.arrival_time for o in outputs)
    generated = sum(len(o.token_ids) for o in outputs)
    return ChunkRun(statistics.median(ttfts), first, generated / wall, sum(o.num_cached_tokens for o in outputs))


def _median_run(runs: list[ChunkRun]) -> ChunkRun:
    return ChunkRun(*(statistics.median(getattr(r, f) for r in runs)
                      for f in ("ttft_p50_s", "first_token_s", "tokens_per_s", "cached_tokens")))


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
