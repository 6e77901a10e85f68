"""`tiercache profile`: activation statistics, thresholds within a quality budget, and the
store rewritten with each layer's neurons ordered hot -> cold (so hot clusters are contiguous).

Thresholds are CATS-style, on |act(gate(x))|, one per layer (and expert) at the same quantile;
the quantile is the largest whose perplexity on held-out calibration text stays within the
budget (binary search on dense f32 weights with the FFN masked).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm import tqdm

from .engine import load_dense
from .errors import TiercacheError
from .models.llama import MLP
from .store.format import Store, StoreWriter, tensor_key


class _Masked(torch.nn.Module):
    """Wraps an MLP: records |act(gate x)| samples, or zeroes activations under a threshold."""

    def __init__(self, mlp: MLP):
        super().__init__()
        self.mlp, self.threshold, self.samples, self.counts, self.tokens = mlp, 0.0, [], None, 0
        self.clusters = None  # (neuron order, cluster size, counts [C]) once an order is known

    def forward(self, x):
        m = self.mlp
        a = m.act(m.gate_proj(x))
        if self.samples is not None:
            flat = a.detach().abs().reshape(-1, a.shape[-1])
            self.samples.append(flat[torch.randperm(flat.shape[0])[:64]])
        keep = a.abs() >= self.threshold
        flat = keep.reshape(-1, a.shape[-1])
        if self.counts is not None:
            self.counts += flat.sum(0)
            self.tokens += flat.shape[0]
        if self.clusters is not None:  # per cluster: tokens with any neuron active
            order, n, counts = self.clusters
            f = flat[:, order]
            pad = (-f.shape[1]) % n
            f = torch.nn.functional.pad(f, (0, pad)) if pad else f
            counts += f.view(f.shape[0], -1, n).any(-1).sum(0)
        return m.down_proj(a * keep * m.up_proj(x))


def _wrap(engine) -> dict[tuple[int, int], _Masked]:
    out = {}
    for l, layer in enumerate(engine.model.model.layers):
        if engine.args.is_moe:
            ex = layer.block_sparse_moe.experts
            for e in range(len(ex)):
                ex[e] = out[(l, e)] = _Masked(ex[e])
        else:
            layer.mlp = out[(l, 0)] = _Masked(layer.mlp)
    return out


def _chunks(ids: list[int], size: int):
    return [ids[i:i + size] for i in range(0, len(ids) - 1, size) if len(ids[i:i + size]) > 1]


@torch.inference_mode()
def perplexity(engine, ids: list[int], chunk: int = 256, progress: bool = False) -> float:
    """exp(mean NLL) of each chunk's next tokens, each chunk from an empty cache."""
    nll, n = 0.0, 0
    for c in tqdm(_chunks(ids, chunk), desc="eval", unit="chunk", disable=not progress):
        logits = engine.logits(engine.new_session(), c[:-1])
        nll += torch.nn.functional.cross_entropy(logits.float(), torch.tensor(c[1:]),
                                                 reduction="sum").item()
        n += len(c) - 1
    return math.exp(nll / n)


def _set_quantile(wraps, q: float, quantiles: dict):
    for k, w in wraps.items():
        w.threshold = float(quantiles[k](q))


def profile_store(path, ids: list[int], budget: float = 0.05, chunk: int = 256,
                  progress: bool = True, force: bool = True) -> dict:
    """Profile the store at `path` on token ids; rewrite it in place (atomically)."""
    store = Store(path)
    if len(ids) < 64:
        raise TiercacheError("calibration text is too short (need at least 64 tokens)")
    engine = load_dense(store)
    wraps = _wrap(engine)
    split = len(ids) * 3 // 4
    fit, held = ids[:split], ids[split:]
    for w in wraps.values():
        w.threshold = 0.0
    dense = perplexity(engine, fit, chunk, progress)
    samples = {k: torch.cat(w.samples).flatten().sort().values for k, w in wraps.items()}
    for w in wraps.values():
        w.samples = None
    quantiles = {k: (lambda q, s=s: s[min(len(s) - 1, int(q * len(s)))]) for k, s in samples.items()}
    dense_held = perplexity(engine, held, chunk)
    lo, hi = 0.0, 0.95
    for _ in tqdm(range(7), desc="thresholds", disable=not progress):
        mid = (lo + hi) / 2
        _set_quantile(wraps, mid, quantiles)
        ok = perplexity(engine, held, chunk) <= dense_held * (1 + budget)
        lo, hi = (mid, hi) if ok else (lo, mid)
    _set_quantile(wraps, lo, quantiles)
    sparse_held = perplexity(engine, held, chunk)
    for w in wraps.values():
        w.counts = torch.zeros(w.mlp.gate_proj.weight.shape[0])
    perplexity(engine, fit, chunk)  # frequencies at the chosen thresholds
    prof = {"tokens": len(ids), "budget": budget, "skip_fraction": lo,
            "perplexity_dense": dense_held, "perplexity_sparse": sparse_held,
            "perplexity_dense_fit": dense}
    for w in wraps.values():
        w.freq = w.counts / max(1, w.tokens)
    orders = {k: torch.argsort(w.freq, descending=True, stable=True) for k, w in wraps.items()}
    n = store.cluster_size
    for k, w in wraps.items():
        w.counts = None
        w.clusters = (orders[k], n, torch.zeros(-(-len(orders[k]) // n)))
    sample = fit[:1024]
    perplexity(engine, sample, chunk)  # cluster activity in the new order
    prof["ffn"] = _layer_stats(store, wraps, orders, len(sample) - len(_chunks(sample, chunk)))
    del engine
    _rewrite(store, orders, prof, force)
    return prof


def _layer_stats(store: Store, wraps, orders, sample_tokens: int) -> list[list[dict]]:
    a, n = store.args, store.cluster_size
    out = []
    for l in range(a.num_hidden_layers):
        row = []
        for e in range(a.n_experts):
            w = wraps[(l, e)]
            freq = w.freq[orders[(l, e)]]
            cl = [float(freq[i:i + n].max()) for i in range(0, len(freq), n)]
            active = (w.clusters[2] / max(1, sample_tokens)).tolist()
            row.append({"threshold": w.threshold, "active_fraction": float(freq.mean()),
                        "freq": [round(float(f), 4) for f in freq], "cluster_freq": cl,
                        "cluster_active": [round(a, 4) for a in active]})
        out.append(row)
    return out


def _rewrite(store: Store, orders, prof: dict, force: bool) -> Path:
    """Write the store again with permuted FFN neurons and the profile in its manifest."""
    a = store.args
    w = StoreWriter(store.path, a, store.manifest["dtype"], store.cluster_size,
                    map_size=int(store.weight_bytes * 1.5) + (64 << 20))
    try:
        for name in store.tensor_names:
            w.put_raw(name, store._get(tensor_key(name)), store.manifest["tensors"][name])
        for l in range(a.num_hidden_layers):
            for e in range(a.n_experts):
                gate, up, down = store.ffn_weights(l, e)
                p = orders[(l, e)]
                w.put_ffn(l, e, gate[p], up[p], down[:, p])
        files = {f.name: f.read_bytes() for f in store.path.iterdir()
                 if f.is_file() and f.name != "manifest.json"}
        extra = {k: v for k, v in store.manifest.items() if k in ("source",)}
        store.close()
        return w.commit({**extra, "profile": prof}, files, force=force)
    except BaseException:
        w.abort()
        raise
