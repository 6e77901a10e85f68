"""Resident q4 weights on ONNX Runtime's MatMulNBits (CPU): a prepacked int4 kernel with int8
activations (accuracy_level 4) that reads weights ~3x faster than torch's int4 kernel here
(1 thread, [1, 2048] x [8192, 2048]: 0.8-1.0 ms vs 2.8 ms). Weights must be constant
initializers (fed at run time, the same kernel took 136 ms): so only what stays in RAM for the
run (pinned attention, whole pinned FFN layers) comes here; cached and streamed clusters keep
torch's kernel, which computes on the bytes as read.

Prepacked weights take ~1.4x their stored bytes (plus clean, reclaimable pages of a deleted
file; accuracy levels 1 and 2 keep 1.0x but ran 4x slower): where every weight is resident, as
many layers as the budget's room for that (`EXTRA`) allows run here, the rest on torch's
(layout.py, `_nbits_split`).

A q4k record (x = (q - 8) * scale + zero, per group of 32) maps onto MatMulNBits' default
zero point 8 exactly; a nonzero `zero` (Q4_1-style stores) adds sum_b zero[n, b] * A_b, with
A_b the sum of the activations in group b: one small f32 MatMul on [T, K/32] in the same graph.
Q4_0-style weights (zero = 0 everywhere, the synthetic benchmark models) need none.
"""
from __future__ import annotations

import functools
import os
import tempfile

import numpy as np
import torch

from ..memory import page_out, trim_heap
from ..store import quant
from . import q4

GROUP = quant.GROUP
EXTRA = 0.5  # anonymous RAM beyond the stored bytes, per stored byte: measured 0.45 on the 1B
             # shape (AVX2 packing for int8 compute keeps per-group sums beside the scales)
WORKSPACE = 48 << 20  # and what runs leave in the heap: an eval of SmolLM2 (1257 tokens in
                      # 512-token chunks) peaked 31 MiB of anonymous memory past its budget
# and, while a layer's FFN session is built, copies of its weights at once: the records as
# read, gate|up as MatMulNBits' B (per cluster, then joined) and ORT's packing. Initializers go
# to the graph's file as they are made (_Graph) and the head is written piece by piece from the
# store: the 1B shape's load peaked 68 MiB of anonymous memory above what it then kept (2.5x
# its 27 MiB layer), against 234 MiB when every copy lived until the session was built (it
# was OOM-killed at a 1400 MiB cap).
BUILD = 3
OPSET = [("", 17), ("com.microsoft", 1)]


@functools.cache
def _ort():
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime


def available() -> bool:
    """onnxruntime is importable and its MatMulNBits matches a float reference here."""
    return _ort() is not None and _self_check()


@functools.cache
def _self_check() -> bool:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(128, 96, generator=g)
    raw = torch.frombuffer(bytearray(quant.encode(w, "q4k")), dtype=torch.uint8)
    ref_w = quant.decode(raw.clone(), (128, 96), "q4k")
    x = torch.randn(3, 96, generator=g)
    try:
        y = NBitsMatmul([q4k_weight(raw, (128, 96))])(x)
    except Exception:  # noqa: BLE001 - any failure of the provider means: not this kernel
        return False
    ref = x @ ref_w.T
    return bool((y - ref).abs().max() <= 0.03 * ref.abs().max())


def q4k_weight(raw: torch.Tensor, shape) -> dict:
    """A canonical q4k record -> MatMulNBits inputs (see `weight`)."""
    return weight(*quant.q4k_views(raw, shape))


def weight(packed: torch.Tensor, sz: torch.Tensor) -> dict:
    """Canonical q4k views (packed [N/64, K, 32], sz [K/32, N, 2]) -> MatMulNBits inputs:
    B uint8 [N, K/32, 16] (element 2j in the low nibble), scales and zero f32 [N, K/32]
    (zero None when all zero)."""
    nb, cols, _ = packed.shape
    rows = nb * 64
    s = sz.float().permute(1, 0, 2)                               # [N, K/32, 2]
    zero = s[..., 1].contiguous()
    return {"B": quant.q4k_rows(packed).view(rows, cols // GROUP, GROUP // 2),
            "scales": s[..., 0].contiguous(), "zero": zero if bool(zero.any()) else None,
            "shape": (rows, cols)}


def join(weights: list[dict], dim: int = 0) -> dict:
    """Weights stacked along N (dim 0: q|k|v, gate|up, clusters' rows) or K (dim 1: the
    clusters' down columns)."""
    if len(weights) == 1:
        return weights[0]
    zeros = [w["zero"] if w["zero"] is not None else torch.zeros_like(w["scales"])
             for w in weights]
    n, k = weights[0]["shape"]
    total = sum(w["shape"][dim] for w in weights)
    return {"B": torch.cat([w["B"] for w in weights], dim),
            "scales": torch.cat([w["scales"] for w in weights], dim),
            "zero": (torch.cat(zeros, dim) if any(w["zero"] is not None for w in weights)
                     else None),
            "shape": (total, k) if dim == 0 else (n, total)}


class _Graph:
    """Builds one ONNX graph node by node (names are unique per graph). Initializers are
    written to the graph's data file as they are made, so that the caller can drop each
    weight's tensors before the next is built (a layer's FFN no longer exists ~7 times at
    once while its session is built; see BUILD)."""

    ALIGN = 4096  # ORT maps external data: initializers start on page boundaries

    def __init__(self):
        from onnx import helper
        self.h, self.nodes, self.inits, self.n = helper, [], [], 0
        self.tmp = tempfile.TemporaryDirectory(prefix="tiercache-ort-")
        self.data = open(os.path.join(self.tmp.name, "g.data"), "wb")

    def name(self, s: str) -> str:
        self.n += 1
        return f"{s}{self.n}"

    def const(self, t: torch.Tensor | np.ndarray, s: str) -> str:
        from onnx import numpy_helper
        arr = np.asarray(t.numpy() if isinstance(t, torch.Tensor) else t, order="C")  # 0-d stays
        if arr.nbytes >= 1024:  # to the data file now (see the class)
            return self.const_pieces([torch.from_numpy(arr.reshape(-1).view(np.uint8))],
                                     arr.shape, arr.dtype, s)
        name = self.name(s)
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def const_pieces(self, pieces, shape: tuple, dtype, s: str) -> str:
        """An initializer written piece by piece (uint8 tensors, in order, `shape` in all):
        a matrix that never exists whole in memory."""
        from onnx import TensorProto
        name, at = self.name(s), -(-self.data.tell() // self.ALIGN) * self.ALIGN
        self.data.seek(at)
        for piece in pieces:
            self.data.write(memoryview(piece.numpy()).cast("B"))
        length = self.data.tell() - at
        if length != int(np.prod(shape)) * np.dtype(dtype).itemsize:
            raise ValueError(f"{name}: {length} bytes written for {shape} {np.dtype(dtype)}")
        p = TensorProto(name=name, dims=shape, data_location=TensorProto.EXTERNAL,
                        data_type=self.h.np_dtype_to_tensor_dtype(np.dtype(dtype)))
        for key, value in (("location", "g.data"), ("offset", at), ("length", length)):
            p.external_data.add(key=key, value=str(value))
        self.inits.append(p)
        return name

    def op(self, kind: str, inputs: list[str], domain: str = "", **attrs) -> str:
        out = self.name(kind.lower())
        self.nodes.append(self.h.make_node(kind, inputs, [out], domain=domain, **attrs))
        return out

    def rms_norm(self, x: str, norm: tuple[torch.Tensor, float]) -> str:
        """RMSNorm (weight, eps) over the last axis: one ORT kernel instead of ~7 torch ops."""
        weight, eps = norm
        return self.op("SimplifiedLayerNormalization", [x, self.const(weight.float(), "norm")],
                       axis=-1, epsilon=float(eps))

    def rope(self, y: str, heads: int, hd: int) -> str:
        """y [T, heads*hd] -> [T, heads, hd] rotated by the graph's cos/sin [T, hd] (HF's
        convention: the two halves of hd rotate together), as models.llama.apply_rope."""
        t = self.op("Reshape", [y, self.const(np.array([0, heads, hd]), "shape")])
        x1, x2 = self.name("x1"), self.name("x2")
        self.nodes.append(self.h.make_node("Split", [t, self.const(np.array([hd // 2] * 2),
                                                                   "halves")], [x1, x2], axis=2))
        rot = self.op("Concat", [self.op("Neg", [x2]), x1], axis=2)
        axis = self.const(np.array([1]), "axis")
        cos, sin = (self.op("Unsqueeze", [n, axis]) for n in ("cos", "sin"))  # [T, 1, hd]
        return self.op("Add", [self.op("Mul", [t, cos]), self.op("Mul", [rot, sin])])

    def matmul(self, a: str, w: dict, bias: torch.Tensor | None = None, bits: int = 4) -> str:
        """a [T, K] @ W^T (+ the zero term) (+ bias) -> [T, N]; B holds `bits`-bit codes
        around MatMulNBits' default zero point (8 for 4 bits, 128 for 8)."""
        n, k = w["shape"]
        b = (self.const(w["B"], "B") if isinstance(w["B"], torch.Tensor) else  # or its pieces
             self.const_pieces(w["B"], (n, k // GROUP, GROUP * bits // 8), np.uint8, "B"))
        y = self.op("MatMulNBits", [a, b,
                                    self.const(w["scales"].reshape(-1), "scales")],
                    domain="com.microsoft", K=k, N=n, bits=bits, block_size=GROUP,
                    accuracy_level=4)
        if w["zero"] is not None:
            groups = self.op("Reshape", [a, self.const(np.array([0, k // GROUP, GROUP]),
                                                        "shape")])
            sums = self.op("ReduceSum", [groups, self.const(np.array([2]), "axes")],
                           keepdims=0)                                        # [T, K/32]
            y = self.op("Add", [y, self.op("MatMul", [sums, self.const(
                w["zero"].T.contiguous(), "zeroT")])])
        if bias is not None:
            y = self.op("Add", [y, self.const(bias.float(), "bias")])
        return y

    def ffn(self, x: str, gate_up, down, act: str) -> str:
        """act(x @ gate^T) * (x @ up^T) @ down^T; gate_up and down: thunks of the weights
        (gate's rows first), each made when the graph needs it and dropped once written."""
        w = gate_up()
        f = w["shape"][0] // 2
        gu = self.matmul(x, w)
        del w
        a, b = self.name("a"), self.name("b")
        self.nodes.append(self.h.make_node("Split", [gu, self.const(np.array([f, f]), "split")],
                                           [a, b], axis=1))
        act_a = (self.op("Mul", [a, self.op("Sigmoid", [a])]) if act == "silu"
                 else self.op("Relu", [a]))
        w = down()
        return self.matmul(self.op("Mul", [act_a, b]), w)

    def branch(self, build) -> object:
        """A subgraph (an If's branch): the nodes `build()` adds, with its returned name as
        the output. Initializers stay in the outer graph (ORT prepacks them there too)."""
        outer, self.nodes = self.nodes, []
        out = build()
        body, self.nodes = self.nodes, outer
        from onnx import TensorProto
        return self.h.make_graph(body, self.name("branch"), [],
                                 [self.h.make_tensor_value_info(out, TensorProto.FLOAT, None)])

    def session(self, k: int, outputs: list[tuple], rope: int = 0, inputs=None):
        """Inputs x [T, k] (and cos, sin [T, rope] when rope), or `inputs` (name, dims after
        T); outputs (name, dims after T[, ONNX element type: float by default])."""
        from onnx import TensorProto
        h, ort = self.h, _ort()
        inputs = inputs or [("x", [k])] + [(n, [rope]) for n in ("cos", "sin") if rope]
        inputs = [h.make_tensor_value_info(n, TensorProto.FLOAT, ["T", *dims])
                  for n, dims in inputs]
        g = h.make_graph(self.nodes, "tiercache", inputs, [h.make_tensor_value_info(
            o[0], o[2] if len(o) > 2 else TensorProto.FLOAT, ["T", *o[1]]) for o in outputs],
            self.inits)
        model = h.make_model(g, opset_imports=[h.make_opsetid(d, v) for d, v in OPSET])
        model.ir_version = 10  # ORT 1.31 rejects newer IR versions
        so = session_options(q4.threads())
        so.enable_cpu_mem_arena = False  # its arena kept ~120 MB of scratch after one prefill
        self.nodes = self.inits = None
        # Loaded from a file with external data, ORT maps the weights (a reclaimable file
        # mapping) instead of keeping a heap copy of them beside the packed ones: 1.2x the
        # stored bytes of anonymous memory on one matrix, against 2.4x from in-memory bytes.
        import onnx
        with self.tmp as tmp:
            self.data.close()
            _clean(os.path.join(tmp, "g.data"))
            path = os.path.join(tmp, "g.onnx")
            onnx.save_model(model, path)
            del model
            sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
            # prepacked: ORT no longer reads most of its map of the weights; its pages stayed
            # resident (the 1B shape: ~165 MiB of file pages), charged to a cgroup until the
            # kernel reclaims them under pressure. Let them go now
            page_out(os.path.join(tmp, "g.data"))
        trim_heap()  # each build frees ~1x its weights in small blocks: return them now,
        return sess  # not after the last layer (the 1B shape peaked 345 MB over its budget)


def session_options(threads: int):
    """SessionOptions on the process's one ORT thread pool of `threads` threads (made by the
    first call). An engine has one session per layer or block: with a pool each, their idle
    threads contend for the cores (1B shape, 2 threads, decode: 13.5 tok/s with a pool per
    session, not spinning; 0.8 spinning; 14.9 on one shared, spinning pool). The shared pool
    spins, so it is used only where torch's OpenMP threads do not (tiercache.OMP_PASSIVE:
    6.8 tok/s beside busy-waiting ones); a later call for another thread count, or torch's
    threads spinning, get a pool per session that does not spin."""
    ort = _ort()
    so = ort.SessionOptions()
    from .. import OMP_PASSIVE
    if OMP_PASSIVE and _global_pool(threads) == threads:
        so.use_per_session_threads = False
        return so
    so.intra_op_num_threads, so.inter_op_num_threads = max(1, threads), 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def _global_pool(threads: int) -> int | None:
    """The shared pool's size: made once, before the first session; None where this
    onnxruntime cannot make one."""
    if _POOL:
        return _POOL[0]
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as state
        state.set_global_thread_pool_sizes(max(1, threads), 1)
    except (ImportError, AttributeError, RuntimeError):
        _POOL.append(None)
    else:
        _POOL.append(max(1, threads))
    return _POOL[0]


_POOL: list = []


def _clean(path: str) -> None:
    """Written out and dropped from the page cache: ORT keeps the file mapped for the session's
    life, and under a memory cap its dirty pages (the whole model's weights, written faster
    than a cgroup-v1 group writes back) got the run OOM-killed; clean, they are reclaimable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _run(sess, x: torch.Tensor, **more: torch.Tensor) -> list[torch.Tensor]:
    feed = {"x": x.detach().float().numpy(), **{k: v.float().numpy() for k, v in more.items()}}
    return [torch.from_numpy(y) for y in sess.run(None, feed)]


class NBitsMatmul:
    """x [T, K] -> [T, N]: one or more q4 matrices with the same K, joined along N."""

    def __init__(self, weights: list[dict], bias: torch.Tensor | None = None):
        w = join(weights)
        g = _Graph()
        y = g.matmul("x", w, bias)
        self.n, self.k = w["shape"]
        self.sess = g.session(self.k, [(y, [self.n])])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _run(self.sess, x.reshape(-1, self.k))[0].view(*x.shape[:-1], self.n)


class NBitsFFN:
    """A whole FFN in one call: act(x @ gate^T) * (x @ up^T) @ down^T, of RMSNorm(x) when a
    norm (weight, eps) is given (the layer's post-attention norm, folded in)."""

    ACTS = ("silu", "relu")

    def __init__(self, gate_up, down, act: str, norm=None):
        """gate_up: () -> gate and up joined along N (gate's rows first); down: () -> down.
        Each is made when the graph needs it, and dropped once written (see _Graph)."""
        g, shapes = _Graph(), []
        y = g.ffn(g.rms_norm("x", norm) if norm is not None else "x",
                  _noting(gate_up, shapes), _noting(down, shapes), act)
        (_, k), (self.d, _) = shapes
        self.sess = g.session(k, [(y, [self.d])])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _run(self.sess, x)[0]


def _noting(thunk, shapes: list):
    """The thunk, noting the shape of the weight it makes."""
    def made():
        w = thunk()
        shapes.append(w["shape"])
        return w
    return made


class NBitsBlock:
    """A pinned FFN block (clusters in order) for modes that compute every neuron: `ffn` only,
    one ORT call (the sparse modes mask activations between gate and down: torch's Block)."""

    def __init__(self, prepared: list, act: str, norm=None):
        """prepared: per cluster ((gate packed, sz), (up packed, sz), (down packed, sz));
        norm: the RMSNorm (weight, eps) before the FFN, computed here (see NBitsFFN)."""
        self._ffn = NBitsFFN(
            lambda: join([weight(*p[0]) for p in prepared] + [weight(*p[1]) for p in prepared]),
            lambda: join([weight(*p[2]) for p in prepared], dim=1), act, norm)

    def ffn(self, x: torch.Tensor, act=None) -> torch.Tensor:
        return self._ffn(x)


class NBitsTail:
    """A layer's work after attention in one ORT call: h = x + a @ o_proj^T, then
    h + FFN(RMSNorm(h)). Run after attention, the o_proj, the two residual adds, the norm and
    the FFN (or the MoE's router and its experts) would otherwise be ~4 ORT calls and ~15 torch
    ops per layer, ~1.4 ms per layer of Python and dispatch on the synthetic Mixtral at decode
    (22 of its 56 ms per token, 1 thread).

    The FFN is a dense MLP or Mixtral's MoE: router, softmax, top-k, weights renormalized over
    the k (models.llama.MoE), then each expert that some row routes to runs on its rows only,
    inside an If, and adds into the output (ScatterND): unrouted experts cost nothing, and a
    prompt's rows are gathered per expert as llama.MoE does. The experts' weights are the
    outer graph's initializers, prepacked once like any other (a subgraph's MatMulNBits ran at
    the top-level one's speed). Outputs: the layer's output [T, d]; for an MoE also the
    routed ids [T, k], for the engine's counters."""

    def __init__(self, o_proj, norm, experts: list, act: str, router=None, top_k: int = 0,
                 bias=None):
        """o_proj: () -> its weight (see `weight`); norm: the post-attention RMSNorm (weight,
        eps); experts: (gate_up, down) thunks per expert (as NBitsFFN's), one for a dense MLP;
        router: Mixtral's gate weight [E, d], picking top_k."""
        from onnx import TensorProto
        g = _Graph()
        w = o_proj()
        d, width = w["shape"]
        h = g.op("Add", ["x", g.matmul("a", w, bias)])
        del w
        n = g.rms_norm(h, norm)
        if router is None:
            (gate_up, down), = experts
            outs = [(g.op("Add", [h, g.ffn(n, gate_up, down, act)]), [d])]
        else:
            out, ids = self._moe(g, h, n, experts, act, router, top_k)
            outs = [(out, [d]), (ids, [top_k], TensorProto.INT64)]
        self.sess = g.session(0, outs, inputs=[("a", [width]), ("x", [d])])

    @staticmethod
    def _moe(g: _Graph, h: str, n: str, experts: list, act: str, router, k: int):
        probs = g.op("Softmax", [g.op("MatMul", [n, g.const(router.float().T.contiguous(),
                                                            "router")])], axis=-1)
        top, ids = g.name("top"), g.name("ids")
        g.nodes.append(g.h.make_node("TopK", [probs, g.const(np.array([k]), "k")], [top, ids],
                                     axis=-1))
        last, n_exp = g.const(np.array([-1]), "axes"), len(experts)
        w = g.op("Div", [top, g.op("ReduceSum", [top, last], keepdims=1)])       # [T, k]
        # each expert's weight per row [T, E] (0 where it is not routed), and which run [E]
        hit = g.op("Cast", [g.op("Equal", [g.op("Unsqueeze", [ids, last]), g.const(
            np.arange(n_exp), "experts")])], to=1)                              # [T, k, E]
        per_row = g.op("ReduceSum", [g.op("Mul", [hit, g.op("Unsqueeze", [w, last])]),
                                     g.const(np.array([1]), "axes")], keepdims=0)
        used = g.op("Greater", [g.op("ReduceMax", [per_row], axes=[0], keepdims=0),
                                g.const(np.array(0, np.float32), "zero")])      # [E]
        out = h
        for e, (gate_up, down) in enumerate(experts):
            def routed(acc=out, e=e, gate_up=gate_up, down=down):
                col = g.op("Gather", [per_row, g.const(np.array(e), "e")], axis=1)  # [T]
                rows = g.op("Reshape", [g.op("NonZero", [col]), last])            # [R]
                y = g.ffn(g.op("Gather", [n, rows], axis=0), gate_up, down, act)
                weight = g.op("Unsqueeze", [g.op("Gather", [col, rows], axis=0), last])
                return g.op("ScatterND", [acc, g.op("Unsqueeze", [rows, last]),
                                          g.op("Mul", [y, weight])], reduction="add")

            cond = g.op("Gather", [used, g.const(np.array(e), "e")], axis=0)
            out = g.op("If", [cond], then_branch=g.branch(routed),
                       else_branch=g.branch(lambda acc=out: g.op("Identity", [acc])))
        return out, ids

    def __call__(self, a: torch.Tensor, x: torch.Tensor) -> list[torch.Tensor]:
        """a: attention's heads [T, H*hd]; x: the layer's input [T, d] -> [out (, ids)]."""
        return _run(self.sess, x, a=a)


class NBitsLinear(torch.nn.Module):
    """Pinned q4k projections with one input (q|k|v: joined along N) on MatMulNBits; f32 in,
    f32 out."""

    def __init__(self, records: list[tuple[torch.Tensor, tuple]], bias=None):
        super().__init__()
        self.mm = NBitsMatmul([q4k_weight(raw, shape) for raw, shape in records], bias)

    def forward(self, x):
        return self.mm(x)


class NBitsQKV(torch.nn.Module):
    """A layer's attention input in one call: RMSNorm(x) (the input norm, folded in) ->
    q|k|v -> RoPE on q and k. Attention's `qkv_proj` protocol: (x [B, T, d], cos, sin
    [T, hd]) -> q [B, H, T, hd], k and v [B, Hkv, T, hd]."""

    def __init__(self, records: list[tuple[torch.Tensor, tuple]], norm, heads: int, kv_heads: int,
                 head_dim: int, bias=None):
        super().__init__()
        w = join([q4k_weight(raw, shape) for raw, shape in records])
        g = _Graph()
        qkv = g.matmul(g.rms_norm("x", norm), w, bias)
        q, k, v = g.name("q"), g.name("k"), g.name("v")
        sizes = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
        g.nodes.append(g.h.make_node("Split", [qkv, g.const(np.array(sizes), "split")],
                                     [q, k, v], axis=1))
        v3 = g.op("Reshape", [v, g.const(np.array([0, kv_heads, head_dim]), "shape")])
        outs = [g.rope(q, heads, head_dim), g.rope(k, kv_heads, head_dim), v3]
        self.k, self.hd = w["shape"][1], head_dim
        self.sess = g.session(self.k, [(o, [n, head_dim]) for o, n in
                                       zip(outs, (heads, kv_heads, kv_heads))], rope=head_dim)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        if B > 1:  # the graph is [T, ...]: every sequence of the batch at the same positions
            cos, sin = cos.repeat(B, 1), sin.repeat(B, 1)
        ys = _run(self.sess, x.reshape(B * T, self.k), cos=cos, sin=sin)
        return [y.view(B, T, -1, self.hd).transpose(1, 2) for y in ys]


class NBitsHead(torch.nn.Module):
    """A resident q8r head (int8 rows, one bf16 scale per row) on 8-bit MatMulNBits: ~1.5x
    torch's int8 kernel here (1 thread, [1, 2048] x [49152, 2048]: 27 vs 42 ms under load),
    for ~1.4x the int8 bytes of prepacked memory. The rows themselves (the tied embedding's
    lookups, ExactTop's float32 recomputation) are read from the store, a few per token."""

    def __init__(self, chunks, scale: torch.Tensor, shape, rows):
        """chunks: the q8r record's (offset, bytes) pieces in order (RecordReader.read_chunks:
        written to the graph one at a time, never whole in memory); scale: its bf16 row scales;
        rows: ids [n] -> float32 rows [n, K]."""
        super().__init__()
        n, k = shape
        w = {"B": _uint8_codes(chunks, n * k), "scales": scale.float()[:, None].expand(
            n, k // GROUP), "zero": None, "shape": (n, k)}
        g = _Graph()
        self.sess = g.session(k, [(g.matmul("x", w, bits=8), [n])])
        self.shape, self.rows, self.bias = tuple(shape), rows, None

    def forward(self, x):
        shape = x.shape
        y = _run(self.sess, x.reshape(-1, shape[-1]))[0]
        return y.view(*shape[:-1], self.shape[0])


def _uint8_codes(chunks, end: int):
    """The int8 codes in bytes [0, end) of a record's pieces as uint8 codes + 128 (8-bit
    MatMulNBits' default zero point), changed in the read buffer; the rest (the scales) is
    read but not yielded, so that the record's checksum is still checked at its end."""
    for lo, part in chunks:
        if lo < end:
            part = part[:end - lo]
            part.bitwise_xor_(0x80)
            yield part
