"""The store's dtypes as facts, without torch (the lean runtime reads stores without it):
their names, group size and byte counts. `quant` encodes and decodes them."""
from __future__ import annotations

import math

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
