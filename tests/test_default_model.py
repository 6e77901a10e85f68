"""The real default model (SmolLM2-135M-Instruct, GGUF from PyPI): tiercache's greedy tokens
equal transformers' on the same GGUF, for chat prompts, dense and tiered; and the default path
(the q4 store on the int4 kernel, tiered, resident and streaming) equals the q4 store's dense
float32 reference."""
import pytest
import torch

from tiercache import hub
from tiercache.engine import generate_step, load_dense, make_sampler
from tiercache.engine.tiered import TierConfig, load_tiered
from tiercache.errors import TiercacheError
from tiercache.store.format import Store
from tiercache.tokenizer import Tokenizer

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Explain in one sentence why the sky is blue."]
STEPS = 24

pytestmark = [pytest.mark.network, pytest.mark.slow]


@pytest.fixture(scope="module")
def default_store():
    try:
        return hub.resolve_model(hub.DEFAULT_MODEL, dtype="f32")  # in the suite's own home
    except TiercacheError as e:
        pytest.skip(f"default model unavailable: {e}")


@pytest.fixture(scope="module")
def q4_store():
    """The store users run: the default dtype (q4, clusters of 64: the int4 kernel's q4k)."""
    try:
        return hub.resolve_model(hub.DEFAULT_MODEL)
    except TiercacheError as e:
        pytest.skip(f"default model unavailable: {e}")


@pytest.fixture(scope="module")
def q4_reference(q4_store):
    """Greedy tokens and last-prompt-token logits of the q4 store through the dense float32
    engine (the naive reference: every weight dequantized, no tiering, no int4 kernel)."""
    engine, tok = load_dense(Store(q4_store)), Tokenizer(q4_store)  # (its own: no cache shared)
    out = {}
    for p in PROMPTS:
        ids = tok.encode_chat([{"role": "user", "content": p}])
        out[p] = (ids, _greedy(engine, ids), engine.logits(engine.new_session(), ids)[-1])
    return out


@pytest.fixture(scope="module")
def reference(default_store):
    """Greedy continuations from transformers loading the same GGUF (no EOS stop)."""
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM
    gguf = hub.fetch_gguf(hub.DEFAULT_MODEL)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=torch.float32).eval()
    tok = Tokenizer(default_store)
    out = {}
    for p in PROMPTS:
        ids = tok.encode_chat([{"role": "user", "content": p}])
        x = torch.tensor([ids])
        with torch.no_grad():
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=STEPS,
                               do_sample=False, eos_token_id=None, pad_token_id=0)
        out[p] = (ids, y[0, len(ids):].tolist())
    return out


def _greedy(engine, ids):
    return list(generate_step(engine.new_session(), ids, make_sampler(), STEPS))


def test_dense_matches_transformers(default_store, reference):
    engine = load_dense(Store(default_store))
    for p, (ids, want) in reference.items():
        assert _greedy(engine, ids) == want, p


def test_tiered_streaming_matches_transformers(default_store, reference):
    """Tiered with half the clusters pinned and a cold LRU of two layers' clusters, nothing
    skipped: the same tokens (one prompt: each token streams ~150 MB of f32 clusters)."""
    store = Store(default_store, readahead=False)
    slot = 2 * store.cluster_size * store.args.hidden_size * 4
    total = store.args.num_hidden_layers * store.n_clusters
    engine = load_tiered(store, TierConfig(hot_bytes=total // 2 * slot, sparse=False, context=256,
                                           cold_bytes=2 * store.n_clusters * slot))
    ids, want = reference[PROMPTS[0]]
    assert _greedy(engine, ids) == want
    assert engine.stats()["store_bytes_read"] > 0


# torch's int4 kernel runs on bf16 activations: its logits differ from the float32 reference by
# ~1-3% of their spread (measured 0.016-0.03 x std on AVX2); ORT's MatMulNBits, which runs the
# resident weights, and tiercache's own int4 kernel (engine/q4.py, every other q4 weight where
# it verifies) quantize activations to int8 per group of 32, and SmolLM2's outlier
# channels make that coarser (max 0.22, mean 0.04 x std; dev-eval perplexity 25.25 against
# 25.14 on torch's kernel and 25.11 dense, 2048 tokens). Its int8 rounding also amplifies any
# small change upstream: rounding layer 0's keys to f16 (the default KV cache) moves the last
# logits by 0.36 x std on it, by 0.004 on the float32 kernels; with an f16 cache, and the
# norms and RoPE computed in ORT, the France prompt's logits are max 0.45, mean 0.22 x std
# from the reference. That is rounding noise, not lost quality: dev-eval perplexity (2048
# tokens, windows of 512) is 19.60 on this path and 19.61 dense, so the perplexity test below
# holds it to 1% of the reference, and the logits to Q4_LOGIT_TOL. Greedy tokens must then agree
# except at a near-tie: where the engine picks another token, the reference must have scored
# it within Q4_TIE x std of its own choice (SmolLM2 on "What is the capital of France?" has
# "The" 25.19 vs "L" 25.15, a 0.005 x std tie, at the first step), and the check stops there.
Q4_LOGIT_TOL = {"torch": 0.1, "int8": 0.6}  # by the activations: torch's bf16, or int8 (ORT's,
# and tiercache's own kernel, q4.py, which quantizes them as MatMulNBits does)
Q4_TIE = 0.05


def _check_q4(engine, q4_reference, dense, prompts=PROMPTS):
    kernel = engine.stats().get("pinned_kernel")  # "ort-nbits for 12 of 30 layers": ORT's too
    tol = Q4_LOGIT_TOL["torch" if kernel == "torch" else "int8"]  # (the lean runtime: int8)
    for p in prompts:
        ids, want, ref = q4_reference[p]
        got = torch.as_tensor(engine.logits(engine.new_session(), ids)[-1])
        diff = (got - ref).abs() / ref.std()
        assert diff.max() < tol, f"{p!r}: max {diff.max():.3g} mean {diff.mean():.3g} x std"
        tokens = _greedy(engine, ids)
        if tokens == want:
            continue
        i = next(i for i, (a, b) in enumerate(zip(tokens, want)) if a != b)
        at = dense.logits(dense.new_session(), ids + want[:i])[-1]
        gap = float(at[want[i]] - at[tokens[i]]) / float(at.std())
        assert gap < Q4_TIE, (f"{p!r}: step {i} chose {tokens[i]} where the reference's "
                              f"{want[i]} led by {gap:.3g} x std (not a near-tie)")


@pytest.fixture(scope="module")
def q4_dense(q4_store):
    return load_dense(Store(q4_store))


@pytest.mark.parametrize("compute", ["auto", "nbits", "torch"])
def test_q4_tiered_resident_matches_dense(q4_store, q4_reference, q4_dense, compute):
    """auto: what users run (kernels.resident_kernel: tiercache's q4 kernel on AVX-512 VNNI,
    else ORT's MatMulNBits where installed); nbits: ORT's wherever installed."""
    import gc
    gc.collect()  # the other parametrization's engine may still hold the store open
    engine = load_tiered(Store(q4_store), TierConfig(context=256, compute=compute))
    assert engine.stats()["compute"] == "int4"
    _check_q4(engine, q4_reference, q4_dense)


def test_q4_lean_matches_dense(q4_store, q4_reference, q4_dense):
    """What `tiercache chat` runs by default where the CPU has the kernel's AVX2 or VNNI path:
    the lean runtime (no torch) on the q4 store, against the dense float32 reference."""
    from tiercache import lean
    store = Store(q4_store)
    if lean.why_not(store) is not None:
        pytest.skip(f"the lean runtime does not run here: {lean.why_not(store)}")
    _check_q4(lean.LeanEngine(store, context=256), q4_reference, q4_dense)


def test_q4_lean_perplexity_matches_dense(q4_store, q4_dense):
    """The lean runtime scores a text within 1% of the dense float32 reference's perplexity
    (as the tiered engine does below)."""
    from pathlib import Path
    from tiercache import lean
    from tiercache.evaluate import perplexity
    store = Store(q4_store)
    if lean.why_not(store) is not None:
        pytest.skip(f"the lean runtime does not run here: {lean.why_not(store)}")
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    ids = Tokenizer(q4_store).encode(readme)[:512]
    got = perplexity(lean.LeanEngine(store, context=256), ids, 256)
    want = perplexity(q4_dense, ids, 256)
    assert abs(got / want - 1) < 0.01, f"perplexity {got:.3f} vs dense {want:.3f}"


def test_q4_tiered_part_on_matmulnbits_matches_dense(q4_store, q4_reference, q4_dense):
    """A budget that holds every weight but only part of MatMulNBits' packing: the first
    layers run on it, the rest (and the head) on torch's kernels, in one model."""
    import gc
    from tiercache.engine import nbits
    if not nbits.available():
        pytest.skip("onnxruntime's MatMulNBits is not installed or does not verify here")
    from tiercache.engine.layout import FILE_RESERVE
    from tiercache.memory import anon_bytes, return_large_frees, trim_heap
    gc.collect()
    full = load_tiered(Store(q4_store), TierConfig(context=256, compute="nbits")).budget  # no
    # runtime counted
    per_byte = full.prepacked - nbits.WORKSPACE  # what grows with the weights (SmolLM2's load
    # transient, 3 of its layers, is under the fixed workspace)
    gc.collect()
    return_large_frees()
    trim_heap()
    runtime = anon_bytes() + FILE_RESERVE  # as the engine counts this process before weights
    engine = load_tiered(Store(q4_store), TierConfig(  # every weight, half the packing's extra
        context=256, compute="nbits", ram_bytes=full.total - per_byte // 2 + runtime))
    b, layers = engine.budget, engine.args.num_hidden_layers
    assert 0 < len(b.nbits_layers) < layers and not b.nbits_head and b.streaming == 0
    n = len(b.nbits_layers)
    assert engine.stats()["pinned_kernel"] == f"ort-nbits for {n} of {layers} layers"
    _check_q4(engine, q4_reference, q4_dense)


def test_q4_default_engine_perplexity_matches_dense(q4_store, q4_dense):
    """The default engine (tiered, resident, ORT's MatMulNBits where it verifies, f16 KV)
    scores a text within 1% of the dense float32 reference's perplexity (README.md: text the
    model was not tuned on; 512 tokens in windows of 256)."""
    import gc
    from pathlib import Path
    from tiercache.evaluate import perplexity
    gc.collect()
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    ids = Tokenizer(q4_store).encode(readme)[:512]
    engine = load_tiered(Store(q4_store), TierConfig(context=256))
    got, want = perplexity(engine, ids, 256), perplexity(q4_dense, ids, 256)
    assert abs(got / want - 1) < 0.01, f"perplexity {got:.3f} vs dense {want:.3f}"


def test_q4_tiered_streaming_matches_dense(q4_store, q4_reference, q4_dense):
    """Half the layers' clusters and attention pinned, the head streamed: the rest streams
    through the arenas (the AVX2 reshuffle runs on every read)."""
    import gc
    gc.collect()  # an engine of an earlier test may still hold this store's LMDB environment
    store = Store(q4_store)
    half = store.args.num_hidden_layers * store.n_clusters // 2
    engine = load_tiered(store, TierConfig(hot_clusters=half, cold_clusters=0, pin_attention=15,
                                           pin_head=False, sparse=False, context=256))
    assert engine.budget.streaming > 0 and not engine.budget.head_pinned
    _check_q4(engine, q4_reference, q4_dense, PROMPTS[:2])
    assert engine.stats()["store_bytes_read"] > 0


def test_chat_answer_is_sensible():
    """What a user runs: the known model's name, its default q4 store, the default engine."""
    from tiercache import api
    engine, tok = api.load(hub.DEFAULT_MODEL)
    # not PROMPTS[0]: its first token is a near-tie that bf16 activations tip to "L'Étoile..."
    text = api.generate(engine, tok, "What is the capital of Germany?", max_tokens=16)
    assert "Berlin" in text


def test_planner_predicts_the_engines_budget_on_the_default_model(q4_store):
    """layout.place as the planner calls it equals the engine's own budget on SmolLM2 (torch's
    int4 kernel: the planner does not model MatMulNBits's prepacked copies)."""
    from test_layout import planner_matches_engine
    planner_matches_engine(q4_store, "torch")
