"""Activation predictors: a low-rank map from a layer's FFN input to which of its neurons will
be active (Deja Vu, PowerInfer), so that a ReLU-family model's FFN is read and computed only
for the clusters it predicts, with no gate kept in RAM to decide. Trained by `tiercache
profile` (`fit`), stored one record per layer (and expert), in the store's neuron order.

logits = B (A x) + bias; a neuron is predicted active when its logit exceeds `cut`, a cluster
when any of its neurons is. `cut` is set on the calibration tokens for a target recall.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..store.format import predictor_key  # noqa: F401 (its record key; imported from here)


def record_bytes(d: int, f: int, rank: int) -> int:
    """One predictor as stored and as held in RAM (float32 A, B, bias and the cut)."""
    return 4 * (rank * d + f * rank + f + 1)


class Predictor:
    def __init__(self, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor, cut: float):
        self.a, self.b, self.bias, self.cut = a, b, bias, float(cut)

    # -- storage ----------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        flat = torch.cat([self.a.flatten(), self.b.flatten(), self.bias,
                          torch.tensor([self.cut])]).float().contiguous()
        return flat.numpy().tobytes()

    @classmethod
    def from_buffer(cls, buf, d: int, f: int, rank: int) -> "Predictor":
        t = buf if isinstance(buf, torch.Tensor) else torch.frombuffer(bytearray(buf),
                                                                       dtype=torch.uint8)
        flat = t.view(torch.float32)
        if flat.numel() != record_bytes(d, f, rank) // 4:
            raise ValueError(f"predictor record of {t.numel()} bytes, expected "
                             f"{record_bytes(d, f, rank)}")
        a, b, bias, cut = flat.split([rank * d, f * rank, f, 1])
        return cls(a.view(rank, d).clone(), b.view(f, rank).clone(), bias.clone(), float(cut))

    # -- use -----------------------------------------------------------------------------------
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x.float(), self.a), self.b, self.bias)

    def neurons(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, d] -> bool [T, F]: neurons predicted active."""
        return self.logits(x) > self.cut

    def clusters(self, x: torch.Tensor, n: int) -> list[int]:
        """Clusters of n neurons with any neuron predicted active for any row of x."""
        act = self.neurons(x).any(0)
        pad = (-act.numel()) % n
        if pad:
            act = F.pad(act, (0, pad))
        return act.view(-1, n).any(1).nonzero().flatten().tolist()


def fit(x: torch.Tensor, y: torch.Tensor, rank: int, gate: torch.Tensor | None = None,
        recall: float = 0.99, steps: int = 300, batch: int = 1024, seed: int = 0) -> Predictor:
    """Train a predictor on FFN inputs x [N, d] and activity y [N, F] (bool): logistic loss,
    Adam, minibatches. Starts from the gate's best rank-`rank` approximation when given (for
    ReLU, a neuron is active when its gate row's dot product is positive). `cut` is the
    logit at which `recall` of the active (token, neuron) pairs in x are predicted."""
    g = torch.Generator().manual_seed(seed)
    n, d = x.shape
    f = y.shape[1]
    if gate is not None:
        u, s, vh = torch.linalg.svd(gate.float(), full_matrices=False)
        a0, b0 = vh[:rank] * s[:rank, None].sqrt(), u[:, :rank] * s[:rank].sqrt()
    else:
        a0 = torch.randn(rank, d, generator=g) / math.sqrt(d)
        b0 = torch.randn(f, rank, generator=g) / math.sqrt(rank)
    a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    bias = torch.zeros(f, requires_grad=True)
    yf = y.float()
    pos = yf.mean().clamp(1e-3, 1 - 1e-3)
    weight = ((1 - pos) / pos).clamp(max=10.0)  # active neurons are the rarer, costlier errors
    opt = torch.optim.Adam([a, b, bias], lr=3e-3)
    with torch.enable_grad():
        for _ in range(steps):
            i = torch.randint(0, n, (min(batch, n),), generator=g)
            logits = F.linear(F.linear(x[i], a), b, bias)
            loss = F.binary_cross_entropy_with_logits(logits, yf[i], pos_weight=weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
    p = Predictor(a.detach(), b.detach(), bias.detach(), 0.0)
    with torch.no_grad():
        on = p.logits(x)[y]
    p.cut = float(torch.quantile(on[torch.randperm(on.numel(), generator=g)[:1 << 20]],
                                 1 - recall)) if on.numel() else 0.0
    return p


def score(p: Predictor, x: torch.Tensor, y: torch.Tensor, n: int) -> dict:
    """Recall (active neurons predicted), predicted fraction, and per-token cluster activity
    predicted vs true, on x [N, d], y [N, F]."""
    with torch.no_grad():
        pred = p.neurons(x)
    f = y.shape[1]
    pad = (-f) % n

    def per_cluster(m):
        m = F.pad(m, (0, pad)) if pad else m
        return m.view(m.shape[0], -1, n).any(-1)

    pc, tc = per_cluster(pred), per_cluster(y)
    return {"recall": float((pred & y).sum() / y.sum().clamp(min=1)),
            "predicted": float(pred.float().mean()), "active": float(y.float().mean()),
            "cluster_recall": float((pc & tc).sum() / tc.sum().clamp(min=1)),
            "clusters_predicted": float(pc.float().mean()),
            "clusters_active": float(tc.float().mean())}
