"""The block tables of the running sequences, kept in one persistent array across steps.

A running sequence's blocks only grow (the KV cache manager appends), so each step writes just the
blocks a sequence gained since the last one into its row, instead of rebuilding every table from
the sequences' block lists. A preempted sequence restarts with new blocks: its row is rewritten.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from workers.sequence import Sequence


@dataclass(slots=True)
class _Row:
    index: int  # the row of `BlockTables.table`
    num_written: int  # leading blocks of the sequence already in it
    num_preemptions: int  # the sequence's count when they were written


class BlockTables:
    def __init__(self, num_rows: int, max_blocks_per_seq: int) -> None:
        self.table = np.zeros((num_rows, max_blocks_per_seq), dtype=np.int32)  # [rows, blocks]
        self._rows: dict[str, _Row] = {}
        self._free = list(range(num_rows - 1, -1, -1))

    def sync(self, seq: Sequence) -> int:
        """The row holding `seq`'s block table, brought up to date with its block list."""
        row = self._rows.get(seq.request_id)
        if row is None:
            row = self._rows[seq.request_id] = _Row(self._take_row(), 0, seq.num_preemptions)
        elif row.num_preemptions != seq.num_preemptions:
            row.num_written, row.num_preemptions = 0, seq.num_preemptions
        blocks = seq.blocks
        if len(blocks) > row.num_written:
            self.table[row.index, row.num_written:len(blocks)] = [b.block_id for b in blocks[row.num_written:]]
            row.num_written = len(blocks)
        return row.index

    def release(self, request_id: str) -> None:
        """Gives the row back (the sequence finished, was aborted or preempted)."""
        row = self._rows.pop(request_id, None)
        if row is not None:
            self._free.append(row.index)

    def _take_row(self) -> int:
        if not self._free:  # more sequences alive than foreseen: double the rows
            n = self.table.shape[0]
            self.table = np.concatenate([self.table, np.zeros_like(self.table)])
            self._free = list(range(2 * n - 1, n - 1, -1))
        return self._free.pop()
