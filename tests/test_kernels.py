"""The CPU kernels against float references, on this CPU: the int4 kernel's packed layout
differs between CPUs (row blocks of 64 on AVX-512, 32 on AVX2), so the layout the engine uses
is checked here, not assumed."""
import os
import pytest
import torch

from tiercache.engine import kernels, q4
from tiercache.engine.slots import Block, Float32Slots, Int4Slots
from tiercache.store import quant

needs_int4 = pytest.mark.skipif(not kernels.int4_available(),
                                reason=f"no int4 layout verified on this CPU "
                                       f"({torch.backends.cpu.get_cpu_capability()})")


def _q4k(rows, cols, seed=0):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    raw = torch.frombuffer(bytearray(quant.encode(w, "q4k")), dtype=torch.uint8)
    return raw, quant.decode(raw.clone(), (rows, cols), "q4k")


def _check(got, ref, what, rel=0.02):
    err = (got - ref).abs()
    assert err.max() <= rel * ref.abs().max(), (
        f"{what} on {kernels.cpu_capability()}: max {err.max():.3g} mean {err.mean():.3g} "
        f"against |ref| max {ref.abs().max():.3g}")


def test_layout_verified_when_the_kernel_exists():
    """The self-check finds a layout wherever torch has the kernel (a CPU where neither known
    layout verifies would silently lose the int4 path: that should be noticed)."""
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        pytest.skip("torch has no int4 CPU kernel")
    assert kernels.int4_layout() in (1, 2), kernels.cpu_capability()


@needs_int4
def test_pack_equals_torchs_own_conversion():
    if not hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"):
        pytest.skip("torch has no int4 conversion op")
    q = torch.randint(0, 16, (192, 96), generator=torch.Generator().manual_seed(3),
                      dtype=torch.uint8)
    ref = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.int(), 1)
    assert torch.equal(kernels.int4_pack(q, kernels.int4_layout()).reshape(ref.shape), ref)


@needs_int4
@pytest.mark.parametrize("tokens", [1, 7])
def test_qlinear_from_store_record_matches_dequantized(tokens):
    raw, w = _q4k(128, 96)
    lin = kernels.QLinear.from_q4k(raw, (128, 96))
    x = torch.randn(tokens, 96)
    _check(lin(x), x.bfloat16().float() @ w.T, "QLinear")
    ids = torch.tensor([0, 17, 31, 32, 63, 64, 100, 127])
    assert torch.allclose(lin.rows(ids), w[ids], atol=1e-2), "embedding rows"


@needs_int4
def test_slots_and_blocks_match_float32_slots():
    """Clusters through the int4 slot pool, a Block joined from records (the streamer's path)
    and one built from prepared slots all equal the float32 slots on the same records."""
    n, d, k = 64, 128, 3
    gate_up = [_q4k(n, d, seed=i)[0] for i in range(k)]
    down = [_q4k(d, n, seed=10 + i)[0] for i in range(k)]
    parts = [[((n, d), bytes(g.numpy())), ((d, n), bytes(dn.numpy()))]
             for g, dn in zip(gate_up, down)]
    ref = Float32Slots(k, n, d, "q4k")
    fast = Int4Slots(k, n, d)
    for i, p in enumerate(parts):
        ref.write(i, ref.prepare(p))
        fast.write(i, fast.prepare(p))
    slots = torch.tensor([2, 0])
    x, h = torch.randn(2, d), torch.randn(2, 2 * n)
    _check(fast.rows(x, slots), ref.rows(x.bfloat16().float(), slots), "Int4Slots.rows")
    _check(fast.down(h, slots), ref.down(h.bfloat16().float(), slots), "Int4Slots.down")
    recs = [torch.cat([g, dn]) for g, dn in zip(gate_up, down)]
    half = n * d // 2 + n * d // 32 * 4
    joined = Block.joined(recs, [((n, d), 0, half), ((d, n), half, half)], n, d)
    built = Block(Int4Slots, [fast.prepare(p) for p in parts])
    all3 = torch.arange(k)
    for b, what in ((joined, "Block.joined"), (built, "Block")):
        _check(b.rows(x), ref.rows(x.bfloat16().float(), all3), what + ".rows")
        h3 = torch.randn(2, k * n)
        _check(b.down(h3), ref.down(h3.bfloat16().float(), all3), what + ".down")


needs_nbits = pytest.mark.skipif(not __import__("tiercache.engine.nbits", fromlist=["x"]).available(),
                                 reason="ONNX Runtime's MatMulNBits is not installed or did not verify")


def _q4_grid(rows, cols, seed, symmetric):
    """Weights already on a Q4_0 grid (zero = 0: no correction term) or free floats (q4's
    min/max grid for most groups: the correction term runs)."""
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    if symmetric:  # through the gguf package's own Q4_0, as a GGUF file holds them
        from gguf import GGMLQuantizationType as Q
        from gguf.quants import dequantize, quantize
        w = torch.from_numpy(dequantize(quantize(w.numpy(), Q.Q4_0), Q.Q4_0).copy())
    raw = torch.frombuffer(bytearray(quant.encode(w, "q4k")), dtype=torch.uint8)
    return raw, quant.decode(raw.clone(), (rows, cols), "q4k")


@needs_nbits
@pytest.mark.parametrize("symmetric", [True, False])
def test_nbits_matmul_matches_dequantized(symmetric):
    """MatMulNBits quantizes activations to int8 per group of 32: ~1% of the output range."""
    from tiercache.engine import nbits
    raw, w = _q4_grid(192, 128, 1, symmetric)
    wt = nbits.q4k_weight(raw, (192, 128))
    assert (wt["zero"] is None) == symmetric
    bias = torch.randn(192)
    x = torch.randn(5, 128)
    _check(nbits.NBitsMatmul([wt], bias)(x), x @ w.T + bias, "NBitsMatmul", rel=0.03)


@needs_nbits
def test_nbits_ffn_block_matches_float():
    """One ORT call for a block of clusters (gate|up joined along N, down along K)."""
    from tiercache.engine import nbits
    n, d, k = 64, 128, 3
    gate, up, down = ([_q4_grid(*shape, seed=10 * p + i, symmetric=p == 1) for i in range(k)]
                      for p, shape in enumerate([(n, d), (n, d), (d, n)]))
    prepared = [tuple(quant.q4k_views(raw, raw_shape) for raw, raw_shape in
                      ((gate[i][0], (n, d)), (up[i][0], (n, d)), (down[i][0], (d, n))))
                for i in range(k)]
    block = nbits.NBitsBlock(prepared, "silu")
    x = torch.randn(4, d)
    g, u = torch.cat([w for _, w in gate]), torch.cat([w for _, w in up])
    dn = torch.cat([w for _, w in down], dim=1)
    ref = (torch.nn.functional.silu(x @ g.T) * (x @ u.T)) @ dn.T
    _check(block.ffn(x), ref, "NBitsBlock.ffn", rel=0.03)


@needs_nbits
def test_nbits_head_matches_the_int8_head():
    """The resident q8r head on 8-bit MatMulNBits (int8 activations) against the float32
    product of the same int8 rows; its rows come from the source it is given."""
    from tiercache.engine import nbits
    rows, cols = 320, 128
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(3))
    raw = torch.frombuffer(bytearray(quant.encode(w, "q8r")), dtype=torch.uint8)
    ref_w = quant.decode(raw.clone(), (rows, cols), "q8r")
    # in pieces that straddle the codes' end and the scales after them, as a store reads it
    pieces = [(lo, raw[lo:lo + 1000].clone()) for lo in range(0, raw.numel(), 1000)]
    scale = raw[rows * cols:].view(torch.bfloat16)
    head = nbits.NBitsHead(iter(pieces), scale, (rows, cols), lambda ids: ref_w[ids])
    x = torch.randn(3, cols)
    _check(head(x), x @ ref_w.T, "NBitsHead", rel=0.03)
    top = kernels.ExactTop(head)(x)  # the top logits exact, from the rows
    best = (x @ ref_w.T).argmax(-1)
    assert torch.equal(top.argmax(-1), best)
    assert torch.allclose(top.gather(1, best[:, None]), (x @ ref_w.T).gather(1, best[:, None]),
                          atol=1e-4)


def test_torch_threads_sleep_and_ort_sessions_share_one_pool():
    """Importing tiercache before torch makes torch's OpenMP threads passive (unless the user
    chose a policy), and only then do MatMulNBits sessions share one spinning ORT pool."""
    import subprocess
    import sys
    code = ("import os, tiercache, torch; from tiercache.engine import nbits; "
            "so = nbits.session_options(2) if nbits._ort() else None; "
            "print(os.environ.get('OMP_WAIT_POLICY'), tiercache.OMP_PASSIVE, "
            "None if so is None else so.use_per_session_threads)")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[:2] == ["PASSIVE", "True"] and out[2] in ("False", "None")
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[:2] == ["ACTIVE", "False"] and out[2] in ("True", "None")


# tiercache's own kernel (engine/q4.py): int8 activations per group of 32, so 2% of the largest
# output, as MatMulNBits' accuracy_level 4 is held to
needs_q4 = pytest.mark.skipif(not q4.available(), reason="tiercache._q4 not built or not verified")
PATHS = q4.isas() if q4.available() else []  # every path this CPU's flags allow, best first


def _q4_case(n, k, m, bn, seed, sym=False):
    """sym: the scales alone [K/32, N] (every zero 0, Q4_0's grid), else (scale, zero) pairs."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    sz = torch.stack([torch.rand(k // 32, n, generator=g) * 0.1 + 0.01,
                      torch.randn(k // 32, n, generator=g) * 0.1], -1).to(torch.bfloat16)
    if sym:
        sz = sz[..., 0].contiguous()
    zero = 0.0 if sym else sz[..., 1].float().T[..., None]
    w = ((q.float() - 8).view(n, k // 32, 32) * sz.view(k // 32, n, -1)[..., 0].float().T[..., None]
         + zero).view(n, k)
    x = torch.randn(m, k, generator=g)
    return q4.pack(q, bn), sz, x, x @ w.T


@needs_q4
@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("bn", [32, 64])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 8])  # VNNI: pairs from the bytes, then prompts in
@pytest.mark.parametrize("sym", [False, True])  # threes (+2, +1) on unpacked blocks
def test_q4_kernel_matches_dequantized(isa, bn, m, sym):
    packed, sz, x, ref = _q4_case(192, 160, m, bn, seed=bn + m, sym=sym)
    _check(q4.gemm(x, packed, sz, bn, 1, isa), ref, f"q4 bn {bn} {isa} sym {sym}")


@needs_q4
@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("bn", [32, 64])
def test_q4_kernel_threads_split_rows_exactly(isa, bn):
    """Rows split across the kernel's pool: each row's sum is the same arithmetic."""
    packed, sz, x, _ = _q4_case(320, 96, 3, bn, seed=5)
    one = q4.gemm(x, packed, sz, bn, 1, isa)
    for threads in (2, 3):
        assert torch.equal(q4.gemm(x, packed, sz, bn, threads, isa), one)


@needs_q4
@pytest.mark.parametrize("bn", [32, 64])
def test_q4_paths_agree_with_scalar(bn):
    """The same integer sums on every path: only the float accumulation order differs."""
    if len(PATHS) < 2:
        pytest.skip("no AVX2 here: only the scalar path runs")
    for sym in (False, True):
        packed, sz, x, _ = _q4_case(128, 256, 3, bn, seed=6, sym=sym)
        b = q4.gemm(x, packed, sz, bn, 1, "scalar")
        for isa in PATHS[:-1]:
            a = q4.gemm(x, packed, sz, bn, 1, isa)
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item()), (isa, sym)


@needs_q4
@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("k", [64, 96])  # VNNI: two groups per register, else AVX2's
def test_q8_kernel_matches_dequantized(isa, k):
    """int8 rows with a scale each (a q8r head), a row count that leaves partial blocks of 4
    and of the pool's 64 rows, on 1 and 2 threads."""
    g = torch.Generator().manual_seed(7)
    q = torch.randint(-127, 128, (135, k), generator=g, dtype=torch.int8)
    scale = (torch.rand(135, generator=g) * 0.01 + 0.001).to(torch.bfloat16)
    x = torch.randn(3, k, generator=g)
    ref = x @ (q.float() * scale.float()[:, None]).T
    one = q4.gemm8(x, q, scale, 1, isa)
    _check(one, ref, f"q8 {isa}")
    assert torch.equal(q4.gemm8(x, q, scale, 2, isa), one)


@needs_q4
def test_q4_kernel_refuses_shapes_it_cannot_run():
    packed, sz, x, _ = _q4_case(64, 64, 1, 32, seed=8)
    with pytest.raises(ValueError):
        q4.gemm(torch.randn(1, 48), packed, sz, 32, 1, "scalar")  # K unlike the weights
    with pytest.raises(ValueError):
        q4.gemm(x, packed[:1], sz, 32, 1, "scalar")


@needs_q4
def test_q4_runs_only_a_path_this_cpu_has():
    """The chosen path is one the CPU's flags allow; one they do not is refused, not run."""
    assert q4.path() in q4.isas() and q4.isas()[-1] == "scalar"
    packed, sz, x, _ = _q4_case(64, 64, 1, 64, seed=11)
    missing = [isa for isa, i in q4.ISAS.items() if i not in q4._ext().isas()]  # the CPU's
    # own list: TIERCACHE_ISA caps what tiercache picks, not what the CPU runs
    for isa in missing:
        with pytest.raises(RuntimeError, match="this CPU has no"):
            q4.gemm(x, packed, sz, 64, 1, isa)
    if not missing:
        pytest.skip(f"this CPU runs every path ({', '.join(q4.isas())}): no refusal to check")


@needs_int4
def test_int4_mm_runs_the_verified_kernel():
    """kernels.int4_mm (every q4 weight in RAM) takes tiercache's kernel where it verifies, and
    both agree with the dequantized weights in this CPU's layout."""
    raw, w = _q4k(128, 96, seed=9)
    lin = kernels.QLinear.from_q4k(raw, (128, 96))
    x = torch.randn(2, 96)
    _check(kernels.int4_mm(x, lin.packed, lin.sz), x @ w.T, "int4_mm")
    assert kernels.int4_kernel() == (f"q4-{q4.path()}" if q4.available() else "torch")


@needs_q4
@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("bn", [32, 64])
def test_q4_kernel_holds_the_largest_sums(isa, bn):
    """Every nibble 15 and every activation at the int8 limit: the largest integer sums a
    group can make (the AVX2 path sums them in int16), exact against floats."""
    n, k = 128, 64
    q = torch.full((n, k), 15, dtype=torch.uint8)
    sz = torch.stack([torch.full((k // 32, n), 0.5), torch.zeros(k // 32, n)], -1).bfloat16()
    for sign in (1.0, -1.0):
        x = torch.full((1, k), sign)
        got = q4.gemm(x, q4.pack(q, bn), sz, bn, 1, isa)
        assert torch.allclose(got, torch.full((1, n), sign * k * 7 * 0.5)), got[0, :4]


@needs_q4
@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_q4_pool_works_in_a_forked_child():
    """A child forked after the pool started has none of its workers: it makes its own
    instead of waiting forever for the parent's."""
    packed, sz, x, ref = _q4_case(256, 64, 1, 64, seed=10)
    want = q4.gemm(x, packed, sz, 64, 2, PATHS[0])
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if the pooled call returns the same numbers
        ok = torch.equal(q4.gemm(x, packed, sz, 64, 2, PATHS[0]), want)
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
