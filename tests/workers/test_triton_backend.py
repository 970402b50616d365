"""The triton attention backend against the reference backend, on the CPU under Triton's interpreter.

`TRITON_INTERPRET=1` must be set before triton is imported, and must not leak into other tests, so
the checks run in one child process: this file run as a script. It computes every case and prints
one JSON object; the tests below assert on its numbers. The cases are small: the interpreter runs
each program instance in Python.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest


@dataclass(frozen=True, slots=True)
class Case:
    dtype: str
    kv_cache_dtype: str
    query_lens: tuple[int, ...]  # decodes (1) first, then prefill chunks
    context_lens: tuple[int, ...]  # keys already in the cache before this step
    block_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    shared_blocks: int = 0  # decodes 0 and 1 start with this many common blocks


MIXED = dict(query_lens=(1, 1, 1, 7, 20), context_lens=(13, 13, 30, 9, 0), block_size=4, num_heads=6, num_kv_heads=2,
             head_dim=16, shared_blocks=2)
CASES = {
    # Mixed decodes and prefill chunks, shuffled blocks, a key tile spanning 8 blocks, 3 query heads
    # per KV head (padded to 4 rows in the kernel), two decodes sharing their first blocks.
    "float32": Case("float32", "auto", **MIXED),
    "bfloat16": Case("bfloat16", "auto", **MIXED),
    "float32-int8": Case("float32", "int8", **MIXED),
    "bfloat16-int8": Case("bfloat16", "int8", **MIXED),
    "bfloat16-fp8": Case("bfloat16", "fp8", **MIXED),
    # Decodes only (the small tile), head_dim not a power of two, blocks larger than half a key tile.
    "float32-decodes": Case("float32", "auto", (1, 1, 1), (40, 3, 17), 16, 4, 4, 24),
    # A prefill longer than one query tile, no grouped heads to pad, one block per sequence row.
    "float32-prefill": Case("float32", "auto", (37, 5), (0, 50), 32, 4, 1, 16),
}
TOLERANCE = {"float32": 1e-5, "bfloat16": 3e-2}
NUM_ENGINE_TOKENS = 4


def run_case(case: Case, seed: int) -> dict:
    """Writes context and the step's keys into a reference cache and a triton cache alike, attends
    with both on the same metadata, and returns the largest difference."""
    import numpy as np
    import torch

    from workers.attention.metadata import AttentionMetadata
    from workers.attention.reference import ReferenceBackend
    from workers.attention.triton_backend import TritonBackend

    dtype = getattr(torch, case.dtype)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    bs, kvh, d = case.block_size, case.num_kv_heads, case.head_dim
    query_lens = np.asarray(case.query_lens)
    seq_lens = (np.asarray(case.context_lens) + query_lens).astype(np.int32)
    num_blocks = -(-seq_lens // bs)
    pool = int(num_blocks.sum()) + 8
    free = list(rng.permutation(pool))  # shuffled: no sequence's blocks are in order
    tables = np.zeros((len(seq_lens), int(num_blocks.max())), dtype=np.int32)
    for s, n in enumerate(num_blocks):
        tables[s, :n] = [free.pop() for _ in range(n)]
    shared = case.shared_blocks
    if shared:
        tables[1, :shared] = tables[0, :shared]
    query_start = np.zeros(len(seq_lens) + 1, dtype=np.int32)
    query_start[1:] = np.cumsum(query_lens)
    device = torch.device("cpu")
    ref, tri = ReferenceBackend(case.num_heads, kvh, d), TritonBackend(case.num_heads, kvh, d)
    caches = [b.make_cache(1, pool, bs, dtype, device, case.kv_cache_dtype) for b in (ref, tri)]

    def slots(s: int, positions: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(tables[s, positions // bs].astype(np.int64) * bs + positions % bs)

    for s, n in enumerate(case.context_lens):
        first = shared * bs if s == 1 else 0  # the shared blocks hold sequence 0's keys
        if n > first:
            k, v = (torch.randn(n - first, kvh, d, generator=gen).to(dtype) for _ in range(2))
            for cache in caches:
                cache.write(0, k, v, slots(s, np.arange(first, n)))
    slot_mapping = torch.cat([slots(s, np.arange(c, seq_lens[s])) for s, c in enumerate(case.context_lens)])
    meta = AttentionMetadata(
        slot_mapping=slot_mapping, query_start=query_start, seq_lens=seq_lens, block_tables=tables,
        num_decodes=int((query_lens == 1).sum()), cascade_start=np.zeros(1, dtype=np.int32),
        cascade_blocks=np.zeros(0, dtype=np.int32), block_size=bs,
    )
    num_tokens = int(query_start[-1])
    # q as the model hands it: a strided view of a fused projection.
    qkv = torch.randn(num_tokens, case.num_heads + 2 * kvh, d, generator=gen).to(dtype)
    q, k, v = qkv.split([case.num_heads, kvh, kvh], dim=1)
    expected = ref.prepare(meta, caches[0]).attend(0, q, k, v)
    step = tri.prepare(meta, caches[1])
    got = step.attend(0, q, k, v)
    return {
        "max_error": (got.float() - expected.float()).abs().max().item(),
        "shape": list(got.shape), "dtype": str(got.dtype).removeprefix("torch."), "uses_cascade": step.uses_cascade,
        "expected_shape": list(expected.shape),
    }


ENGINES = {  # name -> EngineConfig settings
    "reference": dict(attention_backend="reference"),
    "triton": dict(attention_backend="triton"),  # decodes on the CUDA graphs' static inputs
    "triton-eager": dict(attention_backend="triton", cuda_graphs=False),
}
NUM_ENGINE_BLOCKS = 64
DECODE_MAX_TOKENS = (2, 3, 4, 5, 6)  # short prompts prefilled in one step, then decode batches of 5, 4, 3, 2, 1


def run_engines() -> dict:
    """Greedy tokens of the built-in tiny model on each engine of ENGINES: chunked prefill (decodes
    and chunks in one step) and a shared prefix served from the prefix cache, then decode-only
    steps of 5 to 1 sequences (on static inputs, 5 and 3 padded to 8 and 4)."""
    import torch

    from workers import EngineConfig, LLMEngine, SamplingParams

    gen = torch.Generator().manual_seed(4)
    prefix = torch.randint(0, 256, (24,), generator=gen).tolist()  # 3 blocks of 8
    mixed = [prefix + torch.randint(0, 256, (n,), generator=gen).tolist() for n in (3, 11)]
    mixed.append(torch.randint(0, 256, (21,), generator=gen).tolist())
    short = [torch.randint(0, 256, (3,), generator=gen).tolist() for _ in DECODE_MAX_TOKENS]
    batches = [(mixed, [SamplingParams(max_tokens=NUM_ENGINE_TOKENS, ignore_eos=True)] * len(mixed)),
               (short, [SamplingParams(max_tokens=n, ignore_eos=True) for n in DECODE_MAX_TOKENS])]
    results, blocks = {}, {}
    for name, settings in ENGINES.items():
        engine = LLMEngine(EngineConfig(dtype="float32", num_kv_blocks=NUM_ENGINE_BLOCKS, max_num_batched_tokens=16,
                                        block_size=8, **settings))
        static, static_sizes = engine.runner.static_decode, []
        if static is not None:
            run = static.run
            static.run = lambda *args: static_sizes.append(len(args[3])) or run(*args)  # args[3]: seq_lens
        tokens = [out.token_ids for prompts, params in batches for out in engine.generate(prompts, params)]
        stats = engine.stats()
        blocks[name] = engine.kv_cache.kv[:, :, :, :NUM_ENGINE_BLOCKS]
        results[name] = {
            "backend": type(engine.attention).__name__, "tokens": tokens, "hits": int(stats["prefix_cache_hits"]),
            "static_sizes": sorted(set(static_sizes)), "graph_steps": stats["num_cuda_graph_steps"],
            "cache_blocks": engine.kv_cache.num_blocks, "pool_blocks": engine.kv_manager.pool.num_blocks,
            "recorded": static is not None and static.record,
        }
    # The padding rows write only the scratch block: the pool's blocks hold what eager steps wrote.
    results["triton"]["pool_difference"] = (blocks["triton"] - blocks["triton-eager"]).abs().max().item()
    return results


def _main() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run under TRITON_INTERPRET=1"
    from workers.attention.triton_backend import triton_available

    results = {"available": triton_available()}
    results["cases"] = {name: run_case(case, seed) for seed, (name, case) in enumerate(CASES.items())}
    results["engines"] = run_engines()
    print(json.dumps(results))


@pytest.fixture(scope="module")
def results() -> dict:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_available_under_the_interpreter(results):
    assert results["available"] is True


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_backend(results, name):
    case, got = CASES[name], results["cases"][name]
    assert got["shape"] == got["expected_shape"] == [sum(case.query_lens), case.num_heads * case.head_dim]
    assert got["dtype"] == case.dtype
    assert got["uses_cascade"] is False
    assert got["max_error"] <= TOLERANCE[case.dtype], f"{name}: max error {got['max_error']}"


def test_engine_greedy_tokens_match_reference(results):
    engines = results["engines"]
    assert {name: e["backend"] for name, e in engines.items()} == {
        "reference": "ReferenceBackend", "triton": "TritonBackend", "triton-eager": "TritonBackend"}
    assert [len(t) for t in engines["reference"]["tokens"]] == [NUM_ENGINE_TOKENS] * 3 + list(DECODE_MAX_TOKENS)
    assert engines["triton"]["tokens"] == engines["triton-eager"]["tokens"] == engines["reference"]["tokens"]
    assert all(e["hits"] > 0 for e in engines.values())  # later prompts' prefix came from the cache


def test_engine_decodes_run_on_static_inputs_with_padding(results):
    static, eager = results["engines"]["triton"], results["engines"]["triton-eager"]
    assert static["static_sizes"] == [1, 2, 3, 4, 5]  # 3 and 5 ran padded (graphs of 4 and 8)
    assert static["graph_steps"] >= len(DECODE_MAX_TOKENS)
    assert static["recorded"] is False  # no GPU: the same pass, not recorded
    assert (static["cache_blocks"], static["pool_blocks"]) == (NUM_ENGINE_BLOCKS + 1, NUM_ENGINE_BLOCKS)
    assert (eager["cache_blocks"], eager["graph_steps"], eager["static_sizes"]) == (NUM_ENGINE_BLOCKS, 0, [])
    assert static["pool_difference"] <= 1e-5


POINTERS = ("q_ptr", "k_ptr", "v_ptr", "k_scale_ptr", "v_scale_ptr", "out_ptr", "block_tables_ptr", "seq_lens_ptr",
            "query_start_ptr", "tile_seq_ptr", "tile_q0_ptr")


@pytest.mark.parametrize(("dtype", "kv", "kind"), [("bf16", "bf16", 0), ("bf16", "i8", 1), ("bf16", "fp8e4nv", 2),
                                                   ("fp32", "fp32", 0)])
def test_kernel_compiles_for_hopper(dtype, kv, kind):
    """The interpreter skips the compiler's checks (constexpr globals, dot shapes and types): the
    kernel is compiled here, without a GPU, to the H200's machine code (sm_90) for the 0.5B
    check's shape (14 heads, 2 KV heads, head_dim 64, blocks of 16)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from workers.attention.triton_kernels import paged_attention_kernel as kernel

    consts = dict(H=14, G=7, D=64, BS=16, BLOCK_Q=8, G_PAD=8, BLOCK_M=64, D_PAD=64, TILE_N=32, KV_KIND=kind,
                  IEEE=dtype == "fp32", UPCAST=False)
    types = {"q_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "k_ptr": f"*{kv}", "v_ptr": f"*{kv}",
             "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32", "qk_scale": "fp32"}
    names = kernel.arg_names
    signature = {n: "constexpr" if n in consts else types.get(n, "*i32" if n in POINTERS else "i32") for n in names}
    source = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(c),): v for c, v in consts.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
    assert compiled.asm["cubin"]


def test_interpreter_setting_stays_in_the_child():
    assert os.environ.get("TRITON_INTERPRET") != "1"


if __name__ == "__main__":
    _main()
