"""Export a decoder layer's dense block to ONNX once, then give every layer its own weights.

The block is a torch module exported with the dynamo exporter; two custom ops translate to
ONNX Runtime contrib ops:
  tiercache::gqa           -> com.microsoft GroupQueryAttention (rotary inside, KV buffer shared
                              between past and present: the new K/V land in place, no copies)
  tiercache::matmul_nbits  -> com.microsoft MatMulNBits (block 32, accuracy_level 4)
A layer's graph is the same for every layer, so one template is exported (with noise weights,
so that no two initializers are merged) and each layer's file is the template with its own
initializers swapped in by name. Files are cached next to the store:
  STORE/onnx/<model_type>-<kind>-<variant>-<shapes>-v<N>/layer<i>.onnx
"""
from __future__ import annotations

import contextlib
import logging
import os
import uuid
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from tiercache.models.llama import ACTS
from tiercache.store.format import FFN_PARTS, tensor_key
from tiercache.store import quant

from . import nbits
from .base import QuantWeight

EXPORT_VERSION = 3
IR_VERSION = 10  # ORT 1.31 rejects the exporter's IR version 14
OPSET = 18
INPUTS = ["x", "past_key", "past_value", "seqlens_k", "total_len", "cos", "sin"]
OUTPUTS = ["h", "present_key", "present_value"]
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


# -- custom ops (export only: the fake kernels give shapes; ORT runs the real ones) --------------
@torch.library.custom_op("tiercache::gqa", mutates_args=())
def gqa(qkv: torch.Tensor, past_key: torch.Tensor,
        past_value: torch.Tensor, seqlens_k: torch.Tensor, total_len: torch.Tensor,
        cos: torch.Tensor, sin: torch.Tensor, num_heads: int, kv_heads: int
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    raise NotImplementedError("tiercache::gqa only exists to be exported to ONNX")


@gqa.register_fake
def _(qkv, past_key, past_value, seqlens_k, total_len, cos, sin, num_heads, kv_heads):
    # qkv [B, T, (H + 2 Hkv) * D] packed -> attention output [B, T, H * D]
    out = qkv.new_empty(*qkv.shape[:-1], qkv.shape[-1] * num_heads // (num_heads + 2 * kv_heads))
    return out, torch.empty_like(past_key), torch.empty_like(past_value)


@torch.library.custom_op("tiercache::matmul_nbits", mutates_args=())
def matmul_nbits(a: torch.Tensor, b: torch.Tensor, scales: torch.Tensor,
                 zp: Optional[torch.Tensor], k: int, n: int, bits: int) -> torch.Tensor:
    raise NotImplementedError("tiercache::matmul_nbits only exists to be exported to ONNX")


@matmul_nbits.register_fake
def _(a, b, scales, zp, k, n, bits):
    return a.new_empty(*a.shape[:-1], n)


def _register_schemas():
    """The exporter checks every op against onnx's schema registry, which lacks contrib ops."""
    import onnx.defs as d
    from onnx.defs import OpSchema

    def p(name, t, optional=False):
        opt = OpSchema.FormalParameterOption
        option = opt.Optional if optional else opt.Single
        return OpSchema.FormalParameter(name, t, "", param_option=option)

    def ints(*names):
        return [OpSchema.Attribute(n, OpSchema.AttrType.INT, "") for n in names]

    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    if not d.has("GroupQueryAttention", "com.microsoft"):
        ins = [p("query", "T"), p("key", "T", True), p("value", "T", True), p("past_key", "T", True),
               p("past_value", "T", True), p("seqlens_k", "M"), p("total_sequence_length", "M"),
               p("cos_cache", "T", True), p("sin_cache", "T", True)]
        d.register_schema(OpSchema(
            "GroupQueryAttention", "com.microsoft", 1, inputs=ins,
            outputs=[p("output", "T"), p("present_key", "T"), p("present_value", "T")],
            type_constraints=[("T", floats, ""), ("M", ["tensor(int32)"], "")],
            attributes=ints("num_heads", "kv_num_heads", "do_rotary", "rotary_interleaved")))
    if not d.has("MatMulNBits", "com.microsoft"):
        d.register_schema(OpSchema(
            "MatMulNBits", "com.microsoft", 1,
            inputs=[p("A", "T1"), p("B", "T2"), p("scales", "T1"), p("zero_points", "T3", True)],
            outputs=[p("Y", "T1")],
            type_constraints=[("T1", floats, ""), ("T2", ["tensor(uint8)"], ""),
                              ("T3", ["tensor(uint8)"] + floats, "")],
            attributes=ints("K", "N", "bits", "block_size", "accuracy_level")))


def _translations():
    import onnxscript

    ms = onnxscript.values.Opset("com.microsoft", 1)

    def gqa_onnx(qkv, past_key, past_value, seqlens_k, total_len, cos, sin,
                 num_heads: int, kv_heads: int):
        return ms.GroupQueryAttention(qkv, None, None, past_key, past_value, seqlens_k, total_len, cos,
                                      sin, num_heads=num_heads, kv_num_heads=kv_heads,
                                      do_rotary=1, rotary_interleaved=0, _num_outputs=3)

    def nbits_onnx(a, b, scales, zp, k: int, n: int, bits: int):
        return ms.MatMulNBits(a, b, scales, zp, K=k, N=n, bits=bits, block_size=nbits.BLOCK,
                              accuracy_level=4)

    return {torch.ops.tiercache.gqa.default: gqa_onnx,
            torch.ops.tiercache.matmul_nbits.default: nbits_onnx}


# -- the block -------------------------------------------------------------------------------
class Block(nn.Module):
    """One decoder layer (ffn=True) or its attention half (ffn=False), weights as buffers."""

    def __init__(self, args, weights: dict[str, torch.Tensor], ffn: bool):
        super().__init__()
        self.args, self.ffn, self.act = args, ffn, ACTS[args.hidden_act]
        for name, t in weights.items():
            self.register_buffer(name, t)

    def forward(self, x, past_key, past_value, seqlens_k, total_len, cos, sin):
        a = self.args
        qkv = self.lin("qkv_proj", self.norm(x, self.input_layernorm))  # one packed MatMul
        o, pk, pv = torch.ops.tiercache.gqa(qkv, past_key, past_value, seqlens_k, total_len,
                                            cos, sin, a.num_attention_heads, a.num_key_value_heads)
        h = x + self.lin("o_proj", o)
        if self.ffn:
            n = self.norm(h, self.post_attention_layernorm)
            h = h + self.lin("down_proj", self.act(self.lin("gate_proj", n)) * self.lin("up_proj", n))
        return h, pk, pv

    def norm(self, x, w):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.args.rms_norm_eps)
        return w * x32.to(x.dtype)

    def lin(self, name, x):
        if hasattr(self, name + "_B"):
            b = getattr(self, name + "_B")  # [N, K/32, blob]
            n, k = b.shape[0], b.shape[1] * nbits.BLOCK
            bits = 8 * b.shape[2] // nbits.BLOCK
            y = torch.ops.tiercache.matmul_nbits(x, b, getattr(self, name + "_scales"),
                                                 getattr(self, name + "_zp", None), k, n, bits)
        else:
            y = x @ getattr(self, name)  # stored [K, N] so that no transpose is exported
        bias = getattr(self, name + "_bias", None)
        return y if bias is None else y + bias


# -- weights of one layer --------------------------------------------------------------------
def layer_weights(model, store, i: int, kind: str, ffn: bool) -> dict[str, torch.Tensor]:
    """Layer i's initializers, read from the store (q8/q4 repacked from its bytes, the rest
    decoded to f32); without a store, from the model's parameters (HF names either way). The
    store is the source so that an engine whose modules hold no dense weights (tiered) works."""
    pre = f"model.layers.{i}."
    w = {"input_layernorm": _f32(_tensor(model, store, pre + "input_layernorm.weight"))}
    for p in ATTN:
        name = f"{pre}self_attn.{p}"
        w.update(_linear(p, lambda: _tensor(model, store, name + ".weight"),
                         _store_tensor(store, name + ".weight", kind)))
        if _has(model, store, name + ".bias"):
            w[p + "_bias"] = _f32(_tensor(model, store, name + ".bias"))
    w.update(_pack_qkv(w))
    if ffn:
        w["post_attention_layernorm"] = _f32(_tensor(model, store, pre + "post_attention_layernorm.weight"))
        packed = _store_ffn(store, i, kind)
        dense = None if all(p is not None for p in packed) else _ffn_f32(model, store, i)
        for j, p in enumerate(FFN_PARTS):
            w.update(_linear(p, lambda: dense[j], packed[j]))
    return w


def _tensor(model, store, name: str) -> torch.Tensor:
    if store is not None and name in store.manifest["tensors"]:
        return store.tensor(name)
    return model.get_parameter(name)


def _has(model, store, name: str) -> bool:
    if store is not None:
        return name in store.manifest["tensors"]
    return name in dict(model.named_parameters())


def _ffn_f32(model, store, i: int):
    """gate [F, d], up [F, d], down [d, F] of layer i in f32."""
    if store is not None:
        return store.ffn_weights(i, 0)
    return tuple(model.get_parameter(f"model.layers.{i}.mlp.{p}.weight") for p in FFN_PARTS)


def _pack_qkv(w: dict) -> dict:
    """q, k, v as one [K, Nq + 2 Nkv] matrix (or MatMulNBits rows): GroupQueryAttention's
    packed input, one MatMul instead of three."""
    out = {}
    for suffix, dim in (("", 1), ("_B", 0), ("_scales", 0), ("_zp", 0), ("_bias", 0)):
        parts = [w.pop(p + suffix, None) for p in ATTN[:3]]
        if parts[0] is not None:
            out["qkv_proj" + suffix] = torch.cat(parts, dim=dim)
    return out


def _f32(t):
    return t.detach().to("cpu", torch.float32).contiguous()


def _linear(name, weight, packed):
    """MatMulNBits inputs when packed, else the f32 matrix (weight() [N, K]) stored as [K, N]."""
    if packed is None:
        return {name: _f32(weight().t())}
    return {f"{name}_{k}": v for k, v in packed.items()}


def _store_tensor(store, name, kind):
    meta = None if store is None else store.manifest["tensors"].get(name)
    if kind not in ("q8", "q4") or meta is None or meta["dtype"] not in (kind, _kernel(kind)):
        return None
    raw = _as_stored(store._get(tensor_key(name)), meta["shape"], meta["dtype"])  # crc-checked
    return nbits.repack(QuantWeight(raw, tuple(meta["shape"]), kind))


def _kernel(kind: str) -> str:
    """The engine's kernel layout of a quantization kind (q4 stores keep attention in q4k)."""
    return "q4k" if kind == "q4" else kind


def _as_stored(raw, shape, dtype: str) -> bytes:
    """q4k bytes back into q4's layout (same nibbles), for MatMulNBits; others as they are."""
    if dtype != "q4k":
        return raw
    return quant.q4k_to_q4(torch.frombuffer(bytearray(raw), dtype=torch.uint8), shape)


def _store_ffn(store, i, kind):
    """gate, up, down of layer i as MatMulNBits inputs, repacked from the cluster records:
    gate/up rows [n, d] stack along N; down columns [d, n] (grouped along n) join along K."""
    if kind not in ("q8", "q4") or store is None or store.ffn_dtype not in (kind, _kernel(kind)):
        return None, None, None
    parts = ([], [], [])
    for c in range(store.n_clusters):
        buf = memoryview(store.cluster_bytes(i, 0, c))
        for out, (shape, off, nb) in zip(parts, store.cluster_parts(c)):
            raw = _as_stored(bytes(buf[off:off + nb]), shape, store.ffn_dtype)
            out.append(nbits.repack(QuantWeight(raw, tuple(shape), kind)))
    return nbits.concat(parts[0]), nbits.concat(parts[1]), nbits.concat_k(parts[2])


# -- export and the per-layer files ------------------------------------------------------------
def export_template(args, like: dict[str, torch.Tensor], ffn: bool, static: tuple | None):
    """-> onnx.ModelProto of the block with noise weights shaped like `like`.

    static=(bucket, max_len) fixes every shape (T = bucket, KV and rope tables max_len long);
    None exports T, the KV buffer length and the rope table length as dynamic dimensions.
    """
    _register_schemas()
    gen = torch.Generator().manual_seed(0)
    noise = {k: _noise(v, gen) for k, v in like.items()}
    T, M = static if static else (7, 32)
    hd, kv = args.head_dim, args.num_key_value_heads
    example = (torch.zeros(1, T, args.hidden_size), torch.zeros(1, kv, M, hd),
               torch.zeros(1, kv, M, hd), torch.tensor([T - 1], dtype=torch.int32),
               torch.tensor(T, dtype=torch.int32), torch.zeros(M, hd // 2), torch.zeros(M, hd // 2))
    with _quiet():
        prog = torch.onnx.export(Block(args, noise, ffn).eval(), example, dynamo=True,
                                 dynamic_shapes=None if static else _dynamic_shapes(),
                                 custom_translation_table=_translations(), input_names=INPUTS,
                                 output_names=OUTPUTS, opset_version=OPSET, optimize=True,
                                 verbose=False)
    proto = prog.model_proto
    proto.ir_version = IR_VERSION
    missing = set(like) - {t.name for t in proto.graph.initializer}
    if missing:
        raise RuntimeError(f"export renamed initializers {sorted(missing)}; cannot swap weights")
    return proto


@contextlib.contextmanager
def _quiet():
    """The exporter warns about torchvision and axis names on every export: not ours to act on."""
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


def _noise(t, gen):
    if t.dtype == torch.uint8:
        return torch.randint(0, 256, t.shape, generator=gen, dtype=torch.uint8)
    return torch.rand(t.shape, generator=gen) + 0.5


def _dynamic_shapes():
    T = torch.export.Dim("T", min=1, max=1 << 16)
    M = torch.export.Dim("M", min=2, max=1 << 20)
    C = torch.export.Dim("C", min=2, max=1 << 20)
    return {"x": {1: T}, "past_key": {2: M}, "past_value": {2: M}, "seqlens_k": None,
            "total_len": None, "cos": {0: C}, "sin": {0: C}}


def with_weights(template, weights: dict[str, torch.Tensor]):
    """A copy of the template whose initializers are `weights` (matched by name)."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.ModelProto()
    proto.CopyFrom(template)
    for init in proto.graph.initializer:
        if init.name in weights:
            init.CopyFrom(numpy_helper.from_array(weights[init.name].numpy(), init.name))
    return proto


class LayerGraphs:
    """The ONNX file of each layer for one (model, kind, variant, shapes), cached on disk."""

    def __init__(self, model, store, kind: str, ffn: bool, static: tuple | None):
        self.model, self.store, self.kind, self.ffn, self.static = model, store, kind, ffn, static
        self.template = None
        self.dir = _cache_dir(store, model.args, kind, ffn, static)

    @property
    def key(self) -> str:
        return self.dir.name if self.dir else "in-memory"

    def load(self, i: int):
        """Path of layer i's .onnx (exported on first use), or its bytes if there is no cache."""
        path = self.dir / f"layer{i}.onnx" if self.dir else None
        if path is not None and path.is_file():
            return str(path)
        proto = self.build(i)
        if path is None or not _write(path, proto):
            return proto.SerializeToString()
        return str(path)

    def build(self, i: int):
        w = layer_weights(self.model, self.store, i, self.kind, self.ffn)
        if self.template is None:
            self.template = export_template(self.model.args, w, self.ffn, self.static)
        return with_weights(self.template, w)


def _cache_dir(store, args, kind, ffn, static) -> Path | None:
    if store is None:
        return None
    shapes = f"t{static[0]}-kv{static[1]}" if static else "dyn"
    name = f"{args.model_type}-{kind}-{'layer' if ffn else 'attn'}-{shapes}-v{EXPORT_VERSION}"
    d = Path(store.path) / "onnx" / name
    stamp = d / "store_id"
    try:
        if not (stamp.is_file() and stamp.read_text() == store.manifest["store_id"]):
            d.mkdir(parents=True, exist_ok=True)
            for old in d.glob("layer*.onnx"):  # graphs of another store that had this path
                old.unlink()
            stamp.write_text(store.manifest["store_id"])
    except OSError:
        return None  # a read-only store: graphs stay in memory
    return d


def _write(path: Path, proto) -> bool:
    """Write atomically (a crash never leaves a truncated graph that looks cached)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_bytes(proto.SerializeToString())
        os.replace(tmp, path)
        return True
    except OSError:
        tmp.unlink(missing_ok=True)
        return False
