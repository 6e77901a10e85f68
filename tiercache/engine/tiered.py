"""The tiered engine: attention, norms, embeddings and FFN gates pinned in RAM; FFN up/down
clusters in a segmented cache backed by the store, read on I/O threads ahead of use.

Per layer and token: gate(x) -> active neurons (CATS threshold from the profile) -> active
clusters -> cache hits plus reads of the misses -> up/down over the gathered slots. While a
layer computes, the next layer's likely clusters (those active for it at the previous token;
all of them in prefill) are already being read.
"""
from __future__ import annotations

import ctypes
import time
from concurrent.futures import Future
from dataclasses import dataclass

import torch
from torch import nn

from ..cache.segmented import SegmentedCache
from ..errors import BudgetError, StoreError
from ..memory import anon_bytes
from ..models import Model
from ..models.llama import ACTS, rope_inv_freq
from ..store import quant
from ..store.format import Store, cluster_key, tensor_key
from ..store.reader import RecordReader
from .dense import Engine
from .kernels import _HAVE_INT8, Q8Linear, QEmbedding, QLinear, int4_ok
from .slots import Block, Float32Slots, Int4Slots

MB = 1 << 20
SLACK = 16 * MB  # activations, logits, read buffers in flight, allocator slop
# file-backed pages (library code) the runtime keeps touching; the rest of its mapped files the
# kernel may reclaim under a cap, so they are not counted whole. Measured here: a tiny model's
# working set under a cgroup cap (290 MiB) minus its anonymous memory (227 MiB).
FILE_RESERVE = 96 * MB
# pin gates and skip clusters only when at most this share of clusters is active per token
SPARSE_WORTH = 0.8


@dataclass
class TierConfig:
    ram_bytes: int | None = None   # what the process may use in all; None: every cluster fits
    hot_bytes: int | None = None   # region sizes (else derived from ram_bytes)
    cold_bytes: int | None = None
    hot_clusters: int | None = None  # region sizes in clusters, as a plan gives them
    cold_clusters: int | None = None
    io_threads: int = 2
    prefetch: bool = True
    prefetch_layers: int = 2       # dense mode: layers read ahead (reads in flight at once)
    sparse: bool | None = None     # profile thresholds: True always, False never, None when
                                   # the profile says they skip enough clusters to pay
    context: int = 2048            # KV cache reserved in the budget
    compute: str = "auto"          # auto (int4 kernel for q4k stores) | f32


@dataclass
class Budget:
    runtime_and_fixed: int
    gates: int
    kv: int
    slack: int
    slot_bytes: int
    hot_slots: int
    cold_slots: int

    def lines(self) -> dict:
        return {"runtime_and_fixed": self.runtime_and_fixed, "gates": self.gates, "kv": self.kv,
                "slack": self.slack, "hot": self.hot_slots * self.slot_bytes,
                "cold": self.cold_slots * self.slot_bytes}


class TieredMLP(nn.Module):
    def __init__(self, engine: "TieredEngine", layer: int, expert: int):
        super().__init__()
        self.engine, self.layer, self.expert = engine, layer, expert

    def forward(self, x):
        shape = x.shape
        return self.engine.ffn(self.layer, self.expert, x.reshape(-1, shape[-1])).view(shape)


class TieredEngine(Engine):
    backend = "torch (tiered)"

    def __init__(self, store: Store, cfg: TierConfig):
        self.cfg, self.store, self.args = cfg, store, store.args
        a = store.args
        self.n, self.d = store.cluster_size, a.hidden_size
        self.n_clusters = store.n_clusters
        fast = Int4Slots.supports(self.n, self.d, store.ffn_dtype, a.intermediate_size)
        self.int4 = fast and cfg.compute != "f32"  # q4k stores run the int4 kernel
        self.slots_cls = Int4Slots if self.int4 else Float32Slots
        self.act = ACTS[a.hidden_act]
        self.reader = RecordReader(store, threads=cfg.io_threads)
        store.env = None  # reads go through pread now; letting go unmaps LMDB's pages
        self.profile = store.manifest.get("profile")
        self.thresholds = self._thresholds()
        # with thresholds the gate is pinned to pick neurons; else it streams with up and down
        self.pinned_gate = bool(self.thresholds)
        self.row_parts = 1 if self.pinned_gate else 2
        self._refuse_early()
        self.model = self._build_model()
        self.budget = self._plan_budget()
        self.cache = SegmentedCache(self.budget.slot_bytes, self.budget.hot_slots,
                                    self.budget.cold_slots)
        self.pool = self.slots_cls(self.budget.cold_slots, self.n, self.d, store.ffn_dtype,
                                   self.row_parts)
        self.gates: dict[tuple[int, int], object] = {}
        self.hot: dict[tuple[int, int], tuple] = {}  # (layer, expert) -> (Block, clusters, neurons)
        self._load_ffn()
        self.inflight: dict[tuple, Future] = {}
        self.last_active: dict[tuple[int, int], list[int]] = {}
        self.tokens = 0
        self.io_wait_s = 0.0

    # -- loading --------------------------------------------------------------------------
    def _read_tensor(self, name: str, out_dtype=torch.float32):
        meta = self.store.manifest["tensors"][name]
        return quant.decode(self.reader.read(tensor_key(name).decode()), meta["shape"],
                            meta["dtype"], out_dtype)

    def _q4_linear(self, name: str, bias=None):
        """The tensor as an int4 (q4) or int8 (q8) kernel module, when it is stored so."""
        meta = self.store.manifest["tensors"].get(name)
        if not (self.int4 and meta):
            return None
        if meta["dtype"] == "q4" and int4_ok(meta["shape"]):
            return QLinear(self.reader.read(tensor_key(name).decode()), meta["shape"], bias)
        if meta["dtype"] == "q8" and _HAVE_INT8:
            return Q8Linear(self.reader.read(tensor_key(name).decode()), meta["shape"], bias)
        return None

    def _build_model(self) -> Model:
        """Attention and embeddings pinned (int4 where the kernel applies), FFNs tiered."""
        a = self.args
        with torch.device("meta"):
            model = Model(a)
        self._swap_linears(model)
        for l, layer in enumerate(model.model.layers):
            if a.is_moe:
                layer.block_sparse_moe.experts = nn.ModuleList(
                    TieredMLP(self, l, e) for e in range(a.n_experts))
            else:
                layer.mlp = TieredMLP(self, l, 0)
        model = model.to_empty(device="cpu")
        params = dict(model.named_parameters())
        for name in self.store.tensor_names:
            if name in params:
                with torch.no_grad():
                    params[name].copy_(self._read_tensor(name))
                del params[name]
        if params:
            raise StoreError(f"{self.store.path}: store lacks {sorted(params)[0]}")
        model.inv_freq = rope_inv_freq(a)
        return model.eval()

    def _swap_linears(self, model: Model) -> None:
        """Replace nn.Linear / the embedding by int4 modules where the kernel applies."""
        head = self._q4_linear("model.embed_tokens.weight")
        if head is not None:
            model.model.embed_tokens = QEmbedding(head)
            if self.args.tie_word_embeddings:
                model.lm_head = head
        if not self.args.tie_word_embeddings:
            q = self._q4_linear("lm_head.weight")
            if q is not None:
                model.lm_head = q
        for l, layer in enumerate(model.model.layers):
            att = layer.self_attn
            for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
                base = f"model.layers.{l}.self_attn.{p}"
                bias = (self._read_tensor(base + ".bias")
                        if base + ".bias" in self.store.manifest["tensors"] else None)
                q = self._q4_linear(base + ".weight", bias)
                if q is not None:
                    setattr(att, p, q)

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

    def _refuse_early(self) -> None:
        """Refuse before loading (a cgroup would kill a load that overshoots): the runtime so
        far, the pinned tensors as they will sit in RAM, the largest record read while loading
        (its bytes and its decoded form), the gates, the KV cache and one layer of clusters."""
        if self.cfg.ram_bytes is None:
            return
        with torch.device("meta"):  # torch's lazy setup for a model (~50 MB here) comes first,
            Model(self.args)        # so the runtime measured below includes it
        _trim_malloc()
        a, tensors = self.args, self.store.manifest["tensors"]
        sizes = {n: _ram_bytes(t, self.int4) for n, t in tensors.items()}
        if a.tie_word_embeddings and self.int4:
            sizes.pop("lm_head.weight", None)
        load_peak = max(self.store.records[tensor_key(n).decode()][0] for n in tensors)
        parts = {"runtime": anon_bytes() + FILE_RESERVE, "pinned weights": sum(sizes.values()),
                 "loading": load_peak, "FFN gates": self._gate_bytes(),
                 f"KV cache for {self.cfg.context} tokens": self._kv_bytes(),
                 "working space": SLACK,
                 "clusters being read": self._stream_bytes() or self.n_clusters * self._slot_bytes()}
        need = sum(parts.values())
        if need > self.cfg.ram_bytes:
            detail = ", ".join(f"{k} {_mb(v)}" for k, v in parts.items())
            raise BudgetError(f"RAM budget {_mb(self.cfg.ram_bytes)} is too small: it needs at "
                              f"least {_mb(need)} ({detail})")

    def _slot_bytes(self) -> int:
        return self.slots_cls.slot_bytes(self.n, self.d, self.row_parts)

    def _gate_bytes(self) -> int:
        if not self.pinned_gate:
            return 0
        a = self.args
        one = (a.intermediate_size * self.d // 2 + a.intermediate_size * self.d // 8
               if self.int4 else a.intermediate_size * self.d * 4)
        return one * a.num_hidden_layers * a.n_experts

    def _kv_bytes(self) -> int:
        a = self.args
        return 2 * a.num_hidden_layers * a.num_key_value_heads * a.head_dim * 4 * self.cfg.context

    def _plan_budget(self) -> Budget:
        a = self.args
        total = a.num_hidden_layers * a.n_experts * self.n_clusters
        slot, gates, kv = self._slot_bytes(), self._gate_bytes(), self._kv_bytes()
        _trim_malloc()
        fixed = anon_bytes() + FILE_RESERVE
        cfg = self.cfg
        if cfg.hot_clusters is not None or cfg.cold_clusters is not None:
            hot, cold = cfg.hot_clusters or 0, cfg.cold_clusters or 0
        elif cfg.hot_bytes is not None or cfg.cold_bytes is not None:
            hot, cold = (cfg.hot_bytes or 0) // slot, (cfg.cold_bytes or 0) // slot
        elif cfg.ram_bytes is None:
            hot, cold = total, 0
        else:
            room = cfg.ram_bytes - fixed - gates - kv - SLACK - self._stream_bytes()
            hot, cold = _split_slots(max(0, room // slot), total, self.n_clusters,
                                     have_profile=self.profile is not None,
                                     stream=not self.pinned_gate)
        if not self.pinned_gate:  # every cluster is used every token: an LRU would only cycle
            hot, cold = hot + cold, 0
        b = Budget(fixed, gates, kv, SLACK, slot, min(hot, total), cold)
        if b.hot_slots < total:
            need = self._stream_bytes() if not self.pinned_gate else self.n_clusters * slot
            have = (b.cold_slots * slot if self.pinned_gate else
                    (cfg.ram_bytes or 1 << 62) - fixed - gates - kv - SLACK - b.hot_slots * slot)
            if have < need:
                least = fixed + gates + kv + SLACK + need
                raise BudgetError(
                    f"RAM budget {_mb(cfg.ram_bytes)} is too small: it needs at least {_mb(least)} "
                    f"(runtime + pinned weights {_mb(fixed)}, FFN gates {_mb(gates)}, KV cache for "
                    f"{cfg.context} tokens {_mb(kv)}, working space {_mb(SLACK)}, clusters "
                    f"being read {_mb(need)})")
        return b

    def _stream_bytes(self) -> int:
        """Dense mode reads the clusters it does not pin into buffers: the layer in use and
        the one being read ahead."""
        ahead = self.cfg.prefetch_layers if self.cfg.prefetch else 0
        return 0 if self.pinned_gate else (1 + ahead) * self.n_clusters * self._slot_bytes()

    def _load_ffn(self) -> None:
        """Read every cluster once: keep its gate rows, and pin the hottest into hot slots."""
        order = self._hotness_order()
        pinned = sorted(order[:self.budget.hot_slots])  # key order: a layer's slots in one run
        for key in pinned:
            self.cache.pin(key)
        a = self.args
        for l in range(a.num_hidden_layers):
            for e in range(a.n_experts):
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
                    self.hot[(l, e)] = self._hot_block(hot)
        self.reader.stats.__init__()  # count what decoding reads, not the load

    def _hot_block(self, hot: list) -> tuple:
        clusters = [c for c, _ in hot]
        neurons = torch.cat([torch.arange(c * self.n, c * self.n + self.store.cluster_rows(c))
                             for c in clusters])
        return Block(self.slots_cls, [p for _, p in hot]), set(clusters), neurons

    def _parts(self, buf, c: int):
        """A record (bytes or a uint8 tensor) -> [(shape, slice)] of gate, up and down."""
        mv = buf if isinstance(buf, torch.Tensor) else memoryview(buf)
        return [(s, mv[o:o + nb]) for s, o, nb in self.store.cluster_parts(c)]

    def _slot_parts(self, parts):
        """What a slot keeps of (gate, up, down): the gate too unless it is pinned."""
        return parts[1:] if self.pinned_gate else parts

    def _hotness_order(self) -> list[tuple[int, int, int]]:
        """All clusters, most frequently active first (profile order; else layer order)."""
        a = self.args
        keys = [(l, e, c) for l in range(a.num_hidden_layers) for e in range(a.n_experts)
                for c in range(self.n_clusters)]
        if not self.profile:
            return keys
        freq = {(l, e, c): f for l, row in enumerate(self.profile["ffn"])
                for e, ex in enumerate(row) for c, f in enumerate(ex["cluster_freq"])}
        return sorted(keys, key=lambda k: -freq[k])

    # -- the FFN ----------------------------------------------------------------------------
    def ffn(self, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
        """x [T, d] -> [T, d] through the cached clusters of one layer (or expert)."""
        if not self.pinned_gate:
            return self._dense_ffn(layer, expert, x)
        n, c_all = self.n, self.n_clusters
        a = self.act(self.gates[(layer, expert)](x))               # [T, F]
        f = a.shape[1]
        if c_all * n != f:
            a = torch.nn.functional.pad(a, (0, c_all * n - f))
        t = self.thresholds.get((layer, expert), 0.0)
        if t > 0:
            a = a * (a.abs() >= t)
            active = a.view(-1, c_all, n).abs().amax(dim=(0, 2)).nonzero().flatten().tolist()
        else:
            active = list(range(c_all))
        if not active:
            return torch.zeros_like(x)
        block, hot, neurons = self.hot.get((layer, expert), (None, (), None))
        cold = [c for c in active if c not in hot]
        if x.shape[0] == 1:
            self.last_active[(layer, expert)] = cold
        y = 0
        self.cache.stats.hot_hits += len(active) - len(cold)
        if block is not None:  # the pinned clusters, computed whether or not all are active
            y = block.down(a.index_select(1, neurons) * block.rows(x))
        if cold:
            idx = torch.tensor(self._fetch(layer, expert, cold, prefill=x.shape[0] > 1))
            a = a.view(-1, c_all, n).index_select(1, torch.tensor(cold)).view(x.shape[0], -1)
            y = y + self.pool.down(a * self.pool.rows(x, idx), idx)
        return y

    def _dense_ffn(self, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
        """Every cluster, gate included (no thresholds to skip by): the pinned block, then the
        rest streamed from the store (read ahead while the previous layer computed)."""
        block, hot, _ = self.hot.get((layer, expert), (None, (), None))
        y = 0
        if block is not None:
            y = block.down(self.act(block.rows(x, 0)) * block.rows(x, 1))
        streamed = self.n_clusters - len(hot)
        self.cache.stats.hot_hits += len(hot)
        if streamed:
            self.cache.stats.misses += streamed
            job = self._submit_layer(layer, expert)
            if self.cfg.prefetch and not self.args.is_moe:
                for ahead in range(1, self.cfg.prefetch_layers + 1):
                    self._submit_layer((layer + ahead) % self.args.num_hidden_layers, expert)
            t0 = time.perf_counter()
            block = job.result()
            del self.inflight[(layer, expert)]
            self.io_wait_s += time.perf_counter() - t0
            y = y + block.down(self.act(block.rows(x, 0)) * block.rows(x, 1))
        return y

    def _submit_layer(self, layer: int, expert: int) -> Future:
        """Dense mode: one job reads a layer's streamed clusters (one or two long reads) and
        joins them into a Block on the I/O thread."""
        fut = self.inflight.get((layer, expert))
        if fut is None:
            _, hot, _ = self.hot.get((layer, expert), (None, (), None))
            keys = [(layer, expert, c) for c in range(self.n_clusters) if c not in hot]
            fut = self.inflight[(layer, expert)] = Future()
            self.reader.pool.submit(self._read_layer, keys, fut)
        return fut

    def _read_layer(self, keys, fut: Future) -> None:
        try:
            bufs = self.reader.read_tensors([cluster_key(*k).decode() for k in keys])
            if self.int4:
                fut.set_result(Block.joined(bufs, self.store.cluster_parts(0), self.n, self.d))
            else:
                fut.set_result(Block(self.slots_cls, self.pool.prepare_many(
                    [self._parts(buf, key[2]) for key, buf in zip(keys, bufs)])))
        except BaseException as e:  # the waiting layer re-raises it
            fut.set_exception(e)

    def _fetch(self, layer: int, expert: int, clusters: list[int], prefill: bool) -> list[int]:
        keys = [(layer, expert, c) for c in clusters]
        slots = [self.cache.lookup(k) for k in keys]
        missing = [i for i, s in enumerate(slots) if s is None]
        self._submit([keys[i] for i in missing])
        futures = {i: self.inflight[keys[i]] for i in missing}
        if self.cfg.prefetch and not self.args.is_moe:
            self._prefetch(layer + 1, expert, prefill)
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

    def _prefetch(self, layer: int, expert: int, prefill: bool) -> None:
        if layer >= self.args.num_hidden_layers or self.cache.cold_slots == 0:
            return
        dense = prefill or not self.pinned_gate
        likely = range(self.n_clusters) if dense else self.last_active.get((layer, expert), ())
        self._submit([(layer, expert, c) for c in likely if (layer, expert, c) not in self.cache])

    # -- engine API ---------------------------------------------------------------------------
    def decode(self, session, token: int) -> torch.Tensor:
        self.tokens += 1
        return self.forward_ids(session, [token])

    def stats(self) -> dict:
        s, io = self.cache.stats, self.reader.stats
        return {"cache_hit_rate": s.hit_rate, "cache": vars(s).copy(),
                "store_bytes_read": io.bytes, "store_reads": io.reads,
                "store_read_sizes": io.sizes,
                "store_bytes_per_token": io.bytes / self.tokens if self.tokens else 0.0,
                "io_wait_s": self.io_wait_s, "regions": self.budget.lines(),
                "sparse": bool(self.thresholds), "compute": "int4" if self.int4 else "f32"}


def _ram_bytes(meta: dict, int4: bool) -> int:
    """Bytes a pinned tensor takes in RAM: int4/int8 kernels keep q4/q8 about as stored;
    everything else is decoded to float32."""
    n = 1
    for s in meta["shape"]:
        n *= s
    if int4 and meta["dtype"] == "q4":
        return quant.nbytes(meta["shape"], "q4")
    if int4 and meta["dtype"] == "q8":
        return n + 2 * meta["shape"][0]
    return 4 * n


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


def _trim_malloc() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _mb(n) -> str:
    return "unlimited" if n is None else f"{n / MB:.0f} MiB"


def config_from_plan(plan: dict) -> TierConfig:
    """The engine settings a `tiercache plan` chose (planner/search.py writes them)."""
    e, limits = plan["engine"], plan.get("limits", {})
    return TierConfig(ram_bytes=limits.get("ram_bytes"), hot_clusters=e.get("hot_clusters"),
                      cold_clusters=e.get("cold_clusters"), io_threads=e.get("io_threads", 2),
                      prefetch=e.get("prefetch_layers", 1) > 0,
                      prefetch_layers=max(1, e.get("prefetch_layers", 2)),
                      context=e.get("context", 2048),
                      compute=e.get("compute", "auto"),
                      sparse=None if e.get("gate_pinned", True) else False)


def load_tiered(store: Store, cfg: TierConfig | None = None) -> TieredEngine:
    return TieredEngine(store, cfg or TierConfig())
