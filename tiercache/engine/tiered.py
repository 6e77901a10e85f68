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

The engine is the wiring of parts with one job each: `layout.place` decides what is pinned and
what streams (the planner calls the same function); `ffn.ClusterFFN` holds the clusters, their
cache, reads and counters (the FFN modules hold it as a narrow `ClusterSource`); `stream.Streamer`
reads the streamed units ahead; this class measures the runtime, builds the model and reports.
"""
from __future__ import annotations

import ctypes
from functools import partial

import torch
from torch import nn

from ..errors import StoreError
from ..memory import anon_bytes, return_large_frees, trim_heap
from ..models import Model, materialize
from ..models.llama import DecoderLayer, rope_inv_freq, sanitize
from ..store import quant
from ..store.format import FFN_PARTS, Store, ffn_name, tensor_key
from ..store.reader import RecordReader
from .dense import Engine, context_limit
from ..models.kv import kv_dtype
from . import experts as moe_experts
from .ffn import ClusterFFN, Joiner, TieredMLP, TieredMoE, TieredTail
from .kernels import (_HAVE_INT8, QKV, ExactTop, Q8Linear, QEmbedding, QLinear, int4_kernel,
                      int4_ok)
from .layout import (FILE_RESERVE, MB, PREFILL_CHUNK, SLACK, SPARSE_WORTH,  # noqa: F401
                     Budget, Capacities, Kernels, StoreFacts, TierConfig, place, slack_bytes,
                     spread_layers)
from . import vram
from .nbits import NBitsFFN, NBitsHead, NBitsLinear, NBitsQKV, q4k_weight
from .stream import (StreamedEmbedding, StreamedHead, StreamedLinear, Streamer, q8r_rows,
                     q8r_scales)


class TieredEngine(Engine):
    backend = "torch (tiered)"
    cpu_only = True  # slots, int4 kernels and streamed units live in RAM

    def __init__(self, store: Store, cfg: TierConfig, backends=None):
        self.cfg, self.store, self.args = cfg, store, store.args
        self.context = context_limit(store.args, cfg.context)
        self.kv = cfg.kv
        kv_dtype(cfg.kv)  # refuse an unknown name before loading
        a = store.args
        self.n, self.d = store.cluster_size, a.hidden_size
        self.n_clusters = store.n_clusters
        self.facts = StoreFacts.from_manifest(store.manifest)
        self.kernels = Kernels.here(self.facts, cfg.compute)
        self.reader = RecordReader(store, threads=cfg.io_threads)
        store.env = None  # reads go through pread now; letting go unmaps LMDB's pages
        self.reader.drop_page_cache()
        self.tensors = store.manifest["tensors"]
        # refuses (BudgetError, with the numbers) before loading
        # the VRAM tier's device, refused here (before loading) where it is not there
        self.vram_device = vram.device(cfg.vram_device) if cfg.vram_bytes else None
        caps = Capacities(runtime=self._runtime_bytes(), ram=cfg.ram_bytes,
                          vram=cfg.vram_bytes or 0)
        self.layout = lay = place(self.facts, cfg, caps, self.kernels)
        self.budget, self.mode, self.int4, self.nbits = lay.budget, lay.mode, lay.int4, lay.nbits
        self.head_name = self.facts.head_name
        self._biases: dict[str, torch.Tensor] = {}
        join = Joiner(store.cluster_parts, self.n, self.d, store.ffn_dtype, self.int4)
        self.streamer = Streamer(self.reader, list(lay.units), lay.read_ahead, lay.unit_bytes,
                                 head=self.head_name, d=self.d, n=self.n, records=store.records,
                                 cluster_parts=store.cluster_parts, int4=self.int4,
                                 bias=self.bias, join=join)
        self.clusters = ClusterFFN(lay, store, self.reader, self.streamer, join, cfg.prefetch,
                                   expert_policy=cfg.experts, expert_cut=cfg.expert_cut)
        self.tail_layers = self._tail_layers()
        self.model = self._build_model()
        self.clusters.load(self._ffn_norms(), self._tail_parts())
        for l in self.clusters.folded_norms:  # computed inside the FFN's ORT call
            self.model.model.layers[l].post_attention_layernorm = nn.Identity()
        for l, kernel in self.clusters.tails.items():  # o_proj to the layer's end: one call
            self.model.model.layers[l].tail = TieredTail(self.clusters, l, kernel)
        if cfg.fused:
            self._fuse_layers()
        self.phases = self._bind(backends)  # decode stays on the tiered FFN's own path
        trim_heap()  # what loading (and ORT's session builds) freed goes back to the OS
        self.reset_stats()  # count what decoding reads, not the load

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
        if dt == "q4k" and ".self_attn." in name and _layer_of(name) in self.budget.nbits_layers:
            return self._nbits_linear(name)
        if dt == "q4k":
            return QLinear.from_q4k(self.reader.read_into(tensor_key(name).decode()), shape,
                                    self.bias(name))
        if (dt == "q8r" and self.budget.nbits_head and name == self.head_name
                and self.bias(name) is None):
            scale = q8r_scales(self.reader, name, shape)
            key = tensor_key(name).decode()
            return NBitsHead(self.reader.read_chunks(key), scale, shape, lambda ids: q8r_rows(
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
        a, b = self.args, self.budget
        with torch.device("meta"):
            model = Model(a)
        for l in b.vram_layers:  # built on the GPU after the rest (`_vram_modules`)
            model.model.layers[l] = nn.Identity()
        if b.vram_head and "lm_head" in model._modules:
            model.lm_head = nn.Identity()
        self._swap_linears(model)
        for l, layer in enumerate(model.model.layers):
            if l in b.vram_layers:
                continue
            if a.is_moe:
                layer.block_sparse_moe = TieredMoE(self.clusters, l, layer.block_sparse_moe)
            else:
                layer.mlp = TieredMLP(self.clusters, l, 0)
        if a.is_moe:  # each block reads ahead what the next layer's router picks
            blocks = [layer.block_sparse_moe if l not in b.vram_layers else None
                      for l, layer in enumerate(model.model.layers)]
            for blk, nxt in zip(blocks, blocks[1:]):
                if blk is not None and nxt is not None:
                    blk.route_next = partial(moe_experts.top_probs, nxt)
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
        self._vram_modules(model)
        return model.eval()

    # -- the VRAM tier ----------------------------------------------------------------------
    def _vram_modules(self, model: Model) -> None:
        """The layers and the head the layout put in VRAM, read from the store once, as
        vram.DTYPE on the VRAM device (vram.py); an MoE layer there with the experts placed
        there, the others on the CPU's expert path (vram.HybridMoE)."""
        b, a = self.budget, self.args
        for l in sorted(b.vram_layers):
            with torch.device("meta"):
                layer = DecoderLayer(a)
            if a.is_moe:
                there = frozenset(e for k, e in b.vram_experts if k == l)
                cpu = {e: TieredMLP(self.clusters, l, e) for e in range(a.n_experts)
                       if e not in there}
                layer.block_sparse_moe = vram.HybridMoE(layer.block_sparse_moe, there, cpu,
                                                        self.clusters, l)
            layer = materialize(layer)
            vram.load_layer(layer, self._layer_weights(l), f"model.layers.{l}.",
                            partial(sanitize, a))
            layer = layer.to(self.vram_device, vram.DTYPE)
            model.model.layers[l] = vram.OnDevice(layer, self.vram_device,
                                                  back=l + 1 not in b.vram_layers)
        if b.vram_head:
            model.lm_head = vram.OnDeviceHead(self._read_tensor(self.head_name),
                                              self.vram_device)
        n = len(b.vram_layers)  # (a prefix: layers 0 .. n-1)
        self.decode_run = vram.DecodeRun(
            model, n, b.vram_head and n == a.num_hidden_layers, self.vram_device,
            self.context) if n and not a.is_moe else None  # (routing is not static)

    def _layer_weights(self, layer: int):
        """(HF name, float32 tensor) of a VRAM layer, its FFN (the experts in VRAM) from their
        clusters."""
        a, prefix = self.args, f"model.layers.{layer}."
        for name in self.tensors:
            if name.startswith(prefix):
                yield name, self._read_tensor(name)
        for e in range(a.n_experts):
            if (layer, e) not in self.budget.vram_experts:
                continue
            for part, w in zip(FFN_PARTS, self.store.ffn_weights(layer, e,
                                                                 read=self.reader.read_many)):
                yield ffn_name(a, layer, e, part), w

    def _swap_linears(self, model: Model) -> None:
        """Replace nn.Linear / the embedding by int4/int8 modules where the kernels apply, and
        by streamed modules for what the budget does not pin."""
        a, b, st = self.args, self.budget, self.streamer
        if not b.head_pinned:
            shape = self.tensors[self.head_name]["shape"]
            scale = q8r_scales(self.reader, self.head_name, shape)
            heads = [i for i, u in enumerate(st.units) if u.rows]
            if not b.vram_head:
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
            table = (self._q4_linear("model.embed_tokens.weight")
                     if emb["dtype"] in ("q8r", "q4k") else None)
            if table is not None:  # no float copy of it (else: one, read from the store)
                model.model.embed_tokens = QEmbedding(table)
            if b.head_pinned and not b.vram_head:
                q = self._q4_linear("lm_head.weight")
                if q is not None:
                    model.lm_head = ExactTop(q)
        for l, layer in enumerate(model.model.layers):
            if l in b.vram_layers:
                continue
            att = layer.self_attn
            unit = st.unit_of(l)
            qkv = self._fused_qkv(l) if l in b.nbits_layers else None
            if qkv is not None:  # resident: norm, q|k|v and RoPE as one ORT call
                att.qkv_proj, att.q_proj, att.k_proj, att.v_proj = qkv, None, None, None
                layer.input_layernorm = nn.Identity()
            if l in self.tail_layers:  # computed by the layer's tail (see _tail_parts)
                att.o_proj = None
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
            parts = [getattr(att, p) for p in ("q_proj", "k_proj", "v_proj")]
            if all(isinstance(m, QLinear) for m in parts):  # resident: one kernel call
                att.qkv_proj = QKV(*parts, att.n_heads, att.n_kv, att.hd)

    def _fuse_layers(self) -> None:
        """Layers whose every weight is resident in q4 decode in one call (fused.py)."""
        from .fused import FusedLayer
        for l, layer in enumerate(self.model.model.layers):
            blocks = self.clusters.whole(l)
            if l not in self.budget.vram_layers and FusedLayer.fits(layer, blocks,
                                                                   self.args.hidden_act):
                layer.fused = FusedLayer(layer, blocks, self.clusters.count_whole)

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

    def _ffn_norms(self) -> dict[int, tuple]:
        """layer -> its post-attention RMSNorm (weight, eps), for FFNs run whole on ORT."""
        if not self.nbits or self.args.is_moe:
            return {}
        eps = self.args.rms_norm_eps
        return {l: (layer.post_attention_layernorm.weight.detach(), eps)
                for l, layer in enumerate(self.model.model.layers)
                if l in self.budget.nbits_layers and l not in self.tail_layers}

    def _tail_layers(self) -> frozenset:
        """Layers on MatMulNBits whose o_proj is q4k, computed dense with an activation ORT
        has: from o_proj to the layer's end in one NBitsTail."""
        a = self.args
        if self.mode != "dense" or a.hidden_act not in NBitsFFN.ACTS:
            return frozenset()
        return frozenset(l for l in self.budget.nbits_layers if self.tensors[
            f"model.layers.{l}.self_attn.o_proj.weight"]["dtype"] == "q4k")

    def _tail_parts(self) -> dict[int, dict]:
        """layer -> what its NBitsTail takes besides the FFN (ClusterFFN.load builds it)."""
        out = {}
        for l in sorted(self.tail_layers):
            layer, name = self.model.model.layers[l], f"model.layers.{l}.self_attn.o_proj.weight"
            key, shape = tensor_key(name).decode(), self.tensors[name]["shape"]
            out[l] = {"o_proj": lambda key=key, shape=shape: q4k_weight(
                          self.reader.read_into(key), shape),
                      "norm": (layer.post_attention_layernorm.weight.detach(),
                               self.args.rms_norm_eps),
                      "bias": self.bias(name)}
            if self.args.is_moe:
                out[l]["router"] = layer.block_sparse_moe.gate.weight.detach()
        return out

    # -- engine API ---------------------------------------------------------------------------
    def new_session(self):
        """The VRAM layers' KV caches are allocated whole on the GPU (vram.StaticKV)."""
        session = super().new_session()
        for l in self.budget.vram_layers:
            session.caches[l] = vram.StaticKV(self.args, self.context, self.vram_device)
        return session

    @torch.no_grad()
    def forward_ids(self, session, ids: list[int]) -> torch.Tensor:
        """Decode through the VRAM layers' static step (`vram.DecodeRun`: a CUDA graph on a
        GPU), then the CPU's layers and the head; prompts through the model."""
        run = self.decode_run
        if run is None or len(ids) != 1:
            return super().forward_ids(session, ids)
        session.check(1)
        m, pos = self.model, session.caches[0].offset
        h = run(session.caches, m.model.embed_tokens(torch.tensor([ids])), pos)
        if not run.head:
            cos, sin = m.rope(pos, 1, "cpu")
            for layer, cache in zip(m.model.layers[run.n:], session.caches[run.n:]):
                h = layer(h, cos, sin, cache)
            h = m.logits(h)
        session.tokens.extend(ids)
        return h[0, -1]

    @torch.no_grad()
    def prefill(self, session, ids: list[int]) -> torch.Tensor:
        """The prompt in chunks under a RAM budget: activations stay inside SLACK whatever
        its length (streamed weights are then read once per chunk)."""
        session.check(len(ids))  # all of it, before a chunk is computed
        if "prefill" in self.phases:  # a backend's prefill runs the prompt whole
            return self.phases["prefill"](session, ids)
        step = PREFILL_CHUNK if self.cfg.ram_bytes is not None else max(1, len(ids))
        chunks = [ids[lo:lo + step] for lo in range(0, len(ids), step)] or [ids]
        for chunk in chunks[:-1]:
            self.forward_ids(session, chunk)
        return self.forward_ids(session, chunks[-1])

    @torch.no_grad()
    def decode(self, session, token: int) -> torch.Tensor:
        self.tokens += 1
        return self.forward_ids(session, [token])

    def reset_stats(self) -> None:
        """Start the counters `stats` reports afresh (e.g. after a prefill)."""
        self.tokens = 0
        self.clusters.reset_stats()
        for blk in self._hybrid_blocks():
            blk.uses = [0, 0]
        self.streamer.io_wait_s = 0.0
        self.reader.stats.__init__()

    def stats(self) -> dict:
        io = self.reader.stats
        return {**self.clusters.stats(),
                "store_bytes_read": io.bytes, "store_reads": io.reads,
                "store_read_sizes": io.sizes,
                "store_bytes_per_token": io.bytes / self.tokens if self.tokens else 0.0,
                "io_wait_s": self.clusters.io_wait_s + self.streamer.io_wait_s,
                "regions": self.budget.lines(),
                "sparse": self.mode != "dense", "mode": self.mode,
                "compute": "int4" if self.int4 else "f32",
                "pinned_kernel": _pinned_kernel(self.budget, self.args.num_hidden_layers),
                "vram": self._vram_stats()}

    def _hybrid_blocks(self) -> list:
        return [m for m in self.model.modules() if isinstance(m, vram.HybridMoE)]

    def _vram_stats(self) -> dict:
        """What the VRAM tier holds; for MoE, its experts and the routed uses computed
        there and on the CPU."""
        b = self.budget
        out = {"layers": sorted(b.vram_layers), "head": b.vram_head, "bytes": self.layout.vram,
               "device": self.vram_device and str(self.vram_device)}
        if self.args.is_moe:
            blocks = self._hybrid_blocks()
            out["experts"] = len(b.vram_experts)
            out["expert_uses"] = [sum(blk.uses[0] for blk in blocks),
                                  sum(blk.uses[1] for blk in blocks)]
        return out


def _layer_of(name: str) -> int:
    """model.layers.<i>.... -> i"""
    return int(name.split(".")[2])


def _pinned_kernel(b, layers: int) -> str:
    n = len(b.nbits_layers)
    if n == 0:
        return int4_kernel()
    return "ort-nbits" if n == layers and b.nbits_head else f"ort-nbits for {n} of {layers} layers"


def _trim_malloc() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


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
                      select="gate",  # the planner models sparse decode with pinned gates
                      vram_bytes=e.get("vram_bytes"),
                      expert_cache_bytes=e.get("expert_cache_bytes"))


def load_tiered(store: Store, cfg: TierConfig | None = None, backends=None) -> TieredEngine:
    """backends: what runs prefill (backends.phases(..., decode=False)); None: torch."""
    return TieredEngine(store, cfg or TierConfig(), backends)
