"""The paged KV tensors: preallocated once, addressed by slot (block_id * block_size + offset)."""

from __future__ import annotations

import torch

from workers.kv_quant import dequantize, from_storage, quantize, storage_dtype, to_storage


class PagedKVCache:
    """K and V of every layer in one tensor `[layers, 2, kv_heads, num_blocks, block_size * head_dim]`.

    Head-major so that gathering a group of sequences yields `[KVH, B, L, D]` directly: the batched
    matmuls of attention then read it with no copy (a token-major layout cost two full copies of
    the gathered keys and values per layer). A block's tokens are contiguous per head, so a gather
    is one `index_select` over whole blocks (about ten times faster on the CPU than token by token).
    With `kv_cache_dtype` int8 or fp8 the values are stored quantized, with one float32 scale per
    token and KV head beside them.
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
        self.device = device
        self.quantized = kv_cache_dtype in ("int8", "fp8")
        self.kind = kv_cache_dtype
        store = storage_dtype(kv_cache_dtype) if self.quantized else dtype
        # Zeroed, not empty: masked-out slots (the unused tail of a sequence's last block, padding
        # blocks) still enter the matmuls, and garbage NaN there would survive any mask (0 * NaN).
        shape = (num_layers, 2, num_kv_heads, num_blocks, block_size * head_dim)
        self.kv = torch.zeros(shape, dtype=store, device=device)
        self.scales = (
            torch.zeros(num_layers, 2, num_kv_heads, num_blocks, block_size, dtype=torch.float32, device=device)
            if self.quantized else None
        )
        self._head_offsets = (torch.arange(num_kv_heads, device=device) * num_blocks).view(-1, 1)

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

    def clear(self, keep: list[int] | None = None) -> None:
        """Zero every slot (and scale), as at allocation, except the blocks `keep` (pinned ones)."""
        saved = self.export_blocks(keep) if keep else None
        self.kv.zero_()
        if self.scales is not None:
            self.scales.zero_()
        if saved is not None:
            self.import_blocks(keep, *saved)

    def export_blocks(self, block_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Copies of blocks `block_ids` in the backend-neutral layout of a snapshot: (values
        [N, layers, 2, KVH, BS, D] in the storage dtype, scales [N, layers, 2, KVH, BS] float32 or
        None), on the CPU. A block's tokens are rows `[BS, D]` whatever this backend stores."""
        index = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        layers, _, kvh, _, _ = self.kv.shape
        n, bs, d = len(block_ids), self.block_size, self.head_dim
        kv = self.kv.index_select(3, index).permute(3, 0, 1, 2, 4).reshape(n, layers, 2, kvh, bs, d)
        kv = self._canonical(kv).cpu().contiguous()
        scales = None
        if self.scales is not None:
            scales = self.scales.index_select(3, index).permute(3, 0, 1, 2, 4).cpu().contiguous()
        return kv, scales

    def import_blocks(self, block_ids: list[int], kv: torch.Tensor, scales: torch.Tensor | None) -> None:
        """Writes blocks exported by `export_blocks` (of any backend) into blocks `block_ids`."""
        index = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        layers, _, kvh, _, width = self.kv.shape
        n = len(block_ids)
        stored = self._stored(kv.to(self.device)).reshape(n, layers, 2, kvh, width).permute(1, 2, 3, 0, 4)
        self.kv.index_copy_(3, index, stored)
        if self.scales is not None:
            assert scales is not None, "a quantized cache needs the blocks' scales"
            self.scales.index_copy_(3, index, scales.to(self.device).permute(1, 2, 3, 0, 4))

    def _canonical(self, kv: torch.Tensor) -> torch.Tensor:
        """This backend's blocks [N, layers, 2, KVH, BS, D] as rows [BS, D] (here they already are)."""
        return kv

    def _stored(self, kv: torch.Tensor) -> torch.Tensor:
        """The inverse of `_canonical`."""
        return kv

    @property
    def block_nbytes(self) -> int:
        """Bytes one block holds across all layers, K and V, scales included."""
        return self.nbytes // self.num_blocks

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """k, v [T, KVH, D] go to token slots [T]."""
        kvh, d = self.num_kv_heads, self.head_dim
        for i, x in ((0, k), (1, v)):
            dst = self.kv[layer, i].view(kvh, -1, d)  # [KVH, num_slots, D]
            if self.quantized:
                values, scale = quantize(x, self.kind)
                dst.index_copy_(1, slots, to_storage(values, self.kind).transpose(0, 1))
                self.scales[layer, i].view(kvh, -1).index_copy_(1, slots, scale.transpose(0, 1))
            else:
                dst.index_copy_(1, slots, x.transpose(0, 1).to(self.dtype))

    def gather_index(self, block_tables: torch.Tensor) -> torch.Tensor:
        """block_tables [B, NB] -> the rows of every head's blocks, for `gather` (computed once a
        step and reused by every layer)."""
        return (self._head_offsets + block_tables.reshape(1, -1)).reshape(-1)

    def gather(self, layer: int, index: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> k, v [KVH, B, L, D] in the compute dtype, for the blocks of `gather_index`."""
        kvh, d = self.num_kv_heads, self.head_dim
        out = []
        for i in (0, 1):
            x = self.kv[layer, i].view(kvh * self.num_blocks, -1).index_select(0, index).view(kvh, batch, -1, d)
            if self.quantized:
                scale = self.scales[layer, i].view(kvh * self.num_blocks, -1).index_select(0, index)
                x = dequantize(from_storage(x, self.kind), scale.view(kvh, batch, -1), self.dtype)
            out.append(x)
        return out[0], out[1]
