"""One step's attention metadata, shared by every backend.

The step's sequences are ordered decodes first (cascade groups leading), then prefill chunks; the
flattened tokens follow the same order. Host arrays stay NumPy: each backend turns what it needs
into tensors on its device once per step, and every layer reuses them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64 on the device: cache slot (block * block_size + offset) of each new token
    query_start: np.ndarray  # [S + 1] int32: sequence s owns tokens [query_start[s], query_start[s + 1])
    seq_lens: np.ndarray  # [S] int32: keys of sequence s once this step's tokens are written
    block_tables: np.ndarray  # [S, MB] int32: blocks of each sequence (MB: the longest one's count)
    num_decodes: int  # the first num_decodes sequences have exactly one query token
    # Cascade: decodes [cascade_start[g], cascade_start[g + 1]) share their first cascade_blocks[g]
    # blocks, all wholly before their queries; empty when no two decodes share a block.
    cascade_start: np.ndarray  # [G + 1] int32
    cascade_blocks: np.ndarray  # [G] int32
    block_size: int

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def query_lens(self) -> np.ndarray:
        return np.diff(self.query_start)


def cascade_groups(tables: np.ndarray, seq_lens: np.ndarray,
                   block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Orders decodes so that those sharing leading blocks sit together.

    tables [N, MB] (each decode's block table), seq_lens [N] -> (order [N], the
    groups' starts [G + 1] and shared block counts [G], over the reordered decodes). Decodes are
    grouped by their first block; a group keeps the blocks all its members have in common and that
    lie wholly before every member's query (position seq_len - 1)."""
    first_blocks = tables[:, 0]
    order = np.argsort(first_blocks, kind="stable")
    starts, counts, grouped, rest = [0], [], [], []
    boundaries = np.flatnonzero(np.diff(first_blocks[order])) + 1
    for members in np.split(order, boundaries):
        # A decode whose query sits in its first block has no block wholly before it to share.
        too_short = (seq_lens[members] - 1) // block_size < 1
        rest.extend(members[too_short].tolist())
        members = members[~too_short]
        if len(members) < 2:
            rest.extend(members.tolist())
            continue
        rows = tables[members]
        same = (rows == rows[0]).all(axis=0)
        common = len(same) if same.all() else int(np.argmin(same))
        shared = min(common, int((seq_lens[members] - 1).min()) // block_size)
        if shared < 1:
            rest.extend(members.tolist())
            continue
        grouped.extend(members.tolist())
        starts.append(starts[-1] + len(members))
        counts.append(shared)
    return (np.asarray(grouped + rest, dtype=np.int64), np.asarray(starts, dtype=np.int32),
            np.asarray(counts, dtype=np.int32))
