"""The cost model: peak memory, store bytes per token, decode and prefill tok/s of a config.

It models tiercache's tiered engine (tiercache/engine/tiered.py): weights held either as stored
q4 (torch's int4 kernel) or expanded to f32, one compute format for all; the gate pinned whole;
a slot per cached cluster holding its up rows and down columns; active slots gathered into one
matrix per layer; misses read whole records with O_DIRECT on I/O threads and prepared there
(repacked or dequantized); the next layer's clusters active at the previous token prefetched.

Decode, per token: the fixed region (attention, gate, lm_head) is streamed through matvecs; FFN
clusters are active with probability pi_c = route * (1 - prod(1 - f_i)) over their neurons;
hot clusters (the top pi, pinned) always hit; the cold LRU's hits follow a stack-distance model
of the cyclic layer-by-layer access (a cluster re-used after k tokens hits iff fewer than the
LRU's capacity of distinct clusters were touched in between, with a normal approximation for
that count), which reproduces DESIGN.md's thrash: an LRU smaller than the per-token active set
hits almost nothing. Misses are read at the cluster's size with `io_threads` in flight on the
device's flash curve; the lookahead overlaps the reads it predicts with compute (a cluster active
at the previous token is active again with probability pi, so recall = sum pi^2 / sum pi).

VRAM (a GPU's memory, Config.vram): the engine's own split (`layout.place`: the head, then a
dense model's whole layers, an MoE model's layer trunks and then whole experts; float16, with
the KV cache) is computed on the GPU at its matvec rate, as one CUDA graph replay for a dense
model's layer prefix (vram.DecodeRun) or op by op for MoE, with the hidden state's trips
between the devices; everything above then counts the CPU's layers and FFN units only.

Prefill: every layer whole; the non-hot part of each layer's FFN is read sequentially in
`prefill_block` reads into one of two alternating buffers while the other computes.

Also `predict_mmap`: llama.cpp-style inference with every weight mmapped under a memory cap.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np

from .accounting import (FILE_EXTRA, FILE_RESERVE, SLACK, TOKENIZER_BYTES_PER_TOKEN, Holding,
                         layout_of)
from .profiles import PAGE, DeviceProfile
from .sizes import KERNEL_LAYOUTS, ModelSizes, engine_dtype

# eager torch ops in one decode layer (7 matvecs, 2 RMSNorms, RoPE, KV writes, SDPA, residuals,
# activation, threshold): the mix the probe times to get a mean op cost ("dispatch_s")
LAYER_OPS = {"matvec": 7, "add": 6, "mul": 10, "reduce": 2, "unary": 4, "cat": 2, "view": 16,
             "copy": 2, "sdpa": 1, "select": 2}
# The tiered engine spends more than that mix per layer (its FFN path adds Python list and
# cache work, dtype conversions around the int4 kernel, gathers): calibrated on the reference
# VM, where a 30-layer SmolLM2-shaped store with d=64 decoded at ~30-34 tok/s (~0.9 ms per
# layer at ~4 us per op), i.e. ~200 op-equivalents per layer plus ~4 per active cluster.
OPS_PER_LAYER = 200
OPS_PER_TOKEN = 12  # embedding, final norm, lm_head, sampling
OPS_PER_CLUSTER = 4  # per active cluster: Python bookkeeping (cache lookup, slot index)
CLUSTER_OBJ_BYTES = 128  # cache entry per cached cluster (slots live in preallocated pools)
DECODE_POSITION = 256  # typical KV length a decode step attends over (capped by the context)
# one replay of the VRAM layers' captured decode step (vram.DecodeRun): launch and
# synchronisation, gpt-fast class (assumption; no GPU has measured it here yet)
GRAPH_LAUNCH_S = 30e-6
MIN_HEADROOM = 4 << 20  # page cache / allocator slack the budget keeps for buffered reads
ENGINE_SLACK = SLACK  # the engine keeps this much for activations, logits, allocator slop
# Dense-stream decode (tiercache/engine/tiered.py `_dense_ffn`), in op-equivalents of the
# probe's dispatch_s: a layer with everything pinned (attention, the pinned block's three int4
# matmuls, norms, residuals, Python), and what a layer that streams adds (a job submitted to an
# I/O thread, the wait on its future, the streamed block's joins and matmuls). Calibrated on the
# reference VM against tools/plan_check.py runs of SmolLM2-135M q4 (1 thread): everything pinned
# ~30 tok/s; without lookahead, every cluster streamed (51 MB/token) 8.0 tok/s and 309 of 720
# (22 MB/token) 10.2 tok/s, i.e. ~1.5 ms per streaming layer beyond its bytes' read and copy;
# looking one layer ahead, 606 of 720 (43 MB/token) 10.9 tok/s: ~0.65 ms per layer. The
# difference is the hand-off to the I/O thread that a lookahead hides.
OPS_DENSE_LAYER = 100
OPS_STREAM_LAYER = 150
OPS_STREAM_WAIT = 200  # per streaming unit, without lookahead
# Streamed attention and head (tiercache/engine/stream.py): a layer's four q4k projections are
# one more read in its unit, each cloned out of the read buffer and wrapped for the int4 kernel;
# the head's rows come in slices of ~2 MiB, each a unit of its own (a job, a wait, a clone, one
# int8 matmul into its part of the logits), and a tied embedding reads its row (one page).
OPS_STREAM_ATTN = 40  # per layer whose attention streams
OPS_HEAD_SLICE = 60  # per head slice
# Share of the streamed reads' time hidden behind compute (of the smaller of the two), by units
# read ahead and I/O threads (TierConfig.prefetch_layers, io_threads; more counts as 2).
# Their order comes from SmolLM2 q4 under a 278 MiB cap (34-39 MB/token, engine's own sizing,
# two runs each): ahead 0 12.3 tok/s, ahead 1 17-18.5 (either thread count), ahead 2 with one
# thread 19-20, with two 22-25; their level from tools/plan_check.py (2026-11-22 01:35): at
# 232 MiB, 94 MB/token ran at 13.5 tok/s, reads fully under compute. Before the streamer
# stopped doing Python work per read (same day) the reads hardly overlapped (0 fitted then).
IO_OVERLAP = {(1, 1): 0.2, (1, 2): 0.2, (2, 1): 0.55, (2, 2): 0.9}
# the engine's misses cost ~1.5x the probe's emulation of one (cache admission, futures,
# prefetch bookkeeping; measured: ~1.2 ms per miss decoding SmolLM2 q4 at 400-420 MB)
MISS_CALIBRATION = 1.5


@dataclass(frozen=True)
class Config:
    """One point of the search space (what plan["engine"] records)."""
    decode_cluster: int  # neurons per decode read / cache unit (a multiple of the store's)
    hot_clusters: int  # clusters pinned, chosen by activation frequency across layers
    cold_clusters: int  # capacity of the cold LRU, in clusters
    io_threads: int = 1
    prefetch_layers: int = 1  # the engine looks one layer ahead (0: off)
    prefill_block: int = 1 << 20
    hold_fixed: str | None = None  # dtype the fixed region is held in; None: as stored (q4 int4)
    hold_ffn: str | None = None  # the engine has one compute format: equal to hold_fixed
    vram: int = 0  # bytes given to the engine's VRAM tier (TierConfig.vram_bytes); 0: none
    expert_cache: int = 0  # MoE: whole experts' bytes the engine's expert cache holds
                           # (TierConfig.expert_cache_bytes); the rest are read when routed
    decode_backend: str = "torch"
    prefill_backend: str = "torch"
    io_mode: str = "direct"  # "direct" (O_DIRECT, no page cache) or "buffered"
    context: int = 2048
    prompt_tokens: int = 128
    pin_attention: int | None = None  # dense stream: layers whose attention is pinned (the
    pin_head: bool = True             # first ones; None: all), and whether the head is


@dataclass
class Prediction:
    memory: dict  # region -> bytes (RAM), plus "vram"
    peak_memory_bytes: int
    peak_vram_bytes: int
    decode_tok_s: float
    prefill_tok_s: float
    store_bytes_per_token: float
    reads_per_token: float
    hit_rate: float
    bottleneck: str
    decode_s: dict  # seconds per token by component
    prefill_s: dict
    need_bytes: int = 0  # the least --ram the engine accepts for this config (>= peak)

    def to_dict(self) -> dict:
        return asdict(self)


# -- FFN activity -------------------------------------------------------------------------------
class Activity:
    """Per-cluster access probabilities of a model at one decode cluster size, sorted hot first."""

    def __init__(self, sizes: ModelSizes, cluster: int, skip: frozenset = frozenset()):
        self.cluster = cluster
        measured = sizes.cluster_active if cluster == sizes.cluster_size else None
        units = [(np.asarray(a) if measured else _cluster_pi(f, cluster)) * sizes.route_prob
                 for i, (f, a) in enumerate(zip(sizes.freq, measured or sizes.freq))
                 if divmod(i, sizes.experts) not in skip]  # (FFN units in VRAM: not the CPU's)
        # P(every cluster of a layer active): then its slots are one run, gathered as a view
        self.p_all = float(np.mean([np.prod(u) for u in units])) if units else 1.0
        self.pi = np.sort(np.concatenate(units or [np.zeros(0)]))[::-1]  # the top ones go hot
        self.n = len(self.pi)
        self._cum = np.concatenate([[0.0], np.cumsum(self.pi)])
        self._cum2 = np.concatenate([[0.0], np.cumsum(self.pi ** 2)])

    def active_clusters(self) -> float:
        return float(self._cum[-1])

    def hot_hits(self, hot: int) -> float:
        return float(self._cum[min(hot, self.n)])

    def recall(self, hot: int) -> float:
        """Share of the cold clusters' uses that were also used at the previous token."""
        h = min(hot, self.n)
        used = self._cum[-1] - self._cum[h]
        return float((self._cum2[-1] - self._cum2[h]) / used) if used > 0 else 1.0

    def cold_misses(self, hot: int, cold: int) -> float:
        """Expected cold-region misses per token with `cold` clusters of LRU after `hot` pinned."""
        return _lru_misses(self.pi[min(hot, self.n):], cold)


def _cluster_pi(freq: np.ndarray, cluster: int) -> np.ndarray:
    """P(at least one neuron of a cluster is active), neurons taken as independent."""
    starts = np.arange(0, len(freq), cluster)
    with np.errstate(divide="ignore"):
        logq = np.log1p(-np.clip(freq, 0, 1))
    return 1.0 - np.exp(np.add.reduceat(logq, starts))


def even_expert_misses(experts: int, use: float, capacity: int) -> float:
    """Experts read per token by an LRU of `capacity` whole experts over `experts` of them,
    each routed with probability `use` per token (even routing: a lower bound on the hits of
    real routing, which repeats experts)."""
    return _lru_misses(np.full(experts, use), capacity)


def _lru_misses(tail: np.ndarray, capacity: int, bins: int = 256) -> float:
    """Expected misses per token of an LRU of `capacity` clusters over clusters with access
    probabilities `tail` (sorted); clusters of similar probability are taken together."""
    if len(tail) == 0 or capacity <= 0:
        return float(tail.sum())
    if capacity >= len(tail):
        return 0.0  # the whole tail fits: misses only while warming up
    starts = np.linspace(0, len(tail), min(bins, len(tail)) + 1).astype(int)[:-1]
    count = np.diff(np.append(starts, len(tail)))
    pi = np.add.reduceat(tail, starts) / count
    return _lru_binned(pi.tobytes(), count.tobytes(), int(capacity))


@lru_cache(maxsize=8192)
def _lru_binned(pi_b: bytes, count_b: bytes, capacity: int) -> float:
    pi, count = np.frombuffer(pi_b), np.frombuffer(count_b, dtype=np.int64)
    k = np.arange(1, 129)[:, None]  # re-use distance in tokens (longer ones miss)
    seen = 1.0 - (1.0 - pi[None, :]) ** k  # P(a cluster is touched within k tokens)
    distinct = (seen * count).sum(1)  # distinct clusters touched between two uses k apart
    sd = np.sqrt(np.maximum((seen * (1 - seen) * count).sum(1), 1e-9))
    fits = 0.5 * (1 + _erf_np((capacity - distinct) / (sd * math.sqrt(2))))  # [K]
    gap = pi[None, :] * (1 - pi[None, :]) ** (k - 1)  # P(the next use is k tokens later)
    hit = (gap * fits[:, None]).sum(0)
    return float((count * pi * (1 - hit)).sum())


def _erf_np(x: np.ndarray) -> np.ndarray:
    # Abramowitz-Stegun 7.1.26 (|error| < 1.5e-7): numpy has no erf of its own
    s = np.sign(x)
    a = np.abs(x)
    t = 1 / (1 + 0.3275911 * a)
    y = 1 - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496735) * t
             + 0.254829592) * t * np.exp(-a * a)
    return s * y


# -- the model -----------------------------------------------------------------------------------
class CostModel:
    """Predictions for one model on one device; caches what does not depend on the config."""

    def __init__(self, sizes: ModelSizes, device: DeviceProfile):
        self.m, self.dev = sizes, device
        self._act: dict[int, Activity] = {}
        self._lay: dict[str, Holding] = {}
        self._tio: dict[tuple, float] = {}  # dense stream: read time per token by what streams

    def layout(self, c: Config | None = None, hold: str | None = None) -> Holding | None:
        """The engine's own accounting for this model (a store, or an estimate of one), with
        c's VRAM tier placed first; None without a manifest."""
        vram, context = 0, 2048
        if c is not None:
            hold, vram, context = c.hold_ffn, c.vram, c.context
        if self.m.manifest is None:
            return None
        key = ("f32" if hold == "f32" else "auto", vram, context if vram else None)
        if key not in self._lay:
            self._lay[key] = layout_of(self.m.manifest, key[0], vram, context)
        return self._lay[key]

    def vram_split(self, c: Config) -> tuple[frozenset, bool, frozenset]:
        """(layers in VRAM, whether the head is, FFN units (layer, expert) there) for c, as the
        engine places them."""
        lay = self.layout(c) if c.vram else None
        if lay is None:
            return frozenset(), False, frozenset()
        return lay.vram_layers, lay.vram_head, lay.vram_experts

    def runtime_bytes(self, gpu: bool = False) -> dict:
        """Memory before the engine loads: python + torch, the tokenizer (anonymous), and
        the file pages decoding uses beyond the engine's own reserve (FILE_EXTRA); with a
        GPU in use, what its runtime (the CUDA context) adds to the process."""
        out = {"runtime": self.dev.runtime_anon,
               "tokenizer": self.m.args.vocab_size * TOKENIZER_BYTES_PER_TOKEN,
               "file_pages": FILE_EXTRA}
        if gpu:
            out["gpu_runtime"] = self.dev.gpu_runtime_overhead_bytes
        return out

    def activity(self, cluster: int, gpu_units: frozenset = frozenset()) -> Activity:
        """FFN activity of the CPU's FFN units (all but `gpu_units`, (layer, expert) pairs) at
        a decode cluster size."""
        key = (cluster, gpu_units)
        if key not in self._act:
            self._act[key] = Activity(self.m, cluster, gpu_units)
        return self._act[key]

    def act(self, c: Config) -> Activity:
        return self.activity(c.decode_cluster, self.vram_split(c)[2])

    # -- bytes per cluster --------------------------------------------------------------------
    def record_bytes(self, cluster: int) -> float:
        """Bytes one decode read fetches: whole records, as stored."""
        return cluster * self.m.neuron_bytes()

    def cached_bytes(self, cluster: int, hold: str | None) -> float:
        """Bytes a cached cluster's slot takes: up rows and down columns (the gate is pinned),
        in the engine's format: int4 (q4 bytes) or f32."""
        lay = self.layout(hold=hold)
        if lay is not None and cluster == lay.n:
            return lay.slot
        parts = 2 if self.m.gate_pinned else 3
        return cluster * self.m.neuron_bytes(self.hold_dtype(hold), parts) + CLUSTER_OBJ_BYTES

    def hold_dtype(self, hold: str | None, ffn: bool = True) -> str:
        """The FFN's compute dtype (or, for ffn=False, the stored model dtype's)."""
        return engine_dtype(self.m.ffn_dtype if ffn else self.m.dtype, hold, ffn)

    # -- memory -------------------------------------------------------------------------------
    def memory(self, c: Config, misses_per_layer: float = 1.0) -> dict:
        lay = self.layout(c)
        if lay is not None:  # what the engine counts against --ram, and puts in VRAM
            run = self.runtime_bytes(gpu=c.vram > 0)
            r = lay.regions(sum(run.values()), c.context, c.hot_clusters,
                            c.cold_clusters, c.prefetch_layers, c.io_threads,
                            c.pin_attention, c.pin_head, c.expert_cache)
            fixed = r["fixed"] + r["attention"] + r["head"] + r["gates"]
            return {"ram": {**run, "file_reserve": FILE_RESERVE, "fixed": fixed,
                            # (an MoE's expert cache is its cold region: an LRU of experts)
                            "hot": r["hot"], "cold": r["cold"] + r["experts"], "kv": r["kv"],
                            "buffers": r["streaming"], "activations": r["slack"],
                            "page_cache": self._page_cache(c)},
                    "vram": lay.vram_bytes if c.vram else 0}
        m, dev = self.m, self.dev  # no manifest: the tiered engine's shape, all on the CPU
        cb = self.cached_bytes(c.decode_cluster, c.hold_ffn)
        ram = {"runtime": dev.runtime_overhead_bytes,
               "tokenizer": m.args.vocab_size * TOKENIZER_BYTES_PER_TOKEN,
               "fixed": m.fixed_bytes(c.hold_fixed), "hot": c.hot_clusters * cb,
               "cold": c.cold_clusters * cb, "kv": c.context * m.kv_bytes_per_token(),
               "buffers": self._buffers(c, misses_per_layer),
               "activations": self._activations(c), "page_cache": self._page_cache(c)}
        return {"ram": ram, "vram": 0}

    def predict_memory_only(self, c: Config, misses_per_layer: float = 1.0) -> dict:
        mem = self.memory(c, misses_per_layer)
        total = sum(mem["ram"].values())
        return {"ram": mem["ram"], "ram_total": total, "vram": mem["vram"], "need": total}

    def _buffers(self, c: Config, misses_per_layer: float) -> float:
        """Records in flight, and each layer's gathered slots (copied for the matmul)."""
        rec = self.record_bytes(c.decode_cluster)
        reads = max(1.0, misses_per_layer) * (c.prefetch_layers + 1) * max(1, c.io_threads) * rec
        per_layer = -(-self.m.F // c.decode_cluster) * self.m.experts_per_tok
        gathered = per_layer * (self.cached_bytes(c.decode_cluster, c.hold_ffn)
                                - CLUSTER_OBJ_BYTES)
        return reads + gathered

    def _activations(self, c: Config) -> float:
        """A prompt's activations, logits and allocator slack: at least the engine's SLACK."""
        a, T = self.m.args, c.prompt_tokens
        per_tok = 4 * a.hidden_size + 3 * a.intermediate_size \
            + (a.num_attention_heads + 2 * a.num_key_value_heads) * a.head_dim
        scores = a.num_attention_heads * T * min(T, c.context)
        return max(ENGINE_SLACK, 4 * (T * per_tok + scores + 2 * a.vocab_size))

    def _page_cache(self, c: Config) -> float:
        return MIN_HEADROOM if c.io_mode == "buffered" else 0.0

    # -- decode -------------------------------------------------------------------------------
    def predict(self, c: Config, prefill: bool = True) -> Prediction:
        """Everything about `c`; prefill=False leaves prefill out (the search's inner loop)."""
        act = self.act(c)
        active = act.active_clusters()
        lay = self.layout(c)
        if lay is not None and lay.dense:  # every cluster every token: pinned or streamed
            hot = min(lay.total, c.hot_clusters + c.cold_clusters)
            misses = active * (1 - hot / lay.total) if lay.total else 0.0  # (all in VRAM)
            if self.m.args.is_moe:  # experts read when routed, as a share of the clusters
                uses = self._expert_uses(c)
                misses = active * self._expert_misses(c, lay) / uses if uses else 0.0
            t_dec, io_b, reads = self._dense_decode_time(c, lay, hot)
        else:
            misses = act.cold_misses(c.hot_clusters, c.cold_clusters)
            t_dec, io_b, reads = self._decode_time(c, act, active, misses)
        mem = self.memory(c, misses / max(1, self._cpu_layers(c)))
        t_pre = self._prefill_time(c, act) if prefill else {"total": float("inf")}
        ram = mem["ram"]
        peak = int(sum(ram.values()))
        return Prediction(
            memory={**{k: int(v) for k, v in ram.items()}, "vram": mem["vram"]},
            peak_memory_bytes=peak, peak_vram_bytes=mem["vram"],
            decode_tok_s=1.0 / t_dec["total"], prefill_tok_s=c.prompt_tokens / t_pre["total"],
            store_bytes_per_token=io_b, reads_per_token=reads,
            hit_rate=1.0 - misses / active if active else 1.0,
            bottleneck=_bottleneck(t_dec), decode_s=t_dec, prefill_s=t_pre,
            need_bytes=peak)

    def _dense_decode_time(self, c: Config, lay: Holding, hot: int):
        """Dense-stream decode: fixed matvecs, every cluster's gate|up|down through the int4
        (or f32) kernel, and what is not pinned (FFN clusters, attention layers, head slices)
        read each token, 1 + prefetch_layers units' jobs in flight on the I/O threads, copied
        out of the read buffer (one copy); each unit costs a job and a wait besides."""
        m, dev = self.m, self.dev
        # an MoE's experts are read whole when routed and missed (its clusters are not
        # pinned in order): what streams beside them is attention and the head's slices
        moe = m.args.is_moe
        s = lay.streamed(lay.total if moe else hot, c.pin_attention, c.pin_head)
        missed = self._expert_misses(c, lay) if moe else 0.0
        expert_read = missed * lay.expert_bytes
        dt = self.hold_dtype(c.hold_ffn)
        dense = self._cpu_dense(c)
        disp = dev.dispatch("torch")
        n = self._cpu_layers(c)
        kv = n * 2 * min(DECODE_POSITION, c.context) * m.args.num_key_value_heads \
            * m.args.head_dim * 4
        comp = {
            "fixed_matvec": sum(nb / dev.matvec("torch", d) for d, nb in dense.items()),
            "ffn_matvec": lay.total * m.experts_per_tok / m.experts * lay.slot
            / dev.matvec("torch", dt),
            "gather": (s["bytes"] + expert_read) / dev.copy_bw,
            "cluster_ops": s["units"] * disp * (0 if c.prefetch_layers else OPS_STREAM_WAIT)
            + ((s["layers"] + missed) * OPS_STREAM_LAYER + s["attn_layers"] * OPS_STREAM_ATTN
               + s["head_slices"] * OPS_HEAD_SLICE) * disp,
            "attention_kv": kv / dev.memory_bw,
            "dispatch": (OPS_DENSE_LAYER * self._cpu_ffn_layers(c) + OPS_PER_TOKEN) * disp,
            **self._vram_decode(c),
        }
        inflight = min(max(1, c.io_threads), 1 + c.prefetch_layers)
        key = (hot, c.pin_attention, c.pin_head, inflight, c.vram, c.vram and c.context)
        if key not in self._tio:
            self._tio[key] = sum(dev.read_time(r, r, inflight) for r in s["runs"])
        t_io = self._tio[key]
        if s["head_slices"] and m.args.tie_word_embeddings:  # the token's embedding row
            t_io += dev.read_time(PAGE, PAGE, 1)
        t_io += dev.read_time(expert_read, lay.record, max(1, c.io_threads))
        busy = sum(comp.values())
        # reads run ahead on I/O threads: how much of them compute hides depends on how far
        share = IO_OVERLAP.get((min(c.prefetch_layers, 2), min(max(1, c.io_threads), 2)), 0.0)
        overlap = share * min(t_io, busy)
        exposed = t_io - overlap
        total = busy + exposed
        return ({**comp, "io_overlapped": overlap, "io_exposed": exposed, "total": total},
                float(s["bytes"] + expert_read), float(s["reads"] + missed * lay.n_clusters))

    def _expert_uses(self, c: Config) -> float:
        """Routed uses a token makes of the CPU's experts (k of E in each layer)."""
        m = self.m
        return (m.layers * m.experts - len(self.vram_split(c)[2])) * m.experts_per_tok / m.experts

    def _expert_misses(self, c: Config, lay: Holding) -> float:
        """MoE: experts a token reads, the engine's expert cache holding c.expert_cache bytes
        of whole experts (an LRU), routing even: each of the CPU's experts used with
        probability k / E per token. Real routing repeats experts more (a lower bound on the
        hits: BENCHMARKS.md, the lean runtime in plans)."""
        m = self.m
        if c.hot_clusters >= lay.total:
            return 0.0
        units = m.layers * m.experts - len(self.vram_split(c)[2])
        return even_expert_misses(units, m.experts_per_tok / m.experts,
                                  int(c.expert_cache // lay.expert_bytes))

    def _decode_time(self, c: Config, act: Activity, active: float, misses: float):
        dev = self.dev
        rec = self.record_bytes(c.decode_cluster)
        # lookahead: last token's active clusters of the next layer, read while this one runs
        recall = act.recall(c.hot_clusters) if c.prefetch_layers else 0.0
        # of the clusters prefetched (used at the last token), a share 1 - recall goes unused
        wasted = misses * (1 - recall) if c.prefetch_layers else 0.0
        reads = misses + wasted
        per_layer = reads / max(1, self._cpu_layers(c))
        inflight = min(c.io_threads, max(1.0, per_layer * (c.prefetch_layers + 1)))
        t_read = dev.read_time(reads * rec, rec, inflight)
        t_soft = reads * self.miss_cost(c)  # Python under the GIL: it does not overlap
        comp = self._decode_compute(c, act, active)
        overlap = t_read * recall
        exposed = t_read - overlap + t_soft
        busy = sum(comp.values())
        total = exposed + max(busy, overlap)
        return ({**comp, "io_overlapped": overlap, "io_exposed": exposed, "total": total},
                reads * rec, reads)

    def miss_cost(self, c: Config) -> float:
        """Seconds of software per miss beyond its read (thread handoff, checksum, repack or
        dequantize into a slot): the probe's figure for a 64 KiB record, plus the
        byte-proportional part for larger ones. Python-bound, so threads do not divide it."""
        extra = max(0.0, self.record_bytes(c.decode_cluster) - (1 << 16))
        return self.dev.miss_overhead_s * MISS_CALIBRATION + extra / self.prepare_rate(c)

    def prepare_rate(self, c: Config) -> float:
        """Stored bytes/s an I/O thread turns into slot format (int4 repack or f32)."""
        dev, dt = self.dev, self.m.ffn_dtype
        if c.hold_ffn is None and dt == "q4":
            return float(dev.compute["torch"].get("repack", {}).get("q4") or dev.copy_bw)
        return dev.dequant("torch", dt) if dt != "f32" else dev.copy_bw

    def _decode_compute(self, c: Config, act: Activity, active: float) -> dict:
        m, dev = self.m, self.dev
        cpu = "torch"
        dt_ffn = self.hold_dtype(c.hold_ffn)
        slot = self.cached_bytes(c.decode_cluster, c.hold_ffn) - CLUSTER_OBJ_BYTES
        n = self._cpu_layers(c)
        kv = n * 2 * min(DECODE_POSITION, c.context) * m.args.num_key_value_heads \
            * m.args.head_dim * 4
        dense = self._cpu_dense(c)
        return {
            "fixed_matvec": sum(nb / dev.matvec(cpu, dt) for dt, nb in dense.items()),
            # active clusters' slots are gathered into one matrix, then multiplied; the up
            # half is a view when a whole layer is active, the down half is always copied
            "ffn_matvec": active * slot / dev.matvec(cpu, dt_ffn),
            "gather": active * slot * (1 - act.p_all / 2) / dev.copy_bw,
            "cluster_ops": active * OPS_PER_CLUSTER * dev.dispatch(cpu),
            "attention_kv": kv / dev.memory_bw,
            "dispatch": (OPS_PER_LAYER * self._cpu_ffn_layers(c) + OPS_PER_TOKEN)
            * dev.dispatch(cpu),
            **self._vram_decode(c),
        }

    def _cpu_layers(self, c: Config) -> int:
        """Layers whose trunk (attention, norms, router) computes on the CPU."""
        return self.m.layers - len(self.vram_split(c)[0])

    def _cpu_ffn_layers(self, c: Config) -> int:
        """Layers with an FFN unit on the CPU (an MoE layer in VRAM may have experts there):
        each costs the CPU's per-layer work."""
        return self.m.layers - self._whole_ffn_layers(c)

    def _whole_ffn_layers(self, c: Config) -> int:
        """Layers with every FFN unit in VRAM."""
        per_layer = Counter(l for l, _ in self.vram_split(c)[2])
        return sum(1 for k in per_layer.values() if k == self.m.experts)

    def _cpu_dense(self, c: Config) -> dict:
        """{dtype: bytes} of fixed weights the CPU's decode step multiplies with
        (dense_bytes_per_token less the VRAM layers' share and a head in VRAM)."""
        m = self.m
        layers, on_gpu, units = self.vram_split(c)
        if not layers and not on_gpu:
            return m.dense_bytes_per_token(c.hold_fixed)
        keep = 1 - len(layers) / m.layers
        head = m.parts["lm_head"] if m.parts["lm_head"].tensors else m.parts["embed"]
        out: dict = {}
        for part, share in ((m.parts["attn"], keep), (m.parts["router"], keep),
                            (m.parts["other"], 1.0), (head, 0.0 if on_gpu else 1.0)):
            for dt, nb in part.by_dtype(c.hold_fixed).items():
                out[dt] = out.get(dt, 0) + nb * share
        gdt = engine_dtype(m.ffn_dtype, c.hold_fixed, ffn=True)
        out[gdt] = out.get(gdt, 0) + m.gate_bytes(c.hold_fixed) * (1 - len(units) / m.ffn_units)
        return out

    def _vram_decode(self, c: Config) -> dict:
        """Seconds a decode step spends on the VRAM tier: its float16 weights (the trunks, and
        the FFN units there as often as they are routed: k of E experts, evenly) and KV at the
        GPU's matvec rate, then its launches: one graph replay for a dense model's layers,
        each op for MoE's; and the hidden state's trips between the devices (there and back;
        twice when the CPU's layers sit between the VRAM layers and a head in VRAM; for each
        MoE layer with experts on the CPU)."""
        layers, on_gpu, units = self.vram_split(c)
        if not layers and not on_gpu:
            return {}
        m, dev = self.m, self.dev
        be = next(iter(dev.backends("gpu")), "torch:cuda")
        n = len(layers)
        trunk = (m.parts["attn"].elements + m.parts["router"].elements) / m.layers
        uses = len(units) * m.experts_per_tok / m.experts  # FFN units run per token there
        head = m.parts["lm_head"] if m.parts["lm_head"].tensors else m.parts["embed"]
        weights = 2 * (n * trunk + uses * 3 * m.F * m.d + (head.elements if on_gpu else 0))
        kv = n * 2 * min(DECODE_POSITION, c.context) * m.args.num_key_value_heads \
            * m.args.head_dim * 2
        graph = n and not m.args.is_moe
        launches = (GRAPH_LAUNCH_S if graph else OPS_PER_LAYER * n * dev.dispatch(be)) \
            + (0 if graph and n == m.layers else OPS_PER_TOKEN * dev.dispatch(be) * on_gpu)
        trips = 2 * (1 + (0 < n < m.layers and on_gpu))
        if m.args.is_moe:  # a VRAM layer whose routed experts may be on the CPU
            trips += 2 * (n - self._whole_ffn_layers(c))
        return {"gpu_matvec": weights / dev.matvec(be, "f16") + kv / dev.vram_bw,
                "gpu_dispatch": launches + trips * dev.h2d_latency_s}

    # -- prefill ------------------------------------------------------------------------------
    def _prefill_time(self, c: Config, act: Activity) -> dict:
        m, dev, T = self.m, self.dev, c.prompt_tokens
        be = c.prefill_backend
        hot_share = min(1.0, c.hot_clusters / act.n) if act.n else 0.0
        # VRAM's shares (read at load, computed there): its layers' trunks, its FFN units
        cpu = self._cpu_layers(c) / m.layers
        cpu_ffn = 1 - len(self.vram_split(c)[2]) / m.ffn_units
        ffn_stream = m.ffn_bytes() * cpu_ffn * (1 - hot_share)  # hot clusters are not re-read
        lay = self.layout(c)
        if lay is not None and lay.dense:  # streamed attention and head rows: read once too
            s = lay.streamed(lay.total, c.pin_attention, c.pin_head)
            ffn_stream += s["attn_bytes"] + s["head_bytes"]
        attn_flops = 2 * m.layers * m.args.num_attention_heads * m.args.head_dim * T * T
        fixed_flops = 2 * T * (m.active_params() - _head_params(m) - _ffn_params(m)) \
            + 2 * _head_params(m) + attn_flops
        ffn_flops = 2 * T * _ffn_params(m)
        dense = m.dense_bytes_per_token(c.hold_fixed)  # FLOPs split as the bytes are held
        elems = {dt: nb / _bytes_per_weight(dt) for dt, nb in dense.items()}
        total = sum(elems.values()) or 1.0
        t_fixed = sum(fixed_flops * e / total / self._matmul(be, dt, T) for dt, e in elems.items())
        t_ffn = ffn_flops / self._matmul(be, self.hold_dtype(c.hold_ffn), T)
        t_mm = cpu * t_fixed + cpu_ffn * t_ffn
        if cpu < 1:  # the rest on the GPU, in float16
            gpu = next(iter(dev.backends("gpu")), "torch:cuda")
            t_mm += ((1 - cpu) * fixed_flops + (1 - cpu_ffn) * ffn_flops) \
                / self._matmul(gpu, "f16", T)
        rec = self.record_bytes(c.decode_cluster)
        t_io = dev.read_time(ffn_stream, c.prefill_block, c.io_threads) \
            + ffn_stream / rec * self.miss_cost(c)  # misses are prepared into slots, as in decode
        t_disp = (OPS_PER_LAYER * m.layers + OPS_PER_TOKEN) * dev.dispatch(be)
        busy = t_mm + t_disp
        first = t_io / max(1, m.layers)  # the first layer's read is not overlapped
        return {"matmul": t_mm, "dispatch": t_disp, "io": t_io,
                "total": first + max(busy, t_io - first)}

    def _matmul(self, be: str, dtype: str, tokens: int) -> float:
        """FLOP/s for weights held in `dtype`. A backend without that dtype multiplies in f32
        after torch dequantizes each weight once per prompt (2 * tokens FLOPs per weight)."""
        dev = self.dev
        table = dev.compute[be].get("matmul", {})
        if dtype in table:
            return float(table[dtype])
        f32 = float(table.get("f32") or dev.matmul("torch", "f32"))
        deq_per_flop = _bytes_per_weight(dtype) / dev.dequant("torch", dtype) / (2 * tokens)
        return 1 / (1 / f32 + deq_per_flop)


def _ffn_params(m: ModelSizes) -> int:
    return m.layers * m.experts_per_tok * 3 * m.F * m.d


def _bytes_per_weight(dtype: str) -> float:
    dtype = KERNEL_LAYOUTS.get(dtype, dtype)
    return {"f32": 4, "f16": 2, "bf16": 2, "q8": 1 + 2 / 32, "q4": 0.5 + 4 / 32,
            "q4k": 0.5 + 4 / 32}[dtype]


def _head_params(m: ModelSizes) -> int:
    head = m.parts["lm_head"] if m.parts["lm_head"].tensors else m.parts["embed"]
    return head.elements


def _bottleneck(t: dict) -> str:
    io = t["io_exposed"] + t["io_overlapped"]
    memory = (t["fixed_matvec"] + t["ffn_matvec"] + t["attention_kv"] + t["gather"]
              + t.get("gpu_matvec", 0.0))
    compute = t["dispatch"] + t["cluster_ops"] + t.get("gpu_dispatch", 0.0)
    if io >= max(memory, compute):
        return "io"
    return "memory" if memory >= compute else "compute"


# -- llama.cpp-style mmap -----------------------------------------------------------------------
def predict_mmap(weight_bytes: float, device: DeviceProfile, cap_bytes: float,
                 footprint_bytes: float, uncapped_tok_s: float | None = None,
                 prompt_tokens: int = 128, uncapped_prefill_tok_s: float | None = None,
                 readahead_bytes: int | None = None) -> dict:
    """Every weight mmapped, the process capped at `cap_bytes` (anonymous + page cache).

    Each token touches all `weight_bytes` in file order. The page cache left under the cap
    (P = cap - footprint) keeps a stable part of them (the kernel's active list protects pages
    used on every token), so a token re-reads the other W - P bytes through page faults. A fault
    reads its page plus read-ahead, but under pressure read-ahead pages are evicted before they
    are used: the useful read per fault falls from the read-ahead window R (nothing evicted) to
    one page (nothing resident), geometrically in the resident share: 4 KiB * (R/4 KiB)^(P/W).
    Faults are synchronous: one read in flight (qd 1). R is the kernel's read-ahead window,
    taken as at most 128 KiB (Linux's default): a bigger read-around window under a cap evicts
    its own pages before they are used (and the kernel turns mmap read-around off once faults
    mostly miss), so it buys nothing there.
    """
    W = float(weight_bytes)
    P = max(0.0, cap_bytes - footprint_bytes)
    R = readahead_bytes or min(device.readahead_bytes, 128 * 1024)
    compute = 1 / uncapped_tok_s if uncapped_tok_s else W / device.memory_bw
    share = min(1.0, P / W) if W else 1.0
    miss = max(0.0, W - P)
    block = PAGE * (R / PAGE) ** share
    t_io = device.read_time(miss, block, 1) if miss else 0.0
    pre_compute = prompt_tokens / uncapped_prefill_tok_s if uncapped_prefill_tok_s \
        else prompt_tokens * compute / 4
    return {"cap_bytes": int(cap_bytes), "page_cache_bytes": int(P), "resident_share": share,
            "miss_bytes_per_token": miss, "read_block_bytes": block,
            "read_bw": device.flash_bw(block, 1), "io_s_per_token": t_io,
            "compute_s_per_token": compute, "decode_tok_s": 1 / (compute + t_io),
            "prefill_tok_s": prompt_tokens / (pre_compute + t_io),
            "bottleneck": "io" if t_io > compute else "memory"}
