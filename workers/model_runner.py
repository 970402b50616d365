"""Turns a scheduler step into tensors, runs the model, and samples."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from workers.attention.block_tables import BlockTables
from workers.attention.metadata import AttentionMetadata, cascade_groups
from workers.decode_graphs import StaticDecode
from workers.layers.sampler import Sampler
from workers.models.llama import LlamaForCausalLM
from workers.scheduler import ScheduledSeq, SchedulerOutput


@dataclass(slots=True)
class StepInputs:
    """One step's inputs on the host, in the order `prepare` gives the sequences."""

    input_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    slots: np.ndarray  # [T] int64: cache slot (block * block_size + offset) of each token
    query_start: np.ndarray  # [S + 1] int32
    seq_lens: np.ndarray  # [S] int32
    block_tables: np.ndarray  # [S, MB] int32
    num_decodes: int
    cascade_start: np.ndarray  # [G + 1] int32
    cascade_blocks: np.ndarray  # [G] int32
    logits_rows: np.ndarray  # [N] rows of the flattened tokens whose logits give a new token
    sampling: list[ScheduledSeq]  # the N sequences those rows belong to, in that order


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, backend, cache, device: torch.device, seed: int,
                 max_num_seqs: int, max_blocks_per_seq: int, static_decode: StaticDecode | None = None) -> None:
        self.model = model
        self.backend = backend
        self.cache = cache
        self.block_size = cache.block_size
        self.device = device
        self.sampler = Sampler(torch.Generator(device=device).manual_seed(seed))
        self.block_tables = BlockTables(max_num_seqs, max_blocks_per_seq)
        self.num_cascade_steps = 0  # steps whose decodes attended shared blocks once per group
        self.static_decode = static_decode  # decode steps on static inputs (CUDA graphs), where set

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> dict[str, int]:
        """Runs one step; returns the token sampled for each sequence that needed one."""
        for seq in out.preempted:
            self.block_tables.release(seq.request_id)
        if not out.scheduled:
            return {}
        inputs = self.prepare(out.scheduled)
        static = self.static_decode
        if static is not None and static.fits(len(inputs.seq_lens), inputs.num_decodes):
            hidden = static.run(inputs.input_ids, inputs.positions, inputs.slots, inputs.seq_lens,
                                inputs.block_tables)
        else:
            hidden = self._forward(inputs)  # [T, hidden]
        if not inputs.sampling:
            return {}
        logits = self.model.compute_logits(hidden[self._tensor(inputs.logits_rows)])  # [N, V]
        seqs = [item.seq for item in inputs.sampling]
        for row, seq in enumerate(seqs):
            if seq.keep_logits:
                seq.last_logits = logits[row].float().cpu()
        tokens = self.sampler.sample(logits, seqs, self.model.dense_ops.first_max)
        return {seq.request_id: tok for seq, tok in zip(seqs, tokens)}

    def _forward(self, inputs: StepInputs) -> torch.Tensor:
        meta = AttentionMetadata(
            slot_mapping=self._tensor(inputs.slots), query_start=inputs.query_start, seq_lens=inputs.seq_lens,
            block_tables=inputs.block_tables, num_decodes=inputs.num_decodes, cascade_start=inputs.cascade_start,
            cascade_blocks=inputs.cascade_blocks, block_size=self.block_size,
        )
        step = self.backend.prepare(meta, self.cache)
        self.num_cascade_steps += step.uses_cascade
        return self.model(self._tensor(inputs.input_ids), self._tensor(inputs.positions), step)

    def release(self, request_id: str) -> None:
        """Forgets a finished or aborted sequence's block-table row."""
        self.block_tables.release(request_id)

    def prepare(self, scheduled: list[ScheduledSeq]) -> StepInputs:
        """Orders the step's sequences (decodes first, those sharing leading blocks together, then
        prefill chunks) and builds the flattened tokens and the attention metadata."""
        bs = self.block_size
        rows = np.fromiter((self.block_tables.sync(item.seq) for item in scheduled), dtype=np.int64,
                           count=len(scheduled))
        starts = np.fromiter((item.start for item in scheduled), dtype=np.int64, count=len(scheduled))
        lens = np.fromiter((item.num_new_tokens for item in scheduled), dtype=np.int64, count=len(scheduled))
        seq_lens = starts + lens
        table = self.block_tables.table
        decodes = np.flatnonzero(lens == 1)
        prefills = np.flatnonzero(lens != 1)
        if len(decodes) > 1:
            width = int(-(-seq_lens[decodes].max() // bs))
            order, cascade_start, cascade_blocks = cascade_groups(table[rows[decodes], :width], seq_lens[decodes], bs)
            decodes = decodes[order]
        else:
            cascade_start, cascade_blocks = np.zeros(1, dtype=np.int32), np.zeros(0, dtype=np.int32)
        order = np.concatenate([decodes, prefills])
        items = [scheduled[i] for i in order]
        starts, lens, seq_lens, rows = starts[order], lens[order], seq_lens[order], rows[order]
        query_start = np.zeros(len(order) + 1, dtype=np.int64)
        np.cumsum(lens, out=query_start[1:])
        num_tokens = int(query_start[-1])

        ids: list[int] = []
        for item in items:
            ids.extend(item.seq.token_range(item.start, item.start + item.num_new_tokens))
        seq_of_token = np.repeat(np.arange(len(order)), lens)
        positions = np.arange(num_tokens) - np.repeat(query_start[:-1] - starts, lens)
        width = int(-(-seq_lens.max() // bs))
        block_tables = table[rows, :width]
        slots = block_tables[seq_of_token, positions // bs].astype(np.int64) * bs + positions % bs
        sampling_idx = np.fromiter((i for i, item in enumerate(items) if item.samples), dtype=np.int64)
        return StepInputs(
            input_ids=np.asarray(ids, dtype=np.int64), positions=positions, slots=slots,
            query_start=query_start.astype(np.int32), seq_lens=seq_lens.astype(np.int32), block_tables=block_tables,
            num_decodes=len(decodes), cascade_start=cascade_start, cascade_blocks=cascade_blocks,
            logits_rows=query_start[1:][sampling_idx] - 1, sampling=[items[i] for i in sampling_idx],
        )

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device, non_blocking=True)
