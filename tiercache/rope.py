"""Rotary position embedding's frequencies, in numpy: the torch model and the lean runtime
take them from here. HF's convention (the two halves of head_dim rotate together)."""
from __future__ import annotations

import math

import numpy as np

from .config import ModelArgs


def inv_freq(args: ModelArgs) -> np.ndarray:
    """[head_dim / 2] float32, with the checkpoint's rope scaling (llama3, linear)."""
    d = args.head_dim
    inv = 1.0 / (args.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    sc = args.rope_scaling or {}
    kind = sc.get("rope_type", sc.get("type"))
    if kind == "llama3":
        inv = _llama3_scale(inv, sc)
    elif kind == "linear":
        inv = inv / sc["factor"]
    elif kind not in (None, "default"):
        from .errors import UnsupportedModel
        raise UnsupportedModel(f"unsupported rope scaling '{kind}'")
    return inv.astype(np.float32)


def _llama3_scale(inv: np.ndarray, sc: dict) -> np.ndarray:
    factor, lo, hi = sc["factor"], sc.get("low_freq_factor", 1.0), sc.get("high_freq_factor", 4.0)
    old = sc.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv
    smooth = (old / wavelen - lo) / (hi - lo)
    scaled = np.where(wavelen > old / lo, inv / factor, inv)
    mid = (1 - smooth) * inv / factor + smooth * inv
    is_mid = (wavelen <= old / lo) & (wavelen >= old / hi)
    return np.where(is_mid, mid, scaled)


def cos_sin(inv: np.ndarray, offset: int, t: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [T, head_dim] float32 for positions offset .. offset + t - 1."""
    f = np.outer(np.arange(offset, offset + t, dtype=np.float32), inv)
    emb = np.concatenate((f, f), axis=-1)
    return np.cos(emb), np.sin(emb)
