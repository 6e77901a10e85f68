"""KV cache: a preallocated buffer per layer that grows in steps; protocol update_and_fetch/offset/trim/nbytes.

Stored in f16 by default (half of f32's bytes, what llama.cpp keeps too); attention computes in
the activations' dtype, so each step reads the cache back converted.
"""
from __future__ import annotations

import torch

from ..cache.kv import STEP, Growing, capacity

DTYPES = {"f16": torch.float16, "f32": torch.float32}


def kv_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        from ..errors import TiercacheError
        raise TiercacheError(f"unknown KV cache dtype '{name}' (choose from {', '.join(DTYPES)})")
    return DTYPES[name]


def kv_bytes(args, positions: int, dtype: str = "f16") -> int:
    """Bytes of K and V for `positions` positions of every layer, plus the f32 scratch one
    layer is read back through when they are stored in another dtype (`Scratch`)."""
    per_layer = 2 * args.num_key_value_heads * args.head_dim * positions
    scratch = 0 if dtype == "f32" else per_layer * 4
    return per_layer * args.num_hidden_layers * DTYPES[dtype].itemsize + scratch


class Scratch:
    """A float32 copy of one layer's K/V, shared by a session's layers (they run one at a
    time): attention reads an f16 cache through it. torch's f16 attention on CPU is 10-20x
    slower than f32; converting into a fresh tensor each step cost 3.6x f32's attention at
    2048 positions (page faults), into this reused buffer 2.1x (1 thread, 1B shape)."""

    def __init__(self):
        self.k = self.v = None

    def read(self, keys: torch.Tensor, values: torch.Tensor, dtype: torch.dtype):
        """keys, values [B, Hkv, T, D] -> the same in `dtype`, valid until the next read."""
        b, h, t, d = keys.shape
        if self.k is None or self.k.shape[2] < t or self.k.dtype != dtype:
            cap = capacity(t)
            self.k = torch.empty(b, h, cap, d, dtype=dtype, device=keys.device)
            self.v = torch.empty_like(self.k)
        k, v = self.k[:, :, :t], self.v[:, :, :t]
        k.copy_(keys)
        v.copy_(values)
        return k, v


class KVCache(Growing):
    step = STEP

    def __init__(self, batch: int, n_kv: int, head_dim: int, dtype=torch.float32, device=None,
                 scratch: Scratch | None = None):
        self.shape = (batch, n_kv, 0, head_dim)
        self.dtype, self.device = dtype, device
        self.scratch = scratch if scratch is not None else Scratch()
        self.k = self.v = None
        self.offset = 0

    def update_and_fetch(self, k, v):
        """k, v [B, Hkv, T, D] for the new positions -> all keys/values so far."""
        t = k.shape[2]
        if self.k is None or self.offset + t > self.k.shape[2]:
            self._grow(self.offset + t, k.device)
        self.k[:, :, self.offset:self.offset + t] = k
        self.v[:, :, self.offset:self.offset + t] = v
        self.offset += t
        keys, values = self.k[:, :, :self.offset], self.v[:, :, :self.offset]
        if keys.dtype != k.dtype:  # [B, Hkv, offset, D] in the activations' dtype
            return self.scratch.read(keys, values, k.dtype)
        return keys, values

    def _grow(self, need: int, device):
        cap = capacity(need)
        b, h, _, d = self.shape
        k = torch.zeros(b, h, cap, d, dtype=self.dtype, device=device)
        v = torch.zeros_like(k)
        if self.k is not None:
            k[:, :, :self.offset] = self.k[:, :, :self.offset]
            v[:, :, :self.offset] = self.v[:, :, :self.offset]
        self.k, self.v = k, v


