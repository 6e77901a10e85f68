"""The policy search: enumerate engine configs with pruning, keep the fastest that fits.

For each held dtype and placement the memory that is not negotiable (runtime, fixed region, KV
cache, buffers) is fixed first; configs where it does not fit are pruned. What is left goes to
FFN clusters, split between the frequency-pinned hot region and the cold LRU on a grid; decode
cluster sizes, I/O threads and prefetch depth are enumerated on top, and prefill's read size and
backend are chosen for the winner. In dense-stream mode the engine can also stream attention
(all but the first k layers) and the head's rows: k and head-pinned-or-not are enumerated too,
so a budget below the pinned weights plans streaming instead of refusing. Memory is always the
engine's own count (planner.accounting), less RUNTIME_MARGIN. The objective is predicted decode tok/s, then prefill tok/s,
then less memory. Since a larger budget only adds configs, and each config's prediction does not
get worse with more cache, more RAM never predicts slower decode.
"""
from __future__ import annotations

import dataclasses

from tiercache.errors import BudgetError, TiercacheError

from .cost import Config, CostModel, Prediction
from .estimate import estimate_from_source, load_model, restate
from .lean_fit import lean_fit
from .profiles import DeviceProfile, resolve_device
from .sizes import ModelSizes, default_freq
from .units import mb, parse_size

PLAN_VERSION = 1
RAM_SHARE = 0.75  # default budget: the OS and other apps keep the rest
VRAM_SHARE = 0.9
HOT_GRID = 10  # hot/cold split points between all-LRU and all-pinned
# The engine measures its runtime (anonymous memory before any weight) as it loads and refuses
# a plan whose regions then exceed --ram; the probe's figure was ~4 MB low for a plan_check run
# (it imports the planner and a tokenizer besides). Plans leave this much unplanned.
RUNTIME_MARGIN = 8 << 20
PREFILL_BLOCKS = (256 << 10, 1 << 20, 4 << 20)
# approximate relative perplexity cost (stated assumptions, see explanation)
DTYPE_COST = {"f32": 0.0, "bf16": 0.002, "f16": 0.001, "q8": 0.005, "q4": 0.05}
SKIP_COST = ((0.0, 0.0), (0.3, 0.05), (0.5, 0.35), (0.7, 1.5))  # DESIGN.md, SmolLM2-135M


@dataclasses.dataclass
class Choice:
    config: Config
    pred: Prediction
    cost: CostModel


def make_plan(manifest_or_estimate, device="this", ram=None, vram=None,
              min_tok_s: float | None = None, quality: float | None = None,
              context: int = 2048, prompt_tokens: int = 128, io_mode: str | None = None,
              active: float | None = None) -> dict:
    """The plan for a store manifest, an estimate, or a model path (store, HF dir, GGUF).

    Returns {"plan_version", "model", "device", "limits", "engine", "predicted", "search",
    "explanation"}: `engine` holds the knobs (region bytes, cluster sizes, I/O threads,
    prefetch depth, backends, placement, held dtypes), `predicted` the cost model's figures
    for them. Raises BudgetError, with the numbers, when nothing fits or is fast enough.
    `active`: the share of FFN neurons assumed active per token when the model has no
    activation profile (default 0.5, Zipf-skewed; 1.0 plans a dense run)."""
    dev = resolve_device(device)
    manifest = load_model(manifest_or_estimate)
    budget = Budget.of(dev, ram, vram)
    io_mode = io_mode or ("direct" if dev.direct_io else "buffered")
    models = _candidate_models(manifest, quality, active)
    best, stats = None, {"evaluated": 0, "feasible": 0}
    for sizes in models:
        cm = CostModel(sizes, dev)
        found = search(cm, budget, context, prompt_tokens, io_mode, stats)
        if found and (best is None or _key(found) > _key(best)):
            best = found
    if best is None:
        raise BudgetError(_refusal(models, dev, budget, context, prompt_tokens, io_mode)
                          + _lean_note(manifest, dev, budget, context))
    if min_tok_s and best.pred.decode_tok_s < min_tok_s:
        raise BudgetError(_too_slow(best, dev, budget, min_tok_s, context, prompt_tokens, io_mode))
    return _plan_dict(best, dev, budget, manifest, min_tok_s, quality, stats)


# -- budget --------------------------------------------------------------------------------------
@dataclasses.dataclass
class Budget:
    ram: int
    vram: int
    ram_source: str

    @classmethod
    def of(cls, dev: DeviceProfile, ram, vram) -> "Budget":
        r = parse_size(ram) if ram is not None else int(dev.ram_bytes * RAM_SHARE)
        v = parse_size(vram) if vram is not None else int(dev.vram_bytes * VRAM_SHARE)
        src = "--ram" if ram is not None else f"{RAM_SHARE:.0%} of the device's RAM"
        return cls(r, min(v, dev.vram_bytes) if not dev.unified_memory else 0, src)


# -- the search ----------------------------------------------------------------------------------
def search(cm: CostModel, budget: Budget, context: int, prompt_tokens: int, io_mode: str,
           stats: dict | None = None) -> Choice | None:
    """The fastest config of one model on one device that fits the budget, or None."""
    stats = stats if stats is not None else {"evaluated": 0, "feasible": 0}
    budget = dataclasses.replace(budget, ram=budget.ram - RUNTIME_MARGIN)  # what plans fill
    best, ties = 0.0, []
    for base in _bases(cm, context, prompt_tokens, io_mode, budget.vram):
        for c in _splits(cm, base, budget):
            for cand in _io_options(cm, c):
                stats["evaluated"] += 1
                pred = cm.predict(cand, prefill=False)
                if not _fits(pred, budget):
                    continue
                stats["feasible"] += 1
                if pred.decode_tok_s > best * (1 + 1e-9):
                    best, ties = pred.decode_tok_s, [cand]
                elif pred.decode_tok_s >= best * (1 - 1e-9):
                    ties.append(cand)
    # equal decode (e.g. nothing left to read): prefill speed, then less memory, decides
    choices = [ch for c in ties for ch in _prefill_options(cm, c, budget)]
    return max(choices, key=_key) if choices else None


def _io_options(cm: CostModel, c: Config):
    """I/O threads x lookahead depth; with nothing to read in decode only the first matters
    (prefill's threads are chosen with its read size)."""
    first = True
    lay = cm.layout(c)
    if lay is not None and lay.dense:  # threads and depth chosen with the split
        yield c
        return
    depths = (0, 1)
    for threads in _threads(cm.dev):
        for depth in depths:  # the engine looks one layer ahead, or not at all
            cand = dataclasses.replace(c, io_threads=threads, prefetch_layers=depth)
            if first:
                first = False
                if cm.predict(cand, prefill=False).reads_per_token == 0:
                    yield cand
                    return
            yield cand


def _key(ch: Choice) -> tuple:
    return (ch.pred.decode_tok_s, ch.pred.prefill_tok_s, -ch.pred.peak_memory_bytes)


def _fits(pred: Prediction, budget: Budget) -> bool:
    return max(pred.need_bytes, pred.peak_memory_bytes) <= budget.ram \
        and pred.peak_vram_bytes <= budget.vram


def _bases(cm: CostModel, context, prompt_tokens, io_mode, vram: int = 0):
    """Every cluster size and held dtype, on the CPU alone and, where the device has a CUDA
    GPU's own memory and the model a manifest to place, with the engine's VRAM tier given
    `vram` (the engine's own split, `layout.place`: the head, then whole layers; an MoE's
    layer trunks, then whole experts)."""
    dev = cm.dev
    vrams = [0]
    if vram > 0 and dev.has_gpu and not dev.unified_memory and cm.layout() is not None:
        vrams.append(vram)
    gpu_be = next(iter(dev.backends("gpu")), None)
    for cluster in _cluster_sizes(cm):
        for hold in _holds(cm, cluster):
            for v in vrams:
                yield Config(decode_cluster=cluster, hot_clusters=0, cold_clusters=0,
                             hold_fixed=hold, hold_ffn=hold, vram=v,
                             decode_backend=gpu_be if v else "torch", prefill_backend="torch",
                             io_mode=io_mode, context=context, prompt_tokens=prompt_tokens)


def _holds(cm: CostModel, cluster: int) -> list[str | None]:
    """Compute formats the engine offers: a q4 store runs as stored on torch's int4 kernel
    (clusters of 64k neurons, d % 64 == 0) or expanded to f32; a q8 store's matrices run on
    the int8 kernel (its FFN in f32); anything else runs in f32."""
    m, dev = cm.m, cm.dev
    int4 = (m.ffn_dtype == "q4" and cluster % 64 == 0 and m.d % 64 == 0 and m.F % cluster == 0
            and "q4" in dev.compute["torch"]["matvec"])
    if int4 and cm.layout(hold=None) is not None and cm.layout(hold=None).int4:
        # the engine's int4 path: f32 compute of a q4 store only costs memory (and its
        # streamed clusters, decoded to f32, are more than the engine counts)
        return [None]
    if int4:
        return [None, "f32"]
    return [None] if m.dtype == "q8" else ["f32"]


def _cluster_sizes(cm: CostModel) -> list[int]:
    """A store is read in its own records; for a model not converted yet, cluster sizes whose
    records sit on the useful part of the flash curve (a recommendation for `convert`)."""
    m = cm.m
    if m.kind == "store":
        return [m.cluster_size]
    out, k = [], 32
    while k <= m.F:
        rec = cm.record_bytes(k)
        if rec <= 4 << 20 and (rec >= 2048 or 2 * k > m.F) and m.F % k == 0:
            out.append(k)
        k *= 2
    return out or [m.cluster_size]


def _threads(dev: DeviceProfile) -> list[int]:
    return sorted({int(p) for _, p, _ in dev.flash})


def _splits(cm: CostModel, c: Config, budget: Budget):
    """Hot/cold splits of what the budget leaves once the fixed costs are paid."""
    lay = cm.layout(c)
    if lay is not None and lay.dense:
        yield from _dense_splits(cm, lay, c, budget)
        return
    act = cm.act(c)
    empty = _base_memory(cm, c)
    cb = cm.cached_bytes(c.decode_cluster, c.hold_ffn)
    room_ram = budget.ram - empty["ram_total"]
    if room_ram < 0 or empty["vram"] > budget.vram:
        return
    max_hot = min(act.n, int(room_ram // cb))
    if max_hot == act.n:  # everything can be pinned: nothing to split
        yield dataclasses.replace(c, hot_clusters=act.n, cold_clusters=0)
        return
    per_layer = -(-cm.m.F // c.decode_cluster)  # the engine's cold region holds a layer at least
    # absolute grid points (so a larger budget only adds splits), the most that fits, and the
    # most that leaves the cold region its one layer
    hots = sorted({round(act.n * i / HOT_GRID) for i in range(HOT_GRID + 1)}
                  | {max_hot, max(0, max_hot - per_layer)})
    for hot in (h for h in hots if h <= max_hot):
        left = room_ram - hot * cb
        cold = max(0, min(act.n - hot, int(left // cb)))
        if cold >= per_layer:
            yield dataclasses.replace(c, hot_clusters=hot, cold_clusters=cold)


def _dense_splits(cm: CostModel, lay, c: Config, budget: Budget):
    """Dense-stream mode (every cluster used every token): no LRU; how many units are read
    ahead on how many I/O threads (each a read buffer), with attention and the head pinned as
    the engine would (`_engine_pins`); the rest streams. Each choice fills what is left with
    clusters; a fixed grid of smaller counts keeps a larger budget from losing a config
    (pinning a cluster can split a read in two)."""
    runtime = sum(cm.runtime_bytes(gpu=c.vram > 0).values())
    ram = budget.ram
    for threads in _threads(cm.dev):
        for depth in (0, 1, 2):  # TierConfig.prefetch_layers: units read ahead
            pins = _engine_pins(lay, ram, runtime, c.context, depth, threads)
            if pins is None:
                continue
            att, head = pins
            if cm.m.args.is_moe:
                yield _moe_split(lay, c, ram, runtime, depth, threads, att, head)
                continue
            most = lay.max_hot(ram, runtime, c.context, depth, threads, att, head)
            if most < 0:
                continue
            hots = {round(lay.total * i / HOT_GRID) for i in range(HOT_GRID + 1)} | {most}
            for hot in sorted(h for h in hots if h <= most):
                yield dataclasses.replace(c, hot_clusters=hot, cold_clusters=0,
                                          prefetch_layers=depth, io_threads=threads,
                                          pin_attention=att, pin_head=head)


def _moe_split(lay, c: Config, ram: int, runtime: int, depth: int, threads: int, att,
               head) -> Config:
    """An MoE's split as the engine sizes it: every expert pinned where they all fit, else
    what is left after attention and the head in its expert cache of whole experts (pinning
    clusters in layer order instead left every routed expert's other clusters to read: the
    synthetic Mixtral at 1100 MB planned 168 MB a token where the engine's own cache read 20)."""
    b = lay.budget(runtime, c.context, None, 0, depth, threads, ram=ram)
    every = b.hot_slots >= lay.total
    return dataclasses.replace(c, hot_clusters=lay.total if every else 0, cold_clusters=0,
                               expert_cache=0 if every else b.experts, prefetch_layers=depth,
                               io_threads=threads, pin_attention=att, pin_head=head)


def _engine_pins(lay, ram: int, runtime: int, context: int, depth: int, threads: int):
    """(pin_attention, pin_head) as the engine's own sizing picks them for this budget, or
    None where nothing fits
    (attention layers first, then the head, then clusters), where their records are in the
    kernels' layouts (q4k, q8r): None for all attention. The planner once searched a grid of
    these, and its cost model ranked some alternatives above the engine's order that ran
    slower (a streamed head's slices with every cluster pinned: 17 tok/s at 302 MiB against
    the engine's 24-28 with the head pinned and 14 MB/token of clusters streamed)."""
    try:
        b = lay.budget(runtime, context, None, 0, depth, threads, ram=ram)
    except BudgetError:
        return None
    attn, _, _ = lay.streamable  # (the CPU's layers: VRAM's come first and do not stream)
    k = next((l for l in sorted(attn) if l not in b.attn_pinned), None)
    return k, b.head_pinned


def _base_memory(cm: CostModel, c: Config) -> dict:
    """Memory before any FFN cluster is cached, read buffers sized for every active cluster
    missing (an upper bound), without lookahead (its buffers are checked per config)."""
    act = cm.act(c)
    per_layer = act.active_clusters() / max(1, cm.m.layers - len(cm.vram_split(c)[0]))
    return cm.predict_memory_only(dataclasses.replace(c, prefetch_layers=0), per_layer)


def _prefill_options(cm: CostModel, c: Config, budget: Budget) -> list[Choice]:
    backends = cm.dev.backends("cpu")  # the CPU's layers' (the VRAM tier computes its own)
    threads = _threads(cm.dev) if cm.predict(c, prefill=False).reads_per_token == 0 \
        else [c.io_threads]  # decode does not read: threads are prefill's to choose
    out = []
    for be in backends:
        for blk in PREFILL_BLOCKS:
            for t in threads:
                cand = dataclasses.replace(c, prefill_backend=be, prefill_block=blk,
                                           io_threads=t)
                pred = cm.predict(cand)
                if _fits(pred, budget):
                    out.append(Choice(cand, pred, cm))
    return out


# -- models to consider --------------------------------------------------------------------------
def _candidate_models(manifest: dict, quality: float | None,
                      active: float | None = None) -> list[ModelSizes]:
    """A store is planned as it is; an estimate also in smaller dtypes (within `quality`)."""
    manifests = [manifest]
    if manifest.get("estimate"):
        src = manifest["dtype"]
        dtypes = [d for d in ("f32", "bf16", "q8", "q4") if _bits(d) <= _bits(src)
                  and (quality is None or DTYPE_COST[d] <= quality)]
        manifests = [restate(manifest, d) for d in dtypes] or manifests
    out = []
    for m in manifests:
        sizes = ModelSizes.from_manifest(m, name=manifest.get("name", ""))
        if active is not None and sizes.assumed_activity:
            f = default_freq(sizes.F, 1.0 if sizes.args.is_moe else active)
            sizes = dataclasses.replace(sizes, freq=[f] * sizes.ffn_units,
                                        gate_pinned=f.mean() < 1)
        elif quality is not None and sizes.assumed_activity:
            sizes = _with_quality_sparsity(sizes, quality - DTYPE_COST.get(sizes.dtype, 0))
        out.append(sizes)
    return out


def _bits(dtype: str) -> int:
    return {"f32": 32, "f16": 16, "bf16": 16, "q8": 8, "q4": 4}[dtype]


def _with_quality_sparsity(sizes: ModelSizes, room: float) -> ModelSizes:
    """Without a profile, skip only as many neurons as the quality budget allows."""
    skip = 0.0
    for (s0, c0), (s1, c1) in zip(SKIP_COST, SKIP_COST[1:]):
        if room >= c1:
            skip = s1
        elif room > c0:
            skip = s0 + (s1 - s0) * (room - c0) / (c1 - c0)
            break
    active = 1.0 - min(skip, 0.5)
    f = default_freq(sizes.F, active)
    return dataclasses.replace(sizes, freq=[f] * sizes.ffn_units)


# -- refusals ------------------------------------------------------------------------------------
def minimum_memory(cm: CostModel, context: int, prompt_tokens: int, io_mode: str) -> dict:
    """The smallest RAM any config of this model needs: one layer of cold clusters (or every
    cluster pinned, if that is less)."""
    best = None
    for base in _bases(cm, context, prompt_tokens, io_mode):
        lay = cm.layout(base)
        if lay is not None and lay.dense:  # nothing pinned that can stream, one unit in use
            attn, head_rows, _ = lay.streamable
            att, head = (0 if attn else None), not head_rows
            mem = cm.predict_memory_only(dataclasses.replace(
                base, prefetch_layers=0, io_threads=min(_threads(cm.dev)),
                pin_attention=att, pin_head=head))
            mem["ram_total"] = mem["need"]
        else:
            mem = _base_memory(cm, base)
            cb = cm.cached_bytes(base.decode_cluster, base.hold_ffn)
            n = cm.act(base).n
            mem["ram"]["cold"] = min(n, -(-cm.m.F // base.decode_cluster)) * cb
            mem["ram_total"] = max(mem["ram_total"] + mem["ram"]["cold"], mem["need"])
        mem["ram_total"] += RUNTIME_MARGIN
        if best is None or mem["ram_total"] < best["ram_total"]:
            best = mem
    return best


def _lean_note(manifest: dict, dev: DeviceProfile, budget: Budget, context: int) -> str:
    """Where the tiered engine a plan describes does not fit but the lean runtime (what
    `--ram` alone runs on this store) does, say so."""
    fit = lean_fit(manifest, budget.ram, context, dev=dev)
    if not fit or not fit["fits"]:
        return ""
    return (f"; without a plan, `--ram {mb(budget.ram):.0f}M` runs this store on the lean "
            f"runtime, which needs {mb(fit['least_bytes']):.0f} MB (predicted "
            f"{fit['decode_tok_s']:.1f} tok/s on one thread)")


def _refusal(models, dev, budget, context, prompt_tokens, io_mode) -> str:
    cm = CostModel(models[-1], dev)  # the smallest dtype considered
    need = minimum_memory(cm, context, prompt_tokens, io_mode)
    r = need["ram"]
    ffn = r["cold"] + r["hot"]
    parts = [("runtime", r["runtime"] + r["tokenizer"]), ("file pages", r.get("file_reserve", 0) + r.get("file_pages", 0)),
             ("fixed", r["fixed"]), (f"KV cache for {context} tokens", r["kv"]),
             ("one layer of FFN clusters" if ffn else "FFN streamed", ffn),
             ("buffers", r["buffers"] + r["activations"] + r["page_cache"])]
    parts.append(("margin for the runtime's measurement", RUNTIME_MARGIN))
    loading = need["ram_total"] - sum(r.values()) - RUNTIME_MARGIN
    if loading > 0:  # the engine's check before it loads: the largest record read whole
        parts.append(("loading", loading))
    detail = " + ".join(f"{name} {mb(v):.0f}" for name, v in parts if v or name == "fixed")
    msg = (f"{cm.m.name or 'the model'} needs at least {mb(need['ram_total']):.0f} MB "
           f"({detail}), budget is {mb(budget.ram):.0f} MB")
    per_tok = cm.m.kv_bytes_per_token()
    spare = budget.ram - (need["ram_total"] - r["kv"])
    if r["kv"] > 0 and spare >= 64 * per_tok:
        msg += f"; a context of {int(spare // per_tok)} tokens would fit"
    return msg


def least_ram(model, device="this", context: int = 2048, prompt_tokens: int = 128,
              io_mode: str | None = None) -> tuple[int, int]:
    """(the least --ram a plan of this model fits in, the FFN bytes that plan keeps in RAM)."""
    dev = resolve_device(device)
    io_mode = io_mode or ("direct" if dev.direct_io else "buffered")
    cms = [CostModel(s, dev) for s in _candidate_models(load_model(model), None)]
    best = min((minimum_memory(cm, context, prompt_tokens, io_mode) for cm in cms),
               key=lambda m: m["ram_total"])
    return int(best["ram_total"]), int(best["ram"]["hot"] + best["ram"]["cold"])


def _too_slow(best: Choice, dev, budget, want, context, prompt_tokens, io_mode) -> str:
    got = best.pred.decode_tok_s
    lo, hi = budget.ram, budget.ram * 64
    fast = _best_at(best.cost, dev, hi, budget, context, prompt_tokens, io_mode)
    if fast is None or fast.pred.decode_tok_s < want:
        top = fast.pred.decode_tok_s if fast else got
        return (f"predicted decode is {got:.1f} tok/s at {mb(budget.ram):.0f} MB, below the "
                f"{want:g} tok/s asked; this device reaches at most {top:.1f} tok/s")
    for _ in range(20):
        mid = (lo + hi) / 2
        ch = _best_at(best.cost, dev, mid, budget, context, prompt_tokens, io_mode)
        lo, hi = (lo, mid) if ch and ch.pred.decode_tok_s >= want else (mid, hi)
    return (f"predicted decode is {got:.1f} tok/s at {mb(budget.ram):.0f} MB, below the "
            f"{want:g} tok/s asked; that needs about {mb(hi):.0f} MB")


def _best_at(cm, dev, ram, budget, context, prompt_tokens, io_mode):
    b = dataclasses.replace(budget, ram=int(ram))
    return search(cm, b, context, prompt_tokens, io_mode)


# -- the plan ------------------------------------------------------------------------------------
def _plan_dict(best: Choice, dev, budget, manifest, min_tok_s, quality, stats) -> dict:
    from .explain import explain
    c, p, cm = best.config, best.pred, best.cost
    m = cm.m
    layers, on_gpu, units = cm.vram_split(c)
    place = {"embeddings": "ram", "attention": "ram", "norms": "ram",
             "ffn_gate": "ram" if m.gate_pinned else "with_ffn_clusters",
             "ffn_hot": "ram", "ffn_cold_cache": "ram", "ffn_cold": "flash"}
    if m.args.is_moe:
        place["router"] = "ram"
    if c.pin_attention is not None:
        place["attention"] = f"ram (layers below {c.pin_attention}), flash (rest)"
    if not c.pin_head:
        place["lm_head"] = "flash"
    if layers or on_gpu:  # the engine's VRAM tier: computed there, the rest on the CPU
        place["vram"] = {"layers": sorted(layers), "head": on_gpu,
                         "experts": len(units) if m.args.is_moe else 0}
        if on_gpu:
            place["lm_head"] = "vram"
    cb = cm.cached_bytes(c.decode_cluster, c.hold_ffn)
    engine = {
        "fixed_bytes": int(m.fixed_bytes(c.hold_fixed)), "hot_bytes": int(c.hot_clusters * cb),
        "cold_bytes": int(c.cold_clusters * cb),
        "kv_bytes": int(c.context * m.kv_bytes_per_token()),
        "io_threads": c.io_threads, "prefetch_layers": c.prefetch_layers,
        "prefill_cluster_bytes": int(min(c.prefill_block, m.F * m.neuron_bytes())),
        "quantization": m.dtype,
        "compute": "q4" if cm.hold_dtype(c.hold_ffn) == "q4" else "f32",  # TierConfig.compute
        "hold": {"fixed": "as stored (q4/q8 on torch's int4/int8 kernels, others f32)"
                 if c.hold_fixed is None and m.dtype in ("q4", "q8") else "f32",
                 "ffn": cm.hold_dtype(c.hold_ffn)},
        "gate_pinned": m.gate_pinned,
        "hot_clusters": c.hot_clusters, "cold_clusters": c.cold_clusters,
        "streamed_clusters": int(lay.total - min(lay.total, c.hot_clusters + c.cold_clusters))
        if (lay := cm.layout(c)) is not None and lay.dense else 0,
        # TierConfig.pin_attention / pin_head: the first k layers' attention, and the head
        "pin_attention": m.layers if c.pin_attention is None else c.pin_attention,
        "pin_head": c.pin_head,
        "cached_cluster_bytes": int(cb),
        "read_cluster_bytes": int(cm.record_bytes(c.decode_cluster)),
        "store_cluster_size": m.cluster_size, "context": c.context,
        "buffers_bytes": int(p.memory["buffers"] + p.memory["activations"]),
        "threads": dev.threads,
        "vram_bytes": c.vram or None,  # TierConfig.vram_bytes: what the VRAM tier is given
        "expert_cache_bytes": c.expert_cache or None,  # TierConfig.expert_cache_bytes (MoE)
    }
    peak = p.peak_memory_bytes
    if c.io_mode == "buffered":  # read pages stay in the page cache, which the cgroup counts
        unread = m.ffn_bytes() - c.hot_clusters * cm.record_bytes(c.decode_cluster)
        peak = int(min(budget.ram, peak + max(0.0, unread)))
    predicted = {
        "peak_memory_bytes": peak, "anon_memory_bytes": p.peak_memory_bytes,
        "peak_vram_bytes": p.peak_vram_bytes,
        "vram_layers": sorted(layers), "vram_head": on_gpu,
        "decode_tok_s": round(p.decode_tok_s, 3), "prefill_tok_s": round(p.prefill_tok_s, 3),
        "store_bytes_per_token": round(p.store_bytes_per_token, 1),
        "reads_per_token": round(p.reads_per_token, 2), "bottleneck": p.bottleneck,
        "streamed_bytes_per_token": _streamed(cm, c),
        "hit_rate": round(p.hit_rate, 4), "memory": p.memory,
        "decode_ms": {k: round(v * 1e3, 3) for k, v in p.decode_s.items()},
        "prefill_ms": {k: round(v * 1e3, 3) for k, v in p.prefill_s.items()},
        "prompt_tokens": c.prompt_tokens,
        # what these figures assume of the run, not settings (the engine takes none of them:
        # --backend picks prefill's backend, decode is torch on the CPU, reads are pread in
        # the store's clusters)
        "assumes": {"decode_cluster_size": c.decode_cluster, "prefill_backend": c.prefill_backend,
                    "decode_backend": c.decode_backend, "io_mode": c.io_mode,
                    "placement": place},
    }
    plan = {
        "plan_version": PLAN_VERSION, "model": {**m.summary(), **_source(manifest)},
        "device": dev.name,
        "limits": {"ram_bytes": budget.ram, "vram_bytes": budget.vram, "min_tok_s": min_tok_s,
                   "quality": quality, "context": c.context},
        "engine": engine, "predicted": predicted, "search": stats,
        # what `--ram` alone runs on a store the lean runtime takes (planner/lean_fit.py)
        "lean": lean_fit(manifest, budget.ram, c.context, dev=dev),
    }
    # the engine `--plan` runs: the lean runtime where it fits and is predicted no slower
    # (it sizes itself within limits.ram_bytes, as planned), else the tiered engine's regions
    lean = plan["lean"]
    plan["runs"] = ("lean" if lean and lean["fits"]
                    and lean.get("decode_tok_s", 0.0) >= p.decode_tok_s else "tiered")
    plan["explanation"] = explain(plan, best, budget)
    return plan


def _streamed(cm: CostModel, c: Config) -> dict:
    """Store bytes a decode step reads, by weight type (dense stream; else all FFN)."""
    lay = cm.layout(c)
    if lay is None or not lay.dense:
        return {"ffn": round(cm.predict(c, prefill=False).store_bytes_per_token, 1),
                "attention": 0, "head": 0}
    if cm.m.args.is_moe:  # routed experts read whole, beside attention and the head
        s = lay.streamed(lay.total, c.pin_attention, c.pin_head)
        total = cm.predict(c, prefill=False).store_bytes_per_token
        return {"ffn": round(total - s["attn_bytes"] - s["head_bytes"], 1),
                "attention": s["attn_bytes"], "head": s["head_bytes"]}
    s = lay.streamed(min(lay.total, c.hot_clusters + c.cold_clusters), c.pin_attention,
                     c.pin_head)
    return {"ffn": s["ffn_bytes"], "attention": s["attn_bytes"], "head": s["head_bytes"]}


def _source(manifest: dict) -> dict:
    est = manifest.get("estimate")
    if est:
        return {"source": est.get("path"), "estimate_only": True}
    return {"store_id": manifest.get("store_id"), "estimate_only": False}


def load_plan(path) -> dict:
    """Read a plan JSON written by `tiercache plan --out`, checking its version."""
    from tiercache.errors import load_json_object
    plan = load_json_object(path, "plan")
    if plan.get("plan_version") != PLAN_VERSION:
        raise TiercacheError(f"{path}: not a tiercache plan of version {PLAN_VERSION}")
    _check_plan(path, plan)
    return plan


# plan["engine"] keys the engine reads (engine/tiered.py config_from_plan) -> valid values
_ENGINE_KEYS = {
    "hot_clusters": ("an integer >= 0", lambda v: v is None or _int(v, 0)),
    "cold_clusters": ("an integer >= 0", lambda v: v is None or _int(v, 0)),
    "io_threads": ("an integer in 1..256", lambda v: _int(v, 1) and v <= 256),
    "prefetch_layers": ("an integer >= 0", lambda v: _int(v, 0)),
    "context": ("an integer >= 1", lambda v: _int(v, 1)),
    "compute": ("auto, q4 or f32", lambda v: v in ("auto", "q4", "f32")),
    "pin_attention": ("an integer >= 0", lambda v: v is None or _int(v, 0)),
    "pin_head": ("true, false or null", lambda v: v is None or isinstance(v, bool)),
    "gate_pinned": ("true or false", lambda v: isinstance(v, bool)),
    "vram_bytes": ("an integer >= 1 or null", lambda v: v is None or _int(v, 1)),
    "expert_cache_bytes": ("an integer >= 1 or null", lambda v: v is None or _int(v, 1)),
}


def _int(v, least: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


def _check_plan(path, plan: dict) -> None:
    """The settings the engine takes from a plan, typed and in range: one line naming a bad
    one (a hand-edited or damaged plan must not fail deep inside the engine)."""
    engine, limits = plan.get("engine"), plan.get("limits", {})
    if not isinstance(engine, dict) or not isinstance(limits, dict):
        raise TiercacheError(f"{path}: a plan needs 'engine' and 'limits' objects")
    ram = limits.get("ram_bytes")
    if ram is not None and not _int(ram, 1):
        raise TiercacheError(f"{path}: limits.ram_bytes must be a positive integer (got {ram!r:.40})")
    for key, (what, ok) in _ENGINE_KEYS.items():
        if key in engine and not ok(engine[key]):
            raise TiercacheError(f"{path}: engine.{key} must be {what} (got {engine[key]!r:.40})")


def sweep(manifest_or_estimate, device="this", budgets=None, vram=None, context: int = 2048,
          prompt_tokens: int = 128, io_mode: str | None = None, points: int = 24,
          active: float | None = None) -> list[dict]:
    """Predicted decode/prefill tok/s over RAM budgets (default: from the least that fits to
    everything resident): [{"ram_bytes", "decode_tok_s", "prefill_tok_s", "bottleneck"}]."""
    dev = resolve_device(device)
    manifest = load_model(manifest_or_estimate)
    io_mode = io_mode or ("direct" if dev.direct_io else "buffered")
    cms = [CostModel(sizes, dev) for sizes in _candidate_models(manifest, None, active)]
    if budgets is None:
        lo = min(minimum_memory(cm, context, prompt_tokens, io_mode)["ram_total"] for cm in cms)
        m = cms[0].m
        hi = lo + (m.ffn_bytes("f32") + m.fixed_bytes("f32")) * 1.1
        budgets = [lo + (hi - lo) * i / (points - 1) for i in range(points)]
    out = []
    for b in budgets:
        budget = Budget.of(dev, int(b), vram)
        found = [ch for cm in cms if (ch := search(cm, budget, context, prompt_tokens, io_mode))]
        ch = max(found, key=_key) if found else None
        out.append({"ram_bytes": int(b),
                    "decode_tok_s": ch.pred.decode_tok_s if ch else None,
                    "prefill_tok_s": ch.pred.prefill_tok_s if ch else None,
                    "bottleneck": ch.pred.bottleneck if ch else None})
    return out


__all__ = ["make_plan", "search", "sweep", "load_plan", "estimate_from_source",
           "minimum_memory", "least_ram", "Budget", "PLAN_VERSION"]
