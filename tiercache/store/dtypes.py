"""The store's dtypes as facts, without torch (the lean runtime reads stores without it):
their names, group size and byte counts. `quant` encodes and decodes them."""
from __future__ import annotations

import math

import numpy as np

GROUP = 32
DTYPES = ("f32", "f16", "bf16", "q8", "q4")  # what a user asks for; q4k is chosen by layout
ITEMSIZE = {"f32": 4, "f16": 2, "bf16": 2}


def can_quantize(shape) -> bool:
    return len(shape) == 2 and shape[1] % GROUP == 0


def nbytes(shape, dtype: str) -> int:
    n = math.prod(shape)
    if dtype in ITEMSIZE:
        return n * ITEMSIZE[dtype]
    rows, cols = shape
    groups = rows * (cols // GROUP)
    if dtype == "q8":
        return groups * 2 + n
    if dtype in ("q4", "q4k"):
        return groups * 4 + n // 2
    if dtype == "q8r":
        return n + 2 * rows
    raise ValueError(f"unknown dtype {dtype}")


def q4k_zeros(blob, shape) -> bool:
    """Whether a q4k record (packed nibbles, then bf16 (scale, zero) pairs [C/32, R, 2]) has a
    zero other than 0. A GGUF's Q4_0 matrices have none (x = (q - 8) * d): the kernel then
    needs their scales alone, 10% fewer bytes."""
    rows, cols = shape
    half = rows * cols // 2
    return has_zeros(np.frombuffer(blob, np.uint16, count=rows * cols // GROUP * 2, offset=half))


def has_zeros(pairs: np.ndarray) -> bool:
    """Whether bf16 (scale, zero) pairs (uint16 bits, pairs last) hold a zero other than 0
    (-0 counts as 0)."""
    return bool((pairs.reshape(-1, 2)[:, 1] & 0x7FFF).any())
