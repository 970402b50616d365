"""KVCacheManager: prefix hits, slot allocation, freeing and the counters the stats report."""

from __future__ import annotations

from workers.block_pool import KVBlock
from workers.hashing import root_hash
from workers.kv_cache_manager import KVCacheManager
from workers.sampling import SamplingParams
from workers.sequence import Sequence

BLOCK = 4


def make_seq(request_id: str, tokens: list[int], salt: str | None = None, model: str = "m") -> Sequence:
    return Sequence(request_id, list(tokens), SamplingParams(), root_hash(model, salt), None)


def ids(blocks: list[KVBlock]) -> list[int]:
    return [b.block_id for b in blocks]


def admit(kv: KVCacheManager, seq: Sequence) -> tuple[list[int], int]:
    """What the scheduler does for a waiting sequence with the whole prompt in one chunk."""
    hits, num_hit = kv.get_computed_blocks(seq)
    assert kv.allocate_slots(seq, seq.num_tokens - num_hit, hits)
    seq.num_computed_tokens = seq.num_tokens
    return ids(hits), num_hit


def test_empty_cache_has_no_hits() -> None:
    kv = KVCacheManager(8, BLOCK)
    assert kv.get_computed_blocks(make_seq("a", list(range(12)))) == ([], 0)


def test_hit_is_capped_one_token_short_of_the_prompt() -> None:
    kv = KVCacheManager(8, BLOCK)
    assert admit(kv, make_seq("a", list(range(8)))) == ([], 0)
    # The same 8 tokens: two full cached blocks, but the last token must be computed for its logits.
    assert admit(kv, make_seq("b", list(range(8)))) == ([0], 4)
    # One token more and both blocks may be served.
    assert admit(kv, make_seq("c", list(range(9)))) == ([0, 1], 8)


def test_hits_follow_the_shared_prefix() -> None:
    kv = KVCacheManager(16, BLOCK)
    admit(kv, make_seq("a", list(range(12))))
    assert kv.get_computed_blocks(make_seq("b", list(range(10)) + [99, 98])) == (
        [kv.pool.blocks[0], kv.pool.blocks[1]], 8
    )
    assert kv.get_computed_blocks(make_seq("c", list(range(5)) + [99, 98, 97, 96])) == ([kv.pool.blocks[0]], 4)
    # A different first token changes every block's hash, even where the later tokens agree.
    assert kv.get_computed_blocks(make_seq("d", [99] + list(range(1, 12)))) == ([], 0)


def test_hits_stop_at_the_first_missing_block() -> None:
    kv = KVCacheManager(4, BLOCK)
    a = make_seq("a", list(range(12)))
    admit(kv, a)
    kv.free(a)  # LRU order: 2, 1, 0
    kv.pool.touch([kv.pool.blocks[2]])
    kv.pool.free([kv.pool.blocks[2]])  # LRU order: 1, 0, 2
    other = kv.pool.allocate(2)
    assert ids(other) == [3, 1]  # block 1, the chain's middle, is evicted
    kv.pool.free(other)
    # Block 2 is still cached, but without block 1 the chain cannot reach it.
    assert kv.pool.get_cached_block(a.block_hashes[2]) is kv.pool.blocks[2]
    assert kv.pool.get_cached_block(a.block_hashes[1]) is None
    b = make_seq("b", list(range(13)))
    assert admit(kv, b) == ([0], 4)
    assert ids(b.blocks) == [0, 3, 1, 2]
    assert kv.pool.num_evictions == 2


def test_different_salt_or_model_gives_no_hits() -> None:
    kv = KVCacheManager(16, BLOCK)
    admit(kv, make_seq("a", list(range(12)), salt="tenant-a"))
    assert kv.get_computed_blocks(make_seq("b", list(range(12)), salt="tenant-b"))[1] == 0
    assert kv.get_computed_blocks(make_seq("c", list(range(12)), salt=None))[1] == 0
    assert kv.get_computed_blocks(make_seq("d", list(range(12)), salt="tenant-a", model="other"))[1] == 0
    assert kv.get_computed_blocks(make_seq("e", list(range(12)), salt="tenant-a"))[1] == 8


def test_allocate_slots_grows_the_block_table() -> None:
    kv = KVCacheManager(8, BLOCK)
    seq = make_seq("a", list(range(10)))
    assert kv.allocate_slots(seq, 6)  # a prefill chunk: 6 tokens need 2 blocks
    assert ids(seq.blocks) == [0, 1]
    assert seq.num_registered_blocks == 1  # only the first block will be full
    seq.num_computed_tokens = 6
    assert kv.allocate_slots(seq, 4)
    assert ids(seq.blocks) == [0, 1, 2]
    assert seq.num_registered_blocks == 2
    assert kv.pool.num_cached_blocks == 2
    seq.num_computed_tokens = 10
    seq.output_token_ids.append(50)
    assert kv.allocate_slots(seq, 1)  # a decode that still fits in block 2
    assert ids(seq.blocks) == [0, 1, 2]


def test_allocate_slots_when_short_changes_nothing() -> None:
    kv = KVCacheManager(4, BLOCK)
    admit(kv, make_seq("a", list(range(10))))  # 3 blocks
    b = make_seq("b", list(range(100, 110)))
    assert kv.allocate_slots(b, 10) is False
    assert b.blocks == []
    assert b.num_registered_blocks == 0
    assert kv.pool.num_free_blocks == 1
    assert kv.pool.num_cached_blocks == 2
    assert [blk.ref_cnt for blk in kv.pool.blocks] == [1, 1, 1, 0]
    assert kv.allocate_slots(b, 4)
    assert ids(b.blocks) == [3]


def test_free_cached_blocks_hit_count_against_the_free_pool() -> None:
    kv = KVCacheManager(4, BLOCK)
    a = make_seq("a", list(range(8)))
    admit(kv, a)
    kv.free(a)
    assert kv.pool.num_free_blocks == 4
    # 17 tokens hit both cached blocks but need 5 blocks in all: 3 new + the 2 hit ones > 4 free.
    long = make_seq("long", list(range(17)))
    hits, num_hit = kv.get_computed_blocks(long)
    assert (ids(hits), num_hit) == ([0, 1], 8)
    assert kv.allocate_slots(long, 9, hits) is False
    assert long.blocks == []
    assert kv.pool.num_free_blocks == 4
    assert [blk.ref_cnt for blk in kv.pool.blocks] == [0, 0, 0, 0]
    assert kv.pool.num_evictions == 0
    # 16 tokens need exactly 4: the 2 hits and 2 empty blocks, without evicting the hits.
    fits = make_seq("fits", list(range(16)))
    hits, num_hit = kv.get_computed_blocks(fits)
    assert kv.allocate_slots(fits, 16 - num_hit, hits)
    assert ids(fits.blocks) == [0, 1, 2, 3]
    assert kv.pool.num_free_blocks == 0
    assert kv.pool.num_evictions == 0


def test_hit_on_a_held_block_shares_it() -> None:
    kv = KVCacheManager(8, BLOCK)
    a = make_seq("a", list(range(9)))
    admit(kv, a)
    b = make_seq("b", list(range(9)))
    assert admit(kv, b) == ([0, 1], 8)
    assert ids(b.blocks) == [0, 1, 3]
    assert [blk.ref_cnt for blk in kv.pool.blocks[:4]] == [2, 2, 1, 1]
    assert kv.pool.blocks[0].usage.uses == 2
    kv.free(a)
    assert [blk.ref_cnt for blk in kv.pool.blocks[:4]] == [1, 1, 0, 1]
    assert kv.pool.num_free_blocks == 5


def test_duplicate_blocks_computed_in_the_same_step_stay_private() -> None:
    kv = KVCacheManager(8, BLOCK)
    a = make_seq("a", list(range(8)))
    b = make_seq("b", list(range(8)))
    admit(kv, a)
    assert admit(kv, b) == ([0], 4)
    assert ids(b.blocks) == [0, 2]
    assert kv.pool.blocks[2].block_hash is None  # block 1 already holds the same contents
    assert kv.pool.num_cached_blocks == 2
    kv.free(b)
    assert kv.pool.num_cached_blocks == 2
    assert kv.pool.num_free_blocks == 6  # a still holds blocks 0 and 1


def test_generated_tokens_are_cached_too() -> None:
    kv = KVCacheManager(8, BLOCK)
    a = make_seq("a", [1, 2, 3, 4, 5, 6])
    admit(kv, a)
    a.output_token_ids += [7, 8]
    assert kv.allocate_slots(a, 2)  # the decode that computes tokens 7 and 8 fills block 1
    assert a.num_registered_blocks == 2
    assert kv.get_computed_blocks(make_seq("b", [1, 2, 3, 4, 5, 6, 7, 8, 9])) == (a.blocks[:2], 8)


def test_free_goes_tail_first_and_resets_the_sequence() -> None:
    kv = KVCacheManager(4, BLOCK)
    a = make_seq("a", list(range(12)))
    admit(kv, a)
    assert ids(a.blocks) == [0, 1, 2]
    kv.free(a)
    assert a.blocks == []
    assert a.num_registered_blocks == 0
    assert kv.pool.num_free_blocks == 4
    assert kv.pool.num_cached_blocks == 3
    b = make_seq("b", list(range(100, 116)))
    assert admit(kv, b) == ([], 0)
    assert ids(b.blocks) == [3, 2, 1, 0]
    assert kv.pool.num_evictions == 3


def test_peak_used_blocks_and_usage() -> None:
    kv = KVCacheManager(8, BLOCK)
    a = make_seq("a", list(range(12)))
    admit(kv, a)
    assert kv.usage == 3 / 8
    kv.free(a)
    assert kv.usage == 0.0
    admit(kv, make_seq("b", list(range(100, 108))))
    assert kv.peak_used_blocks == 3
    admit(kv, make_seq("c", list(range(200, 216))))
    assert kv.peak_used_blocks == 6
    assert kv.usage == 6 / 8


def test_record_lookup_accumulates() -> None:
    kv = KVCacheManager(8, BLOCK)
    kv.record_lookup(12, 8)
    kv.record_lookup(5, 0)
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (17, 8)


def test_blocks_needed_rounds_up() -> None:
    kv = KVCacheManager(8, BLOCK)
    assert [kv.blocks_needed(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_prefix_caching_disabled_gives_no_hits() -> None:
    kv = KVCacheManager(8, BLOCK, enable_prefix_caching=False)
    a = make_seq("a", list(range(12)))
    admit(kv, a)
    assert a.num_registered_blocks == 0
    assert kv.pool.num_cached_blocks == 0
    b = make_seq("b", list(range(12)))
    assert admit(kv, b) == ([], 0)
    assert ids(b.blocks) == [3, 4, 5]
    kv.free(a)
    kv.free(b)
    assert kv.pool.num_free_blocks == 8
    assert kv.pool.num_evictions == 0
