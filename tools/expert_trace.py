"""Routing traces of Mixtral-family models, replayed through the expert cache's policies.

    python tools/expert_trace.py record --tiny --out /tmp/tiny.json
    python tools/expert_trace.py record /work/bench-data/stores/synth-moe-q4 --out /tmp/moe.json
    python tools/expert_trace.py replay /tmp/moe.json --budgets 0.125 0.25 0.5 0.75

`record` runs a prompt (prefill: the warm-up) and then text token by token (teacher-forced,
so that a random model's greedy loop does not fake locality), and writes for every decoded
token and layer: the experts routed, and the experts the next layer's router picks from this
layer's input (the engine's read-ahead) with their router probabilities; for layer 0, those
layer 0's router picks from the previous token's last MoE input.
`replay` runs the trace through tiercache.cache.experts.ExpertCache at budgets given as a
share of all experts, and reports hit rates by layer per policy, and read-ahead used / unused /
demand reads per probability cut.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tiercache.cache.experts import ExpertCache  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
if not SHARED.is_dir():
    SHARED = Path("/work/shared/data")


# -- record ----------------------------------------------------------------------------------
def tiny_model(seed: int = 0, layers: int = 4, experts: int = 8):
    """A tiny Mixtral built in code (random weights, 8 experts top-2), tiercache's own Model."""
    from tiercache.config import ModelArgs
    from tiercache.models import Model
    torch.manual_seed(seed)
    args = ModelArgs.from_dict(dict(
        model_type="mixtral", hidden_size=64, num_hidden_layers=layers, intermediate_size=96,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=256, num_local_experts=experts,
        num_experts_per_tok=2, rms_norm_eps=1e-5, tie_word_embeddings=False,
        max_position_embeddings=4096))
    model = Model(args).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.08) if p.ndim == 2 else p.fill_(1.0)
    return model


class Recorder:
    """Forward hooks on each MoE block: its input x -> routed experts, and the next layer's
    router on x (read-ahead), probabilities kept."""

    def __init__(self, layers):
        self.moes = [layer.block_sparse_moe for layer in layers]
        self.k = self.moes[0].top_k
        self.tokens: list[dict] = []
        self.on = False
        self.last_x = None  # the previous token's last MoE input
        self.counts = [[0] * len(self.moes[0].gate.weight) for _ in self.moes]
        for l, moe in enumerate(self.moes):
            moe.register_forward_hook(self._hook(l))

    def _top(self, l: int, x: torch.Tensor) -> list[list]:
        p = F.softmax(self.moes[l].gate(x).float(), dim=-1)  # [N, E]
        w, idx = p.topk(self.k, dim=-1)
        return [[[int(e), round(float(q), 4)] for e, q in zip(i, v)] for i, v in zip(idx, w)]

    def _hook(self, l: int):
        def hook(module, inputs, output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1])
            routed = self._top(l, x)
            for row in routed:
                for e, _ in row:
                    self.counts[l][e] += 1
            if not self.on or x.shape[0] != 1:
                if l == len(self.moes) - 1:
                    self.last_x = x[-1:]
                return
            if l == 0:
                self.tokens.append({"routed": [], "ahead": []})
                first = self._top(0, self.last_x)[0] if self.last_x is not None else []
                self.tokens[-1]["ahead"].append(first)
            t = self.tokens[-1]
            t["routed"].append(routed[0])
            if l + 1 < len(self.moes):
                t["ahead"].append(self._top(l + 1, x)[0])
            else:
                self.last_x = x
        return hook


def text_ids(tokenizer, n: int) -> list[int]:
    return tokenizer.encode((SHARED / "dev-eval.txt").read_text()[: 40 * n])[:n]


@torch.inference_mode()
def record(a) -> dict:
    torch.set_num_threads(a.threads)
    if a.tiny:
        model, name = tiny_model(), "tiny Mixtral built in code (4 layers, 8 experts top-2, d 64)"
        caches = model.make_cache()
        step = lambda ids: model(torch.tensor([ids]), caches)  # noqa: E731
        ids = [int(i) for i in torch.randint(3, 256, (a.prompt + a.tokens,),
                                             generator=torch.Generator().manual_seed(1))]
        layers = model.model.layers
    else:
        from tiercache.engine.tiered import TierConfig, load_tiered
        from tiercache.store.format import Store
        from tiercache.tokenizer import Tokenizer
        eng = load_tiered(Store(a.store, readahead=False), TierConfig(compute="torch",
                                                                      prefetch=False))
        session, name = eng.new_session(), str(a.store)
        step = lambda ids: eng.forward_ids(session, ids)  # noqa: E731
        ids = text_ids(Tokenizer(a.store), a.prompt + a.tokens)
        layers = eng.model.model.layers
    rec = Recorder(layers)
    t0 = time.time()
    step(ids[: a.prompt])
    warm = [row[:] for row in rec.counts]
    rec.on = True
    for t in ids[a.prompt:]:
        step([t])
    return {"model": name, "prompt": a.prompt, "tokens": len(rec.tokens), "top_k": rec.k,
            "experts": len(warm[0]), "layers": len(warm), "warmup_counts": warm,
            "threads": a.threads, "seconds": round(time.time() - t0, 1), "trace": rec.tokens}


# -- replay ----------------------------------------------------------------------------------
def replay(trace: dict, policy: str, budget: float, pin_share: float = 0.75) -> dict:
    """Hit rates by layer of one policy at `budget` (a share of all experts), each expert one
    byte-unit. 'layer-order' is what the engine pins today without a cache: whole layers in
    order, the rest read every time they are routed."""
    L, E = trace["layers"], trace["experts"]
    n = int(round(budget * L * E))
    hits, uses = [0] * L, [0] * L
    if policy == "layer-order":
        held = {(l, e) for l in range(L) for e in range(E)
                if l * E + e < n}
        for tok in trace["trace"]:
            for l, row in enumerate(tok["routed"]):
                for e, _ in row:
                    uses[l] += 1
                    hits[l] += (l, e) in held
        return _rates(hits, uses)
    c = ExpertCache(n, L, policy, pinned_bytes=int(n * pin_share))
    if policy == "freq+lru":  # warm-up: the prompt's routing
        counts = {(l, e): k for l, row in enumerate(trace["warmup_counts"])
                  for e, k in enumerate(row)}
        c.pin_hottest(1, counts)
    for tok in trace["trace"]:
        for l, row in enumerate(tok["routed"]):
            now = [(l, e) for e, _ in row]
            for key in now:
                if c.get(key) is None:
                    c.put(key, True, 1, in_use=now)
    s = c.report()
    return _rates(s["hits"], [h + m for h, m in zip(s["hits"], s["misses"])])


def _rates(hits, uses) -> dict:
    return {"by_layer": [h / u if u else 0.0 for h, u in zip(hits, uses)],
            "all": sum(hits) / max(1, sum(uses))}


def read_ahead(trace: dict, cut: float) -> dict:
    """Experts read ahead (router prob >= cut), of them used and unused, and demand reads
    (routed, not read ahead), over layers 1.. (this token) and layer 0 (previous token)."""
    out = {}
    for name, layers in (("layers 1+", range(1, trace["layers"])), ("layer 0", [0])):
        used = unused = demand = 0
        for tok in trace["trace"]:
            for l in layers:
                ahead = {e for e, p in tok["ahead"][l] if p >= cut}
                routed = {e for e, _ in tok["routed"][l]}
                used += len(ahead & routed)
                unused += len(ahead - routed)
                demand += len(routed - ahead)
        out[name] = {"used": used, "unused": unused, "demand": demand,
                     "precision": used / max(1, used + unused),
                     "recall": used / max(1, used + demand)}
    return out


POLICIES = [("layer-order", 0.0), ("lru", 0.0), ("freq+lru", 0.5), ("freq+lru", 1.0)]


def report(trace: dict, budgets: list[float], cuts: list[float]) -> str:
    L, E = trace["layers"], trace["experts"]
    lines = [f"Model: {trace['model']}; {trace['prompt']}-token prompt (warm-up), "
             f"{trace['tokens']} decoded tokens (teacher-forced), {L} layers x {E} experts "
             f"top-{trace['top_k']}; recorded with {trace['threads']} thread(s).", "",
             "Routing spread: share of decode uses taken by each layer's 2 most used experts "
             f"(even spread: {2 / E:.2f}): " + ", ".join(f"{x:.2f}" for x in _spread(trace)), "",
             "| budget (share of experts) | policy | hit rate | by layer |", "|---|---|---|---|"]
    for b in budgets:
        for policy, share in POLICIES:
            r = replay(trace, policy, b, share)
            label = policy + (f" ({share:.0%} pinned)" if policy == "freq+lru" else "")
            lines.append(f"| {b:.3f} ({int(round(b * L * E))}) | {label} | {r['all']:.3f} | "
                         + " ".join(f"{x:.2f}" for x in r["by_layer"]) + " |")
    lines += ["", "| router prob cut | read ahead: used / unused / demand reads (layers 1+) | "
              "precision | recall | layer 0 from the previous token: used / unused / demand |",
              "|---|---|---|---|---|"]
    for cut in cuts:
        r = read_ahead(trace, cut)
        a, z = r["layers 1+"], r["layer 0"]
        lines.append(f"| {cut:g} | {a['used']} / {a['unused']} / {a['demand']} | "
                     f"{a['precision']:.2f} | {a['recall']:.2f} | "
                     f"{z['used']} / {z['unused']} / {z['demand']} |")
    return "\n".join(lines)


def _spread(trace: dict) -> list[float]:
    out = []
    for l in range(trace["layers"]):
        c = [0] * trace["experts"]
        for tok in trace["trace"]:
            for e, _ in tok["routed"][l]:
                c[e] += 1
        out.append(sum(sorted(c)[-2:]) / max(1, sum(c)))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("store", nargs="?", help="a Mixtral-family tiercache store")
    r.add_argument("--tiny", action="store_true", help="the tiny Mixtral built in code")
    r.add_argument("--prompt", type=int, default=128)
    r.add_argument("--tokens", type=int, default=256)
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--out", type=Path, required=True)
    s = sub.add_parser("replay")
    s.add_argument("trace", type=Path, nargs="+")
    s.add_argument("--budgets", type=float, nargs="+", default=[0.125, 0.25, 0.5, 0.75])
    s.add_argument("--cuts", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.2, 0.3])
    a = p.parse_args()
    if a.cmd == "record":
        if not (a.tiny or a.store):
            p.error("a store, or --tiny")
        trace = record(a)
        a.out.write_text(json.dumps(trace))
        print(f"{trace['tokens']} tokens in {trace['seconds']} s -> {a.out}", file=sys.stderr)
    else:
        for path in a.trace:
            print(report(json.loads(path.read_text()), a.budgets, a.cuts) + "\n")


if __name__ == "__main__":
    main()
