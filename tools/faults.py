"""Fault trials: damaged stores and inputs must end in one clean error (or, where the damage is
in bytes nothing reads, the same output), never a traceback, a signal, or a lost store.

    python tools/faults.py                      # flips, kills, gguf, json; a BENCHMARKS.md section
    python tools/faults.py --only flips --trials 20
    python tools/faults.py --only capped    # root: 50 generate/eval runs, cgroup cap = --ram

Trials that run in-process (flips, gguf, json) run in a worker child that prints one JSON line
per trial; a worker killed by a signal is a "crash" for its trial and the next worker resumes.
Outcomes: `error` (a TiercacheError: what the CLI prints as one line), `same` (output equal to
the undamaged input's), `ok` (a mutated input that still runs), `traceback` (any other
exception), `crash` (the process died), `differs` (silently different output: undetected).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
CALIBRATION = ROOT.parent / "shared" / "data" / "calibration.txt"
PROMPT, TOKENS = "The quick brown fox", 8
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
BAD = ("traceback", "crash", "differs", "lost", "left", "oom", "failed")


# -- fixtures (built in the work directory once) ------------------------------------------------
def build_fixtures(work: Path) -> dict:
    """A tiny HF Llama, its q8 store, a tiny GGUF, a plan; a medium model for the kill trials
    (large enough that a kill can land while the store is being written)."""
    from conftest import build_hf
    from tiercache.store.convert import convert
    fx = {"hf": work / "hf", "store": work / "store", "gguf": work / "tiny.gguf",
          "plan": work / "plan.json", "medium": work / "medium"}
    if not fx["store"].exists():
        build_hf("llama", fx["hf"])
        convert(fx["hf"], fx["store"], dtype="q8", cluster_size=32, progress=False)
        from test_gguf import write_tiny_gguf
        write_tiny_gguf(fx["gguf"])
        _write_plan(fx["store"], fx["plan"])
        _build_medium(fx["medium"])
    return fx


def _write_plan(store: Path, out: Path) -> None:
    from planner.search import make_plan
    plan = make_plan(str(store), "laptop-8gb-nvme", ram="1G", context=256)
    out.write_text(json.dumps(plan, indent=1))


def _build_medium(path: Path) -> None:
    import torch
    import transformers as T
    from conftest import VOCAB, write_tokenizer
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=1024,
                        num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=512, tie_word_embeddings=True)
    T.LlamaForCausalLM(cfg).save_pretrained(path)
    write_tokenizer(path)


# -- one trial, in the worker ------------------------------------------------------------------
def run_model(store, plan=None) -> list[int]:
    """What `tiercache generate STORE -p PROMPT -n TOKENS` computes: greedy token ids."""
    from tiercache import api
    eng, tok = api.load(str(store), plan=plan, context=256)
    ids = api.encode_prompt(tok, PROMPT)
    return [r.token for r in api.stream_generate(eng, tok, ids, max_tokens=TOKENS)]


def outcome(fn, want=None) -> dict:
    from tiercache.errors import TiercacheError
    try:
        got = fn()
    except TiercacheError as e:
        msg = str(e)
        return {"outcome": "error" if "\n" not in msg else "traceback", "detail": msg[:160]}
    except Exception as e:  # noqa: BLE001 -- what the trial counts: anything but a clean error
        tb = traceback.format_exc().strip().splitlines()
        return {"outcome": "traceback", "detail": f"{type(e).__name__}: {e}"[:160],
                "where": tb[-3:-1]}
    if want is None:
        return {"outcome": "ok"}
    return {"outcome": "same" if got == want else "differs"}


def trial_flip(fx: dict, rng: random.Random, tmp: Path, want) -> dict:
    """One byte of data.mdb (half the trials) or of a tokenizer file, XORed with a random
    nonzero value; then generate."""
    store = tmp / "store"
    shutil.copytree(fx["store"], store)
    name = "lmdb/data.mdb" if rng.random() < 0.5 else rng.choice(TOKENIZER_FILES)
    f = store / name
    raw = bytearray(f.read_bytes())
    at = rng.randrange(len(raw))
    raw[at] ^= rng.randrange(1, 256)
    f.write_bytes(bytes(raw))
    return {"file": name, "at": at, **outcome(lambda: run_model(store), want)}


def trial_gguf(fx: dict, rng: random.Random, tmp: Path, want) -> dict:
    """A GGUF whose header (metadata and tensor table) has 1-4 mutated spots; convert it and,
    if that works, generate."""
    from gguf import GGUFReader
    from tiercache.store.convert import convert
    src = fx["gguf"]
    r = GGUFReader(src, "r")
    # a field or tensor entry chosen uniformly (else the vocabulary's strings take most spots)
    entries = [(f.offset, sum(p.nbytes for p in f.parts)) for f in r.fields.values()]
    entries += [(t.field.offset, sum(p.nbytes for p in t.field.parts)) for t in r.tensors]
    raw = bytearray(src.read_bytes())
    spots = []
    for _ in range(rng.randint(1, 4)):
        if rng.random() < 0.25:  # anywhere in the header
            spots.append(_mutate_bytes(raw, rng, 0, r.data_offset))
        else:
            off, n = rng.choice(entries)
            spots.append(_mutate_bytes(raw, rng, off, off + n))
    bad = tmp / "m.gguf"
    bad.write_bytes(bytes(raw))

    def go():
        out = convert(bad, tmp / "s", dtype="f32", cluster_size=32, progress=False)
        return run_model(out)
    return {"spots": spots, **outcome(go)}


def _mutate_bytes(raw: bytearray, rng: random.Random, start: int, end: int) -> int:
    """A random byte in [start, end), or 4/8 bytes there set to an extreme value."""
    at = rng.randrange(start, end)
    if rng.random() < 0.5 or end - start < 8:
        raw[at] ^= rng.randrange(1, 256)
    else:
        n = rng.choice((4, 8))
        at = max(start, min(at, end - n))
        val = rng.choice((0, 1, 2 ** (8 * n) - 1, 2 ** (8 * n - 1), rng.getrandbits(8 * n)))
        raw[at:at + n] = val.to_bytes(n, "little")
    return at


def trial_json(fx: dict, rng: random.Random, tmp: Path, want) -> dict:
    """config.json (then convert + generate), manifest.json or plan.json (then generate),
    mutated in its text (a byte) or its structure (a value replaced or a key removed)."""
    target = ("config", "manifest", "plan")[rng.randrange(3)]
    if target == "config":
        root = tmp / "hf"
        shutil.copytree(fx["hf"], root)
        f = root / "config.json"
    elif target == "manifest":
        root = tmp / "store"
        shutil.copytree(fx["store"], root)
        f = root / "manifest.json"
    else:
        root, f = fx["store"], tmp / "plan.json"
        shutil.copy(fx["plan"], f)
    how = _mutate_json(f, rng)
    if target == "config":
        from tiercache.store.convert import convert

        def go():
            return run_model(convert(root, tmp / "s", dtype="q8", cluster_size=32,
                                     progress=False))
    else:
        def go():
            return run_model(root, plan=str(f) if target == "plan" else None)
    return {"file": target, "how": how, **outcome(go)}


def _mutate_json(f: Path, rng: random.Random) -> str:
    text = f.read_text()
    if rng.random() < 0.4:
        raw = bytearray(text.encode())
        at = rng.randrange(len(raw))
        raw[at] ^= rng.randrange(1, 256)
        f.write_bytes(bytes(raw))
        return f"byte {at}"
    d = json.loads(text)
    path = _random_path(d, rng)
    parent = d
    for k in path[:-1]:
        parent = parent[k]
    new = rng.choice((None, -1, 0, 1, 2 ** 63, 1e308, -0.5, "x", "", True, [], {}, [1, "a"]))
    if isinstance(parent, dict) and rng.random() < 0.2:
        del parent[path[-1]]
        how = f"deleted {'/'.join(map(str, path))}"
    else:
        parent[path[-1]] = new
        how = f"{'/'.join(map(str, path))} = {json.dumps(new)}"
    f.write_text(json.dumps(d, indent=1))
    return how


def _random_path(d, rng: random.Random) -> list:
    """A path to a random node, biased toward the shallow keys that decide what runs."""
    path, node = [], d
    while isinstance(node, (dict, list)) and node:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        k = rng.choice(keys)
        path.append(k)
        node = node[k]
        if rng.random() < 0.35:
            break
    return path


TRIALS = {"flips": trial_flip, "gguf": trial_gguf, "json": trial_json}


def worker(kind: str, work: Path, seed: int, start: int, stop: int) -> None:
    """Trials start..stop-1, one JSON line each on stdout (flushed: a crash loses none)."""
    import logging
    import warnings
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    fx = build_fixtures(work)
    want = run_model(fx["store"])
    for i in range(start, stop):
        rng = random.Random(f"{seed}:{kind}:{i}")
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            print(json.dumps({"i": i, **TRIALS[kind](fx, rng, Path(tmp), want)}), flush=True)


def run_trials(kind: str, n: int, work: Path, seed: int) -> list[dict]:
    """n trials in worker children; a worker that dies costs its trial a `crash`."""
    done: list[dict] = []
    while len(done) < n:
        start = len(done)
        cmd = [sys.executable, __file__, "--worker", kind, "--work", str(work),
               "--seed", str(seed), "--start", str(start), "--stop", str(n)]
        p = subprocess.run(cmd, capture_output=True, text=True, env=_env(work))
        done += [json.loads(ln) for ln in p.stdout.splitlines() if ln.startswith("{")]
        if len(done) < n and p.returncode != 0:
            why = f"signal {-p.returncode}" if p.returncode < 0 else f"exit {p.returncode}"
            done.append({"i": len(done), "outcome": "crash", "detail": why,
                         "stderr": p.stderr.strip().splitlines()[-1:]})
        print(f"{kind}: {len(done)}/{n}", file=sys.stderr, end="\r")
    return done


# -- kills (CLI subprocesses) -----------------------------------------------------------------
def run_kills(command: str, n: int, work: Path, seed: int) -> list[dict]:
    """n SIGKILLs of `tiercache convert --force` over an existing store (or of `profile`,
    which rewrites it in place), at random moments: half anywhere in the run, half while the
    store is being written. After each: the store is the old or a new one, every record and
    side file checks, and the next open leaves nothing behind (or says what it left)."""
    fx = build_fixtures(work)
    rng = random.Random(f"{seed}:kill:{command}")
    box = work / f"kill-{command}"
    shutil.rmtree(box, ignore_errors=True)
    box.mkdir()
    store = box / "s"
    cmd = _kill_cmd(command, fx, store)
    _fresh_store(fx, store)
    t_all, t_write = _timing(cmd, store, work)
    out = []
    for i in range(n):
        old = _store_id(store)
        if i % 2 == 0:
            delay, anchor = rng.uniform(0, t_all), None
        else:
            delay, anchor = rng.uniform(0, t_write), store.parent
        rc = _run_and_kill(cmd, work, delay, anchor, store.name)
        res = {"i": i, "delay_s": round(delay, 3), "phase": "write" if anchor else "any",
               "rc": rc, **_after_kill(store, old)}
        out.append(res)
        if res["outcome"] == "lost":
            _fresh_store(fx, store)
        print(f"kill {command}: {i + 1}/{n}", file=sys.stderr, end="\r")
    return out


def _kill_cmd(command: str, fx: dict, store: Path) -> list[str]:
    tc = [sys.executable, "-m", "tiercache"]
    if command == "convert":
        return tc + ["convert", str(fx["medium"]), "--out", str(store), "--force", "--dtype",
                     "q8", "--cluster-size", "64"]
    return tc + ["profile", str(store), "--text", str(CALIBRATION), "--tokens", "384",
                 "--threads", "1"]


def _fresh_store(fx: dict, store: Path) -> None:
    from tiercache.store.convert import convert
    shutil.rmtree(store, ignore_errors=True)
    convert(fx["medium"], store, dtype="q8", cluster_size=64, progress=False)


def _timing(cmd, store: Path, work: Path) -> tuple[float, float]:
    """(seconds the whole command takes, seconds from its work directory appearing to exit)."""
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env(work))
    seen = None
    while p.poll() is None:
        if seen is None and _work_dirs(store):
            seen = time.monotonic()
        time.sleep(0.005)
    end = time.monotonic()
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {p.stderr.read().decode()[-300:]}")
    return end - t0, end - (seen or t0)


def _work_dirs(store: Path) -> list[str]:
    return [n for n in os.listdir(store.parent) if n.startswith(f".{store.name}.")]


def _run_and_kill(cmd, work: Path, delay: float, anchor, name: str) -> int:
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         env=_env(work))
    if anchor is not None:  # from the moment its work directory appears
        while p.poll() is None and not any(n.startswith(f".{name}.")
                                           for n in os.listdir(anchor)):
            time.sleep(0.002)
    time.sleep(delay)
    if p.poll() is None:
        p.send_signal(signal.SIGKILL)
    return p.wait()


def _after_kill(store: Path, old: str | None) -> dict:
    """Open the store as the next run would (which finishes or removes what the killed one
    left), then check every record and side file."""
    import warnings
    from tiercache.errors import TiercacheError
    from tiercache.store.format import Store, tensor_key
    from tiercache.tokenizer import Tokenizer
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        try:
            s = Store(store)
            for key in s.records:
                s._get(key.encode())
            s.side_files()
            Tokenizer(store)
            s._get(tensor_key(s.tensor_names[0]))
            sid, profiled = s.manifest["store_id"], "profile" in s.manifest
            s.close()
        except TiercacheError as e:
            return {"outcome": "lost", "detail": str(e)[:160]}
    left = _work_dirs(store)
    reported = [str(w.message) for w in seen]
    res = {"outcome": "old" if sid == old else "new", "profiled": profiled}
    if left and not all(any(n in r for r in reported) for n in left):
        res.update(outcome="left", detail=left)
    elif left:
        res.update(reported=reported)
    return res


def _store_id(store: Path) -> str | None:
    try:
        return json.loads((store / "manifest.json").read_text())["store_id"]
    except (OSError, ValueError, KeyError):
        return None


# -- capped runs (root, cgroup v1) -----------------------------------------------------------
def run_capped(n: int, work: Path, seed: int, model: str, context: int) -> list[dict]:
    """n runs of generate or eval at random prompt lengths (1 to 3x the context) and random
    --ram from the refusal threshold up, each inside a cgroup memory cap equal to --ram: every
    run must finish or be refused up front (exit 1, one line), never be OOM-killed."""
    import cgroup
    if not cgroup.available():
        raise SystemExit("capped runs need root and a cgroup-v1 memory controller")
    rng = random.Random(f"{seed}:capped")
    text = CALIBRATION.read_text()
    floor = _refusal_threshold(model, context, work)
    out = []
    for i in range(n):
        ram = int(floor * rng.uniform(1.0, 2.0))
        words = max(1, int(rng.uniform(1, 3 * context) * 0.75))  # ~0.75 words per token
        prompt = " ".join(text.split()[:words])
        cmd = _capped_cmd(rng.choice(("generate", "eval")), model, prompt, ram, context, work)
        r = cgroup.run_capped(cmd, ram, timeout=600)
        err = [ln for ln in r["stderr"].splitlines() if ln.startswith("error:")]
        kind = ("oom" if r["oom"] else "finished" if r["rc"] == 0 else
                "refused" if r["rc"] == 1 and len(err) == 1 and "Traceback" not in r["stderr"]
                else "failed")
        out.append({"i": i, "cmd": cmd[3], "ram": ram, "prompt_words": words, "outcome": kind,
                    "max_usage": r["max_usage"], "detail": (err or r["stderr"].splitlines()
                                                            or [""])[-1][:160]})
        print(f"capped: {i + 1}/{n} {kind}", file=sys.stderr, end="\r")
    return out


def _capped_cmd(kind: str, model: str, prompt: str, ram: int, context: int, work: Path):
    tc = [sys.executable, "-m", "tiercache", kind, model, "--ram", str(ram), "--threads", "1"]
    if kind == "generate":
        return tc + ["-p", prompt, "-n", "16", "--context", str(context), "--json"]
    f = work / f"eval-{abs(hash(prompt))}.txt"
    f.write_text(prompt)
    return tc + ["--text", str(f), "--max-tokens", str(3 * context), "--chunk", str(context),
                 "--json"]


def _refusal_threshold(model: str, context: int, work: Path) -> int:
    """The least --ram (within 2%) that generate does not refuse, by bisection."""
    lo, hi = 16 << 20, 4 << 30
    while hi / lo > 1.02:
        mid = (lo * hi) ** 0.5
        r = subprocess.run([sys.executable, "-m", "tiercache", "generate", model, "-p", "hi",
                            "-n", "1", "--ram", str(int(mid)), "--context", str(context)],
                           capture_output=True, text=True, env=_env(work))
        lo, hi = (lo, mid) if r.returncode == 0 else (mid, hi)
    return int(hi)


# -- the report -------------------------------------------------------------------------------
def _env(work: Path) -> dict:
    return {**os.environ, "TIERCACHE_HOME": str(work / "home"), "PYTHONPATH": str(ROOT)}


def summarize(results: dict[str, list[dict]]) -> dict[str, dict]:
    out = {}
    for kind, rows in results.items():
        c = collections.Counter(r["outcome"] for r in rows)
        if kind == "flips":
            for r in rows:
                c[f"{r['file'].split('/')[-1]}:{r['outcome']}"] += 1
                c[f"caught by:{_caught_by(r)}"] += r["outcome"] == "error"
        if kind == "json":
            for r in rows:
                c[f"{r['file']}:{r['outcome']}"] += 1
        out[kind] = dict(sorted(c.items()))
    return out


def _caught_by(r: dict) -> str:
    d = r.get("detail", "")
    return ("record crc32" if "record" in d else "LMDB page crc32" if "LMDB pages" in d
            else "size" if "truncated" in d or "bytes where" in d
            else "side-file crc32" if ": corrupt (checksum" in d else "other")


def section(summary: dict, args) -> str:
    from report import machine
    flags = next((ln.split(":", 1)[1].split() for ln in Path("/proc/cpuinfo").read_text()
                  .splitlines() if ln.startswith("flags")), [])
    simd = [f for f in flags if f.startswith(("avx", "fma", "f16c", "amx", "sse4"))]
    lines = ["## Fault trials (tools/faults.py)", "",
             f"{machine()}, CPU flags {' '.join(simd)}; 1 compute thread per trial; seed "
             f"{args.seed}; tiny Llama (d 64, 2 layers, q8 store) for flips/fuzz, an 8-layer "
             f"d 256 Llama (q8, ~10 MB store) for kills. Outcomes: error = one clean line "
             f"(exit 1 in the CLI); same = output equal to the undamaged store's; ok = the "
             f"mutated input still runs; bad = traceback, crash, silently different output, a "
             f"lost store, or something left unreported.", "",
             "| trial | n | outcomes | bad |", "|---|---|---|---|"]
    for kind, c in summary.items():
        n = sum(v for k, v in c.items() if ":" not in k)
        bad = sum(v for k, v in c.items() if ":" not in k and k in BAD)
        parts = ", ".join(f"{k} {v}" for k, v in c.items() if v)
        lines.append(f"| {kind} | {n} | {parts} | {bad} |")
    lines += ["", "- flips: one byte XORed, in data.mdb (half the trials) or a tokenizer file; "
              "`same` flips hit bytes nothing reads (overflow-page tails, unused space).",
              "- kills: SIGKILL half anywhere in the run, half while the store is being "
              "written (from its work directory appearing); after each, the next open finds "
              "the old or the new store with every record and side file checking, and no "
              "work directory left (the open finishes an interrupted swap or removes it).",
              "- gguf: 1-4 spots per file in the metadata or tensor table (a byte, or 4/8 "
              "bytes set to 0/1/max/random); convert, then generate if it converted.",
              "- json: config.json (convert + generate), manifest.json, plan.json (generate); "
              "a byte flipped, or a value replaced (null, -1, 0, 2^63, 1e308, \"\", [], {}, ...) "
              "or a key removed. `ok`: a key nothing reads (plan `search`, config "
              "`pretraining_tp`, ...)."]
    if "capped" not in summary:
        lines += ["", "Capped runs (`--only capped`: 50 generate/eval runs at random prompt "
                  "lengths inside a cgroup-v1 cap equal to `--ram`) are not in this table yet: "
                  "they wait for `--context`/`--ram` enforcement (issue 11, item 3)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["flips", "kills", "gguf", "json", "capped"], action="append")
    ap.add_argument("--trials", type=int, help="trials per kind (default: the issue's targets)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, help="work directory (default: a temporary one)")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="capped runs' model")
    ap.add_argument("--context", type=int, default=512, help="capped runs' --context")
    ap.add_argument("--json", type=Path, help="write every trial's row here")
    ap.add_argument("--report", action="store_true", help="write the BENCHMARKS.md section")
    ap.add_argument("--from-json", type=Path, help="report the rows a --json run wrote")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--start", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--stop", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.worker:
        import torch
        torch.set_num_threads(1)
        return worker(args.worker, args.work, args.seed, args.start, args.stop)
    if args.from_json:
        return report(json.loads(args.from_json.read_text()), args)
    work = args.work or Path(tempfile.mkdtemp(prefix="tiercache-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["TIERCACHE_HOME"] = str(work / "home")
    build_fixtures(work)
    kinds = args.only or ["flips", "kills", "gguf", "json"]
    n = {"flips": 100, "kills": 20, "gguf": 200, "json": 200, "capped": 50}
    results = {}
    for kind in kinds:
        count = args.trials or n[kind]
        if kind == "kills":
            results["kill convert"] = run_kills("convert", count, work, args.seed)
            results["kill profile"] = run_kills("profile", count, work, args.seed)
        elif kind == "capped":
            results["capped"] = run_capped(count, work, args.seed, args.model, args.context)
        else:
            results[kind] = run_trials(kind, count, work, args.seed)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    report(results, args)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


def report(results: dict, args) -> None:
    summary = summarize(results)
    print(json.dumps(summary, indent=1))
    for kind, rows in results.items():
        for r in rows:
            if r["outcome"] in BAD:
                print(kind, json.dumps(r), file=sys.stderr)
    if args.report:
        from report import write_section
        write_section(ROOT / "BENCHMARKS.md", "## Fault trials (tools/faults.py)",
                      section(summary, args))


if __name__ == "__main__":
    main()
