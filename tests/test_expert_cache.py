"""The expert cache: hits, evictions in LRU order, the byte budget, frequency pins, and a
refusal with the numbers when one expert does not fit."""
from __future__ import annotations

import pytest

from tiercache.cache.experts import ExpertCache

MB = 1 << 20


def test_hits_misses_and_lru_eviction():
    c = ExpertCache(3 * MB, layers=2)
    assert c.get((0, 1)) is None
    for e in range(3):
        assert c.put((0, e), f"w{e}", MB).ok
    assert c.get((0, 0)) == "w0"  # now most recent: (0, 1) is next out
    assert c.eviction_order() == [(0, 1), (0, 2), (0, 0)]
    a = c.put((1, 0), "v", MB)
    assert a.ok and a.evicted == [(0, 1)]
    assert c.used_bytes == 3 * MB <= c.budget_bytes
    r = c.report()
    assert r["hits"] == [1, 0] and r["misses"] == [1, 0]
    assert r["bytes_read"] == [3 * MB, MB] and r["evictions"] == [1, 0]
    assert r["resident"] == [[0, 2], [0]]


def test_budget_held_with_uneven_sizes_and_in_use():
    c = ExpertCache(4 * MB, layers=1)
    c.put((0, 0), "a", 2 * MB)
    c.put((0, 1), "b", MB)
    a = c.put((0, 2), "c", 2 * MB, in_use=[(0, 0)])  # (0, 0) is computing: (0, 1) goes
    assert a.ok and a.evicted == [(0, 1)] and c.used_bytes == 4 * MB
    a = c.put((0, 3), "d", 3 * MB, in_use=[(0, 0), (0, 2)])
    assert not a.ok and c.used_bytes == 4 * MB  # nothing evictable: computed, not kept
    assert c.stats.refused == 1 and c.stats.bytes_read[0] == 8 * MB


def test_reads_in_flight_hold_their_room():
    """`reserve` evicts for a read before it is made and holds the room (other puts evict
    around it) until `release`; `demote` puts an expert first in line to go."""
    c = ExpertCache(3 * MB, layers=1)
    for e in range(3):
        c.put((0, e), e, MB)
    a = c.reserve((0, 3), MB, in_use=[(0, 0)])
    assert a.ok and a.evicted == [(0, 1)] and c.reserved == MB
    assert c.put((0, 4), 4, MB).evicted == [(0, 0)]  # the reserved MiB is not free
    assert c.used_bytes + c.reserved == 3 * MB
    assert not c.reserve((0, 5), 2 * MB, in_use=[(0, 2), (0, 4)]).ok
    assert "1.00 MiB held for reads in flight" in c.reserve((0, 5), 3 * MB).why
    c.release(MB)
    assert c.put((0, 3), 3, MB).evicted == [] and c.used_bytes == 3 * MB
    c.demote((0, 3))
    assert c.eviction_order() == [(0, 3), (0, 2), (0, 4)]


def test_one_expert_larger_than_the_budget_is_refused_with_numbers():
    c = ExpertCache(3 * MB, layers=1)
    a = c.put((0, 0), "big", 5 * MB)
    assert not a.ok and a.evicted == [] and len(c) == 0
    assert "5.00 MiB" in a.why and "3.00 MiB" in a.why


def test_freq_lru_pins_the_most_routed_experts():
    c = ExpertCache(4 * MB, layers=1, policy="freq+lru", pinned_bytes=2 * MB)
    for e in [0, 0, 0, 1, 1, 2, 3]:  # warm-up routing
        c.get((0, e))
    assert c.pin_hottest(MB) == [(0, 0), (0, 1)]
    c.put((0, 0), "hot0", MB)
    c.put((0, 1), "hot1", MB)
    assert c.report()["pinned"] == [[0, 1]] and c.eviction_order() == []
    for e in range(2, 8):  # a stream of cold experts cycles through the 2 MiB tail only
        assert c.put((0, e), e, MB).ok
    assert c.get((0, 0)) == "hot0" and c.get((0, 1)) == "hot1"
    assert c.eviction_order() == [(0, 6), (0, 7)] and c.used_bytes == 4 * MB
    # routing moves on: the new hottest are pinned, the old pins become evictable
    for _ in range(9):
        c.get((0, 7)), c.get((0, 6))
    assert set(c.pin_hottest(MB)) == {(0, 6), (0, 7)}
    assert set(c.report()["pinned"][0]) == {6, 7} and c.used_bytes <= 4 * MB


def test_pin_with_a_value_and_explicit_evict():
    c = ExpertCache(2 * MB, layers=1)
    assert c.pin((0, 0), "resident", MB).ok
    assert not c.pin((0, 1), "x", 2 * MB).ok  # the pinned one already takes half
    c.put((0, 2), "y", MB)
    assert not c.put((0, 3), "z", 2 * MB).ok  # only the LRU's MiB can go
    assert c.evict((0, 0)) and (0, 0) not in c and not c.evict((0, 0))
    with pytest.raises(ValueError):
        ExpertCache(MB, 1, policy="fifo")


def test_frequency_pins_leave_experts_pinned_for_good():
    c = ExpertCache(3 * MB, layers=1, policy="freq+lru", pinned_bytes=2 * MB)
    assert c.pin((0, 5), "resident", MB).ok
    for e in [1, 1, 2, 2, 2, 3]:
        c.get((0, e))
    assert c.pin_hottest(MB) == [(0, 2)]  # one MiB of the pinned region is left
    c.put((0, 2), "two", MB)
    assert c.report()["pinned"] == [[2, 5]]
    for _ in range(5):
        c.get((0, 3))
    assert c.pin_hottest(MB) == [(0, 3)] and (0, 5) in c.pinned and (0, 2) in c.lru
