"""Place once, then compute: where each weight of a store lives, as one pure function.

  place(facts, cfg, caps, kernels) -> Layout

`facts` is what the manifest says (no store opened), `cfg` the settings, `caps` the machine's
room (RAM, the process's runtime, VRAM) and `kernels` which
kernels this machine runs (the engine asks the CPU; the planner passes what it models). The
Layout says which attention layers and whether the head are pinned, how many FFN clusters are
pinned (hot) and cached (cold), what streams in which units, the sparsity mode and whether
MatMulNBits holds the resident weights, with the RAM regions' bytes. A budget too small raises
BudgetError with the numbers. The tiered engine runs it before loading; the planner calls the
same function to predict what the engine will do.

VRAM (a GPU's memory, `caps.vram`) is the first tier, as float16, computed on the GPU; the
rest is placed in RAM and on flash as without one, and computed on the CPU next to its weights.
The head goes first. A dense model then takes whole layers in order (attention, FFN, their KV
cache): a layer split, as llama.cpp's --n-gpu-layers, choosing by bytes. An MoE model takes
every layer's trunk first (attention, norms, router, KV cache: used every token), then whole
experts as units, hottest first (the profile's routing counts, else layer order): a layer's
routed experts in VRAM compute there, the others on the CPU from its expert cache and the store
(mixtral-offloading keeps attention on the GPU likewise; it copies experts over instead). VRAM
is placed first: the RAM budget counts only what stays on the CPU (the RAM layers' weights, the
FFN units not in VRAM with their clusters and gates, the RAM layers' KV cache; the head unless it
is in VRAM, or when tied, as the embedding stays in RAM).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Callable

from ..config import ModelArgs
from ..errors import BudgetError, TiercacheError
from ..cache.kv import capacity
from ..models.kv import KVCache, kv_bytes
from ..store import quant
from ..store.format import cluster_key
from .dense import context_limit
from .nbits import EXTRA as NBITS_EXTRA
from .nbits import WORKSPACE as NBITS_WORKSPACE
from .nbits import BUILD as NBITS_BUILD
from .predictor import record_bytes
from .slots import Float32Slots, Int4Slots

MB = 1 << 20
# activations, logits and allocator slop beyond the KV cache and the streaming buffers: a
# 128-token prefill chunk of SmolLM2 peaks ~10 MiB above its loaded anonymous RSS plus KV
# (resident), ~13 MiB above that plus the streaming buffers (streamed; sampled RssAnon)
SLACK = 16 * MB
PREFILL_CHUNK = 128  # under a RAM budget, prompts run in chunks so SLACK bounds them
# file-backed pages (library code) the runtime keeps touching; the rest of its mapped files the
# kernel may reclaim under a cap, so they are not counted whole. /proc/self/clear_refs counts
# ~11 MiB referenced over a prefill and decode. Each code-page fault also reads around it: with
# the disk's read_ahead_kb at 128 this reserve holds; at 8192 (this VM had it so for a while)
# runs at the budget thrashed on code pages (~2 tok/s where 128 gives ~11).
FILE_RESERVE = 24 * MB
# pin gates and skip clusters only when at most this share of clusters is active per token
SPARSE_WORTH = 0.8
HEAD_SLICE = 2 << 20  # bytes of head rows per streamed unit: about one layer's streamed weights
# VRAM kept free of weights: activations, the logits, CUDA's own workspace (cuBLAS)
VRAM_SLACK = 64 * MB

Key = tuple[int, int, int]  # (layer, expert, cluster)


@dataclass
class TierConfig:
    ram_bytes: int | None = None   # what the process may use in all; None: every cluster fits
    hot_bytes: int | None = None   # region sizes (else derived from ram_bytes)
    cold_bytes: int | None = None
    hot_clusters: int | None = None  # region sizes in clusters, as a plan gives them
    cold_clusters: int | None = None
    io_threads: int = 2
    prefetch: bool = True
    fused: bool = True             # a wholly resident q4 layer decodes in C (fused.py)
    prefetch_layers: int = 2       # dense mode: units (layers, head slices) read ahead
    pin_attention: int | None = None  # with region sizes: layers whose attention is pinned
    pin_head: bool | None = None      # (the first ones), and whether the head is; else all
    sparse: bool | None = None     # profile thresholds: True always, False never, None when
                                   # the profile says they skip enough clusters to pay
    select: str | None = None      # sparse neurons picked by "gate" or "predictor"; None: the
                                   # predictor where the profile has one
    context: int = 2048            # KV cache reserved in the budget
    kv: str = "f16"                # the KV cache's dtype (models.kv.DTYPES)
    compute: str = "auto"          # auto: q4k stores on the int4 kernels, pinned weights on
                                   # kernels.resident_kernel() | nbits: pinned weights on ORT's
                                   # MatMulNBits wherever it verifies | torch: torch's int4
                                   # kernel only | f32
    experts: str | None = None     # MoE expert cache: lru | freq+lru | None: by the budget
                                   # (engine/experts.py: choose_policy, measured)
    expert_cache_bytes: int | None = None  # with region sizes: whole experts cached
    expert_cut: float = 0.0        # MoE read-ahead: only experts the next router gives >= this
    vram_bytes: int | None = None  # a GPU's memory for weights (the VRAM tier); None: none
    vram_device: str = "cuda"      # where the VRAM tier computes (tests stand in "cpu")

    @property
    def read_ahead(self) -> int:
        """Units (layers, head slices) read ahead of the one in use; 0: none."""
        return self.prefetch_layers if self.prefetch else 0


@dataclass
class Budget:
    runtime: int        # the process before weights (anonymous RSS) + FILE_RESERVE
    fixed: int          # norms, biases, and whatever the engine cannot stream
    attention: int      # pinned attention projections
    head: int           # the pinned head (and embeddings)
    gates: int
    kv: int
    slack: int
    streaming: int      # units being used and read ahead, and the I/O threads' read buffers
    slot_bytes: int
    hot_slots: int
    cold_slots: int
    attn_pinned: frozenset = frozenset()  # layers whose attention is pinned
    head_pinned: bool = True
    prepacked: int = 0  # what ORT's prepacked kernels hold beyond the stored bytes
    nbits_layers: frozenset = frozenset()  # layers whose attention and FFN run on them
    nbits_head: bool = False               # and whether the head does
    experts: int = 0    # MoE: whole streamed experts kept in the expert cache
    vram_layers: frozenset = frozenset()   # layers in VRAM, computed on the GPU (not RAM
    vram_head: bool = False                # regions), and whether the head is
    vram_experts: frozenset = frozenset()  # FFN units (layer, expert) in VRAM: a dense VRAM
                                           # layer's (l, 0); MoE: those chosen (see above)

    def lines(self) -> dict:
        return {"runtime": self.runtime, "fixed": self.fixed, "attention": self.attention,
                "prepacked": self.prepacked, "experts": self.experts,
                "head": self.head, "gates": self.gates, "kv": self.kv, "slack": self.slack,
                "streaming": self.streaming, "hot": self.hot_slots * self.slot_bytes,
                "cold": self.cold_slots * self.slot_bytes}

    @property
    def total(self) -> int:
        return sum(self.lines().values())


@dataclass(frozen=True)
class StoreFacts:
    """What placement reads of a store: its manifest, nothing opened."""
    args: ModelArgs
    tensors: dict          # name -> {"shape", "dtype"}
    cluster_size: int
    n_clusters: int
    ffn_dtype: str
    records: dict          # record key -> [nbytes, crc32]
    profile: dict | None

    @classmethod
    def from_manifest(cls, manifest: dict) -> "StoreFacts":
        args = ModelArgs.from_dict(manifest["config"])
        ffn = manifest["ffn"]
        n = int(ffn["cluster_size"])
        n_clusters = int(ffn.get("n_clusters") or -(-args.intermediate_size // n))
        records = manifest.get("records") or {}
        if not records:  # an estimate: cluster records as convert would write them
            one = 3 * quant.nbytes((n, args.hidden_size), ffn["dtype"])
            records = {cluster_key(0, 0, c).decode(): [one, 0] for c in range(n_clusters)}
        prof = manifest.get("profile")
        if prof and "ffn" not in prof and prof.get("layers"):  # the older per-layer layout
            prof = {**prof, "ffn": [[lay] for lay in prof["layers"]]}
        return cls(args, manifest["tensors"], n, n_clusters, ffn["dtype"], records, prof)

    @property
    def head_name(self) -> str:
        return "lm_head.weight" if "lm_head.weight" in self.tensors else "model.embed_tokens.weight"


@dataclass(frozen=True)
class Capacities:
    """The machine's room. runtime: what the process holds before any weight (measured
    anonymous RSS + FILE_RESERVE; 0 without a RAM budget). vram: a GPU's bytes for the VRAM
    tier (0: none)."""
    runtime: int = 0
    ram: int | None = None
    vram: int = 0


@dataclass(frozen=True)
class Kernels:
    """The kernels this machine runs, for this store (the engine asks the CPU)."""
    int4: bool = False    # q4k FFN clusters and attention on torch's int4 kernel
    int8: bool = False    # torch's int8 kernel (a streamed q8r head)
    nbits: bool = False   # ONNX Runtime's MatMulNBits for resident q4 weights

    @classmethod
    def here(cls, facts: StoreFacts, compute: str = "auto", nbits: bool = True) -> "Kernels":
        """What this CPU runs; nbits=False skips asking ONNX Runtime (it builds a session)."""
        from .kernels import _HAVE_INT8, resident_kernel
        a = facts.args
        int4 = Int4Slots.supports(facts.cluster_size, a.hidden_size, facts.ffn_dtype,
                                  a.intermediate_size)
        if compute == "nbits":
            from .nbits import available
            nb = nbits and int4 and available()
        else:
            nb = nbits and int4 and compute == "auto" and resident_kernel() == "ort-nbits"
        return cls(int4, _HAVE_INT8, nb)


@dataclass
class Unit:
    """Weights that stream together, in forward order."""
    layer: int | None = None                         # None: a slice of the head
    attn: dict[str, tuple] = field(default_factory=dict)  # module name -> (tensor name, shape)
    ffn: list[Key] = field(default_factory=list)     # cluster keys
    rows: tuple[int, int] | None = None              # head rows [lo, hi)


@dataclass(frozen=True)
class Layout:
    budget: Budget                 # RAM regions, what is pinned, hot/cold slot counts
    mode: str                      # "dense" | "gate" | "predictor" (tiered.py's docstring)
    int4: bool                     # FFN clusters (and q4k attention) on the int4 kernels
    nbits: bool                    # resident q4 weights on MatMulNBits (prepacked)
    thresholds: dict               # (layer, expert) -> profiled threshold, where they are used
    stream_attn: dict              # layer -> its attention projections that may stream
    head_streamable: bool
    head_slice_rows: int
    units: tuple[Unit, ...]        # what streams, in forward order
    unit_bytes: int                # one streamed unit's bytes (as the budget counts them)
    read_ahead: int                # units read ahead of the one in use
    # () -> every cluster in pinning order; asked only when used (`hot_order`): sparse modes
    # order by the profile's cluster frequencies
    order: Callable = field(repr=False, compare=False)
    vram: int = 0                  # bytes placed in VRAM: weights (float16) and their KV

    @cached_property
    def hot_order(self) -> tuple[Key, ...]:
        """Every cluster, in the order they are pinned."""
        return tuple(self.order())

    @property
    def pinned_gate(self) -> bool:
        """The gate is pinned only to pick neurons by; else slots hold gate rows too."""
        return self.mode == "gate"

    @property
    def row_parts(self) -> int:
        return 1 if self.pinned_gate else 2

    @property
    def slots_cls(self):
        return Int4Slots if self.int4 else Float32Slots

    @property
    def hot(self) -> frozenset:
        return frozenset(self.hot_order[:self.budget.hot_slots])

    def where(self, unit) -> str:
        """Where a unit lives: "ram" (pinned), "cache" (read into the cold LRU when used, kept
        while it is used) or "flash" (read every time it is used). unit: a cluster key
        (layer, expert, cluster), ("attn", layer) or "head"; or "vram" (the GPU's memory)."""
        b = self.budget
        if unit == "head":
            return "vram" if b.vram_head else "ram" if b.head_pinned else "flash"
        if unit[0] == "attn":
            return ("vram" if unit[1] in b.vram_layers else
                    "ram" if unit[1] in b.attn_pinned else "flash")
        if unit[:2] in b.vram_experts:
            return "vram"
        if unit in self.hot:
            return "ram"
        return "cache" if b.cold_slots else "flash"

    def computed_on(self, unit) -> str:
        """Where a unit is computed: next to its weights, "gpu" in VRAM, else "cpu"."""
        return "gpu" if self.where(unit) == "vram" else "cpu"


def place(facts: StoreFacts, cfg: TierConfig, caps: Capacities, kernels: Kernels) -> Layout:
    """Where every weight of the store lives for these settings and this room (see the
    module's docstring). Raises BudgetError (with the numbers) when even streaming does not
    fit, TiercacheError for settings the store cannot honour."""
    return _Placer(facts, cfg, caps, kernels).layout()


def sparsity_mode(facts: StoreFacts, cfg: TierConfig) -> str:
    """The FFN mode `place` decides ("dense" | "gate" | "predictor"), without a budget."""
    return _Placer(facts, cfg, Capacities(), Kernels()).mode


class _Placer:
    """One placement: `place`'s steps, each a method over the same inputs."""

    def __init__(self, facts: StoreFacts, cfg: TierConfig, caps: Capacities, kernels: Kernels):
        self.facts, self.cfg, self.caps = facts, cfg, caps
        self.args, self.tensors, self.profile = facts.args, facts.tensors, facts.profile
        self.context = context_limit(facts.args, cfg.context)
        self.n, self.d = facts.cluster_size, facts.args.hidden_size
        self.n_clusters = facts.n_clusters
        self.int4 = kernels.int4 and cfg.compute != "f32"  # q4k stores run the int4 kernel
        self.int8 = kernels.int8
        self.nbits = self.int4 and cfg.compute in ("auto", "nbits") and kernels.nbits
        self.slots_cls = Int4Slots if self.int4 else Float32Slots
        self.head_name = facts.head_name
        self._select_mode()
        self.vram_layers, self.vram_head, self.vram_experts, self.vram_used = self._vram_split()
        self.ram_layers = [l for l in range(facts.args.num_hidden_layers)
                           if l not in self.vram_layers]  # computed on the CPU
        self.ram_units = [(l, e) for l in range(facts.args.num_hidden_layers)
                          for e in range(facts.args.n_experts)
                          if (l, e) not in self.vram_experts]  # FFN units on the CPU

    def layout(self) -> Layout:
        budget = self._plan_budget(self.caps.runtime)
        layers, head, vram = self.vram_layers, self.vram_head, self.vram_used
        if layers or head:  # (nothing of theirs is packed for ORT in RAM: `_nbits_split`)
            budget = replace(budget, vram_layers=layers, vram_head=head,
                             vram_experts=self.vram_experts)
        attn, head_ok = self._streamable()
        return Layout(budget=budget, mode=self.mode, int4=self.int4,
                      nbits=bool(budget.nbits_layers), thresholds=self.thresholds,
                      stream_attn=attn, head_streamable=head_ok,
                      head_slice_rows=self._head_slice_rows(),
                      units=tuple(self._units(budget, attn)),
                      unit_bytes=budget.streaming // self._stream_units(),  # as counted
                      read_ahead=self.cfg.read_ahead, order=self._hotness_order, vram=vram)

    # -- the VRAM tier ------------------------------------------------------------------------
    def _vram_split(self) -> tuple[frozenset, bool, frozenset, int]:
        """-> (layers in VRAM, whether the head is, FFN units (layer, expert) in VRAM, bytes
        placed there), filling caps.vram less VRAM_SLACK: the head first (one large matrix,
        used every token); then a dense model's whole layers in order, an MoE model's layer
        trunks in order and, once every trunk is there, whole experts hottest first. Weights
        are float16 there, with each VRAM layer's KV cache (f16)."""
        room = self.caps.vram - VRAM_SLACK
        if self.caps.vram <= 0 or room <= 0:
            return frozenset(), False, frozenset(), 0
        a, used = self.args, 0
        head = 2 * math.prod(self.tensors[self.head_name]["shape"])
        on_head = head <= room
        if on_head:
            used = head
        expert = 2 * 3 * a.hidden_size * a.intermediate_size
        layers, units = [], []
        for l in range(a.num_hidden_layers):
            need = self._vram_trunk_bytes(l) + (0 if a.is_moe else expert)
            if used + need > room:
                break
            layers.append(l)
            used += need
            if not a.is_moe:
                units.append((l, 0))
        if a.is_moe and len(layers) == a.num_hidden_layers:
            for unit in self._expert_order():
                if used + expert > room:
                    break
                units.append(unit)
                used += expert
        return frozenset(layers), on_head, frozenset(units), used

    def _vram_trunk_bytes(self, layer: int) -> int:
        """A layer's own tensors (attention, norms, router) and KV cache, float16."""
        a, prefix = self.args, f"model.layers.{layer}."
        own = sum(math.prod(t["shape"]) for n, t in self.tensors.items() if n.startswith(prefix))
        kv = 2 * a.num_key_value_heads * a.head_dim * self.context
        return 2 * (own + kv)

    def _expert_order(self) -> list[tuple[int, int]]:
        """Every expert, hottest first: by the profile's routing (its clusters' mean
        frequency), else in layer order."""
        a = self.args
        units = [(l, e) for l in range(a.num_hidden_layers) for e in range(a.n_experts)]
        rows = (self.profile or {}).get("ffn")
        if not rows:
            return units
        def heat(u):
            freq = rows[u[0]][u[1]].get("cluster_freq") or [0.0]
            return -sum(freq) / len(freq)
        return sorted(units, key=heat)

    # -- sparsity mode ------------------------------------------------------------------------
    def _select_mode(self) -> None:
        """dense | gate | predictor (see tiered.py's docstring), and what follows: the gate
        is pinned only to pick neurons by; else slots hold gate rows with up and down."""
        cfg, prof = self.cfg, self.profile or {}
        self.thresholds = self._thresholds()
        pred = prof.get("predictor")
        if cfg.select == "predictor" and not pred:
            raise TiercacheError("this store has no activation predictors: `tiercache profile` "
                                 "trains them for ReLU-family models")
        use = (pred is not None and cfg.sparse is not False and cfg.select != "gate"
               and (cfg.sparse or cfg.select == "predictor"
                    or pred["clusters_predicted"] <= SPARSE_WORTH))
        if use:
            self.mode = "predictor"
            self.thresholds = {(l, e): ex["threshold"] for l, row in enumerate(prof["ffn"])
                               for e, ex in enumerate(row)}
        else:
            self.mode = "gate" if self.thresholds else "dense"
        self.pinned_gate = self.mode == "gate"
        self.row_parts = 1 if self.pinned_gate else 2

    def _thresholds(self) -> dict[tuple[int, int], float]:
        """Profiled thresholds, when skipping by them saves reads: a cluster is read if any of
        its neurons is active, and with SiLU models nearly every cluster is (SmolLM2: ~99%)."""
        if self.cfg.sparse is False or not self.profile:
            return {}
        rows = [ex.get("cluster_active", [0.0]) for row in self.profile["ffn"] for ex in row]
        mean_active = sum(map(sum, rows)) / max(1, sum(map(len, rows)))
        if self.cfg.sparse is None and mean_active > SPARSE_WORTH:
            return {}
        return {(l, e): ex["threshold"] for l, row in enumerate(self.profile["ffn"])
                for e, ex in enumerate(row)}

    # -- what is pinned and what streams ----------------------------------------------------
    def _streamable(self) -> tuple[dict[int, list[str]], bool]:
        """-> (layer -> its attention projections that can stream, whether the head can).
        Streaming beyond FFN clusters needs kernel-layout records (q4k, q8r) and dense mode."""
        if not (self.int4 and self.mode == "dense"):
            return {}, False
        attn: dict[int, list[str]] = {}
        for name, t in self.tensors.items():
            if t["dtype"] == "q4k" and ".self_attn." in name:
                layer = int(name.split(".")[2])
                if layer not in self.vram_layers:
                    attn.setdefault(layer, []).append(name)
        return attn, self.tensors[self.head_name]["dtype"] == "q8r" and self.int8

    def _plan_budget(self, runtime: int) -> Budget:
        """Regions for cfg. With a RAM budget: pin everything that fits; else pin attention
        first, then the head, then the hottest FFN clusters, and stream the rest (what is
        left over goes to smaller items). In dense mode every streamed byte is read once per
        token whichever weight it is, so the order only keeps the streaming path simple.
        Refuses (BudgetError, with the numbers) when even streaming does not fit."""
        a, cfg, ram = self.args, self.cfg, self.caps.ram
        total = len(self.ram_units) * self.n_clusters
        slot, gates, kv = self._slot_bytes(), self._gate_bytes(), self._kv_bytes()
        in_vram = tuple(f"model.layers.{l}." for l in self.vram_layers)
        sizes = {n: _ram_bytes(t, self.int4) for n, t in self.tensors.items()
                 if not n.startswith(in_vram)}
        if a.tie_word_embeddings and self.int4:
            sizes.pop("lm_head.weight", None)  # the head is the embedding's bytes
        if self.vram_head and not a.tie_word_embeddings:
            sizes[self.head_name] = 0  # (a tied one stays in RAM: it is the embedding too)
        attn, head_ok = self._streamable()
        attn_bytes = {l: sum(sizes[n] for n in names) for l, names in attn.items()}
        head = sizes[self.head_name]
        fixed = sum(sizes.values()) - sum(attn_bytes.values()) - head
        slack = slack_bytes(a)
        base = dict(runtime=runtime, fixed=fixed, gates=gates, kv=kv, slack=slack, slot_bytes=slot)
        everything = dict(attention=sum(attn_bytes.values()), head=head,
                          attn_pinned=frozenset(range(a.num_hidden_layers)), head_pinned=True)
        if cfg.hot_clusters is not None or cfg.cold_clusters is not None:
            hot, cold = cfg.hot_clusters or 0, cfg.cold_clusters or 0
        elif cfg.hot_bytes is not None or cfg.cold_bytes is not None:
            hot, cold = (cfg.hot_bytes or 0) // slot, (cfg.cold_bytes or 0) // slot
        elif ram is None:
            return Budget(**base, **everything, streaming=0, hot_slots=total, cold_slots=0,
                          **self._nbits_split(None, attn_bytes, head, slot))
        else:
            room = ram - (runtime + fixed + gates + kv + slack)
            resident = sum(attn_bytes.values()) + total * slot
            if room >= head + resident:
                return Budget(**base, **everything, streaming=0, hot_slots=total, cold_slots=0,
                              **self._nbits_split(room - head - resident, attn_bytes, head,
                                                  slot))
            if self.mode != "dense":  # gates or predictors pick clusters, a cold LRU holds misses
                room -= head + sum(attn_bytes.values())
                hot, cold = _split_slots(max(0, room // slot), total, self.n_clusters,
                                         have_profile=self.profile is not None)
                b = Budget(**base, **everything, streaming=0, hot_slots=hot, cold_slots=cold)
                if cold < self.n_clusters and hot < total:
                    self._refuse(b, "one layer's clusters in the cold region",
                                 self.n_clusters * slot - min(room, cold * slot))
                return b
            return self._dense_budget(base, room, attn_bytes, head, head_ok, total)
        if self.mode == "dense":  # every cluster is used every token: an LRU would only cycle
            hot, cold = hot + cold, 0
        hot = min(hot, total)
        n_att = a.num_hidden_layers if cfg.pin_attention is None else cfg.pin_attention
        pinned = frozenset(l for l in range(a.num_hidden_layers) if l < n_att or l not in attn)
        head_pinned = cfg.pin_head is not False or not head_ok
        streams = (hot < total and self.mode == "dense" or len(pinned) < a.num_hidden_layers
                   or not head_pinned)
        stream = self._stream_bytes(self._unit_max(max(attn_bytes.values(), default=0), head_ok)) if streams else 0
        b = Budget(**base, attention=sum(attn_bytes.get(l, 0) for l in pinned),
                   head=head if head_pinned else 0, attn_pinned=pinned, head_pinned=head_pinned,
                   streaming=stream, hot_slots=hot, cold_slots=cold,
                   experts=(cfg.expert_cache_bytes or 0) if a.is_moe else 0)
        if ram is not None and b.total > ram:  # regions as a plan gave them
            self._refuse(b, "regions as the plan gives them", b.total - ram)
        return b

    def _nbits_split(self, spare: int | None, attn_bytes: dict, head: int, slot: int) -> dict:
        """With every weight resident and `spare` bytes beyond them (None: no limit): the
        layers (in order) whose attention and FFN, and whether the head, go on MatMulNBits,
        and the prepacked bytes that takes (Budget fields). A layer's ~0.5x of its bytes buys
        ~2.5x torch's int4 rate on its ~6% of the token's time; the head (~1.5x its int8
        kernel) comes after every layer. Every other budget leaves them off: with a part
        streamed, the RAM they take is worth more as pinned weights. An MoE layer counts as
        a dense one: all its experts go in one ORT session (nbits.NBitsTail; the synthetic
        Mixtral with 3 of 16 layers so ran at a 1300 MiB cap, 11-12 tok/s against ~9 on
        torch's kernels alone). (The planner models kernels without `nbits`.)"""
        if not getattr(self, "nbits", False):
            return {}
        records, a = self.facts.records, self.args
        layer = sum(records[cluster_key(0, 0, c).decode()][0] for c in range(self.n_clusters))
        fixed = max(NBITS_WORKSPACE, NBITS_BUILD * layer)  # the load's transient is gone
        left = None if spare is None else spare - fixed     # before a run leaves its heap
        per_layer = a.n_experts * self.n_clusters * slot
        chosen, extra = [], fixed
        for l in self.ram_layers:
            cost = int((attn_bytes.get(l, 0) + per_layer) * NBITS_EXTRA)
            if left is not None and cost > left:
                break
            chosen.append(l)
            extra += cost
            left = None if left is None else left - cost
        cost = int(head * NBITS_EXTRA)
        on_head = (len(chosen) == len(self.ram_layers) and not self.vram_head
                   and (left is None or cost <= left))
        if not chosen:
            return {}
        return dict(prepacked=extra + (cost if on_head else 0), nbits_layers=frozenset(chosen),
                    nbits_head=on_head)

    def _dense_budget(self, base, room, attn_bytes, head, head_ok, total) -> Budget:
        stream = self._stream_bytes(self._unit_max(max(attn_bytes.values(), default=0), head_ok))
        room -= stream
        pinned, att = set(), 0
        for l in range(self.args.num_hidden_layers):
            if attn_bytes.get(l, 0) <= room - att or l not in attn_bytes:
                pinned.add(l)
                att += attn_bytes.get(l, 0)
            else:
                break
        room -= att
        head_pinned = head <= room or not head_ok
        room -= head if head_pinned else 0
        hot = max(0, min(total, room // base["slot_bytes"]))
        experts = 0
        if self.args.is_moe:  # whole experts in the expert cache, not clusters pinned in order
            hot, experts = 0, max(0, room)
        b = Budget(**base, attention=att, head=head if head_pinned else 0, streaming=stream,
                   hot_slots=hot, cold_slots=0, attn_pinned=frozenset(pinned),
                   head_pinned=head_pinned, experts=experts)
        if room < 0:
            self._refuse(b, "", -room)
        return b

    def _refuse(self, b: Budget, what: str, short: int) -> None:
        detail = ", ".join(f"{k} {_mb(v)}" for k, v in b.lines().items() if v)
        # a smaller KV cache alone may be enough (the default context is 2048 tokens)
        per_step = self._kv_bytes_for(KVCache.step)
        steps = (b.kv - short) // per_step if per_step else 0
        fits = f"; --context {steps * KVCache.step} would fit" if steps > 0 else ""
        raise BudgetError(f"RAM budget {_mb(self.caps.ram)} is too small: it needs at least "
                          f"{_mb(self.caps.ram + short)} ({detail}"
                          + (f"; {what}" if what else "") + ")" + fits)

    def _unit_max(self, attn_layer: int, head_ok: bool) -> int:
        """Bytes of the largest unit that may stream: a layer's attention and clusters (as
        read, and as joined for the kernel), or a slice of the head."""
        records = self.facts.records
        layer = sum(records[cluster_key(0, 0, c).decode()][0] for c in range(self.n_clusters))
        return max(layer + attn_layer, self._head_slice_rows() * self.d if head_ok else 0)

    def _head_slice_rows(self) -> int:
        rows = self.tensors[self.head_name]["shape"][0]
        return min(rows, max(64, HEAD_SLICE // self.d // 64 * 64))

    def _stream_bytes(self, unit: int) -> int:
        """Units in use and read ahead (copied out, ready for the kernels), and one read buffer
        per I/O thread. MoE: a layer's k routed experts, and k more for the next layer."""
        return self._stream_units() * unit

    def _stream_units(self) -> int:
        ahead = self.cfg.prefetch_layers if self.cfg.prefetch else 0
        if self.args.is_moe:
            return self.args.num_experts_per_tok * (2 if ahead else 1) + self.cfg.io_threads
        return 1 + ahead + self.cfg.io_threads

    def _slot_bytes(self) -> int:
        return self.slots_cls.slot_bytes(self.n, self.d, self.row_parts)

    def _gate_bytes(self) -> int:
        """What picks neurons: the pinned gates, or the predictors."""
        a = self.args
        units = len(self.ram_units)
        per_neuron = 4 * a.intermediate_size if "criterion" in (self.profile or {}) else 0
        if self.mode == "predictor":
            one = record_bytes(self.d, a.intermediate_size, self.profile["predictor"]["rank"])
            return (one + per_neuron) * units
        if not self.pinned_gate:
            return 0
        one = (a.intermediate_size * self.d // 2 + a.intermediate_size * self.d // 8
               if self.int4 else a.intermediate_size * self.d * 4)
        return (one + per_neuron) * units

    def _kv_bytes(self) -> int:
        positions = capacity(self.context)  # it grows in steps
        return self._kv_bytes_for(positions)

    def _kv_bytes_for(self, positions: int) -> int:
        """The RAM layers' KV cache (the VRAM layers' is in VRAM)."""
        if not self.ram_layers:
            return 0
        return kv_bytes(replace(self.args, num_hidden_layers=len(self.ram_layers)), positions,
                        self.cfg.kv)

    def _hotness_order(self) -> list[Key]:
        """All clusters in the order they are pinned. Dense (every cluster computed every
        token): whole layers, spread out (`spread_layers`), so that a streamed layer is one
        read and one block, read while pinned layers compute; pinning the most frequent
        clusters instead left every layer with a pinned and a streamed part (30 small units,
        two blocks a layer), ~1.5x slower at the same bytes per token. Sparse or MoE: most
        frequently active first (profile order; else layer order)."""
        a, ram = self.args, self.ram_layers  # the VRAM layers' clusters are not RAM's
        if self.mode == "dense" and not a.is_moe:
            return [(ram[i], 0, c) for i in spread_layers(len(ram))
                    for c in range(self.n_clusters)]
        keys = [(l, e, c) for l, e in self.ram_units for c in range(self.n_clusters)]
        if not self.profile:
            return keys
        freq = {(l, e, c): f for l, row in enumerate(self.profile["ffn"])
                for e, ex in enumerate(row) for c, f in enumerate(ex["cluster_freq"])}
        return sorted(keys, key=lambda k: -freq[k])

    def _units(self, b: Budget, attn: dict) -> list[Unit]:
        """Units in forward order: each layer's streamed attention and (dense, not MoE) FFN
        clusters, then the head's rows in slices."""
        a = self.args
        dense = self.mode == "dense" and not a.is_moe
        hot = set(self._hotness_order()[:b.hot_slots]) if dense else set()
        units = []
        for l in range(a.num_hidden_layers):
            if l in b.vram_layers:  # read once, at load, into VRAM
                continue
            u = Unit(layer=l)
            if l not in b.attn_pinned:
                for name in attn.get(l, []):
                    u.attn[name.split(".")[-2]] = (name, self.tensors[name]["shape"])
            if dense:
                u.ffn = [(l, 0, c) for c in range(self.n_clusters) if (l, 0, c) not in hot]
            if u.attn or u.ffn:
                units.append(u)
        if not b.head_pinned and not b.vram_head:
            rows, step = self.tensors[self.head_name]["shape"][0], self._head_slice_rows()
            units += [Unit(rows=(lo, min(rows, lo + step))) for lo in range(0, rows, step)]
        return units


def slack_bytes(args) -> int:
    """Working space beyond the KV cache and streaming buffers: a PREFILL_CHUNK-token chunk's
    activations (~32 B per FFN neuron and token: gate, up, their product, bf16 copies for the
    int4 kernel; ~64 B per hidden unit for attention and the residual) over 16 MiB of
    allocator slop. The fixed 16 MiB, measured on SmolLM2 (F 1536), left the 1B shape (F 8192)
    ~32 MiB of anonymous memory past its budget: OOM-killed at a cap of 800 MiB."""
    ffn = args.intermediate_size * max(1, args.num_experts_per_tok)
    return SLACK + PREFILL_CHUNK * (32 * ffn + 64 * args.hidden_size)


def spread_layers(n: int) -> list[int]:
    """0..n-1 ordered so that every prefix is spread evenly over the layers (van der Corput
    order): whatever count is pinned, the streamed layers between them are spread too."""
    order, seen, j = [], set(), 0
    while len(order) < n:
        x, f, k = 0.0, 0.5, j
        while k:
            x, f, k = x + f * (k & 1), f / 2, k >> 1
        l = int(x * n)
        if l not in seen:
            seen.add(l)
            order.append(l)
        j += 1
    return order


def _ram_bytes(meta: dict, int4: bool) -> int:
    """Bytes a pinned tensor takes in RAM: int4/int8 kernels keep q4k/q8r as stored, and
    q4/q8 about so; everything else is decoded to float32."""
    if int4 and meta["dtype"] in ("q4", "q4k", "q8r"):
        return quant.nbytes(meta["shape"], meta["dtype"])
    if int4 and meta["dtype"] == "q8":
        return math.prod(meta["shape"]) + 2 * meta["shape"][0]
    return 4 * math.prod(meta["shape"])


def _split_slots(slots: int, total: int, per_layer: int, have_profile: bool,
                 stream: bool = False) -> tuple[int, int]:
    """-> (hot, cold). Everything fits, or the rest is streamed: all hot. Else keep two layers'
    worth of cold slots (one in use, one being read ahead) and pin the rest by frequency; with
    no profile, a plain LRU."""
    if slots >= total or stream:
        return min(slots, total), 0
    if not have_profile:
        return 0, slots
    cold = min(slots, max(2 * per_layer, slots // 8))
    return slots - cold, cold


def _mb(n) -> str:
    return "unlimited" if n is None else f"{n / MB:.0f} MiB"
