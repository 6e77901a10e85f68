"""The planner: units, device profiles, probe, estimates, cost model, search and CLI."""
from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np
import pytest

from planner import cost, probe as probe_mod
from planner.cli import device_rows, format_plan, plan as plan_cmd
from planner.estimate import estimate_from_source, safetensors_header
from planner.profiles import DeviceProfile, list_presets, preset, resolve_device
from planner.search import load_plan, make_plan, sweep
from planner.sizes import ModelSizes
from planner.units import parse_size
from tiercache.errors import BudgetError, TiercacheError
from tiercache.store import quant

PRESETS = ("phone-12gb-ufs4", "phone-8gb-ufs31", "laptop-8gb-nvme", "laptop-16gb-rtx4060-8gb",
           "desktop-rtx4090-24gb", "rpi5-8gb")


# -- a small model, described the way a store's manifest describes it ---------------------------
def tiny_manifest(d=128, F=512, layers=4, vocab=512, dtype="q4", cluster=64, heads=4, kv=2,
                  profile=None) -> dict:
    tensors = {"model.embed_tokens.weight": [vocab, d], "model.norm.weight": [d],
               "lm_head.weight": [vocab, d]}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors.update({p + "input_layernorm.weight": [d],
                        p + "post_attention_layernorm.weight": [d],
                        p + "self_attn.q_proj.weight": [d, d],
                        p + "self_attn.k_proj.weight": [d // heads * kv, d],
                        p + "self_attn.v_proj.weight": [d // heads * kv, d],
                        p + "self_attn.o_proj.weight": [d, d]})
    meta = {n: {"shape": s, "dtype": dtype if len(s) == 2 else "f32"} for n, s in tensors.items()}
    ffn = layers * F * 3 * quant.nbytes((1, d), dtype)
    from tiercache.store.format import FORMAT_VERSION
    m = {"format": "tiercache-store", "format_version": FORMAT_VERSION, "store_id": "x" * 32,
         "name": "tiny",
         "config": {"model_type": "llama", "hidden_size": d, "num_hidden_layers": layers,
                    "intermediate_size": F, "num_attention_heads": heads,
                    "num_key_value_heads": kv, "vocab_size": vocab},
         "dtype": dtype,
         "ffn": {"cluster_size": cluster, "n_clusters": F // cluster, "dtype": dtype,
                 "layers": layers, "experts": 1, "intermediate_size": F, "hidden_size": d},
         "tensors": meta, "records": {},
         "weight_bytes": ffn + sum(quant.nbytes(tuple(s), meta[n]["dtype"])
                                   for n, s in tensors.items())}
    if profile:
        m["profile"] = profile
    return m


def profiled(m: dict, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    F, layers = m["ffn"]["intermediate_size"], m["ffn"]["layers"]
    lays = [{"freq": sorted(rng.beta(0.6, 0.8, F).tolist(), reverse=True), "threshold": 0.1,
             "active_fraction": 0.4} for _ in range(layers)]
    return {**m, "profile": {"layers": lays, "tokens": 1000}}


def small_manifest(**kw) -> dict:
    """Big enough that RAM binds between 232 and 262 MB on a laptop (runtime: 220 MB)."""
    return tiny_manifest(d=256, F=1024, layers=8, vocab=2048, cluster=64, **kw)


@pytest.fixture(scope="module")
def laptop():
    return preset("laptop-8gb-nvme")


# -- units ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,want", [("512M", 512_000_000), ("1.5G", 1_500_000_000),
                                       ("800MB", 800_000_000), ("2GiB", 2 * 2**30),
                                       ("64Mi", 64 * 2**20), ("4096", 4096), (4096, 4096),
                                       (" 10 kb ", 10_000)])
def test_parse_size(text, want):
    assert parse_size(text) == want


@pytest.mark.parametrize("bad", ["", "abc", "12XB", "-5M", "1.2.3G", "Mi"])
def test_parse_size_rejects(bad):
    with pytest.raises(TiercacheError, match="size"):
        parse_size(bad)


# -- device profiles -----------------------------------------------------------------------------
def test_every_preset_loads_validates_and_round_trips(tmp_path):
    assert tuple(list_presets()) == PRESETS
    for name in PRESETS:
        p = preset(name)
        assert p.name == name and p.ram_bytes > 0 and p.validate() is p
        for key in ("ram_bytes", "flash", "memory_bw", "compute", "runtime_overhead_bytes"):
            assert len(p.sources[key]) > 10, (name, key)
        if p.vram_bytes:
            assert p.has_gpu and p.sources["vram_bw"] and p.h2d_bw > 0
        bws = [p.flash_bw(b, 1) for b in (4096, 65536, 1 << 20)]
        assert bws == sorted(bws) and bws[0] > 0, (name, bws)  # bigger reads are never slower
        back = DeviceProfile.from_json(p.to_json(tmp_path / f"{name}.json"))
        assert back.to_dict() == p.to_dict()
        assert resolve_device(str(tmp_path / f"{name}.json")).name == name


def test_phone_preset_follows_powerinfer2_curve():
    p = preset("phone-12gb-ufs4")
    assert p.flash_bw(4096) == pytest.approx(450e6, rel=0.01)
    assert p.flash_bw(512 * 1024) == pytest.approx(4.0e9, rel=0.01)


def test_profile_validation_names_what_is_wrong(laptop, tmp_path):
    d = laptop.to_dict()
    d["sources"].pop("flash")
    with pytest.raises(TiercacheError, match="no source for flash"):
        DeviceProfile.from_dict(d).validate()
    d = laptop.to_dict()
    d["ram_bytes"] = -1
    with pytest.raises(TiercacheError, match="ram_bytes"):
        DeviceProfile.from_dict(d).validate()
    d = laptop.to_dict()
    del d["flash"]
    with pytest.raises(TiercacheError, match="lacks flash"):
        DeviceProfile.from_dict(d)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TiercacheError, match="not a device profile"):
        DeviceProfile.from_json(tmp_path / "bad.json")
    with pytest.raises(TiercacheError, match="unknown device"):
        resolve_device("no-such-device")


def test_flash_curve_interpolates_in_log_block_size(laptop):
    p = DeviceProfile.from_dict({**laptop.to_dict(), "flash": [[4096, 1, 64e6],
                                                               [1 << 20, 1, 1.1e9],
                                                               [4096, 4, 200e6],
                                                               [1 << 20, 4, 1.6e9]]})
    mid = p.flash_bw(65536, 1)  # halfway in log(block): the geometric mean
    assert mid == pytest.approx(math.sqrt(64e6 * 1.1e9), rel=1e-6)
    assert p.flash_bw(2048, 1) == pytest.approx(32e6)  # below the table: same time per read
    assert p.flash_bw(8 << 20, 1) == pytest.approx(1.1e9)  # above it: flat
    assert p.flash_bw(4096, 2) == pytest.approx(math.sqrt(64e6 * 200e6), rel=1e-6)
    assert p.flash_bw(4096, 16) == pytest.approx(200e6)
    assert p.read_time(1.1e9, 1 << 20, 1) == pytest.approx(1.0)


# -- the probe -----------------------------------------------------------------------------------
def test_quick_probe_measures_a_complete_profile(tmp_path):
    p = probe_mod.probe(quick=True, path=tmp_path)
    p.validate()
    assert p.measured and p.threads == 1
    grid = {(int(b), int(t)) for b, t, _ in p.flash}
    assert grid == {(b, t) for b in probe_mod.BLOCKS for t in probe_mod.THREADS}
    assert all(bw > 1e6 for _, _, bw in p.flash)
    torch_c = p.compute["torch"]
    for op in ("matvec", "matmul"):
        assert set(torch_c[op]) == {"f32", "f16", "bf16", "q8", "q4"}
    assert set(torch_c["dequant"]) == {"f16", "bf16", "q8", "q4"}
    assert 0 < torch_c["dispatch_s"] < 1e-3
    assert 50e6 < p.runtime_overhead_bytes < 2e9  # python + torch
    assert p.memory_bw > 1e8 and p.copy_bw > 1e8 and p.readahead_bytes >= 4096
    assert 0 < p.miss_overhead_s < 0.1 and "q4" in torch_c.get("repack", {"q4": 1})
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".probe-")]  # cleaned up


def test_this_machine_probes_once_then_reads_the_cache(tmp_path, monkeypatch):
    calls = []

    def fake_probe(quick=False, path=None):
        calls.append(path)
        return preset("laptop-8gb-nvme")
    monkeypatch.setenv("TIERCACHE_HOME", str(tmp_path))
    monkeypatch.setattr(probe_mod, "probe", fake_probe)
    first = probe_mod.this_machine()
    again = probe_mod.this_machine()
    assert len(calls) == 1 and (tmp_path / "device.json").is_file()
    assert again.to_dict() == first.to_dict()
    probe_mod.this_machine(refresh=True)
    assert len(calls) == 2


# -- estimates from unconverted models -----------------------------------------------------------
def _tiny_hf(path, tied=False):
    transformers = pytest.importorskip("transformers")
    import torch
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                                   tie_word_embeddings=tied)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    return path


@pytest.mark.parametrize("tied", [False, True])
def test_estimate_from_hf_dir_equals_the_safetensors(tmp_path, tied):
    from safetensors.torch import load_file
    path = _tiny_hf(tmp_path / "hf", tied)
    real = {}
    for f in path.glob("*.safetensors"):
        real.update(load_file(f))
    real_bytes = {n: t.numel() * t.element_size() for n, t in real.items()}
    est = estimate_from_source(path)
    assert est["dtype"] == "f32" and est["estimate"]["kind"] == "hf"
    assert est["estimate"]["source_bytes"] == sum(real_bytes.values())
    assert est["weight_bytes"] == sum(real_bytes.values())  # f32 store = f32 source
    sizes = ModelSizes.from_manifest(est)
    by = lambda key: sum(b for n, b in real_bytes.items() if key in n)  # noqa: E731
    assert sizes.parts["embed"].stored == by("embed_tokens")
    assert sizes.parts["lm_head"].stored == (0 if tied else by("lm_head"))
    assert sizes.parts["attn"].stored == by("self_attn")
    assert sizes.parts["norm"].stored == by("norm")
    assert sizes.ffn_bytes() == by(".mlp.")
    assert sizes.args.tie_word_embeddings == tied
    hdr = safetensors_header(next(path.glob("*.safetensors")))
    assert {n: v["shape"] for n, v in hdr.items()} == {n: list(t.shape) for n, t in real.items()}


@pytest.mark.parametrize("dtype,cluster", [("q4", 32), ("q8", 64), ("f16", 16)])
def test_estimate_equals_the_store_convert_writes(tmp_path, dtype, cluster):
    from tiercache.store.convert import convert
    from planner.estimate import read_manifest
    path = _tiny_hf(tmp_path / "hf")
    est = estimate_from_source(path, dtype=dtype, cluster_size=cluster)
    convert(path, tmp_path / "store", dtype=dtype, cluster_size=cluster, progress=False)
    real = read_manifest(tmp_path / "store")
    assert est["weight_bytes"] == real["weight_bytes"]
    assert est["ffn"] == real["ffn"]
    assert {n: t["dtype"] for n, t in est["tensors"].items()} == \
        {n: t["dtype"] for n, t in real["tensors"].items()}
    assert ModelSizes.from_manifest(est).stored_fixed_bytes() == \
        ModelSizes.from_manifest(real).stored_fixed_bytes()


def test_estimate_from_gguf(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    d, F, vocab = 64, 96, 128
    w.add_block_count(1)
    w.add_context_length(256)
    w.add_embedding_length(d)
    w.add_feed_forward_length(F)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_token_list([f"t{i}".encode() for i in range(vocab)])
    rng = np.random.default_rng(0)
    arrays = {"token_embd.weight": (vocab, d), "output_norm.weight": (d,),
              "blk.0.attn_norm.weight": (d,), "blk.0.ffn_norm.weight": (d,),
              "blk.0.attn_q.weight": (d, d), "blk.0.attn_k.weight": (32, d),
              "blk.0.attn_v.weight": (32, d), "blk.0.attn_output.weight": (d, d),
              "blk.0.ffn_gate.weight": (F, d), "blk.0.ffn_up.weight": (F, d),
              "blk.0.ffn_down.weight": (d, F)}
    total = 0
    for name, shape in arrays.items():
        a = rng.standard_normal(shape).astype(np.float16 if len(shape) == 2 else np.float32)
        w.add_tensor(name, a)
        total += a.nbytes
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    est = estimate_from_source(path)
    assert est["estimate"]["kind"] == "gguf" and est["estimate"]["source_bytes"] == total
    assert est["dtype"] == "f16" and est["config"]["tie_word_embeddings"] is True
    assert est["config"]["vocab_size"] == vocab and est["config"]["num_key_value_heads"] == 2
    assert est["tensors"]["model.layers.0.self_attn.k_proj.weight"]["shape"] == [32, d]
    sizes = ModelSizes.from_manifest(est)
    assert sizes.ffn_bytes() == 3 * F * d * 2
    with pytest.raises(TiercacheError):
        estimate_from_source(tmp_path / "missing.gguf")


# -- the cost model ------------------------------------------------------------------------------
def test_lru_smaller_than_the_active_set_thrashes():
    pi = np.full(30 * 1536, 0.5)
    hit = lambda frac: 1 - cost._lru_misses(pi, int(frac * len(pi))) / pi.sum()  # noqa: E731
    hits = [hit(f) for f in (0.0, 0.25, 0.45, 0.5, 0.75, 1.0)]
    assert hits == sorted(hits)  # a bigger LRU never hits less
    assert hits[1] < 0.01 and hits[2] < 0.05  # below the per-token active set: ~nothing
    assert 0.05 < hits[3] < 0.35  # DESIGN.md: 50% of neurons at ~50% activation hits ~15%
    assert hits[-1] == 1.0


def test_pinning_beats_lru_of_the_same_size(laptop):
    cm = cost.CostModel(ModelSizes.from_manifest(profiled(tiny_manifest())), laptop)
    n = cm.activity(16).n
    pinned = cm.predict(cost.Config(decode_cluster=16, hot_clusters=n // 2, cold_clusters=0))
    lru = cm.predict(cost.Config(decode_cluster=16, hot_clusters=0, cold_clusters=n // 2))
    assert pinned.store_bytes_per_token < lru.store_bytes_per_token
    assert pinned.hit_rate > lru.hit_rate


def test_memory_adds_up(laptop):
    m = tiny_manifest()
    cm = cost.CostModel(ModelSizes.from_manifest(m), laptop)
    c = cost.Config(decode_cluster=64, hot_clusters=20, cold_clusters=5, context=1000)
    pred = cm.predict(c)
    mem = pred.memory
    assert mem["runtime"] == laptop.runtime_anon == laptop.runtime_overhead_bytes
    # K and V in f16, 4 layers, 2 kv heads, head_dim 32, grown in steps of 256 positions
    # (KVCache), plus one layer read back as f32 (kv.Scratch)
    assert mem["kv"] == 1024 * 2 * 2 * 32 * (4 * 2 + 4)
    nb = cm.cached_bytes(64, None)
    # no profile: the engine runs dense, where cold clusters are pinned too
    assert mem["hot"] == int(25 * nb) and mem["cold"] == 0
    assert pred.peak_memory_bytes == sum(v for k, v in mem.items() if k != "vram")


def _engine_budget(manifest: dict, cfg):
    """What the engine itself counts for `cfg` (`layout.place`, as the engine calls it with
    the kernels the planner models), with its runtime measurement replaced."""
    from tiercache.engine.layout import Capacities, Kernels, StoreFacts, place
    from tiercache.engine.slots import Int4Slots
    facts = StoreFacts.from_manifest(manifest)
    a = facts.args
    int4 = Int4Slots.supports(facts.cluster_size, a.hidden_size, facts.ffn_dtype,
                              a.intermediate_size)
    kernels = Kernels.here(facts, cfg.compute, nbits=False)
    assert kernels.int4 == int4
    return place(facts, cfg, Capacities(ram=cfg.ram_bytes), kernels).budget


def test_memory_is_what_the_engine_counts(laptop):
    from tiercache.engine.tiered import FILE_RESERVE, TierConfig
    m = small_manifest()
    cm = cost.CostModel(ModelSizes.from_manifest(m), laptop)
    for hot, depth in ((0, 0), (100, 1), (300, 2), (512, 2)):
        c = cost.Config(decode_cluster=64, hot_clusters=hot, cold_clusters=0, context=300,
                        prefetch_layers=depth, io_threads=2)
        mem = cm.predict(c).memory
        b = _engine_budget(m, TierConfig(hot_clusters=hot, cold_clusters=0, context=300,
                                         prefetch=depth > 0, prefetch_layers=max(1, depth)))
        runtime = mem["runtime"] + mem["tokenizer"] + FILE_RESERVE + mem["file_pages"]
        want = b.total + runtime
        assert sum(v for k, v in mem.items() if k != "vram") == want, (hot, depth)
        assert mem["hot"] == b.hot_slots * b.slot_bytes and mem["buffers"] == b.streaming


def test_dense_stream_decode_reads_what_is_not_pinned(laptop):
    m = small_manifest()  # no profile: every cluster every token
    cm = cost.CostModel(ModelSizes.from_manifest(m), laptop)
    lay = cm.layout()
    assert lay.dense and lay.total == 8 * 16
    preds = [cm.predict(cost.Config(decode_cluster=64, hot_clusters=h, cold_clusters=0,
                                    prefetch_layers=1, io_threads=2))
             for h in (0, 32, 64, 128)]
    read = [p.store_bytes_per_token for p in preds]
    assert read == [(128 - h) * lay.record for h in (0, 32, 64, 128)]
    assert [p.hit_rate for p in preds] == [0.0, 0.25, 0.5, 1.0]
    speeds = [p.decode_tok_s for p in preds]
    assert speeds == sorted(speeds) and speeds[0] < speeds[-1]
    # dense: whole layers pinned, spread out, as the engine pins them (whatever the profile)
    from tiercache.engine.tiered import spread_layers
    prof = {"tokens": 10, "ffn": [[{"threshold": 0.1, "freq": [1.0] * 1024,
                                    "cluster_active": [1.0] * 16,
                                    "cluster_freq": [1.0 if l == 3 else 0.5] * 16}]
                                  for l in range(8)]}
    lay = cost.CostModel(ModelSizes.from_manifest({**m, "profile": prof}), laptop).layout()
    assert lay.dense  # every cluster active: thresholds would skip nothing
    assert (lay.hot_order[:32] // 16).tolist() == [spread_layers(8)[0]] * 16 + [
        spread_layers(8)[1]] * 16
    assert lay.streamed(16)["layers"] == 7 and lay.streamed(20)["layers"] == 7


def test_plans_fit_the_engines_own_budget(laptop):
    """A plan's regions, handed to the engine, are what the engine then counts: the peak the
    planner predicts is the budget the engine keeps."""
    from tiercache.engine.tiered import TierConfig, config_from_plan
    m = small_manifest()
    least = least_ram(m, laptop)
    for extra in (0.5e6, 3e6, 50e6):
        plan = make_plan(m, laptop, ram=int(least + extra), context=256)
        cfg = config_from_plan(plan)
        b = _engine_budget(m, TierConfig(**{**cfg.__dict__, "ram_bytes": None}))
        pr = plan["predicted"]["memory"]
        runtime = pr["runtime"] + pr["tokenizer"] + pr["file_reserve"] + pr["file_pages"]
        assert b.total + runtime == plan["predicted"]["peak_memory_bytes"] <= int(least + extra)


def moe_manifest(d: int, F: int, layers: int, vocab: int, experts: int = 8) -> dict:
    """tiny_manifest as a Mixtral: `experts` experts per layer, top-2, an f16 router each."""
    m = tiny_manifest(d=d, F=F, layers=layers, vocab=vocab)
    m["config"].update(model_type="mixtral", num_local_experts=experts, num_experts_per_tok=2)
    m["ffn"]["experts"] = experts
    for i in range(layers):
        m["tensors"][f"model.layers.{i}.block_sparse_moe.gate.weight"] = {
            "shape": [experts, d], "dtype": "f16"}
    return m


def v3_manifest(**kw) -> dict:
    """small_manifest as store format 3 writes a q4 model: FFN and attention in q4k (the int4
    kernel's layout), the head and embeddings in q8r (the int8 kernel's): both can stream."""
    m = small_manifest(**kw)
    tensors = {n: {**t, "dtype": "q8r" if n in ("lm_head.weight", "model.embed_tokens.weight")
                   else "q4k" if ".self_attn." in n else t["dtype"]}
               for n, t in m["tensors"].items()}
    return {**m, "tensors": tensors, "ffn": {**m["ffn"], "dtype": "q4k"}}


def test_pure_budget_is_the_engines_with_attention_and_head_pinned_or_not(laptop):
    """planner.accounting.plan_budget is the engine's own count, and the planner's per-config
    regions (derived from it) match it for every pinning choice."""
    from planner.accounting import layout_of, plan_budget
    from tiercache.engine.tiered import FILE_RESERVE, TierConfig
    m = v3_manifest()
    cm = cost.CostModel(ModelSizes.from_manifest(m), laptop)
    lay = cm.layout()
    attn, head, _ = lay.streamable
    assert lay.int4 and lay.dense and sorted(attn) == list(range(8)) and head > 0
    assert plan_budget(m, TierConfig(context=300), 0).total == _engine_budget(
        m, TierConfig(context=300)).total
    for hot, att, pin_head in ((0, 0, False), (50, 3, True), (127, 8, False), (128, 0, True)):
        c = cost.Config(decode_cluster=64, hot_clusters=hot, cold_clusters=0, context=300,
                        prefetch_layers=2, io_threads=2, pin_attention=att, pin_head=pin_head)
        mem = cm.predict(c).memory
        b = plan_budget(m, TierConfig(hot_clusters=hot, cold_clusters=0, context=300,
                                      pin_attention=att, pin_head=pin_head), 0)
        assert b.attn_pinned == frozenset(range(att)) and b.head_pinned == pin_head
        runtime = mem["runtime"] + mem["tokenizer"] + FILE_RESERVE + mem["file_pages"]
        assert sum(v for k, v in mem.items() if k != "vram") == b.total + runtime
        assert mem["buffers"] == b.streaming > 0


def test_streamed_attention_and_head_are_read_every_token(laptop):
    m = v3_manifest()
    cm = cost.CostModel(ModelSizes.from_manifest(m), laptop)
    lay = cm.layout()
    attn, head, _ = lay.streamable
    base = cost.Config(decode_cluster=64, hot_clusters=lay.total, cold_clusters=0,
                       prefetch_layers=1, io_threads=2)
    pinned = cm.predict(base)
    some = cm.predict(dataclasses.replace(base, pin_attention=5))
    more = cm.predict(dataclasses.replace(base, pin_attention=0, pin_head=False))
    assert pinned.store_bytes_per_token == 0
    assert some.store_bytes_per_token == attn[5] + attn[6] + attn[7]
    assert more.store_bytes_per_token == sum(attn.values()) + head
    assert more.decode_tok_s < some.decode_tok_s < pinned.decode_tok_s
    assert more.peak_memory_bytes < some.peak_memory_bytes


def test_budgets_below_attention_and_head_plan_streaming(laptop):
    """Below what pinning attention and the head needs, the plan streams them (it used to
    refuse), within the budget less the runtime margin; more RAM pins more, never slower."""
    from planner.accounting import plan_budget
    from planner.search import RUNTIME_MARGIN, least_ram as least
    from tiercache.engine.tiered import TierConfig, config_from_plan
    m = v3_manifest()
    floor, _ = least(m, laptop, context=256)
    lay = cost.CostModel(ModelSizes.from_manifest(m), laptop).layout()
    attn, head, _ = lay.streamable
    mem = cost.CostModel(ModelSizes.from_manifest(m), laptop).predict(cost.Config(
        decode_cluster=64, hot_clusters=0, cold_clusters=0, prefetch_layers=0, io_threads=1,
        context=256)).memory
    pinned_floor = sum(v for k, v in mem.items() if k != "vram") + RUNTIME_MARGIN
    head_ram = plan_budget(m, TierConfig(context=256), 0).head  # rows and their scales
    assert floor == pinned_floor - sum(attn.values()) - head_ram  # vs. pinning them all
    speeds = []
    for extra in np.linspace(0, sum(attn.values()) + head + 40 * lay.slot, 9):
        ram = int(floor + extra)
        p = make_plan(m, laptop, ram=ram, context=256)
        e, pr = p["engine"], p["predicted"]
        if extra == 0:
            assert e["pin_attention"] == 0 and e["pin_head"] is False
        cfg = config_from_plan(p)
        runtime = sum(pr["memory"][k] for k in ("runtime", "tokenizer", "file_reserve"))
        b = plan_budget(m, cfg, runtime + RUNTIME_MARGIN)  # the engine measures that much more:
        assert b.total <= ram  # it still accepts the plan (else BudgetError here)
        assert (cfg.pin_attention, cfg.pin_head) == (e["pin_attention"], e["pin_head"])
        streamed = pr["streamed_bytes_per_token"]
        assert streamed["head"] == (0 if e["pin_head"] else head)
        assert pr["store_bytes_per_token"] == sum(streamed.values())
        speeds.append(pr["decode_tok_s"])
    assert speeds == sorted(speeds) and speeds[-1] > speeds[0]
    with pytest.raises(BudgetError, match="margin"):
        make_plan(m, laptop, ram=floor - 1, context=256)


def test_a_streaming_plan_runs_as_planned(hf_models, tmp_path, laptop):
    """A budget just above the least: the plan streams attention and the head's rows, the
    engine (measuring its own runtime) accepts it, pins what the plan says and decodes the
    same tokens as with everything resident."""
    from planner.search import least_ram as least
    from tiercache import api
    from tiercache.engine import generate_step, make_sampler
    from tiercache.engine.tiered import TierConfig, load_tiered
    from tiercache.memory import anon_bytes
    from tiercache.store.convert import convert
    from tiercache.store.format import Store
    out = convert(hf_models["llama3"][1], tmp_path / "q4", dtype="q4", cluster_size=64,
                  progress=False)
    dev = DeviceProfile.from_dict({**laptop.to_dict(), "runtime_anon_bytes": anon_bytes()})
    floor, _ = least(str(out), dev, context=64)
    plan = make_plan(str(out), dev, ram=floor + 4096, context=64)
    e = plan["engine"]
    assert e["pin_attention"] < 2 or e["pin_head"] is False
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    engine, _ = api.load(str(out), plan=str(tmp_path / "plan.json"))
    assert len(engine.budget.attn_pinned) == e["pin_attention"]
    assert engine.budget.head_pinned == e["pin_head"]
    ids, greedy = list(range(3, 20)), make_sampler()
    want = list(generate_step(load_tiered(Store(out), TierConfig(sparse=False)).new_session(),
                              ids, greedy, 8))
    assert list(generate_step(engine.new_session(), ids, greedy, 8)) == want
    assert engine.stats()["store_bytes_read"] > 0


def test_mmap_model_explains_the_thrash(laptop):
    dev = DeviceProfile.from_dict({**laptop.to_dict(), "readahead_bytes": 128 * 1024})
    W, foot = 97e6, 93e6
    speeds = [cost.predict_mmap(W, dev, cap, foot, uncapped_tok_s=66)["decode_tok_s"]
              for cap in (400e6, 175e6, 150e6, 120e6)]
    assert speeds[0] == pytest.approx(66)  # everything fits: uncapped speed
    assert speeds == sorted(speeds, reverse=True) and speeds[-1] < speeds[0] / 5


def least_ram(m, dev, context=256, **kw) -> float:
    with pytest.raises(BudgetError) as e:
        make_plan(m, dev, ram="1MB", context=context, **kw)
    return float(str(e.value).split("needs at least ")[1].split(" MB")[0]) * 1e6


# -- the search ----------------------------------------------------------------------------------
@pytest.mark.parametrize("with_profile", [False, True])
def test_more_ram_never_predicts_slower_decode(laptop, with_profile):
    m = profiled(small_manifest()) if with_profile else small_manifest()
    least = least_ram(m, laptop)
    need = None
    speeds = []
    for ram in np.linspace(least - 2e6, least + 5e6, 15):
        try:
            speeds.append(make_plan(m, laptop, ram=int(ram), context=256)
                          ["predicted"]["decode_tok_s"])
        except BudgetError:
            need = ram
            assert not speeds  # once it fits, more RAM fits too
    assert len(speeds) >= 5 and need is not None
    assert all(b >= a for a, b in zip(speeds, speeds[1:])), speeds
    assert speeds[-1] > speeds[0]  # and it helps somewhere in this range


def test_faster_flash_never_predicts_slower(laptop):
    m = small_manifest()
    need = least_ram(m, laptop)
    for ram in (need + 1.5e6, need + 3e6, need + 8e6, need + 30e6):
        slow = make_plan(m, laptop.scaled(flash=0.5), ram=int(ram), context=256)["predicted"]
        base = make_plan(m, laptop, ram=int(ram), context=256)["predicted"]
        fast = make_plan(m, laptop.scaled(flash=4), ram=int(ram), context=256)["predicted"]
        assert slow["decode_tok_s"] <= base["decode_tok_s"] <= fast["decode_tok_s"]
        assert slow["prefill_tok_s"] <= base["prefill_tok_s"] * 1.000001
        assert base["prefill_tok_s"] <= fast["prefill_tok_s"] * 1.000001
    # and with reads in the way the disk is what decides
    tight = make_plan(m, laptop, ram=int(need + 1.5e6), context=256)["predicted"]
    assert tight["store_bytes_per_token"] > 0
    slow = make_plan(m, laptop.scaled(flash=0.1), ram=int(need + 1.5e6), context=256)["predicted"]
    assert slow["decode_tok_s"] < tight["decode_tok_s"]


def test_refusal_carries_the_numbers(laptop):
    m = tiny_manifest()
    with pytest.raises(BudgetError) as e:
        make_plan(m, laptop, ram="100MB", context=256)
    msg = str(e.value)
    assert "needs at least" in msg and "budget is 100 MB" in msg
    assert f"runtime {laptop.runtime_overhead_bytes / 1e6:.0f}" in msg
    need = float(msg.split("needs at least ")[1].split(" MB")[0])
    assert need > 220  # the runtime alone is 220 MB
    with pytest.raises(BudgetError, match="context of"):  # the KV cache is what does not fit
        make_plan(m, laptop, ram=int(need * 1e6) + 1_000_000, context=200_000)
    with pytest.raises(BudgetError, match=r"tok/s"):
        make_plan(m, laptop, ram="1G", min_tok_s=1e9)


def test_plan_json_round_trip_and_fields(laptop, tmp_path):
    m = profiled(small_manifest())
    ram = int(least_ram(m, laptop, context=512) + 1.5e6)
    p = make_plan(m, laptop, ram=ram, context=512)
    again = json.loads(json.dumps(p))
    assert again == p
    (tmp_path / "plan.json").write_text(json.dumps(p))
    assert load_plan(tmp_path / "plan.json") == p
    assert p["plan_version"] == 1 and p["device"] == "laptop-8gb-nvme"
    assert p["limits"]["ram_bytes"] == ram and p["limits"]["context"] == 512
    e, pr = p["engine"], p["predicted"]
    for key in ("fixed_bytes", "hot_bytes", "cold_bytes", "kv_bytes", "io_threads",
                "prefetch_layers", "prefill_cluster_bytes", "quantization"):
        assert key in e, key
    # what the prediction assumes is not written as an engine setting (the engine takes none)
    how = pr["assumes"]
    assert not {"decode_cluster_size", "prefill_backend", "decode_backend", "placement",
                "io_mode"} & set(e)
    assert how["decode_cluster_size"] % 16 == 0 and how["placement"]["ffn_cold"] == "flash"
    assert how["prefill_backend"] and how["decode_backend"]
    for key in ("peak_memory_bytes", "decode_tok_s", "prefill_tok_s", "store_bytes_per_token",
                "bottleneck", "hit_rate"):
        assert key in pr, key
    assert pr["bottleneck"] in ("io", "memory", "compute")
    assert 0 < pr["peak_memory_bytes"] <= p["limits"]["ram_bytes"]
    assert pr["decode_tok_s"] > 0 and pr["prefill_tok_s"] > 0 and 0 <= pr["hit_rate"] <= 1
    assert p["model"]["activity"].startswith("profiled")
    assert any("Activation profile" in line for line in p["explanation"])
    (tmp_path / "junk.json").write_text('{"plan_version": 99}')
    with pytest.raises(TiercacheError, match="version"):
        load_plan(tmp_path / "junk.json")


def test_unprofiled_plan_says_it_assumed_sparsity(laptop):
    p = make_plan(tiny_manifest(), laptop, ram="1G", active=0.5)
    assert p["model"]["activity"] == "assumed"
    assert any("assumed 50%" in line for line in p["explanation"])
    assert p["predicted"]["store_bytes_per_token"] == 0  # everything fits in 1 GB
    assert any("RAM does not bind" in line for line in p["explanation"])


def test_dense_runs_cache_whole_clusters_and_measured_activity_is_used(laptop):
    m = small_manifest()
    sparse = make_plan(profiled(m), laptop, ram="1G", context=256)
    dense = make_plan(m, laptop, ram="1G", context=256)  # no profile: the engine runs dense
    assert sparse["engine"]["gate_pinned"] and not dense["engine"]["gate_pinned"]
    # a dense run keeps gate|up|down in each slot: 3/2 of a sparse run's up|down
    assert dense["engine"]["cached_cluster_bytes"] > sparse["engine"]["cached_cluster_bytes"]
    lays = [[{"threshold": 0.1, "freq": [0.5] * 1024, "cluster_active": [0.25] * 16}]
            for _ in range(8)]
    prof = {**m, "profile": {"tokens": 100, "ffn": lays}}
    sizes = ModelSizes.from_manifest(prof)
    act = cost.CostModel(sizes, laptop).activity(64)
    assert act.active_clusters() == pytest.approx(8 * 16 * 0.25)  # measured, not derived
    assert cost.CostModel(sizes, laptop).activity(128).active_clusters() > 8 * 8 * 0.25


def test_gpu_plans_place_vram_as_the_engine_does():
    """On a device with a CUDA GPU a plan gives the engine its VRAM tier (engine.vram_bytes,
    which config_from_plan hands on), and predicts the engine's own split: the layers and head
    `place` puts in VRAM, their bytes, and the RAM regions of what stays on the CPU. More VRAM
    places more there and never predicts slower decode; the GPU beats the CPU-only plan."""
    from planner.accounting import FILE_RESERVE, layout_of
    from tiercache.engine.layout import Capacities, place
    from tiercache.engine.tiered import config_from_plan
    big = profiled(tiny_manifest(d=1024, F=4096, layers=16, vocab=32000, cluster=32))
    cpu_only = make_plan(big, "desktop-rtx4090-24gb", ram="2G", vram=0)
    assert cpu_only["engine"]["vram_bytes"] is None and not cpu_only["predicted"]["vram_layers"]
    last = (0, cpu_only["predicted"]["decode_tok_s"])
    for vram in ("300M", "600M", "2G"):
        p = make_plan(big, "desktop-rtx4090-24gb", ram="2G", vram=vram)
        e, pr = p["engine"], p["predicted"]
        cfg = config_from_plan(p)
        assert cfg.vram_bytes == e["vram_bytes"] == parse_size(vram)
        assert pr["assumes"]["decode_backend"] == "torch:cuda"
        runtime = sum(v for k, v in pr["memory"].items()
                      if k in ("runtime", "tokenizer", "file_pages", "gpu_runtime"))
        hold = layout_of(big, cfg.compute)
        lay = place(hold.facts, cfg, Capacities(runtime=runtime + FILE_RESERVE, ram=cfg.ram_bytes,
                                                vram=cfg.vram_bytes), hold.kernels)
        b = lay.budget
        assert sorted(b.vram_layers) == pr["vram_layers"] and b.vram_head == pr["vram_head"]
        assert lay.vram == pr["peak_vram_bytes"] <= parse_size(vram)
        assert b.total == pr["anon_memory_bytes"] - pr["memory"]["page_cache"]
        assert len(b.vram_layers) > last[0] and pr["decode_tok_s"] >= last[1]
        last = (len(b.vram_layers), pr["decode_tok_s"])
        assert p["predicted"]["assumes"]["placement"]["vram"]["layers"] == pr["vram_layers"]
    assert last[0] == 16 and pr["vram_head"]
    assert any("VRAM tier" in line for line in p["explanation"])


def test_moe_gpu_plans_place_trunks_then_experts_as_the_engine_does():
    """An MoE plan on a CUDA device: the engine's split (every trunk, then whole experts),
    predicted equal to `place`; the CPU keeps the other experts' clusters only."""
    from planner.accounting import FILE_RESERVE, layout_of
    from tiercache.engine.layout import Capacities, place
    from tiercache.engine.tiered import config_from_plan
    m = moe_manifest(d=1024, F=3584, layers=16, vocab=32000)  # 793 MB of q4 experts
    # RAM that cannot hold every expert: the GPU's share saves reads (with RAM to spare, or
    # little VRAM, eager MoE layers on the GPU and the CUDA runtime's RAM cost more)
    dev = "laptop-16gb-rtx4060-8gb"
    cpu = make_plan(m, dev, ram="1200M", vram=0, context=512)
    p = make_plan(m, dev, ram="1200M", vram="1500M", context=512)
    pr = p["predicted"]
    assert pr["vram_layers"] == list(range(16)) and pr["vram_head"]
    assert 0 < p["predicted"]["assumes"]["placement"]["vram"]["experts"] < 128
    cfg = config_from_plan(p)
    hold = layout_of(m, cfg.compute)
    runtime = sum(v for k, v in pr["memory"].items()
                  if k in ("runtime", "tokenizer", "file_pages", "gpu_runtime"))
    lay = place(hold.facts, cfg, Capacities(runtime=runtime + FILE_RESERVE, ram=cfg.ram_bytes,
                                            vram=cfg.vram_bytes), hold.kernels)
    assert len(lay.budget.vram_experts) == pr["assumes"]["placement"]["vram"]["experts"]
    assert lay.vram == pr["peak_vram_bytes"]
    assert lay.budget.total == pr["anon_memory_bytes"] - pr["memory"]["page_cache"]
    assert lay.budget.experts == p["engine"]["expert_cache_bytes"] > 0  # the CPU's LRU
    assert pr["decode_tok_s"] > cpu["predicted"]["decode_tok_s"]
    assert pr["store_bytes_per_token"] < cpu["predicted"]["store_bytes_per_token"]
    whole = make_plan(m, dev, ram="1200M", vram="4G", context=512)["predicted"]
    assert whole["assumes"]["placement"]["vram"]["experts"] == 128
    assert whole["store_bytes_per_token"] == 0 and whole["decode_ms"]["io_exposed"] == 0
    assert whole["decode_tok_s"] > pr["decode_tok_s"]


def test_moe_plans_give_the_engine_an_expert_cache(laptop):
    """Below every expert, an MoE plan is the engine's own split: attention and the head,
    then an expert cache of whole experts (not clusters pinned in layer order, which left
    every routed expert's other clusters to read); config_from_plan hands it on and the
    engine's regions for it are what the plan counts. Reads per token are the cache's misses
    under even routing: fewer with more RAM, none where every expert fits."""
    from planner.accounting import FILE_RESERVE, layout_of
    from tiercache.engine.layout import Capacities, place
    from tiercache.engine.tiered import config_from_plan
    m = moe_manifest(d=1024, F=3584, layers=8, vocab=32000)
    last = None
    for ram in ("850M", "950M", "1100M", "2G"):
        p = make_plan(m, laptop, ram=ram, context=512)
        e, pr = p["engine"], p["predicted"]
        cfg = config_from_plan(p)
        assert cfg.expert_cache_bytes == e["expert_cache_bytes"]
        runtime = sum(v for k, v in pr["memory"].items()
                      if k in ("runtime", "tokenizer", "file_pages"))
        hold = layout_of(m, cfg.compute)
        b = place(hold.facts, cfg, Capacities(runtime=runtime + FILE_RESERVE,
                                              ram=cfg.ram_bytes), hold.kernels).budget
        assert b.total == pr["anon_memory_bytes"] - pr["memory"]["page_cache"]
        if e["hot_clusters"] == 0:
            assert b.experts == e["expert_cache_bytes"] > 0
        reads = pr["store_bytes_per_token"]
        if last is not None:
            assert reads <= last[0] and pr["decode_tok_s"] >= last[1]
        last = (reads, pr["decode_tok_s"])
    assert last[0] == 0


def test_moe_routes_experts_and_buffered_reads_count_page_cache(laptop):
    m = moe_manifest(d=256, F=512, layers=4, vocab=1024)
    p = make_plan(m, laptop, ram=int(least_ram(m, laptop) + 1e6), context=256)
    assert p["model"]["mean_active_fraction"] == pytest.approx(2 / 8)
    assert p["predicted"]["assumes"]["placement"]["router"] == "ram"
    assert not p["engine"]["gate_pinned"]  # no profile, routed experts run dense
    assert p["predicted"]["store_bytes_per_token"] > 0
    ram = int(least_ram(small_manifest(), laptop, io_mode="buffered") + 1.5e6)
    b = make_plan(small_manifest(), laptop, ram=ram, context=256, io_mode="buffered")
    assert b["predicted"]["assumes"]["io_mode"] == "buffered"
    pr = b["predicted"]
    assert pr["anon_memory_bytes"] <= pr["peak_memory_bytes"] <= ram


def test_quality_budget_limits_dtype_for_estimates(tmp_path, laptop):
    path = _tiny_hf(tmp_path / "hf")
    strict = make_plan(path, laptop, ram="2G", quality=0.01)
    loose = make_plan(path, laptop, ram="2G")
    assert strict["engine"]["quantization"] in ("f32", "bf16", "q8")
    assert loose["model"]["estimate_only"] is True


# -- the CLI functions ---------------------------------------------------------------------------
def test_cli_plan_table_json_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")  # the `bench` extra
    store = tmp_path / "store"
    store.mkdir()
    (store / "manifest.json").write_text(json.dumps(tiny_manifest()))
    out, png = tmp_path / "plan.json", tmp_path / "curve.png"
    res = plan_cmd(str(store), device="laptop-8gb-nvme", ram="300MB", out=out, plot=png,
                   context=256)
    table = capsys.readouterr().out
    assert "decode" in table and "bottleneck" in table and "peak" in table
    assert json.loads(out.read_text()) == res
    assert png.read_bytes()[:4] == b"\x89PNG"
    plan_cmd(str(store), device="laptop-8gb-nvme", ram="300MB", json_out=True, context=256)
    printed = json.loads(capsys.readouterr().out)
    assert printed["predicted"]["decode_tok_s"] == res["predicted"]["decode_tok_s"]
    assert format_plan(res).splitlines()[0].startswith("plan for tiny")
    with pytest.raises(TiercacheError, match="no such"):
        plan_cmd(str(tmp_path / "nothing"), device="laptop-8gb-nvme")


def test_device_rows_and_sweep(laptop):
    rows = device_rows()
    assert [r["name"] for r in rows] == list(PRESETS)
    least = least_ram(tiny_manifest(), laptop)
    pts = sweep(tiny_manifest(), laptop, budgets=[100e6, least + 1e6, 1e9], context=256)
    assert pts[0]["decode_tok_s"] is None
    assert pts[1]["decode_tok_s"] <= pts[2]["decode_tok_s"]


def test_ram_alone_plans_for_this_machine_once_probed(tmp_path, monkeypatch, laptop):
    """`--ram` without a plan: the planner's regions when this machine's probe is cached;
    else (or when no plan fits) None, and the engine sizes itself and refuses with numbers."""
    import dataclasses
    from tiercache.api import _planned
    monkeypatch.setenv("TIERCACHE_HOME", str(tmp_path))
    store = tmp_path / "store"
    store.mkdir()
    m = small_manifest()
    (store / "manifest.json").write_text(json.dumps(m))
    ram = int(least_ram(m, laptop) + 3e6)
    assert _planned(store, ram, 256, "f16") is None  # nothing probed: no probe is started either
    dataclasses.replace(laptop, host="").to_json(tmp_path / "device.json")
    cfg = _planned(store, ram, 256, "f16")
    want = make_plan(m, laptop, ram=ram, context=256)["engine"]
    assert cfg is not None and cfg.ram_bytes == ram and cfg.context == 256
    assert cfg.hot_clusters == want["hot_clusters"] and cfg.io_threads == want["io_threads"]
    assert _planned(store, 1_000_000, 256, "f16") is None  # the planner refuses: the engine decides


def test_plans_say_when_the_lean_runtime_runs_the_store_instead(laptop):
    """A plan is the tiered engine's; for a store the lean runtime takes (q4k records, q8 head)
    the explanation says that `--ram` alone runs that runtime, which the plan does not model."""
    def says(m):
        p = make_plan(m, laptop, ram="2G", context=256)
        table = "the lean runtime" in format_plan(p).split("region")[0]
        assert table == any(line.startswith("Engine:") for line in p["explanation"])
        return table
    assert says(v3_manifest())
    assert not says(small_manifest())  # q4 records off the kernel's layout: the tiered engine
    from planner.lean_fit import lean_fit
    from tiercache import lean
    fit = lean_fit(v3_manifest(), None, 256)
    mid = lean_fit(v3_manifest(), (fit["least_bytes"] + fit["need_bytes"]) // 2, 256)
    record = sum(nb for _, _, nb in lean.Shape(v3_manifest()).cluster_parts(0))  # as stored
    assert 0 <= mid["resident_clusters"] < 16
    assert mid["streamed_bytes_per_token"] == 8 * (16 - mid["resident_clusters"]) * record
