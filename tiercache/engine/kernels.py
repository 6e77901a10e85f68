"""Compute formats for weights held in RAM.

q4 stores run through torch's CPU int4 kernel (`_weight_int4pack_mm_for_cpu`: bf16 activations,
groups of 32, x = (q - 8) * scale + zero). Its packed layout depends on the CPU torch runs on:
rows move in blocks of BN = 64 (AVX-512) or 32 (AVX2 and others), and byte [b, k, j] holds row
BN*b + j in its low nibble and row BN*b + j + BN/2 in its high one. Stores keep one layout on
disk whatever the CPU (quant.py's q4k: BN = 64); `int4_layout()` finds this CPU's BN once, by
checking a small matmul against a float reference, and records are reshuffled into it as they
are loaded (`q4_copy`: a no-op view on AVX-512, a few byte ops on AVX2). A CPU whose layout is
neither is not given the int4 kernel at all: its q4 stores compute in float32.

In RAM a canonical block [nb, K, 32] becomes [nb, H, K, 32/H] with H = 64 / BN, so both K and
whole 64-row blocks slice the same way in either layout.

Where tiercache's own kernel (q4.py: int8 activations, 2-5x torch's rate on AVX2) verifies, it
runs every q4 weight instead, on the store's layout as is (`ram_layout`: H = 1 whatever the
CPU, so records are not reshuffled), and q8 rows (`int8_mm`) too.
Everything else runs as float32 through F.linear: the exact path.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from ..store import quant
from . import q4

_HAVE_INT8 = hasattr(torch.ops.aten, "_weight_int8pack_mm")


@functools.cache
def int4_layout() -> int | None:
    """H (1: BN 64, 2: BN 32) for which torch's int4 kernel on this CPU matches a float
    reference on a small block; None when no layout does (or the kernel is absent)."""
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return None
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (128, 64), generator=g, dtype=torch.uint8)
    scale = torch.rand(128, 2, generator=g) * 0.1 + 0.01
    mn = -torch.rand(128, 2, generator=g)
    x = torch.randn(3, 64, generator=g)
    w = (q.float().view(128, 2, 32) * scale[..., None] + mn[..., None]).view(128, 64)
    ref = x.bfloat16().float() @ w.T
    for h in (1, 2):
        try:
            y = _torch_int4_mm(x, _to_native(_pack64(q), h), int4_scales(scale, mn))
        except RuntimeError:  # the kernel refused the shape: not this layout
            continue
        if (y - ref).abs().max() <= 0.02 * ref.abs().max():
            return h
    return None


@functools.cache
def ram_layout() -> int:
    """H of the layout q4 weights take in RAM: 1 (the store's own, row blocks of 64: a record
    is used as read, with no reshuffle) where tiercache's kernel runs them, which takes either;
    else torch's kernel's (`int4_layout`)."""
    return 1 if q4.available() else (int4_layout() or 1)


def int4_available() -> bool:
    return int4_layout() is not None


def int4_ok(shape) -> bool:
    return int4_available() and len(shape) == 2 and shape[0] % 64 == 0 and shape[1] % 32 == 0


def resident_kernel() -> str:
    """The kernel for q4 weights that stay in RAM for the run. Where tiercache's kernel runs
    its AVX-512 VNNI path, that one: it needs no packing and beat MatMulNBits on a Zen 5 core
    (1B shape, resident, 1 thread: decode 34 against 29 tok/s, a 128-token prompt 226 against
    126). Elsewhere ONNX Runtime's MatMulNBits where it is installed and verifies here and the
    budget leaves room for its packing (~0.4x the bytes): on AVX2 it ran prompts ~1.3x faster
    than ours and cut the Python per token. Else the int4 kernel every other q4 weight runs on
    (`int4_kernel`)."""
    from . import nbits
    if q4.path() == "vnni":
        return int4_kernel()
    if nbits.available():
        return "ort-nbits"
    return int4_kernel() if int4_available() else "f32"


def int4_kernel() -> str:
    """What computes q4 weights in RAM (pinned, cached, streamed): tiercache's own kernel
    (q4.py: 'q4-vnni', 'q4-avx2' or 'q4-scalar', int8 activations) where it verifies here,
    else torch's ('torch', bf16 activations)."""
    return f"q4-{q4.path()}" if q4.available() else "torch"


def cpu_capability() -> str:
    """What torch dispatches its CPU kernels for (e.g. AVX2, AVX512), the int4 kernel and the
    row block q4 weights take in RAM."""
    return f"{torch.backends.cpu.get_cpu_capability()}, int4 " + (
        f"{int4_kernel()}, row blocks of {64 // ram_layout()}" if int4_available()
        else "unavailable")


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


def _pack64(q: torch.Tensor) -> torch.Tensor:
    """q uint8 [N, K] (N % 64 == 0) -> the canonical (store) layout [N/64, K, 32]."""
    n, k = q.shape
    q = q.view(n // 64, 2, 32, k)
    return (q[:, 0] | (q[:, 1] << 4)).transpose(1, 2).contiguous()


def native_shape(nb: int, k: int) -> tuple:
    """This CPU's shape of a canonical [nb, K, 32] block run: [nb, H, K, 32/H]."""
    h = ram_layout()
    return (nb, h, k, 32 // h)


def q4_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Canonical src [..., K, 32] -> dst [..., H, K, 32/H] in this CPU's layout. Each (block,
    k) row of 32 bytes maps onto itself, so any slice along K or whole blocks copies alone."""
    _copy_h(dst, src, ram_layout())


def plain_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """The copy for everything that is not int4 nibbles (scales, int8 rows)."""
    dst.copy_(src)


def _copy_h(dst: torch.Tensor, src: torch.Tensor, h: int) -> None:
    if h == 1:
        dst.copy_(src.unsqueeze(-3))
        return
    lo, hi = src[..., :16], src[..., 16:]  # rows j (and j+32) | rows j+16 (and j+48)
    dst[..., 0, :, :] = (lo & 0xF) | (hi << 4)
    dst[..., 1, :, :] = (lo >> 4) | (hi & 0xF0)


def _to_native(packed64: torch.Tensor, h: int) -> torch.Tensor:
    nb, k, _ = packed64.shape
    out = torch.empty(nb, h, k, 32 // h, dtype=torch.uint8)
    _copy_h(out, packed64, h)
    return out


def to_native(packed64: torch.Tensor) -> torch.Tensor:
    """A new tensor: canonical [nb, K, 32] in this CPU's layout (a copy even when equal)."""
    return _to_native(packed64, ram_layout())


def int4_pack(q: torch.Tensor, h: int | None = None) -> torch.Tensor:
    """q uint8 [N, K] (N % 64 == 0) -> the RAM layout [N/64, H, K, 32/H] (or that of H=h)."""
    return _to_native(_pack64(q), h or ram_layout())


def int4_scales(scale: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """[N, K/32] scale and min -> [K/32, N, 2] bf16 (scale, zero) with zero = min + 8 * scale."""
    return torch.stack([scale, mn + 8 * scale], dim=-1).transpose(0, 1).to(torch.bfloat16).contiguous()


def int4_mm(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
    """x [T, K] -> [T, N] f32 for packed (this CPU's layout, N*K/2 bytes), sz [K/32, N, 2]:
    tiercache's own kernel where it verifies here (q4.py: int8 activations, 2-5x torch's rate
    on AVX2), else torch's (bf16 activations)."""
    if q4.available():
        return q4.mm(x, packed.contiguous(), sz.contiguous(), 64 // ram_layout())
    return _torch_int4_mm(x, packed, sz)


def int4_mm_many(x: torch.Tensor, weights: list) -> list[torch.Tensor]:
    """`int4_mm` of x with several (packed, sz) (q|k|v, gate|up): one call of tiercache's
    kernel (x quantized once, one pooled call), else one int4_mm each."""
    if q4.available() and len(weights) <= 4:
        return q4.mm_many(x, [(p.contiguous(), s.contiguous()) for p, s in weights],
                          64 // ram_layout())
    return [int4_mm(x, p, s) for p, s in weights]


def int8_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [T, K] -> [T, N] f32 for int8 rows q [N, K] with a bf16 scale per row: tiercache's
    kernel where it verifies here (int8 activations), else torch's (bf16 activations)."""
    if q4.available() and q.is_contiguous():
        return q4.mm8(x, q, scale)
    return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), q, scale).float()


def _torch_int4_mm(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
    n, k = sz.shape[1], x.shape[-1]
    return torch.ops.aten._weight_int4pack_mm_for_cpu(
        x.to(torch.bfloat16), packed.view(n, k // 2), quant.GROUP, sz).float()


def q4k_native(raw: torch.Tensor, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """A q4k record (uint8, canonical) -> (packed, sz) in this CPU's layout, reshuffled in place
    (the record's storage is kept; a transient copy of the packed part only)."""
    packed64, sz = quant.q4k_views(raw, shape)
    nb, k, _ = packed64.shape
    h = ram_layout()
    if h != 1:
        tmp = _to_native(packed64, h)
        raw[:tmp.numel()].copy_(tmp.view(-1))
    return raw[:packed64.numel()].view(native_shape(nb, k)), sz


class QLinear(nn.Module):
    """A q4 matrix [N, K] in the int4 kernel's layout; f32 in, f32 out."""

    def __init__(self, buf, shape, bias: torch.Tensor | None = None):
        super().__init__()
        q, scale, mn = q4_unpack(buf, shape)
        self.packed, self.sz = int4_pack(q), int4_scales(scale, mn)  # [N/64, H, K, 32/H]
        self.bias = bias
        self.shape = tuple(shape)

    @classmethod
    def from_q4k(cls, raw: torch.Tensor, shape, bias: torch.Tensor | None = None,
                 native: bool = False) -> "QLinear":
        """A q4k record (uint8 tensor, kept as the weights' storage), reshuffled in place into
        this CPU's layout unless `native` says its bytes already are."""
        m = nn.Module.__new__(cls)
        nn.Module.__init__(m)
        if native:
            packed64, m.sz = quant.q4k_views(raw, shape)
            m.packed = raw[:packed64.numel()].view(native_shape(*packed64.shape[:2]))
        else:
            m.packed, m.sz = q4k_native(raw, shape)
        m.bias, m.shape = bias, tuple(shape)
        return m

    def forward(self, x):
        shape = x.shape
        y = int4_mm(x.reshape(-1, shape[-1]), self.packed, self.sz).float()
        y = y.view(*shape[:-1], self.shape[0])
        return y if self.bias is None else y + self.bias

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantized rows [len(ids), K] (an embedding lookup on the same bytes)."""
        h = self.packed.shape[1]
        bn = 64 // h
        b, j = ids // 64, ids % 64
        byte = self.packed[b, j // bn, :, j % (bn // 2)]       # [n, K]
        q = torch.where((j % bn >= bn // 2).unsqueeze(1), byte >> 4, byte & 0xF).float()
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
        y = int8_mm(x.reshape(-1, shape[-1]), self.q, self.scale)
        y = y.view(*shape[:-1], self.shape[0])
        return y if self.bias is None else y + self.bias

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.q[ids].float() * self.scale[ids].float()[:, None]

    @property
    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * 2


class QKV(nn.Module):
    """An attention's q, k and v QLinears as one kernel call, then RoPE (the model's
    `qkv_proj`: (x, cos, sin) -> q, k, v [B, H, T, D])."""

    def __init__(self, q: QLinear, k: QLinear, v: QLinear, heads: int, kv_heads: int, hd: int):
        super().__init__()
        self.parts, self.heads = (q, k, v), (heads, kv_heads, kv_heads)
        self.hd = hd

    def forward(self, x, cos, sin):
        from ..models.llama import apply_rope
        B, T, d = x.shape
        ys = int4_mm_many(x.reshape(-1, d), [(m.packed, m.sz) for m in self.parts])
        q, k, v = ((y if m.bias is None else y + m.bias).view(B, T, h, self.hd).transpose(1, 2)
                   for y, m, h in zip(ys, self.parts, self.heads))
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def _q8_rows(mv, shape, lo: int, n: int) -> torch.Tensor:
    """Rows lo..lo+n of a q8 record (f16 scales [R, C/32] | int8 [R, C]) as float32."""
    rows, cols = shape
    g = cols // quant.GROUP
    sc = torch.frombuffer(bytearray(mv[2 * lo * g: 2 * (lo + n) * g]), dtype=torch.float16)
    off = 2 * rows * g
    q = torch.frombuffer(bytearray(mv[off + lo * cols: off + (lo + n) * cols]), dtype=torch.int8)
    return (q.float().view(n, g, quant.GROUP) * sc.float().view(n, g, 1)).view(n, cols)


# Logits from the int4/int8 kernels come back in bf16 (8 bits of mantissa: 0.125 apart at 25),
# which turned near-ties into wrong greedy tokens on the default model (25.19 vs 25.15 became
# 25.125 and 25.125). The head's top candidates are recomputed in float32 from the same rows.
REFINE_TOP = 16


class ExactTop(nn.Module):
    """A quantized head whose top REFINE_TOP logits per position are recomputed in float32
    (x in f32 against the dequantized rows): greedy and top-k choices then equal the float32
    reference on the same weights; the other logits keep the kernel's bf16 precision."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, h):
        y = self.head(h)
        x, flat = h.reshape(-1, h.shape[-1]).float(), y.view(-1, y.shape[-1])
        top = flat.topk(min(REFINE_TOP, flat.shape[-1]), dim=-1).indices  # [T, k]
        ids = top.unique()                                              # sorted
        exact = x @ self.head.rows(ids).T                               # [T, u]
        if getattr(self.head, "bias", None) is not None:
            exact += self.head.bias[ids]
        flat.scatter_(1, top, exact.gather(1, torch.searchsorted(ids, top)))
        return y


class QEmbedding(nn.Module):
    """Embedding lookup that shares the tied head's int4 bytes."""

    def __init__(self, table: QLinear):
        super().__init__()
        self.table = table
        # its bytes are plain attributes (Module.to does not move them): ids go to them
        self.device = next((t.device for t in (getattr(table, k, None) for k in ("packed", "q"))
                            if isinstance(t, torch.Tensor)), torch.device("cpu"))

    def forward(self, ids):
        rows = self.table.rows(ids.reshape(-1).to(self.device))
        return rows.view(*ids.shape, -1).to(ids.device)

