"""A dense decoder layer at decode as one call of tiercache's kernel (`_q4.layer`): norm,
q|k|v, RoPE, the KV cache write, attention, o_proj, residual, norm, gate|up, SiLU, down and
residual, with no Python or torch op between the kernels. Used where every weight of the layer
is resident in q4 (attention as QLinears, the FFN, or every expert of an MoE layer, as pinned
int4 Blocks), the activation is SiLU, one sequence decodes one position, the KV cache is f16 or
f32 and the kernel runs a SIMD path here; everything else takes the modules' own path (prompts
always do). An MoE layer is two calls: attention up to the router's input, then the routed
experts; the router and its bookkeeping (`ClusterFFN.routed`) stay in torch between them.

Why: at decode a token's torch ops and Python between the kernels took ~4.5 ms of ~29 on the
1B shape (1 thread, Zen 5), and kept the second thread idle meanwhile. Resident, decode, same
process alternating (tools/bench.py's model, AVX-512 VNNI): 1 thread 35.8 -> 38 tok/s,
2 threads 53 -> 60; the synthetic Mixtral 61 -> 76 and 68 -> 83-99. `TierConfig(fused=False)`
keeps the modules' path.
"""
from __future__ import annotations

import torch

from . import q4
from .ffn import rows_per_expert
from .kernels import QKV, QLinear, ram_layout


def usable() -> bool:
    """The fused layer needs the kernel's AVX2 or VNNI path, and F16C (the f16 cache)."""
    return q4.path() in ("avx2", "vnni") and q4._ext().layer_ok()


class FusedLayer:
    """A layer's decode step: attention and a dense FFN in one call, or (MoE) attention in one,
    the router in torch, and the routed experts in another."""

    def __init__(self, layer, blocks: list, count):
        att = layer.self_attn
        qkv, o = att.qkv_proj, att.o_proj
        self.moe = getattr(layer, "block_sparse_moe", None)
        pairs = [(m.packed, m.sz) for m in (*qkv.parts, o)]
        if self.moe is None:
            pairs += _ffn(blocks[0])
        self.keep = [(p.contiguous(), s.contiguous()) for p, s in pairs]  # the pointers' owners
        self.mats = tuple((p.data_ptr(), s.data_ptr(), s.shape[1]) for p, s in self.keep)
        self.experts = []
        if self.moe is not None:
            for b in blocks:
                kept = [(p.contiguous(), s.contiguous()) for p, s in _ffn(b)]
                self.keep += kept
                self.experts.append(tuple((p.data_ptr(), s.data_ptr(), s.shape[1])
                                          for p, s in kept))
        n1, n2 = layer.input_layernorm, layer.post_attention_layernorm
        self.norms = (n1.weight.detach().float().contiguous(),
                      n2.weight.detach().float().contiguous())
        self.eps = float(n1.eps)
        self.heads, self.kv_heads, self.hd = att.n_heads, att.n_kv, att.hd
        self.ff = blocks[0].row_sz[0].shape[1]
        self.bn = 64 // ram_layout()
        self.count = count  # (experts) -> the FFN's clusters count as hot hits, as on the
        # modules' path

    @staticmethod
    def fits(layer, blocks: list, act: str) -> bool:
        att = layer.self_attn
        return (usable() and blocks and all(b is not None for b in blocks) and act == "silu"
                and isinstance(att.qkv_proj, QKV) and isinstance(att.o_proj, QLinear)
                and all(m.bias is None for m in (*att.qkv_proj.parts, att.o_proj))
                and layer.tail is None and att.hd % 8 == 0
                and len({b.row_sz[0].shape[1] for b in blocks}) == 1)

    def __call__(self, x, cos, sin, cache):
        if cache.k is None or cache.offset + 1 > cache.k.shape[2]:
            cache._grow(cache.offset + 1, x.device)
        k, v = cache.k, cache.v
        out = x.reshape(-1).float().clone()
        c, s = cos.reshape(-1).float().contiguous(), sin.reshape(-1).float().contiguous()
        h = torch.empty_like(out) if self.moe is not None else None
        threads, isa = q4.threads(), q4.ISAS[q4.path()]
        q4._ext().layer(out.data_ptr(), out.numel(), self.norms[0].data_ptr(),
                        self.norms[1].data_ptr(), self.eps,
                        self.mats if h is None else self.mats[:4], self.heads, self.kv_heads,
                        self.hd, self.ff, c.data_ptr(), s.data_ptr(), k.data_ptr(),
                        v.data_ptr(), k.dtype == torch.float16, k.shape[2], cache.offset,
                        self.bn, threads, isa, 0 if h is None else h.data_ptr())
        cache.offset += 1
        if h is None:
            self.count([0])
        else:  # the router as TieredMoE's decode path runs it (and its bookkeeping)
            moe, row = self.moe, h.view(1, -1)
            w, idx = moe.route(row)
            ids, ws = idx[0].tolist(), w[0].tolist()
            moe.source.routed(moe.layer, ids, row, moe.route_next,
                              rows_per_expert(ids, len(self.experts)))
            q4._ext().experts(out.data_ptr(), h.data_ptr(), out.numel(),
                              [(wt, *self.experts[e]) for e, wt in zip(ids, ws)], self.ff,
                              self.bn, threads, isa)
            self.count(ids)
        return out.view(x.shape).to(x.dtype)

    @staticmethod
    def cache_ok(cache) -> bool:
        return (cache.shape[0] == 1 and cache.dtype in (torch.float16, torch.float32)
                and (cache.k is None or cache.k.is_contiguous()))


def _ffn(block) -> list:
    """A whole int4 Block's (packed, sz) for gate, up and down."""
    return [(block.row_q[0], block.row_sz[0]), (block.row_q[1], block.row_sz[1]),
            (block.down_q, block.down_sz)]
