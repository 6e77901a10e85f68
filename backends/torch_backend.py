"""torch on CPU or CUDA: the reference every other backend is checked against."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tiercache.errors import TiercacheError

from .base import Backend, QuantWeight, reference_sparse_ffn


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, device: str = "cpu", threads: int = 1):
        super().__init__(threads)
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise TiercacheError("backend torch:cuda asked for, but torch sees no CUDA GPU")
        self.device = torch.device(device)

    def bind(self, model, store=None) -> "TorchBackend":
        # the model's modules compute here, so they live on this backend's device
        super().bind(model.to(self.device), store)
        return self

    @torch.no_grad()
    def prefill_layers(self, layers, h, cos, sin, caches):
        blocks = self.model.model.layers
        for i in layers:
            h = blocks[i](h, cos, sin, caches[i])
        return h

    @torch.no_grad()
    def attention(self, i, h, cos, sin, cache):
        layer = self.model.model.layers[i]
        return h + layer.self_attn(layer.input_layernorm(h), cos, sin, cache)

    @torch.no_grad()
    def sparse_ffn(self, x, gate, up, down_t, act="silu"):
        return reference_sparse_ffn(*(t.to(self.device) for t in (x, gate, up, down_t)), act)

    @torch.no_grad()
    def qmatmul(self, x, w: QuantWeight):
        return F.linear(x.to(self.device), w.dequantize(x.dtype).to(self.device))

    def describe(self) -> dict:
        d = super().describe()
        d["provider"] = f"torch:{self.device.type}"
        d["threads"] = torch.get_num_threads() if self.device.type == "cpu" else None
        return d
