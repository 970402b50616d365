"""Decode steps replayed as CUDA graphs (the triton backend on a CUDA GPU).

A decode step of a small model is dozens of short kernels per layer; launched one by one from
Python, the GPU waits on the launches (a 0.5B model's 24 layers are about 300 launches a step). A
CUDA graph records the launches of one whole forward pass once and replays them with one call.

A graph replays fixed shapes and fixed addresses, so decode steps run on static inputs:
- One graph per batch size of `capture_sizes` (1, 2, 4, then multiples of 8, as vLLM's), all
  recorded into one memory pool, largest first. A step of S decodes runs the smallest graph of
  b >= S rows; the b - S padding rows are decodes of one token that write their key and value to
  the scratch block (one block past the pool, which the block manager never hands out) and attend
  to it alone, so they touch no sequence's blocks.
- Inputs live in persistent device buffers that each step overwrites: the tokens' ids, positions
  and cache slots, and the attention metadata (sequence lengths and block-table rows, as wide as
  the longest sequence the engine admits). Query starts and tiles of a decode-only step do not
  change, and are written once.
- Steps with a prefill chunk, or more decodes than the largest graph, run eagerly.

`StaticDecode` holds the buffers and runs the forward pass on them. On a GPU it records that pass
as the graphs; `record=False` runs the same pass unrecorded, which the engine does where the
triton backend runs on the CPU (under Triton's interpreter, in the tests): that is how the static
inputs and the padding are checked without a GPU.

Not measured yet: no GPU has run this module. `python -m workers.bench.gpu_check` checks greedy
equality with and without graphs and times both; `EngineConfig(cuda_graphs=False)` turns them off.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from workers.attention.triton_backend import TritonBackend, TritonStep
from workers.kv_cache import PagedKVCache
from workers.models.llama import LlamaForCausalLM

MAX_CAPTURE_SIZE = 512


def capture_sizes(max_num_seqs: int) -> list[int]:
    """The batch sizes recorded: 1, 2, 4, then multiples of 8, up to the first that holds
    max_num_seqs (at most MAX_CAPTURE_SIZE; a larger decode step runs eagerly)."""
    top = min(max_num_seqs, MAX_CAPTURE_SIZE)
    candidates = [1, 2, 4, *range(8, MAX_CAPTURE_SIZE + 1, 8)]
    return [b for b in candidates if b < top] + [next(b for b in candidates if b >= top)]


def make_static_decode(model: LlamaForCausalLM, backend: TritonBackend, cache: PagedKVCache, scratch_block: int,
                       max_num_seqs: int, max_blocks_per_seq: int, record: bool) -> StaticDecode | None:
    """A `StaticDecode`; where recording the graphs fails, a warning and None (decode steps then
    launch their kernels one by one, as with cuda_graphs=False): a worker still serves."""
    try:
        with torch.inference_mode():
            return StaticDecode(model, backend, cache, scratch_block, max_num_seqs, max_blocks_per_seq, record)
    except Exception as exc:  # noqa: BLE001 - any failure to record leaves the eager path, which works
        if not record:
            raise
        warnings.warn(f"CUDA graphs could not be recorded ({type(exc).__name__}: {exc}); decode steps launch their "
                      "kernels one by one. Set cuda_graphs=False to skip recording.", RuntimeWarning, stacklevel=2)
        return None


class StaticDecode:
    """Decode steps of up to `sizes[-1]` sequences on persistent inputs, recorded as CUDA graphs
    when `record` (needs a CUDA device), else run eagerly on the same inputs."""

    def __init__(self, model: LlamaForCausalLM, backend: TritonBackend, cache: PagedKVCache, scratch_block: int,
                 max_num_seqs: int, max_blocks_per_seq: int, record: bool) -> None:
        if scratch_block >= cache.num_blocks:
            raise ValueError(f"scratch block {scratch_block} is outside the cache's {cache.num_blocks} blocks")
        self.model, self.backend, self.cache = model, backend, cache
        self.sizes = capture_sizes(max_num_seqs)
        self.record = record
        self.scratch_block = scratch_block
        self.scratch_slot = scratch_block * cache.block_size
        big, width = self.sizes[-1], max_blocks_per_seq
        self.width = width
        device = cache.device
        # Host mirrors of the device buffers: each step fills them and copies them over in two calls.
        # tokens rows: ids, positions, slots. meta: seq lens [B], then block-table rows [B, width].
        self.host_tokens = np.zeros((3, big), dtype=np.int64)
        self.host_meta = np.zeros(big + big * width, dtype=np.int32)
        self.tokens = torch.zeros((3, big), dtype=torch.int64, device=device)
        self.meta = torch.zeros(big + big * width, dtype=torch.int32, device=device)
        arange = torch.arange(big + 1, dtype=torch.int32, device=device)
        self.query_start = arange  # decode i owns token i
        self.tile_seq = arange[:big]  # one query tile per decode
        self.tile_q0 = torch.zeros(big, dtype=torch.int32, device=device)
        self.steps = {b: self._step(b) for b in self.sizes}
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.num_steps = 0  # decode steps run on the static inputs
        if record:
            self._record()

    @property
    def max_size(self) -> int:
        return self.sizes[-1]

    def fits(self, num_seqs: int, num_decodes: int) -> bool:
        return num_seqs == num_decodes and 0 < num_seqs <= self.max_size

    def run(self, input_ids: np.ndarray, positions: np.ndarray, slots: np.ndarray, seq_lens: np.ndarray,
            block_tables: np.ndarray) -> torch.Tensor:
        """One decode step of S sequences -> hidden states [S, hidden] (a view that the next step
        overwrites: use it before running another)."""
        n = len(seq_lens)
        b = next(size for size in self.sizes if size >= n)
        self._fill(n, b, input_ids, positions, slots, seq_lens, block_tables)
        self.num_steps += 1
        if self.record:
            graph, hidden = self.graphs[b]
            graph.replay()
        else:
            hidden = self._forward(b)
        return hidden[:n]

    def _fill(self, n: int, b: int, input_ids: np.ndarray, positions: np.ndarray, slots: np.ndarray,
              seq_lens: np.ndarray, block_tables: np.ndarray) -> None:
        tokens, meta, big, width = self.host_tokens, self.host_meta, self.max_size, self.width
        tokens[0, :n], tokens[1, :n], tokens[2, :n] = input_ids, positions, slots
        tokens[:2, n:b] = 0
        tokens[2, n:b] = self.scratch_slot
        meta[:n], meta[n:b] = seq_lens, 1
        rows = meta[big:].reshape(big, width)
        rows[:n, :block_tables.shape[1]] = block_tables  # columns past a row's length are never read
        rows[n:b, 0] = self.scratch_block
        self.tokens.copy_(torch.from_numpy(tokens), non_blocking=True)
        used = big + b * width
        self.meta[:used].copy_(torch.from_numpy(meta[:used]), non_blocking=True)

    def _step(self, b: int) -> TritonStep:
        big = self.max_size
        return TritonStep(
            self.backend, self.cache, self.tokens[2, :b], self.meta[big:], self.width, self.meta[:b],
            self.query_start[:b + 1], self.tile_seq[:b], self.tile_q0[:b], self.backend.block_q(1),
        )

    def _forward(self, b: int) -> torch.Tensor:
        return self.model(self.tokens[0, :b], self.tokens[1, :b], self.steps[b])

    def _record(self) -> None:
        """Records one graph per size into one memory pool, largest first (the smaller ones reuse
        its memory). Each size runs once before it is recorded: Triton compiles its kernel and
        cuBLAS sets up its workspace on that run, neither of which a graph may do."""
        pool = None
        empty = np.zeros(0, dtype=np.int64)
        with torch.cuda.device(self.cache.device):  # the engine's GPU, whichever is current
            for b in reversed(self.sizes):
                self._fill(0, b, empty, empty, empty, empty.astype(np.int32), np.zeros((0, 1), dtype=np.int32))
                self._forward(b)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    hidden = self._forward(b)
                pool = graph.pool()
                self.graphs[b] = (graph, hidden)
            torch.cuda.synchronize()
