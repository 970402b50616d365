"""The paged KV tensors: preallocated once, addressed by slot (block_id * block_size + offset)."""

from __future__ import annotations

import torch

from workers.kv_quant import dequantize, quantize, storage_dtype


class PagedKVCache:
    """K and V of every layer in one tensor `[layers, 2, num_blocks, block_size * kv_heads * head_dim]`.

    A block's tokens are contiguous, so gathering a sequence is one `index_select` over whole blocks
    (about ten times faster on the CPU than indexing token by token). With `kv_cache_dtype` int8 or
    fp8 the values are stored quantized, with one float32 scale per token and KV head beside them.
    """

    def __init__(
        self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
        dtype: torch.dtype, device: torch.device, kv_cache_dtype: str = "auto",
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.quantized = kv_cache_dtype in ("int8", "fp8")
        self.kind = kv_cache_dtype
        store = storage_dtype(kv_cache_dtype) if self.quantized else dtype
        # Zeroed, not empty: masked-out slots (the unused tail of a sequence's last block, padding
        # blocks) still enter the matmuls, and garbage NaN there would survive any mask (0 * NaN).
        self.kv = torch.zeros(num_layers, 2, num_blocks, block_size * num_kv_heads * head_dim, dtype=store, device=device)
        self.scales = (
            torch.zeros(num_layers, 2, num_blocks, block_size * num_kv_heads, dtype=torch.float32, device=device)
            if self.quantized else None
        )

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype, kv_cache_dtype: str) -> int:
        elems = 2 * num_layers * block_size * num_kv_heads
        if kv_cache_dtype in ("int8", "fp8"):
            return elems * head_dim * 1 + elems * 4
        return elems * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes + (self.scales.nbytes if self.scales is not None else 0)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """k, v [T, KVH, D] go to token slots [T]."""
        kvh, d = self.num_kv_heads, self.head_dim
        for i, x in ((0, k), (1, v)):
            dst = self.kv[layer, i].view(-1, kvh, d)  # [num_slots, KVH, D]
            if self.quantized:
                values, scale = quantize(x, self.kind)
                dst.index_copy_(0, slots, values)
                self.scales[layer, i].view(-1, kvh).index_copy_(0, slots, scale)
            else:
                dst.index_copy_(0, slots, x.to(self.dtype))

    def gather(self, layer: int, block_tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """block_tables [B, NB] -> k, v [B, NB * block_size, KVH, D] in the compute dtype."""
        b, nb = block_tables.shape
        flat = block_tables.reshape(-1)
        length = nb * self.block_size
        out = []
        for i in (0, 1):
            x = self.kv[layer, i].index_select(0, flat).view(b, length, self.num_kv_heads, self.head_dim)
            if self.quantized:
                scale = self.scales[layer, i].index_select(0, flat).view(b, length, self.num_kv_heads)
                x = dequantize(x, scale, self.dtype)
            out.append(x)
        return out[0], out[1]
