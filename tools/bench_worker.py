"""One measured run, in its own process (so a cgroup caps exactly this engine).

    python tools/bench_worker.py llama GGUF --prompt-ids FILE [--decode N] [--threads 1]
    python tools/bench_worker.py tiercache STORE --ram BYTES --prompt-ids FILE [...]

The last stdout line is JSON: prefill_tok_s, decode_tok_s, decode_tokens (+ tiercache's stats).
Decoding stops after --max-seconds so that a thrashing run still reports a rate.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time


def run_llama(a, ids):
    import llama_cpp
    llm = llama_cpp.Llama(a.model, n_ctx=len(ids) + a.decode + 8, n_threads=a.threads,
                          n_threads_batch=a.threads, n_batch=512, verbose=False)
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
    return {"prefill_tok_s": len(ids) / prefill, "decode_tok_s": n / (time.perf_counter() - t0),
            "decode_tok_s_median": _median_rate(steps), "decode_tokens": n, "tokens": tokens}


def _median_rate(steps: list[float]) -> float:
    """1 / the median step: a rate that a few slow steps (VM noise) do not move."""
    return 1.0 / statistics.median(steps) if steps else 0.0


def run_tiercache(a, ids):
    import torch
    from tiercache import api
    from tiercache.engine import StepStats, generate_step, make_sampler
    engine, _ = api.load(a.model, threads=a.threads, ram=a.ram, context=len(ids) + a.decode + 8)
    stats, tokens, t0, steps = StepStats(), [], None, []
    for tok in generate_step(engine.new_session(), ids, make_sampler(), a.decode, stats):
        tokens.append(tok)
        t = time.perf_counter()
        if t0 is not None:
            steps.append(t - last)
        t0, last = t0 or t, t
        if t - t0 > a.max_seconds:
            break
    st = engine.stats()
    return {"prefill_tok_s": stats.prefill_tok_s, "decode_tok_s": stats.decode_tok_s,
            "decode_tok_s_median": _median_rate(steps), "decode_tokens": stats.decode_tokens, "tokens": tokens, "threads": torch.get_num_threads(),
            **{k: st[k] for k in ("cache_hit_rate", "store_bytes_per_token", "regions", "sparse", "compute")}}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("engine", choices=["llama", "tiercache"])
    p.add_argument("model")
    p.add_argument("--prompt-ids", required=True)
    p.add_argument("--decode", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ram", type=int, default=None)
    p.add_argument("--max-seconds", type=float, default=60.0)
    a = p.parse_args()
    ids = json.loads(open(a.prompt_ids).read())
    out = run_llama(a, ids) if a.engine == "llama" else run_tiercache(a, ids)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
