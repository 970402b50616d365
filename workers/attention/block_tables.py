"""The block tables of the running sequences, kept in one persistent array across steps.

A running sequence's blocks only grow (the KV cache manager appends), so each step writes just the
blocks a sequence gained since the last one into its row, instead of rebuilding every table from
the sequences' block lists. A preempted sequence restarts with new blocks: its row is rewritten.
"""

from __future__ import annotations

import numpy as np

from workers.sequence import Sequence


class BlockTables:
    def __init__(self, num_rows: int, max_blocks_per_seq: int) -> None:
        self.table = np.zeros((num_rows, max_blocks_per_seq), dtype=np.int32)  # [rows, blocks]
        self._rows: dict[str, int] = {}
        self._num_written: dict[str, int] = {}
        self._preemptions: dict[str, int] = {}
        self._free = list(range(num_rows - 1, -1, -1))

    def sync(self, seq: Sequence) -> int:
        """The row holding `seq`'s block table, brought up to date with its block list."""
        rid = seq.request_id
        row = self._rows.get(rid)
        if row is None:
            row = self._rows[rid] = self._take_row()
            self._num_written[rid] = 0
            self._preemptions[rid] = seq.num_preemptions
        elif self._preemptions[rid] != seq.num_preemptions:
            self._num_written[rid] = 0
            self._preemptions[rid] = seq.num_preemptions
        done, blocks = self._num_written[rid], seq.blocks
        if len(blocks) > done:
            self.table[row, done:len(blocks)] = [b.block_id for b in blocks[done:]]
            self._num_written[rid] = len(blocks)
        return row

    def release(self, request_id: str) -> None:
        """Gives the row back (the sequence finished, was aborted or preempted)."""
        row = self._rows.pop(request_id, None)
        if row is not None:
            del self._num_written[request_id], self._preemptions[request_id]
            self._free.append(row)

    def _take_row(self) -> int:
        if not self._free:  # more sequences alive than foreseen: double the rows
            n = self.table.shape[0]
            self.table = np.concatenate([self.table, np.zeros_like(self.table)])
            self._free = list(range(2 * n - 1, n - 1, -1))
        return self._free.pop()
