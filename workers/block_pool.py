"""The pool of KV blocks: ids, ref counts, the prefix-cache map and the free blocks."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from workers.eviction import BlockUsage, make_policy
from workers.hashing import BlockHash


@dataclass(slots=True)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None  # set once the block is full and cached
    usage: BlockUsage = field(default_factory=BlockUsage)


class BlockPool:
    """Hands out blocks and keeps freed ones findable by hash until they are reused.

    Free blocks live in one of two places: `_free_empty` (no cached contents, reused first, lowest
    id first) or the eviction policy (cached contents, reused only when no empty block is left).
    """

    def __init__(self, num_blocks: int, eviction_policy: str = "lru", enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self._free_empty: deque[int] = deque(range(num_blocks))
        self._evictable = make_policy(eviction_policy)
        self._cached: dict[BlockHash, int] = {}
        self._clock = 0
        self.num_evictions = 0

    # -- queries ---------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free_empty) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def get_cached_block(self, block_hash: BlockHash) -> KVBlock | None:
        block_id = self._cached.get(block_hash)
        return None if block_id is None else self.blocks[block_id]

    # -- allocation ------------------------------------------------------------------------------
    def allocate(self, num_blocks: int) -> list[KVBlock] | None:
        """`num_blocks` fresh blocks with ref count 1, or None when the pool has too few free
        (the scheduler then preempts; nothing changes here)."""
        if num_blocks > self.num_free_blocks:
            return None
        out = []
        for _ in range(num_blocks):
            if self._free_empty:
                block = self.blocks[self._free_empty.popleft()]
            else:
                block = self.blocks[self._evictable.pop()]
                self._uncache(block)
                self.num_evictions += 1
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Takes a reference on blocks found in the prefix cache."""
        for block in blocks:
            if block.ref_cnt == 0:
                self._evictable.remove(block.block_id)
            block.ref_cnt += 1
            block.usage.uses += 1

    def free(self, blocks: Iterable[KVBlock]) -> None:
        """Drops one reference from each block, in the order given: the caller passes a sequence's
        blocks tail first, so that under equal priority the tail is evicted before its head."""
        for block in blocks:
            assert block.ref_cnt > 0, f"block {block.block_id} freed more often than taken"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._clock += 1
                block.usage.last_used = self._clock
                if block.block_hash is None:
                    self._free_empty.append(block.block_id)
                else:
                    self._evictable.add(block.block_id, block.usage)

    # -- prefix cache ----------------------------------------------------------------------------
    def cache_block(self, block: KVBlock, block_hash: BlockHash, depth: int) -> None:
        """Makes a full block findable by its hash. When another block already holds the same
        contents (two sequences computed the same prefix at once) the first one stays the cached
        copy and this one remains private, to be freed as an empty block."""
        if not self.enable_caching or block.block_hash is not None or block_hash in self._cached:
            return
        # The clock moves on frees only: blocks cached in one step share a timestamp, so FIFO's
        # tie-break (deeper first) evicts a chain's tail before its head, like the other policies.
        block.block_hash = block_hash
        block.usage = BlockUsage(depth=depth, uses=1, cached_at=self._clock, last_used=self._clock)
        self._cached[block_hash] = block.block_id

    def _uncache(self, block: KVBlock) -> None:
        assert block.block_hash is not None
        del self._cached[block.block_hash]
        block.block_hash = None

    def reset_prefix_cache(self) -> int:
        """Forgets every cached block that no sequence holds; returns how many were dropped."""
        dropped = 0
        while len(self._evictable):
            block = self.blocks[self._evictable.pop()]
            self._uncache(block)
            self._free_empty.append(block.block_id)
            dropped += 1
        return dropped
