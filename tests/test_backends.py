"""Every backend against the torch reference on tiny Llama, Qwen2 and Mixtral models.

Tolerances, against torch running the same (dequantized) weights: f32 logits within 1e-4
(measured ~1e-7); q4 through MatMulNBits within 1e-4 (float zero points make the repack exact,
measured ~4e-7); q8 through MatMulNBits within 1e-2 (accuracy_level 4 quantizes activations to
int8 per block: measured 1.8e-3 on logits of magnitude ~1). Backends whose hardware is absent
are skipped.
"""
from __future__ import annotations

import sys
import warnings

import pytest
import torch
import transformers as T

import backends
from backends import nbits
from backends.base import QuantWeight, reference_sparse_ffn
from tiercache.engine import generate_step, load_dense, make_sampler
from tiercache.errors import TiercacheError
from tiercache.store import quant
from tiercache.store.convert import convert
from tiercache.store.format import Store

ATOL = 1e-4
ATOL_Q8 = 1e-2
SMALL = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
CONFIGS = {
    "llama": lambda: T.LlamaConfig(intermediate_size=160, tie_word_embeddings=True, **SMALL),
    "qwen2": lambda: T.Qwen2Config(intermediate_size=160, **SMALL),
    "mixtral": lambda: T.MixtralConfig(intermediate_size=96, num_local_experts=4,
                                       num_experts_per_tok=2, **SMALL),
}


def _ort_providers() -> list[str]:
    try:
        import onnxruntime
    except ImportError:
        return []
    return onnxruntime.get_available_providers()


HAVE_ORT = bool(_ort_providers())
needs_ort = pytest.mark.skipif(not HAVE_ORT, reason="onnxruntime is not installed")
SPECS = [
    "torch",
    pytest.param("ort:CPU", marks=needs_ort),
    pytest.param("torch:cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="no CUDA GPU")]),
    pytest.param("ort:CUDA", marks=[pytest.mark.gpu, pytest.mark.skipif(
        "CUDAExecutionProvider" not in _ort_providers() or not torch.cuda.is_available(),
        reason="no CUDAExecutionProvider / GPU")]),
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """1 torch thread, as the backends run here: tiny ops on a busy 2-core VM otherwise wait
    on OpenMP barriers (MoE's index_add_ took ~60 ms a call)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """name-dtype -> open Store (LMDB allows one open environment per path and process)."""
    root, out = tmp_path_factory.mktemp("backends"), {}
    for name, make in CONFIGS.items():
        torch.manual_seed(0)
        cfg = make()
        hf = getattr(T, type(cfg).__name__.replace("Config", "ForCausalLM"))(cfg)
        hf.save_pretrained(root / name)
        for dtype in {"llama": ("f32", "q4", "q8"), "qwen2": ("f32",)}.get(name, ("f32", "q4")):
            out[f"{name}-{dtype}"] = Store(convert(root / name, root / f"{name}-{dtype}", dtype=dtype,
                                                   progress=False))
    return out


def _diff(a, b) -> str:
    d = (a.float().cpu() - b.float().cpu()).abs()
    return f"max diff {d.max().item():.3g}, mean diff {d.mean().item():.3g}"


def _close(a, b, atol=ATOL, what=""):
    assert torch.allclose(a.float().cpu(), b.float().cpu(), atol=atol, rtol=0), f"{what}: {_diff(a, b)}"


IDS = torch.randint(0, 256, (29,), generator=torch.Generator().manual_seed(1)).tolist()


# -- prefill: logits and KV caches ------------------------------------------------------------------
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("model", ["llama-f32", "llama-q4", "llama-q8", "qwen2-f32", "mixtral-f32",
                                   "mixtral-q4"])
def test_prefill_matches_torch(stores, model, spec):
    store = stores[model]
    ref, eng = load_dense(store), load_dense(store)
    prefill = backends.make_prefill(eng, spec)
    atol = ATOL_Q8 if model.endswith("q8") and spec.startswith("ort") else ATOL
    s_ref, s = ref.new_session(), eng.new_session()
    for part in (IDS[:20], IDS[20:]):  # the second chunk attends over the first one's KV
        _close(prefill(s, part), ref.prefill(s_ref, part), atol, f"{model} {spec} logits")
    for i, (c, r) in enumerate(zip(s.caches, s_ref.caches)):
        assert c.offset == r.offset == len(IDS)
        _close(c.k[:, :, :c.offset], r.k[:, :, :r.offset], atol, f"{model} {spec} layer {i} K")
        _close(c.v[:, :, :c.offset], r.v[:, :, :r.offset], atol, f"{model} {spec} layer {i} V")


@pytest.mark.parametrize("spec", SPECS)
def test_greedy_tokens_match_torch(stores, spec):
    store = stores["llama-f32"]
    ref, eng = load_dense(store), load_dense(store, backends=backends.phases(spec))
    want = list(generate_step(ref.new_session(), IDS, make_sampler(), 12))
    got = list(generate_step(eng.new_session(), IDS, make_sampler(), 12))
    assert got == want


@needs_ort
def test_static_bucket_pads_and_chunks(stores):
    """Static shapes: 29 tokens run as two padded 16-token chunks into a 64-long KV buffer."""
    store = stores["llama-f32"]
    ref, eng = load_dense(store), load_dense(store)
    prefill = backends.make_prefill(eng, "ort:CPU@16", max_len=64)
    assert prefill.describe()["shapes"] == "static 16/64"
    s_ref, s = ref.new_session(), eng.new_session()
    _close(prefill(s, IDS), ref.prefill(s_ref, IDS), what="static bucket logits")
    assert s.caches[0].k.shape[2] == 64 and s.caches[0].offset == len(IDS)
    for t in (5, 77):  # decode continues on torch from the ORT-written cache
        _close(eng.decode(s, t), ref.decode(s_ref, t), what="decode after static prefill")
    with pytest.raises(TiercacheError, match="static KV length"):
        prefill(s, IDS + IDS)


@needs_ort
def test_chunked_prefill_without_store_matches_torch(stores):
    """Dynamic shapes, prompt split into 8-token pieces (each attends over the earlier ones);
    no store: weights from the model's parameters, graphs kept in memory."""
    from backends.runner import Phase
    store = stores["qwen2-f32"]
    ref, eng = load_dense(store), load_dense(store)
    be = backends.get_backend("ort:CPU", chunk=8).bind(eng.model)
    assert be.describe()["graphs"] == "in memory"
    got = Phase(eng.model, be, "ort")(eng.new_session(), IDS)
    _close(got, ref.prefill(ref.new_session(), IDS), what="chunked, no store")


@needs_ort
def test_kv_written_in_place(stores):
    """The new K/V land in the session's own buffer (IOBinding, no copy back)."""
    eng = load_dense(stores["llama-f32"])
    prefill = backends.make_prefill(eng, "ort:CPU")
    s = eng.new_session()
    prefill(s, IDS[:20])
    ptrs = [(c.k.data_ptr(), c.v.data_ptr()) for c in s.caches]
    prefill(s, IDS[20:])
    assert ptrs == [(c.k.data_ptr(), c.v.data_ptr()) for c in s.caches]
    assert all(c.k[:, :, 20:29].abs().sum() > 0 for c in s.caches)


# -- the other kernels of the interface ----------------------------------------------------------
@pytest.mark.parametrize("spec", SPECS)
def test_attention_step_matches_torch(stores, spec):
    store = stores["mixtral-f32"]
    ref, eng = load_dense(store), load_dense(store)
    be = backends.get_backend(spec).bind(eng.model, store)
    tb = backends.get_backend("torch").bind(ref.model, store)
    c, c_ref = eng.model.make_cache()[0], ref.model.make_cache()[0]
    h = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(2))
    for lo, hi in ((0, 5), (5, 6)):  # a prompt, then one decode step
        cos, sin = ref.model.rope(lo, hi - lo, "cpu")
        got = be.attention(1, be.to_device(h[:, lo:hi]), be.to_device(cos), be.to_device(sin), c)
        _close(got, tb.attention(1, h[:, lo:hi], cos, sin, c_ref), what=f"{spec} attention")


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("act", ["silu", "relu", "gelu_pytorch_tanh"])
def test_sparse_ffn_matches_reference(spec, act):
    g = torch.Generator().manual_seed(3)
    x, gate, up, down_t = (torch.randn(n, 64, generator=g) for n in (7, 40, 40, 40))
    got = backends.get_backend(spec).sparse_ffn(x, gate, up, down_t, act)
    _close(got, reference_sparse_ffn(x, gate, up, down_t, act), atol=1e-3, what=f"{spec} {act}")


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dtype", ["q8", "q4"])
def test_qmatmul_matches_dequantized(spec, dtype):
    g = torch.Generator().manual_seed(4)
    w = QuantWeight.encode(torch.randn(48, 96, generator=g), dtype)
    x = torch.randn(2, 5, 96, generator=g)
    got = backends.get_backend(spec).qmatmul(x, w)
    # q8 through accuracy_level 4 quantizes x to int8 blocks: ~1e-2 on outputs of magnitude ~10
    _close(got, x @ w.dequantize().t(), atol=5e-2 if dtype == "q8" else 1e-3, what=f"{spec} {dtype}")


def test_q4_repack_is_exact():
    w = torch.randn(8, 64)
    w[3, :32] = 0.25  # a constant block: scale 0, restored through the zero point
    qw = QuantWeight.encode(w, "q4")
    p = nbits.repack(qw)
    q = torch.stack([p["B"] & 15, p["B"] >> 4], dim=-1).float().view(8, 2, 32)
    back = ((q - p["zp"].view(8, 2, 1)) * p["scales"].view(8, 2, 1)).view(8, 64)
    _close(back, quant.decode(qw.raw, (8, 64), "q4"), atol=1e-5, what="q4 repack")


# -- selection, errors, reports -------------------------------------------------------------------
def test_missing_onnxruntime_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now fails
    msg = r"ONNX Runtime is not installed: pip install 'tiercache\[cpu\]' \(or \[gpu\]\)"
    with pytest.raises(TiercacheError, match=msg):
        backends.get_backend("ort")
    assert backends.auto_spec("prefill") in ("torch", "torch:cuda")


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(TiercacheError, match="unknown backend 'tpu'"):
        backends.get_backend("tpu")
    with pytest.raises(TiercacheError, match="bad bucket"):
        backends.get_backend("ort:CPU@x")


@needs_ort
def test_missing_provider_warns_and_reports_fallback():
    from backends.ort_backend import ProviderFallbackWarning
    if "OpenVINOExecutionProvider" in _ort_providers():
        pytest.skip("OpenVINO is installed here")
    with pytest.warns(ProviderFallbackWarning, match="OpenVINOExecutionProvider"):
        be = backends.get_backend("ort:OpenVINO")
    assert be.provider == "CPUExecutionProvider"
    assert be.fallback == "OpenVINOExecutionProvider -> CPUExecutionProvider"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asking for CPU and getting CPU is silent
        assert backends.get_backend("ort:CPU").fallback is None


@needs_ort
def test_graphs_cached_next_to_store(stores, monkeypatch):
    store = stores["llama-f32"]
    backends.make_prefill(load_dense(store), "ort")
    files = sorted(p.name for p in (store.path / "onnx").glob("llama-f32-layer-dyn-*/layer*.onnx"))
    assert files == ["layer0.onnx", "layer1.onnx"]

    def no_export(*a, **k):
        raise AssertionError("exported again despite cached graphs")
    monkeypatch.setattr("backends.onnx_export.export_template", no_export)
    eng = load_dense(store)
    s = eng.new_session()
    backends.make_prefill(eng, "ort")(s, IDS)
    assert s.caches[0].offset == len(IDS)


@needs_ort
def test_phase_report_names_what_ran(stores):
    spec = "auto" if not torch.cuda.is_available() else "ort:CPU"
    eng = load_dense(stores["llama-f32"], backends=backends.phases(spec))
    eng.prefill(eng.new_session(), IDS)
    report = backends.phase_report(eng)
    assert report["prefill"]["provider"] == "CPUExecutionProvider"
    assert report["prefill"]["last_run"] == "CPUExecutionProvider"
    assert report["decode"]["provider"].startswith("torch:")
    assert backends.phase_report(load_dense(stores["qwen2-f32"]))["prefill"]["backend"] == "torch"


@needs_ort
@pytest.mark.skipif(torch.cuda.is_available(), reason="auto picks torch:cuda with a GPU")
def test_auto_rule(stores):
    """ORT for float stores, torch for q4 (MatMulNBits prefill measured slower), short prompts
    on torch."""
    f32 = backends.make_prefill(load_dense(stores["llama-f32"]), "auto")
    assert f32.backend.name == "ort" and f32.short.name == "torch"
    f32(load_dense(stores["llama-f32"]).new_session(), IDS[:3])
    assert f32.last is f32.short
    assert backends.make_prefill(load_dense(stores["llama-q4"]), "auto").backend.name == "torch"


@needs_ort
def test_q4_graph_runs_every_projection_through_matmulnbits(stores):
    """qkv, o, gate, up and down of a q4 store are MatMulNBits (down joined along K)."""
    import onnx
    backends.make_prefill(load_dense(stores["llama-q4"]), "ort")
    path = next((stores["llama-q4"].path / "onnx").glob("llama-q4-layer-dyn-*/layer0.onnx"))
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("MatMulNBits") == 5 and "MatMul" not in ops, ops


# -- auto never crashes ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def head_dim_4(tmp_path_factory):
    """A tiny Llama whose head size (4) ONNX Runtime's GroupQueryAttention rejects."""
    root = tmp_path_factory.mktemp("hd4")
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=256, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=True)
    T.LlamaForCausalLM(cfg).save_pretrained(root / "hf")
    return Store(convert(root / "hf", root / "store", dtype="f32", progress=False))


@needs_ort
@pytest.mark.parametrize("spec", ["auto", "ort"])
def test_a_graph_ort_rejects_falls_back_to_torch_with_one_warning(head_dim_4, spec):
    from backends.base import BackendFallbackWarning
    if spec == "auto" and torch.cuda.is_available():
        pytest.skip("auto picks torch:cuda with a GPU")
    ref = load_dense(head_dim_4)
    with pytest.warns(BackendFallbackWarning, match="multiple of 8") as seen:
        eng = load_dense(head_dim_4, backends=backends.phases(spec))
    assert len([w for w in seen if issubclass(w.category, BackendFallbackWarning)]) == 1
    assert "\n" not in str(seen[0].message)
    assert backends.phase_report(eng)["prefill"]["backend"] == "torch"
    want = list(generate_step(ref.new_session(), IDS, make_sampler(), 6))
    assert list(generate_step(eng.new_session(), IDS, make_sampler(), 6)) == want


@needs_ort
def test_ort_failing_at_run_time_falls_back_and_keeps_the_caches(stores, monkeypatch):
    """A node the provider rejects only when it runs: the call's KV writes are dropped, it
    reruns on torch (one warning), and every later call stays on torch."""
    from backends.base import BackendFallbackWarning
    from backends.ort_backend import OrtBackend
    store = stores["llama-f32"]
    ref, eng = load_dense(store), load_dense(store)
    prefill = backends.make_prefill(eng, "ort:CPU")
    s_ref, s = ref.new_session(), eng.new_session()
    _close(prefill(s, IDS[:20]), ref.prefill(s_ref, IDS[:20]), what="before")

    def rejects(self, layers, h, cos, sin, caches):
        kv = torch.zeros(1, 2, h.shape[1], 16)  # a write the failed call leaves behind
        caches[0].update_and_fetch(kv, kv)
        raise RuntimeError("Non-zero status code returned while running SomeNode")
    monkeypatch.setattr(OrtBackend, "prefill_layers", rejects)
    with pytest.warns(BackendFallbackWarning, match="SomeNode"):
        got = prefill(s, IDS[20:])
    _close(got, ref.prefill(s_ref, IDS[20:]), what="after the fallback")
    assert [c.offset for c in s.caches] == [len(IDS)] * 2
    assert prefill.last.name == "torch" and prefill.backend.name == "torch"


def test_a_backend_this_machine_lacks_fails_in_one_line(stores, monkeypatch):
    if not torch.cuda.is_available():
        with pytest.raises(TiercacheError, match="no CUDA GPU") as e:
            load_dense(stores["llama-f32"], backends=backends.phases("torch:cuda"))
        assert "\n" not in str(e.value)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    with pytest.raises(TiercacheError, match="ONNX Runtime is not installed") as e:
        backends.get_backend("ort:CPU")
    assert "\n" not in str(e.value)
