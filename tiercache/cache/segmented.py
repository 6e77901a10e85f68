"""The segmented neuron cache: fixed slots for frequency-pinned ("hot") clusters and an LRU of
"cold" slots for the tail. It manages slot indices and bytes; the tensors live in the engine's
slot pool, so a hit costs a dict lookup and a miss is a read the caller makes.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Hashable, Iterable

Key = Hashable  # (layer, expert, cluster)


@dataclass
class CacheStats:
    hot_hits: int = 0
    cold_hits: int = 0
    misses: int = 0
    evictions: int = 0
    refused: int = 0  # admissions with no evictable slot (every cold slot in use)

    @property
    def lookups(self) -> int:
        return self.hot_hits + self.cold_hits + self.misses

    @property
    def hit_rate(self) -> float:
        return (self.hot_hits + self.cold_hits) / self.lookups if self.lookups else 0.0


@dataclass
class SegmentedCache:
    slot_bytes: int
    hot_slots: int
    cold_slots: int
    stats: CacheStats = field(default_factory=CacheStats)

    def __post_init__(self):
        self.hot: dict[Key, int] = {}
        self.cold: OrderedDict[Key, int] = OrderedDict()  # least recently used first
        self.free_cold = list(range(self.cold_slots - 1, -1, -1))  # hot and cold number apart

    @property
    def budget_bytes(self) -> int:
        return (self.hot_slots + self.cold_slots) * self.slot_bytes

    @property
    def used_bytes(self) -> int:
        return (len(self.hot) + len(self.cold)) * self.slot_bytes

    def pin(self, key: Key) -> int | None:
        """Give `key` a hot slot for good; None when the hot region is full."""
        if key in self.hot:
            return self.hot[key]
        if len(self.hot) >= self.hot_slots:
            return None
        self.hot[key] = len(self.hot)
        return self.hot[key]

    def lookup(self, key: Key) -> int | None:
        """Slot holding `key` (refreshing its LRU position), or None on a miss. Hot and cold
        slots are numbered separately: the caller knows which region it asked about."""
        slot = self.hot.get(key)
        if slot is not None:
            self.stats.hot_hits += 1
            return slot
        slot = self.cold.get(key)
        if slot is not None:
            self.cold.move_to_end(key)
            self.stats.cold_hits += 1
            return slot
        self.stats.misses += 1
        return None

    def touch(self, key: Key) -> bool:
        """Refresh a cold key's LRU position without counting a lookup (it is about to be
        used: read ahead found it cached); -> whether it is cached."""
        if key in self.cold:
            self.cold.move_to_end(key)
            return True
        return key in self.hot

    def admit(self, key: Key, in_use: Iterable[Key] = ()) -> tuple[int | None, Key | None]:
        """A cold slot for `key` -> (slot, evicted key). Keys in `in_use` are not evicted;
        (None, None) when nothing can be evicted: the caller computes without caching."""
        if self.free_cold:
            slot = self.free_cold.pop()
            self.cold[key] = slot
            return slot, None
        busy = set(in_use)
        victim = next((k for k in self.cold if k not in busy), None)
        if victim is None:
            self.stats.refused += 1
            return None, None
        slot = self.cold.pop(victim)
        self.cold[key] = slot
        self.stats.evictions += 1
        return slot, victim

    def eviction_order(self) -> list[Key]:
        """Cold keys in the order they would be evicted."""
        return list(self.cold)

    def __contains__(self, key: Key) -> bool:
        return key in self.hot or key in self.cold
