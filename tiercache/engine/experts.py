"""MoE experts in the tiered engine: which expert-cache policy a budget gets, the read-ahead
cut on the next router's probabilities, and the read-ahead counters per layer.

The policy rule is measured (tools/expert_trace.py on the synthetic Mixtral stores and the tiny
Mixtral, teacher-forced text): an LRU smaller than one token's routed set (top-k x layers
experts) cycles and hits nothing, where experts pinned by routing counts hit 0.3-0.5; from one
token's set up, the LRU beats frequency pins (0.65 against 0.52 at 25% of the experts, 0.94
against 0.81 at 50%).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..cache.experts import ExpertCache


def choose_policy(policy: str | None, budget_bytes: int, expert_bytes: int, layers: int,
                  top_k: int) -> tuple[str, float]:
    """-> (policy, share of the budget pinned). None: the measured rule above."""
    if policy is not None:
        return policy, 0.5 if policy == "freq+lru" else 0.0
    if 0 < budget_bytes // max(1, expert_bytes) < layers * top_k:
        return "freq+lru", 1.0
    return "lru", 0.0


def expert_cache(policy: str | None, budget_bytes: int, expert_bytes: int, layers: int,
                 top_k: int, resident: dict) -> ExpertCache:
    """The cache over `budget_bytes` of streamed experts, with the `resident` ones (key ->
    value; their bytes are the engine's pinned weights) pinned on top, so that every routed
    use is counted by one owner."""
    name, share = choose_policy(policy, budget_bytes, expert_bytes, layers, top_k)
    held = len(resident) * expert_bytes
    cache = ExpertCache(budget_bytes + held, layers, name,
                        pinned_bytes=held + int(share * budget_bytes))
    for key, value in resident.items():
        cache.pin(key, value, expert_bytes)
    return cache


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


@dataclass
class ReadAheadStats:
    """Experts, per layer: read ahead (`read`), of them routed (`used`) or let go (`unused`),
    and routed experts neither held nor read ahead (`demand`: the layer waits for the read)."""
    layers: int

    def __post_init__(self):
        z = [0] * self.layers
        self.read, self.used, self.unused, self.demand = z[:], z[:], z[:], z[:]

    def as_dict(self) -> dict:
        return {"readahead_read": self.read[:], "readahead_used": self.used[:],
                "readahead_unused": self.unused[:], "demand_stalls": self.demand[:]}


def report(cache: ExpertCache, ahead: ReadAheadStats, cut: float) -> dict:
    """stats()["experts"]: per layer hits, misses (hits + misses = routed uses), bytes read,
    the resident set, and read-ahead used / unused / demand stalls."""
    return {**cache.report(), **ahead.as_dict(), "readahead_cut": cut}
