"""The one API the scheduler uses for KV memory: find cached prefix blocks, allocate slots, free."""

from __future__ import annotations

from workers.block_pool import BlockPool, KVBlock
from workers.hashing import hash_full_blocks
from workers.sequence import Sequence


class KVCacheManager:
    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, eviction_policy: str = "lru",
        max_pinned_fraction: float = 0.5,
    ) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, eviction_policy, enable_caching=enable_prefix_caching,
                              max_pinned_fraction=max_pinned_fraction)
        self.prefix_cache_queries = 0  # prompt tokens looked up
        self.prefix_cache_hits = 0  # of which served from the cache
        self.peak_used_blocks = 0

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def get_computed_blocks(self, seq: Sequence) -> tuple[list[KVBlock], int]:
        """The longest run of cached blocks that starts the sequence, and the tokens they cover.
        At most `num_tokens - 1` tokens are served so that the last one is computed and yields
        logits."""
        if not self.enable_prefix_caching:
            return [], 0
        hashes = hash_full_blocks(seq.root_hash, seq.token_view(), self.block_size, seq.block_hashes)
        max_blocks = (seq.num_tokens - 1) // self.block_size
        hits: list[KVBlock] = []
        for block_hash in hashes[:max_blocks]:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def record_lookup(self, num_prompt_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_cache_queries += num_prompt_tokens
        self.prefix_cache_hits += num_hit_tokens

    def allocate_slots(self, seq: Sequence, num_new_tokens: int, computed_blocks: list[KVBlock] | None = None) -> bool:
        """Makes room for `num_new_tokens` more tokens of `seq` (after `computed_blocks`, prefix
        hits not yet owned by the sequence). False, with nothing changed, when the pool is short."""
        computed_blocks = computed_blocks or []
        num_owned = len(seq.blocks) + len(computed_blocks)
        num_total = seq.num_computed_tokens + len(computed_blocks) * self.block_size + num_new_tokens
        num_needed = self.blocks_needed(num_total) - num_owned
        # A hit on a free cached block takes it out of the free count, so count those too.
        num_reused_free = sum(1 for b in computed_blocks if b.ref_cnt == 0)
        if num_needed + num_reused_free > self.pool.num_free_blocks:
            return False
        self.pool.touch(computed_blocks)
        seq.blocks.extend(computed_blocks)
        if num_needed > 0:
            new_blocks = self.pool.allocate(num_needed)
            assert new_blocks is not None
            seq.blocks.extend(new_blocks)
        self._cache_full_blocks(seq, num_total)
        used = self.pool.num_blocks - self.pool.num_free_blocks
        self.peak_used_blocks = max(self.peak_used_blocks, used)
        return True

    def _cache_full_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Registers the blocks that will be full once this step has run. Their KV is written in the
        same forward pass before any attention reads it, so a later sequence of the same step may
        already hit them."""
        num_full = num_tokens // self.block_size
        if not self.enable_prefix_caching or num_full <= seq.num_registered_blocks:
            return
        hashes = hash_full_blocks(seq.root_hash, seq.token_view(num_tokens), self.block_size, seq.block_hashes)
        for depth in range(seq.num_registered_blocks, num_full):
            parent = hashes[depth - 1] if depth else seq.root_hash
            self.pool.cache_block(seq.blocks[depth], hashes[depth], depth, parent)
        seq.num_registered_blocks = num_full

    def free(self, seq: Sequence) -> None:
        # Tail first: under equal priority the eviction policies then drop a chain's end before its head.
        self.pool.free(reversed(seq.blocks))
        seq.blocks = []
        seq.num_registered_blocks = 0

    @property
    def usage(self) -> float:
        return 1.0 - self.pool.num_free_blocks / self.pool.num_blocks
