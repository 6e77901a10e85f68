"""Why a plan is what it is: the budget, what binds, what streams, and the assumptions made."""
from __future__ import annotations

from . import cost
from .units import mb


def explain(plan: dict, best, budget) -> list[str]:
    e, p, m = plan["engine"], plan["predicted"], best.cost.m
    mem = p["memory"]
    return [line for line in (
        _budget_line(plan, budget, mem),
        _engine_line(plan),
        _vram_line(plan, m),
        _activity_line(m),
        _ffn_line(e, p, best),
        _stream_line(e, p, best),
        _binding_line(plan, best, budget),
        _hold_line(e, m, best.cost.dev),
        _decode_line(p),
        _prefill_line(e, p),
        _io_line(e, best),
        _assumptions(m),
        f"Searched {plan['search']['evaluated']} configs, {plan['search']['feasible']} fit.",
    ) if line]


def _budget_line(plan, budget, mem) -> str:
    return (f"RAM budget {mb(budget.ram):.0f} MB ({budget.ram_source}); predicted peak "
            f"{mb(plan['predicted']['peak_memory_bytes']):.0f} MB = runtime "
            f"{mb(mem['runtime'] + mem['tokenizer']):.0f} (with the tokenizer) + fixed "
            f"{mb(mem['fixed']):.0f} + hot {mb(mem['hot']):.0f} + cold {mb(mem['cold']):.0f} "
            f"+ KV {mb(mem['kv']):.0f} ({plan['limits']['context']} tokens) + buffers "
            f"{mb(mem['buffers'] + mem['activations'] + mem['page_cache']):.0f}"
            + (f"; VRAM {mb(plan['predicted']['peak_vram_bytes']):.0f} of "
               f"{mb(budget.vram):.0f} MB" if budget.vram else "") + ".")


def _engine_line(plan) -> str:
    """A plan's regions are the tiered engine's; on a store the lean runtime takes, `--ram`
    alone runs that instead, and `--plan` too where plan["runs"] says so: what it does with
    the budget (planner/lean_fit.py)."""
    fit = plan.get("lean")
    if not fit:
        return ""
    ram = plan["limits"]["ram_bytes"]
    if not fit["fits"]:
        what = "which does not fit this budget"
    elif "expert_bytes" in fit and fit["expert_bytes"] < fit["all_expert_bytes"]:
        what = (f"which holds {mb(fit['expert_bytes']):.0f} of {mb(fit['all_expert_bytes']):.0f}"
                " MB of experts here and reads the rest when routed")
    elif fit.get("resident_clusters", fit["n_clusters"]) == fit["n_clusters"]:
        what = "which holds every weight here"
    else:
        what = (f"which holds {fit['resident_clusters']} of {fit['n_clusters']} FFN clusters "
                f"per layer here and streams {mb(fit['streamed_bytes_per_token']):.1f} MB a "
                "token")
    speed = (f"; predicted {fit['decode_tok_s']:.1f} tok/s decode on one thread"
             + (" (even routing: a lower bound)" if "expert_bytes" in fit
                and fit["read_bytes_per_token"] else "") if "decode_tok_s" in fit else "")
    if plan.get("runs") == "lean":
        return (f"Engine: `--plan` (and `--ram {mb(ram):.0f}M` alone) runs this store on the "
                f"lean runtime (no torch; it needs at least {mb(fit['least_bytes']):.0f} MB), "
                f"{what}{speed}; the regions and figures here are the tiered engine's, "
                "predicted slower.")
    return (f"Engine: these figures are the tiered engine's, which `--plan` runs. Without a "
            f"plan, `--ram {mb(ram):.0f}M` runs this store on the lean runtime (no torch; it "
            f"needs at least {mb(fit['least_bytes']):.0f} MB), {what}{speed}.")


def _vram_line(plan, m) -> str:
    p = plan["predicted"]
    layers, head = p["vram_layers"], p["vram_head"]
    if not (layers or head):
        return ""
    what = ", ".join(x for x in ("the head" if head else "",
                                 f"layers 0-{layers[-1]}" if layers else "") if x)
    rest = m.layers - len(layers)
    return (f"VRAM tier: {what} in float16 ({mb(p['peak_vram_bytes']):.0f} MB with their KV "
            f"cache), computed on the GPU; " + (f"the other {rest} layers on the CPU, as "
                                               "below." if rest else "nothing on the CPU."))


def _activity_line(m) -> str:
    if m.assumed_activity and m.mean_active() >= 1:
        return ("No activation profile used: planned as a dense run (every FFN neuron active, "
                "the gate cached with its cluster); `tiercache profile` enables sparse decode.")
    if m.assumed_activity:
        return (f"No activation profile in the model: assumed {m.mean_active():.0%} of FFN "
                f"neurons active per token with Zipf-like skew (f_i = min(1, c/(i+1)^0.5)); "
                "run `tiercache profile` for measured frequencies.")
    return (f"Activation profile: {m.profile_tokens} tokens, mean active fraction "
            f"{m.mean_active():.1%}.")


def _ffn_line(e, p, best) -> str:
    act = best.cost.act(best.config)
    share = act.hot_hits(e["hot_clusters"]) / max(act.active_clusters(), 1e-9)
    return (f"FFN: {e['hot_clusters']} of {act.n} clusters of {p['assumes']['decode_cluster_size']} "
            f"neurons pinned hot ({mb(e['hot_bytes']):.1f} MB, {share:.0%} of accesses), cold "
            f"LRU of {e['cold_clusters']} clusters ({mb(e['cold_bytes']):.1f} MB); expected hit "
            f"rate {p['hit_rate']:.1%}, {p['reads_per_token']:.0f} reads of "
            f"{e['read_cluster_bytes'] / 1024:.1f} KiB = "
            f"{mb(p['store_bytes_per_token']):.2f} MB from the store per token.")


def _stream_line(e, p, best) -> str:
    """Dense stream: attention and the head stream too when the budget cannot pin them."""
    s = p.get("streamed_bytes_per_token") or {}
    if not (s.get("attention") or s.get("head")):
        return ""
    layers = best.cost.m.layers
    att = (f"attention of layers {e['pin_attention']}-{layers - 1} "
           f"({mb(s['attention']):.1f} MB)" if s["attention"] else "")
    head = f"the head's rows ({mb(s['head']):.1f} MB, in ~2 MiB slices)" if s["head"] else ""
    return (f"Also streamed per token: {' and '.join(x for x in (att, head) if x)}; "
            "predicted faster than pinning them in place of FFN clusters (a byte streamed is "
            "read once per token whichever weight it is; they differ in read size and units).")


def _binding_line(plan, best, budget) -> str:
    e = plan["engine"]
    act = best.cost.act(best.config)
    if e["hot_clusters"] + e["cold_clusters"] >= act.n:
        return "RAM does not bind: every FFN cluster is resident; more RAM would not help."
    more = _faster_with_more(best, budget)
    tail = f" (at {mb(budget.ram * 1.5):.0f} MB: {more:.1f} tok/s predicted)" if more else ""
    return (f"RAM binds: {act.n - e['hot_clusters'] - e['cold_clusters']} FFN clusters stay "
            f"on flash{tail}.")


def _faster_with_more(best, budget):
    import dataclasses
    from .search import search
    b = dataclasses.replace(budget, ram=int(budget.ram * 1.5))
    c = best.config
    ch = search(best.cost, b, c.context, c.prompt_tokens, c.io_mode)
    return ch.pred.decode_tok_s if ch else None


def _hold_line(e, m, dev) -> str:
    if m.dtype != "q4":
        return (f"Store is {m.dtype}: the engine computes in f32 (weights expanded in RAM)"
                + (", q8 matrices outside the FFN on torch's int8 kernel." if m.dtype == "q8"
                   else "."))
    rates = f"q4 {dev.matvec('torch', 'q4') / 1e9:.2f}, f32 {dev.matvec('torch', 'f32') / 1e9:.2f}"
    how = ("q4 on torch's int4 kernel (q8 embeddings on the int8 kernel, the rest f32)"
           if e["compute"] == "q4" else "f32 (every weight expanded)")
    return (f"Store is q4; compute {how}. Torch matvec GB/s of held weights: {rates}; "
            f"int4 needs clusters of a multiple of 64 neurons (this store: "
            f"{e['store_cluster_size']}).")


def _decode_line(p) -> str:
    ms = p["decode_ms"]
    parts = ", ".join(f"{k} {v:.2f}" for k, v in ms.items() if k != "total" and v >= 0.005)
    return (f"Decode {p['decode_tok_s']:.1f} tok/s, bottleneck {p['bottleneck']} "
            f"(ms per token: {parts}).")


def _prefill_line(e, p) -> str:
    ms = p["prefill_ms"]
    return (f"Prefill {p['prefill_tok_s']:.0f} tok/s on {p['assumes']['prefill_backend']} for a "
            f"{p['prompt_tokens']}-token prompt (matmul {ms['matmul']:.1f} ms, reads "
            f"{ms['io']:.1f} ms in {e['prefill_cluster_bytes'] / 1024:.0f} KiB blocks, "
            "overlapped with two alternating layer buffers).")


def _io_line(e, best) -> str:
    dev = best.cost.dev
    rec = e["read_cluster_bytes"]
    bw = dev.flash_bw(rec, e["io_threads"])
    return (f"I/O: {best.config.io_mode} reads on {e['io_threads']} thread(s), lookahead "
            f"{e['prefetch_layers']} layer(s); the flash curve gives {mb(bw):.0f} MB/s at "
            f"{rec / 1024:.1f} KiB (vs {mb(dev.flash_bw(1 << 20, e['io_threads'])):.0f} MB/s "
            f"at 1 MiB); each miss also costs {dev.miss_overhead_s * 1e3:.2f} ms of software "
            "(thread handoff, checksum, repack into its slot).")


def _assumptions(m) -> str:
    return ("Assumed: neurons and tokens activate independently (a cluster's activity is "
            "1 - prod(1 - f_i); the lookahead's recall is sum pi^2 / sum pi); "
            f"{cost.OPS_PER_LAYER} torch ops per layer; KV cache in f32; the gate is "
            + ("pinned whole (sparse decode: a threshold on act(gate x) picks the clusters)."
               if m.gate_pinned else "cached with its cluster (dense decode: every cluster "
               "active)."))
