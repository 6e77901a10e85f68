"""The planner checked against the engine: predicted vs measured peak memory and decode tok/s.

For SmolLM2-135M q4 (the benchmark's profiled store) on this machine's probed profile, at RAM
budgets from the least the planner accepts to everything resident: `tiercache plan` writes a
plan, then the engine runs it inside a cgroup-v1 memory cap equal to the budget (RSS + page
cache, page cache dropped first), 128-token prompt, 64 decoded tokens, 1 thread.

    python tools/plan_check.py [--ratios 0.1 0.5 1.1] [--out BENCHMARKS.md]

Writes the section "## Planner: predicted vs measured" of BENCHMARKS.md (replacing only it).
Needs root (cgroups). Wrap in `flock /tmp/bench.lock` on a shared machine.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cgroup  # noqa: E402
from report import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
MB = 1 << 20
TITLE = "## Planner: predicted vs measured"
DECODE = 64


# -- the run under a plan (its own process, so the cgroup caps exactly it) ----------------------
def worker(store: str, plan: str, prompt: str, decode: int) -> dict:
    import torch
    from tiercache import api
    from tiercache.engine import StepStats, generate_step, make_sampler
    from tiercache.memory import anon_bytes
    ids = json.loads(Path(prompt).read_text())
    engine, _ = api.load(store, threads=1, plan=plan)
    anon_loaded = anon_bytes()
    stats, tokens = StepStats(), []
    for tok in generate_step(engine.new_session(), ids, make_sampler(), decode, stats):
        tokens.append(tok)
    st, b = engine.stats(), engine.budget
    return {"prefill_tok_s": stats.prefill_tok_s, "decode_tok_s": stats.decode_tok_s,
            "pinned": {"hot": b.hot_slots, "attention": len(b.attn_pinned),
                       "head": b.head_pinned},
            "decode_tokens": stats.decode_tokens, "threads": torch.get_num_threads(),
            "anon_loaded": anon_loaded, "anon_end": anon_bytes(), "vm_hwm": _hwm(),
            **{k: st[k] for k in ("cache_hit_rate", "store_bytes_per_token", "regions",
                                  "io_wait_s", "sparse", "compute")}}


def _hwm() -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+)", text).group(1)) * 1024


# -- the check ----------------------------------------------------------------------------------
def plan_for(store: Path, ram: int, context: int, out: Path) -> dict:
    from planner.search import make_plan
    plan = make_plan(str(store), "this", ram=ram, context=context)
    out.write_text(json.dumps(plan, indent=1))
    return plan


def measure(store: Path, plan_path: Path, prompt: Path, cap: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(store), str(plan_path), str(prompt)]
    r = cgroup.run_capped(cmd, cap, timeout=300)
    out = {"cap": cap, "max_usage": r["max_usage"], "oom": r["oom"], "rc": r["rc"]}
    if r["rc"] == 0:
        out.update(json.loads(r["stdout"].strip().splitlines()[-1]))
    else:
        out["error"] = "OOM-killed" if r["oom"] else (
            r["stderr"].strip().splitlines() or [f"exit {r['rc']}"])[-1][:300]
    return out


def budgets(store: Path, context: int, ratios: list[float]) -> tuple[list[int], int, int]:
    """Budgets footprint + r x weight bytes; the footprint is the least the planner accepts
    minus the FFN it then keeps resident (r = 0: nothing but what streaming needs)."""
    from planner.search import least_ram
    from planner.estimate import load_model
    need, ffn_held = least_ram(str(store), "this", context=context)
    weights = int(load_model(str(store))["weight_bytes"])
    foot = need - ffn_held
    return [max(need, int(foot + r * weights)) for r in ratios], foot, weights


def check(store: Path, prompt: Path, ratios: list[float], context: int, work: Path) -> dict:
    bs, foot, weights = budgets(store, context, ratios)
    rows = []
    for r, b in zip(ratios, bs):
        path = work / f"plan-{b}.json"
        plan = plan_for(store, b, context, path)
        got = measure(store, path, prompt, b)
        rows.append({"r": r, "ram": b, "predicted": plan["predicted"], "engine": plan["engine"],
                     "measured": got})
        print(f"ram {b / MB:.0f} MiB: predicted {plan['predicted']['decode_tok_s']:.1f} tok/s "
              f"{plan['predicted']['peak_memory_bytes'] / MB:.0f} MiB; measured "
              f"{got.get('decode_tok_s', 0):.1f} tok/s {got['max_usage'] / MB:.0f} MiB "
              f"{got.get('error', '')}", file=sys.stderr)
    return {"footprint": foot, "weight_bytes": weights, "context": context, "rows": rows,
            "date": time.strftime("%Y-%m-%d %H:%M")}


def _err(pred: float, meas: float) -> str:
    return f"{(pred - meas) / meas:+.0%}" if meas else "n/a"


def _runtime(pred: dict) -> int:
    """The runtime the plan assumed, counted as the engine counts it (+ file pages)."""
    mem = pred["memory"]
    return mem["runtime"] + mem["tokenizer"] + mem["file_reserve"]


def report(res: dict) -> str:
    from planner.probe import this_machine
    dev = this_machine()
    lines = [TITLE, "",
             f"Conditions ({res['date']}): SmolLM2-135M-Instruct q4 store (clusters of 64, "
             f"profiled; {res['weight_bytes'] / MB:.1f} MiB of weights), device profile 'this' "
             f"(`tiercache device probe`: {dev.description}), `tiercache plan --device this "
             f"--ram B --context {res['context']}`, then the engine under that plan in a "
             "cgroup-v1 memory cap of B (RSS + page cache; page cache dropped first), 128-token "
             f"prompt, {DECODE} decoded tokens, greedy, 1 thread. Budgets are footprint "
             f"{res['footprint'] / MB:.0f} MiB + r x weights. Measured peak: the cgroup's "
             "max_usage; error = (predicted - measured) / measured. Runtime: the process before "
             "any weight (anonymous memory + the engine's 24 MiB of file pages), as the plan "
             "assumed it (probe + tokenizer) and as the engine measured it at load. Plans "
             "leave an 8 MiB margin for that difference, and count the engine's 24 MiB of code "
             "pages and no more (planner.accounting.FILE_EXTRA).", "",
             "| r | budget | peak predicted | peak measured | error | decode predicted | "
             "decode measured | error | pinned: clusters, attention layers, head (planned) | "
             "store MB/token pred / meas | runtime pred / meas |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in res["rows"]:
        p, m, e = row["predicted"], row["measured"], row["engine"]
        if m.get("error"):
            lines.append(f"| {row['r']} | {row['ram'] / MB:.0f} MiB | "
                         f"{p['peak_memory_bytes'] / MB:.0f} MiB | failed: {m['error'][:90]} "
                         "| | | | | | | |")
            continue
        lines.append(
            f"| {row['r']} | {row['ram'] / MB:.0f} MiB | {p['peak_memory_bytes'] / MB:.0f} MiB"
            f" | {m['max_usage'] / MB:.0f} MiB | {_err(p['peak_memory_bytes'], m['max_usage'])}"
            f" | {p['decode_tok_s']:.1f} | {m['decode_tok_s']:.1f} | "
            f"{_err(p['decode_tok_s'], m['decode_tok_s'])} | {e['hot_clusters']}, "
            f"{e.get('pin_attention', '-')}, {'yes' if e.get('pin_head', True) else 'no'} | "
            f"{p['store_bytes_per_token'] / 1e6:.1f} / {m['store_bytes_per_token'] / 1e6:.1f} | "
            f"{_runtime(p) / MB:.0f} / {m['regions']['runtime'] / MB:.0f} MiB |")
    return "\n".join(lines) + "\n"


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(worker(*sys.argv[2:5], decode=DECODE)))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.5, 1.1])
    p.add_argument("--context", type=int, default=200)
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    a = p.parse_args()
    if not cgroup.available():
        raise SystemExit("needs a writable cgroup-v1 memory controller (run as root)")
    from tiercache.hub import tiercache_home
    import bench
    work = a.work or tiercache_home() / "bench"
    m = bench.prepare(work, SHARED / "dev-eval.txt")
    res = check(m["store"], m["prompt"], a.ratios, a.context, work)
    (work / "plan_check.json").write_text(json.dumps(res, indent=1))
    section = report(res)
    write_section(a.out, TITLE, section)
    print(section)


if __name__ == "__main__":
    main()
