"""ONNX Runtime with any execution provider by name, prefill as one fused graph per layer.

The KV cache is the ORT GroupQueryAttention layout (BNSH, [B, Hkv, capacity, D], which is
KVCache's own), bound through IOBinding as both past and present: the layer writes its new
K/V into the torch buffer in place. Hidden states, rope tables and caches are torch tensors
handed over by pointer; nothing is copied on the way in or out.
"""
from __future__ import annotations

import copy
import warnings

import numpy as np
import torch

from tiercache.errors import TiercacheError, TiercacheWarning

from . import nbits
from .base import Backend, BackendUnsupported, QuantWeight

MISSING = "ONNX Runtime is not installed: pip install 'tiercache[cpu]' (or [gpu])"
CPU = "CPUExecutionProvider"
ALIASES = {"cpu": CPU, "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider",
           "openvino": "OpenVINOExecutionProvider", "qnn": "QNNExecutionProvider",
           "coreml": "CoreMLExecutionProvider", "dml": "DmlExecutionProvider",
           "rocm": "ROCMExecutionProvider", "migraphx": "MIGraphXExecutionProvider"}
_NP = {torch.float32: np.float32, torch.float16: np.float16, torch.int32: np.int32,
       torch.int64: np.int64, torch.uint8: np.uint8}


# GroupQueryAttention's CPU kernel scores each query chunk against every key so far, masked
# or not: 128-token pieces skip most of the causal upper triangle (one SmolLM2-sized layer at
# 512 tokens, 1 thread: attention 15 -> 7 ms, the same as torch's SDPA; the MatMuls stay fast).
CHUNK = 128


class ProviderFallbackWarning(TiercacheWarning, RuntimeWarning):
    """The execution provider asked for is not the one that runs."""


def import_ort():
    try:
        import onnxruntime
    except ImportError:
        raise TiercacheError(MISSING) from None
    return onnxruntime


def provider_name(name: str) -> str:
    """'cuda', 'CUDA', 'CUDAExecutionProvider' -> 'CUDAExecutionProvider'."""
    key = name.lower().removesuffix("executionprovider")
    return ALIASES.get(key, name if name.endswith("ExecutionProvider") else f"{name}ExecutionProvider")


class OrtBackend(Backend):
    name = "ort"

    def __init__(self, provider: str = CPU, threads: int = 1, spinning: bool = False,
                 bucket: int | None = None, max_len: int = 2048, chunk: int | None = CHUNK,
                 provider_options: dict | None = None):
        """bucket: static shapes (T padded to `bucket`, KV buffers `max_len` long) for providers
        that reject dynamic ones; chunk: longest prompt piece per graph call with dynamic shapes
        (None: the whole prompt); spinning: keep ORT's idle threads spinning (off when torch
        shares the cores)."""
        super().__init__(threads)
        self.ort = import_ort()
        self.asked = provider_name(provider)
        self.spinning, self.bucket, self.max_len, self.chunk = spinning, bucket, max_len, chunk
        self.provider_options = provider_options or {}
        self.fallback: str | None = None
        self._providers = self._choose_providers()
        self.provider = self._probe()
        cuda = self.provider == "CUDAExecutionProvider" and torch.cuda.is_available()
        self.device = torch.device("cuda" if cuda else "cpu")
        self._layers: dict[bool, list] = {}
        self._small: dict[tuple, object] = {}
        self.graphs: dict = {}

    # -- providers and sessions ----------------------------------------------------------------
    def _choose_providers(self) -> list:
        available = self.ort.get_available_providers()
        if self.asked == CPU:
            return [CPU]
        if self.asked not in available:
            self._fell_back(f"{self.asked} is not available in this onnxruntime "
                            f"(available: {', '.join(available)})")
            return [CPU]
        return [(self.asked, self.provider_options), CPU]

    def _fell_back(self, why: str):
        if self.fallback is None:
            self.fallback = f"{self.asked} -> {CPU}"
            warnings.warn(f"ONNX Runtime: {why}; running on {CPU}", ProviderFallbackWarning,
                          stacklevel=4)

    def session(self, model):
        """An InferenceSession (model: path or bytes) with explicit threads and providers."""
        so = self.ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        spin = "1" if self.spinning else "0"
        so.add_session_config_entry("session.intra_op.allow_spinning", spin)
        so.add_session_config_entry("session.inter_op.allow_spinning", spin)
        sess = self.ort.InferenceSession(model, so, providers=self._providers)
        if sess.get_providers()[0] != self.asked:  # onnxruntime-gpu falls back quietly
            self._fell_back(f"{self.asked} did not load ({sess.get_providers()})")
        return sess

    def _probe(self) -> str:
        """The provider that actually runs a graph here."""
        from onnx import TensorProto, helper
        io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in ("a", "b")]
        graph = helper.make_graph([helper.make_node("Identity", ["a"], ["b"])], "probe", io[:1], io[1:])
        return self.session(_model(graph).SerializeToString()).get_providers()[0]

    # -- prefill ---------------------------------------------------------------------------------
    def bind(self, model, store=None) -> "OrtBackend":
        head_dim = model.args.head_dim
        if head_dim % 8:  # checked before the model moves or a graph is exported
            raise BackendUnsupported(f"ONNX Runtime's GroupQueryAttention needs a head size that "
                                     f"is a multiple of 8 (this model's is {head_dim})")
        super().bind(model.to(self.device), store)
        kind = store.manifest.get("dtype") if store is not None else "f32"
        self.kind = kind if kind in ("q8", "q4") else "f32"  # f16 has no fast CPU kernels
        self.graphs, self._layers = {}, {}
        self._sessions(not model.args.is_moe)  # Mixtral: routing stays in torch, attention in ORT
        return self

    def _sessions(self, ffn: bool) -> list:
        """Layer sessions of one variant: whole layers (ffn) or their attention halves."""
        if ffn not in self._layers:
            from .onnx_export import LayerGraphs
            static = (self.bucket, self.max_len) if self.bucket else None
            g = self.graphs[ffn] = LayerGraphs(self.model, self.store, self.kind, ffn, static)
            n = self.model.args.num_hidden_layers
            self._layers[ffn] = [self.session(g.load(i)) for i in range(n)]
        return self._layers[ffn]

    @torch.no_grad()
    def prefill_layers(self, layers, h, cos, sin, caches):
        offset, T = caches[layers[0]].offset, h.shape[1]
        step = self.bucket or min(T, self.chunk or T)
        self._check_fits(offset + -(-T // step) * step)
        tables = self._rope_tables(cos, sin, offset)
        out = []
        for lo in range(0, T, step):  # each piece through every layer, then the next piece
            n = min(step, T - lo)
            x = self._pad(h[:, lo:lo + n], step) if self.bucket else h[:, lo:lo + n].contiguous()
            for i in layers:
                x = self._layer(i, x, caches[i], tables, n)
            out.append(x[:, :n])
        return torch.cat(out, dim=1)

    def _layer(self, i, x, cache, tables, n_real):
        ffn = not self.model.args.is_moe
        x = self._run(self._sessions(ffn)[i], x, cache, tables, n_real)
        if not ffn:
            layer = self.model.model.layers[i]
            x = x + layer.block_sparse_moe(layer.post_attention_layernorm(x))
        return x

    @torch.no_grad()
    def attention(self, i, h, cos, sin, cache):
        T, step = h.shape[1], self.bucket or h.shape[1]
        if T > step:
            raise TiercacheError(f"attention step of {T} tokens exceeds the static bucket {step}")
        self._check_fits(cache.offset + step)
        tables = self._rope_tables(cos, sin, cache.offset)
        out = self._run(self._sessions(False)[i], self._pad(h, step), cache, tables, T)
        return out[:, :T]

    def _run(self, sess, x, cache, tables, n_real):
        """One layer graph; the new K/V go straight into cache.k/cache.v (float32 caches) or
        into a float32 copy of the layer's cache, whose new positions are then kept."""
        if cache.dtype == torch.float32:
            return self._run_f32(sess, x, cache, tables, n_real)
        self._reserve(cache, cache.offset + x.shape[1])
        staged = copy.copy(cache)
        staged.dtype, staged.k, staged.v = torch.float32, cache.k.float(), cache.v.float()
        out = self._run_f32(sess, x, staged, tables, n_real)
        lo, hi = cache.offset, staged.offset
        cache.k[:, :, lo:hi], cache.v[:, :, lo:hi] = staged.k[:, :, lo:hi], staged.v[:, :, lo:hi]
        cache.offset = hi
        return out

    def _run_f32(self, sess, x, cache, tables, n_real):
        total = cache.offset + x.shape[1]
        self._reserve(cache, total)
        out = torch.empty_like(x)
        lens = torch.tensor([total - 1], dtype=torch.int32, device=self.device)
        tot = torch.tensor(total, dtype=torch.int32)  # a shape scalar: host memory everywhere
        io = sess.io_binding()
        for name, t in (("x", x), ("past_key", cache.k), ("past_value", cache.v), ("seqlens_k", lens),
                        ("total_len", tot), ("cos", tables[0]), ("sin", tables[1])):
            _bind(io.bind_input, name, t)
        for name, t in (("h", out), ("present_key", cache.k), ("present_value", cache.v)):
            _bind(io.bind_output, name, t)
        sess.run_with_iobinding(io)
        cache.offset += n_real
        return out

    def _reserve(self, cache, need: int):
        """Grow the cache buffer to hold `need` positions (exactly max_len with static shapes)."""
        self._check_fits(need)
        if self.bucket:
            cap = self.max_len
        else:
            cap = -(-need // cache.step) * cache.step
        have = None if cache.k is None else cache.k.shape[2]
        if have is not None and (have == cap if self.bucket else have >= need):
            return
        b, hkv, _, d = cache.shape
        k = torch.zeros(b, hkv, cap, d, dtype=cache.dtype, device=self.device)
        v = torch.zeros_like(k)
        if cache.k is not None:
            k[:, :, :cache.offset] = cache.k[:, :, :cache.offset]
            v[:, :, :cache.offset] = cache.v[:, :, :cache.offset]
        cache.k, cache.v = k, v

    def _check_fits(self, need: int):
        if self.bucket and need > self.max_len:
            raise TiercacheError(f"{need} positions (prompt padded to {self.bucket}-token buckets) "
                                 f"do not fit the static KV length {self.max_len} (raise max_len)")

    def _rope_tables(self, cos, sin, offset: int):
        """GroupQueryAttention's cos/sin caches [positions, D/2], indexed by absolute position.

        Only the new positions are ever read, so the rows before `offset` stay zero.
        """
        T, half = cos.shape[0], cos.shape[-1] // 2
        rows = self.max_len if self.bucket else offset + T
        tabs = []
        for t in (cos, sin):
            tab = torch.zeros(rows, half, dtype=torch.float32, device=self.device)
            tab[offset:offset + T] = t[:, :half]
            tabs.append(tab)
        return tabs

    def _pad(self, x, step):
        if x.shape[1] == step:
            return x.contiguous()
        pad = x.new_zeros(x.shape[0], step - x.shape[1], x.shape[2])
        return torch.cat([x, pad], dim=1)

    # -- small kernels ---------------------------------------------------------------------------
    @torch.no_grad()
    def sparse_ffn(self, x, gate, up, down_t, act="silu"):
        sess = self._small_session(("ffn", act), lambda: _ffn_graph(act))
        return self._run_small(sess, {"x": x, "gate": gate, "up": up, "down_t": down_t}, "y",
                               (x.shape[0], down_t.shape[1]))

    @torch.no_grad()
    def qmatmul(self, x, w: QuantWeight):
        if not w.quantized:
            return x @ w.dequantize(x.dtype).to(x.device).t()
        p = nbits.repack(w)
        key = ("nbits", w.shape, nbits.bits(w), "zp" in p)
        sess = self._small_session(key, lambda: _nbits_graph(*w.shape, nbits.bits(w), "zp" in p))
        flat = x.reshape(-1, w.shape[1])
        y = self._run_small(sess, {"a": flat, "b": p["B"], "scales": p["scales"], "zp": p.get("zp")},
                            "y", (flat.shape[0], w.shape[0]))
        return y.view(*x.shape[:-1], w.shape[0])

    def _small_session(self, key, build):
        if key not in self._small:
            self._small[key] = self.session(_model(build()).SerializeToString())
        return self._small[key]

    def _run_small(self, sess, inputs: dict, out_name: str, out_shape):
        io = sess.io_binding()
        keep = {n: t.to(self.device).contiguous() for n, t in inputs.items() if t is not None}
        for name, t in keep.items():
            _bind(io.bind_input, name, t)
        out = torch.empty(out_shape, dtype=torch.float32, device=self.device)
        _bind(io.bind_output, out_name, out)
        sess.run_with_iobinding(io)
        return out

    def describe(self) -> dict:
        d = super().describe()
        d.update(provider=self.provider, asked=self.asked, fallback=self.fallback,
                 spinning=self.spinning, shapes=f"static {self.bucket}/{self.max_len}"
                 if self.bucket else "dynamic")
        if self.graphs:
            g = self.graphs.get(not self.model.args.is_moe) or next(iter(self.graphs.values()))
            d.update(weights=self.kind, graphs=str(g.dir or "in memory"))
        return d


def _bind(fn, name, t: torch.Tensor):
    """IOBinding of a torch tensor by pointer (no copy): it must stay alive through the run."""
    if not t.is_contiguous():
        raise ValueError(f"{name}: IOBinding needs a contiguous tensor")
    fn(name, t.device.type, t.device.index or 0, _NP[t.dtype], list(t.shape), t.data_ptr())


def _model(graph):
    from onnx import helper
    from .onnx_export import IR_VERSION, OPSET
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = IR_VERSION
    return m


def _act_nodes(act: str, x: str, y: str) -> list:
    from onnx import helper
    if act == "silu":
        return [helper.make_node("Sigmoid", [x], [y + "_s"]),
                helper.make_node("Mul", [x, y + "_s"], [y])]
    if act == "relu":
        return [helper.make_node("Relu", [x], [y])]
    if act == "relu2":
        return [helper.make_node("Relu", [x], [y + "_r"]),
                helper.make_node("Mul", [y + "_r", y + "_r"], [y])]
    # gelu: erf form, or tanh form for gelu_pytorch_tanh (com.microsoft FastGelu)
    if act == "gelu":
        return [helper.make_node("Gelu", [x], [y], domain="com.microsoft")]
    return [helper.make_node("FastGelu", [x], [y], domain="com.microsoft")]


def _ffn_graph(act: str):
    """y = (act(x @ gate.T) * (x @ up.T)) @ down_t, over whatever rows are gathered."""
    from onnx import TensorProto as TP, helper
    nodes = [helper.make_node("Gemm", ["x", "gate"], ["g"], transB=1),
             helper.make_node("Gemm", ["x", "up"], ["u"], transB=1),
             *_act_nodes(act, "g", "a"),
             helper.make_node("Mul", ["a", "u"], ["m"]),
             helper.make_node("MatMul", ["m", "down_t"], ["y"])]
    ins = [helper.make_tensor_value_info("x", TP.FLOAT, ["N", "d"])] + [
        helper.make_tensor_value_info(n, TP.FLOAT, ["n", "d"]) for n in ("gate", "up", "down_t")]
    out = helper.make_tensor_value_info("y", TP.FLOAT, ["N", "d"])
    return helper.make_graph(nodes, "sparse_ffn", ins, [out])


def _nbits_graph(n: int, k: int, bits: int, has_zp: bool):
    from onnx import TensorProto as TP, helper
    nb = k // nbits.BLOCK
    names = ["a", "b", "scales"] + (["zp"] if has_zp else [])
    node = helper.make_node("MatMulNBits", names, ["y"], domain="com.microsoft", K=k, N=n,
                            bits=bits, block_size=nbits.BLOCK, accuracy_level=4)
    ins = [helper.make_tensor_value_info("a", TP.FLOAT, ["M", k]),
           helper.make_tensor_value_info("b", TP.UINT8, [n, nb, nbits.BLOCK * bits // 8]),
           helper.make_tensor_value_info("scales", TP.FLOAT, [n * nb])]
    if has_zp:
        ins.append(helper.make_tensor_value_info("zp", TP.FLOAT, [n * nb]))
    out = helper.make_tensor_value_info("y", TP.FLOAT, ["M", n])
    return helper.make_graph([node], "qmatmul", ins, [out])
