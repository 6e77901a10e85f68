"""Compute formats for weights held in RAM.

q4 stores run through torch's CPU int4 kernel (`_weight_int4pack_mm_for_cpu`: bf16 activations,
groups of 32, x = (q - 8) * scale + zero). Its packed layout, found by probing torch 2.13, is
[N/64, K, 32] bytes where byte [b, k, j] holds row 64b+j (low nibble) and row 64b+j+32 (high):
rows move in blocks of 64, and the K axis can be sliced freely in steps of 32.
Everything else runs as float32 through F.linear: the exact path.
"""
from __future__ import annotations

import torch
from torch import nn

from ..store import quant

_HAVE_INT4 = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


_HAVE_INT8 = hasattr(torch.ops.aten, "_weight_int8pack_mm")


def int4_ok(shape) -> bool:
    return _HAVE_INT4 and len(shape) == 2 and shape[0] % 64 == 0 and shape[1] % 32 == 0


def q4_unpack(buf, shape):
    """Our q4 bytes -> (q uint8 [R, C], scale f32 [R, C/32], min f32 [R, C/32])."""
    rows, cols = shape
    raw = torch.frombuffer(bytearray(buf), dtype=torch.uint8)
    ng = rows * (cols // quant.GROUP)
    scale = raw[:2 * ng].view(torch.float16).float().view(rows, -1)
    mn = raw[2 * ng:4 * ng].view(torch.float16).float().view(rows, -1)
    p = raw[4 * ng:]
    q = torch.stack([p & 0xF, p >> 4], dim=-1).view(rows, cols)
    return q, scale, mn


def int4_pack(q: torch.Tensor) -> torch.Tensor:
    """q uint8 [N, K] (N % 64 == 0) -> packed uint8 [N/64, K, 32]."""
    n, k = q.shape
    q = q.view(n // 64, 2, 32, k)
    return (q[:, 0] | (q[:, 1] << 4)).transpose(1, 2).contiguous()


def int4_scales(scale: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """[N, K/32] scale and min -> [K/32, N, 2] bf16 (scale, zero) with zero = min + 8 * scale."""
    return torch.stack([scale, mn + 8 * scale], dim=-1).transpose(0, 1).to(torch.bfloat16).contiguous()


def int4_mm(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
    """x [T, K] -> [T, N] (bf16) for packed [N/64, K, 32], sz [K/32, N, 2]."""
    nb, k, _ = packed.shape
    return torch.ops.aten._weight_int4pack_mm_for_cpu(
        x.to(torch.bfloat16), packed.view(nb * 64, k // 2), quant.GROUP, sz)


class QLinear(nn.Module):
    """A q4 matrix [N, K] in the int4 kernel's layout; f32 in, f32 out."""

    def __init__(self, buf, shape, bias: torch.Tensor | None = None):
        super().__init__()
        q, scale, mn = q4_unpack(buf, shape)
        self.packed, self.sz = int4_pack(q), int4_scales(scale, mn)
        self.bias = bias
        self.shape = tuple(shape)

    @classmethod
    def from_q4k(cls, raw: torch.Tensor, shape, bias: torch.Tensor | None = None) -> "QLinear":
        """A q4k record (uint8 tensor, kept as the weights' storage): nothing repacked."""
        m = nn.Module.__new__(cls)
        nn.Module.__init__(m)
        m.packed, m.sz = quant.q4k_views(raw, shape)
        m.bias, m.shape = bias, tuple(shape)
        return m

    def forward(self, x):
        shape = x.shape
        y = int4_mm(x.reshape(-1, shape[-1]), self.packed, self.sz).float()
        y = y.view(*shape[:-1], self.shape[0])
        return y if self.bias is None else y + self.bias

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantized rows [len(ids), K] (an embedding lookup on the same bytes)."""
        b, j = ids // 64, ids % 64
        byte = self.packed[b, :, j % 32]                       # [n, K]
        q = torch.where((j >= 32).unsqueeze(1), byte >> 4, byte & 0xF).float()
        s = self.sz[:, ids].float().repeat_interleave(quant.GROUP, dim=0).transpose(0, 1)  # [n, K, 2]
        return (q - 8) * s[..., 0] + s[..., 1]

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + self.sz.numel() * 2


class Q8Linear(nn.Module):
    """A q8 matrix as int8 rows with one scale per row, for torch's int8 CPU kernel
    (`_weight_int8pack_mm`); the group-32 scales are folded into a per-row requantization."""

    def __init__(self, buf, shape, bias: torch.Tensor | None = None):
        super().__init__()
        rows, cols = shape
        self.q = torch.empty(rows, cols, dtype=torch.int8)
        self.scale = torch.empty(rows, dtype=torch.bfloat16)
        step, mv = 4096, memoryview(buf)
        for lo in range(0, rows, step):  # in slices: a whole f32 copy would double the peak
            n = min(step, rows - lo)
            w = _q8_rows(mv, shape, lo, n)
            scale = (w.abs().amax(1) / 127.0).clamp_min(1e-12)
            self.q[lo:lo + n] = torch.round(w / scale[:, None]).to(torch.int8)
            self.scale[lo:lo + n] = scale.to(torch.bfloat16)
        self.bias, self.shape = bias, tuple(shape)

    @classmethod
    def from_q8r(cls, raw: torch.Tensor, shape, bias: torch.Tensor | None = None) -> "Q8Linear":
        """A q8r record (uint8 tensor, kept as the weights' storage): int8 rows | bf16 scales."""
        rows, cols = shape
        m = nn.Module.__new__(cls)
        nn.Module.__init__(m)
        m.q = raw[:rows * cols].view(torch.int8).view(rows, cols)
        m.scale = raw[rows * cols:].view(torch.bfloat16)
        m.bias, m.shape = bias, tuple(shape)
        return m

    def forward(self, x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        y = torch.ops.aten._weight_int8pack_mm(x2, self.q, self.scale).float()
        y = y.view(*shape[:-1], self.shape[0])
        return y if self.bias is None else y + self.bias

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.q[ids].float() * self.scale[ids].float()[:, None]

    @property
    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * 2


def _q8_rows(mv, shape, lo: int, n: int) -> torch.Tensor:
    """Rows lo..lo+n of a q8 record (f16 scales [R, C/32] | int8 [R, C]) as float32."""
    rows, cols = shape
    g = cols // quant.GROUP
    sc = torch.frombuffer(bytearray(mv[2 * lo * g: 2 * (lo + n) * g]), dtype=torch.float16)
    off = 2 * rows * g
    q = torch.frombuffer(bytearray(mv[off + lo * cols: off + (lo + n) * cols]), dtype=torch.int8)
    return (q.float().view(n, g, quant.GROUP) * sc.float().view(n, g, 1)).view(n, cols)


class QEmbedding(nn.Module):
    """Embedding lookup that shares the tied head's int4 bytes."""

    def __init__(self, table: QLinear):
        super().__init__()
        self.table = table

    def forward(self, ids):
        return self.table.rows(ids.reshape(-1)).view(*ids.shape, -1)

