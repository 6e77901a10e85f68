"""One measured run, in its own process (so a cgroup caps exactly this engine).

    python tools/bench_worker.py llama GGUF --prompt-ids FILE [--decode N] [--threads 1]
    python tools/bench_worker.py tiercache STORE --ram BYTES --prompt-ids FILE [...]
    python tools/bench_worker.py ENGINE MODEL --prompt-ids FILE --decode 0   # prefill only

The last stdout line is JSON: prefill_tok_s, decode_tok_s, decode_tokens, memory (RssAnon /
RssFile before the model loads and after decoding, and the pages mapped from the model's own
files), plus tiercache's stats. Decoding stops after --max-seconds so that a thrashing run
still reports a rate.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import tempfile
import time

MODEL_FILES = ("data.mdb",)  # a tiercache store's mapped file; a GGUF is mapped by its path


def rss() -> dict:
    """This process's resident pages by kind (bytes): anonymous, file-backed, shared memory,
    and the peak resident set."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, val = line.partition(":")
            if key in ("RssAnon", "RssFile", "RssShmem", "VmHWM"):
                out[key] = int(val.split()[0]) * 1024
    return out


def mapped_rss(model: str) -> int:
    """Resident bytes of mappings of the model's own files (the GGUF, or the store's
    data.mdb): the file-backed pages that are weights rather than the runtime's code."""
    root, total, hit = os.path.realpath(model), 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=5)
            if len(head) >= 5 and "-" in head[0] and ":" in head[3]:  # a mapping's header
                path = head[5].strip() if len(head) == 6 else ""
                hit = path.startswith(root) and (path == root or path.endswith(MODEL_FILES))
            elif hit and line.startswith("Rss:"):
                total += int(line.split()[1]) * 1024
    return total


def memory(before: dict, model: str) -> dict:
    return {"before_load": before, "after": {**rss(), "model_file": mapped_rss(model)}}


BUFFER_RE = re.compile(r"(\S+) (model|KV|compute|output) buffer size =\s*([\d.]+) MiB")


def llama_buffers(log: str) -> dict:
    """llama.cpp's own buffers from its load log, bytes: 'CPU_REPACK model' is weights copied
    into anonymous memory (Q4_0 repacked for this CPU), 'CPU_Mapped model' the mmapped file."""
    out = {}
    for kind, what, mib in BUFFER_RE.findall(log):
        key = f"{kind} {what}"
        out[key] = out.get(key, 0) + int(float(mib) * 2**20)
    return out


def with_stderr(fn):
    """fn() -> (its result, what was written to fd 2 meanwhile): llama.cpp logs from C."""
    with tempfile.TemporaryFile() as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            result = fn()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        return result, tmp.read().decode(errors="replace")


def run_llama(a, ids):
    import llama_cpp
    before = rss()
    llm, log = with_stderr(lambda: llama_cpp.Llama(
        a.model, n_ctx=len(ids) + a.decode + 8, n_threads=a.threads,
        n_threads_batch=a.threads, n_batch=512, verbose=True))
    t0 = time.perf_counter()
    llm.eval(ids)
    prefill = time.perf_counter() - t0
    n, t0, tokens, steps = 0, time.perf_counter(), [], []
    while n < a.decode and time.perf_counter() - t0 < a.max_seconds:
        t = time.perf_counter()
        tok = llm.sample(temp=0.0)
        tokens.append(int(tok))
        llm.eval([tok])
        steps.append(time.perf_counter() - t)
        n += 1
    took = time.perf_counter() - t0
    return {"prefill_tok_s": len(ids) / prefill, "decode_tok_s": n / took if n else 0.0,
            "decode_tok_s_median": _median_rate(steps), "decode_tokens": n, "tokens": tokens,
            "prompt_tokens": len(ids), "memory": memory(before, a.model),
            "buffers": llama_buffers(log), "version": llama_cpp.__version__}


def _median_rate(steps: list[float]) -> float:
    """1 / the median step: a rate that a few slow steps (VM noise) do not move."""
    return 1.0 / statistics.median(steps) if steps else 0.0


STATS = ("cache_hit_rate", "store_bytes_per_token", "store_bytes_read", "regions", "sparse",
         "mode", "compute", "io_wait_s", "read_ahead_hits", "demand_reads", "prefetched",
         "prefetch_unused", "experts", "pinned_kernel", "engine", "resident_bytes")


def run_tiercache(a, ids):
    from tiercache import api  # imports no torch: the lean runtime runs without it
    before = rss()
    engine, tok = api.load(a.model, threads=a.threads, ram=a.ram,
                           context=len(ids) + max(a.decode, 1) + 8, expert_cut=a.expert_cut)
    tokens, steps, last, r = [], [], None, None
    # the public streaming API; prompt as ids (no chat template), greedy
    for r in api.stream_generate(engine, tok, ids, max_tokens=max(a.decode, 1), temp=0.0):
        t = time.perf_counter()
        if last is not None:
            steps.append(t - last)
        last = t
        tokens.append(r.token)
        if sum(steps) > a.max_seconds:
            break
    st = engine.stats() if hasattr(engine, "stats") else {}
    return {"prefill_tok_s": r.prompt_tps, "decode_tok_s": r.generation_tps if a.decode else 0.0,
            "decode_tok_s_median": _median_rate(steps), "decode_tokens": len(tokens) if a.decode
            else 0, "tokens": tokens, "prompt_tokens": len(ids),
            "threads": a.threads, "memory": memory(before, str(engine.store.path)),
            "weight_bytes": engine.store.weight_bytes, **{k: st[k] for k in STATS if k in st}}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("engine", choices=["llama", "tiercache"])
    p.add_argument("model")
    p.add_argument("--prompt-ids", required=True)
    p.add_argument("--decode", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ram", type=int, default=None)
    p.add_argument("--expert-cut", type=float, default=None,
                   help="MoE read-ahead's cut (api.load's expert_cut; default: the engine's)")
    p.add_argument("--max-seconds", type=float, default=60.0)
    a = p.parse_args()
    ids = json.loads(open(a.prompt_ids).read())
    out = run_llama(a, ids) if a.engine == "llama" else run_tiercache(a, ids)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
