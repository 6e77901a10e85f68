"""Byte sizes as people write them: "512M", "1.5G", "800MB", "2GiB", "4096".

One rule: an "i" means binary (KiB/MiB/GiB, also "Ki"/"Mi"/"Gi"), anything else is decimal
(K/M/G, KB/MB/GB), as in Kubernetes quantities and SI. DESIGN.md's caps ("175 MB") and disk
figures are decimal; a cgroup's `memory.limit_in_bytes` takes the integer this returns.
"""
from __future__ import annotations

import re

from tiercache.errors import TiercacheError

_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)


def parse_size(text: str | int | float) -> int:
    """"1.5G" -> 1_500_000_000, "2GiB" -> 2 * 2**30, "800MB" -> 800_000_000, 4096 -> 4096."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text < 0:
            raise TiercacheError(f"size {text} is negative")
        return int(text)
    m = _SIZE.match(str(text))
    if not m or (m.group(3) and not m.group(2)):
        raise TiercacheError(f"cannot read '{text}' as a size (examples: 512M, 1.5G, 800MB, 2GiB)")
    number, unit, binary = float(m.group(1)), m.group(2).lower(), m.group(3)
    base = 1024 if binary else 1000
    return int(round(number * base ** _POWERS[unit]))


def fmt_bytes(n: float, unit: str = "MB") -> str:
    """Decimal units, one decimal: fmt_bytes(93_000_000) -> "93.0 MB"."""
    div = {"KB": 1e3, "MB": 1e6, "GB": 1e9}[unit]
    return f"{n / div:,.1f} {unit}"


def mb(n: float) -> float:
    return n / 1e6


def human_bytes(n: float) -> str:
    """Pick a decimal unit that keeps the number readable."""
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g} {unit}"
    return f"{int(n)} B"
