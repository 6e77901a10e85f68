"""The compute interface the engine needs, and quantized weights as the store holds them.

A backend is bound to one model (and its store, for quantized records) and then runs:
  prefill_layers  a range of whole decoder layers over [B, T, d], writing K/V into the caches
  attention       the attention half of one layer (norm, attention with the KV cache, residual)
  sparse_ffn      an FFN over gathered neuron rows (gate/up rows, down columns transposed)
  qmatmul         x @ W.T with W kept in the store's q8/q4 encoding
"""
from __future__ import annotations

import abc
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tiercache.errors import TiercacheError, TiercacheWarning
from tiercache.models.llama import ACTS
from tiercache.store import quant


class BackendUnsupported(TiercacheError):
    """This backend cannot run this model (e.g. a graph its provider rejects)."""


class BackendFallbackWarning(TiercacheWarning):
    """A phase runs on torch instead of the backend asked for (the CLI prints one line)."""


@dataclass(frozen=True)
class QuantWeight:
    """A [N, K] matrix in quant.py's encoding (rows are output features, groups of 32 along K)."""

    raw: bytes
    shape: tuple[int, int]
    dtype: str  # "q8" | "q4" | "f32" | "f16" | "bf16"

    @classmethod
    def encode(cls, w: torch.Tensor, dtype: str) -> "QuantWeight":
        return cls(quant.encode(w, dtype), tuple(w.shape), dtype)

    def dequantize(self, out_dtype=torch.float32) -> torch.Tensor:
        return quant.decode(self.raw, self.shape, self.dtype, out_dtype)

    @property
    def quantized(self) -> bool:
        return self.dtype in ("q8", "q4")


class Backend(abc.ABC):
    """One compute backend. `bind` once, then call the kernels; `describe` says what runs."""

    name: str = "?"
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32

    def __init__(self, threads: int = 1):
        self.threads = threads
        self.model = self.store = None

    def bind(self, model, store=None) -> "Backend":
        """Attach the model (its torch modules) and, for quantized weights, its store."""
        self.model, self.store = model, store
        return self

    @abc.abstractmethod
    def prefill_layers(self, layers: range, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       caches: list) -> torch.Tensor:
        """h [B, T, d]; cos/sin [T, head_dim] of the new positions -> h after `layers`.

        caches[i] is layer i's KVCache; each gains the T new positions (offset += T).
        """

    @abc.abstractmethod
    def attention(self, i: int, h: torch.Tensor, cos, sin, cache) -> torch.Tensor:
        """h + self_attn(input_layernorm(h)) for layer i, with the KV cache updated."""

    @abc.abstractmethod
    def sparse_ffn(self, x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                   down_t: torch.Tensor, act: str = "silu") -> torch.Tensor:
        """x [N, d]; gate/up/down_t [n, d] for n gathered neurons -> [N, d]."""

    @abc.abstractmethod
    def qmatmul(self, x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
        """x [..., K] @ W.T -> [..., N] for W in the store's encoding."""

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device)

    def describe(self) -> dict:
        return {"backend": self.name, "device": str(self.device), "provider": self.name,
                "threads": self.threads, "dtype": str(self.dtype).replace("torch.", "")}


def reference_sparse_ffn(x, gate, up, down_t, act: str = "silu"):
    """The torch formula every backend is checked against."""
    return (ACTS[act](F.linear(x, gate)) * F.linear(x, up)) @ down_t
