"""The tiered engine: attention, norms, embeddings and FFN gates pinned in RAM; FFN up/down
clusters in a segmented cache backed by the store, read on I/O threads ahead of use.

How a layer's FFN picks its neurons (`mode`):
- gate: gate(x) -> active neurons (CATS threshold from the profile) -> active clusters ->
  cache hits plus reads of the misses -> up/down over the gathered slots;
- predictor (ReLU-family stores with activation predictors from the profile): the predictor
  picks the clusters from x, their gate|up|down come from the cache or the store, no gate is
  pinned;
- dense: every cluster, every token (pinned whole layers, the rest streamed in units).
While a layer computes, the next layer's likely clusters are already being read: predicted
from this layer's input (predictor), those active for it at the previous token (gate), all of
them (prefill, dense).
"""
from __future__ import annotations

import ctypes
import math
import time
from concurrent.futures import Future
from dataclasses import dataclass

import torch
from torch import nn

from ..cache.segmented import SegmentedCache
from ..errors import BudgetError, StoreError, TiercacheError
from ..memory import anon_bytes, return_large_frees, trim_heap
from ..models import Model, materialize
from ..models.llama import ACTS, MoE, rope_inv_freq
from ..store import quant
from ..store.format import Store, cluster_key, tensor_key, threshold_key
from ..store.reader import RecordReader
from .dense import Engine, context_limit
from ..models.kv import KVCache, kv_bytes, kv_dtype
from .kernels import (_HAVE_INT8, ExactTop, Q8Linear, QEmbedding, QLinear, int4_ok,
                      resident_kernel)
from .nbits import EXTRA as NBITS_EXTRA
from .nbits import WORKSPACE as NBITS_WORKSPACE
from .nbits import NBitsBlock, NBitsFFN, NBitsHead, NBitsLinear, NBitsQKV
from .predictor import Predictor, predictor_key, record_bytes
from .slots import Block, Float32Slots, Int4Slots
from .stream import (HEAD_SLICE, StreamedEmbedding, StreamedHead, StreamedLinear, Streamer, Unit,
                     q8r_rows, q8r_scales)

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


@dataclass
class TierConfig:
    ram_bytes: int | None = None   # what the process may use in all; None: every cluster fits
    hot_bytes: int | None = None   # region sizes (else derived from ram_bytes)
    cold_bytes: int | None = None
    hot_clusters: int | None = None  # region sizes in clusters, as a plan gives them
    cold_clusters: int | None = None
    io_threads: int = 2
    prefetch: bool = True
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
                                   # ORT's MatMulNBits where it verifies | torch: torch's int4
                                   # kernel only | f32


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

    def lines(self) -> dict:
        return {"runtime": self.runtime, "fixed": self.fixed, "attention": self.attention,
                "prepacked": self.prepacked,
                "head": self.head, "gates": self.gates, "kv": self.kv, "slack": self.slack,
                "streaming": self.streaming, "hot": self.hot_slots * self.slot_bytes,
                "cold": self.cold_slots * self.slot_bytes}

    @property
    def total(self) -> int:
        return sum(self.lines().values())


class TieredMLP(nn.Module):
    def __init__(self, engine: "TieredEngine", layer: int, expert: int):
        super().__init__()
        self.engine, self.layer, self.expert = engine, layer, expert

    def forward(self, x):
        shape = x.shape
        return self.engine.ffn(self.layer, self.expert, x.reshape(-1, shape[-1])).view(shape)


class TieredMoE(MoE):
    """Mixtral's block with tiered experts: once routed, the engine reads every routed expert
    at once and, at decode, the experts the next layer's router picks from this layer's input
    (`TieredEngine.routed`)."""

    def __init__(self, engine: "TieredEngine", layer: int, moe: MoE):
        nn.Module.__init__(self)
        self.top_k, self.gate = moe.top_k, moe.gate
        self.experts = nn.ModuleList(TieredMLP(engine, layer, e) for e in range(len(moe.experts)))
        self.engine, self.layer = engine, layer

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        w, idx = self.route(x)
        self.engine.routed(self.layer, idx.unique().tolist(), x)
        out = torch.zeros_like(x)
        for e in idx.unique().tolist():
            rows, slot = (idx == e).nonzero(as_tuple=True)
            out.index_add_(0, rows, self.experts[e](x[rows]) * w[rows, slot, None])
        return out.view(shape)


class TieredEngine(Engine):
    backend = "torch (tiered)"

    def __init__(self, store: Store, cfg: TierConfig):
        self.cfg, self.store, self.args = cfg, store, store.args
        self.context = context_limit(store.args, cfg.context)
        self.kv = cfg.kv
        kv_dtype(cfg.kv)  # refuse an unknown name before loading
        a = store.args
        self.n, self.d = store.cluster_size, a.hidden_size
        self.n_clusters = store.n_clusters
        fast = Int4Slots.supports(self.n, self.d, store.ffn_dtype, a.intermediate_size)
        self.int4 = fast and cfg.compute != "f32"  # q4k stores run the int4 kernel
        self.nbits = self.int4 and cfg.compute == "auto" and resident_kernel() == "ort-nbits"
        self.slots_cls = Int4Slots if self.int4 else Float32Slots
        self.act = ACTS[a.hidden_act]
        self.reader = RecordReader(store, threads=cfg.io_threads)
        store.env = None  # reads go through pread now; letting go unmaps LMDB's pages
        self.reader.drop_page_cache()
        self.tensors = store.manifest["tensors"]
        self.profile = store.manifest.get("profile")
        self._select_mode()
        self.inflight: dict[tuple, Future] = {}
        self.last_active: dict[tuple[int, int], list[int]] = {}
        self.budget = self._plan_budget(self._runtime_bytes())  # refuses before loading
        self.nbits = self.nbits and self.budget.prepacked > 0
        self.streamer = self._streamer()
        self.model = self._build_model()
        self.cache = SegmentedCache(self.budget.slot_bytes, self.budget.hot_slots,
                                    self.budget.cold_slots)
        self.pool = self.slots_cls(self.budget.cold_slots, self.n, self.d, store.ffn_dtype,
                                   self.row_parts)
        self.gates: dict[tuple[int, int], object] = {}
        self.hot: dict[tuple[int, int], tuple] = {}  # (layer, expert) -> (Block, clusters, neurons)
        self.predictors = self._load_predictors()
        self._load_thresholds()
        self._load_ffn()
        trim_heap()  # what loading (and ORT's session builds) freed goes back to the OS
        self.reset_stats()  # count what decoding reads, not the load

    # -- what is pinned and what streams ----------------------------------------------------
    def _select_mode(self) -> None:
        """dense | gate | predictor (see the module's docstring), and what follows: the gate
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

    def _runtime_bytes(self) -> int:
        """The process before any weight: anonymous RSS once torch's lazy set-up for a model
        has run (~1 MB since `materialize`; see there), plus the file pages it keeps touching."""
        if self.cfg.ram_bytes is None:
            return 0
        return_large_frees()  # freed read buffers go back to the OS, not to malloc's arenas
        with torch.device("meta"):
            Model(self.args)
        _trim_malloc()
        return anon_bytes() + FILE_RESERVE

    @property
    def head_name(self) -> str:
        return "lm_head.weight" if "lm_head.weight" in self.tensors else "model.embed_tokens.weight"

    def _streamable(self) -> tuple[dict[int, list[str]], bool]:
        """-> (layer -> its attention projections that can stream, whether the head can).
        Streaming beyond FFN clusters needs kernel-layout records (q4k, q8r) and dense mode."""
        if not (self.int4 and self.mode == "dense"):
            return {}, False
        attn: dict[int, list[str]] = {}
        for name, t in self.tensors.items():
            if t["dtype"] == "q4k" and ".self_attn." in name:
                attn.setdefault(int(name.split(".")[2]), []).append(name)
        return attn, self.tensors[self.head_name]["dtype"] == "q8r" and _HAVE_INT8

    def _plan_budget(self, runtime: int) -> Budget:
        """Regions for cfg. With a RAM budget: pin everything that fits; else pin attention
        first, then the head, then the hottest FFN clusters, and stream the rest (what is
        left over goes to smaller items). In dense mode every streamed byte is read once per
        token whichever weight it is, so the order only keeps the streaming path simple.
        Refuses (BudgetError, with the numbers) when even streaming does not fit."""
        a, cfg = self.args, self.cfg
        total = a.num_hidden_layers * a.n_experts * self.n_clusters
        slot, gates, kv = self._slot_bytes(), self._gate_bytes(), self._kv_bytes()
        sizes = {n: _ram_bytes(t, self.int4) for n, t in self.tensors.items()}
        if a.tie_word_embeddings and self.int4:
            sizes.pop("lm_head.weight", None)  # the head is the embedding's bytes
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
        elif cfg.ram_bytes is None:
            return Budget(**base, **everything, streaming=0, hot_slots=total, cold_slots=0,
                          prepacked=self._prepacked(sum(attn_bytes.values()) + total * slot
                                                    + head))
        else:
            room = cfg.ram_bytes - (runtime + fixed + gates + kv + slack)
            resident = sum(attn_bytes.values()) + total * slot
            extra = self._prepacked(resident + head)  # the head too (NBitsHead)
            if room >= head + resident + extra:
                return Budget(**base, **everything, streaming=0, hot_slots=total, cold_slots=0,
                              prepacked=extra)
            if room >= head + resident:
                return Budget(**base, **everything, streaming=0, hot_slots=total, cold_slots=0)
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
                   streaming=stream, hot_slots=hot, cold_slots=cold)
        if cfg.ram_bytes is not None and b.total > cfg.ram_bytes:  # regions as a plan gave them
            self._refuse(b, "regions as the plan gives them", b.total - cfg.ram_bytes)
        return b

    def _prepacked(self, resident: int) -> int:
        """ORT's prepacked copies of resident weights beyond their bytes; 0 when they would
        not be used. Every other budget turns them off: with a part streamed, the RAM they
        take is worth more as pinned weights. (The planner's engine view has no `nbits`.)"""
        if getattr(self, "nbits", False) and resident:
            return int(resident * NBITS_EXTRA) + NBITS_WORKSPACE
        return 0

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
        b = Budget(**base, attention=att, head=head if head_pinned else 0, streaming=stream,
                   hot_slots=hot, cold_slots=0, attn_pinned=frozenset(pinned),
                   head_pinned=head_pinned)
        if room < 0:
            self._refuse(b, "", -room)
        return b

    def _refuse(self, b: Budget, what: str, short: int) -> None:
        detail = ", ".join(f"{k} {_mb(v)}" for k, v in b.lines().items() if v)
        # a smaller KV cache alone may be enough (the default context is 2048 tokens)
        per_step = self._kv_bytes_for(KVCache.step)
        steps = (b.kv - short) // per_step if per_step else 0
        fits = f"; --context {steps * KVCache.step} would fit" if steps > 0 else ""
        raise BudgetError(f"RAM budget {_mb(self.cfg.ram_bytes)} is too small: it needs at least "
                          f"{_mb(self.cfg.ram_bytes + short)} ({detail}"
                          + (f"; {what}" if what else "") + ")" + fits)

    def _unit_max(self, attn_layer: int, head_ok: bool) -> int:
        """Bytes of the largest unit that may stream: a layer's attention and clusters (as
        read, and as joined for the kernel), or a slice of the head."""
        records = self.store.records
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
        units = a.num_hidden_layers * a.n_experts
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
        positions = -(-self.context // KVCache.step) * KVCache.step  # it grows in steps
        return self._kv_bytes_for(positions)

    def _kv_bytes_for(self, positions: int) -> int:
        return kv_bytes(self.args, positions, self.cfg.kv)

    def _streamer(self) -> Streamer:
        """Units in forward order: each layer's streamed attention and (dense, not MoE) FFN
        clusters, then the head's rows in slices."""
        a, b = self.args, self.budget
        attn, _ = self._streamable()
        order = self._hotness_order()
        hot = set(order[:b.hot_slots])
        units = []
        for l in range(a.num_hidden_layers):
            u = Unit(layer=l)
            if l not in b.attn_pinned:
                for name in attn.get(l, []):
                    u.attn[name.split(".")[-2]] = (name, self.tensors[name]["shape"])
            if self.mode == "dense" and not a.is_moe:
                u.ffn = [(l, 0, c) for c in range(self.n_clusters) if (l, 0, c) not in hot]
            if u.attn or u.ffn:
                units.append(u)
        if not b.head_pinned:
            rows, step = self.tensors[self.head_name]["shape"][0], self._head_slice_rows()
            units += [Unit(rows=(lo, min(rows, lo + step))) for lo in range(0, rows, step)]
        ahead = self.cfg.prefetch_layers if self.cfg.prefetch else 0
        unit = b.streaming // self._stream_units()  # as `_stream_bytes` counts
        return Streamer(self, units, ahead, unit, head=self.head_name)

    # -- loading --------------------------------------------------------------------------
    def _read_tensor(self, name: str, out_dtype=torch.float32):
        meta = self.tensors[name]
        return quant.decode(self.reader.read_into(tensor_key(name).decode()), meta["shape"],
                            meta["dtype"], out_dtype)

    def bias(self, weight_name: str):
        name = weight_name[:-len("weight")] + "bias"
        if name not in self.tensors:
            return None
        if name not in self._biases:
            self._biases[name] = self._read_tensor(name)
        return self._biases[name]

    def _q4_linear(self, name: str):
        """The tensor as an int4 (q4, q4k) or int8 (q8, q8r) kernel module, when stored so."""
        meta = self.tensors.get(name)
        if not (self.int4 and meta):
            return None
        shape, dt = meta["shape"], meta["dtype"]
        if dt == "q4k" and self.nbits and ".self_attn." in name:
            return self._nbits_linear(name)
        if dt == "q4k":
            return QLinear.from_q4k(self.reader.read_into(tensor_key(name).decode()), shape,
                                    self.bias(name))
        if dt == "q8r" and self.nbits and name == self.head_name and self.bias(name) is None:
            scale = q8r_scales(self.reader, name, shape)
            key = tensor_key(name).decode()
            return NBitsHead(self.reader.read_into(key), shape, lambda ids: q8r_rows(
                self.reader, key, scale, ids.tolist(), shape[1]))
        if dt == "q8r" and _HAVE_INT8:
            return Q8Linear.from_q8r(self.reader.read_into(tensor_key(name).decode()), shape,
                                     self.bias(name))
        if dt == "q4" and int4_ok(shape):
            return QLinear(self.reader.read(tensor_key(name).decode()), shape, self.bias(name))
        if dt == "q8" and _HAVE_INT8:
            return Q8Linear(self.reader.read(tensor_key(name).decode()), shape, self.bias(name))
        return None

    def _build_model(self) -> Model:
        """Attention and embeddings pinned (int4 where the kernel applies) or streamed, FFNs
        tiered."""
        a = self.args
        self._biases: dict[str, torch.Tensor] = {}
        with torch.device("meta"):
            model = Model(a)
        self._swap_linears(model)
        for l, layer in enumerate(model.model.layers):
            if a.is_moe:
                layer.block_sparse_moe = TieredMoE(self, l, layer.block_sparse_moe)
            else:
                layer.mlp = TieredMLP(self, l, 0)
        model = materialize(model)
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
        """Replace nn.Linear / the embedding by int4/int8 modules where the kernels apply, and
        by streamed modules for what the budget does not pin."""
        a, b, st = self.args, self.budget, self.streamer
        if not b.head_pinned:
            shape = self.tensors[self.head_name]["shape"]
            scale = q8r_scales(self.reader, self.head_name, shape)
            heads = [i for i, u in enumerate(st.units) if u.rows]
            model.lm_head = ExactTop(StreamedHead(st, heads, scale, shape, self.reader,
                                                  self.head_name))
            if a.tie_word_embeddings:
                model.model.embed_tokens = StreamedEmbedding(self.reader, self.head_name, scale,
                                                             shape)
        if a.tie_word_embeddings and b.head_pinned:
            head = self._q4_linear("model.embed_tokens.weight")
            if head is not None:
                model.model.embed_tokens = QEmbedding(head)
                model.lm_head = ExactTop(head)
        if not a.tie_word_embeddings:
            emb = self.tensors["model.embed_tokens.weight"]
            if emb["dtype"] in ("q8r", "q4k"):  # no float copy of it
                model.model.embed_tokens = QEmbedding(self._q4_linear("model.embed_tokens.weight"))
            if b.head_pinned:
                q = self._q4_linear("lm_head.weight")
                if q is not None:
                    model.lm_head = ExactTop(q)
        for l, layer in enumerate(model.model.layers):
            att = layer.self_attn
            unit = st.unit_of(l)
            qkv = self._fused_qkv(l) if self.nbits else None
            if qkv is not None:  # all resident: norm, q|k|v and RoPE as one ORT call
                att.qkv_proj, att.q_proj, att.k_proj, att.v_proj = qkv, None, None, None
                layer.input_layernorm = nn.Identity()
            for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
                if getattr(att, p) is None:
                    continue
                if unit is not None and p in st.units[unit].attn:
                    self.bias(f"model.layers.{l}.self_attn.{p}.weight")  # pinned (in `fixed`)
                    setattr(att, p, StreamedLinear(st, unit, p))
                    continue
                q = self._q4_linear(f"model.layers.{l}.self_attn.{p}.weight")
                if q is not None:
                    setattr(att, p, q)

    def _fused_qkv(self, layer: int) -> NBitsQKV | None:
        """A layer's input norm, q|k|v and RoPE as one ORT session, when all three are q4k."""
        a = self.args
        names = [f"model.layers.{layer}.self_attn.{p}_proj.weight" for p in "qkv"]
        if any(self.tensors[n]["dtype"] != "q4k" for n in names):
            return None
        raws = [(self.reader.read_into(tensor_key(n).decode()), self.tensors[n]["shape"])
                for n in names]
        biases = [self.bias(n) for n in names]
        norm = (self._read_tensor(f"model.layers.{layer}.input_layernorm.weight"),
                a.rms_norm_eps)
        return NBitsQKV(raws, norm, a.num_attention_heads, a.num_key_value_heads, a.head_dim,
                        None if biases[0] is None else torch.cat(biases))

    def _nbits_linear(self, name: str) -> NBitsLinear:
        """A q4k projection as one MatMulNBits session."""
        raw = self.reader.read_into(tensor_key(name).decode())
        return NBitsLinear([(raw, self.tensors[name]["shape"])], self.bias(name))

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

    def _load_thresholds(self) -> None:
        """Per-neuron thresholds where the profile wrote them (its `criterion`): the layer's
        threshold is then on |act| weighed by each neuron's scale, i.e. t / s_i on |act|."""
        if "criterion" not in (self.profile or {}):
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
        a, rank = self.args, self.profile["predictor"]["rank"]
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
                    self.hot[(l, e)] = self._hot_block(l, hot)

    def _hot_block(self, layer: int, hot: list) -> tuple:
        clusters = [c for c, _ in hot]
        neurons = torch.cat([torch.arange(c * self.n, c * self.n + self.store.cluster_rows(c))
                             for c in clusters])
        prepared = [p for _, p in hot]
        if self.nbits and self.mode == "dense" and self.args.hidden_act in NBitsFFN.ACTS:
            norm = None
            if len(clusters) == self.n_clusters and not self.args.is_moe:  # the whole FFN:
                block = self.model.model.layers[layer]  # its input norm runs in the same call
                norm = (block.post_attention_layernorm.weight.detach(), self.args.rms_norm_eps)
                block.post_attention_layernorm = nn.Identity()
            return NBitsBlock(prepared, self.args.hidden_act, norm), set(clusters), neurons
        return Block(self.slots_cls, prepared), set(clusters), neurons

    def _parts(self, buf, c: int):
        """A record (bytes or a uint8 tensor) -> [(shape, slice)] of gate, up and down."""
        mv = buf if isinstance(buf, torch.Tensor) else memoryview(buf)
        return [(s, mv[o:o + nb]) for s, o, nb in self.store.cluster_parts(c)]

    def _slot_parts(self, parts):
        """What a slot keeps of (gate, up, down): the gate too unless it is pinned."""
        return parts[1:] if self.pinned_gate else parts

    def _hotness_order(self) -> list[tuple[int, int, int]]:
        """All clusters in the order they are pinned. Dense (every cluster computed every
        token): whole layers, spread out (`spread_layers`), so that a streamed layer is one
        read and one block, read while pinned layers compute; pinning the most frequent
        clusters instead left every layer with a pinned and a streamed part (30 small units,
        two blocks a layer), ~1.5x slower at the same bytes per token. Sparse or MoE: most
        frequently active first (profile order; else layer order)."""
        a = self.args
        if self.mode == "dense" and not a.is_moe:
            return [(l, 0, c) for l in spread_layers(a.num_hidden_layers)
                    for c in range(self.n_clusters)]
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
            self.cache.stats.misses += streamed
            if self.args.is_moe:  # read once routed (`routed`), or ahead by the router
                t0 = time.perf_counter()
                block = self._submit_layer(layer, expert).result()
                del self.inflight[(layer, expert)]
                self.io_wait_s += time.perf_counter() - t0
            else:
                block = self.streamer.get(self.streamer.unit_of(layer))["ffn"]
            y = y + block.ffn(x, self.act)
        return y

    def routed(self, layer: int, experts: list[int], x: torch.Tensor) -> None:
        """MoE, experts streamed: a layer's routed experts are known. At decode, read them all
        now (each overlaps the others' compute) and, ahead, those layer + 1's router picks
        from this layer's input; let go of experts read ahead for this layer but not routed."""
        if self.mode != "dense" or self.budget.hot_slots >= self._total_clusters():
            return
        for e in experts:
            if (layer, e) in self.inflight:
                self.read_ahead_hits += self._streamed_clusters(layer, e)
            else:
                self.demand_reads += self._streamed_clusters(layer, e)
        if x.shape[0] > 1:  # prefill: one expert at a time (the budget holds 2 k of them)
            return
        stale = [k for k in self.inflight if len(k) == 2 and k[0] == layer and k[1] not in experts]
        for k in stale:
            del self.inflight[k]
            self.prefetch_unused += self._streamed_clusters(*k)
        for e in experts:
            if self._streamed_clusters(layer, e):
                self._submit_layer(layer, e)
        nxt = layer + 1
        if self.cfg.prefetch and nxt < self.args.num_hidden_layers:
            _, idx = self.model.model.layers[nxt].block_sparse_moe.route(x)
            for e in idx.unique().tolist():
                if (nxt, e) not in self.inflight and self._streamed_clusters(nxt, e):
                    self.prefetched += self._streamed_clusters(nxt, e)
                    self._submit_layer(nxt, e)

    def _total_clusters(self) -> int:
        return self.args.num_hidden_layers * self.args.n_experts * self.n_clusters

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

    def join_clusters(self, keys, bufs) -> Block:
        """Streamed cluster records (read buffers) -> one Block, copied out of the buffers."""
        if self.int4:
            return Block.joined(bufs, self.store.cluster_parts(0), self.n, self.d)
        return Block(self.slots_cls, self.pool.prepare_many(
            [self._parts(buf, key[2]) for key, buf in zip(keys, bufs)]))

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
        if self.cfg.prefetch and not self.args.is_moe:
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

    # -- engine API ---------------------------------------------------------------------------
    def prefill(self, session, ids: list[int]) -> torch.Tensor:
        """The prompt in chunks under a RAM budget: activations stay inside SLACK whatever
        its length (streamed weights are then read once per chunk)."""
        session.check(len(ids))  # all of it, before a chunk is computed
        step = PREFILL_CHUNK if self.cfg.ram_bytes is not None else max(1, len(ids))
        chunks = [ids[lo:lo + step] for lo in range(0, len(ids), step)] or [ids]
        for chunk in chunks[:-1]:
            self.forward_ids(session, chunk)
        return self.forward_ids(session, chunks[-1])

    def decode(self, session, token: int) -> torch.Tensor:
        self.tokens += 1
        return self.forward_ids(session, [token])

    def reset_stats(self) -> None:
        """Start the counters `stats` reports afresh (e.g. after a prefill)."""
        self.tokens, self.io_wait_s = 0, 0.0
        self.prefetched = self.prefetch_unused = 0  # clusters read ahead; of them, let go
        self.read_ahead_hits = self.demand_reads = 0  # misses already in flight, or not
        self.cache.stats.__init__()
        self.reader.stats.__init__()

    def stats(self) -> dict:
        s, io = self.cache.stats, self.reader.stats
        return {"cache_hit_rate": s.hit_rate, "cache": vars(s).copy(),
                "store_bytes_read": io.bytes, "store_reads": io.reads,
                "store_read_sizes": io.sizes,
                "store_bytes_per_token": io.bytes / self.tokens if self.tokens else 0.0,
                "io_wait_s": self.io_wait_s, "regions": self.budget.lines(),
                "prefetched": self.prefetched, "prefetch_unused": self.prefetch_unused,
                "read_ahead_hits": self.read_ahead_hits, "demand_reads": self.demand_reads,
                "sparse": self.mode != "dense", "mode": self.mode,
                "compute": "int4" if self.int4 else "f32",
                "pinned_kernel": "ort-nbits" if self.nbits else "torch"}


def _at(t, neurons: torch.Tensor):
    return t.index_select(0, neurons) if isinstance(t, torch.Tensor) else t


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
                      pin_attention=e.get("pin_attention"), pin_head=e.get("pin_head"),
                      sparse=None if e.get("gate_pinned", True) else False,
                      select="gate")  # the planner models sparse decode with pinned gates


def load_tiered(store: Store, cfg: TierConfig | None = None) -> TieredEngine:
    return TieredEngine(store, cfg or TierConfig())
