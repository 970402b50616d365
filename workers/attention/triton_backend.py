"""The triton attention backend, for CUDA GPUs: one Triton kernel (`triton_kernels.py`) attends a
step's decodes and prefill chunks in one launch, reading K/V in place through the block tables
(any block size), grouped-query heads without repeated keys, the causal mask by position, the
softmax online in float32, and int8 or fp8 blocks dequantized as they are loaded.

It keeps `PagedKVCache`'s layout (`[layers, 2, KVH, NB, BS * D]`, a block's tokens `[BS, D]` per
head, so a key tile is a row-contiguous load) and its writes (`index_copy_`, quantizing in torch).

Not here, on purpose:
- Cascade: decodes sharing leading blocks each read those blocks themselves (`uses_cascade` is
  False); the results are the same, only the shared loads are repeated.
- Split-KV for very long decodes: one program walks a sequence's keys for one KV head.

Decode steps reuse this step object on static inputs and replay as CUDA graphs
(`workers/decode_graphs.py`): nothing in `attend` reads the host or depends on anything but the
tensors' shapes.

The same kernel runs on the CPU under Triton's interpreter (`TRITON_INTERPRET=1`, set before
triton is imported), which is how the tests check it against the reference backend; they also compile
it for the H200 (sm_90) without a GPU, which catches what the interpreter lets through.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from workers.attention.metadata import AttentionMetadata
from workers.kv_cache import PagedKVCache
from workers.kv_quant import from_storage

TILE_N = 32  # keys per inner iteration, whatever the block size
DECODE_ROWS = 16  # rows (tokens x grouped heads) of a tile in decode-only steps: tl.dot's minimum
PREFILL_ROWS = 64  # rows of a tile in steps with prefill chunks


@lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether the kernel can run: triton imports, and there is a CUDA GPU or the interpreter is on."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or _interpreting()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class TritonBackend:
    name = "triton"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.group = num_heads // num_kv_heads
        self.group_pad = _pow2(self.group)
        self.head_dim_pad = max(16, _pow2(head_dim))
        self.scale = head_dim**-0.5

    def make_cache(self, num_layers: int, num_blocks: int, block_size: int, dtype: torch.dtype,
                   device: torch.device, kv_cache_dtype: str) -> PagedKVCache:
        return PagedKVCache(num_layers, num_blocks, block_size, self.num_kv_heads, self.head_dim, dtype, device,
                            kv_cache_dtype)

    def block_q(self, max_query_len: int) -> int:
        """Query tokens per tile: few for decode-only steps, more when prefill chunks come."""
        rows = DECODE_ROWS if max_query_len <= 1 else PREFILL_ROWS
        return max(1, rows // self.group_pad)

    def prepare(self, meta: AttentionMetadata, cache: PagedKVCache) -> TritonStep:
        query_lens = meta.query_lens
        block_q = self.block_q(int(query_lens.max()))
        tiles_per_seq = -(-query_lens // block_q)  # [S]
        tile_seq = np.repeat(np.arange(meta.num_seqs, dtype=np.int32), tiles_per_seq)
        first_tile = np.repeat(np.cumsum(tiles_per_seq) - tiles_per_seq, tiles_per_seq)
        tile_q0 = ((np.arange(len(tile_seq)) - first_tile) * block_q).astype(np.int32)
        tables = np.ascontiguousarray(meta.block_tables, dtype=np.int32)
        # One host-to-device copy a step; every layer reuses the views.
        parts = [tables.reshape(-1), meta.seq_lens, meta.query_start, tile_seq, tile_q0]
        packed = torch.from_numpy(np.concatenate([np.asarray(p, dtype=np.int32) for p in parts]))
        packed = packed.to(meta.slot_mapping.device, non_blocking=True)
        views, at = [], 0
        for p in parts:
            views.append(packed[at:at + len(p)])
            at += len(p)
        return TritonStep(self, cache, meta.slot_mapping, views[0], tables.shape[1], views[1], views[2], views[3],
                          views[4], block_q)


@dataclass(slots=True)
class TritonStep:
    backend: TritonBackend
    cache: PagedKVCache
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor  # [S * MB] int32, rows of MB
    table_width: int  # MB
    seq_lens: torch.Tensor  # [S] int32
    query_start: torch.Tensor  # [S + 1] int32
    tile_seq: torch.Tensor  # [num_tiles] int32
    tile_q0: torch.Tensor  # [num_tiles] int32
    block_q: int

    @property
    def uses_cascade(self) -> bool:
        return False

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q [T, H, D]; k, v [T, KVH, D] -> [T, H * D]
        from workers.attention.triton_kernels import KV_FP8, KV_INT8, KV_PLAIN, LOG2E, paged_attention_kernel

        b, cache = self.backend, self.cache
        cache.write(layer, k, v, self.slot_mapping)
        if q.stride(2) != 1:
            q = q.contiguous()
        out = q.new_empty(q.shape[0], b.num_heads * b.head_dim)
        keys, values = cache.kv[layer, 0], cache.kv[layer, 1]  # [KVH, NB, BS * D]
        if cache.quantized:
            keys, values = from_storage(keys, cache.kind), from_storage(values, cache.kind)
            k_scale, v_scale = cache.scales[layer, 0], cache.scales[layer, 1]
            kind = KV_INT8 if cache.kind == "int8" else KV_FP8
        else:
            k_scale, v_scale, kind = keys, values, KV_PLAIN  # unread placeholders
        grid = (len(self.tile_seq), b.num_kv_heads)
        paged_attention_kernel[grid](
            q, q.stride(0), q.stride(1), keys, values, k_scale, v_scale, out,
            self.block_tables, self.table_width, self.seq_lens, self.query_start, self.tile_seq, self.tile_q0,
            cache.num_blocks * cache.block_size * b.head_dim, cache.num_blocks * cache.block_size,
            b.scale * LOG2E,
            H=b.num_heads, G=b.group, D=b.head_dim, BS=cache.block_size, BLOCK_Q=self.block_q, G_PAD=b.group_pad,
            BLOCK_M=self.block_q * b.group_pad,
            D_PAD=b.head_dim_pad, TILE_N=TILE_N, KV_KIND=kind, IEEE=q.dtype == torch.float32,
            UPCAST=_interpreting(),
        )
        return out
