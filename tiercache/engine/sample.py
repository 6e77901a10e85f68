"""Samplers are small closures: logits [V] -> token id. They run in numpy, so that the lean
runtime samples without torch; a torch tensor is read as numpy (on the CPU, without a copy)."""
from __future__ import annotations

from typing import Callable

import numpy as np

Sampler = Callable[[object], int]


def make_sampler(temp: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int | None = None) -> Sampler:
    if temp <= 0:
        return lambda logits: int(np.argmax(_numpy(logits)))  # the first of equal maxima
    rng = np.random.default_rng(seed)

    def sample(logits) -> int:
        z = _numpy(logits).astype(np.float64) / temp
        if top_k > 0:
            kth = np.partition(z, -min(top_k, z.size))[-min(top_k, z.size)]
            z = np.where(z < kth, -np.inf, z)
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        if top_p < 1.0:
            probs = _top_p(probs, top_p)
        return int(rng.choice(probs.size, p=probs))

    return sample


def _numpy(logits) -> np.ndarray:
    if isinstance(logits, np.ndarray):
        return logits.reshape(-1)
    return logits.detach().float().cpu().numpy().reshape(-1)  # a torch tensor


def _top_p(probs: np.ndarray, p: float) -> np.ndarray:
    """Keep the smallest set of tokens whose mass reaches p (always at least the top one)."""
    order = np.argsort(-probs, kind="stable")
    sorted_p = probs[order]
    sorted_p[np.cumsum(sorted_p) - sorted_p >= p] = 0
    out = np.zeros_like(probs)
    out[order] = sorted_p
    return out / out.sum()
