"""The tiered engine's own memory accounting, as pure functions of a store manifest.

The engine decides at load time what it pins and streams inside `--ram` by calling
`tiercache.engine.layout.place`; a plan that asks for more than that is refused, one that asks
for less leaves memory unused. So the planner calls the same function (with the engine's
constants FILE_RESERVE, SLACK, SPARSE_WORTH from there). The one figure the engine measures
instead of computing, its process's anonymous memory before loading, comes from the device
profile (`runtime_anon`) plus the tokenizer.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from tiercache.config import ModelArgs
from tiercache.engine import layout as _layout
from tiercache.engine.layout import (Capacities, Kernels, StoreFacts, TierConfig, place,
                                     sparsity_mode)
from tiercache.engine.slots import Float32Slots, Int4Slots
from tiercache.store import quant

FILE_RESERVE = _layout.FILE_RESERVE
SLACK = _layout.SLACK
SPARSE_WORTH = _layout.SPARSE_WORTH
# RssAnon a loaded HF `tokenizers` tokenizer adds per vocabulary entry, on top of a runtime that
# has set up a model (SmolLM2's 49,152 entries: +15 MiB after malloc_trim, measured on the
# reference VM once the set-up stopped importing sympy; 240 before). The engine loads it before
# it measures its runtime.
TOKENIZER_BYTES_PER_TOKEN = 300
# File-backed pages (torch's and Python's code) that decoding keeps using beyond the engine's
# FILE_RESERVE, planned as memory. 16 MiB were planned (2026-11-21) after runs at the budget
# decoded at ~4 tok/s on code-page faults, while the disk's read_ahead_kb was 8192 (each fault
# read 8 MiB around it); with 128 the engine's own FILE_RESERVE holds at every cap measured
# (2026-11-22: 231-302 MiB caps at 14-28 tok/s), so plans now count what the engine counts.
FILE_EXTRA = 0
# reads are coalesced: records closer than this in the file go in one read (RecordReader)
READ_GAP = 64 << 10


def dense_mode(manifest: dict) -> bool:
    """Whether the engine streams gate|up|down of every cluster (no thresholds to skip by, or
    they leave more than SPARSE_WORTH of the clusters active per token): `layout`'s own
    decision, for the sparse decode plans model (pinned gates, as config_from_plan asks)."""
    return sparsity_mode(StoreFacts.from_manifest(manifest), TierConfig(select="gate")) == "dense"


@dataclass(frozen=True)
class Holding:
    """How the engine will hold one store (`layout.place` for the planner's configurations):
    what it pins, each slot's size, its hot order; with `vram`, which layers (and whether the
    head) the engine puts in VRAM first, the rest (what this class counts) on the CPU."""
    manifest: dict
    int4: bool  # FFN and attention on the int4 kernel (q4k stores, compute auto)
    int8: bool = False  # torch's int8 kernel here (a streamed q8r head)
    vram: int = 0  # bytes for the VRAM tier (TierConfig.vram_bytes); 0: none
    context: int = 2048  # the split counts each VRAM layer's KV cache for this context

    @cached_property
    def args(self) -> ModelArgs:
        return ModelArgs.from_dict(self.manifest["config"])

    @property
    def ffn(self) -> dict:
        return self.manifest["ffn"]

    @property
    def n(self) -> int:
        return int(self.ffn["cluster_size"])

    @property
    def n_clusters(self) -> int:
        return -(-self.args.intermediate_size // self.n)

    @property
    def total(self) -> int:
        """FFN clusters on the CPU (the VRAM layers' are not the engine's regions')."""
        return len(self.hot_order)

    @property
    def vram_layers(self) -> frozenset:
        return self._placed.budget.vram_layers

    @property
    def vram_head(self) -> bool:
        return self._placed.budget.vram_head

    @property
    def vram_experts(self) -> frozenset:
        """FFN units (layer, expert) in VRAM (a dense VRAM layer's (l, 0))."""
        return self._placed.budget.vram_experts

    @property
    def vram_bytes(self) -> int:
        """What the VRAM tier holds: float16 weights and the VRAM layers' KV cache."""
        return self._placed.vram

    @cached_property
    def dense(self) -> bool:
        return dense_mode(self.manifest)

    @property
    def row_parts(self) -> int:
        return 2 if self.dense else 1

    @property
    def slot(self) -> int:
        cls = Int4Slots if self.int4 else Float32Slots
        return cls.slot_bytes(self.n, self.args.hidden_size, self.row_parts)

    @property
    def record(self) -> int:
        """Bytes one cluster record reads (gate | up | down, as stored)."""
        return 3 * quant.nbytes((self.n, self.args.hidden_size), self.ffn["dtype"])

    # -- the engine's own budget ----------------------------------------------------------------
    def budget(self, runtime: int, context: int, hot: int | None = None, cold: int = 0,
               prefetch_layers: int = 2, io_threads: int = 2, ram: int | None = None,
               pin_attention: int | None = None, pin_head: bool | None = None,
               experts: int = 0):
        """The engine's Budget (`layout.place`) for a plan of `hot` + `cold` clusters,
        the first `pin_attention` layers' attention and (pin_head) the head pinned, and (MoE)
        `experts` bytes of whole experts in its expert cache, or, with hot None, for
        `--ram ram` alone; raises BudgetError as the engine would.
        `runtime`: the process's anonymous memory before any weight (the engine measures it)."""
        cfg = TierConfig(ram_bytes=ram, hot_clusters=hot,
                                 cold_clusters=None if hot is None else cold,
                                 io_threads=io_threads, prefetch=prefetch_layers > 0,
                                 prefetch_layers=max(1, prefetch_layers), context=context,
                                 pin_attention=pin_attention, pin_head=pin_head,
                                 compute="auto" if self.int4 else "f32", select="gate",
                                 expert_cache_bytes=experts or None)
        if self.vram and context != self.context:  # the VRAM split is this Holding's
            raise ValueError(f"a Holding for context {self.context} asked for {context}")
        key = (runtime, context, cold, prefetch_layers, io_threads, ram, pin_attention, pin_head,
               experts)
        if (self.dense and ram is None and cold == 0 and hot is not None and 0 < hot < self.total
                and not experts):
            # below all of them the engine's regions differ only by the pinned slots: derive
            # them from its count for none (tests check this against the engine's own)
            zero = self.budget(runtime, context, 0, 0, prefetch_layers, io_threads, None,
                               pin_attention, pin_head)
            return dataclasses.replace(zero, hot_slots=hot)
        if (hot, key) not in self._memo:
            caps = Capacities(runtime=runtime + FILE_RESERVE, ram=ram, vram=self.vram)
            self._memo[(hot, key)] = place(self.facts, cfg, caps, self.kernels).budget
        return self._memo[(hot, key)]

    @cached_property
    def _memo(self) -> dict:
        return {}

    @cached_property
    def facts(self) -> StoreFacts:
        return StoreFacts.from_manifest(self.manifest)

    @property
    def kernels(self) -> Kernels:
        # the planner does not model MatMulNBits's prepacked copies (nbits off)
        return Kernels(int4=self.int4, int8=self.int8)

    @cached_property
    def _placed(self):
        """The layout with every weight resident: what does not depend on the budget (hot
        order, what may stream). Plans model sparse decode with pinned gates
        (config_from_plan asks the engine so)."""
        cfg = TierConfig(compute="auto" if self.int4 else "f32", select="gate",
                         context=self.context)
        return place(self.facts, cfg, Capacities(vram=self.vram), self.kernels)

    def regions(self, runtime: int, context: int, hot: int, cold: int,
                prefetch_layers: int, io_threads: int = 2, pin_attention: int | None = None,
                pin_head: bool | None = None, experts: int = 0) -> dict:
        """What the engine counts against --ram for a plan (its Budget's lines)."""
        return dict(self.budget(runtime, context, hot, cold, prefetch_layers, io_threads,
                                pin_attention=pin_attention, pin_head=pin_head,
                                experts=experts).lines())

    @property
    def expert_bytes(self) -> int:
        """One whole expert's records, as stored (what a miss of the expert cache reads)."""
        return self.n_clusters * self.record

    def max_hot(self, ram: int, runtime: int, context: int, prefetch_layers: int,
                io_threads: int = 2, pin_attention: int | None = None,
                pin_head: bool | None = None) -> int:
        """The most clusters a plan may pin inside `ram` (everything else as given), or -1."""
        def total(h):
            return self.budget(runtime, context, h, 0, prefetch_layers, io_threads,
                               pin_attention=pin_attention, pin_head=pin_head).total
        if total(self.total) <= ram:
            return self.total
        # below all of them something streams, its buffers fixed: each cluster adds its slot
        base = total(0)
        if base > ram:
            return -1
        most = min(self.total - 1, (ram - base) // self.slot)
        while most > 0 and total(most) > ram:  # (never taken while the engine counts so)
            most -= 1
        return int(most)

    # -- what streams ---------------------------------------------------------------------------
    @cached_property
    def hot_order(self) -> np.ndarray:
        """Cluster ids ((layer * experts + expert) * n_clusters + c) in the order the engine
        pins them (its `_hotness_order`: whole layers, spread out, in dense mode)."""
        e, c = self.args.n_experts, self.n_clusters
        return np.asarray([(l * e + x) * c + k for l, x, k in self._placed.hot_order],
                          dtype=np.int64)

    @cached_property
    def streamable(self) -> tuple[dict, int, int]:
        """What may stream besides FFN clusters, as the engine decides it (`place`):
        ({layer: its attention's stored bytes}, the head's row bytes or 0, rows per head
        slice). Stored and held bytes are equal: q4k and q8r run as stored; a streamed head
        reads its int8 rows, its row scales stay pinned. VRAM layers and a head in VRAM are
        read once, at load."""
        lay = self._placed
        attn, head_ok = lay.stream_attn, lay.head_streamable and not self.vram_head
        t = self.manifest["tensors"]
        layers = {l: sum(quant.nbytes(t[n]["shape"], t[n]["dtype"]) for n in names)
                  for l, names in attn.items()}
        rows, d = t[self.facts.head_name]["shape"]
        return layers, rows * d if head_ok else 0, lay.head_slice_rows if head_ok else 0

    def streamed(self, hot: int, pin_attention: int | None = None,
                 pin_head: bool | None = None) -> dict:
        """Per token in dense mode with the `hot` most active clusters, the first
        `pin_attention` layers' attention and (pin_head) the head pinned: the units that
        stream (layers, head slices) and their reads (runs of neighbouring records, read as
        one; a layer's attention projections lie together in the store, one run)."""
        key = ("streamed", hot, pin_attention, pin_head)
        if key not in self._memo:
            self._memo[key] = self._streamed(hot, pin_attention, pin_head)
        return self._memo[key]

    def _streamed(self, hot: int, pin_attention: int | None, pin_head: bool | None) -> dict:
        rest = np.sort(self.hot_order[min(hot, self.total):])
        unit = rest // self.n_clusters
        # a new read where the unit changes or a pinned record (> READ_GAP) sits in between
        gap = self.record if self.record > READ_GAP else 0
        breaks = np.flatnonzero((np.diff(unit) != 0) | ((np.diff(rest) > 1) & (gap > 0))) + 1
        ffn_runs = (np.diff(np.concatenate([[0], breaks, [len(rest)]])) * self.record).tolist() \
            if len(rest) else []
        attn, head, step = self.streamable
        n_att = self.args.num_hidden_layers if pin_attention is None else pin_attention
        attn_runs = {l: nb for l, nb in attn.items() if l >= n_att}
        rows = self.args.vocab_size
        head_runs = [(min(rows, lo + step) - lo) * self.args.hidden_size
                     for lo in range(0, rows, step)] if head and pin_head is False else []
        layers = set(np.unique(unit // self.args.n_experts).tolist()) | set(attn_runs)
        runs = ffn_runs + list(attn_runs.values()) + head_runs
        return {"clusters": int(len(rest)), "layers": len(layers),
                "attn_layers": len(attn_runs), "head_slices": len(head_runs),
                "units": len(layers) + len(head_runs), "reads": len(runs),
                "bytes": int(sum(runs)), "ffn_bytes": int(len(rest) * self.record),
                "attn_bytes": int(sum(attn_runs.values())), "head_bytes": int(sum(head_runs)),
                "runs": runs}


def plan_budget(manifest: dict, cfg: TierConfig, runtime: int):
    """The engine's regions for TierConfig `cfg` on a store (or an estimate of one) given
    only its manifest, with the process's measured `runtime` (anonymous memory before any
    weight, plus FILE_RESERVE) supplied: `layout.place`, as the engine calls it, nothing
    loaded (MatMulNBits's prepacked copies not modelled). Raises BudgetError as the engine
    would."""
    hold = layout_of(manifest, cfg.compute)
    caps = Capacities(runtime=runtime, ram=cfg.ram_bytes, vram=cfg.vram_bytes or 0)
    return place(hold.facts, cfg, caps, hold.kernels).budget


def layout_of(manifest: dict, compute: str = "auto", vram: int = 0,
              context: int = 2048) -> Holding:
    """How the engine holds a store (or an estimate of one), with this machine's kernels;
    `vram`: what the engine is given for its VRAM tier, its layers' KV sized for `context`."""
    from tiercache.engine.kernels import _HAVE_INT8
    a = ModelArgs.from_dict(manifest["config"])
    n = int(manifest["ffn"]["cluster_size"])
    fast = Int4Slots.supports(n, a.hidden_size, manifest["ffn"]["dtype"], a.intermediate_size)
    return Holding(manifest, fast and compute != "f32", _HAVE_INT8, vram, context)
