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
from tiercache.models.kv import kv_bytes
from tiercache.store import quant

from .accounting import dense_mode

ITEMSIZE = {"f32": 4, "f16": 2, "bf16": 2}
# stored in the int4 / int8 kernels' layouts: the same bytes and kernels as q4 / q8
KERNEL_LAYOUTS = {"q4k": "q4", "q8r": "q8"}
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


def engine_dtype(stored: str, hold: str | None, ffn: bool = False) -> str:
    """How the engine holds a tensor stored as `stored`: with hold None (its "auto" compute),
    q4 stays q4 (torch's int4 kernel), a q8 matrix stays q8 (torch's int8 kernel; FFN slots
    have no q8 form), and everything else is expanded to f32."""
    if hold is not None:
        return hold
    stored = KERNEL_LAYOUTS.get(stored, stored)
    if stored == "q4" or (stored == "q8" and not ffn):
        return stored
    return "f32"


@dataclass
class Part:
    """A weight type: its tensors' shapes and stored dtypes, to cost them however held."""
    tensors: list = field(default_factory=list)  # [(shape, stored dtype)]
    _memo: dict = field(default_factory=dict, repr=False)

    def add(self, shape, dtype: str):
        self.tensors.append((tuple(shape), dtype))
        self._memo.clear()

    @property
    def stored(self) -> int:
        return self.by_dtype("stored").get("total", 0)

    def held(self, hold: str | None) -> int:
        """Bytes in RAM when held per `hold` (None: the engine's choice per tensor)."""
        return sum(self.by_dtype(hold).values()) if self.tensors else 0

    def by_dtype(self, hold: str | None) -> dict:
        """{dtype: bytes} as held; hold "stored" gives {"total": stored bytes}."""
        if hold not in self._memo:
            out: dict = {}
            for shape, dt in self.tensors:
                key = "total" if hold == "stored" else engine_dtype(dt, hold)
                nb = nbytes_as(shape, dt if hold == "stored" else key)
                out[key] = out.get(key, 0) + nb
            self._memo[hold] = out
        return self._memo[hold]

    @property
    def elements(self) -> int:
        return sum(math.prod(s) for s, _ in self.tensors)


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
    # sparse decode (thresholds from a profile, or an assumed sparsity) pins the gates and
    # caches up|down per cluster; a dense run keeps gate|up|down in the cluster slots
    gate_pinned: bool = True
    # measured per-cluster activity (share of tokens with any neuron active) at the store's
    # cluster size, when the profile records it; else derived from neuron frequencies
    cluster_active: list | None = None
    weight_bytes: int = 0
    source_bytes: int = 0
    manifest: dict | None = field(default=None, repr=False)  # what the engine will load

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

    # -- bytes ----------------------------------------------------------------------------------
    def neuron_bytes(self, dtype: str | None = None, parts: int = 3) -> float:
        """One neuron bundle (gate row, up row, down column), or its last `parts` rows."""
        return parts * _row_bytes(self.d, dtype or self.ffn_dtype)

    @property
    def ffn_units(self) -> int:
        return self.layers * self.experts

    def ffn_bytes(self, dtype: str | None = None) -> float:
        return self.ffn_units * self.F * self.neuron_bytes(dtype)

    def gate_bytes(self, hold: str | None = None) -> float:
        """The pinned gates, held as the engine holds them (`hold` as in engine_dtype)."""
        return self.ffn_bytes(engine_dtype(self.ffn_dtype, hold, ffn=True)) / 3 \
            if self.gate_pinned else 0.0

    def fixed_bytes(self, hold: str | None = None) -> float:
        """Fixed region: every non-FFN tensor plus the pinned gates."""
        return sum(p.held(hold) for p in self.parts.values()) + self.gate_bytes(hold)

    def stored_fixed_bytes(self) -> int:
        return sum(p.stored for p in self.parts.values())

    def dense_bytes_per_token(self, hold: str | None = None) -> dict:
        """{dtype: bytes} of fixed weights a decode step streams through matvecs (lm_head or
        the tied embedding, attention, router, gates; input embedding rows are a lookup)."""
        head = self.parts["lm_head"] if self.parts["lm_head"].tensors else self.parts["embed"]
        out: dict = {}
        for part in (self.parts["attn"], self.parts["router"], self.parts["other"], head):
            for dt, nb in part.by_dtype(hold).items():
                out[dt] = out.get(dt, 0) + nb
        gdt = engine_dtype(self.ffn_dtype, hold, ffn=True)
        out[gdt] = out.get(gdt, 0) + self.gate_bytes(hold)
        return out

    @property
    def params(self) -> int:
        ffn = self.ffn_units * 3 * self.F * self.d
        return sum(p.elements for p in self.parts.values()) + ffn

    def active_params(self) -> float:
        """Parameters a dense decode step multiplies with (lm_head included, MoE routed)."""
        head = self.parts["lm_head"] if self.parts["lm_head"].tensors else self.parts["embed"]
        dense = sum(self.parts[k].elements for k in ("attn", "router", "other")) + head.elements
        return dense + self.layers * self.experts_per_tok * 3 * self.F * self.d

    def kv_bytes_per_token(self, dtype: str = "f16") -> int:
        return kv_bytes(self.args, 1, dtype)

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
                parts[cat].add(meta["shape"], meta["dtype"])
        freq, assumed, tokens = _activity(m, args)
        kind = m.get("estimate", {}).get("kind", "store")
        cluster_active = _cluster_active(m, args)
        if kind == "store":  # the engine's rule: thresholds, where they skip enough clusters
            sparse = not dense_mode(m)
            if not sparse:  # every cluster, every token
                freq, cluster_active = [np.ones(args.intermediate_size)] * len(freq), None
        else:  # an estimate: the profile `tiercache profile` would write is assumed
            sparse = assumed and float(np.mean(freq[0])) < 1
        return cls(name=name or m.get("name", ""), kind=kind, args=args,
                   dtype=m.get("dtype", ffn["dtype"]),
                   ffn_dtype="q4" if ffn["dtype"] == "q4k" else ffn["dtype"],  # same bytes
                   cluster_size=int(ffn["cluster_size"]), parts=parts, freq=freq,
                   assumed_activity=assumed, profile_tokens=tokens, gate_pinned=sparse,
                   cluster_active=cluster_active,
                   weight_bytes=int(m.get("weight_bytes", 0)),
                   source_bytes=int(m.get("estimate", {}).get("source_bytes", 0)), manifest=m)


def _activity(m: dict, args: ModelArgs) -> tuple[list[np.ndarray], bool, int]:
    """Per-neuron frequencies per FFN unit from the manifest's profile, in either layout:
    {"ffn": [[{"freq": [...]}, ... per expert], ... per layer]} (what `tiercache profile`
    writes) or {"layers": [{"freq": [...]}, ...]}; else the assumed default."""
    units = args.num_hidden_layers * args.n_experts
    prof = m.get("profile") or {}
    rows = prof.get("ffn") or [[lay] for lay in prof.get("layers") or []]
    freqs = [np.clip(np.asarray(ex["freq"], dtype=np.float64), 0, 1)
             for row in rows for ex in row if "freq" in ex]
    if len(freqs) == args.num_hidden_layers and units > len(freqs):
        freqs = [f for f in freqs for _ in range(args.n_experts)]
    if freqs and len(freqs) == units and all(len(f) == args.intermediate_size for f in freqs):
        return freqs, False, int(prof.get("tokens", 0))
    active = 1.0 if args.is_moe else DEFAULT_ACTIVE  # routed experts run dense
    f = default_freq(args.intermediate_size, active)
    return [f] * units, True, 0


def _cluster_active(m: dict, args: ModelArgs) -> list | None:
    rows = (m.get("profile") or {}).get("ffn") or []
    acts = [ex.get("cluster_active") for row in rows for ex in row]
    if acts and len(acts) == args.num_hidden_layers * args.n_experts and all(acts):
        return [np.clip(np.asarray(a, dtype=np.float64), 0, 1) for a in acts]
    return None


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
