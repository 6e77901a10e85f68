"""Placement (`engine/layout.py`): a pure function of the manifest, settings and capacities;
what the engine keeps is what the planner predicts with the same function."""
import re

import pytest

from planner.accounting import plan_budget
from test_planner import small_manifest, v3_manifest
from tiercache.engine.layout import (MB, Capacities, Kernels, StoreFacts, TierConfig, place,
                                     spread_layers)
from tiercache.engine.tiered import load_tiered
from tiercache.errors import BudgetError
from tiercache.store.format import Store

INT4 = Kernels(int4=True, int8=True)  # what a q4 store needs to stream attention and the head


def sparse_manifest() -> dict:
    """small_manifest with a profile whose thresholds skip most clusters: gate mode."""
    m = small_manifest()
    c = m["ffn"]["n_clusters"]
    ffn = [[{"threshold": 0.1, "cluster_active": [0.3] * c,
             "cluster_freq": [(l * c + k) % 7 / 7 for k in range(c)]}] for l in range(8)]
    return {**m, "profile": {"tokens": 100, "ffn": ffn}}


def _place(m, ram=None, runtime=50 * MB, kernels=INT4, vram=0, **cfg):
    return place(StoreFacts.from_manifest(m), TierConfig(context=256, **cfg),
                 Capacities(runtime=runtime, ram=ram, vram=vram), kernels)


def _pinned(b) -> int:
    return b.attention + b.head + b.hot_slots * b.slot_bytes


def test_units_for_given_capacities():
    """Everything resident without a budget; a plan's regions stream exactly the rest: the
    layers whose clusters are not all pinned (whole layers, spread out), attention past the
    first pinned layers, the head's rows in slices."""
    m = v3_manifest()
    lay = _place(m)
    assert lay.mode == "dense" and lay.int4 and not lay.nbits and lay.vram == 0
    assert lay.units == () and lay.budget.streaming == 0 and lay.budget.head_pinned
    assert lay.budget.attn_pinned == frozenset(range(8)) and lay.budget.hot_slots == 8 * 16
    lay = _place(m, hot_clusters=2 * 16, cold_clusters=0, pin_attention=3, pin_head=False)
    b = lay.budget
    assert b.attn_pinned == frozenset({0, 1, 2}) and not b.head_pinned
    assert lay.hot == {(l, 0, c) for l in spread_layers(8)[:2] for c in range(16)}
    layers = [u for u in lay.units if u.layer is not None]
    hot_layers = spread_layers(8)[:2]  # layer 0 (and 4): nothing of it streams
    assert [u.layer for u in layers] == [l for l in range(8) if l >= 3 or l not in hot_layers]
    for u in layers:
        assert len(u.ffn) == (0 if u.layer in hot_layers else 16)
        assert set(u.attn) == (set() if u.layer < 3 else {"q_proj", "k_proj", "v_proj", "o_proj"})
    heads = [u.rows for u in lay.units if u.rows]
    assert heads[0][0] == 0 and heads[-1][1] == 2048
    assert len(heads) == -(-2048 // lay.head_slice_rows)
    assert b.streaming == lay.unit_bytes * (1 + 2 + 2)  # in use, 2 ahead, 2 I/O buffers
    assert lay.where("head") == "flash" and lay.where(("attn", 2)) == "ram"
    assert lay.where(("attn", 3)) == "flash" and lay.where((0, 0, 5)) == "ram"
    assert lay.where((1, 0, 5)) == "flash" and lay.computed_on((1, 0, 5)) == "cpu"
    sparse = _place(sparse_manifest(), hot_clusters=10, cold_clusters=40)
    assert sparse.mode == "gate"
    assert {sparse.where(k) for k in sparse.hot_order} == {"ram", "cache"}
    # without the int8 kernel the head cannot stream: it stays pinned whatever the plan says
    assert _place(m, kernels=Kernels(int4=True), hot_clusters=0, pin_head=False).budget.head_pinned


@pytest.mark.parametrize("manifest", [v3_manifest, small_manifest, sparse_manifest])
def test_more_ram_never_pins_less(manifest):
    m = manifest()
    full = _place(m).budget
    if manifest is sparse_manifest:
        assert _place(m).mode == "gate"
    seen, last = 0, None
    for ram in range(full.total - 40 * MB, full.total + 2 * MB, MB // 4):
        try:
            b = _place(m, ram=ram).budget
        except BudgetError:
            assert last is None, "refused above a budget that fitted"
            continue
        assert b.total <= ram
        if last is not None:
            assert _pinned(b) >= _pinned(last)
            assert b.attn_pinned >= last.attn_pinned and b.head_pinned >= last.head_pinned
            if (b.attn_pinned, b.head_pinned) == (last.attn_pinned, last.head_pinned):
                # (pinning the head next takes room from clusters: bytes still grow)
                assert b.hot_slots + b.cold_slots >= last.hot_slots + last.cold_slots
        last, seen = b, seen + 1
    assert seen > 10 and last == full  # everything pinned once it fits


def test_refusals_carry_the_numbers_and_the_number_fits():
    m = v3_manifest()
    with pytest.raises(BudgetError) as e:
        _place(m, ram=60 * MB)
    msg = str(e.value)
    got = re.match(r"RAM budget 60 MiB is too small: it needs at least (\d+) MiB \((.*)\)", msg)
    assert got and "runtime 50 MiB" in got[2] and "kv " in got[2], msg
    need = int(got[1])
    assert need > 60
    _place(m, ram=(need + 1) * MB)  # what it says it needs is enough
    # a plan's regions past the budget are refused with what they add up to
    with pytest.raises(BudgetError, match="regions as the plan gives them"):
        _place(m, ram=need * MB, hot_clusters=8 * 16, cold_clusters=0)


def _compare(path, rams, compute):
    """The engine's budget at each --ram, and the planner's prediction for the same settings
    and the runtime the engine measured: equal (refusals too, with the same message)."""
    manifest = Store(path).manifest
    for ram in rams:
        cfg = TierConfig(ram_bytes=ram, context=256, sparse=False, compute=compute)
        try:
            b = load_tiered(Store(path), cfg).budget
        except BudgetError as e:
            # the message rounds the measured runtime to the MiB: at its upper end the
            # planner must refuse too (a larger runtime never fits where a smaller did not)
            runtime = int(re.search(r"runtime (\d+) MiB", str(e))[1])
            with pytest.raises(BudgetError):
                plan_budget(manifest, cfg, int((runtime + 0.5) * MB))
            continue
        assert plan_budget(manifest, cfg, b.runtime) == b, ram


@pytest.mark.parametrize("kind,dtype,compute", [("llama", "q4", "torch"), ("llama", "f32", "auto"),
                                                ("mixtral", "q4", "torch")])
def test_planner_predicts_the_engines_budget(stores, kind, dtype, compute):
    planner_matches_engine(stores(kind, dtype, 64), compute)


def planner_matches_engine(path, compute: str) -> None:
    """From a budget that streams to one where everything fits, and one refused."""
    full = load_tiered(Store(path), TierConfig(context=256, sparse=False, compute=compute)).budget
    weights = full.total - full.runtime
    runtime = load_tiered(Store(path), TierConfig(ram_bytes=1 << 40, context=256, sparse=False,
                                                  compute=compute)).budget.runtime
    _compare(path, [runtime + int(weights * f) for f in (0.6, 0.8, 0.95, 1.2)] + [MB], compute)


def test_matmulnbits_layers_grow_with_the_budget():
    """With MatMulNBits, every weight resident and only part of its prepacked extra fitting,
    the first layers go on it (attention and FFN), the head only after every layer; more RAM
    never puts fewer there, and the budget (extra and load transient included) fits."""
    m = v3_manifest()
    nb = Kernels(int4=True, int8=True, nbits=True)
    full = _place(m, kernels=nb).budget
    assert full.nbits_layers == frozenset(range(8)) and full.nbits_head and full.prepacked > 0
    plain = _place(m).budget  # the same weights on torch's kernels: no prepacked copies
    assert plain.prepacked == 0 and not plain.nbits_layers
    seen, counts = set(), []
    for ram in range(plain.total, full.total + MB, max(1, (full.total - plain.total) // 400)):
        lay = _place(m, ram=ram, kernels=nb)
        b = lay.budget
        assert b.total <= ram and b.streaming == 0 and b.hot_slots == plain.hot_slots
        assert b.nbits_layers == frozenset(range(len(b.nbits_layers)))  # the first ones
        assert not b.nbits_head or len(b.nbits_layers) == 8
        assert lay.nbits == bool(b.nbits_layers) and (b.prepacked > 0) == lay.nbits
        counts.append(len(b.nbits_layers) + b.nbits_head)
        seen.add(len(b.nbits_layers))
    assert counts == sorted(counts) and counts[0] == 0 and counts[-1] == 9
    assert len(seen) > 3  # layers are added one at a time, not all or none
