"""What a model weighs, per weight type, read from a store manifest or an estimate of one.

Weight types follow DESIGN.md's segmented cache: embeddings (and lm_head), attention, norms,
router go to the fixed region; FFN neurons are bundles (gate row | up row | down column) grouped
in clusters, as the store keeps them. Activation statistics come from the manifest's "profile"
section; without one a default sparsity is assumed (and `assumed` says so).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from tiercache.config import ModelArgs
from tiercache.store import quant

ITEMSIZE = {"f32": 4, "f16": 2, "bf16": 2}
DEFAULT_ACTIVE = 0.5  # DESIGN.md: SmolLM2-135M at ~50% activation
ZIPF_S = 0.5  # skew of the assumed per-neuron frequencies (capped at 1)
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def nbytes_as(shape, dtype: str) -> int:
    """Bytes of a tensor of `shape` held in `dtype` (q8/q4 only for 2-D, group-32 rows)."""
    if dtype in ("q8", "q4") and not quant.can_quantize(shape):
        dtype = "f16" if len(shape) == 2 else "f32"
    return quant.nbytes(tuple(shape), dtype)


def category(name: str) -> str:
    """Weight type of an HF tensor name (FFN ones too, for estimates)."""
    if "embed_tokens" in name:
        return "embed"
    if name.startswith("lm_head"):
        return "lm_head"
    if "norm" in name:
        return "norm"
    if ".self_attn." in name:
        return "attn"
    if "block_sparse_moe.gate." in name:
        return "router"
    if ".mlp." in name or ".experts." in name:
        return "ffn"
    return "other"


@dataclass
class Part:
    """A weight type: its bytes as stored and its shapes (to re-cost it in another dtype)."""
    stored: int = 0
    shapes: list = field(default_factory=list)
    _held: dict = field(default_factory=dict, repr=False)

    def add(self, shape, nbytes: int):
        self.stored += nbytes
        self.shapes.append(tuple(shape))
        self._held.clear()

    def held(self, dtype: str | None) -> int:
        """Bytes when held in RAM as `dtype` (None: as stored)."""
        if dtype is None:
            return self.stored
        if dtype not in self._held:
            self._held[dtype] = sum(nbytes_as(s, dtype) for s in self.shapes)
        return self._held[dtype]

    @property
    def elements(self) -> int:
        if "elements" not in self._held:
            self._held["elements"] = sum(math.prod(s) for s in self.shapes)
        return self._held["elements"]


@dataclass
class ModelSizes:
    name: str
    kind: str  # "store", "hf" or "gguf" (the last two: estimates)
    args: ModelArgs
    dtype: str  # the store's (or the estimated store's) dtype
    ffn_dtype: str
    cluster_size: int
    parts: dict[str, Part]  # embed, lm_head, attn, norm, router, other
    freq: list[np.ndarray]  # per FFN unit (layer x expert), per neuron, stored hot->cold order
    assumed_activity: bool  # True when no profile: frequencies are the default model
    profile_tokens: int = 0
    weight_bytes: int = 0
    source_bytes: int = 0

    # -- shapes ---------------------------------------------------------------------------------
    @property
    def layers(self) -> int:
        return self.args.num_hidden_layers

    @property
    def experts(self) -> int:
        return self.args.n_experts

    @property
    def experts_per_tok(self) -> int:
        return self.args.num_experts_per_tok if self.args.is_moe else 1

    @property
    def d(self) -> int:
        return self.args.hidden_size

    @property
    def F(self) -> int:
        return self.args.intermediate_size

    @property
    def gate_pinned(self) -> bool:
        """The engine picks active neurons by a threshold on act(gate x) (CATS), so it pins
        every gate whole, experts' too, whatever the activation."""
        return True

    # -- bytes ----------------------------------------------------------------------------------
    def neuron_bytes(self, dtype: str | None = None, parts: int = 3) -> float:
        """One neuron bundle (gate row, up row, down column), or its last `parts` rows."""
        return parts * _row_bytes(self.d, dtype or self.ffn_dtype)

    @property
    def ffn_units(self) -> int:
        return self.layers * self.experts

    def ffn_bytes(self, dtype: str | None = None) -> float:
        return self.ffn_units * self.F * self.neuron_bytes(dtype)

    def gate_bytes(self, dtype: str | None = None) -> float:
        return self.ffn_bytes(dtype) / 3 if self.gate_pinned else 0.0

    def fixed_bytes(self, dtype: str | None = None) -> float:
        """Fixed region: every non-FFN tensor plus the gate where the mode needs it."""
        return sum(p.held(dtype) for p in self.parts.values()) + self.gate_bytes(dtype)

    def dense_bytes_per_token(self, dtype: str | None = None) -> float:
        """Fixed weights a decode step streams through matvecs (embedding rows are a lookup)."""
        head = self.parts["lm_head"] if self.parts["lm_head"].stored else self.parts["embed"]
        mats = ("attn", "router", "other")
        return (sum(self.parts[k].held(dtype) for k in mats) + head.held(dtype)
                + self.gate_bytes(dtype))

    @property
    def params(self) -> int:
        ffn = self.ffn_units * 3 * self.F * self.d
        return sum(p.elements for p in self.parts.values()) + ffn

    def active_params(self) -> float:
        """Parameters a dense decode step multiplies with (lm_head included, MoE routed)."""
        head = self.parts["lm_head"] if self.parts["lm_head"].stored else self.parts["embed"]
        dense = sum(self.parts[k].elements for k in ("attn", "router", "other")) + head.elements
        return dense + self.layers * self.experts_per_tok * 3 * self.F * self.d

    def kv_bytes_per_token(self, itemsize: int = 4) -> int:
        a = self.args
        return 2 * a.num_hidden_layers * a.num_key_value_heads * a.head_dim * itemsize

    # -- activity -------------------------------------------------------------------------------
    @property
    def route_prob(self) -> float:
        return self.experts_per_tok / self.experts

    def mean_active(self) -> float:
        return float(np.mean([f.mean() for f in self.freq]))

    def summary(self) -> dict:
        return {"name": self.name, "kind": self.kind, "architecture": self.args.model_type,
                "layers": self.layers, "hidden_size": self.d, "intermediate_size": self.F,
                "experts": self.experts, "vocab_size": self.args.vocab_size,
                "params": self.params, "dtype": self.dtype, "ffn_dtype": self.ffn_dtype,
                "cluster_size": self.cluster_size, "weight_bytes": int(self.weight_bytes),
                "activity": "assumed" if self.assumed_activity else
                            f"profiled ({self.profile_tokens} tokens)",
                "experts_per_token": self.experts_per_tok,
                "mean_active_fraction": round(self.mean_active() * self.route_prob, 4)}

    # -- from a manifest ------------------------------------------------------------------------
    @classmethod
    def from_manifest(cls, m: dict, name: str = "") -> "ModelSizes":
        args = ModelArgs.from_dict(m["config"])
        ffn = m["ffn"]
        parts = {k: Part() for k in ("embed", "lm_head", "attn", "norm", "router", "other")}
        for tname, meta in m["tensors"].items():
            cat = category(tname)
            if cat != "ffn":
                parts[cat].add(meta["shape"], nbytes_as(meta["shape"], meta["dtype"]))
        freq, assumed, tokens = _activity(m, args)
        kind = m.get("estimate", {}).get("kind", "store")
        return cls(name=name or m.get("name", ""), kind=kind, args=args,
                   dtype=m.get("dtype", ffn["dtype"]), ffn_dtype=ffn["dtype"],
                   cluster_size=int(ffn["cluster_size"]), parts=parts, freq=freq,
                   assumed_activity=assumed, profile_tokens=tokens,
                   weight_bytes=int(m.get("weight_bytes", 0)),
                   source_bytes=int(m.get("estimate", {}).get("source_bytes", 0)))


def _activity(m: dict, args: ModelArgs) -> tuple[list[np.ndarray], bool, int]:
    units = args.num_hidden_layers * args.n_experts
    prof = m.get("profile")
    if prof and prof.get("layers"):
        freqs = [np.clip(np.asarray(lay["freq"], dtype=np.float64), 0, 1)
                 for lay in prof["layers"]]
        if len(freqs) == args.num_hidden_layers and units > len(freqs):
            freqs = [f for f in freqs for _ in range(args.n_experts)]
        if len(freqs) == units and all(len(f) == args.intermediate_size for f in freqs):
            return freqs, False, int(prof.get("tokens", 0))
    active = 1.0 if args.is_moe else DEFAULT_ACTIVE  # routed experts run dense
    f = default_freq(args.intermediate_size, active)
    return [f] * units, True, 0


def default_freq(n: int, active: float = DEFAULT_ACTIVE, s: float = ZIPF_S) -> np.ndarray:
    """Zipf-like per-neuron frequencies, hot first: min(1, c / (i+1)^s) with mean `active`."""
    if active >= 1:
        return np.ones(n)
    ranks = np.arange(1, n + 1, dtype=np.float64) ** -s
    lo, hi = 0.0, float(n) ** s * 2
    for _ in range(60):  # bisection on c: the mean is increasing in it
        c = (lo + hi) / 2
        lo, hi = (c, hi) if np.minimum(1, c * ranks).mean() < active else (lo, c)
    return np.minimum(1.0, lo * ranks)


@lru_cache(maxsize=64)
def _row_bytes(d: int, dtype: str) -> float:
    return nbytes_as((1, d), dtype)


def layer_of(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None
