"""BlockPool: block ids, ref counts, free order and the lazily evicted prefix cache."""

from __future__ import annotations

import pytest

from workers.block_pool import BlockPool, KVBlock


def ids(blocks: list[KVBlock] | None) -> list[int] | None:
    return None if blocks is None else [b.block_id for b in blocks]


def test_needs_at_least_one_block() -> None:
    with pytest.raises(ValueError, match="at least one block"):
        BlockPool(0)


def test_allocate_returns_lowest_ids_first() -> None:
    pool = BlockPool(5)
    assert ids(pool.allocate(2)) == [0, 1]
    assert ids(pool.allocate(3)) == [2, 3, 4]
    assert pool.num_free_blocks == 0
    assert [b.ref_cnt for b in pool.blocks] == [1, 1, 1, 1, 1]


def test_allocate_zero_blocks() -> None:
    pool = BlockPool(2)
    assert pool.allocate(0) == []
    assert pool.num_free_blocks == 2


def test_allocate_when_short_returns_none_and_changes_nothing() -> None:
    pool = BlockPool(3)
    assert ids(pool.allocate(2)) == [0, 1]
    assert pool.allocate(2) is None
    assert pool.num_free_blocks == 1
    assert [b.ref_cnt for b in pool.blocks] == [1, 1, 0]
    assert ids(pool.allocate(1)) == [2]  # the refused call did not take block 2


def test_allocate_when_short_does_not_evict() -> None:
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    pool.cache_block(a, b"h0", 0)
    pool.free([a])
    assert pool.allocate(2) is None
    assert pool.get_cached_block(b"h0") is a
    assert pool.num_evictions == 0


def test_freed_empty_blocks_are_reused_in_free_order() -> None:
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    pool.free([b, a])
    # Never-used blocks 2 and 3 come first, then 1 and 0 in the order they were freed.
    assert ids(pool.allocate(4)) == [2, 3, 1, 0]


def test_ref_counts() -> None:
    pool = BlockPool(2)
    (block,) = pool.allocate(1)
    pool.cache_block(block, b"h", 0)
    pool.touch([block])
    assert block.ref_cnt == 2
    pool.free([block])
    assert block.ref_cnt == 1
    assert pool.num_free_blocks == 1  # still held once
    pool.free([block])
    assert block.ref_cnt == 0
    assert pool.num_free_blocks == 2
    with pytest.raises(AssertionError, match="block 0 freed more often than taken"):
        pool.free([block])


def test_touch_counts_uses() -> None:
    pool = BlockPool(1)
    (block,) = pool.allocate(1)
    pool.cache_block(block, b"h", 0)
    assert block.usage.uses == 1
    pool.touch([block])
    pool.touch([block])
    assert block.usage.uses == 3


def test_cached_free_block_is_findable_until_reused() -> None:
    pool = BlockPool(3)
    a, b = pool.allocate(2)
    pool.cache_block(a, b"h0", 0)
    pool.free([a, b])
    assert pool.num_free_blocks == 3
    assert pool.num_cached_blocks == 1
    # Empty blocks go first (block 2 never used, then block 1), so block 0 keeps its contents.
    assert ids(pool.allocate(2)) == [2, 1]
    assert pool.get_cached_block(b"h0") is a
    assert pool.num_evictions == 0
    # Only the cached block is left: reusing it evicts its contents.
    assert ids(pool.allocate(1)) == [0]
    assert pool.get_cached_block(b"h0") is None
    assert a.block_hash is None
    assert pool.num_cached_blocks == 0
    assert pool.num_evictions == 1


def test_touch_on_cached_free_block_takes_it_out_of_the_free_set() -> None:
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    pool.cache_block(a, b"h0", 0)
    pool.free([a, b])
    assert pool.num_free_blocks == 2
    pool.touch([pool.get_cached_block(b"h0")])
    assert a.ref_cnt == 1
    assert pool.num_free_blocks == 1
    assert pool.allocate(2) is None
    assert ids(pool.allocate(1)) == [1]
    assert pool.allocate(1) is None  # block 0 is held again, not evictable
    assert pool.get_cached_block(b"h0") is a
    assert pool.num_evictions == 0


def test_duplicate_contents_keep_the_first_cached_block() -> None:
    pool = BlockPool(3)
    a, b = pool.allocate(2)
    pool.cache_block(a, b"same", 0)
    pool.cache_block(b, b"same", 0)
    assert pool.get_cached_block(b"same") is a
    assert b.block_hash is None
    assert pool.num_cached_blocks == 1
    pool.free([b])
    # The private copy went back as an empty block, reused before any cached one.
    pool.free([a])
    assert ids(pool.allocate(2)) == [2, 1]
    assert pool.get_cached_block(b"same") is a


def test_caching_a_block_twice_keeps_its_first_hash() -> None:
    pool = BlockPool(1)
    (block,) = pool.allocate(1)
    pool.cache_block(block, b"first", 0)
    pool.cache_block(block, b"second", 1)
    assert block.block_hash == b"first"
    assert block.usage.depth == 0
    assert pool.get_cached_block(b"second") is None
    assert pool.num_cached_blocks == 1


def test_caching_disabled_caches_nothing() -> None:
    pool = BlockPool(2, enable_caching=False)
    a, _ = pool.allocate(2)
    pool.cache_block(a, b"h0", 0)
    assert a.block_hash is None
    assert pool.get_cached_block(b"h0") is None
    assert pool.num_cached_blocks == 0


def test_reset_prefix_cache_drops_only_free_cached_blocks() -> None:
    pool = BlockPool(4)
    a, b, c = pool.allocate(3)
    for depth, block in enumerate((a, b, c)):
        pool.cache_block(block, f"h{depth}".encode(), depth)
    pool.free([c, b])  # a stays held
    assert pool.reset_prefix_cache() == 2
    assert pool.num_cached_blocks == 1
    assert pool.get_cached_block(b"h0") is a
    assert pool.get_cached_block(b"h1") is None
    assert pool.get_cached_block(b"h2") is None
    assert (b.block_hash, c.block_hash) == (None, None)
    assert pool.num_evictions == 0  # a reset is not an eviction
    assert pool.num_free_blocks == 3
    # Dropped blocks join the empty blocks in eviction order (LRU: c was freed first).
    assert ids(pool.allocate(3)) == [3, 2, 1]
    assert pool.num_evictions == 0
    assert pool.reset_prefix_cache() == 0


def test_num_evictions_counts_each_reused_cached_block() -> None:
    pool = BlockPool(3)
    blocks = pool.allocate(3)
    for i, block in enumerate(blocks):
        pool.cache_block(block, f"h{i}".encode(), 0)
    pool.free(blocks)
    assert ids(pool.allocate(2)) == [0, 1]
    assert pool.num_evictions == 2
    assert pool.num_cached_blocks == 1
    assert pool.get_cached_block(b"h2") is blocks[2]


def test_unknown_eviction_policy() -> None:
    with pytest.raises(ValueError, match="eviction policy 'mru' is unknown"):
        BlockPool(2, eviction_policy="mru")
