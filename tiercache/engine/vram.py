"""The VRAM tier's modules: layers and the head that the layout placed in a GPU's memory
(layout.py, `_vram_split`), in float16 there and computed there, inside a model whose other
layers compute on the CPU. Only the hidden state [B, T, d] and the RoPE tables cross between
the devices: a layer split as llama.cpp's --n-gpu-layers makes.

The device is a parameter (TierConfig.vram_device): tests stand the CPU in for it, so the
placement, the weights' way from the store and the model's wiring are checked without a GPU;
what only a GPU shows (speed, CUDA's own memory) comes from tools/bench_gpu.py.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import TiercacheError
from ..models.kv import KVCache
from ..models.llama import MoE

DTYPE = torch.float16  # what VRAM layers keep and compute in (a q4/q8 store is dequantized),
                       # on the CPU standing in too: tests check the dtype a GPU runs


def device(name: str) -> torch.device:
    """The VRAM tier's device, refused in one line where it is not there."""
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TiercacheError("--vram needs a CUDA GPU, and torch sees none here "
                             f"(torch {torch.__version__}, CUDA build: {torch.version.cuda})")
    return dev


class OnDevice(nn.Module):
    """A decoder layer held and computed on `device`: the hidden state and RoPE tables go
    there (a no-op after another layer there), and come back to the CPU after the last layer
    of a run of such layers (`back`)."""

    def __init__(self, layer: nn.Module, dev: torch.device, back: bool):
        super().__init__()
        self.layer, self.device, self.back = layer, dev, back
        self.dtype = next(layer.parameters()).dtype

    def forward(self, x, cos, sin, cache):
        y = self.layer(x.to(self.device, self.dtype), cos.to(self.device, self.dtype),
                       sin.to(self.device, self.dtype), cache)
        return y.to("cpu", torch.float32) if self.back else y  # the CPU's layers: float32


class OnDeviceHead(nn.Module):
    """The head's matrix on `device`: h (on the CPU) -> float32 logits on the CPU."""

    def __init__(self, weight: torch.Tensor, dev: torch.device):
        super().__init__()
        self.device, self.dtype = dev, DTYPE
        self.weight = nn.Parameter(weight.to(dev, self.dtype), requires_grad=False)

    def forward(self, h):
        y = nn.functional.linear(h.to(self.device, self.dtype), self.weight)
        return y.to("cpu", torch.float32)


class HybridMoE(MoE):
    """An MoE block whose layer's trunk is in VRAM (layout.py: experts as VRAM units): the
    router and the experts placed in VRAM compute on the device; a routed expert that is not
    there computes on the CPU (`cpu[e]`: the tiered engine's expert path, its expert cache and
    the store) on the block's input brought over once, its output sent back. `source.routed`
    is told the CPU's routed experts first, so that their misses are read at once.
    `uses`: routed (row, expert) uses computed [on the device, on the CPU]."""

    def __init__(self, moe: MoE, on_device: frozenset, cpu: dict, source, layer: int):
        nn.Module.__init__(self)
        self.top_k, self.gate = moe.top_k, moe.gate
        self.experts = nn.ModuleList(moe.experts[e] if e in on_device else cpu[e]
                                     for e in range(len(moe.experts)))
        self.on_device, self.source, self.layer = on_device, source, layer
        self.uses = [0, 0]

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        w, idx = self.route(x)
        routed = idx.unique().tolist()
        away = [e for e in routed if e not in self.on_device]
        if away:
            here = x.to("cpu", torch.float32)
            tokens = torch.bincount(idx.flatten(), minlength=len(self.experts)).tolist()
            self.source.routed(self.layer, away, here, None, tokens)
        out = torch.zeros_like(x)
        for e in routed:
            rows, slot = (idx == e).nonzero(as_tuple=True)
            if e in self.on_device:
                y = self.experts[e](x[rows])
            else:
                y = self.experts[e](here[rows.cpu()]).to(x.device, x.dtype)
            out.index_add_(0, rows, y * w[rows, slot, None])
            self.uses[e not in self.on_device] += len(rows)
        return out.view(shape)


def load_layer(layer: nn.Module, weights, prefix: str, sanitize) -> nn.Module:
    """Copy (HF name, tensor) pairs of one layer (names under `prefix`, as sanitize maps
    them) into `layer`'s parameters; every parameter must be given."""
    params = dict(layer.named_parameters())
    for name, w in weights:
        name = sanitize(name)
        if name is None or not name.startswith(prefix):
            continue
        p = params.pop(name[len(prefix):], None)
        if p is None or p.shape != w.shape:
            raise TiercacheError(f"weight {name} {tuple(w.shape)} does not fit the layer")
        with torch.no_grad():
            p.copy_(w)
    if params:
        raise TiercacheError(f"no weight for {prefix}{sorted(params)[0]} in the store")
    return layer


class StaticKV(KVCache):
    """A VRAM layer's KV cache: `context` positions allocated once on the device (what the
    layout counted for it), in DTYPE, written in place (models/kv.py's protocol, which never
    grows it here). A decode graph (`DecodeRun`) is captured over its buffers and writes
    position `offset` in them, so the buffers must never move."""

    def __init__(self, args, context: int, dev: torch.device):
        super().__init__(1, args.num_key_value_heads, args.head_dim, DTYPE, dev)
        self.k = torch.zeros(1, args.num_key_value_heads, context, args.head_dim, dtype=DTYPE,
                             device=dev)
        self.v = torch.zeros_like(self.k)
        self.graph = None  # the decode graph captured over these buffers (a run's first layer)

    def _grow(self, need: int, device):
        raise TiercacheError(f"the VRAM KV cache holds {self.k.shape[2]} positions; {need} "
                             "asked")


class DecodeRun:
    """Decode (one position) through the VRAM layers 0 .. n-1 (dense ones), and the final norm
    and head too where they are the whole model and the head is in VRAM, as one static step:
    fixed shapes (attention over the whole KV buffer, later positions masked), the position a
    device tensor, the KV written in place. On CUDA it is captured once per session as a CUDA
    graph, so that a token costs one replay instead of ~10 kernel launches a layer from Python
    (HF transformers eager on the H200 ran 11-13 tok/s on the 1.1B shape, bound by Python);
    elsewhere (the CPU standing in for tests) the same step runs eagerly. A capture that fails
    leaves the run eager, with a one-line warning."""

    def __init__(self, model, n: int, head: bool, dev: torch.device, context: int):
        self.layers = [model.model.layers[l].layer for l in range(n)]  # OnDevice's
        self.n, self.head, self.dev = n, head, dev
        self.inv_freq = model.inv_freq.to(dev, torch.float32)
        self.positions = torch.arange(context, device=dev)
        self.norm = model.model.norm.weight.detach().to(dev, torch.float32) if head else None
        self.eps = model.args.rms_norm_eps
        self.lm_head = model.lm_head.weight if head else None  # OnDeviceHead's, on dev
        self.graphs = dev.type == "cuda"

    def __call__(self, caches: list, x: torch.Tensor, pos: int) -> torch.Tensor:
        """x [1, 1, d] (the CPU's float32 embedding) at position `pos` -> the run's output on
        the CPU in float32: the hidden state after layer n-1, or the logits [1, 1, V]."""
        kv = [(c.k, c.v) for c in caches[:self.n]]
        g = caches[0].graph if self.graphs else None
        if g is None and self.graphs:
            g = caches[0].graph = self._capture(kv, pos)
        if g is None:
            out = self._step(x.to(self.dev, DTYPE), torch.tensor([pos], device=self.dev), kv)
        else:
            g.x.copy_(x)
            g.pos.fill_(pos)
            g.graph.replay()
            out = g.out
        for c in caches[:self.n]:
            c.offset = pos + 1
        return out.to("cpu", torch.float32)

    def _step(self, x: torch.Tensor, pos: torch.Tensor, kv: list) -> torch.Tensor:
        """The static step (no host sync, no shape that depends on `pos`)."""
        from ..models.llama import apply_rope
        f = pos.to(torch.float32)[:, None] * self.inv_freq[None]
        emb = torch.cat((f, f), dim=-1)  # [1, D]
        cos, sin = emb.cos().to(DTYPE), emb.sin().to(DTYPE)
        mask = (self.positions <= pos).view(1, 1, 1, -1)
        for layer, (kc, vc) in zip(self.layers, kv):
            a = layer.self_attn
            h = layer.input_layernorm(x)
            q = a.q_proj(h).view(1, 1, a.n_heads, a.hd).transpose(1, 2)
            k = a.k_proj(h).view(1, 1, a.n_kv, a.hd).transpose(1, 2)
            v = a.v_proj(h).view(1, 1, a.n_kv, a.hd).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            kc.index_copy_(2, pos, k)
            vc.index_copy_(2, pos, v)
            o = nn.functional.scaled_dot_product_attention(
                q, kc, vc, attn_mask=mask, enable_gqa=a.n_kv != a.n_heads)
            x = x + a.o_proj(o.transpose(1, 2).reshape(1, 1, -1))
            x = x + layer.ffn(layer.post_attention_layernorm(x))
        if not self.head:
            return x
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm
        return nn.functional.linear(x32.to(DTYPE), self.lm_head)

    def _capture(self, kv: list, pos: int):
        """The step captured as a CUDA graph over these KV buffers, with its static input,
        position and output (a warm-up first, on a side stream, as torch asks); None where
        the capture fails (the run stays eager)."""
        from types import SimpleNamespace
        with torch.inference_mode(False):  # written before each replay, in whatever mode
            x = torch.zeros(1, 1, self.layers[0].input_layernorm.weight.shape[0],
                            dtype=DTYPE, device=self.dev)
            p = torch.full((1,), pos, dtype=torch.long, device=self.dev)  # the warm-up
        # writes position `pos` of the KV buffers, which the first replay then writes again
        try:
            side = torch.cuda.Stream(self.dev)
            side.wait_stream(torch.cuda.current_stream(self.dev))
            with torch.cuda.stream(side):
                self._step(x, p, kv)
            torch.cuda.current_stream(self.dev).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self._step(x, p, kv)
        except RuntimeError as e:
            import warnings
            warnings.warn(f"VRAM decode runs without a CUDA graph: {str(e).splitlines()[0]}")
            self.graphs = False
            return None
        return SimpleNamespace(graph=graph, x=x, pos=p, out=out)
