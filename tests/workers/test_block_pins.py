"""BlockPool pins and snapshot import: exact block ids pinned, kept from eviction, and released."""

from __future__ import annotations

import pytest

from workers.block_pool import BlockPool, CachedBlockEntry, KVBlock


def ids(blocks: list[KVBlock] | None) -> list[int] | None:
    return None if blocks is None else [b.block_id for b in blocks]


def chain_pool(num_blocks: int = 6, *, fraction: float = 0.5, policy: str = "lru") -> BlockPool:
    """Blocks 0, 1, 2 hold one cached chain h0 <- h1 <- h2, freed tail first (as a sequence ends)."""
    pool = BlockPool(num_blocks, policy, max_pinned_fraction=fraction)
    blocks = pool.allocate(3)
    parent = b"root"
    for depth, block in enumerate(blocks):
        pool.cache_block(block, f"h{depth}".encode(), depth, parent)
        parent = f"h{depth}".encode()
    pool.free(reversed(blocks))
    return pool


def test_pinned_blocks_are_not_free_and_never_evicted() -> None:
    pool = chain_pool()
    assert pool.pin([b"h0", b"h1"]) == [0, 1]
    assert pool.num_pinned_blocks == 2
    assert pool.num_free_blocks == 4  # 3, 4, 5 empty and 2 cached; 0 and 1 are not free
    # Empty blocks first, then the one evictable cached block; the pinned pair is never taken.
    assert ids(pool.allocate(4)) == [3, 4, 5, 2]
    assert pool.allocate(1) is None
    assert pool.get_cached_block(b"h0").block_id == 0 and pool.get_cached_block(b"h1").block_id == 1
    assert pool.get_cached_block(b"h2") is None
    assert pool.num_evictions == 1


def test_a_pinned_block_held_then_freed_stays_out_of_the_free_blocks() -> None:
    pool = chain_pool()
    pool.pin([b"h0"])
    block = pool.get_cached_block(b"h0")
    pool.touch([block])  # a sequence hits the pinned prefix
    assert block.ref_cnt == 1 and pool.num_free_blocks == 5
    pool.free([block])
    assert block.ref_cnt == 0 and pool.num_free_blocks == 5
    assert ids(pool.allocate(5)) == [3, 4, 5, 2, 1]


def test_unpinned_blocks_become_evictable_tail_first() -> None:
    pool = chain_pool()
    pool.pin([b"h0", b"h1", b"h2"])
    assert pool.num_free_blocks == 3
    assert pool.unpin([b"h1", b"h0"]) == [1, 0]  # deeper first
    assert pool.pinned_block_ids == [2]
    assert pool.num_free_blocks == 5
    assert ids(pool.allocate(5)) == [3, 4, 5, 1, 0]  # LRU: unpinned tail first, block 2 still pinned
    assert pool.unpin() == [2]
    assert ids(pool.allocate(1)) == [2]


def test_unpin_of_unpinned_or_uncached_hashes_changes_nothing() -> None:
    pool = chain_pool()
    assert pool.unpin([b"h0", b"nope"]) == []
    assert pool.num_free_blocks == 6 and pool.num_pinned_blocks == 0


def test_pin_skips_hashes_that_are_not_cached_and_pins_a_block_once() -> None:
    pool = chain_pool()
    assert pool.pin([b"h2", b"missing", b"h2"]) == [2]
    assert pool.pin([b"h2", b"h1"]) == [1]
    assert pool.pinned_block_ids == [1, 2]


def test_pinning_past_the_fraction_is_refused_and_pins_nothing() -> None:
    pool = chain_pool(10, fraction=0.2)  # at most 2 of 10
    with pytest.raises(ValueError, match=r"would pin 3 of 10, over the limit of 2 \(max_pinned_fraction\)"):
        pool.pin([b"h0", b"h1", b"h2"])
    assert pool.num_pinned_blocks == 0 and pool.num_free_blocks == 10
    assert pool.pin([b"h0", b"h1"]) == [0, 1]
    with pytest.raises(ValueError, match="would pin 3 of 10"):
        pool.pin([b"h2"])
    assert pool.pinned_block_ids == [0, 1]


def test_reset_prefix_cache_keeps_pinned_blocks() -> None:
    pool = chain_pool()
    pool.pin([b"h0"])
    assert pool.reset_prefix_cache() == 2  # h1 and h2
    assert pool.get_cached_block(b"h0").block_id == 0
    assert pool.num_cached_blocks == 1 and pool.num_free_blocks == 5


@pytest.mark.parametrize("policy", ["lru", "fifo", "lfu", "adaptive"])
def test_ranked_cached_blocks_put_pinned_first_then_the_policys_order(policy: str) -> None:
    pool = chain_pool(policy=policy)
    pool.pin([b"h2"])
    ranked = ids(pool.ranked_cached_blocks())
    # Every policy evicts the deeper block first here (equal uses, tail freed first): 1 before 0,
    # so 0 ranks hotter.
    assert ranked == [2, 0, 1]


def entry(name: str, parent: str, depth: int, uses: int = 1) -> CachedBlockEntry:
    return CachedBlockEntry(name.encode(), parent.encode(), depth, uses)


def test_import_cached_takes_empty_blocks_lowest_first_and_never_evicts() -> None:
    pool = chain_pool(6)  # 3, 4, 5 empty
    entries = [entry("h0", "root", 0), entry("a0", "root", 0), entry("a1", "a0", 1), entry("b1", "gone", 1),
               entry("a2", "a1", 2), entry("a3", "a2", 3)]
    taken = pool.import_cached(entries)
    # h0 is cached already, b1's parent is nowhere; a0, a1, a2 fill the three empty blocks; a3 finds none.
    assert [(index, block.block_id) for index, block in taken] == [(1, 3), (2, 4), (4, 5)]
    assert pool.num_empty_blocks == 0 and pool.num_evictions == 0
    assert pool.get_cached_block(b"a3") is None and pool.get_cached_block(b"h2").block_id == 2
    assert pool.get_cached_block(b"a1").parent_hash == b"a0"
    # Imported blocks are free and cached, as if freed just now (after the chain already here),
    # the snapshot's coldest (its tail) first.
    assert ids(pool.allocate(6)) == [2, 1, 0, 5, 4, 3]


def test_import_cached_into_a_pool_without_prefix_caching_imports_nothing() -> None:
    pool = BlockPool(4, enable_caching=False)
    assert pool.import_cached([entry("a0", "root", 0)]) == []
    assert pool.num_cached_blocks == 0
