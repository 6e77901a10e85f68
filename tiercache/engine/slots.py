"""Slot pools: where cached FFN clusters live, in the format the kernels compute on.

A slot holds one cluster's up rows [n, d] and down columns [d, n]; the gate is pinned whole.
`up(x, slots)` and `down(h, slots)` gather the slots' weights into one matrix and run one
matmul, so a layer's sparse FFN is two kernel calls whatever the number of clusters.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..store import quant
from .kernels import int4_mm, int4_pack, int4_scales, q4_unpack


class Float32Slots:
    """Exact path: dequantized float32 weights (any store dtype)."""

    def __init__(self, n_slots: int, n: int, d: int, ffn_dtype: str):
        self.n, self.d, self.dtype = n, d, ffn_dtype
        self.up_w = torch.zeros(n_slots, n, d)
        self.down_w = torch.zeros(d, n_slots, n)

    @staticmethod
    def slot_bytes(n: int, d: int) -> int:
        return 2 * n * d * 4

    def prepare(self, parts) -> tuple:
        """(shape, bytes) of up and down -> tensors ready to copy into a slot."""
        (us, ub), (ds, db) = parts
        return quant.decode(ub, us, self.dtype), quant.decode(db, ds, self.dtype)

    def write(self, slot: int, prepared) -> None:
        up, down = prepared
        self.up_w[slot, :up.shape[0]] = up     # a short last cluster leaves zero rows
        self.down_w[:, slot, :down.shape[1]] = down

    def up(self, x, slots):
        return F.linear(x, _rows(self.up_w, slots).view(-1, self.d))

    def down(self, h, slots):
        return F.linear(h, self.down_w.index_select(1, slots).view(self.d, -1))

    @staticmethod
    def gate(rows: list[tuple], dtype: str):
        """Pinned gate of one layer from its clusters' gate parts -> callable x -> [T, F]."""
        w = torch.cat([quant.decode(b, s, dtype) for s, b in rows])
        return lambda x: F.linear(x, w), w.numel() * 4


class Int4Slots:
    """q4 stores: torch's int4 CPU kernel on bf16 activations (see kernels.py for the layout)."""

    def __init__(self, n_slots: int, n: int, d: int, ffn_dtype: str = "q4"):
        self.n, self.d = n, d
        g = quant.GROUP
        # the slot axis sits where one index_select yields the kernel's layout directly
        self.up_q = torch.zeros(n_slots, n // 64, d, 32, dtype=torch.uint8)
        self.up_sz = torch.zeros(d // g, n_slots, n, 2, dtype=torch.bfloat16)
        self.down_q = torch.zeros(d // 64, n_slots, n, 32, dtype=torch.uint8)
        self.down_sz = torch.zeros(n_slots, n // g, d, 2, dtype=torch.bfloat16)

    @staticmethod
    def supports(n: int, d: int, ffn_dtype: str, intermediate: int) -> bool:
        from .kernels import _HAVE_INT4
        return (_HAVE_INT4 and ffn_dtype == "q4" and n % 64 == 0 and d % 64 == 0
                and intermediate % n == 0)

    @staticmethod
    def slot_bytes(n: int, d: int) -> int:
        return 2 * (n * d // 2 + (n * d // quant.GROUP) * 4)

    def prepare(self, parts) -> tuple:
        (us, ub), (ds, db) = parts
        uq, us_, um = q4_unpack(ub, us)
        dq, ds_, dm = q4_unpack(db, ds)
        return int4_pack(uq), int4_scales(us_, um), int4_pack(dq), int4_scales(ds_, dm)

    def write(self, slot: int, prepared) -> None:
        uq, usz, dq, dsz = prepared
        self.up_q[slot] = uq.view(self.up_q.shape[1:])
        self.up_sz[:, slot] = usz
        self.down_q[:, slot] = dq
        self.down_sz[slot] = dsz

    def up(self, x, slots):
        k = len(slots) * self.n
        q = _rows(self.up_q, slots).view(k // 64, self.d, 32)
        sz = self.up_sz.index_select(1, slots).view(self.d // quant.GROUP, k, 2)
        return int4_mm(x, q, sz).float()

    def down(self, h, slots):
        k = len(slots) * self.n
        q = self.down_q.index_select(1, slots).view(self.d // 64, k, 32)
        sz = self.down_sz.index_select(0, slots).view(k // quant.GROUP, self.d, 2)
        return int4_mm(h, q, sz).float()

    @staticmethod
    def gate(rows: list[tuple], dtype: str):
        unpacked = [q4_unpack(b, s) for s, b in rows]
        q, sc, mn = (torch.cat(t) for t in zip(*unpacked))
        packed, sz = int4_pack(q), int4_scales(sc, mn)
        return (lambda x: int4_mm(x, packed, sz).float()), packed.numel() + sz.numel() * 2


def _rows(pool: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """pool[slots] along dim 0: a view when the slots are one ascending run (pinned layers)."""
    first, last = int(slots[0]), int(slots[-1])
    if last - first + 1 == len(slots) and bool((slots.diff() == 1).all()):
        return pool[first:last + 1]
    return pool.index_select(0, slots)
