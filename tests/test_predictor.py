"""Activation predictors for ReLU-family models: trained by the profile, picking clusters at
decode without a pinned gate, and reading the next layer's clusters ahead."""
import math

import pytest
import torch

from tiercache.engine import generate_step, make_sampler
from tiercache.engine.predictor import predictor_key
from tiercache.engine.tiered import TierConfig, load_tiered
from tiercache.store.format import Store

PROMPT = list(range(3, 20))


@pytest.fixture(scope="module")
def relu_store(tmp_path_factory):
    from conftest import build_sparse_relu
    from tiercache.profile import profile_store
    from tiercache.store.convert import convert
    root = tmp_path_factory.mktemp("relu")
    build_sparse_relu(root / "hf")
    out = convert(root / "hf", root / "s", dtype="f32", cluster_size=16, progress=False)
    ids = torch.randint(3, 250, (1500,), generator=torch.Generator().manual_seed(0)).tolist()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops: two threads on two busy cores only wait on each other
    try:
        # budget 0: the model's own ReLU sparsity, no neuron skipped beyond it
        prof = profile_store(out, ids, budget=0.0, chunk=100, progress=False)
    finally:
        torch.set_num_threads(threads)
    return out, prof


@torch.inference_mode()
def _decode_logits(eng, tokens):
    s = eng.new_session()
    eng.prefill(s, PROMPT)
    return torch.stack([eng.decode(s, t) for t in tokens])


def test_profile_trains_predictors_with_their_recall(relu_store):
    out, prof = relu_store
    store = Store(out)
    p = store.manifest["profile"]["predictor"]
    assert p == prof["predictor"] and p["rank"] == 16  # min(d, F) / 4
    assert p["clusters_predicted"] < 0.6  # sparse: not every cluster
    for l, row in enumerate(prof["ffn"]):
        s = row[0]["predictor"]
        assert s["recall"] >= 0.95, s  # held-out tokens, cut set for 0.99 on the rest
        # recall under 1 may leave a few active clusters out; most are predicted
        assert s["cluster_recall"] >= 0.9, s
        assert 0.9 * s["clusters_active"] <= s["clusters_predicted"] < 0.9, s
        if l:  # layer l's predictor on layer l - 1's input: what decode reads ahead by
            assert s["lookahead_cluster_recall"] >= 0.8, s
        assert predictor_key(l, 0).decode() in store.records


def test_predictor_mode_picks_clusters_without_a_pinned_gate(relu_store):
    """With every cluster picked (cut -inf) the predictor path equals gate mode (exact
    selection by the pinned gate) token for token; with the trained cut it reads less and
    stays close, missing only the few active clusters the predictor did not predict."""
    out, _ = relu_store
    regions = dict(hot_clusters=4, cold_clusters=32)
    gate = load_tiered(Store(out), TierConfig(select="gate", **regions))
    tokens = list(generate_step(gate.new_session(), PROMPT, make_sampler(), 24))
    ref = _decode_logits(gate, tokens)

    every = load_tiered(Store(out), TierConfig(**regions))
    assert every.mode == "predictor" and not every.clusters.pinned_gate
    assert not every.clusters.gates
    assert every.budget.gates < gate.budget.gates  # predictors are smaller than the gates
    for p in every.clusters.predictors.values():
        p.cut = -math.inf
    got = _decode_logits(every, tokens)
    assert (got - ref).abs().max() < 1e-4

    pred = load_tiered(Store(out), TierConfig(**regions))
    got = _decode_logits(pred, tokens)
    rel = (got - ref).abs().max() / ref.std()
    assert rel < 0.3, f"max diff {rel:.3g} x std"
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    read = pred.stats()["store_bytes_read"]
    assert 0 < read < 0.8 * every.stats()["store_bytes_read"]


def test_next_layer_is_read_ahead_by_prediction(relu_store):
    """At decode, layer l + 1's clusters predicted from layer l's input are read while layer l
    computes (and those already cached are kept from eviction): most misses are in flight
    when needed. The cold region holds one layer's clusters, fewer than a token touches."""
    out, _ = relu_store
    tokens = torch.randint(3, 250, (48,), generator=torch.Generator().manual_seed(5)).tolist()

    @torch.inference_mode()
    def decode_stats(cfg, by_last_token=False):
        eng = load_tiered(Store(out), cfg)
        if by_last_token:  # read ahead what the layer used at the previous token instead
            ffn = eng.clusters
            prefetch, preds = ffn._prefetch, ffn.predictors

            def last_token(*args):
                ffn.predictors = {}
                try:
                    prefetch(*args)
                finally:
                    ffn.predictors = preds
            ffn._prefetch = last_token
        s = eng.new_session()
        eng.prefill(s, PROMPT)
        eng.reset_stats()
        for t in tokens:
            eng.decode(s, t)
        return eng.stats()

    regions = dict(hot_clusters=0, cold_clusters=16)  # one layer's clusters
    off = decode_stats(TierConfig(prefetch=False, **regions))
    on = decode_stats(TierConfig(**regions))
    last = decode_stats(TierConfig(**regions), by_last_token=True)
    assert off["read_ahead_hits"] == 0 and off["demand_reads"] > 0
    misses = on["read_ahead_hits"] + on["demand_reads"]
    assert misses > 0 and on["read_ahead_hits"] >= 0.5 * misses, on
    assert on["demand_reads"] <= 0.5 * off["demand_reads"], (on, off)
    assert on["demand_reads"] < last["demand_reads"], (on, last)
    assert on["prefetch_unused"] < on["prefetched"], on


def test_moe_experts_are_read_ahead_by_the_next_router(stores):
    """Mixtral with every expert streamed: at decode the next layer's router, applied to this
    layer's input, picks experts to read while this layer computes; logits are unchanged."""
    from tiercache.engine import load_dense
    store = stores("mixtral", "f32")
    tokens = list(range(40, 64))
    dense = load_dense(Store(store))
    ref = _decode_logits(dense, tokens)

    def run(prefetch):
        eng = load_tiered(Store(store), TierConfig(sparse=False, hot_clusters=0, cold_clusters=0,
                                                   prefetch=prefetch, kv="f32"))
        s = eng.new_session()
        with torch.inference_mode():
            eng.prefill(s, PROMPT)
            eng.reset_stats()
            got = torch.stack([eng.decode(s, t) for t in tokens])
        return got, eng.stats(), eng

    got, on, eng = run(True)
    assert (got - ref).abs().max() < 1e-4
    _, off, _ = run(False)
    assert off["read_ahead_hits"] == 0 and off["prefetched"] == 0 and off["demand_reads"] > 0
    layers = eng.args.num_hidden_layers
    assert on["prefetched"] > 0 and on["read_ahead_hits"] > 0, on
    # layer 0's experts are never read ahead; the later layers' mostly are
    assert on["demand_reads"] < off["demand_reads"] * (1 + 0.5 * (layers - 1)) / layers, (on, off)
    k = eng.args.num_experts_per_tok
    assert len(eng.clusters.inflight) <= k  # the last layer's k; stale reads ahead were let go


def test_generate_json_reports_the_mode_and_read_ahead(relu_store):
    import json
    import subprocess
    import sys
    out, _ = relu_store
    r = subprocess.run([sys.executable, "-m", "tiercache", "generate", str(out), "-p", "ab cd",
                        "-n", "6", "--no-chat-template", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["mode"] == "predictor" and report["sparse"] is True
    assert {"read_ahead_hits", "demand_reads", "prefetched", "prefetch_unused"} <= set(report)
