"""FFN clusters: the hot blocks, the cold pool with its cache, the reads of misses and the read
ahead, and the counters of all of it (one owner). The model's FFN modules hold this object
through a narrow protocol (`ClusterSource`, `ExpertSource`), never the engine.

How a layer's FFN picks its neurons (the layout's `mode`; tiered.py's docstring says more):
gate (pinned gate + thresholds), predictor (activation predictors), dense (every cluster).
"""
from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import nn

from ..cache.experts import ReadAheadStats, expert_cache, report as experts_report
from ..cache.segmented import SegmentedCache
from ..errors import BudgetError, StoreError
from ..memory import return_large_frees
from ..models.llama import ACTS, MoE
from ..store import quant
from ..store.format import cluster_key, predictor_key, threshold_key
from . import experts as moe_experts
from .layout import Layout
from .nbits import NBitsBlock, NBitsFFN, NBitsTail, join, weight
from .predictor import Predictor
from .slots import Block, Float32Slots


class ClusterSource(Protocol):
    def ffn(self, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
        """x [T, d] -> [T, d] through one layer's (or expert's) clusters."""


class ExpertSource(ClusterSource, Protocol):
    def routed(self, layer: int, experts: list[int], x: torch.Tensor,
               route_next: Callable | None, tokens: list[int] | None = None) -> None:
        """A layer's routed experts are known (read them; ahead, those `route_next` picks);
        tokens: how many of x's rows each expert takes."""


class TieredMLP(nn.Module):
    def __init__(self, source: ClusterSource, layer: int, expert: int):
        super().__init__()
        self.source, self.layer, self.expert = source, layer, expert

    def forward(self, x):
        shape = x.shape
        return self.source.ffn(self.layer, self.expert, x.reshape(-1, shape[-1])).view(shape)


class TieredMoE(MoE):
    """Mixtral's block with tiered experts: once routed, the source reads every routed expert
    at once and, at decode, the experts the next layer's router (`route_next`) picks from this
    layer's input (`ClusterFFN.routed`)."""

    def __init__(self, source: ExpertSource, layer: int, moe: MoE):
        nn.Module.__init__(self)
        self.top_k, self.gate = moe.top_k, moe.gate
        self.experts = nn.ModuleList(TieredMLP(source, layer, e) for e in range(len(moe.experts)))
        self.source, self.layer = source, layer
        self.route_next: Callable | None = None  # the next layer's router, where there is one

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        w, idx = self.route(x)
        if x.shape[0] == 1:  # decode: k distinct experts on the one row, no gather or scatter
            ids, ws = idx[0].tolist(), w[0]
            self.source.routed(self.layer, ids, x, self.route_next,
                               rows_per_expert(ids, len(self.experts)))
            out = self.experts[ids[0]](x) * ws[0]
            for i in range(1, len(ids)):
                out = out + self.experts[ids[i]](x) * ws[i]
            return out.view(shape)
        tokens = torch.bincount(idx.flatten(), minlength=len(self.experts)).tolist()
        self.source.routed(self.layer, idx.unique().tolist(), x, self.route_next, tokens)
        out = torch.zeros_like(x)
        for e in idx.unique().tolist():
            rows, slot = (idx == e).nonzero(as_tuple=True)
            out.index_add_(0, rows, self.experts[e](x[rows]) * w[rows, slot, None])
        return out.view(shape)


def rows_per_expert(ids: list[int], n: int) -> list[int]:
    """Rows per expert when one row routes to `ids` (what torch.bincount counts)."""
    tokens = [0] * n
    for e in ids:
        tokens[e] += 1
    return tokens


class TieredTail(nn.Module):
    """A layer after attention's heads in one fused kernel (nbits.NBitsTail: o_proj, residual,
    norm, FFN or MoE, residual); the source counts its uses (`tail_used`)."""

    def __init__(self, source, layer: int, kernel: NBitsTail):
        super().__init__()
        self.source, self.layer, self.kernel = source, layer, kernel

    def forward(self, a, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        out = self.kernel(a.reshape(x.shape[0], -1), x)
        self.source.tail_used(self.layer, out[1] if len(out) > 1 else None, x)
        return out[0].view(shape)


def record_parts(cluster_parts, buf, c: int):
    """A record (bytes or a uint8 tensor) -> [(shape, slice)] of gate, up and down."""
    mv = buf if isinstance(buf, torch.Tensor) else memoryview(buf)
    return [(s, mv[o:o + nb]) for s, o, nb in cluster_parts(c)]


@dataclass(frozen=True)
class Joiner:
    """Streamed cluster records (read buffers) -> one Block, copied out of the buffers."""
    cluster_parts: Callable  # Store.cluster_parts
    n: int
    d: int
    dtype: str
    int4: bool

    def __call__(self, keys, bufs) -> Block:
        if self.int4:
            return Block.joined(bufs, self.cluster_parts(0), self.n, self.d)
        parts = [record_parts(self.cluster_parts, buf, key[2]) for key, buf in zip(keys, bufs)]
        return Block(Float32Slots, [tuple(quant.decode(b, s, self.dtype) for s, b in p)
                                    for p in parts])


class ClusterFFN:
    """The FFN clusters of every layer as the layout places them (a ClusterSource and an
    ExpertSource). `load` reads them once; `ffn` computes a layer from them."""

    def __init__(self, layout: Layout, store, reader, streamer, join: Joiner, prefetch: bool,
                 expert_policy: str | None = None, expert_cut: float = 0.0):
        self.layout, self.store, self.reader, self.streamer = layout, store, reader, streamer
        self.join_clusters, self.prefetch = join, prefetch
        self.expert_policy, self.expert_cut = expert_policy, expert_cut
        self.expert_cache, self.ahead = None, None  # MoE: made by `load` (`_experts`)
        self.args = a = store.args
        self.act = ACTS[a.hidden_act]
        self.n, self.d, self.n_clusters = store.cluster_size, a.hidden_size, store.n_clusters
        self.mode, self.pinned_gate = layout.mode, layout.pinned_gate
        self.slots_cls = layout.slots_cls
        self.thresholds = dict(layout.thresholds)
        self.inflight: dict[tuple, Future] = {}
        self.last_active: dict[tuple[int, int], list[int]] = {}
        self.gates: dict[tuple[int, int], object] = {}
        self.hot: dict[tuple[int, int], tuple] = {}  # (layer, expert) -> (Block, clusters, neurons)
        self.predictors: dict[tuple[int, int], Predictor] = {}
        b = layout.budget
        self.cache = SegmentedCache(b.slot_bytes, b.hot_slots, b.cold_slots)
        self.reset_stats()

    # -- loading --------------------------------------------------------------------------
    def load(self, norms: dict[int, tuple] | None = None,
             tails: dict[int, dict] | None = None) -> None:
        """The cold pool, then predictors, per-neuron thresholds, gates and the hot clusters,
        read once. norms: layer -> the RMSNorm before its FFN, which a whole FFN on ORT
        computes in its own call (those layers end up in `folded_norms`). tails: layer -> the
        rest of its NBitsTail (o_proj, norm, router, bias), for whole layers resident on
        MatMulNBits: their FFN is built into it (`self.tails`, as TieredTail computes it)."""
        self.norms, self.folded_norms = norms or {}, set()
        self.tail_parts, self.tails = tails or {}, {}
        b = self.layout.budget
        self.pool = self.slots_cls(b.cold_slots, self.n, self.d, self.store.ffn_dtype,
                                   self.layout.row_parts)
        self.predictors = self._load_predictors()
        self._load_thresholds()
        self._load_ffn()
        self.expert_cache, self.ahead = self._experts()

    def _load_thresholds(self) -> None:
        """Per-neuron thresholds where the profile wrote them (its `criterion`): the layer's
        threshold is then on |act| weighed by each neuron's scale, i.e. t / s_i on |act|."""
        if "criterion" not in (self.store.manifest.get("profile") or {}):
            return  # an older profile: one threshold on |act| per layer
        f = self.args.intermediate_size
        for key in list(self.thresholds):
            rec = threshold_key(*key).decode()
            if rec not in self.store.records:
                raise StoreError(f"{self.store.path}: record {rec} is missing")
            self.thresholds[key] = self.reader.read_into(rec).view(torch.float32)[:f].clone()

    def _load_predictors(self) -> dict[tuple[int, int], Predictor]:
        if self.mode != "predictor":
            return {}
        a, rank = self.args, self.store.manifest["profile"]["predictor"]["rank"]
        out = {}
        for l in range(a.num_hidden_layers):
            for e in range(a.n_experts):
                key = predictor_key(l, e).decode()
                if key not in self.store.records:
                    raise StoreError(f"{self.store.path}: record {key} is missing")
                out[(l, e)] = Predictor.from_buffer(self.reader.read_into(key), self.d,
                                                    a.intermediate_size, rank)
        return out

    def _load_ffn(self) -> None:
        """Read every cluster once: keep its gate rows, and pin the hottest into hot slots."""
        pinned = sorted(self.layout.hot)  # key order: a layer's slots in one run
        for key in pinned:
            self.cache.pin(key)
        a, there = self.args, self.layout.budget.vram_experts
        for l in range(a.num_hidden_layers):
            if l in self.tail_parts:
                self._load_tail(l)
                continue
            for e in range(a.n_experts):
                if (l, e) in there:  # the engine reads those into VRAM
                    continue
                keys = [(l, e, c) for c in range(self.n_clusters)]
                if not self.pinned_gate:
                    keys = [k for k in keys if k in self.cache.hot]
                rows, hot = [], []
                for key, buf in zip(keys, self.reader.read_many([cluster_key(*k).decode() for k in keys])):
                    parts = self._parts(buf, key[2])
                    rows.append(parts[0])
                    if key in self.cache.hot:
                        hot.append((key[2], self.pool.prepare(self._slot_parts(parts))))
                if self.pinned_gate:
                    self.gates[(l, e)] = self.slots_cls.gate(rows, self.store.ffn_dtype)
                if hot:
                    self.hot[(l, e)] = self._hot_block(l, hot)

    def _load_tail(self, layer: int) -> None:
        """A whole layer's FFN (every expert) into its NBitsTail, one expert read at a time;
        its hot entries (every cluster) name the tail, which computes them."""
        a, parts, every = self.args, self.tail_parts[layer], set(range(self.n_clusters))
        if self.mode != "dense" or any((layer, e, c) not in self.cache.hot
                                       for e in range(a.n_experts) for c in every):
            raise ValueError(f"layer {layer}: a tail needs every cluster hot, computed dense")

        def expert(e: int):
            keys = [cluster_key(layer, e, c).decode() for c in range(self.n_clusters)]
            held = []

            def prepared():
                if not held:
                    held.append([self.pool.prepare(self._slot_parts(self._parts(buf, c)))
                                 for c, buf in enumerate(self.reader.read_many(keys))])
                return held[0]

            def gate_up():
                p = prepared()
                return join([weight(*q[0]) for q in p] + [weight(*q[1]) for q in p])

            def down():
                w = join([weight(*q[2]) for q in prepared()], dim=1)
                held.clear()
                return w
            return gate_up, down

        router = parts.get("router")
        tail = NBitsTail(parts["o_proj"], parts["norm"], [expert(e) for e in range(a.n_experts)],
                         a.hidden_act, router, a.num_experts_per_tok if router is not None else 0,
                         parts.get("bias"))
        self.tails[layer] = tail
        for e in range(a.n_experts):
            self.hot[(layer, e)] = (tail, every, None)

    def _hot_block(self, layer: int, hot: list) -> tuple:
        clusters = [c for c, _ in hot]
        neurons = torch.cat([torch.arange(c * self.n, c * self.n + self.store.cluster_rows(c))
                             for c in clusters])
        prepared = [p for _, p in hot]
        if (layer in self.layout.budget.nbits_layers and self.mode == "dense"
                and self.args.hidden_act in NBitsFFN.ACTS):
            norm = self.norms.get(layer) if len(clusters) == self.n_clusters else None
            if norm is not None:  # the whole FFN: its norm runs in the same call
                self.folded_norms.add(layer)
            return NBitsBlock(prepared, self.args.hidden_act, norm), set(clusters), neurons
        return Block(self.slots_cls, prepared), set(clusters), neurons

    def _parts(self, buf, c: int):
        return record_parts(self.store.cluster_parts, buf, c)

    def _slot_parts(self, parts):
        """What a slot keeps of (gate, up, down): the gate too unless it is pinned."""
        return parts[1:] if self.pinned_gate else parts

    # -- the FFN ----------------------------------------------------------------------------
    def ffn(self, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
        """x [T, d] -> [T, d] through the cached clusters of one layer (or expert)."""
        if self.mode == "dense":
            return self._dense_ffn(layer, expert, x)
        n, c_all, key = self.n, self.n_clusters, (layer, expert)
        t = self.thresholds.get(key, 0.0)
        decode = x.shape[0] == 1
        a = None  # predictor mode: activations come from the gate rows read with the clusters
        if self.mode == "gate":
            a = self._mask(self.act(self.gates[key](x)), t)          # [T, F]
            if c_all * n != a.shape[1]:
                a = torch.nn.functional.pad(a, (0, c_all * n - a.shape[1]))
            active = a.view(-1, c_all, n).abs().amax(dim=(0, 2)).nonzero().flatten().tolist()
        else:  # prefill reads every cluster: one long read per layer, and no prediction misses
            active = self.predictors[key].clusters(x, n) if decode else list(range(c_all))
        block, hot, neurons = self.hot.get(key, (None, (), None))
        cold = [c for c in active if c not in hot]
        if decode:
            self.last_active[key] = cold
        y = torch.zeros_like(x)
        self.cache.stats.hot_hits += len(active) - len(cold)
        if block is not None:  # the pinned clusters, computed whether or not all are active
            h = (a.index_select(1, neurons) if a is not None
                 else self._mask(self.act(block.rows(x, 0)), _at(t, neurons)))
            y = y + block.down(h * block.rows(x, 1 if a is None else 0))
        slots = self._fetch(layer, expert, cold, x, prefill=not decode)
        if cold:
            idx = torch.tensor(slots)
            if a is not None:
                h = a.view(-1, c_all, n).index_select(1, torch.tensor(cold)).view(x.shape[0], -1)
                h = h * self.pool.rows(x, idx)
            else:
                if isinstance(t, torch.Tensor):  # slots hold n rows, a short cluster padded
                    t = torch.nn.functional.pad(t, (0, c_all * n - t.numel())).view(c_all, n)
                    t = t.index_select(0, torch.tensor(cold)).flatten()
                h = self._mask(self.act(self.pool.rows(x, idx, 0)), t) * self.pool.rows(x, idx, 1)
            y = y + self.pool.down(h, idx)
        return y

    def whole(self, layer: int) -> list:
        """A layer's FFN (an MoE's every expert) when each is pinned whole in one int4 Block
        (gate, up and down, nothing streamed or gated): [Block per expert], else []."""
        if self.mode != "dense":
            return []
        blocks = []
        for e in range(self.args.n_experts):
            block, hot, _ = self.hot.get((layer, e), (None, (), None))
            if (type(block) is not Block or not block.int4 or len(block.row_q) != 2
                    or len(hot) != self.n_clusters):
                return []
            blocks.append(block)
        return blocks

    def count_whole(self, experts: list[int]) -> None:
        """Whole FFNs ran outside `ffn` (engine/fused.py): their clusters were hot hits."""
        self.cache.stats.hot_hits += self.n_clusters * len(experts)

    def tail_used(self, layer: int, ids: torch.Tensor | None, x: torch.Tensor) -> None:
        """A layer's TieredTail ran on x [T, d] (an MoE's routed ids [T, k]): its clusters
        are hot hits, and routed experts are counted as `routed` counts them."""
        if ids is None:
            self.cache.stats.hot_hits += self.n_clusters
            return
        if ids.shape[0] == 1:  # decode: top-k ids are distinct
            experts, tokens = ids[0].tolist(), None
        else:
            experts = ids.unique().tolist()
            tokens = torch.bincount(ids.flatten(), minlength=self.args.n_experts).tolist()
        self.routed(layer, experts, x, None, tokens)
        self.cache.stats.hot_hits += self.n_clusters * len(experts)

    @staticmethod
    def _mask(a: torch.Tensor, t) -> torch.Tensor:
        """Zero activations under the threshold: a float, or per-neuron thresholds."""
        if isinstance(t, torch.Tensor) or t > 0:
            return a * (a.abs() >= t)
        return a

    def _dense_ffn(self, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
        """Every cluster, gate included (no thresholds to skip by): the pinned block, then the
        rest streamed from the store (read ahead while the previous layer computed)."""
        block, hot, _ = self.hot.get((layer, expert), (None, (), None))
        y = 0
        if block is not None:
            y = block.ffn(x, self.act)
        streamed = self.n_clusters - len(hot)
        self.cache.stats.hot_hits += len(hot)
        if streamed:
            if self.args.is_moe:  # cached, or read once routed (`routed`) or ahead
                block = self._expert_block(layer, expert)
            else:
                self.cache.stats.misses += streamed
                block = self.streamer.get(self.streamer.unit_of(layer))["ffn"]
            y = y + block.ffn(x, self.act)
        return y

    def routed(self, layer: int, experts: list[int], x: torch.Tensor,
               route_next: Callable | None = None, tokens: list[int] | None = None) -> None:
        """MoE: a layer's routed experts are known; each use is a hit or a miss of the expert
        cache (`tokens` weigh a prompt's uses in the routing counts). At decode, read the
        misses now (each overlaps the others' compute) and, ahead, those layer + 1's router
        (`route_next`) picks from this layer's input with a probability of at least
        expert_cut; let go of experts read ahead for this layer but not routed."""
        if self.mode != "dense" or self.expert_cache is None:
            return
        keys = self._routed_now = [(layer, e) for e in experts]
        held = {k for k in keys
                if self.expert_cache.get(k, tokens[k[1]] if tokens else 1) is not None}
        if x.shape[0] > 1 and layer == self.args.num_hidden_layers - 1:
            self.expert_cache.pin_hottest(self._expert_bytes())  # warm-up: the prompt's routing
        if self.layout.budget.hot_slots >= self._total_clusters():
            return
        for k in keys:
            if k in held:
                continue
            ahead = k in self.inflight
            if ahead:
                self.read_ahead_hits += self._streamed_clusters(*k)
            else:
                self.demand_reads += self._streamed_clusters(*k)
            (self.ahead.used if ahead else self.ahead.demand)[layer] += 1
        if x.shape[0] > 1:  # prefill: one expert at a time (the budget holds 2 k of them)
            return
        stale = [k for k in self.inflight if len(k) == 2 and k[0] == layer and k[1] not in experts]
        for k in stale:
            del self.inflight[k]
            self.prefetch_unused += self._streamed_clusters(*k)
            self.ahead.unused[layer] += 1
        for k in keys:
            if k not in held and self._streamed_clusters(*k):
                self._submit_layer(*k)
        if self.prefetch and route_next is not None:
            for e in moe_experts.likely_experts(route_next, x, self.expert_cut):
                k = (layer + 1, e)
                if (k in self.inflight or not self._streamed_clusters(*k)
                        or self.expert_cache.touch(k)):  # cached: kept past this layer's puts
                    continue
                self.prefetched += self._streamed_clusters(*k)
                self.ahead.read[layer + 1] += 1
                self._submit_layer(*k)

    def _expert_block(self, layer: int, expert: int):
        """A routed expert's streamed part: from the expert cache, else its read (submitted by
        `routed`), then offered to the cache (kept if the budget holds it)."""
        key, streamed = (layer, expert), self._streamed_clusters(layer, expert)
        block = self.expert_cache.peek(key)
        if block is not None:  # its clusters count as cache hits, as pinned ones do
            self.cache.stats.cold_hits += streamed
            return block
        self.cache.stats.misses += streamed
        t0 = time.perf_counter()
        block = self._submit_layer(layer, expert).result()
        del self.inflight[key]
        self.io_wait_s += time.perf_counter() - t0
        self.expert_cache.put(key, block, moe_experts.block_bytes(block),
                              in_use=getattr(self, "_routed_now", ()))
        return block

    def _experts(self):
        """MoE: (the expert cache over Budget.experts, read-ahead counters); experts resident
        in full (hot) are pinned in it, so that it counts every routed use."""
        a, b = self.args, self.layout.budget
        if not a.is_moe:
            return None, None
        resident = {k: v for k, v in self.hot.items() if len(v[1]) == self.n_clusters}
        if b.experts:  # cached experts live long among short-lived reads: their 0.45 MiB
            # scale tensors left malloc arenas holes (synthetic Mixtral at --ram 650M:
            # anonymous memory 567-595 MiB, OOM-killed at that cgroup cap); mapped: 513 flat
            return_large_frees(128 << 10)
        cache = expert_cache(self.expert_policy, b.experts, self._expert_bytes(),
                             a.num_hidden_layers, a.num_experts_per_tok, resident)
        return cache, ReadAheadStats(a.num_hidden_layers)

    def _expert_bytes(self) -> int:
        """Bytes of one whole expert as stored (and as a kernel-ready block)."""
        records = self.store.records
        return sum(records[cluster_key(0, 0, c).decode()][0] for c in range(self.n_clusters))

    def _total_clusters(self) -> int:
        a, b = self.args, self.layout.budget  # the CPU's (those in VRAM are not its)
        return (a.num_hidden_layers * a.n_experts - len(b.vram_experts)) * self.n_clusters

    def _streamed_clusters(self, layer: int, expert: int) -> int:
        return self.n_clusters - len(self.hot.get((layer, expert), (None, ()))[1])

    def _submit_layer(self, layer: int, expert: int) -> Future:
        """Dense mode, MoE: one job reads an expert's streamed clusters (one or two long reads)
        and joins them into a Block on the I/O thread."""
        fut = self.inflight.get((layer, expert))
        if fut is None:
            _, hot, _ = self.hot.get((layer, expert), (None, (), None))
            keys = [(layer, expert, c) for c in range(self.n_clusters) if c not in hot]
            fut = self.inflight[(layer, expert)] = Future()
            self.reader.pool.submit(self._read_layer, keys, fut)
        return fut

    def _read_layer(self, keys, fut: Future) -> None:
        try:
            bufs = self.reader.read_tensors([cluster_key(*k).decode() for k in keys], private=True)
            fut.set_result(self.join_clusters(keys, bufs))
        except BaseException as e:  # the waiting layer re-raises it
            fut.set_exception(e)

    def _fetch(self, layer: int, expert: int, clusters: list[int], x: torch.Tensor,
               prefill: bool) -> list[int]:
        """Slots of the clusters, reading the misses (and reading ahead for the next layer)."""
        keys = [(layer, expert, c) for c in clusters]
        wanted = set(keys)
        stale = [k for k in self.inflight if len(k) == 3 and k[:2] == (layer, expert)
                 and k not in wanted]
        for k in stale:  # read ahead for this layer but not used: let it go
            del self.inflight[k]
        self.prefetch_unused += len(stale)
        slots = [self.cache.lookup(k) for k in keys]
        missing = [i for i, s in enumerate(slots) if s is None]
        ahead = sum(keys[i] in self.inflight for i in missing)
        self.read_ahead_hits += ahead
        self.demand_reads += len(missing) - ahead
        self._submit([keys[i] for i in missing])
        futures = {i: self.inflight[keys[i]] for i in missing}
        if self.prefetch and not self.args.is_moe:
            self._prefetch(layer + 1, expert, prefill, x)
        t0 = time.perf_counter()
        for i, fut in futures.items():
            prepared = fut.result()
            self.inflight.pop(keys[i], None)
            slot, _ = self.cache.admit(keys[i], in_use=keys)
            if slot is None:
                raise BudgetError("cold cache region smaller than one layer's active clusters")
            self.pool.write(slot, prepared)
            slots[i] = slot
        self.io_wait_s += time.perf_counter() - t0
        return slots

    def _submit(self, keys) -> None:
        """Read the keys not already in flight, as one job (coalesced reads) per call."""
        new = [k for k in keys if k not in self.inflight]
        if not new:
            return
        futs = [Future() for _ in new]
        self.inflight.update(zip(new, futs))
        self.reader.pool.submit(self._read_prepared, new, futs)

    def _read_prepared(self, keys, futs) -> None:
        try:
            bufs = self.reader.read_tensors([cluster_key(*k).decode() for k in keys])
        except BaseException as e:  # the waiting layer re-raises it
            for f in futs:
                f.set_exception(e)
            return
        try:
            prepared = self.pool.prepare_many(
                [self._slot_parts(self._parts(buf, key[2])) for key, buf in zip(keys, bufs)])
        except BaseException as e:
            for f in futs:
                f.set_exception(e)
            return
        for fut, p in zip(futs, prepared):
            fut.set_result(p)

    def _prefetch(self, layer: int, expert: int, prefill: bool, x: torch.Tensor) -> None:
        """Read ahead the clusters `layer` will likely need: all of them in prefill; predicted
        from this layer's input x (the residual stream changes little from one layer to the
        next; the profile reports this recall); else those it used at the previous token."""
        if layer >= self.args.num_hidden_layers or self.cache.cold_slots == 0:
            return
        key = (layer, expert)
        if prefill:
            likely = range(self.n_clusters)
        elif key in self.predictors:
            likely = self.predictors[key].clusters(x, self.n)
        else:
            likely = self.last_active.get(key, ())
        # cached ones are refreshed, so that this layer's admissions do not evict them
        keys = [(layer, expert, c) for c in likely]
        new = [k for k in keys if not self.cache.touch(k) and k not in self.inflight]
        self.prefetched += len(new)
        self._submit(new)

    # -- counters -----------------------------------------------------------------------------
    def reset_stats(self) -> None:
        self.io_wait_s = 0.0
        self.prefetched = self.prefetch_unused = 0  # clusters read ahead; of them, let go
        self.read_ahead_hits = self.demand_reads = 0  # misses already in flight, or not
        self.cache.stats.__init__()
        if self.expert_cache is not None:
            self.expert_cache.reset_stats()
            self.ahead = ReadAheadStats(self.args.num_hidden_layers)

    def stats(self) -> dict:
        s = self.cache.stats
        return {"cache_hit_rate": s.hit_rate, "cache": vars(s).copy(),
                "prefetched": self.prefetched, "prefetch_unused": self.prefetch_unused,
                "read_ahead_hits": self.read_ahead_hits, "demand_reads": self.demand_reads,
                **({"experts": experts_report(self.expert_cache, self.ahead, self.expert_cut)}
                   if self.expert_cache is not None else {})}


def _at(t, neurons: torch.Tensor):
    return t.index_select(0, neurons) if isinstance(t, torch.Tensor) else t
