"""Block-wise weight encodings: f32/f16/bf16 as is; q8 and q4 in groups of 32 along a row.

A quantized [R, C] matrix is stored as one self-contained byte string:
  q8: scales f16 [R, C/32] | values int8 [R, C]                 (x = q * scale)
  q4: scales f16 [R, C/32] | mins f16 [R, C/32] | nibbles u8 [R, C/2]
      (x = q * scale + min; element 2j in the low nibble, 2j+1 in the high one)
Rows are the unit, so a slice of rows (one neuron bundle, one cluster) dequantizes alone.
"""
from __future__ import annotations

import numpy as np
import torch

GROUP = 32
DTYPES = ("f32", "f16", "bf16", "q8", "q4")
_TORCH = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def can_quantize(shape) -> bool:
    return len(shape) == 2 and shape[1] % GROUP == 0


def nbytes(shape, dtype: str) -> int:
    n = int(np.prod(shape))
    if dtype in _TORCH:
        return n * _TORCH[dtype].itemsize
    rows, cols = shape
    groups = rows * (cols // GROUP)
    if dtype == "q8":
        return groups * 2 + n
    if dtype == "q4":
        return groups * 4 + n // 2
    raise ValueError(f"unknown dtype {dtype}")


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
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / 15.0).to(torch.float16)
        mn = lo.to(torch.float16)
        s = scale.float().clamp_min(1e-12).unsqueeze(-1)
        q = torch.round((g - mn.float().unsqueeze(-1)) / s).clamp(0, 15).to(torch.uint8)
        q = q.view(rows, cols // 2, 2)
        packed = q[..., 0] | (q[..., 1] << 4)
        return _cat(scale, mn, packed)
    raise ValueError(f"unknown dtype {dtype}")


def _cat(*parts: torch.Tensor) -> bytes:
    return b"".join(p.contiguous().view(torch.uint8).numpy().tobytes() for p in parts)


def decode(buf, shape, dtype: str, out_dtype=torch.float32) -> torch.Tensor:
    """Decode bytes (or a memoryview) written by `encode` into a tensor of `shape`."""
    raw = torch.frombuffer(bytearray(buf), dtype=torch.uint8)
    if dtype in _TORCH:
        return raw.view(_TORCH[dtype]).view(*shape).to(out_dtype)
    rows, cols = shape
    ng = rows * (cols // GROUP)
    scale = raw[: 2 * ng].view(torch.float16).float().view(rows, -1, 1)
    if dtype == "q8":
        q = raw[2 * ng:].view(torch.int8).float().view(rows, -1, GROUP)
        return (q * scale).view(rows, cols).to(out_dtype)
    mn = raw[2 * ng: 4 * ng].view(torch.float16).float().view(rows, -1, 1)
    p = raw[4 * ng:]
    q = torch.stack([p & 0xF, p >> 4], dim=-1).float().view(rows, -1, GROUP)
    return (q * scale + mn).view(rows, cols).to(out_dtype)
