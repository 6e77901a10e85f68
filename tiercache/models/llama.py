"""Llama-family decoder (Llama, Mistral, Qwen2, SmolLM) and Mixtral MoE, with HF module names.

Module paths equal checkpoint keys (`model.layers.0.self_attn.q_proj.weight`), so loading is a
stream of (name, tensor). Mixtral's experts use gate_proj/up_proj/down_proj (see `sanitize`).
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .. import rope
from ..config import ModelArgs
from .kv import KVCache, Scratch

ACTS = {
    "silu": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu2": lambda x: F.relu(x).square(),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    return torch.from_numpy(rope.inv_freq(args))  # one owner: tiercache.rope (numpy)


def apply_rope(x, cos, sin):
    # x [B, H, T, D]; HF convention: rotate the two halves of D
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        b = args.attention_bias
        self.q_proj = nn.Linear(args.hidden_size, self.n_heads * self.hd, bias=b)
        self.k_proj = nn.Linear(args.hidden_size, self.n_kv * self.hd, bias=b)
        self.v_proj = nn.Linear(args.hidden_size, self.n_kv * self.hd, bias=b)
        self.o_proj = nn.Linear(self.n_heads * self.hd, args.hidden_size, bias=False)
        # an engine's fused kernel replacing the three: (x, cos, sin) -> q, k, v [B, H, T, D],
        # RoPE applied (and the layer's input norm, which is then an Identity)
        self.qkv_proj = None

    def forward(self, x, cos, sin, cache: KVCache):
        B, T, _ = x.shape
        if self.qkv_proj is not None:  # an engine's fused kernel: projected and rotated
            q, k, v = self.qkv_proj(x, cos, sin)
        else:
            q = self.q_proj(x).reshape(B, T, self.n_heads, self.hd).transpose(1, 2)
            k = self.k_proj(x).reshape(B, T, self.n_kv, self.hd).transpose(1, 2)
            v = self.v_proj(x).reshape(B, T, self.n_kv, self.hd).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        offset = cache.offset
        k, v = cache.update_and_fetch(k, v)  # [B, Hkv, offset+T, D]
        mask = causal_mask(T, offset, x.device) if T > 1 else None
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv != self.n_heads)
        o = o.transpose(1, 2).reshape(B, T, -1)
        return o if self.o_proj is None else self.o_proj(o)  # None: the layer's `tail` has it


def causal_mask(t: int, offset: int, device) -> torch.Tensor:
    """[T, offset+T] boolean: query i sees keys up to offset+i."""
    q = torch.arange(t, device=device).unsqueeze(1) + offset
    return torch.arange(offset + t, device=device).unsqueeze(0) <= q


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        d, f = args.hidden_size, args.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)
        self.act = ACTS[args.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Mixtral sparse MoE: softmax router, top-k experts, weights renormalized over the k."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.gate = nn.Linear(args.hidden_size, args.num_local_experts, bias=False)
        self.experts = nn.ModuleList(MLP(args) for _ in range(args.num_local_experts))

    def route(self, x):
        """x [N, d] -> (weights [N, k], expert ids [N, k])."""
        probs = F.softmax(self.gate(x).float(), dim=-1)
        w, idx = probs.topk(self.top_k, dim=-1)
        return (w / w.sum(-1, keepdim=True)).to(x.dtype), idx

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        w, idx = self.route(x)
        out = torch.zeros_like(x)
        for e in idx.unique().tolist():
            rows, slot = (idx == e).nonzero(as_tuple=True)
            out.index_add_(0, rows, self.experts[e](x[rows]) * w[rows, slot, None])
        return out.view(shape)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        if args.is_moe:
            self.block_sparse_moe = MoE(args)
        else:
            self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        # an engine's fused kernel for the rest of the layer after attention's heads: o_proj,
        # the residual, the post-attention norm, the FFN (or MoE) and its residual:
        # (heads [B, T, H*hd], x [B, T, d]) -> the layer's output (self_attn.o_proj is None)
        self.tail = None
        # an engine's whole layer at decode (one sequence, one position) in one call:
        # (x, cos, sin, cache) -> the layer's output, None where the modules run
        self.fused = None

    @property
    def ffn(self) -> nn.Module:
        return self.block_sparse_moe if hasattr(self, "block_sparse_moe") else self.mlp

    def forward(self, x, cos, sin, cache):
        if self.fused is not None and x.shape[0] == 1 and x.shape[1] == 1 \
                and self.fused.cache_ok(cache):
            return self.fused(x, cos, sin, cache)
        if self.tail is not None:
            return self.tail(self.self_attn(self.input_layernorm(x), cos, sin, cache), x)
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return h + self.ffn(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        # weights always come from a store: no random init, whose normal_ on the meta device
        # imports torch._dynamo and sympy (+67 MB of anonymous memory for the process's life)
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size,
                                         _weight=torch.empty(args.vocab_size, args.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


def materialize(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Give a module built under torch.device("meta") uninitialised CPU storage, in place
    (what `to_empty` does, without its meta `empty_like`, which imports sympy: +60 MB)."""
    for m in module.modules():
        for group in (m._parameters, m._buffers):
            for k, t in group.items():
                if t is not None and t.is_meta:
                    new = torch.empty(t.shape, dtype=dtype or t.dtype, device="cpu")
                    group[k] = nn.Parameter(new, t.requires_grad) if k in m._parameters else new
    return module


class Model(nn.Module):
    """Causal LM over token ids. `forward(ids, caches)` -> logits [B, T or 1, V]."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = LlamaModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)

    def make_cache(self, batch: int = 1, dtype: torch.dtype | None = None) -> list[KVCache]:
        a, scratch = self.args, Scratch()  # the layers share one read-back buffer
        return [KVCache(batch, a.num_key_value_heads, a.head_dim, dtype or self.dtype,
                        scratch=scratch) for _ in range(a.num_hidden_layers)]

    @property
    def dtype(self):
        return self.model.norm.weight.dtype

    def rope(self, offset: int, t: int, device):
        pos = torch.arange(offset, offset + t, device=device, dtype=torch.float32)
        f = torch.outer(pos, self.inv_freq.to(device))
        emb = torch.cat((f, f), dim=-1)  # [T, D]
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def forward(self, ids: torch.Tensor, caches: list[KVCache], last_only: bool = False):
        h = self.model.embed_tokens(ids)
        cos, sin = self.rope(caches[0].offset, ids.shape[1], ids.device)
        for layer, cache in zip(self.model.layers, caches):
            h = layer(h, cos, sin, cache)
        return self.logits(h[:, -1:] if last_only else h)

    def logits(self, h):
        h = self.model.norm(h)
        if "lm_head" in self._modules:  # untied, or an engine's own head over the tied bytes
            return self.lm_head(h)
        return F.linear(h, self.model.embed_tokens.weight)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy (name, tensor) pairs into parameters; returns the names loaded."""
        params = dict(self.named_parameters())
        loaded = set()
        for name, w in weights:
            name = sanitize(self.args, name)
            if name is None:
                continue
            p = params.get(name)
            if p is None or p.shape != w.shape:
                from ..errors import StoreError
                want = None if p is None else tuple(p.shape)
                raise StoreError(f"weight {name} {tuple(w.shape)} does not fit the model ({want})")
            with torch.no_grad():
                p.copy_(w)
            loaded.add(name)
        return loaded

    def missing(self, loaded: set[str]) -> list[str]:
        return sorted(set(dict(self.named_parameters())) - loaded)


def sanitize(args: ModelArgs, name: str) -> str | None:
    """Map checkpoint names onto module paths; None for tensors the model does not use."""
    if "rotary_emb" in name:
        return None
    if args.tie_word_embeddings and name == "lm_head.weight":
        return None
    if args.is_moe:
        for old, new in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            name = name.replace(f".{old}.weight", f".{new}.weight")
    return name
