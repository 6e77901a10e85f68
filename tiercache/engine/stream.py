"""Weights read from the store every token: what the RAM budget does not pin.

The forward pass uses weights in a fixed order, so the streamed ones are cut into units in that
order: per layer, its streamed attention projections and FFN clusters; then slices of the
head's rows. `Streamer.get(i)` returns unit i ready to compute on, with the next `ahead` units
already being read on the I/O threads (wrapping around to the next token's first layers), so
reads overlap compute. Units are copied out of the read buffers into 1 + ahead arenas, each
reused once the unit in it is done with: the same memory every token (no allocation, nothing
for malloc to fragment), 1 + ahead units plus one read buffer per I/O thread.
"""
from __future__ import annotations

import math
import threading
import time
from concurrent.futures import Future
from typing import Callable

import torch
from torch import nn

from ..store.format import cluster_key, tensor_key
from ..store.reader import aligned_buffer
from .kernels import int8_mm
from .kernels import QLinear, native_shape, plain_copy, q4_copy
from .layout import HEAD_SLICE, Unit  # noqa: F401 (HEAD_SLICE: where it used to live)
from .slots import Block


class Arena:
    """A unit's bytes: tensors handed out as aligned views of one buffer, reused unit after
    unit (`reset`)."""

    ALIGN = 64

    def __init__(self, nbytes: int):
        self.buf = torch.empty(nbytes, dtype=torch.uint8)
        self.used = 0

    def take(self, shape, dtype) -> torch.Tensor:
        n = math.prod(shape) * dtype.itemsize
        lo = -(-self.used // self.ALIGN) * self.ALIGN
        if lo + n > self.buf.numel():
            raise RuntimeError(f"unit of more than {self.buf.numel()} bytes (arena too small)")
        self.used = lo + n
        return self.buf[lo:lo + n].view(dtype).view(shape)

    def reset(self) -> "Arena":
        self.used = 0
        return self


class Streamer:
    """Reads units ahead of the forward pass. Each unit's read plan (file ranges, and where
    each record lands in the buffer) is fixed, and so is what it becomes: for a given I/O
    thread buffer and arena, the unit's modules and the copies that fill them are built once
    (`_bind`). A read is then a preadv or two and a few large copies, with the GIL released:
    the Python work of building views and modules per read held the GIL ~1 ms a unit and
    slowed the computing thread, which takes the GIL between every kernel, by ~30%.
    It owns its I/O counter (`io_wait_s`: time the forward pass waited on its reads).

    What it needs of the store: the reader, the records' sizes, FFN cluster layout (`n`,
    `cluster_parts`, `int4`: joined in the int4 kernel's layout, else by `join`), the hidden
    size `d` and `bias(weight name)` for streamed attention projections."""

    def __init__(self, reader, units: list[Unit], ahead: int, unit_bytes: int,
                 head: str | None = None, *, d: int, n: int, records: dict, cluster_parts,
                 int4: bool, bias: Callable, join: Callable):
        self.reader, self.units, self.ahead, self.head = reader, units, max(0, ahead), head
        self.d, self.n, self.records, self.cluster_parts = d, n, records, cluster_parts
        self.int4, self.bias, self.join = int4, bias, join
        self.io_wait_s = 0.0
        self.jobs: dict[int, tuple[Future, Arena]] = {}
        self.current: int | None = None
        self.by_layer = {u.layer: i for i, u in enumerate(units) if u.layer is not None}
        # what a unit needs, padded for the arena's alignment of each of its tensors
        self.unit_bytes = unit_bytes + 16 * Arena.ALIGN
        self.free: list[Arena] = []
        self.arenas = 0
        self.plans = [self._plan(u) for u in units]
        self.read_bytes = max((p.size for p in self.plans), default=0)
        self._own = threading.local()  # each I/O thread's read buffer (read_bytes)
        self.bound: dict[tuple[int, int, int], tuple] = {}

    def get(self, i: int) -> dict:
        """Unit i's weights: {module name: QLinear, "ffn": Block, "head": int8 rows}."""
        if i != self.current:
            if self.current is not None:
                self._release(self.current)  # done with: its arena takes the next read
            self.current = i
            wanted = {(i + k) % len(self.units) for k in range(self.ahead + 1)}
            for j in [j for j in self.jobs if j not in wanted]:
                self._release(j)  # read ahead for a pass that was cut short
        fut = self._submit(i)
        for k in range(1, self.ahead + 1):
            self._submit((i + k) % len(self.units))
        t0 = time.perf_counter()
        out = fut.result()
        self.io_wait_s += time.perf_counter() - t0
        return out

    def _submit(self, i: int) -> Future:
        job = self.jobs.get(i)
        if job is None:
            if self.free:
                arena = self.free.pop()
            else:  # at most 1 + ahead are ever live (get releases the rest first)
                arena, self.arenas = Arena(self.unit_bytes), self.arenas + 1
            job = self.jobs[i] = (Future(), arena)
            self.reader.pool.submit(self._read, i, *job)
        return job[0]

    def _release(self, i: int) -> None:
        job = self.jobs.pop(i, None)
        if job is not None:
            fut, arena = job
            fut.exception()  # wait: the I/O thread may still be writing into the arena
            self.free.append(arena)

    def _plan(self, unit: Unit):
        reader = self.reader
        if unit.rows:
            lo, hi = unit.rows
            return reader.range_plan(tensor_key(self.head).decode(), lo * self.d,
                                     (hi - lo) * self.d)
        names = [tensor_key(t).decode() for t, _ in unit.attn.values()]
        return reader.plan(names + [cluster_key(*k).decode() for k in unit.ffn])

    def _read(self, i: int, fut: Future, arena: Arena) -> None:
        """On an I/O thread: read unit i into this thread's buffer, copy it into its arena."""
        try:
            buf = getattr(self._own, "buf", None)
            if buf is None:
                buf = self._own.buf = aligned_buffer(self.read_bytes)
            self.reader.read_plan(self.plans[i], buf)
            key = (i, buf.data_ptr(), id(arena))
            if key not in self.bound:
                self.bound[key] = self._bind(i, buf, arena.reset())
            out, copies, fresh = self.bound[key]
            for copy, dst, src in copies:
                copy(dst, src)
            if fresh is not None:  # float32 slots decode: a new Block each read, no arena
                out = {**out, "ffn": self.join(self.units[i].ffn, fresh)}
            fut.set_result(out)
        except BaseException as e:  # the waiting layer re-raises it
            fut.set_exception(e)

    def _bind(self, i: int, buf: torch.Tensor, arena: Arena) -> tuple:
        """-> (unit i's modules on tensors in `arena`, the copies that fill them from `buf`,
        the FFN records to decode on each read where the slots are float32, else None)."""
        unit, plan, d = self.units[i], self.plans[i], self.d
        out, copies = {}, []
        if unit.rows:
            lo, hi = unit.rows
            src = buf[plan.at[0]:plan.at[0] + (hi - lo) * d].view(torch.int8)
            out["head"] = arena.take((hi - lo, d), torch.int8)
            return out, [(plain_copy, out["head"], src.view(hi - lo, d))], None
        recs = [buf[at:at + self.records[k][0]] for k, at in zip(plan.keys, plan.at)]
        for (mod, (t, shape)), rec in zip(unit.attn.items(), recs):
            dst = arena.take(rec.shape, torch.uint8)
            half = shape[0] * shape[1] // 2  # packed nibbles (reshuffled for this CPU) | scales
            packed = rec[:half].view(shape[0] // 64, shape[1], 32)
            copies.append((q4_copy, dst[:half].view(native_shape(*packed.shape[:2])), packed))
            copies.append((plain_copy, dst[half:], rec[half:]))
            out[mod] = QLinear.from_q4k(dst, shape, self.bias(t), native=True)
        ffn = recs[len(unit.attn):]
        if ffn and not self.int4:
            return out, copies, ffn
        if ffn:
            out["ffn"], more = Block.joining(ffn, self.cluster_parts(0), self.n, d, arena.take)
            copies += more
        return out, copies, None

    def unit_of(self, layer: int) -> int | None:
        return self.by_layer.get(layer)


class StreamedLinear(nn.Module):
    """An attention projection read with its layer's unit."""

    def __init__(self, streamer: Streamer, unit: int, name: str):
        super().__init__()
        self.streamer, self.unit, self.name = streamer, unit, name

    def forward(self, x):
        return self.streamer.get(self.unit)[self.name](x)


class StreamedHead(nn.Module):
    """A q8r head whose rows are read slice by slice each token (scales stay pinned): logits
    [.., V] filled slice by slice through torch's int8 kernel."""

    def __init__(self, streamer: Streamer, units: list[int], scale: torch.Tensor, shape,
                 reader, name: str):
        super().__init__()
        self.streamer, self.units, self.scale, self.shape = streamer, units, scale, tuple(shape)
        self.reader, self.key = reader, tensor_key(name).decode()

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantized rows [len(ids), d] (the head's top candidates): small private reads."""
        return q8r_rows(self.reader, self.key, self.scale, ids.tolist(), self.shape[1])

    def forward(self, h):
        x = h.reshape(-1, h.shape[-1])
        out = torch.empty(x.shape[0], self.shape[0])
        for u in self.units:
            lo, hi = self.streamer.units[u].rows
            q = self.streamer.get(u)["head"]
            out[:, lo:hi] = int8_mm(x, q, self.scale[lo:hi])
        return out.view(*h.shape[:-1], self.shape[0])


class StreamedEmbedding(nn.Module):
    """Embedding rows of a streamed (tied) q8r head: one small read per token."""

    def __init__(self, reader, name: str, scale: torch.Tensor, shape):
        super().__init__()
        self.reader, self.key, self.scale = reader, tensor_key(name).decode(), scale
        self.d = shape[1]

    def forward(self, ids):
        rows = q8r_rows(self.reader, self.key, self.scale, ids.reshape(-1).tolist(), self.d)
        return rows.view(*ids.shape, self.d)


def q8r_rows(reader, key: str, scale: torch.Tensor, ids: list[int], d: int) -> torch.Tensor:
    """Rows of a streamed q8r matrix as float32 [len(ids), d]: one small private read each."""
    out = torch.empty(len(ids), d)
    for j, t in enumerate(ids):
        raw = reader.read_range(key, t * d, d, private=True)
        out[j] = raw.view(torch.int8).float() * scale[t].float()
    return out


def q8r_scales(reader, name: str, shape) -> torch.Tensor:
    """The bf16 row scales of a q8r record (pinned while its rows stream)."""
    rows, cols = shape
    raw = reader.read_range(tensor_key(name).decode(), rows * cols, 2 * rows, private=True)
    return raw.clone().view(torch.bfloat16)
