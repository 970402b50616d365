"""Eviction policies: the exact order in which cached free blocks give up their contents."""

from __future__ import annotations

import pytest

from workers.block_pool import BlockPool
from workers.eviction import AdaptivePolicy, BlockUsage, make_policy
from workers.hashing import root_hash
from workers.kv_cache_manager import KVCacheManager
from workers.sampling import SamplingParams
from workers.sequence import Sequence

POLICIES = ("lru", "fifo", "lfu", "adaptive")


def cached_free_pool(policy: str, num_blocks: int) -> BlockPool:
    """A pool whose blocks all hold cached contents `h<id>` (depth 0), each cached and freed in
    turn in id order, so their cache times and free times both follow the ids."""
    pool = BlockPool(num_blocks, policy)
    blocks = pool.allocate(num_blocks)
    for block in blocks:
        pool.cache_block(block, f"h{block.block_id}".encode(), 0)
        pool.free([block])
    return pool


def hit(pool: BlockPool, block_id: int, times: int = 1) -> None:
    """A sequence finds the block in the prefix cache, then finishes."""
    block = pool.blocks[block_id]
    for _ in range(times):
        pool.touch([block])
        pool.free([block])


def eviction_order(pool: BlockPool) -> list[int]:
    before = pool.num_evictions
    order = [b.block_id for b in pool.allocate(pool.num_free_blocks)]
    assert pool.num_evictions - before == len(order)
    return order


# -- one workload, four answers ------------------------------------------------------------------
# Blocks 0..3 cached in that order and freed in that order; then block 0 is hit three times and
# block 1 once. Afterwards: uses 4, 2, 1, 1; cached in order 0, 1, 2, 3; last freed 2, 3, 0, 1.
EXPECTED = {
    "lru": [2, 3, 0, 1],  # least recently freed first, however often a block was hit
    "fifo": [0, 1, 2, 3],  # earliest cached first: block 0 goes first although it is the hottest
    "lfu": [2, 3, 1, 0],  # fewest uses first; the one-use tie goes to the block freed earlier
    "adaptive": [2, 3, 1, 0],  # with nothing evicted yet (L=0) the priority is the use count
}


@pytest.mark.parametrize("policy", POLICIES)
def test_eviction_order_after_hits(policy: str) -> None:
    pool = cached_free_pool(policy, 4)
    hit(pool, 0, times=3)
    hit(pool, 1)
    assert [pool.blocks[i].usage.uses for i in range(4)] == [4, 2, 1, 1]
    assert eviction_order(pool) == EXPECTED[policy]


def test_lru_moves_a_hit_block_to_the_back() -> None:
    pool = cached_free_pool("lru", 3)
    hit(pool, 0)
    assert eviction_order(pool) == [1, 2, 0]


def test_fifo_ignores_hits_and_frees() -> None:
    pool = cached_free_pool("fifo", 3)
    hit(pool, 0, times=5)
    hit(pool, 2)
    assert eviction_order(pool) == [0, 1, 2]


def test_lfu_keeps_the_frequently_hit_block() -> None:
    pool = cached_free_pool("lfu", 3)
    hit(pool, 1, times=2)
    hit(pool, 0)
    assert eviction_order(pool) == [2, 0, 1]


# -- a hot block against a flood of one-off prefixes ---------------------------------------------


def flood(policy: str, num_one_offs: int) -> tuple[BlockPool, list[int]]:
    """Three blocks. Block 0 holds a hot prefix hit three times (4 uses); then `num_one_offs`
    distinct prefixes are each computed once and freed. Returns the pool and the ids whose cached
    contents were evicted, in order."""
    pool = BlockPool(3, policy)
    (hot,) = pool.allocate(1)
    pool.cache_block(hot, b"hot", 0)
    pool.free([hot])
    hit(pool, 0, times=3)
    evicted = []
    for i in range(num_one_offs):
        before = pool.num_evictions
        (block,) = pool.allocate(1)
        if pool.num_evictions > before:
            evicted.append(block.block_id)
        pool.cache_block(block, f"once{i}".encode(), 0)
        pool.free([block])
    return pool, evicted


def test_flood_flushes_the_hot_block_from_lru() -> None:
    pool, evicted = flood("lru", 3)
    assert evicted == [0]  # the first eviction already takes the hot block
    assert pool.get_cached_block(b"hot") is None


def test_adaptive_keeps_the_hot_block_through_the_flood() -> None:
    pool, evicted = flood("adaptive", 8)
    # One-offs 3..8 evict each other; the hot block (priority 4) outranks them while L climbs 1, 1, 2, 2, 3, 3.
    assert evicted == [1, 2, 1, 2, 1, 2]
    assert pool.get_cached_block(b"hot") is pool.blocks[0]


def test_adaptive_ages_out_a_block_that_was_hot_long_ago() -> None:
    pool, evicted = flood("adaptive", 9)
    # By now the one-offs are worth L + 1 = 4, as much as the old hot block, which was freed longest
    # ago and so goes first.
    assert evicted == [1, 2, 1, 2, 1, 2, 0]
    assert pool.get_cached_block(b"hot") is None


def test_lfu_never_ages_out_the_hot_block() -> None:
    pool, evicted = flood("lfu", 12)
    assert 0 not in evicted
    assert evicted == [1, 2] * 5
    assert pool.get_cached_block(b"hot") is pool.blocks[0]


# -- tie-breaks ----------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ("fifo", "lfu", "adaptive"))
def test_ties_go_deeper_first_then_least_recently_freed_then_lower_id(policy: str) -> None:
    p = make_policy(policy)
    same = dict(uses=1, cached_at=1)
    p.add(5, BlockUsage(depth=0, last_used=1, **same))
    p.add(2, BlockUsage(depth=1, last_used=3, **same))
    p.add(4, BlockUsage(depth=1, last_used=2, **same))
    p.add(3, BlockUsage(depth=1, last_used=2, **same))
    p.add(7, BlockUsage(depth=2, last_used=9, **same))
    assert len(p) == 5
    assert [p.pop() for _ in range(5)] == [7, 3, 4, 2, 5]
    assert len(p) == 0


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        # Equal priority: the chain's tail goes before its head (LRU through the tail-first free,
        # the others through the deeper-first tie-break). Block 3 never held anything: it goes first.
        ("lru", [3, 2, 1, 0]),
        ("lfu", [3, 2, 1, 0]),
        ("adaptive", [3, 2, 1, 0]),
        # The chain's blocks were cached in one step, so FIFO sees a tie too.
        ("fifo", [3, 2, 1, 0]),
    ],
)
def test_order_of_a_freed_sequence(policy: str, expected: list[int]) -> None:
    kv = KVCacheManager(num_blocks=4, block_size=2, eviction_policy=policy)
    seq = Sequence("a", [1, 2, 3, 4, 5, 6], SamplingParams(), root_hash("m", None), None)
    assert kv.allocate_slots(seq, 6)
    assert [b.block_id for b in seq.blocks] == [0, 1, 2]
    assert [b.usage.cached_at for b in seq.blocks] == [0, 0, 0]
    kv.free(seq)
    assert [b.block_id for b in kv.pool.allocate(4)] == expected  # block 3 was never used


@pytest.mark.parametrize("policy", POLICIES)
def test_removed_block_is_not_popped(policy: str) -> None:
    p = make_policy(policy)
    for block_id in range(3):
        p.add(block_id, BlockUsage(uses=1, cached_at=block_id, last_used=block_id))
    p.remove(0)
    assert len(p) == 2
    assert [p.pop(), p.pop()] == [1, 2]
    assert len(p) == 0


@pytest.mark.parametrize("policy", ("fifo", "lfu", "adaptive"))
def test_readded_block_uses_its_new_key(policy: str) -> None:
    # Removed (hit) then added again (freed) with a later time and more uses: the stale heap entry
    # must not decide its place.
    p = make_policy(policy)
    p.add(0, BlockUsage(uses=1, cached_at=1, last_used=1))
    p.add(1, BlockUsage(uses=1, cached_at=2, last_used=2))
    p.remove(0)
    p.add(0, BlockUsage(uses=2, cached_at=1, last_used=3))
    expected = [0, 1] if policy == "fifo" else [1, 0]
    assert [p.pop(), p.pop()] == expected


def test_adaptive_priority_includes_inflation_at_add_time() -> None:
    p = AdaptivePolicy()
    p.add(0, BlockUsage(uses=3, last_used=1))
    p.add(1, BlockUsage(uses=1, last_used=2))
    assert p.pop() == 1
    assert p.inflation == 1.0
    p.add(2, BlockUsage(uses=1, last_used=3))  # worth 1 + 1 = 2, below block 0's 3
    p.add(3, BlockUsage(uses=3, last_used=4))  # worth 1 + 3 = 4, above it
    assert [p.pop() for _ in range(3)] == [2, 0, 3]
    assert p.inflation == 4.0


def test_make_policy_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match=r"eviction policy 'arc' is unknown; use one of lru, fifo, lfu, adaptive"):
        make_policy("arc")
