"""The dense engine against HF transformers on the same weights."""
import pytest
import torch

from tiercache.engine import generate_step, load_dense, make_sampler
from tiercache.store.format import Store

# max |logit difference| allowed per store dtype, as a fraction of the reference logits' std
# (~0.6 on these tiny models): f32 is exact, the others are lossy by design. Measured:
# f16 0.4%, bf16 3%, q8 9%, q4 66-124% (d=64 leaves two q4 groups per row); exactness of the
# quantized path itself is checked against transformers on the dequantized weights below.
TOL = {"f32": 2e-4, "f16": 0.01, "bf16": 0.06, "q8": 0.15, "q4": 1.6}
KINDS = ["llama", "llama3", "qwen2", "mixtral"]


def _ids(n=24, seed=1):
    return torch.randint(0, 250, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", list(TOL))
def test_logits_match_transformers(hf_models, stores, kind, dtype):
    hf, _ = hf_models[kind]
    ids = _ids()
    with torch.no_grad():
        ref = hf(ids).logits[0]
    eng = load_dense(Store(stores(kind, dtype)))
    got = eng.logits(eng.new_session(), ids[0].tolist())
    diff = (ref - got).abs() / ref.std()
    assert diff.max() < TOL[dtype], f"{kind}/{dtype}: max {diff.max():.3g} mean {diff.mean():.3g} (x std)"


@pytest.mark.parametrize("kind, dtype, cluster", [("llama", "q8", 32), ("llama", "q4", 32),
                                                  ("mixtral", "q8", 32), ("mixtral", "q4", 32),
                                                  ("llama3", "q4", 64)])  # the last is q4k
def test_quantized_store_is_exact_to_its_dequantized_weights(hf_models, stores, kind, dtype,
                                                             cluster, tmp_path):
    """transformers loading the store's dequantized weights gives the engine's logits."""
    import shutil
    import transformers
    from safetensors.torch import save_file
    store = Store(stores(kind, dtype, cluster))
    assert store.ffn_dtype == ("q4k" if cluster == 64 else dtype)
    save_file({_hf_name(k): v.contiguous() for k, v in store.weights()}, tmp_path / "model.safetensors")
    shutil.copy(hf_models[kind][1] / "config.json", tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = _ids()
    with torch.no_grad():
        ref = hf(ids).logits[0]
    eng = load_dense(store)
    diff = (ref - eng.logits(eng.new_session(), ids[0].tolist())).abs()
    assert diff.max() < 1e-4, f"{kind}/{dtype}: max {diff.max():.3g} mean {diff.mean():.3g}"


def _hf_name(name: str) -> str:
    """Mixtral checkpoints call the expert projections w1/w3/w2."""
    if ".experts." in name:
        for ours, theirs in ((".gate_proj.", ".w1."), (".up_proj.", ".w3."), (".down_proj.", ".w2.")):
            name = name.replace(ours, theirs)
    return name


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_tokens_match_transformers(hf_models, stores, kind):
    hf, _ = hf_models[kind]
    ids = _ids(12, seed=2)
    with torch.no_grad():
        # explicit mask: generate would otherwise treat prompt ids equal to pad as padding
        # no EOS: the engine's generate_step leaves stopping to its caller
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32,
                          do_sample=False, eos_token_id=None, pad_token_id=0)[0, 12:].tolist()
    eng = load_dense(Store(stores(kind)))
    got = list(generate_step(eng.new_session(), ids[0].tolist(), make_sampler(), 32))
    assert got == ref


def test_incremental_decode_equals_full_forward(stores):
    """Prefill + token-by-token decode (KV cache) gives the logits of one full pass."""
    eng = load_dense(Store(stores("qwen2")))
    ids = _ids(16)[0].tolist()
    full = eng.logits(eng.new_session(), ids)
    s = eng.new_session()
    steps = [eng.prefill(s, ids[:5])] + [eng.decode(s, t) for t in ids[5:]]
    diff = (torch.stack(steps) - full[4:]).abs().max()
    assert diff < 1e-4, f"max {diff:.3g}"


def test_session_reuses_cached_prefix(stores):
    eng = load_dense(Store(stores("llama")))
    s = eng.new_session()
    a, b = _ids(10)[0].tolist(), _ids(6, seed=5)[0].tolist()
    eng.prefill(s, a)
    rest = s.reuse_prefix(a + b)
    assert rest == b and s.caches[0].offset == len(a)
    rest = s.reuse_prefix(a[:4] + b)  # a divergent history trims the cache
    assert rest == b and s.caches[0].offset == 4
