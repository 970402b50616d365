"""Stable chained hashes of full KV blocks.

sha256 rather than Python's `hash()`: `hash()` is salted per process, and a block's hash must mean
the same thing in every worker and after a restart (KV snapshots are keyed by it).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

BlockHash = bytes


def root_hash(model_fingerprint: str, cache_salt: str | None) -> BlockHash:
    """The parent of a chain's first block. Folding the extra keys (the model and a tenant's salt)
    into the root keeps them out of every per-block hash while still separating the chains."""
    salt = cache_salt or ""
    return hashlib.sha256(f"kv-root\x00{model_fingerprint}\x00{salt}".encode()).digest()


def hash_block_tokens(parent: BlockHash, token_ids: Sequence[int]) -> BlockHash:
    # Fixed little-endian uint32 so the hash does not depend on the machine's byte order.
    return hashlib.sha256(parent + struct.pack(f"<{len(token_ids)}I", *token_ids)).digest()


def hash_full_blocks(
    root: BlockHash, token_ids: Sequence[int], block_size: int, known: list[BlockHash]
) -> list[BlockHash]:
    """Extends `known` (the hashes already computed for this sequence) to every full block of
    `token_ids`, and returns it."""
    parent = known[-1] if known else root
    for start in range(len(known) * block_size, len(token_ids) - block_size + 1, block_size):
        parent = hash_block_tokens(parent, token_ids[start : start + block_size])
        known.append(parent)
    return known
