"""Every attention backend against the reference backend, on the same step: decodes and prefill
chunks mixed, block tables out of order, shared leading blocks (cascade), GQA, int8 KV."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workers.attention import make_backend
from workers.attention.metadata import AttentionMetadata, cascade_groups

LAYERS, NUM_BLOCKS = 2, 64


def _step(block_size: int, specs: list[tuple[int, int]], shared_blocks: int, seed: int):
    """specs: (tokens already in the cache, new tokens) per sequence; decodes (new = 1) come first.
    The first `shared_blocks` blocks of every decode are the same blocks (a shared prefix)."""
    rng = np.random.default_rng(seed)
    free = list(rng.permutation(NUM_BLOCKS))
    shared = [free.pop() for _ in range(shared_blocks)]
    tables, starts, lens = [], [], []
    for cached, new in specs:
        need = -(-(cached + new) // block_size)
        own = shared[:need] if new == 1 else []
        tables.append(own + [free.pop() for _ in range(need - len(own))])
        starts.append(cached)
        lens.append(new)
    width = max(len(t) for t in tables)
    table = np.zeros((len(specs), width), dtype=np.int32)
    for i, t in enumerate(tables):
        table[i, :len(t)] = t
    starts, lens = np.array(starts), np.array(lens)
    seq_lens = starts + lens
    num_decodes = int((lens == 1).sum())
    order, cascade_start, cascade_blocks = cascade_groups(table[:num_decodes], seq_lens[:num_decodes], block_size)
    order = np.concatenate([order, np.arange(num_decodes, len(specs))])
    table, starts, lens, seq_lens = table[order], starts[order], lens[order], seq_lens[order]
    query_start = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    positions = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lens)])
    seq_of_token = np.repeat(np.arange(len(specs)), lens)
    slots = table[seq_of_token, positions // block_size].astype(np.int64) * block_size + positions % block_size
    meta = AttentionMetadata(torch.from_numpy(slots), query_start, seq_lens.astype(np.int32), table, num_decodes,
                             cascade_start, cascade_blocks, block_size)
    # Cached tokens' K/V, written as earlier steps would have.
    history = [(table[i], np.arange(starts[i])) for i in range(len(specs))]
    return meta, history


def _fill_history(backend, cache, history, num_kv_heads, head_dim, dtype, block_size, gen):
    written: set[int] = set()
    for table, positions in history:
        slots = [int(table[p // block_size]) * block_size + p % block_size for p in positions]
        new = [s for s in slots if s not in written]  # a shared block is written once
        written.update(new)
        if not new:
            continue
        for layer in range(LAYERS):
            k, v = (torch.randn(len(new), num_kv_heads, head_dim, generator=gen).to(dtype) for _ in range(2))
            cache.write(layer, k, v, torch.tensor(new, dtype=torch.int64))


def _run(name, meta, history, heads, kv_heads, head_dim, dtype, kv_cache_dtype, seed):
    backend = make_backend(name, torch.device("cpu"), heads, kv_heads, head_dim)
    assert backend.name == name
    cache = backend.make_cache(LAYERS, NUM_BLOCKS, meta.block_size, dtype, torch.device("cpu"), kv_cache_dtype)
    gen = torch.Generator().manual_seed(seed)
    _fill_history(backend, cache, history, kv_heads, head_dim, dtype, meta.block_size, gen)
    step = backend.prepare(meta, cache)
    t = int(meta.query_start[-1])
    outs = []
    for layer in range(LAYERS):
        q = torch.randn(t, heads, head_dim, generator=gen).to(dtype)
        qkv = torch.randn(t, 2 * kv_heads * head_dim + 3, generator=gen).to(dtype)  # v a strided view, as in the model
        k = qkv[:, : kv_heads * head_dim].view(t, kv_heads, head_dim).contiguous()
        v = qkv[:, kv_heads * head_dim : 2 * kv_heads * head_dim].view(t, kv_heads, head_dim)
        outs.append(step.attend(layer, q, k, v))
    return torch.stack(outs), step


CASES = {
    "decodes-sharing-a-prefix": (16, [(70, 1), (40, 1), (33, 1), (90, 1), (5, 1)], 2),
    "mixed-decode-and-prefill": (16, [(47, 1), (0, 37), (20, 9), (16, 1), (3, 70)], 0),
    "odd-block-size": (5, [(12, 1), (11, 1), (30, 1), (0, 13), (7, 6)], 2),
    "one-long-prefill": (16, [(0, 200)], 0),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize(("heads", "kv_heads"), [(8, 2), (4, 4)])
@pytest.mark.parametrize(("dtype", "kv_cache_dtype", "tol"), [
    (torch.float32, "auto", 2e-5), (torch.bfloat16, "auto", 2e-2), (torch.float32, "int8", 2e-5),
])
# head_dim 64 and 128 with block size 16 take the kernel's loops specialised for them (and, in
# bfloat16, its matrix-tile path on a CPU with AMX, or its vector bfloat16 pairs on one with
# AVX512-BF16); 16 the general ones.
@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_cpu_backend_matches_reference(case, heads, kv_heads, dtype, kv_cache_dtype, tol, head_dim):
    block_size, specs, shared = CASES[case]
    meta, history = _step(block_size, specs, shared, seed=len(specs))
    ref, _ = _run("reference", meta, history, heads, kv_heads, head_dim, dtype, kv_cache_dtype, seed=1)
    got, step = _run("cpu", meta, history, heads, kv_heads, head_dim, dtype, kv_cache_dtype, seed=1)
    assert step.uses_cascade == (shared > 0)
    assert got.dtype == dtype and got.shape == ref.shape
    # int8: both backends quantize the same values the same way (round half to even), so they
    # agree to float32 rounding, not merely to the quantization's resolution.
    torch.testing.assert_close(got.float(), ref.float(), atol=tol, rtol=tol)


def _cpu_has(flag: str) -> bool:
    with open("/proc/cpuinfo") as cpuinfo:
        return any(line.startswith("flags") and flag in line.split() for line in cpuinfo)


def test_bfloat16_pairs_are_used_where_the_cpu_multiplies_them():
    # Where the CPU has AMX, the cases above checked the matrix-tile path against the reference
    # (their prefill chunks and cascade groups are tiles of more than 8 rows); where it has
    # AVX512-BF16 without AMX, the vector bfloat16 dot product on the same pairs; elsewhere the
    # float32 vector path.
    from workers.native_kernels import load_cpu_kernels

    def pairs(head_dim: int, block_size: int, dtype: torch.dtype) -> bool:
        backend = make_backend("cpu", torch.device("cpu"), 8, 2, head_dim)
        return backend.make_cache(1, 4, block_size, dtype, torch.device("cpu"), "auto").pairs

    assert pairs(64, 16, torch.bfloat16) == (_cpu_has("amx_bf16") or _cpu_has("avx512_bf16"))
    assert bool(load_cpu_kernels().matrix_tiles_used(16, 64)) == _cpu_has("amx_bf16")
    assert not pairs(64, 32, torch.bfloat16)  # block size 16 only
    assert not pairs(16, 16, torch.bfloat16)  # head dim 32-256
    assert not pairs(64, 16, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [16, 64])
def test_the_cpu_cache_gives_back_what_it_stored_whatever_its_layout(dtype, head_dim):
    # What the kernel writes (transposed keys, or pairs on the matrix unit) reads back as rows, and
    # moves to another cache and back (snapshots) unchanged.
    backend = make_backend("cpu", torch.device("cpu"), 4, 2, head_dim)
    cache = backend.make_cache(2, 8, 16, dtype, torch.device("cpu"), "auto")
    gen = torch.Generator().manual_seed(3)
    slots = torch.randperm(8 * 16, generator=gen)[:40]
    k, v = (torch.randn(40, 2, head_dim, generator=gen).to(dtype) for _ in range(2))
    cache.write(1, k, v, slots)
    table = torch.arange(8).reshape(1, 8)
    keys, values = cache.gather(1, cache.gather_index(table), 1)  # [KVH, 1, 128, D]
    assert torch.equal(keys[:, 0, slots].transpose(0, 1), k) and torch.equal(values[:, 0, slots].transpose(0, 1), v)
    exported, _ = cache.export_blocks(list(range(8)))
    other = backend.make_cache(2, 8, 16, dtype, torch.device("cpu"), "auto")
    other.import_blocks(list(reversed(range(8))), exported, None)
    assert torch.equal(other.export_blocks(list(reversed(range(8))))[0], exported)
    assert torch.equal(other.gather(1, other.gather_index(table.flip(1)), 1)[0], keys)


def test_cascade_groups_gather_decodes_by_shared_blocks():
    tables = np.array([[7, 8, 1], [3, 4, 5], [7, 8, 2], [7, 9, 6], [3, 4, 0], [11, 12, 13]])
    seq_lens = np.array([40, 40, 40, 40, 20, 40])
    order, starts, blocks = cascade_groups(tables, seq_lens, 16)
    # [3, 4, ...] sequences share 1 block (the one at position 20 can use only one full block);
    # [7, ...] sequences share block 7 (the third member differs at block 2); 11 shares nothing.
    assert order.tolist() == [1, 4, 0, 2, 3, 5]
    assert starts.tolist() == [0, 2, 5]
    assert blocks.tolist() == [1, 1]


@pytest.mark.parametrize("compiler", ["/bin/false", "no-such-compiler-anywhere"])
def test_without_a_working_compiler_auto_falls_back_with_one_warning(compiler, monkeypatch, tmp_path):
    import workers.native_kernels as ext

    monkeypatch.setenv("CXX", compiler)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # an empty cache: nothing built earlier is reused
    monkeypatch.setattr(ext, "_loaded", {})
    with pytest.warns(RuntimeWarning, match="reference attention backend") as caught:
        backend = make_backend("auto", torch.device("cpu"), 8, 2, 16)
        again = make_backend("auto", torch.device("cpu"), 8, 2, 16)
    assert backend.name == again.name == "reference"
    assert len(caught) == 1
    with pytest.raises(ValueError, match="needs a C.. compiler"):
        make_backend("cpu", torch.device("cpu"), 8, 2, 16)
