"""Repack quant.py records into ONNX Runtime's MatMulNBits inputs (com.microsoft, block 32).

MatMulNBits computes Y = A @ dequant(B).T with B [N, K/32, blob] (uint8, groups along K, element
2j in the low nibble for 4 bits: quant.py's packing), scales [N * K/32] and zero points, and
  dequant = (q - zero_point) * scale.
q8 (x = q * s, q in [-127, 127]) maps exactly: q + 128 with the default zero point 128; with
accuracy_level 4 ORT then quantizes the activations to int8 per block (~2e-3 relative on logits).
q4 (x = q * s + m) maps exactly with float zero points zp = -m / s (one per block); a uint8 zero
point would move each block by up to s/2, doubling the error of q4 (measured), so it is not used.
ORT computes float-zero-point blocks in f32 (dequantize, then GEMM): exact, but at prefill ~20%
slower per MatMul than a prepacked f32 MatMul on this CPU.
"""
from __future__ import annotations

import torch

from tiercache.store.quant import GROUP

from .base import QuantWeight

BLOCK = GROUP


def repack(w: QuantWeight) -> dict[str, torch.Tensor]:
    """-> {"B": uint8 [N, K/32, blob], "scales": f32 [N*K/32], "zp": f32 [N*K/32] (q4 only)}."""
    rows, cols = w.shape
    nb = cols // BLOCK
    raw = torch.frombuffer(bytearray(w.raw), dtype=torch.uint8)
    scale = raw[: 2 * rows * nb].view(torch.float16).float()
    if w.dtype == "q8":
        q = raw[2 * rows * nb:].view(torch.int8).to(torch.int16) + 128
        return {"B": q.to(torch.uint8).view(rows, nb, BLOCK), "scales": scale}
    if w.dtype != "q4":
        raise ValueError(f"MatMulNBits takes q8 or q4 weights, not {w.dtype}")
    mn = raw[2 * rows * nb: 4 * rows * nb].view(torch.float16).float()
    nibbles = raw[4 * rows * nb:].view(rows, nb, BLOCK // 2)
    flat = scale == 0  # a constant block: q is all 0, so (0 - (-1)) * m gives m back
    zp = torch.where(flat, torch.full_like(mn, -1.0), -mn / torch.where(flat, 1.0, scale))
    return {"B": nibbles.clone(), "scales": torch.where(flat, mn, scale), "zp": zp}


def bits(w: QuantWeight) -> int:
    return 8 if w.dtype == "q8" else 4


def concat(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack repacked row blocks (e.g. gate rows of one FFN cluster each) along N."""
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def concat_k(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Join repacked column blocks (down [d, n] of one cluster each) along K."""
    rows = parts[0]["B"].shape[0]
    out = {"B": torch.cat([p["B"] for p in parts], dim=1)}  # [rows, K/32, blob]
    for k in parts[0].keys() - {"B"}:  # scales / zp: [rows * blocks], row-major
        out[k] = torch.cat([p[k].view(rows, -1) for p in parts], dim=1).reshape(-1)
    return out
