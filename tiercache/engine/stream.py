"""Weights read from the store every token: what the RAM budget does not pin.

The forward pass uses weights in a fixed order, so the streamed ones are cut into units in that
order: per layer, its streamed attention projections and FFN clusters; then slices of the
head's rows. `Streamer.get(i)` returns unit i ready to compute on, with the next `ahead` units
already being read on the I/O threads (wrapping around to the next token's first layers), so
reads overlap compute. A unit's memory is let go when the next one is taken: at most
1 + ahead units are held, plus one read buffer per I/O thread.
"""
from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from torch import nn

from ..store.format import cluster_key, tensor_key
from .kernels import QLinear

HEAD_SLICE = 2 << 20  # bytes of head rows per unit: about one layer's streamed weights


@dataclass
class Unit:
    layer: int | None = None                         # None: a slice of the head
    attn: dict[str, tuple] = field(default_factory=dict)  # module name -> (tensor name, shape)
    ffn: list[tuple[int, int, int]] = field(default_factory=list)  # cluster keys
    rows: tuple[int, int] | None = None              # head rows [lo, hi)


class Streamer:
    def __init__(self, engine, units: list[Unit], ahead: int, head: str | None = None):
        self.engine, self.units, self.ahead, self.head = engine, units, max(0, ahead), head
        self.jobs: dict[int, Future] = {}
        self.current: int | None = None
        self.by_layer = {u.layer: i for i, u in enumerate(units) if u.layer is not None}

    def get(self, i: int) -> dict:
        """Unit i's weights: {module name: QLinear, "ffn": Block, "head": Q8Linear}."""
        if i != self.current:
            self.jobs.pop(self.current, None)  # the previous unit is done with
            self.current = i
        fut = self._submit(i)
        for k in range(1, self.ahead + 1):
            self._submit((i + k) % len(self.units))
        t0 = time.perf_counter()
        out = fut.result()
        self.engine.io_wait_s += time.perf_counter() - t0
        return out

    def _submit(self, i: int) -> Future:
        fut = self.jobs.get(i)
        if fut is None:
            fut = self.jobs[i] = Future()
            self.engine.reader.pool.submit(self._read, self.units[i], fut)
        return fut

    def _read(self, unit: Unit, fut: Future) -> None:
        """On an I/O thread: read the unit into this thread's buffer, copy it out ready."""
        try:
            eng, out = self.engine, {}
            names = [tensor_key(t).decode() for t, _ in unit.attn.values()]
            keys = [cluster_key(*k).decode() for k in unit.ffn]
            bufs = eng.reader.read_tensors(names + keys, private=True) if names or keys else []
            for (mod, (t, shape)), buf in zip(unit.attn.items(), bufs):
                out[mod] = QLinear.from_q4k(buf.clone(), shape, eng.bias(t))
            if keys:
                out["ffn"] = eng.join_clusters(unit.ffn, bufs[len(names):])
            if unit.rows:
                lo, hi = unit.rows
                d = eng.d
                raw = eng.reader.read_range(tensor_key(self.head).decode(), lo * d, (hi - lo) * d,
                                            private=True)
                out["head"] = raw.view(torch.int8).view(hi - lo, d).clone()
            fut.set_result(out)
        except BaseException as e:  # the waiting layer re-raises it
            fut.set_exception(e)

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

    def __init__(self, streamer: Streamer, units: list[int], scale: torch.Tensor, shape):
        super().__init__()
        self.streamer, self.units, self.scale, self.shape = streamer, units, scale, tuple(shape)

    def forward(self, h):
        x = h.reshape(-1, h.shape[-1]).to(torch.bfloat16)
        out = torch.empty(x.shape[0], self.shape[0])
        for u in self.units:
            lo, hi = self.streamer.units[u].rows
            q = self.streamer.get(u)["head"]
            out[:, lo:hi] = torch.ops.aten._weight_int8pack_mm(x, q, self.scale[lo:hi]).float()
        return out.view(*h.shape[:-1], self.shape[0])


class StreamedEmbedding(nn.Module):
    """Embedding rows of a streamed (tied) q8r head: one small read per token."""

    def __init__(self, reader, name: str, scale: torch.Tensor, shape):
        super().__init__()
        self.reader, self.key, self.scale = reader, tensor_key(name).decode(), scale
        self.d = shape[1]

    def forward(self, ids):
        flat = ids.reshape(-1).tolist()
        rows = torch.empty(len(flat), self.d)
        for j, t in enumerate(flat):
            raw = self.reader.read_range(self.key, t * self.d, self.d, private=True)
            rows[j] = raw.view(torch.int8).float() * self.scale[t].float()
        return rows.view(*ids.shape, self.d)


def q8r_scales(reader, name: str, shape) -> torch.Tensor:
    """The bf16 row scales of a q8r record (pinned while its rows stream)."""
    rows, cols = shape
    raw = reader.read_range(tensor_key(name).decode(), rows * cols, 2 * rows, private=True)
    return raw.clone().view(torch.bfloat16)
