"""The VRAM tier (layout.py `_vram_split`, engine/vram.py): placement for given capacities
without a GPU, and the engine with layers and the head in VRAM against the dense reference.
Where there is no CUDA GPU the VRAM device is stood in by the CPU (TierConfig.vram_device): the
placement, the weights' way from the store and the model's wiring run as on a GPU; the
GPU-marked test runs on CUDA where there is one."""
import pytest
import torch

from test_layout import _place
from test_planner import v3_manifest
from tiercache.engine import load_dense
from tiercache.engine.vram import StaticKV
from tiercache.engine.layout import MB, VRAM_SLACK
from tiercache.engine.tiered import TierConfig, load_tiered
from tiercache.errors import BudgetError, TiercacheError
from tiercache.store.format import Store

IDS = list(range(3, 40))
CUDA = torch.cuda.is_available()


def _vram_layout(vram: int, **cfg):
    return _place(v3_manifest(), vram=vram, **cfg)


def test_vram_takes_the_head_then_whole_layers_in_order():
    """More VRAM never places less there: the head first, then layers 0, 1, ... whole; what
    is there is neither pinned in RAM for ORT nor streamed, and is computed on the GPU."""
    every = _vram_layout(64 << 30)
    assert every.budget.vram_head and every.budget.vram_layers == frozenset(range(8))
    assert every.units == () and not every.budget.nbits_layers
    full, last = every.vram, (frozenset(), False)
    for vram in [0, VRAM_SLACK, VRAM_SLACK + 1 * MB] + [VRAM_SLACK + full * k // 9
                                                          for k in range(1, 10)]:
        lay = _vram_layout(vram)
        b = lay.budget
        assert lay.vram <= max(0, vram - VRAM_SLACK)
        assert b.vram_layers == frozenset(range(len(b.vram_layers)))  # a prefix
        assert b.vram_layers >= last[0] and b.vram_head >= last[1]     # monotone
        assert not b.vram_layers or b.vram_head                        # the head first
        last = (b.vram_layers, b.vram_head)
        for l in range(8):
            where = lay.where(("attn", l))
            assert (where == "vram") == (l in b.vram_layers) == (lay.where((l, 0, 3)) == "vram")
            assert lay.computed_on(("attn", l)) == ("gpu" if where == "vram" else "cpu")
        assert lay.where("head") == ("vram" if b.vram_head else "ram")
    assert last == (frozenset(range(8)), True)


def test_vram_layers_do_not_stream():
    """Under regions that stream every layer, a layer in VRAM is read once at load, not per
    token: no streamed unit is left for it, nor for the head."""
    lay = _vram_layout(0, hot_clusters=0, cold_clusters=0, pin_attention=0, pin_head=False)
    assert {u.layer for u in lay.units if u.layer is not None} == set(range(8))
    every = _vram_layout(64 << 30)
    half = _vram_layout(VRAM_SLACK + every.vram // 2, hot_clusters=0, cold_clusters=0,
                        pin_attention=0, pin_head=False)
    b = half.budget
    assert 0 < len(b.vram_layers) < 8 and b.vram_head
    assert {u.layer for u in half.units} == set(range(8)) - b.vram_layers  # no head slices


def test_ram_counts_only_what_stays_on_the_cpu():
    """VRAM is placed first: the RAM regions lose each VRAM layer's attention, clusters, gates
    and KV cache (and an untied head in VRAM), so a --ram that is refused with every layer on
    the CPU fits with some in VRAM; the hot order holds only the RAM layers' clusters."""
    every = _vram_layout(64 << 30).vram
    lines = []
    for k in range(0, 10, 3):
        lay = _vram_layout(VRAM_SLACK + every * k // 9 if k else 0)
        b = lay.budget
        ram = set(range(8)) - b.vram_layers
        assert {key[0] for key in lay.hot_order} == ram and b.hot_slots == len(lay.hot_order)
        assert set(lay.stream_attn) == ram
        lines.append(b.lines())
    for a, b in zip(lines, lines[1:]):
        for k in ("attention", "kv", "gates", "fixed"):
            assert b[k] <= a[k], (k, a, b)
        assert b["hot"] < a["hot"] or b["hot"] == 0
    assert lines[-1]["hot"] == lines[-1]["kv"] == lines[-1]["attention"] == 0
    b = _vram_layout(0).budget  # everything resident on the CPU
    ram = b.total - (b.attention + b.kv + b.gates + b.hot_slots * b.slot_bytes) // 3
    with pytest.raises(BudgetError, match="too small"):
        _place(v3_manifest(), ram=ram, hot_clusters=128, cold_clusters=0)
    half = _place(v3_manifest(), vram=VRAM_SLACK + every * 2 // 3, ram=ram, hot_clusters=128,
                  cold_clusters=0)
    assert len(half.budget.vram_layers) >= 4 and half.budget.total <= ram


@pytest.fixture(scope="module")
def q4_llama(tmp_path_factory):
    """A tiny Llama whose FFN takes the int4 kernels' layout (F a multiple of 64)."""
    import transformers as T
    from conftest import VOCAB, save_random
    from tiercache.store.convert import convert
    root = tmp_path_factory.mktemp("vram")
    save_random(T.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                              tie_word_embeddings=True), root / "hf")
    return convert(root / "hf", root / "q4", dtype="q4", cluster_size=64, progress=False)


def _device() -> str:
    return "cuda" if CUDA else "cpu"


def _engine(store, vram: int, **cfg):
    return load_tiered(Store(store), TierConfig(sparse=False, kv="f32", context=128,
                                                vram_bytes=vram, vram_device=_device(), **cfg))


def _vram_for(store, layers: int) -> int:
    """VRAM for the head and `layers` of the store's (equal) layers."""
    every = _engine(store, 64 << 30).layout
    n = len(every.budget.vram_layers)
    head = every.vram - n * ((every.vram - _head_bytes(store)) // n)
    return VRAM_SLACK + head + layers * ((every.vram - head) // n)


def _head_bytes(store) -> int:
    import math
    s = Store(store)
    name = "lm_head.weight" if "lm_head.weight" in s.manifest["tensors"] else \
        "model.embed_tokens.weight"
    return 2 * math.prod(s.manifest["tensors"][name]["shape"])


@pytest.mark.parametrize("layers", [0, 2, 4])
def test_layers_in_vram_match_dense(q4_llama, layers):
    """The head and the first `layers` layers in VRAM, the rest resident on the CPU's
    kernels (int4, MatMulNBits where it verifies): logits near the dense reference on the
    same q4 store, the same greedy picks."""
    dense = load_dense(Store(q4_llama))
    want = dense.logits(dense.new_session(), IDS)
    eng = _engine(q4_llama, _vram_for(q4_llama, layers))
    b = eng.budget
    assert b.vram_head and b.vram_layers == frozenset(range(layers))
    assert not (b.nbits_layers & b.vram_layers)
    v = eng.stats()["vram"]
    assert v["layers"] == list(range(layers)) and v["head"] and v["bytes"] == eng.layout.vram
    got = eng.logits(eng.new_session(), IDS)
    diff = (got - want).abs() / want.std()
    assert diff.max() < 0.1, f"max {diff.max():.3g} mean {diff.mean():.3g} x std"
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("layers", [2, 4])
def test_vram_decode_runs_the_static_step(q4_llama, layers):
    """Decode through the VRAM layers' static step (vram.DecodeRun: captured as a CUDA graph
    on a GPU, run eagerly on the CPU standing in), then the CPU's layers, or (all in VRAM)
    with the head in it: logits near the dense reference's decode, the same greedy picks; and
    after a turn is cut back, the positions past the kept prefix are masked, not read."""
    def run(e, prompt, steps):
        s = e.new_session()
        e.prefill(s, prompt)
        out = [e.decode(s, t) for t in steps]
        s.reuse_prefix(prompt + steps[:3] + [9, 11])  # cut back to 11 positions, then on
        out += [e.decode(s, t) for t in [9, 11, 13]]
        return torch.stack(out), s
    dense = load_dense(Store(q4_llama))
    want, _ = run(dense, IDS[:8], IDS[8:24])
    eng = _engine(q4_llama, _vram_for(q4_llama, layers))
    assert eng.decode_run is not None and eng.decode_run.head == (layers == 4)
    got, s = run(eng, IDS[:8], IDS[8:24])
    diff = (got - want).abs() / want.std()  # float16 in VRAM
    assert diff.max() < 0.1, f"max {diff.max():.3g} mean {diff.mean():.3g} x std"
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9
    assert [c.offset for c in s.caches] == [14] * 4 and len(s.tokens) == 14
    assert isinstance(s.caches[0], StaticKV) and (s.caches[0].graph is not None) == CUDA


def test_vram_layers_beside_streamed_ones_read_nothing_per_token(q4_llama):
    """Under a RAM plan that streams every CPU layer, the VRAM layers cost no reads: the
    store bytes per decoded token fall with the layers in VRAM; logits match dense."""
    dense = load_dense(Store(q4_llama))
    s = dense.new_session()
    dense.prefill(s, IDS[:8])
    want = torch.stack([dense.decode(s, t) for t in IDS[8:16]])
    per_token = []
    for layers in (0, 2):
        eng = _engine(q4_llama, _vram_for(q4_llama, layers) if layers else 0, hot_clusters=0,
                      cold_clusters=0, pin_attention=0, pin_head=False)
        s = eng.new_session()
        eng.prefill(s, IDS[:8])
        eng.reset_stats()
        got = torch.stack([eng.decode(s, t) for t in IDS[8:16]])
        assert ((got - want).abs() / want.std()).max() < 0.1
        per_token.append(eng.stats()["store_bytes_per_token"])
    assert per_token[1] < 0.75 * per_token[0], per_token


def test_a_plan_gives_the_engine_its_vram_tier(q4_llama, tmp_path):
    """A plan for a device with a CUDA GPU carries vram_bytes; the engine loading it places
    the layers and head the plan predicted (the VRAM device stood in by the CPU here), and
    a damaged vram_bytes is refused in one line."""
    import json
    from planner.search import load_plan, make_plan
    from tiercache.engine.tiered import config_from_plan
    vram = _vram_for(q4_llama, 2)
    plan = make_plan(str(q4_llama), "desktop-rtx4090-24gb", ram="4G", vram=vram, context=128)
    assert plan["engine"]["vram_bytes"] == vram
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    cfg = config_from_plan(load_plan(path))
    cfg.vram_device, cfg.kv = _device(), "f32"
    eng = load_tiered(Store(q4_llama), cfg)
    assert sorted(eng.budget.vram_layers) == plan["predicted"]["vram_layers"] == [0, 1]
    assert eng.budget.vram_head == plan["predicted"]["vram_head"]
    assert eng.layout.vram == plan["predicted"]["peak_vram_bytes"]
    path.write_text(json.dumps({**plan, "engine": {**plan["engine"], "vram_bytes": "8G"}}))
    with pytest.raises(TiercacheError, match="engine.vram_bytes must be"):
        load_plan(path)


def _moe_vram(store, experts: int) -> int:
    """VRAM for the head, every layer's trunk and `experts` whole experts."""
    every = _engine(store, 64 << 30)
    a = every.args
    one = 2 * 3 * a.hidden_size * a.intermediate_size
    return VRAM_SLACK + every.layout.vram - (len(every.budget.vram_experts) - experts) * one


def test_moe_vram_takes_trunks_then_experts_hottest_first():
    """An MoE model's VRAM: the head, every layer's trunk (attention, norms, router, KV), then
    whole experts, by the profile's routing when it has one; RAM counts the rest only."""
    from test_layout import INT4
    from test_planner import moe_manifest
    from tiercache.engine.layout import Capacities, StoreFacts, TierConfig as Cfg, place
    m = moe_manifest(d=256, F=512, layers=4, vocab=1024)
    def lay(vram, manifest=m):
        return place(StoreFacts.from_manifest(manifest), Cfg(context=256),
                     Capacities(vram=vram), INT4)
    every = lay(64 << 30)
    one = 2 * 3 * 256 * 512
    assert every.budget.vram_layers == frozenset(range(4)) and len(every.budget.vram_experts) == 32
    assert every.hot_order == () and every.budget.hot_slots == 0
    trunks = every.vram - 32 * one
    none = lay(VRAM_SLACK + trunks)
    assert none.budget.vram_layers == frozenset(range(4)) and not none.budget.vram_experts
    assert none.where(("attn", 2)) == "vram" and none.where((2, 5, 0)) != "vram"
    five = lay(VRAM_SLACK + trunks + 5 * one)
    assert sorted(five.budget.vram_experts) == [(0, e) for e in range(5)]  # no profile
    assert {k[:2] for k in five.hot_order} == {(l, e) for l in range(4) for e in range(8)} \
        - five.budget.vram_experts
    assert five.where((0, 4, 1)) == "vram" and five.where((0, 5, 1)) != "vram"
    assert five.budget.lines()["hot"] < none.budget.lines()["hot"]
    c = m["ffn"].get("n_clusters") or 512 // m["ffn"]["cluster_size"]
    hot = {(3, 1), (2, 6), (1, 0)}
    prof = {"tokens": 10, "ffn": [[{"cluster_freq": [0.9 if (l, e) in hot else 0.1] * c,
                                    "cluster_active": [1.0] * c, "threshold": 0.0}
                                   for e in range(8)] for l in range(4)]}
    assert lay(VRAM_SLACK + trunks + 3 * one, {**m, "profile": prof}).budget.vram_experts == hot
    partial = lay(VRAM_SLACK + trunks // 2)  # not every trunk: no experts, layers in order
    assert partial.budget.vram_layers == frozenset(range(len(partial.budget.vram_layers)))
    assert 0 < len(partial.budget.vram_layers) < 4 and not partial.budget.vram_experts


@pytest.mark.parametrize("experts", [0, 3, 8])
def test_moe_trunks_and_experts_in_vram_match_dense(stores, experts):
    """The tiny Mixtral (2 layers, 4 experts) with every trunk in VRAM and `experts` experts
    there, the others on the CPU's expert path (vram.HybridMoE): logits equal the dense
    reference (float32 store); the routed uses split between the devices as placed, and the
    expert cache counts only the CPU's."""
    store = stores("mixtral", "f32")
    dense = load_dense(Store(store))
    want = dense.logits(dense.new_session(), IDS)
    eng = _engine(store, _moe_vram(store, experts))
    b = eng.budget
    assert b.vram_layers == frozenset({0, 1}) and len(b.vram_experts) == experts
    eng.reset_stats()
    got = eng.logits(eng.new_session(), IDS)
    diff = (got - want).abs() / want.std()  # float16 in VRAM: measured max 0.003 x std
    assert diff.max() < 0.02, f"max {diff.max():.3g} mean {diff.mean():.3g} x std"
    v, e = eng.stats()["vram"], eng.stats()["experts"]
    gpu, cpu = v["expert_uses"]
    assert v["experts"] == experts and gpu + cpu == 2 * 2 * len(IDS)  # k x layers x tokens
    assert (gpu == 0) == (experts == 0) and (cpu == 0) == (experts == 8)
    assert (sum(e["hits"]) + sum(e["misses"]) == 0) == (experts == 8)
    steps = []  # decode: one row at a time through the same split
    for engine in (dense, eng):
        s = engine.new_session()
        engine.prefill(s, IDS[:8])
        steps.append(torch.stack([engine.decode(s, t) for t in IDS[8:16]]))
    assert ((steps[1] - steps[0]).abs() / steps[0].std()).max() < 0.02


@pytest.mark.parametrize("kind,dtype", [("llama", "f32"), ("llama", "f16"), ("llama", "q4"),
                                        ("mixtral", "f32")])
def test_half_in_vram_gives_the_dense_cpu_references_greedy_tokens(stores, kind, dtype):
    """The head and about half the rest in VRAM (on CUDA where there is one, else the CPU
    standing in),
    the rest on the CPU's tiered path: the dense CPU engine's greedy tokens over 12 steps, and
    prompt logits within 0.05 x their std (float16 in VRAM; measured <= 0.01 here)."""
    from tiercache.engine import generate_step, make_sampler
    store = stores(kind, dtype, 64)
    ref = load_dense(Store(store))
    every, head = _engine(store, 64 << 30).layout.vram, _head_bytes(store)
    eng = _engine(store, VRAM_SLACK + head + (every - head) // 2)
    b = eng.budget
    assert b.vram_head and b.vram_layers and (b.vram_experts or kind == "llama")
    assert len(b.vram_experts) < eng.args.num_hidden_layers * eng.args.n_experts
    want = ref.logits(ref.new_session(), IDS)
    got = eng.logits(eng.new_session(), IDS).float().cpu()
    diff = ((got - want).abs() / want.std()).max()
    assert diff < 0.05, f"max {diff:.3g} x std"
    greedy = make_sampler()
    tokens = list(generate_step(ref.new_session(), IDS[:8], greedy, 12))
    assert list(generate_step(eng.new_session(), IDS[:8], greedy, 12)) == tokens


@pytest.mark.skipif(CUDA, reason="this machine has a CUDA GPU")
def test_vram_without_a_gpu_is_refused_in_one_line(q4_llama):
    import subprocess
    import sys
    with pytest.raises(TiercacheError, match="needs a CUDA GPU") as e:
        load_tiered(Store(q4_llama), TierConfig(vram_bytes=1 << 30))
    assert "\n" not in str(e.value)
    r = subprocess.run([sys.executable, "-m", "tiercache", "generate", str(q4_llama), "-p", "hi",
                        "--vram", "1G"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs a CUDA GPU" in lines[0], r.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_everything_in_vram_on_cuda_gives_the_cpu_references_greedy_tokens(q4_llama):
    dense = load_dense(Store(q4_llama))
    eng = _engine(q4_llama, 64 << 30)
    assert eng.budget.vram_layers == frozenset(range(4)) and eng.budget.vram_head
    for e in (dense, eng):
        s = e.new_session()
        logits = e.prefill(s, IDS[:8])
        out = []
        for _ in range(16):
            t = int(logits.argmax())
            out.append(t)
            logits = e.decode(s, t)
        e.tokens_out = out
    assert eng.tokens_out == dense.tokens_out
