"""Slot pools: where cached FFN clusters live, in the format the kernels compute on.

A slot holds one cluster's row parts (up, and gate when the gate is not pinned) [n, d] and its
down columns [d, n]. `rows(x, slots, i)` and `down(h, slots)` gather the slots' weights into one
matrix and run one matmul, so a layer's FFN is a few kernel calls whatever the cluster count.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..store import quant
from .kernels import (int4_available, int4_mm, int4_mm_many, native_shape, plain_copy, q4_copy,
                      to_native)


class Float32Slots:
    """Exact path: dequantized float32 weights (any store dtype)."""

    def __init__(self, n_slots: int, n: int, d: int, ffn_dtype: str, row_parts: int = 1):
        self.n, self.d, self.dtype = n, d, ffn_dtype
        self.row_w = [torch.zeros(n_slots, n, d) for _ in range(row_parts)]
        self.down_w = torch.zeros(d, n_slots, n)

    @staticmethod
    def slot_bytes(n: int, d: int, row_parts: int = 1) -> int:
        return (row_parts + 1) * n * d * 4

    def prepare(self, parts) -> tuple:
        """[(shape, bytes)] of the row parts then down -> tensors ready for a slot."""
        return tuple(quant.decode(b, s, self.dtype) for s, b in parts)

    def prepare_many(self, items: list) -> list:
        return [self.prepare(parts) for parts in items]

    def write(self, slot: int, prepared) -> None:
        *rows, down = prepared
        for pool, r in zip(self.row_w, rows):
            pool[slot, :r.shape[0]] = r  # a short last cluster leaves zero rows
        self.down_w[:, slot, :down.shape[1]] = down

    def rows(self, x, slots, part: int = 0):
        return F.linear(x, _take(self.row_w[part], slots).view(-1, self.d))

    def down(self, h, slots):
        return F.linear(h, self.down_w.index_select(1, slots).view(self.d, -1))

    @staticmethod
    def gate(rows: list[tuple], dtype: str):
        """Pinned gate of one layer from its clusters' gate parts -> callable x -> [T, F]."""
        w = torch.cat([quant.decode(b, s, dtype) for s, b in rows])
        return lambda x: F.linear(x, w)


class Int4Slots:
    """q4k stores: torch's int4 CPU kernel on bf16 activations. Records are in the kernel's
    canonical layout (quant.py, q4k), so a miss is a copy into its slot (reshuffled into this
    CPU's row block by `q4_copy`), not a repack; slots are slot-major so that copy is
    contiguous."""

    def __init__(self, n_slots: int, n: int, d: int, ffn_dtype: str = "q4k", row_parts: int = 1):
        self.n, self.d = n, d
        g = quant.GROUP
        self.row_q = [torch.zeros(n_slots, *native_shape(n // 64, d), dtype=torch.uint8)
                      for _ in range(row_parts)]
        self.row_sz = [torch.zeros(n_slots, d // g, n, 2, dtype=torch.bfloat16)
                       for _ in range(row_parts)]
        self.down_q = torch.zeros(n_slots, *native_shape(d // 64, n), dtype=torch.uint8)
        self.down_sz = torch.zeros(n_slots, n // g, d, 2, dtype=torch.bfloat16)

    @staticmethod
    def supports(n: int, d: int, ffn_dtype: str, intermediate: int) -> bool:
        return int4_available() and ffn_dtype == "q4k"

    @staticmethod
    def slot_bytes(n: int, d: int, row_parts: int = 1) -> int:
        return (row_parts + 1) * (n * d // 2 + (n * d // quant.GROUP) * 4)

    def prepare(self, parts) -> tuple:
        """[(shape, bytes)] -> ((packed, sz) per part): views of the record, nothing decoded."""
        return tuple(quant.q4k_views(_u8(b), s) for s, b in parts)

    def prepare_many(self, items: list) -> list:
        return [self.prepare(parts) for parts in items]

    def write(self, slot: int, prepared) -> None:
        *rows, (dq, dsz) = prepared
        for q_pool, sz_pool, (q, sz) in zip(self.row_q, self.row_sz, rows):
            q4_copy(q_pool[slot], q)
            sz_pool[slot] = sz
        q4_copy(self.down_q[slot], dq)
        self.down_sz[slot] = dsz

    def rows(self, x, slots, part: int = 0):
        k = len(slots) * self.n
        q = _take(self.row_q[part], slots)  # [s, n/64, H, d, 32/H]
        sz = self.row_sz[part].index_select(0, slots).transpose(0, 1).reshape(
            self.d // quant.GROUP, k, 2)
        return int4_mm(x, q, sz).float()

    def down(self, h, slots):
        k = len(slots) * self.n
        q = self.down_q.index_select(0, slots).permute(1, 2, 0, 3, 4)  # [d/64, H, s, n, 32/H]
        q = q.reshape(self.d // 64, q.shape[1], k, q.shape[-1])
        sz = _take(self.down_sz, slots).reshape(k // quant.GROUP, self.d, 2)
        return int4_mm(h, q, sz).float()

    @staticmethod
    def gate(rows: list[tuple], dtype: str):
        views = [quant.q4k_views(torch.frombuffer(bytearray(b), dtype=torch.uint8), s)
                 for s, b in rows]
        packed = to_native(torch.cat([q for q, _ in views]))
        sz = torch.cat([z for _, z in views], dim=1)
        return lambda x: int4_mm(x, packed, sz).float()


class Block:
    """A layer's pinned (hot) clusters joined once into kernel-ready matrices: no gather per
    token. Built from the `prepare` outputs of one slot class, in cluster order, or (int4)
    straight from the records of a layer's streamed clusters (`joined`)."""

    @classmethod
    def joined(cls, records: list[torch.Tensor], parts: list, n: int, d: int) -> "Block":
        """q4k cluster records (uint8 tensors, read in one run) -> a new Block in a few copies:
        one per part and run of evenly spaced records, instead of a view per record and part
        joined by `torch.cat`. parts: [(shape, offset, nbytes)] of the row parts kept (gate,
        up) and then down."""
        b, copies = cls.joining(records, parts, n, d, _empty)
        for copy, dst, src in copies:
            copy(dst, src)
        return b

    @classmethod
    def joining(cls, records: list[torch.Tensor], parts: list, n: int, d: int,
                alloc) -> tuple["Block", list]:
        """-> (a Block whose tensors come from alloc(shape, dtype), [(copy, dst, src)] copies
        that fill it from the records). A streamer keeps both, to redo only the copies each
        token."""
        g, k, half = quant.GROUP, len(records), n * d // 2
        b = cls.__new__(cls)
        b.int4 = True
        *rows, (_, off, nb) = parts
        b.row_q = [alloc(native_shape(k * n // 64, d), torch.uint8) for _ in rows]  # [n, d]
        b.row_sz = [alloc((d // g, k * n, 2), torch.bfloat16) for _ in rows]
        b.down_q = alloc(native_shape(d // 64, k * n), torch.uint8)  # down [d, n]: along n
        h = b.down_q.shape[1]
        b.down_sz = alloc((k * n // g, d, 2), torch.bfloat16)
        copies = []
        for lo, recs in _runs(records):
            j, hi = len(recs), lo + len(recs)
            for (_, o, size), out_q, out_sz in zip(rows, b.row_q, b.row_sz):
                q = recs[:, o:o + half].view(j, n // 64, d, 32)
                dst = out_q[lo * n // 64:hi * n // 64].view(j, n // 64, h, d, 32 // h)
                copies.append((q4_copy, dst, q))
                sz = recs[:, o + half:o + size].view(torch.bfloat16).view(j, d // g, n, 2)
                copies.append((plain_copy, out_sz[:, lo * n:hi * n].view(d // g, j, n, 2),
                               sz.permute(1, 0, 2, 3)))
            q = recs[:, off:off + half].view(j, d // 64, n, 32)
            dst = b.down_q[:, :, lo * n:hi * n].view(d // 64, h, j, n, 32 // h).transpose(1, 2)
            copies.append((q4_copy, dst, q.permute(1, 0, 2, 3)))
            sz = recs[:, off + half:off + nb].view(torch.bfloat16).view(j, n // g, d, 2)
            copies.append((plain_copy, b.down_sz[lo * n // g:hi * n // g].view(sz.shape), sz))
        return b, copies

    def __init__(self, slots_cls, prepared: list):
        self.int4 = slots_cls is Int4Slots
        *rows, down = zip(*prepared)
        if self.int4:
            self.row_q = [to_native(torch.cat([q for q, _ in r])) for r in rows]
            self.row_sz = [torch.cat([sz for _, sz in r], dim=1) for r in rows]
            self.down_q = to_native(torch.cat([q for q, _ in down], dim=1))
            self.down_sz = torch.cat([sz for _, sz in down])
        else:
            self.row_w = [torch.cat(r) for r in rows]
            self.down_w = torch.cat(down, dim=1)

    def rows(self, x, part: int = 0):
        if self.int4:
            return int4_mm(x, self.row_q[part], self.row_sz[part]).float()
        return F.linear(x, self.row_w[part])

    def down(self, h):
        if self.int4:
            return int4_mm(h, self.down_q, self.down_sz).float()
        return F.linear(h, self.down_w)

    def ffn(self, x, act):
        """Every neuron of the block: down(act(gate x) * up x), gate and up in one call."""
        if self.int4 and len(self.row_q) == 2:
            g, u = int4_mm_many(x, list(zip(self.row_q, self.row_sz)))
            return self.down(act(g) * u)
        return self.down(act(self.rows(x, 0)) * self.rows(x, 1))


def _runs(records: list[torch.Tensor]) -> list[tuple[int, torch.Tensor]]:
    """Equal-length records -> [(index of the first, [j, len] uint8)]: strided views (no copy)
    of the runs that sit one stride apart in one read buffer. A layer's clusters are written in
    order, but LMDB spaces them 17 or 18 pages apart (SmolLM2), so a layer is a few runs; one
    stacked copy of the layer cost an extra 1.8 MB allocation per unit."""
    out, start = [], 0
    n = records[0].numel()
    for i in range(1, len(records) + 1):
        if i < len(records) and _follows(records, start, i):
            continue
        first = records[start]
        step = (records[start + 1].storage_offset() - first.storage_offset()
                if i - start > 1 else n)
        out.append((start, first.as_strided((i - start, n), (step, 1))))
        start = i
    return out


def _follows(records: list[torch.Tensor], start: int, i: int) -> bool:
    """Whether record i continues the evenly spaced run that begins at `start`."""
    a, b = records[i - 1], records[i]
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    step = b.storage_offset() - a.storage_offset()
    if step < a.numel() or step % 2:
        return False
    return i - start < 2 or step == a.storage_offset() - records[i - 2].storage_offset()


def _empty(shape, dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)


def _u8(b) -> torch.Tensor:
    """A record part as a uint8 tensor: read buffers are tensors already; bytes are copied."""
    return b if isinstance(b, torch.Tensor) else torch.frombuffer(bytearray(b), dtype=torch.uint8)


def _take(pool: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """pool[slots] along dim 0: a view when the slots are one ascending run (pinned layers)."""
    first, last = int(slots[0]), int(slots[-1])
    if last - first + 1 == len(slots) and bool((slots.diff() == 1).all()):
        return pool[first:last + 1]
    return pool.index_select(0, slots)
