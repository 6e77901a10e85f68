"""MoE experts in the tiered engine: the read-ahead cut on the next router's probabilities
(the cache, its policy rule and the read-ahead counters: cache/experts.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def top_probs(moe, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, d] -> (router probabilities of the top-k [N, k], expert ids [N, k]): `route`
    without renormalizing over the k, so that a cut compares like with like across tokens."""
    p = F.softmax(moe.gate(x).float(), dim=-1)
    return p.topk(moe.top_k, dim=-1)


def likely_experts(route_next, x: torch.Tensor, cut: float) -> list[int]:
    """The experts the next router (`top_probs` of it) picks for x [1, d] whose probability is
    at least `cut`: read ahead only what is likely."""
    w, idx = route_next(x)
    return [int(e) for e, q in zip(idx[0], w[0]) if q >= cut]


def block_bytes(block) -> int:
    """Bytes of a kernel-ready expert (a slots.Block): what the cache accounts."""
    parts = ([*block.row_q, *block.row_sz, block.down_q, block.down_sz] if block.int4
             else [*block.row_w, block.down_w])
    return sum(t.numel() * t.element_size() for t in parts)
