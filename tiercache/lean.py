"""The lean runtime: a q4 store of a Llama-family model or Mixtral runs on numpy and
tiercache's C kernel (`_q4`) alone, with no torch in the process.

Why: `import torch` alone holds ~142 MiB of anonymous memory and ~60 MiB of file pages
(libtorch's static registrations, ~1100 Python modules), more than llama.cpp's whole non-weight
footprint (~105 MiB on the 1B shape; this runtime's is ~66). On a device with little RAM that
is the difference between holding every weight and streaming a third of them. Where this
runtime runs the store (`why_not` is None) and its budget allows (`resident_clusters`),
`api.load` picks it; else the tiered torch engine runs it, with its caches, VRAM and backends.

Decode is one `_q4.layer` call per layer (the fused layer of `engine/fused.py`, on the
store's own q4k bytes; an MoE layer: attention in one, the router in numpy, the routed experts
in `_q4.experts`); a prompt runs in chunks: the C kernel's matrix products, numpy for the norms,
RoPE, causal attention and routing. The head is the q8r embedding (tied) or a q8r `lm_head`.
Under a budget, a dense model's FFN clusters past a per-layer count stream from the store each
pass (`Stream`).
"""
from __future__ import annotations

import errno
import math
import os
import queue
import threading
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager

import numpy as np

from . import rope
from .engine import q4
from .engine.session import Session
from .cache.experts import ReadAheadStats, expert_cache, report
from .cache.kv import Growing, capacity
from .errors import StoreError, TiercacheError
from .memory import anon_bytes, trim_heap
from .store.dtypes import GROUP, has_zeros
from .store.format import Shape, Store, cluster_key, ffn_dtype, tensor_key

CHUNK = 256     # prompt positions per pass (need_bytes counts a chunk's activations)
FILE_PAGES = 24 << 20  # file pages of the code a run keeps touching (22-23 MiB measured, 1B)
MARGIN = 8 << 20  # what the count above misses (allocator slack, page cache in flight)
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
STREAM_SLOTS = 32  # records read ahead of use, at most; a batch of the C call takes 8
STREAM_READERS = 4  # reads in flight (Stream)
READERS, RUN = 4, 4  # Records.clusters: runs of RUN adjacent records, READERS in flight
GAP = 16 << 10  # records at most this far apart (LMDB's header pages) are read as one run
BLOCK = 4096  # O_DIRECT's unit of offsets, lengths and buffer addresses (Records.fetch)
ROUTER_DTYPES = ("f32", "f16", "q4")


def why_not(store: Store) -> str | None:
    """None where this runtime runs `store`; else the reason, for the user who asked for it."""
    return unsupported(store.args, store.manifest) or (
        None if q4.path() in ("avx2", "vnni") and q4._ext().layer_ok()
        else "no AVX2/FMA/F16C kernel path on this CPU")


def unsupported(a, m: dict) -> str | None:
    """What of a store (its ModelArgs and manifest) this runtime does not run, or None."""
    t, ffn = m["tensors"], m["ffn"]
    head = "model.embed_tokens.weight" if a.tie_word_embeddings else "lm_head.weight"
    attn = [f"model.layers.{l}.self_attn.{p}.weight" for l in range(a.num_hidden_layers)
            for p in ATTN]
    routers = [t.get(f"model.layers.{l}.block_sparse_moe.gate.weight", {}).get("dtype")
               for l in range(a.num_hidden_layers)] if a.is_moe else []
    checks = [
        (a.model_type in ("llama", "mixtral"), f"a {a.model_type} model (it runs Llama and "
         "Mixtral)"),
        (all(r in ROUTER_DTYPES for r in routers), "a router stored as other than f32, f16 or q4"),
        (m.get("dtype") == "q4", f"a {m.get('dtype')} store (it runs q4 stores)"),
        (ffn_dtype(a, m.get("dtype"), int(ffn["cluster_size"])) == "q4k" and all(t.get(n, {}).get("dtype") == "q4k" for n in attn),
         "q4 records outside the kernel's row blocks of 64 (it runs stores converted with "
         "--cluster-size 64 whose matrices have rows in multiples of 64)"),
        (t.get(head, {}).get("dtype") == "q8r", "a head that is not q8 rows"),
        (a.hidden_act == "silu" and not a.attention_bias and not a.mlp_bias,
         "biases or a non-SiLU activation"),
        (a.head_dim % 8 == 0 and int(ffn["cluster_size"]) % 64 == 0
         and a.intermediate_size % 64 == 0, "shapes off the kernel's row blocks of 64"),
    ]
    return next((why for ok, why in checks if not ok), None)


def weight_bytes(store: Shape) -> int:
    """RAM the runtime holds for weights: the records as stored, less the q4k zeros where the
    store says they are all 0 (a GGUF's Q4_0: `compact` keeps the scales alone)."""
    total = sum(n for n, _ in store.records.values())
    if not _symmetric(store):
        return total
    a, t = store.args, store.manifest["tensors"]
    ffn = 3 * a.intermediate_size * a.hidden_size * a.n_experts * a.num_hidden_layers
    q4k = ffn + sum(math.prod(m["shape"]) for m in t.values() if m["dtype"] == "q4k")
    return total - q4k // GROUP * 2


def cluster_bytes(store: Shape) -> int:
    """RAM one resident FFN cluster (gate, up and down rows of one neuron bundle) takes."""
    a, n = store.args, store.cluster_size
    return 3 * n * a.hidden_size * (16 + (2 if _symmetric(store) else 4)) // GROUP


def _symmetric(store: Shape) -> bool:
    """Whether the store says every q4k zero is 0 (then held as scales alone: `compact`)."""
    return not (store.manifest.get("quantization") or {}).get("q4k_zeros", True)


def resident_clusters(store: Shape, context: int, kv: str, ram: int | None,
                      runtime: int | None = None) -> int | None:
    """FFN clusters per layer held in RAM within `ram` (the rest stream from the store each
    pass, through a ring of STREAM_SLOTS records): all where they fit or no ram is given,
    None where even the rest of the model does not fit. Dense models only (MoE: all or None).
    runtime: as `need_bytes`'s."""
    n = store.n_clusters
    if ram is None or need_bytes(store, context, kv, runtime) <= ram:
        return n
    if store.args.is_moe:
        return None
    r = (ram - min_bytes(store, context, kv, runtime)) // (store.args.num_hidden_layers
                                                           * cluster_bytes(store))
    return int(r) if r >= 0 else None


def expert_bytes(store: Shape) -> int:
    """RAM one whole expert (or a dense layer's FFN) takes."""
    return store.n_clusters * cluster_bytes(store)


def expert_budget(store: Shape, context: int, kv: str, ram: int,
                  runtime: int | None = None) -> int | None:
    """Bytes of experts an MoE store holds within `ram`, the rest read whole when routed:
    what is left beside the rest of the model, one expert in flight and the readers' buffers,
    if it holds one token's routed set (top-k x layers: a smaller LRU only cycles); else
    None. runtime: as `need_bytes`'s."""
    a, least = store.args, min_bytes(store, context, kv, runtime)
    one_token = a.num_hidden_layers * a.num_experts_per_tok * expert_bytes(store)
    return ram - least + one_token if ram >= least else None


def least_bytes(store: Shape, context: int, kv: str, runtime: int | None = None) -> int:
    """The smallest budget this runtime runs `store` in: streaming (`min_bytes`), or wholly
    resident where that is less (a small model's weights below the streaming buffers)."""
    return min(min_bytes(store, context, kv, runtime), need_bytes(store, context, kv, runtime))


def min_bytes(store: Shape, context: int, kv: str, runtime: int | None = None) -> int:
    """The least this runtime runs `store` in: `need_bytes` with every dense FFN cluster
    streamed (their ring instead of them), or (MoE) one token's routed experts per layer held,
    one more in flight and the readers' buffers (Records._scratch) instead of all of them."""
    a, layers, n = store.args, store.args.num_hidden_layers, store.n_clusters
    all_ffn = layers * a.n_experts * n * cluster_bytes(store)
    if a.is_moe:
        runs = -(-n // RUN)  # an expert's records in runs, READERS of them at a time
        record = sum(nb for _, _, nb in store.cluster_parts(0))
        readers = min(READERS, runs) * (min(RUN, n) * record + 2 * BLOCK)
        held = (layers * a.num_experts_per_tok + 1) * expert_bytes(store) + readers
    else:
        held = STREAM_SLOTS * (sum(nb for _, _, nb in store.cluster_parts(0)) + 2 * BLOCK)
    return need_bytes(store, context, kv, runtime) - all_ffn + held


def need_bytes(store: Shape, context: int, kv: str, runtime: int | None = None) -> int:
    """What running `store` wholly in RAM takes: the process before its weights (`runtime`
    anonymous bytes; None: this process as it stands), the file pages of the code it keeps
    touching, the weights, the KV cache for `context` positions and a prompt chunk's
    activations. The planner passes a runtime to count another machine's process."""
    a = store.args
    positions = capacity(min(context, a.max_position_embeddings))
    kv_cache = (2 * a.num_hidden_layers * a.num_key_value_heads * a.head_dim * positions
                * (2 if kv == "f16" else 4))
    rep, t = a.num_attention_heads // a.num_key_value_heads, min(CHUNK, context)
    # a chunk's activations at their peak, the FFN's (x, h, g, u, the kernel's int8 copies,
    # the output; attention's are fewer), its attention scores, the logits
    work = t * (9 * a.intermediate_size + 16 * a.hidden_size) + t * rep * positions * 5 \
        + 8 * a.vocab_size
    run = anon_bytes() if runtime is None else runtime
    return run + FILE_PAGES + MARGIN + weight_bytes(store) + kv_cache + work


class KV(Growing):
    """One layer's K and V, [Hkv, capacity, D] in f16 or f32, grown in steps (cache/kv.py):
    the layout `_q4.layer` writes at decode. Protocol: offset, trim, nbytes."""

    def __init__(self, n_kv: int, hd: int, dtype):
        self.shape, self.dtype = (n_kv, 0, hd), dtype
        self.k = self.v = None
        self.offset = 0

    def reserve(self, need: int) -> None:
        if self.k is not None and need <= self.k.shape[1]:
            return
        cap = capacity(need)
        h, _, d = self.shape
        k, v = np.zeros((h, cap, d), self.dtype), np.zeros((h, cap, d), self.dtype)
        if self.k is not None:
            k[:, :self.offset], v[:, :self.offset] = self.k[:, :self.offset], self.v[:, :self.offset]
        self.k, self.v = k, v
        self.ptrs = (k.ctypes.data, v.ctypes.data)  # (for the C layer, taken once)



class Layer:
    """A decoder layer's weights as the kernel takes them: (packed u8, sz bf16 bits) per
    matrix in row blocks of 64, and the two norms in f32."""

    def __init__(self, rd: Records, l: int, resident: int, stream: "Stream | None",
                 experts: "Experts | None"):
        p, a = f"model.layers.{l}.", rd.store.args
        self.l = l
        self.norms = (_f32(rd, p + "input_layernorm.weight"),
                      _f32(rd, p + "post_attention_layernorm.weight"))
        self.norm_ptrs = tuple(n.ctypes.data for n in self.norms)  # (a ctypes view is ~1 us)
        self.attn = [_q4k(rd, f"{p}self_attn.{n}.weight") for n in ATTN]
        # dense: clusters [0, resident) in RAM as whole matrices, the rest through `stream`;
        # MoE: whole experts, from `experts`
        self.ffn0 = _ffn(rd, l, 0, resident) if resident and not a.is_moe else None
        self.stream, self.streamed = stream, rd.store.n_clusters - resident
        self.experts = experts
        self.router = _float(rd, p + "block_sparse_moe.gate.weight") if a.is_moe else None
        attn = tuple(_mat(w, s) for w, s in self.attn)
        self.mats0 = tuple(_mat(w, s) for w, s in self.ffn0) if self.ffn0 else ()
        self.whole = not a.is_moe and not self.streamed  # else the C layer stops at attention
        self.mats = attn + self.mats0 if self.whole else attn
        self.top_k = a.num_experts_per_tok

    def route(self, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """h [T, d] -> (weights [T, k], expert ids [T, k]): softmax over the router's logits,
        top k, renormalized over the k (Mixtral; as models.llama.MoE)."""
        z = h @ self.router.T
        p = np.exp(z - z.max(-1, keepdims=True))
        idx = np.argsort(-p, axis=-1, kind="stable")[:, :self.top_k]
        w = np.take_along_axis(p, idx, -1)
        return w / w.sum(-1, keepdims=True), idx

    def route1(self, h: np.ndarray) -> tuple[list[float], list[int]]:
        """`route` of one row h [d] in Python's floats (a third of numpy's time on E values):
        the same picks, ties to the lower id; weights renormalized over the k."""
        z = (self.router @ h).tolist()
        top = max(z)
        p = [math.exp(v - top) for v in z]
        ids = sorted(range(len(p)), key=p.__getitem__, reverse=True)[:self.top_k]
        w = [p[e] for e in ids]
        total = sum(w)
        return [v / total for v in w], ids

    def likely(self, h: np.ndarray, cut: float) -> list[int]:
        """The experts this layer's router would pick for h [T, d] (the previous layer's FFN
        input: read ahead) with a probability of at least `cut`, the most likely first."""
        z = h @ self.router.T
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        idx = np.argsort(-p, axis=-1, kind="stable")[:, :self.top_k]
        top = np.take_along_axis(p, idx, -1)
        mass = np.zeros(p.shape[-1])
        np.add.at(mass, idx[top >= cut], top[top >= cut])
        return [int(e) for e in np.argsort(-mass, kind="stable") if mass[e] > 0]

    def ffn(self, h: np.ndarray, mm, nxt: "Layer | None" = None) -> np.ndarray:
        """The FFN (or the routed experts' sum) of h [T, d]; MoE: the experts held first while
        the others are read, and `nxt`'s likely experts read ahead."""
        if self.router is None:
            y = _swiglu(h, self.ffn0, mm) if self.ffn0 else np.zeros_like(h)
            for _ in range(self.streamed):
                with self.stream.next() as mats:
                    y += _swiglu(h, mats, mm)
            return y
        w, idx = self.route(h)
        out, used = np.zeros_like(h), np.unique(idx).tolist()
        ahead = nxt.likely(h, self.experts.cut) if nxt and self.experts.reads_ahead else ()
        got = self.experts.fetch(self.l, used, [int((idx == e).sum()) for e in used], ahead)
        for i in sorted(range(len(used)), key=lambda i: isinstance(got[i], Future)):
            rows, slot = np.nonzero(idx == used[i])
            ffn, _ = self.experts.value((self.l, used[i]), got[i])
            out[rows] += _swiglu(h[rows], ffn, mm) * w[rows, slot, None]
        return out


class LeanEngine:
    """Token ids -> logits (numpy [V]); see the module's doc."""

    backend = "lean"

    def __init__(self, store: Store, context: int, kv: str = "f16", threads: int = 1,
                 resident: int | None = None, expert_budget: int | None = None,
                 expert_policy: str | None = None, expert_cut: float | None = None):
        """resident: FFN clusters per layer held in RAM (`resident_clusters` for a budget;
        None: all); the rest stream from the store (dense models). expert_budget (MoE): bytes
        of experts held (`expert_budget`), the rest read when routed (and ahead: `Experts`);
        None: all. expert_policy: the expert cache's policy (None: its rule); expert_cut: read
        experts ahead, at this cut (`Experts`; None: none)."""
        why = why_not(store)
        if why is not None:
            raise TiercacheError(f"{store.path}: the lean runtime does not run {why}")
        if kv not in ("f16", "f32"):
            raise TiercacheError(f"unknown KV cache dtype '{kv}' (choose from f16, f32)")
        self.store, self.args, self.kv = store, store.args, kv
        self.context = min(context, store.args.max_position_embeddings)
        self.threads, self.isa = threads, q4.path()
        a, n = self.args, store.n_clusters
        self.resident = n if resident is None else min(resident, n)
        if a.is_moe and self.resident < n:
            raise TiercacheError("the lean runtime reads an MoE store's experts whole "
                                 "(expert_budget), not by clusters")
        self.stream = None
        if self.resident < n:
            keys = [cluster_key(l, 0, c).decode() for l in range(a.num_hidden_layers)
                    for c in range(self.resident, n)]
            self.stream = Stream(store, keys, store.cluster_parts(0))
        rd = Records(store)
        self.experts = (Experts(rd, expert_budget, expert_policy, expert_cut) if a.is_moe
                        else None)
        self.layers = [Layer(rd, l, self.resident, self.stream, self.experts)
                       for l in range(a.num_hidden_layers)]
        self.norm = _f32(rd, "model.norm.weight")
        head = "model.embed_tokens.weight" if a.tie_word_embeddings else "lm_head.weight"
        self.head = _q8r(rd, head)
        self.embed = self.head if a.tie_word_embeddings else _q8r(rd, "model.embed_tokens.weight")
        if self.experts is None or self.experts.cache is None:
            rd.close()  # (an expert cache keeps reading through it)
        self.inv_freq = rope.inv_freq(a)
        self.weight_bytes = sum(w.nbytes + s.nbytes for layer in self.layers
                                for f in (layer.attn, layer.ffn0 or ()) for w, s in f) + sum(
            q.nbytes + sc.nbytes for q, sc in {id(x): x for x in (self.head, self.embed)}.values()
        ) + (self.experts.held_bytes if self.experts else 0)
        self.tokens = 0
        trim_heap()  # load's temporaries (the records read, the routers' decoding)

    def __del__(self):
        if getattr(self, "stream", None) is not None:
            self.stream.close(wait=False)
        if getattr(self, "experts", None) is not None:
            self.experts.close()

    def new_session(self) -> Session:
        a, dt = self.args, np.float16 if self.kv == "f16" else np.float32
        return Session(self, [KV(a.num_key_value_heads, a.head_dim, dt)
                              for _ in range(a.num_hidden_layers)], limit=self.context)

    # -- the engine API (generate_step) ------------------------------------------------------
    def prefill(self, session: Session, ids: list[int]) -> np.ndarray:
        session.check(len(ids))
        for lo in range(0, len(ids), CHUNK):
            x = self._forward(session, ids[lo:lo + CHUNK])
        logits = self._logits(x[-1:])[0]
        del x
        trim_heap()  # the prompt's activations (~40 MiB on the 1B shape) go back to the OS
        return logits

    def decode(self, session: Session, token: int) -> np.ndarray:
        session.check(1)
        self.tokens += 1
        a, caches = self.args, session.caches
        x = self._embed([token])[0]
        pos = caches[0].offset
        cos, sin = (np.ascontiguousarray(c[0]) for c in rope.cos_sin(self.inv_freq, pos, 1))
        ext, isa = q4._ext(), q4.ISAS[self.isa]
        h = np.empty_like(x)  # the FFN's input where the C layer stops at attention
        xp, hp, cp, sp = x.ctypes.data, h.ctypes.data, cos.ctypes.data, sin.ctypes.data
        if self.stream is not None:
            self.stream.begin()
        io = self.experts if self.experts is not None and self.experts.reads_ahead else None
        if io:  # layer 0's likely experts, from the token's embedding, read during attention
            l0 = self.layers[0]
            io.read_ahead(0, l0.likely(_rms(x[None], l0.norms[1], a.rms_norm_eps), io.cut))
        for layer, c in zip(self.layers, caches):
            c.reserve(pos + 1)
            ext.layer(xp, x.size, *layer.norm_ptrs, a.rms_norm_eps, layer.mats,
                      a.num_attention_heads, a.num_key_value_heads, a.head_dim,
                      a.intermediate_size, cp, sp, *c.ptrs, c.dtype == np.float16,
                      c.k.shape[1], pos, 64, self.threads, isa, 0 if layer.whole else hp)
            c.offset += 1
            if layer.router is not None:
                w, ids = layer.route1(h)
                l = layer.l
                nxt = self.layers[l + 1] if l + 1 < len(self.layers) and io else None
                got = self.experts.fetch(l, ids, None, nxt.likely(h[None], io.cut) if nxt
                                         else ())
                held = [self.experts.value((l, e), v) for e, v in zip(ids, got)]
                ext.experts(xp, hp, x.size, [(wt, *mats) for (_, mats), wt in zip(held, w)],
                            a.intermediate_size, 64, self.threads, isa)
            elif not layer.whole:
                self._ffn_streamed(layer, x, h)
        session.tokens.append(token)
        return self._logits(x[None])[0]

    def _ffn_streamed(self, layer: Layer, x: np.ndarray, h: np.ndarray) -> None:
        """x += the FFN of h [d]: its resident clusters in one call, then the streamed ones
        as they arrive, 8 to a call (the C side's limit)."""
        ext, isa, cs = q4._ext(), q4.ISAS[self.isa], self.store.cluster_size
        if layer.mats0:
            ext.experts(x.ctypes.data, h.ctypes.data, x.size, [(1.0, *layer.mats0)],
                        self.resident * cs, 64, self.threads, isa)
        for lo in range(0, layer.streamed, 8):
            with ExitStack() as held:
                batch = [held.enter_context(self.stream.next())
                         for _ in range(min(8, layer.streamed - lo))]
                ext.experts(x.ctypes.data, h.ctypes.data, x.size,
                            [(1.0, *(_mat(w, s) for w, s in m)) for m in batch], cs, 64,
                            self.threads, isa)

    def logits(self, session: Session, ids: list[int]) -> np.ndarray:
        """All positions' logits [T, V] (evaluation)."""
        session.check(len(ids))
        return np.concatenate([self._logits(self._forward(session, ids[lo:lo + CHUNK]))
                               for lo in range(0, len(ids), CHUNK)])

    def reset_stats(self) -> None:
        self.tokens = 0
        if self.experts is not None:
            self.experts.reset_stats()
        if self.stream is not None:
            self.stream.bytes, self.stream.wait_s = 0, 0.0

    def stats(self) -> dict:
        experts = self.experts.report() if self.experts is not None else None
        read = (self.stream.bytes if self.stream else 0) + (
            sum(experts["bytes_read"]) if experts else 0)
        hit = experts["hit_rate"] if experts else self.resident / self.store.n_clusters
        out = {"engine": "lean", "compute": f"q4 kernel ({self.isa})", "cache_hit_rate": hit,
               "store_bytes_read": read,
               "store_bytes_per_token": read / self.tokens if self.tokens else 0.0,
               "resident_bytes": self.weight_bytes,
               "io_wait_s": (self.stream.wait_s if self.stream else 0.0) + (
                   self.experts.read_s if self.experts else 0.0)}
        if experts is not None:
            out["experts"] = experts
        return out

    # -- the model -----------------------------------------------------------------------------
    def _forward(self, session: Session, ids: list[int]) -> np.ndarray:
        """New positions through every layer, their K/V into the caches -> x [T, d]."""
        a, caches = self.args, session.caches
        pos, t = caches[0].offset, len(ids)
        cos, sin = rope.cos_sin(self.inv_freq, pos, t)
        x = self._embed(ids)
        if self.stream is not None:
            self.stream.begin()
        for layer, c in zip(self.layers, caches):
            h = _rms(x, layer.norms[0], a.rms_norm_eps)
            q, k, v = self._mm(h, layer.attn[:3])
            hd = a.head_dim
            q = _rope(q.reshape(t, -1, hd), cos, sin)
            c.reserve(pos + t)
            c.k[:, pos:pos + t] = _rope(k.reshape(t, -1, hd), cos, sin).transpose(1, 0, 2)
            c.v[:, pos:pos + t] = v.reshape(t, -1, hd).transpose(1, 0, 2)
            c.offset = pos + t
            x += self._mm(_attend(q, c, pos), layer.attn[3:])[0]
            nxt = self.layers[layer.l + 1] if layer.l + 1 < len(self.layers) else None
            x += layer.ffn(_rms(x, layer.norms[1], a.rms_norm_eps), self._mm, nxt)
        session.tokens.extend(ids)
        return x

    def _mm(self, x: np.ndarray, weights: list) -> list:
        return q4.gemm_np(x, weights, 64, self.threads, self.isa)

    def _embed(self, ids: list[int]) -> np.ndarray:
        q, scale = self.embed
        return q[ids].astype(np.float32) * q4._f32(scale[ids])[:, None]

    def _logits(self, x: np.ndarray) -> np.ndarray:
        q, scale = self.head
        return q4.gemm8_np(_rms(x, self.norm, self.args.rms_norm_eps), q, scale, self.threads,
                           self.isa)


def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x [T, H, D] with cos, sin [T, D]: HF's rotation of the two halves of D."""
    h = x.shape[-1] // 2
    out = x * cos[:, None]
    out[..., :h] -= x[..., h:] * sin[:, None, :h]
    out[..., h:] += x[..., :h] * sin[:, None, h:]
    return out


class Experts:
    """An MoE store's experts as the kernel takes them: every one in RAM, or (under a budget)
    those an expert cache holds (cache/experts.py: its policy rule; the one owner of the hit,
    miss and byte counts), the others read whole from the store when routed and handed to it.

    Under a budget the reads run on a reader thread, one expert at a time (its records in
    runs: Records.clusters), in the order asked: a layer's routed misses and, with a `cut`
    (None: off), the experts the next layer's router gives at least that probability from
    this layer's input, read while this layer computes (at decode, layer 0's from the
    token's embedding). Off by default, as measured on the synthetic Mixtral (1 thread; an
    expert of 6.2 MB reads in ~6.7 ms, a layer computes in ~0.7): a read ahead has barely
    begun when its layer routes, 40-55% of them go unrouted, and the reads take CPU from
    decode; decode at --ram 650M ran 47 tok/s without, 29 with (cut 0); at 750M 69 and 46.
    Every read first reserves its room in the cache, so what is in flight stays inside the
    budget. Counted per layer (ReadAheadStats): read ahead, of them routed (used) or not
    (unused: let go, kept first to evict), and demand stalls (routed, neither held nor read
    ahead)."""

    def __init__(self, rd: Records, budget: int | None, policy: str | None = None,
                 cut: float | None = None):
        a = rd.store.args
        self.rd, self.layers, self.n, self.cut = rd, a.num_hidden_layers, a.n_experts, cut
        self.one = expert_bytes(rd.store)
        keys = [(l, e) for l in range(self.layers) for e in range(self.n)]
        self.held = {} if budget is not None else {k: self._read(*k) for k in keys}
        self.uses = [0] * self.layers  # all resident: every routed use a hit
        self.cache, self.read_s = None, 0.0  # read_s: time decode waited on reads
        self.ahead = ReadAheadStats(self.layers)
        self.inflight: dict[tuple, Future] = {}  # submitted, room reserved, not yet in cache
        self.wanted: set[tuple] = set()  # of them read ahead and not yet routed
        self.late: set[tuple] = set()  # read ahead, not routed, the read under way
        self.busy: list[tuple] = []  # the layer's routed experts, kept while it computes
        self.spare: list[tuple] = []  # evicted experts' matrices, to read the next ones into
        if budget is not None:
            self.cache = expert_cache(policy, budget, self.one, self.layers,
                                      a.num_experts_per_tok, {})
            for k in keys[:budget // self.one]:  # in layer order until full, as the LRU's
                self.cache.put(k, self._read(*k), self.one)  # start
            self.cache.reset_stats()
            self.reader = ThreadPoolExecutor(1, thread_name_prefix="experts")

    @property
    def reads_ahead(self) -> bool:
        return self.cache is not None and self.cut is not None

    def fetch(self, l: int, ids: list[int], tokens: list[int] | None,
              ahead=()) -> list:
        """Layer l's routed experts `ids` (`tokens` routed to each; None: one): each one's
        (ffn, mats), or the read of one not held (a Future: `value`), in order; then layer
        l + 1's `ahead` experts are read, behind this layer's misses."""
        tokens = tokens or [1] * len(ids)
        if self.cache is None:  # every use a hit, counted as the cache counts: once a call
            self.uses[l] += len(ids)
            return [self.held[(l, e)] for e in ids]
        self._settle(l, ids)
        self.busy = [(l, e) for e in ids]
        out = []
        for k, n in zip(self.busy, tokens):
            v = self.cache.get(k, n)
            if v is None:  # (read ahead and used, or a demand stall, maybe on a late read)
                used = k in self.wanted
                self.wanted.discard(k)
                self.late.discard(k)
                (self.ahead.used if used else self.ahead.demand)[l] += 1
                v = self.inflight.get(k) or self._submit(k) or self._read_now(k)
            out.append(v)
        self.read_ahead(l + 1, ahead)
        return out

    def read_ahead(self, l: int, ids) -> None:
        """Read layer l's experts `ids` in the background, where not held or in flight (held
        ones are refreshed, so that this layer's reads do not evict them)."""
        for e in ids:
            k = (l, e)
            if k in self.inflight or self.cache.touch(k):
                continue
            if self._submit(k) is not None:
                self.wanted.add(k)
                self.ahead.read[l] += 1

    def value(self, k: tuple, v):
        """What `fetch` gave for expert k, ready: a read is waited on (timed) and put in the
        cache (its reserved room given back first)."""
        if not isinstance(v, Future):
            return v
        t0 = time.perf_counter()
        got = v.result()
        self.read_s += time.perf_counter() - t0
        if self.inflight.get(k) is v:
            del self.inflight[k]
            self.cache.release(self.one)
            self._spare(self.cache.put(k, got, self.one, in_use=self.busy))
        return got

    def _submit(self, k: tuple) -> Future | None:
        """Queue k's read with its room reserved, into the buffers of an evicted expert where
        there is one; None where the cache has no room for it (then a routed one is read
        here, used and not kept)."""
        admit = self.cache.reserve(k, self.one, self.busy)
        if not admit.ok:
            return None
        self._spare(admit)
        into = self.spare.pop() if self.spare else None
        self.inflight[k] = v = self.reader.submit(self._read, *k, into)
        v.into = into  # (back to the spares if the read is dropped)
        return v

    def _spare(self, admit) -> None:
        """Keep the buffers of the experts the cache evicted, for the next reads: they fill
        the room the eviction made, so the budget holds them. (Freed instead, experts read
        on one thread and freed on another left malloc's heaps with holes, ~140 MiB over 48
        tokens with read-ahead: synthetic Mixtral at --ram 650M, OOM-killed.)"""
        self.spare.extend(value[0] for value in admit.freed)

    def _settle(self, l: int, ids: list[int]) -> None:
        """Experts read ahead for layer l that it did not route: a read not started is
        dropped (not counted as read); one under way is let go (`late`): once done it goes
        in the cache, first to evict."""
        for k in [k for k in self.wanted if k[0] == l and k[1] not in ids]:
            self.wanted.discard(k)
            v = self.inflight[k]
            if v.cancel():
                del self.inflight[k]
                self.spare += [v.into] if v.into is not None else []
                self.cache.release(self.one)
                self.ahead.read[l] -= 1
            else:
                self.ahead.unused[l] += 1
                self.late.add(k)
        for k in [k for k in self.late if self.inflight[k].done()]:  # (routed: not late)
            self.late.discard(k)
            v = self.inflight.pop(k)
            self.cache.release(self.one)
            if v.exception() is None and k in self.cache:
                self.spare.append(v.result()[0])
            elif v.exception() is None:
                self._spare(self.cache.put(k, v.result(), self.one, in_use=self.busy))
                self.cache.demote(k)

    def _read_now(self, k: tuple) -> tuple:
        t0 = time.perf_counter()
        got = self._read(*k)
        self.read_s += time.perf_counter() - t0
        return got

    def _read(self, l: int, e: int, into: tuple | None = None) -> tuple:
        ffn = _ffn(self.rd, l, e, self.rd.store.n_clusters, into)
        return ffn, tuple(_mat(w, s) for w, s in ffn)

    @property
    def held_bytes(self) -> int:
        return self.one * (len(self.cache) if self.cache is not None else len(self.held))

    def reset_stats(self) -> None:
        self.uses, self.read_s = [0] * self.layers, 0.0
        self.ahead = ReadAheadStats(self.layers)
        if self.cache is not None:
            self.cache.reset_stats()

    def report(self) -> dict:
        """stats()["experts"]: the expert cache's report (hits, misses, bytes read, resident
        per layer) with the read-ahead counters (cache/experts.py: `report`)."""
        if self.cache is not None:
            return report(self.cache, self.ahead, self.cut)
        none = [0] * self.layers
        every = [list(range(self.n)) for _ in range(self.layers)]
        return {"policy": "all resident", "budget_bytes": self.held_bytes, "resident": every,
                "pinned": every, "hits": self.uses[:], "misses": none, "bytes_read": none,
                "evictions": none, "refused": 0,
                "hit_rate": 1.0 if sum(self.uses) else 0.0, **self.ahead.as_dict(),
                "readahead_cut": self.cut}

    def close(self) -> None:
        if self.cache is not None:
            self.reader.shutdown(wait=True, cancel_futures=True)
        self.rd.close()


class Stream:
    """The FFN clusters that are not resident, read by STREAM_READERS threads into a ring of
    aligned slots in the order every pass uses them (each layer's, layer by layer), up to
    STREAM_SLOTS records ahead, across passes too: the next token's first clusters arrive
    while this one finishes. Readers claim records in order and deliver them by index, so
    several reads are in flight (this disk: 1.2 GB/s with one reader of 256 KiB records, 1.6
    with two, 2.0 with four), past the page cache where it can (Records.span). Each record
    is checked against its crc32 the first time it is read. A pass that stopped midway
    (Ctrl-C in chat) leaves the ring out of step: the next pass's `begin` starts it again."""

    def __init__(self, store: Store, keys: list[str], parts: list):
        self.keys, self.parts = keys, parts  # parts: cluster_parts(c)
        self.rd = Records(store)
        size = max(self.rd.at[k][1] for k in keys) + 2 * BLOCK  # (room to read whole blocks)
        self.bufs = [_aligned(size, BLOCK) for _ in range(STREAM_SLOTS)]
        self.views = [None] * STREAM_SLOTS  # each slot's record, where the read put it
        self.checked: set[str] = set()
        self.bytes, self.wait_s, self.threads = 0, 0.0, []
        self.cv = threading.Condition()
        self.begin(force=True)

    def begin(self, force: bool = False) -> None:
        """Before a pass: the ring is at the first key, or is started there again."""
        if not force and self.pos == 0:
            return
        self.stop()
        self.free, self.done, self.claimed, self.taken = queue.Queue(), {}, 0, 0
        self.broken = False
        for i in range(len(self.bufs)):
            self.free.put(i)
        self.threads = [threading.Thread(target=self._read, args=(self.free,), daemon=True)
                        for _ in range(STREAM_READERS)]
        for t in self.threads:
            t.start()

    def stop(self, wait: bool = True) -> None:
        for _ in self.threads:
            self.free.put(None)
        if wait:  # (not from __del__: at exit a daemon thread never returns)
            for t in self.threads:
                t.join()
        self.threads = []

    def _read(self, free: queue.Queue) -> None:
        while (slot := free.get()) is not None:
            with self.cv:
                i, self.claimed = self.claimed, self.claimed + 1
            key = self.keys[i % len(self.keys)]
            try:
                self.views[slot] = self.rd.fetch(key, self.bufs[slot],
                                                 check=key not in self.checked)
                self.checked.add(key)  # (read again each pass: checked once)
                got = slot
            except (OSError, StoreError) as e:
                got = e
            with self.cv:
                self.done[i] = got
                self.bytes += self.rd.at[key][1]
                self.cv.notify_all()
            if got is not slot:
                return

    @contextmanager
    def next(self):
        """The next cluster of the pass as (gate, up, down), each (packed, sz) views of its
        record (the kernel takes the stored (scale, zero) pairs as they are)."""
        t0 = time.perf_counter()
        with self.cv:
            i = self.taken
            self.cv.wait_for(lambda: i in self.done)
            slot = self.done.pop(i)
        self.wait_s += time.perf_counter() - t0
        if isinstance(slot, Exception):
            self.broken = True  # the next pass starts the readers again
            raise slot
        buf, self.taken = self.views[slot], i + 1
        try:
            yield tuple(_split_q4k(buf[off:off + nb], *shape) for shape, off, nb in self.parts)
        finally:
            self.free.put(slot)

    @property
    def pos(self) -> int:
        """Where the consumer is in a pass (0: at its start); -1 after a failed read."""
        return -1 if self.broken else self.taken % len(self.keys)

    def close(self, wait: bool = True) -> None:
        """Stop the readers (they hold the ring) and close the file."""
        self.stop(wait)
        self.rd.close()


def _swiglu(h: np.ndarray, ffn: tuple, mm) -> np.ndarray:
    gate, up, down = ffn
    g, u = mm(h, [gate, up])
    return mm(_silu_mul(g, u), [down])[0]


def _silu_mul(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    """silu(g) * u, in g's buffer (a prompt's [T, F] temporaries cost page faults each)."""
    t = np.negative(g)
    np.exp(t, out=t)
    t += 1
    np.divide(g, t, out=g)
    g *= u
    return g


def _attend(q: np.ndarray, c: KV, pos: int) -> np.ndarray:
    """Causal attention of q [T, H, D] (positions pos ..) over the cache -> [T, H * D]."""
    t, heads, hd = q.shape
    n_kv, s = c.shape[0], pos + t
    rep = heads // n_kv
    out = np.empty((t, heads, hd), np.float32)
    hidden = np.repeat(np.arange(s)[None, :] > pos + np.arange(t)[:, None], rep, 0)  # [T*rep, S]
    q = q * np.float32(1 / math.sqrt(hd))
    for g in range(n_kv):
        k, v = c.k[g, :s].astype(np.float32), c.v[g, :s].astype(np.float32)  # [S, D]
        w = q[:, g * rep:(g + 1) * rep].reshape(t * rep, hd) @ k.T          # [T*rep, S]
        w[hidden] = -np.inf
        w -= w.max(-1, keepdims=True)
        np.exp(w, out=w)
        w /= w.sum(-1, keepdims=True)
        out[:, g * rep:(g + 1) * rep] = (w @ v).reshape(t, rep, hd)
    return out.reshape(t, heads * hd)


# -- reading the store ---------------------------------------------------------------------------
def _aligned(nbytes: int, align: int = 64) -> np.ndarray:
    """uint8 [nbytes] starting on a 64-byte boundary. numpy's own buffers start 16 bytes into
    a page, so each of the kernel's 64-byte loads would span two cache lines: decode on the
    1B shape ran ~12% slower so (measured)."""
    buf = np.empty(nbytes + align, np.uint8)
    lo = -buf.ctypes.data % align
    return buf[lo:lo + nbytes]


class Records:
    """Reads a store's records with pread, each checked against the manifest's crc32: at load
    straight into the buffers that keep them (no mapping of the file, no transient copy), each
    one's page cache dropped once read (through LMDB's mapping, the mapped pages and a copy
    per record added up to OOM kills at 800 MiB on the 1B shape); records read again and
    again (streamed clusters, experts read when routed) past the page cache where the file
    system allows (O_DIRECT: the disk writes them into our buffers, with no copy and no page
    to charge to the cgroup, reclaim and drop: 0.11 against 0.42 CPU ms per MB read here)."""

    def __init__(self, store: Store):
        self.store, data = store, store.path / "lmdb" / "data.mdb"
        self.at = store.offsets(list(store.records))
        # (a store written before the manifest kept offsets has them looked up through
        # LMDB's map, which pages in the whole file: unmap it and drop those pages)
        store.close()
        self.fd = os.open(data, os.O_RDONLY)
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)  # no read-ahead past a record:
        # those pages would stay cached (per-record DONTNEED left ~30 MB per 1B layer so)
        try:
            self.direct = os.open(data, os.O_RDONLY | os.O_DIRECT)
        except (OSError, AttributeError):  # (tmpfs; not Linux)
            self.direct = -1
        self.pool = None  # readers for `clusters`, made when first needed
        self.local = threading.local()  # each reader's buffer (`_scratch`)

    def tensor(self, name: str) -> np.ndarray:
        """A tensor's record, in its own 64-byte aligned buffer."""
        key = tensor_key(name).decode()
        return self.read(key, _aligned(self.at[key][1]))

    def clusters(self, layer: int, expert: int, count: int, place) -> None:
        """Hand the first `count` cluster records of a layer's (or an expert's) FFN to
        place(c, raw), on the reader threads: the records lie next to each other in the file
        (one LMDB header page apart), so they are read RUN at a time in one pread each,
        READERS runs at a time, each checked against its crc32 and placed where it was read.
        (One 122 KiB record to a pread, 16 at a time, took 7.9 ms for a synthetic Mixtral
        expert and its placing 1.8 more on the main thread; so, 6.7 ms in all: 5.9 of it the
        reads, which four to eight readers of 0.5-1 MiB runs all took alike.)"""
        if self.pool is None:
            self.pool = ThreadPoolExecutor(READERS, thread_name_prefix="records")
        keys = [cluster_key(layer, expert, c).decode() for c in range(count)]
        runs = [[0]]  # record indices read together: adjacent in the file, RUN at most
        for c in range(1, count):
            off, n = self.at[keys[c - 1]]
            if len(runs[-1]) == RUN or not 0 <= self.at[keys[c]][0] - off - n <= GAP:
                runs.append([])
            runs[-1].append(c)

        def run(part: list[int]) -> None:
            start = self.at[keys[part[0]]][0]
            n = sum(self.at[keys[part[-1]]]) - start
            buf = self.span(start, n, self._scratch(n), f"record {keys[part[0]]}")
            for c in part:
                off, size = self.at[keys[c]]
                place(c, self.check(keys[c], buf[off - start:off - start + size]))
        for done in [self.pool.submit(run, part) for part in runs]:
            done.result()

    def _scratch(self, n: int) -> np.ndarray:
        """This reader thread's buffer for a run (`span`'s room included), kept: a fresh one
        per run, freed on the same thread, left ~1 MiB in each thread's malloc arena (8 MiB at
        8 readers), enough to push a run at --ram 650M past its cgroup cap (synthetic
        Mixtral)."""
        buf = getattr(self.local, "buf", None)
        if buf is None or buf.size < n + 2 * BLOCK:
            buf = self.local.buf = _aligned(n + 2 * BLOCK, BLOCK)
        return buf

    def fetch(self, key: str, buf: np.ndarray, check: bool = True) -> np.ndarray:
        """Record `key` read into `buf` (`span`'s) -> its view there; check: its crc32."""
        off, n = self.at[key]
        raw = self.span(off, n, buf, f"record {key}")
        return self.check(key, raw) if check else raw

    def span(self, off: int, n: int, buf: np.ndarray, what: str) -> np.ndarray:
        """Bytes [off, off + n) of the file into `buf` (BLOCK-aligned, n + 2 BLOCK long) ->
        their view there: read past the page cache where the file system allows (whole
        BLOCKs, the bytes at their offset within the first), else through it at buf's start
        and their pages dropped."""
        if self.direct >= 0:
            a0, a1 = off // BLOCK * BLOCK, -(-(off + n) // BLOCK) * BLOCK
            try:  # (the last block may pass the file's end: the bytes asked for suffice)
                self._pread(self.direct, buf[:a1 - a0], a0, what, need=off - a0 + n)
                return buf[off - a0:off - a0 + n]
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                os.close(self.direct)  # it opened, but takes no direct reads
                self.direct = -1
        self._pread(self.fd, buf[:n], off, what)
        os.posix_fadvise(self.fd, off, n, os.POSIX_FADV_DONTNEED)
        return buf[:n]

    def read(self, key: str, out: np.ndarray, check: bool = True) -> np.ndarray:
        """Record `key` into out[:its length] through the page cache (its pages dropped);
        check: against the manifest's crc32."""
        off, n = self.at[key]
        self._pread(self.fd, out[:n], off, f"record {key}")
        os.posix_fadvise(self.fd, off, n, os.POSIX_FADV_DONTNEED)
        return self.check(key, out[:n]) if check else out

    def _pread(self, fd: int, out: np.ndarray, off: int, what: str,
               need: int | None = None) -> None:
        """out's bytes from file offset `off`; at least `need` of them (None: all)."""
        mv, got = memoryview(out), 0
        need = len(mv) if need is None else need
        while got < need:
            step = os.preadv(fd, [mv[got:]], off + got)
            if step <= 0:
                raise StoreError(f"{self.store.path}: {what} is cut short")
            got += step

    def check(self, key: str, raw: np.ndarray) -> np.ndarray:
        if [raw.size, zlib.crc32(raw)] != list(self.store.records[key]):
            raise StoreError(f"{self.store.path}: record {key} is corrupt (checksum mismatch)")
        return raw

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False)
            self.pool = None
        for name in ("fd", "direct"):
            if getattr(self, name) >= 0:
                os.close(getattr(self, name))
                setattr(self, name, -1)


def _f32(rd: Records, name: str) -> np.ndarray:
    meta = rd.store.manifest["tensors"][name]
    if meta["dtype"] != "f32":
        raise StoreError(f"{rd.store.path}: {name} is {meta['dtype']}, the lean runtime reads f32")
    return rd.tensor(name).view(np.float32)


def _float(rd: Records, name: str) -> np.ndarray:
    """A small matrix (a router) as float32: f32, f16 or q4 (per group of 32: f16 scale and
    min [R, C/32] each, then nibbles [R, C/2], element 2j low; x = q * scale + min)."""
    meta = rd.store.manifest["tensors"][name]
    (rows, cols), raw = meta["shape"], rd.tensor(name)
    if meta["dtype"] in ("f32", "f16"):
        return raw.view(np.float32 if meta["dtype"] == "f32" else np.float16).astype(
            np.float32).reshape(rows, cols)
    ng = rows * cols // GROUP
    scale, mn = (raw[o:o + 2 * ng].view(np.float16).astype(np.float32).reshape(rows, -1, 1)
                 for o in (0, 2 * ng))
    p = raw[4 * ng:].reshape(rows, cols // 2)
    q = np.stack([p & 0xF, p >> 4], -1).reshape(rows, -1, GROUP).astype(np.float32)
    return (q * scale + mn).reshape(rows, cols)


def _q8r(rd: Records, name: str) -> tuple[np.ndarray, np.ndarray]:
    """int8 rows [R, C] and their bf16 scale bits [R]."""
    rows, cols = rd.store.manifest["tensors"][name]["shape"]
    raw = rd.tensor(name)
    return raw[:rows * cols].view(np.int8).reshape(rows, cols), raw[rows * cols:].view(np.uint16)


def _q4k(rd: Records, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(packed u8 [R/64, C, 32], sz bf16 bits: pairs [C/32, R, 2] as stored, or scales alone
    [C/32, R] where `compact` finds every zero 0)."""
    rows, cols = rd.store.manifest["tensors"][name]["shape"]
    packed, sz = compact(*_split_q4k(rd.tensor(name), rows, cols))
    if sz.ndim == 2:  # the nibbles into their own buffer: the record's, pairs and all, goes
        own = _aligned(packed.nbytes).reshape(packed.shape)
        own[:] = packed
        packed = own
    return packed, sz


def _mat(packed: np.ndarray, sz: np.ndarray) -> tuple:
    """A matrix as the C layer takes it: (packed, sz, rows, sym)."""
    return packed.ctypes.data, sz.ctypes.data, sz.shape[1], int(sz.ndim == 2)


def compact(packed: np.ndarray, sz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(packed, (scale, zero) pairs [G, N, 2]) -> (packed, scales [G, N]) where every zero is
    0 (Q4_0's grid): the kernel's symmetric form, 10% fewer bytes to hold and to read."""
    if has_zeros(sz):
        return packed, sz
    scales = _aligned(sz[..., 0].nbytes).view(np.uint16).reshape(sz.shape[:2])
    scales[:] = sz[..., 0]
    return packed, scales


def _split_q4k(raw: np.ndarray, rows: int, cols: int):
    half = rows * cols // 2
    return (raw[:half].reshape(rows // 64, cols, 32),
            raw[half:half + rows * cols // GROUP * 4].view(np.uint16).reshape(cols // GROUP, rows, 2))


def _ffn(rd: Records, l: int, expert: int, clusters: int, into: tuple | None = None):
    """The layer's (or expert's) first `clusters` clusters joined into whole gate, up [F', d]
    and down [d, F'] q4k matrices: gate/up row blocks follow each other; down's blocks run
    along its columns. A symmetric store's scales are kept alone (the kernel's symmetric
    form: 10% fewer bytes), checked to have every zero 0. into: an evicted expert's matrices
    to write over (same shapes: no allocation, no page faults, no heap left with holes)."""
    store, sym = rd.store, _symmetric(rd.store)
    d, f = store.args.hidden_size, clusters * store.cluster_size

    def empty(packed: tuple, sz: tuple):
        sz = sz[:2] if sym else sz
        return (_aligned(math.prod(packed)).reshape(packed),
                _aligned(2 * math.prod(sz)).view(np.uint16).reshape(sz))
    gate, up, down = into or (empty((f // 64, d, 32), (d // GROUP, f, 2)),
                              empty((f // 64, d, 32), (d // GROUP, f, 2)),
                              empty((d // 64, f, 32), (f // GROUP, d, 2)))

    def place(c: int, raw: np.ndarray) -> None:
        lo, n = c * store.cluster_size, store.cluster_rows(c)
        for i, ((shape, off, nb), (w, s)) in enumerate(zip(store.cluster_parts(c),
                                                            (gate, up, down))):
            pk, sz = _split_q4k(raw[off:off + nb], *shape)
            if sym:
                if has_zeros(sz):
                    raise StoreError(f"{store.path}: cluster {c} of layer {l} expert {expert} "
                                     "has q4 zeros that are not 0; its manifest says none")
                sz = sz[..., 0]
            if i < 2:  # gate, up: rows lo .. lo + n
                w[lo // 64:(lo + n) // 64], s[:, lo:lo + n] = pk, sz
            else:      # down: columns lo .. lo + n
                w[:, lo:lo + n], s[lo // GROUP:(lo + n) // GROUP] = pk, sz

    rd.clusters(l, expert, clusters, place)
    return gate, up, down

def load(path, context: int = 2048, kv: str = "f16", threads: int = 1,
         resident: int | None = None, expert_budget: int | None = None,
         expert_policy: str | None = None, expert_cut: float | None = None) -> LeanEngine:
    t0 = time.perf_counter()
    eng = LeanEngine(Store(path, readahead=False), context, kv, threads, resident,
                     expert_budget, expert_policy, expert_cut)
    eng.load_s = time.perf_counter() - t0
    return eng
