"""The lean runtime (tiercache/lean.py: numpy and the C kernel, no torch) against the dense
float32 reference on the same q4 store, on models built here whose shapes fit the kernel's row
blocks of 64; how `api.load` chooses it; and that a process running it never imports torch."""
import json
import os
import subprocess
from pathlib import Path
import sys

import numpy as np
import pytest
import torch
import transformers as T

from conftest import save_random
from tiercache import api, lean
from tiercache.cache import kv as kv_steps
from tiercache.engine import generate_step, load_dense, make_sampler
from tiercache.errors import BudgetError, StoreError, TiercacheError
from tiercache.store.convert import convert
from tiercache.store.format import Store

# the kernel quantizes activations to int8 per group of 32 (q4.py): logits move by up to a few
# tenths of their spread against float32 activations on these random models (the tiered engine
# on the same kernel is held to the same bound: test_default_model.Q4_LOGIT_TOL["int8"])
TOL = 0.6
TIE = 0.05  # greedy tokens agree except where the reference's top two are this close (x std)
IDS = [5, 17, 99, 3, 250, 42, 7, 7, 128, 64, 33, 200, 1, 90, 11, 160, 77, 31, 8, 240]


def _config(kind: str):
    common = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                  bos_token_id=1, eos_token_id=2)
    if kind == "mixtral":
        return T.MixtralConfig(**{**common, "intermediate_size": 128}, num_local_experts=4,
                               num_experts_per_tok=2, tie_word_embeddings=True)
    if kind == "tied":
        return T.LlamaConfig(tie_word_embeddings=True, **common)
    return T.LlamaConfig(tie_word_embeddings=False, rope_theta=500000.0, rope_scaling={  # llama3
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}, **common)


@pytest.fixture(scope="module")
def lean_stores(tmp_path_factory):
    """kind -> a q4 store (clusters of 64) the lean runtime runs: tied head; untied with
    llama3 rope scaling; Mixtral (4 experts, top 2)."""
    root, out = tmp_path_factory.mktemp("lean"), {}
    for kind in ("tied", "llama3", "mixtral"):
        save_random(_config(kind), root / kind, seed=3)
        out[kind] = convert(root / kind, root / f"{kind}-q4", dtype="q4", cluster_size=64,
                            progress=False)
    for kind in ("tied", "mixtral"):  # matrices on Q4_0's grid, as a GGUF's: zeros all 0
        _snap_to_q4_0(save_random(_config(kind), root / f"{kind}-grid", seed=4),
                      root / f"{kind}-grid")
        out[f"{kind}-grid"] = convert(root / f"{kind}-grid", root / f"{kind}-grid-q4",
                                      dtype="q4", cluster_size=64, progress=False)
    why = lean.why_not(Store(out["tied"]))
    if why is not None and "CPU" in why:
        pytest.skip(f"the lean runtime does not run here: {why}")
    assert why is None, why
    return out


def _snap_to_q4_0(model, path):
    """Every q4 matrix's groups of 32 as (q - 8) * d, q in 0..15 with a 0 in each group (so the
    converter finds d again) and d exact in bf16: what a GGUF's Q4_0 holds."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "embed" not in name and "lm_head" not in name and "gate.weight" not in name:
                q = torch.randint(0, 16, p.shape, generator=g).view(p.shape[0], -1, 32)
                q[..., 0] = 0
                d = 2.0 ** -torch.randint(5, 8, (p.shape[0], p.shape[1] // 32, 1), generator=g)
                p.copy_(((q - 8) * d).view(p.shape))
    model.save_pretrained(path)


def _spread(got, ref) -> float:
    got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
    return float((np.abs(got - ref).max(-1) / ref.std(-1)).max())


@pytest.mark.parametrize("kind", ["tied", "llama3", "mixtral", "tied-grid", "mixtral-grid"])
def test_lean_matches_the_dense_reference(lean_stores, kind):
    """Every position's logits, and greedy tokens (prefill, then decode through the C layer;
    Mixtral: the C layer's attention, the router in numpy, `_q4.experts`)."""
    dense, eng = load_dense(Store(lean_stores[kind])), lean.load(lean_stores[kind])
    ref = dense.logits(dense.new_session(), IDS).numpy()
    assert _spread(eng.logits(eng.new_session(), IDS), ref) < TOL
    _greedy_agrees(eng, dense, IDS, 16)


def _greedy_agrees(eng, dense, ids, n):
    """The same greedy tokens as the reference, up to a near-tie of its own (there the int8
    activations may pick the other one, and the check stops: measured 0.017 x std on 'tied')."""
    want = list(generate_step(dense.new_session(), ids, make_sampler(), n))
    got = list(generate_step(eng.new_session(), ids, make_sampler(), n))
    if got == want:
        return
    i = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
    at = dense.logits(dense.new_session(), ids + want[:i])[-1]
    gap = float(at[want[i]] - at[got[i]]) / float(at.std())
    assert gap < TIE, f"step {i}: {got[i]} where the reference's {want[i]} led by {gap:.3g}"


@pytest.mark.parametrize("kind", ["llama3", "mixtral"])
def test_decode_matches_prefill_and_chunks(lean_stores, monkeypatch, kind):
    """The C layer's decode step and numpy's prompt pass compute the same positions; a prompt
    in chunks (and a KV cache grown past its step) equals one pass."""
    eng = lean.load(lean_stores[kind], kv="f32")
    whole = eng.logits(eng.new_session(), IDS)
    s = eng.new_session()
    eng.prefill(s, IDS[:8])
    stepped = [eng.decode(s, t) for t in IDS[8:]]
    assert _spread(stepped, whole[8:]) < TOL
    assert np.argmax(stepped, -1).tolist() == np.argmax(whole[8:], -1).tolist()
    monkeypatch.setattr(lean, "CHUNK", 6)
    monkeypatch.setattr(kv_steps, "STEP", 4)
    s = eng.new_session()
    np.testing.assert_allclose(eng.prefill(s, IDS), whole[-1], rtol=0, atol=1e-4)
    assert s.caches[0].offset == len(IDS) and s.caches[0].k.shape[1] == 20


def test_q4_0_grid_runs_on_scales_alone(lean_stores):
    """A store whose q4k zeros are all 0 says so; the runtime then holds the scales alone (the
    kernel's symmetric form) and counts the bytes it saves before it loads."""
    grid, plain = Store(lean_stores["tied-grid"]), Store(lean_stores["tied"])
    assert grid.manifest["quantization"]["q4k_zeros"] is False
    assert plain.manifest["quantization"]["q4k_zeros"] is True
    eng = lean.LeanEngine(grid, 256)
    assert all(s.ndim == 2 for layer in eng.layers for f in (layer.attn, layer.ffn0)
               for _, s in f)
    assert all(s.ndim == 3 for layer in lean.LeanEngine(plain, 256).layers
               for _, s in layer.attn)
    assert eng.weight_bytes <= lean.weight_bytes(grid) < grid.weight_bytes
    assert lean.weight_bytes(plain) == plain.weight_bytes


def test_moe_stats_count_every_routed_use(lean_stores):
    """stats()["experts"]: per layer, one use per expert a prompt routes to and k per decoded
    token (as the expert cache counts under a budget), all hits."""
    eng = lean.load(lean_stores["mixtral"])
    s = eng.new_session()
    eng.prefill(s, IDS)
    prompt = eng.stats()["experts"]["hits"]
    assert all(2 <= n <= 4 for n in prompt)  # k to E experts routed to by 20 positions
    for t in (5, 6, 7, 8):
        eng.decode(s, t)
    e = eng.stats()["experts"]
    assert e["hits"] == [n + 2 * 4 for n in prompt] and e["misses"] == [0, 0]
    assert e["hit_rate"] == 1.0 and "experts" not in lean.load(lean_stores["tied"]).stats()
    for key in ("resident", "readahead_used", "readahead_unused", "demand_stalls"):  # README's
        assert len(e[key]) == 2, key  # example reads these as the expert cache reports them
    assert e["resident"] == [[0, 1, 2, 3]] * 2


@pytest.mark.parametrize("resident, direct", [(0, True), (2, True), (0, False)])
def test_streamed_clusters_match_resident_ones(lean_stores, monkeypatch, resident, direct):
    """FFN clusters read from the store each pass (prompt in chunks, then decode through the
    C layer's attention and the clusters 8 to a call) give the resident runtime's logits:
    the same int8 groups, summed in another order; read past the page cache (O_DIRECT, where
    the temporary directory's file system takes it) or through it."""
    monkeypatch.setattr(lean, "CHUNK", 7)
    ids = IDS * 2
    whole = lean.load(lean_stores["llama3"])
    if not direct:
        monkeypatch.delattr(lean.os, "O_DIRECT")
    part = lean.load(lean_stores["llama3"], resident=resident)
    n = part.store.n_clusters
    assert part.resident == resident and part.layers[0].streamed == n - resident
    if direct and part.stream.rd.direct < 0:
        pytest.skip("this file system takes no O_DIRECT reads")
    assert (part.stream.rd.direct >= 0) == direct
    np.testing.assert_allclose(part.logits(part.new_session(), ids),
                               whole.logits(whole.new_session(), ids), rtol=0, atol=1e-3)
    want = list(generate_step(whole.new_session(), ids, make_sampler(), 8))
    part.reset_stats()
    assert list(generate_step(part.new_session(), ids, make_sampler(), 8)) == want
    st = part.stats()
    record = sum(nb for _, _, nb in part.store.cluster_parts(0))
    passes = -(-len(ids) // 7) + 7  # prompt chunks, decode steps; the ring read up to
    # STREAM_SLOTS records before reset_stats
    assert st["store_bytes_read"] >= (2 * (n - resident) * passes - lean.STREAM_SLOTS) * record
    assert st["cache_hit_rate"] == resident / n


def test_stream_starts_again_after_a_pass_stopped_midway(lean_stores):
    """Ctrl-C in chat can stop a pass between two clusters: the next pass must not take the
    records still queued for the old one."""
    eng = lean.load(lean_stores["tied"], resident=1)
    ref = eng.logits(eng.new_session(), IDS)
    with eng.stream.next():
        pass  # one cluster taken, the pass abandoned
    assert eng.stream.pos != 0
    np.testing.assert_allclose(eng.logits(eng.new_session(), IDS), ref, rtol=0, atol=1e-5)


def test_moe_reads_the_experts_its_cache_does_not_hold(lean_stores, monkeypatch):
    """Under a budget of one token's routed set (2 of 4 experts per layer), routed misses are
    read whole and handed to the expert cache: the same logits as every expert resident, and
    the cache's counts move."""
    whole = lean.load(lean_stores["mixtral"])
    store = Store(lean_stores["mixtral"])
    one = lean.expert_bytes(store)
    part = lean.load(lean_stores["mixtral"], expert_budget=2 * 2 * one)
    assert len(part.experts.cache) == 4
    ids = IDS * 2
    np.testing.assert_allclose(part.logits(part.new_session(), ids),
                               whole.logits(whole.new_session(), ids), rtol=0, atol=1e-5)
    want = list(generate_step(whole.new_session(), ids, make_sampler(), 8))
    part.reset_stats()
    assert list(generate_step(part.new_session(), ids, make_sampler(), 8)) == want
    e = part.stats()["experts"]
    assert sum(e["misses"]) > 0 and sum(e["bytes_read"]) >= sum(e["demand_stalls"]) * one
    assert e["misses"] == [u + d for u, d in zip(e["readahead_used"], e["demand_stalls"])]
    assert 0 < e["hit_rate"] < 1 and all(len(r) <= 2 for r in e["resident"])
    monkeypatch.setattr(lean, "anon_bytes", lambda: 64 << 20)  # api.load picks such a budget
    least = lean.min_bytes(store, 2048, "f16")
    eng, _ = api.load(str(lean_stores["mixtral"]), ram=least + one)
    assert isinstance(eng, lean.LeanEngine) and eng.experts.cache is not None
    with pytest.raises(BudgetError, match="one token's routed experts"):
        api.load(str(lean_stores["mixtral"]), engine="lean", ram=least - 1)


def test_spans_read_past_the_page_cache_or_through_it(tmp_path):
    """Records.span: the bytes asked for, at any offset, past the page cache in whole blocks
    (up to a file end that is not on a block) or through it; a file cut short is an error."""
    from types import SimpleNamespace
    data = np.random.default_rng(0).integers(0, 256, 3 * lean.BLOCK + 1000, np.uint8)
    path = tmp_path / "data.bin"
    path.write_bytes(data.tobytes())
    rd = lean.Records.__new__(lean.Records)
    rd.store, rd.pool = SimpleNamespace(path=tmp_path), None
    rd.fd = os.open(path, os.O_RDONLY)
    try:
        rd.direct = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        rd.direct = -1
    buf = lean._aligned(2 * lean.BLOCK + 4 * lean.BLOCK, lean.BLOCK)
    for off, n in [(0, 10), (100, lean.BLOCK), (lean.BLOCK - 1, 2), (data.size - 300, 300)]:
        np.testing.assert_array_equal(rd.span(off, n, buf, "a span"), data[off:off + n])
    with pytest.raises(StoreError, match="a span is cut short"):
        rd.span(data.size - 10, 20, buf, "a span")
    rd.close()


def test_moe_reads_ahead_inside_its_budget(lean_stores, monkeypatch):
    """With a cut, a layer's likely experts are read while the layer before computes (layer
    0's from the token's embedding): the same tokens as every expert resident; each routed
    miss was read ahead or stalled on; each read ahead was routed or counted unused; the
    cache with its reads in flight never passes its budget. Without a cut (the default)
    nothing is read ahead."""
    whole = lean.load(lean_stores["mixtral"])
    one = lean.expert_bytes(Store(lean_stores["mixtral"]))
    part = lean.load(lean_stores["mixtral"], expert_budget=2 * 2 * one, expert_cut=0.0)
    cache, held = part.experts.cache, []
    for name in ("put", "reserve"):
        def counted(*a, f=getattr(cache, name), **k):
            out = f(*a, **k)
            held.append(cache.used_bytes + len(part.experts.inflight) * one)  # (read or not)
            return out
        monkeypatch.setattr(cache, name, counted)
    ids = IDS * 2
    want = list(generate_step(whole.new_session(), ids, make_sampler(), 12))
    part.reset_stats()
    assert list(generate_step(part.new_session(), ids, make_sampler(), 12)) == want
    e = part.stats()["experts"]
    assert sum(e["readahead_used"]) > 0 and sum(e["demand_stalls"]) > 0
    assert e["misses"] == [u + d for u, d in zip(e["readahead_used"], e["demand_stalls"])]
    assert e["readahead_read"] == [u + n for u, n in zip(e["readahead_used"],
                                                          e["readahead_unused"])]
    assert held and max(held) <= cache.budget_bytes and e["readahead_cut"] == 0.0
    off = lean.load(lean_stores["mixtral"], expert_budget=2 * 2 * one)
    assert list(generate_step(off.new_session(), ids, make_sampler(), 12)) == want
    e = off.stats()["experts"]
    assert sum(e["misses"]) > 0 and sum(e["readahead_read"]) == 0
    assert e["demand_stalls"] == e["misses"]


@pytest.mark.parametrize("direct", [True, False])
def test_moe_read_of_a_corrupt_expert_is_refused(lean_stores, tmp_path, monkeypatch, direct):
    """An expert read when routed (past the page cache, or through it) is checked against its
    records' checksums, on the reader thread: a flipped byte is a StoreError in the caller,
    not wrong logits."""
    if not direct:
        monkeypatch.delattr(lean.os, "O_DIRECT")
    import shutil
    from tiercache.store.format import cluster_key
    path = shutil.copytree(lean_stores["mixtral"], tmp_path / "m")
    store = Store(path)
    off, n = store.offsets([cluster_key(1, 3, 1).decode()])[cluster_key(1, 3, 1).decode()]
    store.close()
    with open(path / "lmdb" / "data.mdb", "r+b") as f:
        f.seek(off + n // 2)
        b = f.read(1)
        f.seek(off + n // 2)
        f.write(bytes([b[0] ^ 0x5A]))
    one = lean.expert_bytes(Store(path))
    eng = lean.load(path, expert_budget=2 * 2 * one)  # holds layer 0's: (1, 3) is read routed
    with pytest.raises(StoreError, match=r"f:0001:003:00001 is corrupt"):
        for _ in range(3):
            eng.logits(eng.new_session(), IDS * 2)


def test_f16_cache_against_f32(lean_stores):
    ids = IDS * 3
    a, b = (lean.load(lean_stores["tied"], kv=kv) for kv in ("f16", "f32"))
    assert a.new_session().caches[0].dtype == np.float16
    assert _spread(a.logits(a.new_session(), ids), b.logits(b.new_session(), ids)) < TOL


def test_session_reuses_its_prefix(lean_stores):
    """A second turn in the same session prefills only what is new and gives the tokens a
    fresh session gives."""
    eng = lean.load(lean_stores["tied"])
    s = eng.new_session()
    first = list(generate_step(s, IDS[:10], make_sampler(), 4))
    turn = IDS[:10] + first + IDS[10:14]
    fresh = list(generate_step(eng.new_session(), turn, make_sampler(), 6))
    assert list(generate_step(s, turn, make_sampler(), 6)) == fresh
    assert len(s.tokens) == len(turn) + 5


def test_load_chooses_lean_where_it_runs_and_fits(lean_stores, stores, monkeypatch):
    eng, _ = api.load(str(lean_stores["tied"]))
    assert isinstance(eng, lean.LeanEngine) and eng.stats()["engine"] == "lean"
    assert eng.resident == eng.store.n_clusters and eng.stream is None
    # this process's memory held still, and a ring of one record (the tiny model's FFN is
    # smaller than 32): budgets between "all but the FFN" and "all" stream some clusters
    monkeypatch.setattr(lean, "anon_bytes", lambda: 64 << 20)
    monkeypatch.setattr(lean, "STREAM_SLOTS", 1)
    store = Store(lean_stores["tied"])
    need, least = (f(store, 2048, "f16") for f in (lean.need_bytes, lean.min_bytes))
    one = store.args.num_hidden_layers * lean.cluster_bytes(store)
    assert need > least + 2 * one
    eng, _ = api.load(str(lean_stores["tied"]), ram=least + 2 * one)
    assert isinstance(eng, lean.LeanEngine) and eng.resident == 2 and eng.stream is not None
    with pytest.raises(BudgetError, match=r"needs \d+ MiB \(all but the FFN clusters, which "
                       r"stream, KV, runtime\), over --ram"):
        api.load(str(lean_stores["tied"]), engine="lean", ram=least - 1)
    # where neither engine fits, auto says both, and the context the lean runtime would fit
    small = lean.min_bytes(store, 1024, "f16")
    assert small < least
    with pytest.raises(BudgetError, match=r"too small for either engine: the lean runtime "
                       r"needs \d+ MiB .*; --context 1024 would fit; the tiered engine: .*needs"):
        api.load(str(lean_stores["tied"]), ram=small)
    assert not isinstance(api.load(str(lean_stores["tied"]), engine="tiered")[0],
                          lean.LeanEngine)
    f32 = stores("llama", "f32")
    assert not isinstance(api.load(str(f32))[0], lean.LeanEngine)
    with pytest.raises(TiercacheError, match="lean runtime does not run a f32 store"):
        api.load(str(f32), engine="lean")
    with pytest.raises(TiercacheError, match="outside the kernel's row blocks of 64"):
        api.load(str(stores("llama", "q4", 32)), engine="lean")
    with pytest.raises(TiercacheError, match="--sparse"):
        api.load(str(lean_stores["tied"]), engine="lean", sparse=True)


def test_a_lean_run_never_imports_torch(lean_stores):
    """The point of the runtime: chat's path (load, generate, stream) with torch out of the
    process, and memory that holds the weights and little else."""
    code = ("import sys, json; from tiercache import api; "
            f"e, t = api.load({str(lean_stores['tied'])!r}); "
            "text = api.generate(e, t, 'hello', max_tokens=8); "
            "print(json.dumps([type(e).__name__, 'torch' in sys.modules, "
            "sorted(m for m in sys.modules if m.split('.')[0] in ('onnxruntime', 'transformers'))]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1]) == ["LeanEngine", False, []]


def test_the_cli_on_the_lean_runtime_never_imports_torch(lean_stores):
    """`tiercache generate` (and chat, which loads the same way) and `eval` run the lean
    runtime with torch out of the process: the CLI's planner commands import the planner,
    whose cost model imports torch, only when they run (registering them at import put
    torch's ~142 MiB in every chat), and perplexity is numpy's."""
    text = Path(lean_stores["tied"]).parent / "eval.txt"
    text.write_text("hello there, general kenobi. " * 4)
    code = ("import sys; from tiercache.cli import app; "
            f"app(['generate', {str(lean_stores['tied'])!r}, '-p', 'hello', '-n', '4', "
            "'--engine', 'lean'], standalone_mode=False); "
            f"app(['eval', {str(lean_stores['tied'])!r}, '--text', {str(text)!r}, '--json', "
            "'--engine', 'lean'], standalone_mode=False); "
            "print('torch loaded:', 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "torch loaded: False", r.stdout


def test_samplers_in_numpy():
    logits = np.array([0.1, 3.0, 2.9, -1.0], np.float32)
    assert make_sampler()(logits) == 1 and make_sampler()(torch.from_numpy(logits)) == 1
    assert {make_sampler(temp=1.0, top_k=1, seed=s)(logits) for s in range(20)} == {1}
    assert {make_sampler(temp=1.0, top_p=0.3, seed=s)(logits) for s in range(20)} == {1}
    two = {make_sampler(temp=1.0, top_k=2, seed=s)(logits) for s in range(40)}
    assert two == {1, 2}
    draws = [make_sampler(temp=1.0, seed=7)(logits) for _ in range(3)]
    assert len(set(draws)) == 1  # one seed, one draw


def test_one_row_routing_picks_as_the_batch_routing_does():
    """Layer.route1 (decode's one row, in Python floats) gives route's experts in its order,
    ties to the lower id, and its weights."""
    layer = lean.Layer.__new__(lean.Layer)
    rng = np.random.default_rng(0)
    layer.router, layer.top_k = rng.standard_normal((8, 64)).astype(np.float32), 2
    rows = list(rng.standard_normal((50, 64)).astype(np.float32))
    layer.router[5] = layer.router[2]  # experts 2 and 5 tie on every row
    rows.append(np.linalg.lstsq(layer.router.astype(np.float64), np.eye(8)[2] * 9, rcond=None)[0]
                .astype(np.float32))
    for h in rows:
        w, idx = layer.route(h[None])
        w1, ids = layer.route1(h)
        assert ids == idx[0].tolist()
        np.testing.assert_allclose(w1, w[0], rtol=1e-5)
    assert ids == [2, 5]


def test_the_planner_counts_the_lean_runtime_with_its_own_functions(lean_stores):
    """planner.lean_fit: what the lean runtime does within a budget, from the manifest alone
    and the lean process's runtime: its own sizing functions' answers (streamed clusters,
    experts held), monotone in the budget; none for a store it does not take. A plan whose
    tiered engine does not fit says when the lean runtime does."""
    from planner.lean_fit import lean_fit
    from planner.search import make_plan
    for kind in ("tied", "mixtral"):
        store = Store(lean_stores[kind])
        fit = lean_fit(store.manifest, None, 256)
        least, need, run = fit["least_bytes"], fit["need_bytes"], fit["runtime_bytes"]
        assert least == min(lean.min_bytes(store, 256, "f16", run), need)
        assert fit["fits"] and not lean_fit(store.manifest, least - 1, 256)["fits"]
        last = -1
        for ram in sorted({least, (least + need) // 2, need, need + (1 << 20)}):
            f = lean_fit(store.manifest, ram, 256)
            if kind == "mixtral":
                held = f["expert_bytes"]  # all where everything fits, else the budget
                assert held == (f["all_expert_bytes"] if ram >= need
                                else lean.expert_budget(store, 256, "f16", ram, run))
            else:
                held = f["resident_clusters"]
                assert held == lean.resident_clusters(store, 256, "f16", ram, run)
                record = store.records[lean.cluster_key(0, 0, 0).decode()][0]
                assert f["streamed_bytes_per_token"] == (
                    store.args.num_hidden_layers * (f["n_clusters"] - held) * record)
            assert held >= last
            last = held
        assert last == (f["all_expert_bytes"] if kind == "mixtral" else f["n_clusters"])
    assert lean_fit({**store.manifest, "dtype": "q8"}, None) is None
    # speed with a device profile: the weights a token touches at the kernel's share of the
    # RAM rate, or the reads where they take longer; never faster with less RAM
    from planner.lean_fit import LEAN_KERNEL_SHARE, LEAN_LAYER_S
    from planner.profiles import preset
    dev = preset("laptop-8gb-nvme")
    store = Store(lean_stores["tied"])
    a, f = store.args, lean_fit(store.manifest, None, 256, dev=dev)
    want = lean.weight_bytes(store) / (LEAN_KERNEL_SHARE * dev.memory_bw) \
        + a.num_hidden_layers * LEAN_LAYER_S
    assert f["decode_tok_s"] == pytest.approx(1 / want) and f["read_bytes_per_token"] == 0
    for kind in ("tied", "mixtral"):
        m = Store(lean_stores[kind]).manifest
        every = lean_fit(m, None, 256)
        rams = list(range(every["least_bytes"], every["need_bytes"], 1 << 18))
        fits = [lean_fit(m, r, 256, dev=dev) for r in rams + [every["need_bytes"]]]
        speeds = [x["decode_tok_s"] for x in fits]
        assert speeds == sorted(speeds) and all(x["read_bytes_per_token"] >= 0 for x in fits)
        assert fits[-1]["read_bytes_per_token"] == 0
    ram = lean_fit(Store(lean_stores["tied"]).manifest, None, 256)["least_bytes"] + (1 << 20)
    with pytest.raises(BudgetError, match="runs this store on the lean runtime"):
        make_plan(str(lean_stores["tied"]), "laptop-8gb-nvme", ram=ram, context=256)


def test_a_plan_that_runs_on_the_lean_runtime_gives_it_the_plans_budget(lean_stores, tmp_path):
    """A plan whose lean figure beats the tiered engine's says it runs on the lean runtime,
    and `--plan` loads that runtime within the plan's RAM and context; a plan of the tiered
    engine (here: asked for by --engine tiered) still loads the tiered engine's regions."""
    import json
    from planner.search import make_plan
    path = lean_stores["tied"]
    plan = make_plan(str(path), "laptop-8gb-nvme", ram="1G", context=256)
    assert plan["runs"] == "lean" and plan["lean"]["fits"]
    assert plan["lean"]["decode_tok_s"] >= plan["predicted"]["decode_tok_s"]
    f = tmp_path / "plan.json"
    f.write_text(json.dumps(plan))
    eng, _ = api.load(str(path), plan=str(f))
    assert isinstance(eng, lean.LeanEngine) and eng.context == 256
    tiered, _ = api.load(str(path), plan=str(f), engine="tiered")
    assert not isinstance(tiered, lean.LeanEngine)
    every = tiered.args.num_hidden_layers * tiered.n_clusters
    assert tiered.budget.hot_slots == min(plan["engine"]["hot_clusters"], every)
    assert tiered.cfg.context == plan["engine"]["context"] == 256
