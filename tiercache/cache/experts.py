"""The expert cache: whole MoE experts, one (layer, expert) unit each, in a fixed byte budget.

Policies (measured by tools/expert_trace.py, not assumed; `choose_policy` is the rule):
- "lru": every resident expert in one LRU, as mixtral-offloading keeps them;
- "freq+lru": a pinned region for the most often routed experts (from profile counts or from
  the routing seen so far: `pin_hottest`), never evicted by `put`, plus an LRU tail.

The cache holds whatever value its owner gives it (a kernel-ready block) and counts bytes; a
hit is a dict lookup, a miss is a read the caller makes and then hands to `put`. Running out of
room is a return value (`Admit`) with the numbers, never an exception.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterable

Key = tuple[int, int]  # (layer, expert)
POLICIES = ("lru", "freq+lru")
MB = 1 << 20


@dataclass
class Admit:
    ok: bool
    evicted: list[Key] = field(default_factory=list)
    why: str = ""  # when not ok: what did not fit, in bytes
    freed: list = field(default_factory=list)  # the evicted experts' values (their owner may
                                               # reuse their buffers)


@dataclass
class ExpertStats:
    """Per-layer counters; the cache is their one owner."""
    layers: int

    def __post_init__(self):
        z = [0] * self.layers
        self.hits, self.misses, self.bytes_read, self.evictions = z[:], z[:], z[:], z[:]
        self.refused = 0  # puts that did not fit: computed from the read, not kept

    def as_dict(self) -> dict:
        hits, uses = sum(self.hits), sum(self.hits) + sum(self.misses)
        return {"hits": self.hits[:], "misses": self.misses[:], "bytes_read": self.bytes_read[:],
                "evictions": self.evictions[:], "refused": self.refused,
                "hit_rate": hits / uses if uses else 0.0}


@dataclass
class ReadAheadStats:
    """Experts, per layer: read ahead (`read`), of them routed (`used`) or let go (`unused`),
    and routed experts neither held nor read ahead (`demand`: the layer waits for the read)."""
    layers: int

    def __post_init__(self):
        z = [0] * self.layers
        self.read, self.used, self.unused, self.demand = z[:], z[:], z[:], z[:]

    def as_dict(self) -> dict:
        return {"readahead_read": self.read[:], "readahead_used": self.used[:],
                "readahead_unused": self.unused[:], "demand_stalls": self.demand[:]}


class ExpertCache:
    """get / put / pin / evict over (layer, expert) keys, byte-accounted.

    budget_bytes: everything the cache may hold; pinned_bytes (freq+lru): the part of it kept
    for pinned experts, the rest is the LRU tail. `lru` has no pinned region of its own, but
    `pin` still holds an expert for good (resident weights the owner never streams).
    `reserve` holds room for a read in flight, so that what is read ahead stays inside the
    budget too; `release` gives it back just before that read's `put`."""

    def __init__(self, budget_bytes: int, layers: int, policy: str = "lru",
                 pinned_bytes: int = 0):
        if policy not in POLICIES:
            raise ValueError(f"expert cache policy {policy!r}: one of {', '.join(POLICIES)}")
        self.policy, self.budget_bytes = policy, budget_bytes
        self.pinned_budget = min(pinned_bytes, budget_bytes) if policy == "freq+lru" else 0
        self.stats = ExpertStats(layers)
        self.counts: dict[Key, int] = {}  # routed uses per expert: warm-up counts for pinning
        self.pinned: dict[Key, tuple[Any, int]] = {}  # key -> (value, bytes)
        self.lru: OrderedDict[Key, tuple[Any, int]] = OrderedDict()  # least recent first
        self.want_pinned: set[Key] = set()  # pinned by frequency, not read yet
        self.by_freq: set[Key] = set()  # pinned by frequency (pin_hottest), not for good
        self.reserved = 0  # bytes held for reads in flight (`reserve`)

    # -- bytes -----------------------------------------------------------------------------
    @property
    def pinned_bytes(self) -> int:
        return sum(n for _, n in self.pinned.values())

    @property
    def lru_bytes(self) -> int:
        return sum(n for _, n in self.lru.values())

    @property
    def used_bytes(self) -> int:
        return self.pinned_bytes + self.lru_bytes

    def __contains__(self, key: Key) -> bool:
        return key in self.pinned or key in self.lru

    def __len__(self) -> int:
        return len(self.pinned) + len(self.lru)

    # -- the protocol ----------------------------------------------------------------------
    def get(self, key: Key, tokens: int = 1):
        """The value held for `key` (refreshing its LRU place) or None: a routed use of the
        expert, counted as a hit or a miss of its layer; `tokens` routed to it (a prompt's
        many) weigh it in the routing counts `pin_hottest` pins by."""
        self.counts[key] = self.counts.get(key, 0) + tokens
        entry = self.pinned.get(key)
        if entry is None and key in self.lru:
            self.lru.move_to_end(key)
            entry = self.lru[key]
        if entry is None:
            self.stats.misses[key[0]] += 1
            return None
        self.stats.hits[key[0]] += 1
        return entry[0]

    def peek(self, key: Key):
        """The value without counting a use or refreshing the LRU (read-ahead asks this)."""
        entry = self.pinned.get(key) or self.lru.get(key)
        return None if entry is None else entry[0]

    def touch(self, key: Key) -> bool:
        """Refresh an LRU expert about to be used (read ahead found it); -> whether held."""
        if key in self.lru:
            self.lru.move_to_end(key)
        return key in self

    def put(self, key: Key, value, nbytes: int, in_use: Iterable[Key] = ()) -> Admit:
        """An expert just read from the store (its bytes count as read, admitted or not): keep
        it, evicting least recently used experts not in `in_use`; pinned-by-frequency experts
        go to the pinned region. Admit.ok is False, with the numbers, when it does not fit."""
        self.stats.bytes_read[key[0]] += nbytes
        if key in self:
            return Admit(True)
        if key in self.want_pinned and self.pinned_bytes + nbytes <= self.pinned_budget:
            self.want_pinned.discard(key)
            self.pinned[key] = (value, nbytes)
            return Admit(True)
        admit = self._make_room(key, nbytes, in_use)
        if admit.ok:
            self.lru[key] = (value, nbytes)
        else:
            self.stats.refused += 1
        return admit

    def reserve(self, key: Key, nbytes: int, in_use: Iterable[Key] = ()) -> Admit:
        """Room for `key`'s read before it is made (evicting as `put` does), held until
        `release`: reads in flight count against the budget."""
        admit = self._make_room(key, nbytes, in_use)
        if admit.ok:
            self.reserved += nbytes
        return admit

    def release(self, nbytes: int) -> None:
        """Give back room `reserve` held (its read is done: `put` it now, or dropped)."""
        self.reserved -= nbytes

    def demote(self, key: Key) -> None:
        """An LRU expert that will likely not be used soon (read ahead, then not routed):
        first to go."""
        if key in self.lru:
            self.lru.move_to_end(key, last=False)

    def _make_room(self, key: Key, nbytes: int, in_use: Iterable[Key]) -> Admit:
        """Evict least recently used experts not in `in_use` until `nbytes` are free."""
        room = self.budget_bytes - max(self.pinned_budget, self.pinned_bytes)
        busy = set(in_use)
        free = room - self.lru_bytes - self.reserved
        evictable = sum(n for k, (_, n) in self.lru.items() if k not in busy)
        if nbytes > free + evictable:
            return Admit(False, why=self._too_small(key, nbytes, room, free + evictable))
        evicted, freed = [], []
        for k in list(self.lru):
            if free >= nbytes:
                break
            if k not in busy:
                value, n = self.lru.pop(k)
                free += n
                self.stats.evictions[k[0]] += 1
                evicted.append(k)
                freed.append(value)
        return Admit(True, evicted, freed=freed)

    def pin(self, key: Key, value=None, nbytes: int = 0) -> Admit:
        """Hold `key` for good. With a value: now (moved out of the LRU if there), refused with
        the numbers when the pinned region (freq+lru; else the whole budget) lacks room. Without
        one: pinned once read (`put`), or now if the LRU already holds it."""
        if key in self.pinned:
            return Admit(True)
        if value is None and key not in self.lru:
            self.want_pinned.add(key)
            return Admit(True)
        if value is None:
            value, nbytes = self.lru[key]
        limit = self.pinned_budget if self.policy == "freq+lru" else self.budget_bytes
        if self.pinned_bytes + nbytes > limit:
            return Admit(False, why=f"pinning expert {key} needs {nbytes} bytes; the pinned "
                                    f"region holds {limit} bytes, {self.pinned_bytes} in use")
        self.lru.pop(key, None)
        self.pinned[key] = (value, nbytes)
        return Admit(True)

    def evict(self, key: Key) -> bool:
        """Drop `key` whatever its region; -> whether it was held."""
        self.want_pinned.discard(key)
        self.by_freq.discard(key)
        entry = self.pinned.pop(key, None) or self.lru.pop(key, None)
        if entry is not None:
            self.stats.evictions[key[0]] += 1
        return entry is not None

    def eviction_order(self) -> list[Key]:
        """LRU experts in the order `put` would evict them; pinned ones are never listed."""
        return list(self.lru)

    def pin_hottest(self, expert_bytes: int, counts: dict[Key, int] | None = None) -> list[Key]:
        """freq+lru: pin the most often routed experts that fit the pinned region, by `counts`
        (a profile's) or the uses seen so far (warm-up routing). Earlier frequency pins that
        are no longer among the hottest go back to the LRU tail; experts pinned with a value
        (`pin`) stay. -> the keys pinned by frequency."""
        if self.policy != "freq+lru" or expert_bytes <= 0:
            return []
        counts = self.counts if counts is None else counts
        held = sum(n for k, (_, n) in self.pinned.items() if k not in self.by_freq)
        hot = [k for k in sorted(counts, key=lambda k: (-counts[k], k))
               if k not in self.pinned or k in self.by_freq]
        hot = hot[:max(0, self.pinned_budget - held) // expert_bytes]
        for k in [k for k in self.by_freq if k not in hot]:
            if k in self.pinned:
                self.lru[k] = self.pinned.pop(k)  # kept, now evictable first
                self.lru.move_to_end(k, last=False)
        self.want_pinned, self.by_freq = set(), set(hot)
        for k in hot:
            self.pin(k)
        room = self.budget_bytes - self.pinned_budget
        while self.lru and self.lru_bytes > room:  # demoted pins past the tail's room
            k, _ = self.lru.popitem(last=False)
            self.stats.evictions[k[0]] += 1
        return hot

    # -- reports ---------------------------------------------------------------------------
    def resident(self) -> list[list[int]]:
        """Experts held, per layer."""
        out = [[] for _ in range(self.stats.layers)]
        for l, e in sorted([*self.pinned, *self.lru]):
            out[l].append(e)
        return out

    def report(self) -> dict:
        pinned = [[] for _ in range(self.stats.layers)]
        for l, e in sorted(self.pinned):
            pinned[l].append(e)
        return {"policy": self.policy, "budget_bytes": self.budget_bytes,
                "pinned_budget_bytes": self.pinned_budget, "used_bytes": self.used_bytes,
                "resident": self.resident(), "pinned": pinned, **self.stats.as_dict()}

    def reset_stats(self) -> None:
        self.stats = ExpertStats(self.stats.layers)

    def _too_small(self, key: Key, nbytes: int, room: int, evictable: int) -> str:
        return (f"expert {key} needs {nbytes / MB:.2f} MiB; the LRU region holds "
                f"{room / MB:.2f} MiB of a {self.budget_bytes / MB:.2f} MiB budget "
                f"({self.pinned_bytes / MB:.2f} MiB pinned, {self.reserved / MB:.2f} MiB held "
                f"for reads in flight), {evictable / MB:.2f} MiB of it free or evictable")


# The policy rule is measured (tools/expert_trace.py on the synthetic Mixtral stores and the
# tiny Mixtral, teacher-forced text): an LRU smaller than one token's routed set (top-k x
# layers experts) cycles and hits nothing, where experts pinned by routing counts hit 0.3-0.5;
# from one token's set up, the LRU beats frequency pins (0.65 against 0.52 at 25% of the
# experts, 0.94 against 0.81 at 50%).
def choose_policy(policy: str | None, budget_bytes: int, expert_bytes: int, layers: int,
                  top_k: int) -> tuple[str, float]:
    """-> (policy, share of the budget pinned). None: the measured rule above."""
    if policy is not None:
        return policy, 0.5 if policy == "freq+lru" else 0.0
    if 0 < budget_bytes // max(1, expert_bytes) < layers * top_k:
        return "freq+lru", 1.0
    return "lru", 0.0


def expert_cache(policy: str | None, budget_bytes: int, expert_bytes: int, layers: int,
                 top_k: int, resident: dict) -> ExpertCache:
    """The cache over `budget_bytes` of streamed experts, with the `resident` ones (key ->
    value; their bytes are the engine's pinned weights) pinned on top, so that every routed
    use is counted by one owner."""
    name, share = choose_policy(policy, budget_bytes, expert_bytes, layers, top_k)
    held = len(resident) * expert_bytes
    cache = ExpertCache(budget_bytes + held, layers, name,
                        pinned_bytes=held + int(share * budget_bytes))
    for key, value in resident.items():
        cache.pin(key, value, expert_bytes)
    return cache


def report(cache: ExpertCache, ahead: ReadAheadStats, cut: float) -> dict:
    """stats()["experts"]: per layer hits, misses (hits + misses = routed uses), bytes read,
    the resident set, and read-ahead used / unused / demand stalls."""
    return {**cache.report(), **ahead.as_dict(), "readahead_cut": cut}
