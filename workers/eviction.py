"""Which cached free block to reuse first.

A free block that still holds a cached prefix stays findable until it is reused; these policies
choose which of them gives up its contents when a fresh block is needed. Every policy breaks ties
the same way: deeper blocks first (a chain's tail is worth nothing without its head), then the block
freed longest ago, then the lower block id, so eviction order is fully deterministic.

- `lru`: least recently used first.
- `fifo`: the block whose contents were cached earliest first, however often it was hit since.
- `lfu`: fewest uses first.
- `adaptive`: GreedyDual-Size-Frequency (Cherkasova, 1998). A block's priority is
  `L + uses x cost`, where `L` is the priority of the last evicted block. `L` rises with each
  eviction, so recency enters as ageing: a block hot long ago sinks below blocks used lately, while a
  block used many times survives a flood of one-off prefixes that would flush LRU. Cost is the same
  for every full block (its linear-layer work, which dominates its attention work at these lengths),
  and uses are monotone along a chain (every hit on a block is a hit on its parent), so parents
  always outrank their children.
"""

from __future__ import annotations

import heapq
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(slots=True)
class BlockUsage:
    """What the policies know about one cached block."""

    depth: int = 0  # index of the block in its chain (0 = first block of a prompt)
    uses: int = 0  # times the block was allocated or hit since its contents were cached
    cached_at: int = 0  # logical time its contents were cached
    last_used: int = 0  # logical time it was last freed


class EvictionPolicy(ABC):
    """An ordered set of evictable (cached, free) block ids."""

    @abstractmethod
    def add(self, block_id: int, usage: BlockUsage) -> None: ...

    @abstractmethod
    def remove(self, block_id: int) -> None:
        """The block was hit again while free: it is no longer evictable."""

    @abstractmethod
    def pop(self) -> int:
        """Removes and returns the block to evict next."""

    @abstractmethod
    def ranked(self) -> list[int]:
        """Every evictable block id, the one to evict last first (the hottest), without changing
        anything: a KV snapshot keeps the head of this list."""

    @abstractmethod
    def __len__(self) -> int: ...


class LRUPolicy(EvictionPolicy):
    """O(1): blocks join at the back as they are freed, the front is the least recently used. The
    KV cache manager frees a sequence's blocks tail first, so within one sequence the deeper block
    is the older one and goes first, as the tie-break rule asks."""

    def __init__(self) -> None:
        self._order: OrderedDict[int, None] = OrderedDict()

    def add(self, block_id: int, usage: BlockUsage) -> None:
        self._order[block_id] = None

    def remove(self, block_id: int) -> None:
        del self._order[block_id]

    def pop(self) -> int:
        return self._order.popitem(last=False)[0]

    def ranked(self) -> list[int]:
        return list(reversed(self._order))

    def __len__(self) -> int:
        return len(self._order)


class _HeapPolicy(EvictionPolicy):
    """A min-heap on a policy's key, with lazy deletion: a removed block's entry stays in the heap
    and is skipped when it surfaces (the live key of each block is kept beside it)."""

    def __init__(self) -> None:
        self._heap: list[tuple] = []
        self._live: dict[int, tuple] = {}

    @abstractmethod
    def _priority(self, usage: BlockUsage) -> tuple: ...

    def add(self, block_id: int, usage: BlockUsage) -> None:
        key = (*self._priority(usage), -usage.depth, usage.last_used, block_id)
        self._live[block_id] = key
        heapq.heappush(self._heap, key)

    def remove(self, block_id: int) -> None:
        del self._live[block_id]

    def pop(self) -> int:
        while True:
            key = heapq.heappop(self._heap)
            block_id = key[-1]
            if self._live.get(block_id) == key:
                del self._live[block_id]
                self._evicted(key)
                return block_id

    def _evicted(self, key: tuple) -> None:
        pass

    def ranked(self) -> list[int]:
        # The live keys in ascending order are exactly the order `pop` would take them in.
        return [key[-1] for key in sorted(self._live.values(), reverse=True)]

    def __len__(self) -> int:
        return len(self._live)


class FIFOPolicy(_HeapPolicy):
    def _priority(self, usage: BlockUsage) -> tuple:
        return (usage.cached_at,)


class LFUPolicy(_HeapPolicy):
    def _priority(self, usage: BlockUsage) -> tuple:
        return (usage.uses,)


class AdaptivePolicy(_HeapPolicy):
    """GreedyDual-Size-Frequency; see the module docstring."""

    BLOCK_COST = 1.0

    def __init__(self) -> None:
        super().__init__()
        self.inflation = 0.0  # L: the priority of the last evicted block

    def _priority(self, usage: BlockUsage) -> tuple:
        return (self.inflation + usage.uses * self.BLOCK_COST,)

    def _evicted(self, key: tuple) -> None:
        self.inflation = key[0]


def make_policy(name: str) -> EvictionPolicy:
    policies = {"lru": LRUPolicy, "fifo": FIFOPolicy, "lfu": LFUPolicy, "adaptive": AdaptivePolicy}
    if name not in policies:
        raise ValueError(f"eviction policy {name!r} is unknown; use one of {', '.join(policies)}")
    return policies[name]()
