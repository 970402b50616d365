"""The prepared GPU check (`python -m workers.bench.gpu_check`): one short run for a session that
has a CUDA GPU for a few minutes.

1. Builds a 0.5B-class random Llama (hidden 896, 24 layers, 14 heads, 2 KV heads).
2. Greedy equality of the triton attention backend, with its decode steps replayed as CUDA graphs
   and without, against the reference backend, on the GPU, in float32 (must be identical) and
   bfloat16 (agreement reported: the reference rounds its scores to bfloat16, the kernel keeps
   them in float32).
3. Tokens/s of the benchmark workloads for our engine in bfloat16 (triton attention with and
   without CUDA graphs, reference attention) and for `transformers` generate in bfloat16 on the
   same GPU, and a table of them; the seconds each engine took to start (graphs are recorded then).

It prints progress to stderr and the tables to stdout, and is sized to finish in a few minutes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers.bench.model_setup import PAD_ID, ModelShape

GPU_SHAPE = ModelShape(vocab_size=32000, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2)
# What a run uses; the tests swap in the CPU, the small workloads and the reference backend to
# walk the same code without a GPU.
DEVICE = "cuda"
SCALE = "full"  # workloads.py's sizes: the issue's
KERNEL_BACKEND = "triton"
BLOCK_SIZE = 16
NUM_KV_BLOCKS = 8192  # 131k tokens, 1.6 GB in bfloat16: room for every workload, and two engines fit
HF_BATCH_SIZE = 32
THROUGHPUT_WORKLOADS = ("shared-prefix", "distinct", "multi-turn")  # those workloads.py has
EQUALITY_DTYPES = ("float32", "bfloat16")  # float32 first: it must be identical
EQUALITY_NEW_TOKENS = 24
EQUALITY_PROMPTS = 8  # of each kind: shared-prefix and distinct
EQUALITY_LONGEST = 700  # tokens of the longest distinct prompt
WARMUP_PROMPTS = [[3 + i] * (20 + 7 * i) for i in range(4)]  # a batched prefill, then decodes


@dataclass(frozen=True, slots=True)
class Equality:
    dtype: str
    system: str  # which of ours was compared with the reference backend
    num_prompts: int
    num_identical: int  # prompts whose greedy tokens are the same on both backends
    first_divergence: int | None  # earliest token index where any prompt differs; None: none does


@dataclass(frozen=True, slots=True)
class Throughput:
    workload: str
    num_requested_tokens: int
    graphs_tokens_per_s: float  # triton attention, decode steps replayed as CUDA graphs
    triton_tokens_per_s: float  # triton attention, every kernel launched from Python
    reference_tokens_per_s: float
    hf_tokens_per_s: float
    num_agreeing_hf: int  # prompts whose graph-replayed tokens equal transformers' (bfloat16: rounding may differ)
    num_prompts: int


def systems() -> dict[str, tuple[str, bool]]:
    """Our engines, by label: (attention backend, cuda_graphs)."""
    return {
        f"{KERNEL_BACKEND} + CUDA graphs": (KERNEL_BACKEND, True),
        f"{KERNEL_BACKEND}, no graphs": (KERNEL_BACKEND, False),
        "reference backend": ("reference", False),  # last: what the others are compared with
    }


def compare_tokens(dtype: str, system: str, ours: list[list[int]], reference: list[list[int]]) -> Equality:
    identical = sum(a == b for a, b in zip(ours, reference))
    divergences = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                   for a, b in zip(ours, reference) if a != b]
    return Equality(dtype, system, len(reference), identical, min(divergences) if divergences else None)


def format_equality(rows: list[Equality]) -> str:
    lines = ["| dtype | ours | prompts | identical greedy tokens to reference | first divergence |",
             "|---|---|---|---|---|"]
    for r in rows:
        where = "-" if r.first_divergence is None else f"token {r.first_divergence}"
        lines.append(f"| {r.dtype} | {r.system} | {r.num_prompts} | {r.num_identical}/{r.num_prompts} | {where} |")
    return "\n".join(lines)


def format_throughput(rows: list[Throughput]) -> str:
    lines = [
        "| workload | tokens | ours triton + graphs tok/s | ours triton tok/s | ours reference tok/s "
        "| transformers tok/s | graphs / transformers | graphs / no graphs | graphs / reference "
        "| same tokens as transformers |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.workload} | {r.num_requested_tokens} | {r.graphs_tokens_per_s:.0f} | {r.triton_tokens_per_s:.0f} "
            f"| {r.reference_tokens_per_s:.0f} | {r.hf_tokens_per_s:.0f} "
            f"| {r.graphs_tokens_per_s / r.hf_tokens_per_s:.2f}x | {r.graphs_tokens_per_s / r.triton_tokens_per_s:.2f}x "
            f"| {r.graphs_tokens_per_s / r.reference_tokens_per_s:.2f}x | {r.num_agreeing_hf}/{r.num_prompts} |"
        )
    return "\n".join(lines)


def available_workloads(wanted: tuple[str, ...]) -> list[str]:
    """The wanted workloads that workers/bench/workloads.py defines, in order."""
    from workers.bench.workloads import WORKLOADS

    return [w for w in wanted if w in WORKLOADS]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def make_engine(folder: Path, dtype: str, system: str) -> Any:
    from workers import EngineConfig, LLMEngine, SamplingParams

    backend, graphs = systems()[system]
    started = time.perf_counter()
    engine = LLMEngine(EngineConfig(
        model=str(folder), device=DEVICE, dtype=dtype, attention_backend=backend, cuda_graphs=graphs,
        block_size=BLOCK_SIZE, num_kv_blocks=NUM_KV_BLOCKS, max_num_seqs=256, max_num_batched_tokens=2048,
    ))
    engine.generate(WARMUP_PROMPTS, SamplingParams(max_tokens=4, ignore_eos=True))  # triton compiles here
    engine.reset_prefix_cache()
    log(f"  {system}, {dtype}: started in {time.perf_counter() - started:.1f}s")
    return engine


def greedy(engine: Any, prompts: list[list[int]], max_tokens: list[int]) -> list[list[int]]:
    from workers import SamplingParams

    params = [SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0) for n in max_tokens]
    return [out.token_ids for out in engine.generate(prompts, params)]


def check_equality(folder: Path, dtype: str) -> list[Equality]:
    """Mixed-length prompts with a shared prefix (chunked prefill, prefix-cache hits, decodes of
    different lengths in one step, decode batches shrinking as prompts finish) on each system."""
    from workers.bench.workloads import distinct, shared_prefix

    a = shared_prefix(GPU_SHAPE.vocab_size, num_prompts=EQUALITY_PROMPTS, prefix_len=100, own_len=(1, 40),
                      new_tokens=EQUALITY_NEW_TOKENS)
    b = distinct(GPU_SHAPE.vocab_size, num_prompts=EQUALITY_PROMPTS, prompt_len=(5, EQUALITY_LONGEST),
                 new_tokens=(EQUALITY_NEW_TOKENS,) * 2)
    prompts, max_tokens = a.prompts + b.prompts, a.max_tokens + b.max_tokens
    tokens = {}
    for system in systems():
        engine = make_engine(folder, dtype, system)
        tokens[system] = greedy(engine, prompts, max_tokens)
        del engine
        _free_memory()
    *ours, reference = systems()
    return [compare_tokens(dtype, system, tokens[system], tokens[reference]) for system in ours]


def timed(engine: Any, workload: Any) -> tuple[float, list[list[int]]]:
    from workers.bench.engine_bench import run_ours

    run = run_ours(engine, workload)
    return run.seconds, run.token_ids


def run_hf(model: Any, prompts: list[list[int]], max_tokens: list[int]) -> tuple[float, list[list[int]]]:
    """transformers generate in static batches (as workers/bench/hf_peer.py), on the model's GPU."""
    import torch

    from workers.bench.hf_peer import left_pad

    outputs: list[list[int]] = []
    _synchronize()
    started = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(prompts), HF_BATCH_SIZE):
            wanted = max_tokens[start:start + HF_BATCH_SIZE]
            input_ids, attention_mask = (t.to(model.device) for t in left_pad(prompts[start:start + HF_BATCH_SIZE]))
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max(wanted),
                                 do_sample=False, eos_token_id=None, pad_token_id=PAD_ID)
            new = out[:, input_ids.shape[1]:].tolist()
            outputs.extend(row[:n] for row, n in zip(new, wanted))
    _synchronize()
    return time.perf_counter() - started, outputs


def check_throughput(folder: Path, names: list[str], repeat: int) -> list[Throughput]:
    import torch
    import transformers as tf

    tf.logging.set_verbosity_error()

    from workers.bench.workloads import make_workload

    hf_model = tf.LlamaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(DEVICE).eval()
    run_hf(hf_model, WARMUP_PROMPTS, [4] * len(WARMUP_PROMPTS))
    workloads = [make_workload(name, SCALE, GPU_SHAPE.vocab_size, BLOCK_SIZE) for name in names]
    seconds: dict[tuple[str, str], float] = {}
    tokens: dict[tuple[str, str], list[list[int]]] = {}
    for w in workloads:
        for r in range(repeat):
            log(f"  {w.name}: transformers run {r + 1}/{repeat}")
            s, t = run_hf(hf_model, w.prompts, w.max_tokens)
            if s < seconds.get((w.name, "hf"), float("inf")):
                seconds[w.name, "hf"], tokens[w.name, "hf"] = s, t
    del hf_model
    _free_memory()
    for system in systems():
        engine = make_engine(folder, "bfloat16", system)
        for w in workloads:
            for r in range(repeat):
                log(f"  {w.name}: ours ({system}) run {r + 1}/{repeat}")
                s, t = timed(engine, w)
                if s < seconds.get((w.name, system), float("inf")):
                    seconds[w.name, system], tokens[w.name, system] = s, t
        log(f"  {system}: {engine.stats()['num_cuda_graph_steps']} decode steps replayed as CUDA graphs")
        del engine
        _free_memory()
    graphs, eager, reference = systems()
    rows = []
    for w in workloads:
        n = w.num_requested_tokens
        agreeing = sum(a == b for a, b in zip(tokens[w.name, graphs], tokens[w.name, "hf"]))
        rows.append(Throughput(w.name, n, n / seconds[w.name, graphs], n / seconds[w.name, eager],
                               n / seconds[w.name, reference], n / seconds[w.name, "hf"], agreeing, len(w.prompts)))
    return rows


def _synchronize() -> None:
    import torch

    if DEVICE != "cpu":
        torch.cuda.synchronize()


def _free_memory() -> None:
    import torch

    if DEVICE != "cpu":
        torch.cuda.empty_cache()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m workers.bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2, help="timed runs of each system and workload (best kept)")
    parser.add_argument("--skip-throughput", action="store_true", help="only the greedy equality checks")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error(f"--repeat {args.repeat} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from workers.attention.triton_backend import triton_available
    from workers.bench.model_setup import build_model

    if DEVICE != "cpu" and not torch.cuda.is_available():
        print("error: the GPU check needs a CUDA GPU visible to PyTorch; run it on a machine with one",
              file=sys.stderr)
        return 1
    if KERNEL_BACKEND == "triton" and not triton_available():
        print("error: the GPU check needs triton (pip install triton)", file=sys.stderr)
        return 1
    started = time.perf_counter()
    log(f"{torch.cuda.get_device_name() if DEVICE != 'cpu' else 'CPU'}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        folder = Path(tmp)
        log(f"building the model (hidden {GPU_SHAPE.hidden_size}, {GPU_SHAPE.num_hidden_layers} layers)")
        build_model(GPU_SHAPE, folder)  # saved to the folder; the returned float32 copy is dropped
        log(f"  built in {time.perf_counter() - started:.0f}s")
        log(f"greedy equality, {KERNEL_BACKEND} with and without CUDA graphs against reference")
        equality = [row for dtype in EQUALITY_DTYPES for row in check_equality(folder, dtype)]
        print(format_equality(equality), flush=True)
        if not args.skip_throughput:
            names = available_workloads(THROUGHPUT_WORKLOADS)
            log(f"throughput: {', '.join(names)}")
            print(format_throughput(check_throughput(folder, names, args.repeat)), flush=True)
    log(f"done in {time.perf_counter() - started:.0f}s")
    exact = [r for r in equality if r.dtype == "float32"]
    return 0 if all(r.num_identical == r.num_prompts for r in exact) else 2


if __name__ == "__main__":
    sys.exit(main())
