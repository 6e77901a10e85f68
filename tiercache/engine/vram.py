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
