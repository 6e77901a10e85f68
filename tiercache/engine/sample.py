"""Samplers are small closures: logits [V] -> token id."""
from __future__ import annotations

from typing import Callable

import torch

Sampler = Callable[[torch.Tensor], int]


def make_sampler(temp: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int | None = None) -> Sampler:
    if temp <= 0:
        return lambda logits: int(torch.argmax(logits))
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed())

    def sample(logits: torch.Tensor) -> int:
        logits = logits.float() / temp
        if top_k > 0:
            kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if top_p < 1.0:
            probs = _top_p(probs, top_p)
        return int(torch.multinomial(probs, 1, generator=gen))

    return sample


def _top_p(probs: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose mass reaches p (always at least the top one)."""
    sorted_p, order = probs.sort(descending=True)
    drop = sorted_p.cumsum(-1) - sorted_p >= p
    sorted_p[drop] = 0
    return torch.zeros_like(probs).scatter(-1, order, sorted_p) / sorted_p.sum()
