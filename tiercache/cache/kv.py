"""What both KV caches share, without torch (the lean runtime's numpy cache uses it too):
buffers `k`, `v` that grow in steps of STEP positions, `offset` positions written in them."""
from __future__ import annotations

STEP = 256  # the caches grow by this many positions


class Growing:
    """The protocol's bookkeeping: trim and nbytes over `k`, `v` (numpy arrays or tensors,
    None until the first write) and `offset`."""
    k = v = None
    offset = 0

    def trim(self, n: int) -> int:
        """Drop the last n positions (e.g. a rejected turn); returns how many were dropped."""
        n = min(n, self.offset)
        self.offset -= n
        return n

    @property
    def nbytes(self) -> int:
        return 0 if self.k is None else 2 * self.k.nbytes


def capacity(need: int) -> int:
    """Positions a cache holding `need` grows to."""
    return -(-need // STEP) * STEP
