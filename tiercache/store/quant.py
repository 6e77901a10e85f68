"""Block-wise weight encodings: f32/f16/bf16 as is; q8 and q4 in groups of 32 along a row.

A quantized [R, C] matrix is stored as one self-contained byte string:
  q8: scales f16 [R, C/32] | values int8 [R, C]                 (x = q * scale)
  q4: scales f16 [R, C/32] | mins f16 [R, C/32] | nibbles u8 [R, C/2]
      (x = q * scale + min; element 2j in the low nibble, 2j+1 in the high one)
  q4k: q4 in the layout of torch's int4 CPU kernel, so a cached FFN cluster is used as read:
      packed u8 [R/64, C, 32] (byte [b, c, j]: row 64b+j low nibble, row 64b+j+32 high)
      | bf16 [C/32, R, 2] (scale, zero) with x = (q - 8) * scale + zero; needs R % 64 == 0
  q8r: int8 [R, C] | bf16 [R] (x = q * scale): one scale per row, the layout of torch's int8
      CPU kernel, so a head is used (or streamed, rows at a time) as read
Rows are the unit, so a slice of rows (one neuron bundle, one cluster) dequantizes alone.
"""
from __future__ import annotations

import torch

from .dtypes import DTYPES, GROUP, can_quantize, nbytes

__all__ = ["DTYPES", "GROUP", "can_quantize", "nbytes", "encode", "decode", "decode_q4k",
           "q4k_views", "q4k_rows", "q4k_to_q4"]  # the first four
# live in `dtypes` (no torch) and are re-exported here, where callers have always found them

_TORCH = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def encode(x: torch.Tensor, dtype: str) -> bytes:
    """Encode a float tensor; q8/q4 need a 2-D tensor whose rows divide into groups of 32."""
    x = x.detach().to(torch.float32).contiguous()
    if dtype in _TORCH:
        return x.to(_TORCH[dtype]).view(torch.uint8).numpy().tobytes()
    rows, cols = x.shape
    g = x.view(rows, cols // GROUP, GROUP)
    if dtype == "q8":
        scale = (g.abs().amax(-1) / 127.0).to(torch.float16)
        s = scale.float().clamp_min(1e-12).unsqueeze(-1)
        q = torch.round(g / s).clamp(-127, 127).to(torch.int8)
        return _cat(scale, q)
    if dtype == "q4":
        scale, mn, q = _q4_groups(g)
        q = q.to(torch.uint8).view(rows, cols // 2, 2)
        packed = q[..., 0] | (q[..., 1] << 4)
        return _cat(scale, mn, packed)
    if dtype == "q4k":
        return _cat(*_encode_q4k(g, rows, cols))
    if dtype == "q8r":
        scale = (x.abs().amax(1) / 127.0).to(torch.bfloat16)
        q = torch.round(x / scale.float().clamp_min(1e-12)[:, None]).clamp(-127, 127)
        return _cat(q.to(torch.int8), scale)
    raise ValueError(f"unknown dtype {dtype}")


def _q4_groups(g: torch.Tensor):
    """Groups g [R, G, 32] -> (scale f16, min f16, q [R, G, 32] in 0..15), x ~ q * scale + min.
    Each group takes the better of two grids: min/max (Q4_1's: exact for Q4_1 data) or one
    centred on zero, min = -8 * scale with the largest |x| at q = 0 (Q4_0's: exact for Q4_0
    data, and zero = min + 8 * scale is then 0, which the resident int4 kernel needs no
    correction term for). Either way the error is no larger than min/max's alone."""
    lo, hi = g.amin(-1), g.amax(-1)
    asym = ((hi - lo) / 15.0).to(torch.float16), lo.to(torch.float16)
    far = torch.where(hi.abs() > lo.abs(), hi, lo)             # signed value of largest |x|
    d = (far / -8.0).to(torch.float16)
    sym = d, (-8.0 * d.float()).to(torch.float16)
    fits = []
    for scale, mn in (asym, sym):
        s, m = scale.float().unsqueeze(-1), mn.float().unsqueeze(-1)
        safe = torch.where(s.abs() < 1e-12, torch.ones_like(s), s)
        q = torch.round((g - m) / safe).clamp(0, 15)
        fits.append((scale, mn, q, (q * s + m - g).abs().amax(-1)))
    (sa, ma, qa, ea), (ss, ms, qs, es) = fits
    pick = es <= ea                                             # [R, G]
    return (torch.where(pick, ss, sa), torch.where(pick, ms, ma),
            torch.where(pick.unsqueeze(-1), qs, qa))


def _encode_q4k(g: torch.Tensor, rows: int, cols: int):
    """Groups g [R, C/32, 32] -> (packed [R/64, C, 32] u8, sz [C/32, R, 2] bf16). The nibbles
    are q4's (f16 scale and min), so values already on a Q4_1 grid (a GGUF) keep their q; only
    the kernel's bf16 (scale, zero = min + 8 * scale) pair is rounded."""
    scale, mn, q = _q4_groups(g)
    scale, mn = scale.float(), mn.float()
    q = q.to(torch.uint8).view(rows // 64, 2, 32, cols)
    packed = (q[:, 0] | (q[:, 1] << 4)).transpose(1, 2)
    sz = torch.stack([scale, mn + 8 * scale], dim=-1).to(torch.bfloat16)
    return packed, sz.transpose(0, 1)


def _cat(*parts: torch.Tensor) -> bytes:
    return b"".join(p.contiguous().view(torch.uint8).numpy().tobytes() for p in parts)


def q4k_views(raw: torch.Tensor, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """u8 bytes of a q4k matrix -> (packed [R/64, C, 32] u8, sz [C/32, R, 2] bf16), no copy."""
    rows, cols = shape
    half = rows * cols // 2
    return (raw[:half].view(rows // 64, cols, 32),
            raw[half:].view(torch.bfloat16).view(cols // GROUP, rows, 2))


def q4k_rows(packed: torch.Tensor) -> torch.Tensor:
    """q4k's packed [R/64, C, 32] -> q4's nibbles, row-major [R, C/2] (element 2j low): the
    layout of q4 records and of ONNX Runtime's MatMulNBits."""
    nb, cols, _ = packed.shape
    q = torch.stack([packed & 0xF, packed >> 4], dim=1)          # [R/64, 2, C, 32]
    q = q.permute(0, 1, 3, 2).reshape(nb * 64, cols // 2, 2)     # row 64b + 32h + j
    return q[..., 0] | (q[..., 1] << 4)


def q4k_to_q4(raw: torch.Tensor, shape) -> bytes:
    """A q4k record as q4 bytes (same nibbles; min = zero - 8 * scale rounded to f16)."""
    packed, sz = q4k_views(raw, shape)
    s = sz.float().permute(1, 0, 2)                               # [R, C/32, 2]
    scale, mn = s[..., 0].to(torch.float16), (s[..., 1] - 8 * s[..., 0]).to(torch.float16)
    return _cat(scale, mn, q4k_rows(packed))


def decode_q4k(raw: torch.Tensor, shape) -> torch.Tensor:
    rows, cols = shape
    packed, sz = q4k_views(raw, shape)
    q = torch.stack([packed & 0xF, packed >> 4], dim=1)          # [R/64, 2, C, 32]
    q = q.permute(0, 1, 3, 2).reshape(rows, cols).float()         # row 64b + 32h + j
    s = sz.float().permute(1, 0, 2).repeat_interleave(GROUP, dim=1)  # [R, C, 2]
    return (q - 8) * s[..., 0] + s[..., 1]


def decode(buf, shape, dtype: str, out_dtype=None) -> torch.Tensor:
    """Decode bytes, a memoryview or a uint8 tensor written by `encode` into `shape` (as
    out_dtype; None: float32)."""
    out_dtype = out_dtype or torch.float32
    raw = buf if isinstance(buf, torch.Tensor) else torch.frombuffer(bytearray(buf), dtype=torch.uint8)
    if dtype in _TORCH:
        return raw.view(_TORCH[dtype]).view(*shape).to(out_dtype)
    rows, cols = shape
    if dtype == "q8r":
        q = raw[:rows * cols].view(torch.int8).view(rows, cols).float()
        return (q * raw[rows * cols:].view(torch.bfloat16).float()[:, None]).to(out_dtype)
    ng = rows * (cols // GROUP)
    scale = raw[: 2 * ng].view(torch.float16).float().view(rows, -1, 1)
    if dtype == "q8":
        q = raw[2 * ng:].view(torch.int8).float().view(rows, -1, GROUP)
        return (q * scale).view(rows, cols).to(out_dtype)
    if dtype == "q4k":
        return decode_q4k(raw, shape).to(out_dtype)
    mn = raw[2 * ng: 4 * ng].view(torch.float16).float().view(rows, -1, 1)
    p = raw[4 * ng:]
    q = torch.stack([p & 0xF, p >> 4], dim=-1).float().view(rows, -1, GROUP)
    return (q * scale + mn).view(rows, cols).to(out_dtype)
