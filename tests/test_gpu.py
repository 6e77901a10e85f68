"""On a CUDA machine `auto` never crashes: every tensor a module touches is on one device.

The tiered engine's modules (slots, int4 kernels, streamed units) compute on the CPU, so on a
GPU machine `auto` picks a CPU backend for it; the dense engine runs on torch:cuda with its
ids on the model's device. Both are checked against the dense engine on the CPU: the same
greedy tokens, and logits within TOL (f32: float32 on another device; q4: the int4 kernel's
bf16 activations, as tests/test_tiered.py's KERNEL_TOL). Skipped without CUDA.
"""
import pytest
import torch

import backends
from tiercache.engine import generate_step, load_dense, make_sampler
from tiercache.engine.tiered import TierConfig, load_tiered
from tiercache.store.format import Store

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]

IDS = list(range(3, 40))
TOL = {"f32": 1e-3, "q4": 0.15}  # max |logit difference| / std of the reference


def _check(engine, ref, dtype):
    want = ref.logits(ref.new_session(), IDS)
    got = engine.logits(engine.new_session(), IDS).float().cpu()
    rel = (got - want).abs().max() / want.std()
    assert rel < TOL[dtype], f"max diff {rel:.3g} x std"
    greedy = make_sampler()
    a = list(generate_step(ref.new_session(), IDS[:8], greedy, 12))
    assert list(generate_step(engine.new_session(), IDS[:8], greedy, 12)) == a


@pytest.mark.parametrize("dtype", ["f32", "q4"])
def test_tiered_auto_on_a_gpu_machine_matches_the_dense_cpu_reference(stores, dtype):
    path = stores("llama", dtype, 64)
    ref = load_dense(Store(path))
    eng = load_tiered(Store(path), TierConfig(sparse=False, kv="f32"),  # as the reference
                      backends.phases("auto", decode=False))
    assert eng.device.type == "cpu"  # its modules live in RAM: auto chose a CPU backend
    _check(eng, ref, dtype)


@pytest.mark.parametrize("dtype", ["f32", "q4"])
def test_dense_on_cuda_matches_the_dense_cpu_reference(stores, dtype):
    path = stores("llama", dtype, 64)
    ref = load_dense(Store(path))
    eng = load_dense(Store(path), backends=backends.phases("torch:cuda", decode=False))
    assert eng.device.type == "cuda"
    _check(eng, ref, "f32")  # dense dequantizes a q4 store to float32


def test_qembedding_takes_ids_from_another_device():
    from tiercache.engine.kernels import QEmbedding, QLinear, int4_ok
    from tiercache.store import quant
    w = torch.randn(128, 64)
    if not int4_ok(w.shape):
        pytest.skip("no int4 kernel on this CPU")
    emb = QEmbedding(QLinear(quant.encode(w, "q4"), w.shape))
    ids = torch.tensor([[1, 5, 7]])
    got = emb(ids.cuda())
    assert got.device.type == "cuda"
    assert torch.equal(got.cpu(), emb(ids))
