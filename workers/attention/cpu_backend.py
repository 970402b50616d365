"""The CPU attention backend: C++ kernels (`cpu_kernels.cpp`) that read K/V in place in the block
pool. No gathered copy, no padding to the longest sequence, grouped-query heads without repeated
keys, decodes and prefill chunks in one call, cascade over blocks a group of decodes shares, and
int8 blocks dequantized inside the loop.

Why C++ and not FlexAttention or `torch.compile`: the step's shapes change every step (tokens,
sequences, block-table width), which makes a compiled graph recompile or run with dynamic shapes,
and neither reads a paged, transposed, int8 block table in place; a plain kernel does, builds in
seconds with gcc, and needs no warm-up.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np
import torch

from workers.attention.metadata import AttentionMetadata
from workers.kv_cache import PagedKVCache

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}


class CpuKVCache(PagedKVCache):
    """PagedKVCache's tensor `[layers, 2, kv_heads, num_blocks, block_size * head_dim]`, with each
    block's keys stored transposed (`[head_dim, block_size]`), so the kernel scores a block's keys
    with one vector FMA per query element; values stay `[block_size, head_dim]`. Where the CPU's
    matrix unit (AMX) or vector bfloat16 dot product (AVX512-BF16) attends bfloat16 blocks
    (`pairs`), both go in pairs as those instructions read them: keys `[head_dim / 2, block_size,
    2]`, values `[block_size / 2, head_dim, 2]`."""

    def __init__(self, library: ctypes.CDLL, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.kind == "fp8":
            raise ValueError("kv_cache_dtype='fp8' is for CUDA GPUs; the CPU backend stores 'int8'")
        self.library = library
        self.kv_code = DTYPE_CODES[self.kv.dtype]
        # bfloat16 blocks stored in pairs and attended on the CPU's matrix unit (AMX) or with its
        # vector bfloat16 dot product (AVX512-BF16): where it has one, for block size 16 and head
        # dim 32, 64, 128 or 256.
        self.pairs = self.kv.dtype == torch.bfloat16 and bool(library.pairs_layout_used(self.block_size,
                                                                                          self.head_dim))
        self._layer_bytes = self.kv[0].nbytes
        self._half_bytes = self.kv[0, 0].nbytes
        self._scale_layer_bytes = self.scales[0].nbytes if self.scales is not None else 0
        self._scale_half_bytes = self.scales[0, 0].nbytes if self.scales is not None else 0

    def pointers(self, layer: int) -> tuple[int, int, int | None, int | None]:
        """Addresses of layer's K, V, K scales and V scales."""
        base = self.kv.data_ptr() + layer * self._layer_bytes
        if self.scales is None:
            return base, base + self._half_bytes, None, None
        sbase = self.scales.data_ptr() + layer * self._scale_layer_bytes
        return base, base + self._half_bytes, sbase, sbase + self._scale_half_bytes

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """k, v [T, KVH, D] (rows may be strided, heads and elements contiguous) go to slots [T]."""
        assert k.stride(2) == v.stride(2) == 1 and k.stride(1) == v.stride(1) == self.head_dim
        assert k.dtype == v.dtype == self.dtype and slots.dtype == torch.int64 and slots.is_contiguous()
        kp, vp, ks, vs = self.pointers(layer)
        self.library.write_kv(
            k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), DTYPE_CODES[k.dtype], k.shape[0], slots.data_ptr(),
            kp, vp, ks, vs, self.num_kv_heads, self.num_blocks, self.block_size, self.head_dim, self.kv_code,
            int(self.pairs),
        )

    def _rows(self, x: torch.Tensor, which: int) -> torch.Tensor:
        """Blocks' elements as stored, viewed `[..., BS, D]`, as their tokens' rows `[..., BS, D]`
        (which: 0 keys, 1 values)."""
        *lead, bs, d = x.shape
        if self.pairs:
            if which == 0:
                return x.reshape(*lead, d // 2, bs, 2).transpose(-2, -3).reshape(*lead, bs, d)
            return x.reshape(*lead, bs // 2, d, 2).transpose(-1, -2).reshape(*lead, bs, d)
        return x.reshape(*lead, d, bs).transpose(-1, -2) if which == 0 else x

    def _unrows(self, rows: torch.Tensor, which: int) -> torch.Tensor:
        """The inverse of `_rows`."""
        *lead, bs, d = rows.shape
        if self.pairs:
            if which == 0:
                return rows.reshape(*lead, bs, d // 2, 2).transpose(-2, -3).reshape(*lead, bs, d)
            return rows.reshape(*lead, bs // 2, 2, d).transpose(-1, -2).reshape(*lead, bs, d)
        return rows.transpose(-1, -2).reshape(*lead, bs, d) if which == 0 else rows

    def _canonical(self, kv: torch.Tensor) -> torch.Tensor:
        return torch.stack((self._rows(kv[:, :, 0], 0), self._rows(kv[:, :, 1], 1)), dim=2)

    def _stored(self, kv: torch.Tensor) -> torch.Tensor:
        return torch.stack((self._unrows(kv[:, :, 0], 0), self._unrows(kv[:, :, 1], 1)), dim=2)

    def gather(self, layer: int, index: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> k, v [KVH, B, L, D] in the compute dtype (for tests and evaluation; the kernel never gathers)."""
        gathered = super().gather(layer, index, batch)
        bs, d = self.block_size, self.head_dim
        kvh, b, length, _ = gathered[0].shape
        return tuple(self._rows(x.reshape(kvh, b, length // bs, bs, d), which).reshape(kvh, b, length, d)
                     for which, x in enumerate(gathered))


class CpuBackend:
    name = "cpu"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, library: ctypes.CDLL) -> None:
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5
        self.library = library

    def make_cache(self, num_layers: int, num_blocks: int, block_size: int, dtype: torch.dtype,
                   device: torch.device, kv_cache_dtype: str) -> CpuKVCache:
        if device.type != "cpu":
            raise ValueError(f"the cpu attention backend runs on the CPU, not {device}")
        return CpuKVCache(self.library, num_layers, num_blocks, block_size, self.num_kv_heads, self.head_dim, dtype,
                          device, kv_cache_dtype)

    def prepare(self, meta: AttentionMetadata, cache: CpuKVCache) -> CpuStep:
        num_cascade_seqs = int(meta.cascade_start[-1])
        # The shared part's running max, sum and output per cascade member and head; every layer reuses it.
        scratch = torch.empty(num_cascade_seqs * self.num_heads * (self.head_dim + 2), dtype=torch.float32)
        return CpuStep(self, cache, meta.slot_mapping, *(
            torch.from_numpy(np.ascontiguousarray(a, dtype=np.int32))
            for a in (meta.block_tables, meta.seq_lens, meta.query_start, meta.cascade_start, meta.cascade_blocks)
        ), scratch)


@dataclass(slots=True)
class CpuStep:
    backend: CpuBackend
    cache: CpuKVCache
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor  # [S, MB] int32
    seq_lens: torch.Tensor  # [S] int32
    query_start: torch.Tensor  # [S + 1] int32
    cascade_start: torch.Tensor  # [G + 1] int32
    cascade_blocks: torch.Tensor  # [G] int32
    scratch: torch.Tensor  # float32, cascade members x heads x (head_dim + 2)

    @property
    def uses_cascade(self) -> bool:
        return len(self.cascade_blocks) > 0

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q [T, H, D]; k, v [T, KVH, D] -> [T, H * D]
        b, cache = self.backend, self.cache
        cache.write(layer, k, v, self.slot_mapping)
        q = q.contiguous() if q.stride(2) != 1 or q.stride(1) != b.head_dim else q
        out = q.new_empty(q.shape[0], b.num_heads * b.head_dim)
        kp, vp, ks, vs = cache.pointers(layer)
        b.library.paged_attention(
            q.data_ptr(), q.stride(0), kp, vp, ks, vs, self.block_tables.data_ptr(), self.block_tables.shape[1],
            self.seq_lens.data_ptr(), self.query_start.data_ptr(), len(self.seq_lens), b.num_heads, b.num_kv_heads,
            b.head_dim, cache.block_size, cache.num_blocks, b.scale, self.cascade_start.data_ptr(),
            self.cascade_blocks.data_ptr(), len(self.cascade_blocks), self.scratch.data_ptr(), out.data_ptr(),
            DTYPE_CODES[q.dtype], cache.kv_code, int(cache.pairs),
        )
        return out
