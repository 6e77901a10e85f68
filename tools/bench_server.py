"""`tiercache serve` against `tiercache generate`: time to first token and decode tok/s through
the server, then N concurrent streaming clients for a while (errors, lost or changed tokens,
peak memory against --ram).

Both run the default model with the same --ram, threads and greedy decoding; in a cgroup-v1
memory group capped at --ram when one can be made (RSS + page cache, as on a device), with
read_ahead_kb 128. Loopback only: the server listens on 127.0.0.1.

    python tools/bench_server.py [--ram 400M] [--clients 32] [--duration 120] [--write]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

TOPICS = ["rivers", "bread", "the moon", "bicycles", "libraries", "volcanoes", "chess", "bees"]
PROMPT = ("Request {i}. Write a short, plain explanation of {topic} for a curious child, in "
          "three sentences, without lists or headings. Say what it is, why it matters to "
          "people, and one surprising fact about it.")


def prompt(i: int) -> str:
    return PROMPT.format(i=i, topic=TOPICS[i % len(TOPICS)])


class Capped:
    """A command run in a memory cgroup capped at `limit` bytes (None: no group)."""

    def __init__(self, cmd: list[str], limit: int | None, env: dict):
        import cgroup
        self.group = None
        if limit and cgroup.available():
            self.group = cgroup.MEM / f"tiercache-serve-{uuid.uuid4().hex[:8]}"
            self.group.mkdir()
            (self.group / "memory.limit_in_bytes").write_text(str(limit))
            cgroup.drop_caches()
        procs = self.group / "cgroup.procs" if self.group else None
        # run where the measured tiercache is: python puts the cwd ahead of PYTHONPATH
        self.proc = subprocess.Popen(cmd, env=env, cwd=env["PYTHONPATH"], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True,
                                     preexec_fn=(lambda: procs.write_text(str(os.getpid())))
                                     if procs else None)

    def memory(self) -> dict:
        if self.group is None:
            return {}
        oom = "oom_kill 1" in (self.group / "memory.oom_control").read_text()
        return {"cgroup_max_usage": int((self.group / "memory.max_usage_in_bytes").read_text()),
                "oom_killed": oom}

    def close(self) -> None:
        if self.group is not None:
            try:
                self.group.rmdir()
            except OSError:
                pass


def generate_once(store, args, i: int, env) -> dict:
    """`tiercache generate --json` on prompt i, capped like the server."""
    cmd = [sys.executable, "-m", "tiercache", "generate", str(store), "-p", prompt(i),
           "-n", str(args.max_tokens), "--threads", str(args.threads), "--ram", args.ram,
           "--temp", "0", "--json"]
    run = Capped(cmd, args.limit, env)
    stdout, stderr = run.proc.communicate(timeout=600)
    mem = run.memory()
    run.close()
    if run.proc.returncode != 0:
        raise SystemExit(f"generate failed: {stderr.strip().splitlines()[-1:]}")
    r = json.loads(stdout.splitlines()[-1])
    n = len(r["prompt_tokens"])
    return {"ttft_s": n / r["prefill_tok_s"], "decode_tok_s": r["decode_tok_s"],
            "prompt_tokens": n, "tokens": len(r["tokens"]),
            "peak": mem.get("cgroup_max_usage", r["peak_memory_bytes"])}


def start_server(store, args, env) -> tuple[Capped, str]:
    cmd = [sys.executable, "-m", "tiercache", "serve", str(store), "--port", "0",
           "--threads", str(args.threads), "--ram", args.ram, "--queue", str(args.clients * 2)]
    srv = Capped(cmd, args.limit, env)
    for line in srv.proc.stderr:
        if line.startswith("serving "):
            import threading  # keep reading its log, so a full pipe never blocks it
            threading.Thread(target=lambda: sys.stderr.writelines(srv.proc.stderr),
                             daemon=True).start()
            return srv, line.split(" at ")[1].split()[0].removesuffix("/v1")
    raise SystemExit(f"serve exited ({srv.proc.wait()}) before it was ready")


async def stream_once(client, url: str, text: str, max_tokens: int) -> dict:
    """One streamed chat request -> text, timings, usage (or the error)."""
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0, first, parts, usage = time.perf_counter(), None, [], None
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"error": chunk["error"]["message"]}
            usage = chunk.get("usage") or usage
            piece = chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None
            if piece:
                first = first or time.perf_counter()
                parts.append(piece)
    end = time.perf_counter()
    return {"text": "".join(parts), "usage": usage, "ttft_s": (first or end) - t0,
            "decode_s": end - (first or end)}


async def serve_once(url: str, args, i: int) -> dict:
    """Prompt i through the server, streamed by one client."""
    import httpx
    async with httpx.AsyncClient(timeout=600) as client:
        r = await stream_once(client, url, prompt(i), args.max_tokens)
        if "error" in r:
            raise SystemExit(f"server: {r['error']}")
        n = r["usage"]["completion_tokens"]
        r["decode_tok_s"] = (n - 1) / r["decode_s"] if r["decode_s"] else 0.0
        r["cached"] = r["usage"]["prompt_tokens_details"]["cached_tokens"]
        r["engine"] = (await client.get(url + "/stats")).json()["last_request"]
        del r["text"]
    return r


def compare(store, args, env) -> tuple[list, list, Capped, str]:
    """generate and the server in turns on the same prompts (the machine's other load then
    falls on both alike); the server is left running."""
    srv, url = start_server(store, args, env)
    gen, one = [], []
    for i in range(args.repeats):
        gen.append(generate_once(store, args, i, env))
        one.append(asyncio.run(serve_once(url, args, i)))
    return gen, one, srv, url


async def crowd(url: str, args, expected: dict) -> dict:
    """`clients` streaming clients, each asking in turn until the deadline."""
    import httpx
    deadline = time.monotonic() + args.duration
    tally = {"requests": 0, "errors": [], "mismatches": 0, "tokens": 0, "ttft": []}
    limits = httpx.Limits(max_connections=args.clients + 4)
    async with httpx.AsyncClient(timeout=args.duration + 900, limits=limits) as client:
        async def one(c: int):
            k = c
            while time.monotonic() < deadline:
                i = k % len(expected)
                r = await stream_once(client, url, prompt(i), args.crowd_tokens)
                k += 1
                tally["requests"] += 1
                if "error" in r:
                    tally["errors"].append(r["error"])
                    continue
                tally["tokens"] += r["usage"]["completion_tokens"]
                tally["ttft"].append(r["ttft_s"])
                want = expected[i]
                if (r["text"], r["usage"]["completion_tokens"]) != want:
                    tally["mismatches"] += 1
        t0 = time.perf_counter()
        await asyncio.gather(*(one(c) for c in range(args.clients)))
        tally["wall_s"] = time.perf_counter() - t0
    return tally


async def expectations(url: str, args) -> dict:
    """Each crowd prompt's answer, asked alone first: (text, completion tokens)."""
    import httpx
    out = {}
    async with httpx.AsyncClient(timeout=600) as client:
        for i in range(len(TOPICS)):
            r = await stream_once(client, url, prompt(i), args.crowd_tokens)
            out[i] = (r["text"], r["usage"]["completion_tokens"])
    return out


def median(xs, key):
    return statistics.median(x[key] for x in xs)


def report(args, results: dict) -> str:
    from report import cpu_flags, machine
    first = next(iter(results.values()))
    capped = bool(first["memory"])
    lines = [
        "## Server (tools/bench_server.py)", "",
        f"{machine()}, flags {cpu_flags()}, {args.threads} thread(s), default model "
        f"(SmolLM2-135M-Instruct q4), greedy, {args.max_tokens} tokens, "
        f"{'a cgroup-v1 memory cap equal to --ram (RSS + page cache)' if capped else 'no cgroup'}"
        f", read_ahead_kb 128, loopback; load average {os.getloadavg()[1]:.1f} at the end "
        f"(other work on the machine); tiercache {args.measured}. generate and the server take "
        f"turns on the same {args.repeats} prompts (medians shown); each prompt is distinct "
        f"(~{first['generate'][0]['prompt_tokens']} tokens), so the server reuses only the "
        f"template's first tokens (median {median(first['serve'], 'cached'):.0f}). Time to "
        f"first token: generate's prefill time, in a fresh process (its first prefill); the "
        f"server's from sending the request to the first content chunk, in a warm process. "
        f"Under a cap the cgroup's peak includes page cache, which grows up to the cap.", "",
        "| --ram | generate TTFT | serve TTFT | generate decode tok/s | serve decode tok/s | "
        "peak memory (serve) |", "|---|---|---|---|---|---|"]
    for ram, r in results.items():
        g, s = r["generate"], r["serve"]
        tg, ts = median(g, "ttft_s"), median(s, "ttft_s")
        dg, ds = median(g, "decode_tok_s"), median(s, "decode_tok_s")
        peak = r["memory"].get("cgroup_max_usage", r["peak_rss"])
        lines.append(f"| {ram} | {tg * 1000:.0f} ms | {ts * 1000:.0f} ms ({ts / tg - 1:+.0%}) | "
                     f"{dg:.1f} | {ds:.1f} ({ds / dg - 1:+.0%}) | {peak / 2**20:.0f} MiB |")
    ram, r = list(results.items())[-1]
    t = r["crowd"]
    ttfts = sorted(t["ttft"]) or [0.0]
    peak = r["memory"].get("cgroup_max_usage", r["peak_rss"])
    lines += ["",
        f"{args.clients} concurrent streaming clients for {args.duration:.0f} s under --ram "
        f"{ram} ({args.crowd_tokens} tokens each, FIFO queue; {t['wall_s']:.0f} s with the "
        f"drain): {t['requests']} requests, {t['n_errors']} errors, {t['mismatches']} answers "
        f"differing from the same prompt asked alone (lost, duplicated or changed tokens), "
        f"{t['tokens']} tokens ({t['tokens'] / t['wall_s']:.1f} tok/s in all); time to first "
        f"token p50 {ttfts[len(ttfts) // 2]:.1f} s, p95 {ttfts[int(len(ttfts) * 0.95)]:.1f} s "
        f"(queueing); peak memory {peak / 2**20:.0f} MiB"
        f"{', OOM-killed' if r['memory'].get('oom_killed') else ''}.", ""]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--ram", default="400M", help="one budget, or several: 1G,400M (the crowd "
                                                  "runs under the last)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=120.0, help="seconds of new requests")
    ap.add_argument("--crowd-tokens", type=int, default=32)
    ap.add_argument("--rev", default="HEAD", help="tiercache revision to measure (exported "
                    "with git archive; 'worktree': the working tree as is)")
    ap.add_argument("--write", action="store_true", help="rewrite BENCHMARKS.md's section")
    args = ap.parse_args(argv)
    from tiercache.hub import resolve_model
    import cgroup
    from bench import engine_source
    import tempfile
    store = resolve_model(args.model)
    src, args.measured = engine_source(args.rev, Path(tempfile.mkdtemp(prefix="bench-server-")))
    env = {**os.environ, "PYTHONPATH": str(src or ROOT)}
    rams, rows, results = args.ram.split(","), [], {}
    with cgroup.read_ahead(128, store):
        for n, ram in enumerate(rams):
            results[ram] = run_budget(store, args, ram, env, crowd_too=n == len(rams) - 1)
    text = report(args, results)
    print(text)
    print(json.dumps(results, default=str))
    if args.write:
        from report import write_section
        write_section(ROOT / "BENCHMARKS.md", "## Server (tools/bench_server.py)", text)


def run_budget(store, args, ram: str, env, crowd_too: bool) -> dict:
    from planner.units import parse_size
    args.ram, args.limit = ram, parse_size(ram)
    gen, one, srv, url = compare(store, args, env)
    out = {"generate": gen, "serve": one}
    try:
        if crowd_too:
            expected = asyncio.run(expectations(url, args))
            tally = asyncio.run(crowd(url, args, expected))
            out["crowd"] = {**tally, "errors": tally["errors"][:5], "n_errors": len(tally["errors"])}
        import httpx
        out["peak_rss"] = httpx.get(url + "/stats").json()["peak_memory_bytes"]
        out["memory"] = srv.memory()
    finally:
        srv.proc.send_signal(signal.SIGINT)
        srv.proc.wait(60)
        srv.close()
    return out


if __name__ == "__main__":
    main()
