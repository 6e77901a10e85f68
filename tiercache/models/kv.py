"""KV cache: a preallocated buffer per layer that grows in steps; protocol update_and_fetch/offset/trim/nbytes."""
from __future__ import annotations

import torch


class KVCache:
    step = 256

    def __init__(self, batch: int, n_kv: int, head_dim: int, dtype=torch.float32, device=None):
        self.shape = (batch, n_kv, 0, head_dim)
        self.dtype, self.device = dtype, device
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
        return self.k[:, :, :self.offset], self.v[:, :, :self.offset]

    def _grow(self, need: int, device):
        cap = -(-need // self.step) * self.step
        b, h, _, d = self.shape
        k = torch.zeros(b, h, cap, d, dtype=self.dtype, device=device)
        v = torch.zeros_like(k)
        if self.k is not None:
            k[:, :, :self.offset] = self.k[:, :, :self.offset]
            v[:, :, :self.offset] = self.v[:, :, :self.offset]
        self.k, self.v = k, v

    def trim(self, n: int) -> int:
        """Drop the last n positions (e.g. a rejected turn); returns how many were dropped."""
        n = min(n, self.offset)
        self.offset -= n
        return n

    @property
    def nbytes(self) -> int:
        return 0 if self.k is None else 2 * self.k.numel() * self.k.element_size()
