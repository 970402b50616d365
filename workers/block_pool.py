"""The pool of KV blocks: ids, ref counts, the prefix-cache map, pins and the free blocks."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from workers.eviction import BlockUsage, make_policy
from workers.hashing import BlockHash


@dataclass(slots=True)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None  # set once the block is full and cached
    parent_hash: BlockHash | None = None  # the chain's previous block (or its root), kept for snapshots
    pinned: bool = False  # a pinned block is never evicted and never counted free
    usage: BlockUsage = field(default_factory=BlockUsage)


@dataclass(frozen=True, slots=True)
class CachedBlockEntry:
    """A cached block as a snapshot records it: enough to make it findable again elsewhere."""

    block_hash: BlockHash
    parent_hash: BlockHash
    depth: int
    uses: int
    pinned: bool = False  # pinned where it was captured: a load pins it again


class BlockPool:
    """Hands out blocks and keeps freed ones findable by hash until they are reused.

    Free blocks live in one of two places: `_free_empty` (no cached contents, reused first, lowest
    id first) or the eviction policy (cached contents, reused only when no empty block is left).
    A pinned block that no sequence holds is in neither: it is not free, and nothing evicts it.
    """

    def __init__(self, num_blocks: int, eviction_policy: str = "lru", enable_caching: bool = True,
                 max_pinned_fraction: float = 0.5) -> None:
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least one block, got {num_blocks}")
        if not 0.0 <= max_pinned_fraction < 1.0:
            raise ValueError(f"max_pinned_fraction={max_pinned_fraction} must be in [0, 1)")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.max_pinned_blocks = int(num_blocks * max_pinned_fraction)
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self._free_empty: deque[int] = deque(range(num_blocks))
        self._evictable = make_policy(eviction_policy)
        self._cached: dict[BlockHash, int] = {}
        self._pinned: set[int] = set()
        self._clock = 0
        self.num_evictions = 0

    # -- queries ---------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free_empty) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def num_pinned_blocks(self) -> int:
        return len(self._pinned)

    @property
    def num_empty_blocks(self) -> int:
        """Free blocks that hold no cached contents (taking one evicts nothing)."""
        return len(self._free_empty)

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
            if block.ref_cnt == 0 and not block.pinned:
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
                self._release(block)

    def _release(self, block: KVBlock) -> None:
        """Puts a block nobody holds where it belongs: nowhere when pinned, else free."""
        if block.pinned:
            return
        if block.block_hash is None:
            self._free_empty.append(block.block_id)
        else:
            self._evictable.add(block.block_id, block.usage)

    # -- prefix cache ----------------------------------------------------------------------------
    def cache_block(self, block: KVBlock, block_hash: BlockHash, depth: int, parent: BlockHash | None = None) -> None:
        """Makes a full block findable by its hash (`parent`: the hash it was chained from). When
        another block already holds the same contents (two sequences computed the same prefix at
        once) the first one stays the cached copy and this one remains private, to be freed as an
        empty block."""
        if not self.enable_caching or block.block_hash is not None or block_hash in self._cached:
            return
        # The clock moves on frees only: blocks cached in one step share a timestamp, so FIFO's
        # tie-break (deeper first) evicts a chain's tail before its head, like the other policies.
        block.block_hash = block_hash
        block.parent_hash = parent
        block.usage = BlockUsage(depth=depth, uses=1, cached_at=self._clock, last_used=self._clock)
        self._cached[block_hash] = block.block_id

    def _uncache(self, block: KVBlock) -> None:
        assert block.block_hash is not None and not block.pinned
        del self._cached[block.block_hash]
        block.block_hash = None
        block.parent_hash = None

    def reset_prefix_cache(self) -> int:
        """Forgets every cached block that no sequence holds and no pin keeps; returns how many."""
        dropped = 0
        while len(self._evictable):
            block = self.blocks[self._evictable.pop()]
            self._uncache(block)
            self._free_empty.append(block.block_id)
            dropped += 1
        return dropped

    # -- pins ------------------------------------------------------------------------------------
    def pin(self, hashes: Iterable[BlockHash]) -> list[int]:
        """Pins the cached blocks of `hashes` (those not cached are skipped; the caller reports
        them) and returns the ids newly pinned. Raises ValueError, pinning nothing, when the pins
        would exceed `max_pinned_blocks`: a pool that is mostly pinned leaves too little for work."""
        found = [self._cached[h] for h in dict.fromkeys(hashes) if h in self._cached]
        new = [i for i in found if i not in self._pinned]
        if len(self._pinned) + len(new) > self.max_pinned_blocks:
            raise ValueError(
                f"pinning {len(new)} more blocks would pin {len(self._pinned) + len(new)} of {self.num_blocks}, "
                f"over the limit of {self.max_pinned_blocks} (max_pinned_fraction); pin fewer prompts, unpin "
                "some, or raise the limit")
        for block_id in new:
            block = self.blocks[block_id]
            if block.ref_cnt == 0:
                self._evictable.remove(block_id)
            block.pinned = True
            self._pinned.add(block_id)
        return new

    def unpin(self, hashes: Iterable[BlockHash] | None = None) -> list[int]:
        """Unpins the blocks of `hashes` (every pinned block when None); returns their ids. One
        that nobody holds becomes free again, as if just freed (tail first within a chain)."""
        if hashes is None:
            ids = sorted(self._pinned, key=lambda i: -self.blocks[i].usage.depth)
        else:
            ids = [self._cached[h] for h in dict.fromkeys(hashes) if self._cached.get(h) in self._pinned]
            ids.sort(key=lambda i: -self.blocks[i].usage.depth)
        for block_id in ids:
            block = self.blocks[block_id]
            block.pinned = False
            self._pinned.discard(block_id)
            if block.ref_cnt == 0:
                self._clock += 1
                block.usage.last_used = self._clock
                self._release(block)
        return ids

    @property
    def pinned_block_ids(self) -> list[int]:
        return sorted(self._pinned)

    # -- snapshots -------------------------------------------------------------------------------
    def ranked_cached_blocks(self) -> list[KVBlock]:
        """Every cached block, hottest first: pinned ones, then those sequences hold (most recently
        freed first), then the free ones in the eviction policy's own order, the next victim last."""
        held = [self.blocks[i] for i in self._cached.values() if self.blocks[i].ref_cnt > 0 or self.blocks[i].pinned]
        held.sort(key=lambda b: (not b.pinned, -b.usage.last_used, b.usage.depth, b.block_id))
        return held + [self.blocks[i] for i in self._evictable.ranked()]

    def import_cached(self, entries: Sequence[CachedBlockEntry]) -> list[tuple[int, KVBlock]]:
        """Takes empty free blocks for `entries` (given hottest first, each parent before its
        children) and makes them cached and free, as if computed here: (entry index, block) for
        each. Never evicts: it stops when no empty block is left. An entry already cached, or whose
        parent is neither a root (depth 0) nor cached, is skipped."""
        if not self.enable_caching:
            return []
        taken: list[tuple[int, KVBlock]] = []
        for index, entry in enumerate(entries):
            if not self._free_empty:
                break
            if entry.block_hash in self._cached or (entry.depth > 0 and entry.parent_hash not in self._cached):
                continue
            block = self.blocks[self._free_empty.popleft()]
            block.block_hash, block.parent_hash = entry.block_hash, entry.parent_hash
            self._cached[entry.block_hash] = block.block_id
            taken.append((index, block))
        # Coldest first into the policy, so the hottest are the last to go, and a chain's tail
        # before its head.
        for index, block in reversed(taken):
            entry = entries[index]
            self._clock += 1
            block.usage = BlockUsage(depth=entry.depth, uses=max(1, entry.uses), cached_at=self._clock,
                                     last_used=self._clock)
            self._evictable.add(block.block_id, block.usage)
        return taken
