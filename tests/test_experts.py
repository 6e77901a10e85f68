"""MoE experts in the tiered engine: whole experts kept in the expert cache, the next router's
read-ahead and its counters, and stats()["experts"] (tiny Mixtral: 2 layers, 4 experts top-2)."""
import pytest
import torch

from tiercache.engine import load_dense
from tiercache.engine.tiered import TierConfig, load_tiered
from tiercache.store.format import Store

PROMPT = list(range(3, 20))
TOKENS = list(range(40, 64))
FIELDS = {"policy", "budget_bytes", "used_bytes", "hits", "misses", "bytes_read", "resident",
          "pinned", "evictions", "hit_rate", "readahead_read", "readahead_used",
          "readahead_unused", "demand_stalls", "readahead_cut"}


@torch.inference_mode()
def _run(store, **cfg):
    # KV in f32, as the dense reference keeps it: this checks the experts, not the f16 cache
    eng = load_tiered(Store(store), TierConfig(sparse=False, kv="f32", **cfg))
    s = eng.new_session()
    eng.prefill(s, PROMPT)
    eng.reset_stats()
    logits = torch.stack([eng.decode(s, t) for t in TOKENS])
    return logits, eng.stats(), eng


@pytest.fixture(scope="module")
def mixtral(stores):
    store = stores("mixtral", "f32")
    return store, _decode_logits_dense(store)


@torch.inference_mode()
def _decode_logits_dense(store):
    eng = load_dense(Store(store))
    s = eng.new_session()
    eng.prefill(s, PROMPT)
    return torch.stack([eng.decode(s, t) for t in TOKENS])


def _uses(eng) -> int:  # decode: top-2 distinct experts per layer and token
    return eng.args.num_experts_per_tok * eng.args.num_hidden_layers * len(TOKENS)


def test_stats_fields_with_every_expert_resident(mixtral):
    store, ref = mixtral
    got, st, eng = _run(store)
    e = st["experts"]
    assert FIELDS <= set(e) and (got - ref).abs().max() < 1e-4
    assert sum(e["misses"]) == 0 and sum(e["hits"]) == _uses(eng) and e["hit_rate"] == 1.0
    assert e["resident"] == [list(range(eng.args.n_experts))] * eng.args.num_hidden_layers
    assert sum(e["bytes_read"]) == 0 == st["store_bytes_read"]


def test_expert_cache_keeps_experts_and_counts_each_use(mixtral):
    """A cache of 4 of the 8 experts: hits + misses = routed uses, every miss reads one whole
    expert, fewer store bytes than with no cache, logits unchanged, the budget held."""
    store, ref = mixtral
    _, none, eng = _run(store, hot_clusters=0, cold_clusters=0)
    one = none["experts"]["bytes_read"][0] // none["experts"]["misses"][0]
    got, st, eng = _run(store, hot_clusters=0, cold_clusters=0, expert_cache_bytes=4 * one,
                        experts="lru")
    e = st["experts"]
    assert (got - ref).abs().max() < 1e-4
    assert sum(e["hits"]) + sum(e["misses"]) == _uses(eng)
    assert sum(none["experts"]["misses"]) == _uses(eng)  # no cache: every use reads
    assert sum(e["hits"]) > 0 and e["bytes_read"] == [m * one for m in e["misses"]]
    assert st["store_bytes_read"] < none["store_bytes_read"]
    assert st["cache_hit_rate"] == pytest.approx(e["hit_rate"])  # the clusters of those experts
    assert e["used_bytes"] <= e["budget_bytes"] == 4 * one
    assert sum(map(len, e["resident"])) == 4 and e["policy"] == "lru"
    assert st["regions"]["experts"] == 4 * one


def test_read_ahead_counters_move_with_the_router_cut(mixtral):
    """No cache, every expert streamed: layer 0 is never read ahead; for the later layers each
    expert read ahead is used or let go, and a cut above every probability reads none ahead."""
    store, ref = mixtral
    got, on, eng = _run(store, hot_clusters=0, cold_clusters=0)
    _, cut, _ = _run(store, hot_clusters=0, cold_clusters=0, expert_cut=1.01)
    _, off, _ = _run(store, hot_clusters=0, cold_clusters=0, prefetch=False)
    e, c, o = on["experts"], cut["experts"], off["experts"]
    assert (got - ref).abs().max() < 1e-4
    assert e["readahead_read"][0] == 0 and e["demand_stalls"][0] == e["misses"][0]
    for l in range(eng.args.num_hidden_layers):
        assert e["readahead_read"][l] == e["readahead_used"][l] + e["readahead_unused"][l]
        assert e["readahead_used"][l] + e["demand_stalls"][l] == e["misses"][l]
    assert sum(e["readahead_used"]) > 0 and sum(e["demand_stalls"]) < sum(o["demand_stalls"])
    assert sum(c["readahead_read"]) == 0 == sum(o["readahead_read"])
    assert c["demand_stalls"] == c["misses"] and o["demand_stalls"] == o["misses"]
    assert on["read_ahead_hits"] == sum(e["readahead_used"]) * eng.n_clusters


def test_small_budget_pins_the_prompts_hottest_experts(mixtral):
    """Fewer cached experts than one token routes (k x layers): an LRU would cycle, so the
    engine pins the experts the prompt routed to most (measured: tools/expert_trace.py)."""
    store, ref = mixtral
    _, none, eng = _run(store, hot_clusters=0, cold_clusters=0)
    one = none["experts"]["bytes_read"][0] // none["experts"]["misses"][0]
    got, st, eng = _run(store, hot_clusters=0, cold_clusters=0, expert_cache_bytes=3 * one)
    e = st["experts"]
    assert (got - ref).abs().max() < 1e-4
    assert e["policy"] == "freq+lru" and sum(map(len, e["pinned"])) == 3
    assert sum(e["hits"]) + sum(e["misses"]) == _uses(eng) and sum(e["hits"]) > 0
    assert e["evictions"] == [0, 0] and e["used_bytes"] <= e["budget_bytes"]


def test_api_load_reports_experts(stores):
    from tiercache import api
    eng, tok = api.load(str(stores("mixtral", "f32")), threads=1)
    text = api.generate(eng, tok, "hello", max_tokens=4, chat_template=False)
    assert isinstance(text, str)
    e = eng.stats()["experts"]
    assert FIELDS <= set(e) and sum(e["misses"]) == 0 and sum(e["hits"]) > 0


def test_generate_json_reports_experts_and_refuses_a_bad_policy(stores):
    import json
    import subprocess
    import sys
    store = str(stores("mixtral", "f32"))
    base = [sys.executable, "-m", "tiercache", "generate", store, "-p", "ab cd", "-n", "4",
            "--no-chat-template", "--json", "--threads", "1"]
    r = subprocess.run(base + ["--experts", "lru", "--expert-cut", "0.1"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    e = json.loads(r.stdout.strip().splitlines()[-1])["experts"]
    assert e["readahead_cut"] == 0.1 and FIELDS <= set(e)
    r = subprocess.run(base + ["--experts", "fifo"], capture_output=True, text=True)
    assert r.returncode != 0 and "lru, freq+lru" in r.stderr and "Traceback" not in r.stderr


def test_under_a_ram_budget_experts_take_the_room_pinned_clusters_took(stores):
    """--ram below the whole model: no clusters pinned in layer order; the room is the expert
    cache's (Budget.experts), the same bytes in all."""
    from planner.accounting import plan_budget
    m = Store(stores("mixtral", "f32")).manifest
    everything = plan_budget(m, TierConfig(sparse=False), runtime=0)
    ram = everything.total - 1  # just short of everything resident
    b = plan_budget(m, TierConfig(sparse=False, ram_bytes=ram), runtime=0)
    assert b.hot_slots == 0 and 0 < b.experts < everything.hot_slots * everything.slot_bytes
    assert b.total <= ram and b.streaming > 0
    assert b.lines()["experts"] == b.experts


@pytest.mark.parametrize("command", [["chat", "--quiet"], ["eval", "--text", "README.md"]])
def test_chat_and_eval_take_the_expert_flags(stores, command):
    """The same --experts/--expert-cut as generate: a good policy runs, a bad one is refused
    in one line."""
    import subprocess
    import sys
    from pathlib import Path
    store = str(stores("mixtral", "f32"))
    readme = str(Path(__file__).parents[1] / "README.md")
    args = [a if a != "README.md" else readme for a in command]
    base = [sys.executable, "-m", "tiercache", args[0], store, *args[1:], "--threads", "1"]
    if args[0] == "chat":
        base += ["-n", "2", "hello"]
    else:
        base += ["--max-tokens", "40", "--chunk", "20"]
    r = subprocess.run(base + ["--experts", "freq+lru", "--expert-cut", "0.05"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(base + ["--experts", "fifo"], capture_output=True, text=True)
    assert r.returncode != 0 and "lru, freq+lru" in r.stderr and "Traceback" not in r.stderr



@pytest.fixture(scope="module")
def mixtral_q4(tmp_path_factory):
    """A tiny Mixtral whose FFNs fit the int4 kernels' layout (q4k: clusters of 64 neurons,
    F a multiple of 64; the shared tiny Mixtral's F of 96 keeps torch's q4)."""
    import transformers as T
    from conftest import VOCAB, save_random
    from tiercache.store.convert import convert
    root = tmp_path_factory.mktemp("mixtral-q4")
    save_random(T.MixtralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, num_local_experts=4,
                                num_experts_per_tok=2), root / "hf")
    return convert(root / "hf", root / "q4", dtype="q4", cluster_size=64, progress=False)


def test_q4_experts_on_matmulnbits_match_dense(mixtral_q4):
    """Every expert resident on ONNX Runtime's MatMulNBits: each layer after attention is one
    ORT call (nbits.NBitsTail: o_proj, residual, norm, router, top-k, the routed experts on
    their rows, residual), at prefill and at decode. Logits stay near the dense reference on
    the same q4 store (MatMulNBits quantizes activations to int8 per group of 32: measured
    max 0.03 x std at decode), greedy picks agree, and every routed use counts as a hit."""
    from tiercache.engine import nbits
    if not nbits.available():
        pytest.skip("onnxruntime's MatMulNBits is not installed or does not verify here")
    ref = _decode_logits_dense(mixtral_q4)
    got, st, eng = _run(mixtral_q4, compute="nbits")  # "auto" takes it where VNNI is missing
    layers = eng.args.num_hidden_layers
    assert st["pinned_kernel"] == "ort-nbits" and set(eng.clusters.tails) == set(range(layers))
    assert all(layer.self_attn.o_proj is None for layer in eng.model.model.layers)
    diff = (got - ref).abs() / ref.std()
    assert diff.max() < 0.1, f"max {diff.max():.3g} mean {diff.mean():.3g} x std"
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    dense = load_dense(Store(mixtral_q4))  # the prompt's rows through the tails (T > 1)
    prompt = eng.logits(eng.new_session(), PROMPT)
    want = dense.logits(dense.new_session(), PROMPT)
    diff = (prompt - want).abs() / want.std()
    assert diff.max() < 0.1, f"prompt: max {diff.max():.3g} mean {diff.mean():.3g} x std"
    e = st["experts"]
    assert sum(e["misses"]) == 0 and sum(e["hits"]) == _uses(eng)


def test_q4_store_with_torch_q4_experts_matches_dense(stores):
    """The shared tiny Mixtral in q4: its FFN stays in torch's q4 (F 96 is no q4k layout) and
    its untied q8r embedding has no int kernel module: the engine reads it as floats (it used
    to crash on a missing module)."""
    store = stores("mixtral", "q4")
    ref = _decode_logits_dense(store)
    got, _, _ = _run(store)
    assert (got - ref).abs().max() < 1e-4 * ref.std()  # the same kernels: measured 0


def test_q4_experts_part_on_matmulnbits_match_dense(mixtral_q4, monkeypatch):
    """A RAM budget that holds every expert but only part of MatMulNBits' packing: the first
    layer runs as one tail on it, the other on torch's kernels and the expert path (MoE used
    to stay all or nothing, 8 sessions a layer; a tail is one, counted as a dense layer's).
    Logits near the dense reference, every routed use still a hit. The process's measured
    runtime is fixed here: this model's layers cost KBs of packing, less than its noise."""
    from tiercache.engine import nbits
    from tiercache.engine.tiered import TieredEngine
    if not nbits.available():
        pytest.skip("onnxruntime's MatMulNBits is not installed or does not verify here")
    runtime = 300 << 20
    monkeypatch.setattr(TieredEngine, "_runtime_bytes", lambda self: runtime)
    full = load_tiered(Store(mixtral_q4),
                       TierConfig(sparse=False, kv="f32", compute="nbits")).budget
    fixed = nbits.WORKSPACE  # the packing's transient (this model's layers are far smaller)
    # every weight, the transient and half of what the 2 layers and the head would pack:
    # layer 0 (the larger part) fits, layer 1 does not
    ram = full.total - full.prepacked + fixed + (full.prepacked - fixed) // 2  # runtime in it
    ref = _decode_logits_dense(mixtral_q4)
    got, st, eng = _run(mixtral_q4, ram_bytes=ram, compute="nbits")
    b = eng.budget
    assert b.nbits_layers == frozenset({0}) and not b.nbits_head and b.streaming == 0
    assert st["pinned_kernel"] == "ort-nbits for 1 of 2 layers" and set(eng.clusters.tails) == {0}
    diff = (got - ref).abs() / ref.std()
    assert diff.max() < 0.1, f"max {diff.max():.3g} mean {diff.mean():.3g} x std"
    e = st["experts"]
    assert sum(e["misses"]) == 0 and sum(e["hits"]) == _uses(eng)
