"""The KV cache's dtype: f16 (the default of the tiered engine and the API) against f32 KV,
its bytes in the budget, and ONNX Runtime prefill writing into an f16 cache."""
import importlib.util

import pytest
import torch

from tiercache.engine import generate_step, load_dense, make_sampler
from tiercache.engine.tiered import TierConfig, load_tiered
from tiercache.errors import TiercacheError
from tiercache.models.kv import KVCache, Scratch, kv_bytes
from tiercache.store.format import Store

IDS = list(range(3, 60))
# f16 keeps 11 bits of mantissa: keys and values round by <= 2^-11 relative, which moved the
# tiny models' logits by ~1e-3 (their logits are O(1))
ATOL = 1e-2


def _logits(engine, ids=IDS):
    return engine.logits(engine.new_session(), ids)


def _greedy(engine, ids=IDS, n=12):
    return list(generate_step(engine.new_session(), ids, make_sampler(), n))


@pytest.mark.parametrize("kind,dtype", [("llama", "f32"), ("qwen2", "f32"), ("mixtral", "f32"),
                                        ("llama", "q4")])
def test_f16_kv_against_f32_kv(stores, kind, dtype):
    store = stores(kind, dtype)
    ref = load_tiered(Store(store), TierConfig(kv="f32"))
    eng = load_tiered(Store(store), TierConfig())  # the default
    assert eng.new_session().caches[0].dtype == torch.float16
    want, got = _logits(ref), _logits(eng)
    diff = (got - want).abs()
    assert diff.max() < ATOL, f"max {diff.max():.3g} mean {diff.mean():.3g}"
    assert diff.max() > 0  # the f16 cache is really in use
    assert _greedy(eng) == _greedy(ref)


def test_f16_kv_is_half_the_bytes_plus_one_layer_of_scratch(stores):
    store = Store(stores("llama", "f32"))
    a = store.args
    per_layer = 2 * a.num_key_value_heads * a.head_dim
    assert kv_bytes(a, 256, "f32") == per_layer * a.num_hidden_layers * 4 * 256
    assert kv_bytes(a, 256, "f16") == per_layer * (a.num_hidden_layers * 2 + 4) * 256
    eng = load_tiered(store, TierConfig(ram_bytes=1 << 30, context=256))
    assert eng.budget.kv == kv_bytes(a, 256, "f16")
    s = eng.new_session()
    list(generate_step(s, IDS, make_sampler(), 4))
    stored = sum(c.nbytes for c in s.caches)
    assert stored == kv_bytes(a, 256, "f16") - per_layer * 4 * 256  # scratch not in nbytes
    scratch = s.caches[0].scratch
    assert all(c.scratch is scratch for c in s.caches)  # one buffer for every layer
    assert scratch.k.dtype == torch.float32 and scratch.k.shape[2] == 256


def test_scratch_read_back_equals_the_cache():
    cache = KVCache(1, 2, 8, torch.float16, scratch=Scratch())
    k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    gk, gv = cache.update_and_fetch(k, v)
    assert gk.dtype == torch.float32 and gk.shape == (1, 2, 5, 8)
    assert torch.equal(gk, k.half().float()) and torch.equal(gv, v.half().float())
    k2, v2 = torch.randn(1, 2, 300, 8), torch.randn(1, 2, 300, 8)  # grows past one step
    gk, gv = cache.update_and_fetch(k2, v2)
    assert gk.shape[2] == 305 and torch.equal(gk[:, :, 5:], k2.half().float())
    assert torch.equal(gv[:, :, :5], v.half().float())


def test_unknown_kv_dtype_is_refused_in_one_line(stores):
    with pytest.raises(TiercacheError, match="unknown KV cache dtype 'q3'"):
        load_tiered(Store(stores("llama", "f32")), TierConfig(kv="q3"))
    with pytest.raises(TiercacheError, match="unknown KV cache dtype"):
        load_dense(Store(stores("llama", "f32")), kv="bf8")


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None,
                    reason="onnxruntime is not installed")
def test_ort_prefill_writes_an_f16_cache(stores):
    import backends
    store = Store(stores("llama", "f32"))
    ref = load_tiered(store, TierConfig())
    eng = load_tiered(Store(stores("llama", "f32")), TierConfig(),
                      backends.phases("ort:CPU", decode=False))
    s_ref, s = ref.new_session(), eng.new_session()
    with torch.inference_mode():
        a, b = ref.prefill(s_ref, IDS), eng.prefill(s, IDS)
    assert s.caches[0].dtype == torch.float16 and s.caches[0].offset == len(IDS)
    assert (a - b).abs().max() < ATOL
    for c_ref, c in zip(s_ref.caches, s.caches):
        n = c.offset
        assert (c.k[:, :, :n].float() - c_ref.k[:, :, :n].float()).abs().max() < ATOL
    with torch.inference_mode():  # decode on torch continues from what ORT wrote
        assert (ref.decode(s_ref, 7) - eng.decode(s, 7)).abs().max() < ATOL
