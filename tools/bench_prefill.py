"""Prefill tok/s: torch vs ONNX Runtime (CPU provider), f32 and q4 stores, llama.cpp beside them.

    python tools/bench_prefill.py [--tokens 512] [--threads 1] [--repeat 5] [--dtypes f32,q4]
                                  [--random]

Uses the real default model's stores when they exist under $TIERCACHE_HOME/stores
(smollm2-135m-instruct-<dtype>, as `tiercache pull` writes them), else a random model of
SmolLM2-135M's shape (30 layers, d=576, ffn=1536, GQA 9/3, vocab 49152) converted once into
$TIERCACHE_HOME/bench. llama.cpp runs the GGUF at $TIERCACHE_HOME/gguf when llama_cpp imports.
Prints a markdown table: best and median of --repeat interleaved runs, each on a fresh session.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import backends  # noqa: E402
from tiercache.engine import load_dense  # noqa: E402
from tiercache.hub import tiercache_home  # noqa: E402
from tiercache.store.format import Store, is_store  # noqa: E402

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
               rope_theta=100000.0, rms_norm_eps=1e-5, max_position_embeddings=8192)


def store_for(dtype: str, random_only: bool) -> tuple[Path, str]:
    real = tiercache_home() / "stores" / f"smollm2-135m-instruct-{dtype}"
    if is_store(real) and not random_only:
        return real, "SmolLM2-135M-Instruct (real weights)"
    out = tiercache_home() / "bench" / f"smollm2-shaped-random-{dtype}"
    if not is_store(out):
        from tiercache.store.convert import convert
        convert(random_hf_dir(), out, dtype=dtype, force=True, progress=False)
    return out, "random model of SmolLM2-135M's shape"


def random_hf_dir() -> Path:
    import transformers
    d = tiercache_home() / "bench" / "smollm2-shaped-random-hf"
    if not (d / "config.json").is_file():
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMOLLM2)).save_pretrained(d)
    return d


def tiercache_contenders(dtype, threads, random_only):
    """(name, provider, weights, setup s, run(ids)) for torch and ORT on one store."""
    path, what = store_for(dtype, random_only)
    engine = load_dense(Store(path))
    t0 = time.perf_counter()
    ort = backends.make_prefill(engine, "ort:CPU", threads)
    setup = f"{time.perf_counter() - t0:.1f} s, {_graph_mb(ort):.0f} MB of layer graphs"
    torch_weights = dtype if dtype == "f32" else f"{dtype} store, dequantized to f32"
    return what, [
        ("tiercache torch", "torch:cpu", torch_weights, "—",
         lambda ids: engine.prefill(engine.new_session(), ids)),
        ("tiercache ort:CPU", ort.describe()["provider"],
         f"{dtype} via MatMulNBits" if dtype in ("q4", "q8") else dtype, setup,
         lambda ids: ort(engine.new_session(), ids)),
    ]


def _graph_mb(prefill) -> float:
    """Bytes of the layer graphs (their weights): what the ORT sessions hold beside torch's."""
    d = Path(prefill.describe()["graphs"])
    return sum(p.stat().st_size for p in d.glob("layer*.onnx")) / 2**20


PROBE = ("import llama_cpp, sys; m = llama_cpp.Llama(sys.argv[1], n_ctx=64, verbose=False); "
         "m.eval(list(range(100, 108)))")


def llama_cpp_contender(n_tokens, threads):
    """The peer, or a line saying why it was not measured."""
    gguf = tiercache_home() / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if importlib.util.find_spec("llama_cpp") is None or not gguf.is_file():
        return "llama_cpp not importable or GGUF missing"
    # a build for other CPU features dies with SIGILL: probe it in a child process first
    r = subprocess.run([sys.executable, "-c", PROBE, str(gguf)], capture_output=True)
    if r.returncode != 0:
        return f"the installed llama_cpp died on an 8-token eval (exit {r.returncode})"
    import llama_cpp
    llm = llama_cpp.Llama(str(gguf), n_ctx=n_tokens + 64, n_batch=n_tokens, n_ubatch=n_tokens,
                          n_threads=threads, n_threads_batch=threads, verbose=False)

    def run(ids):
        llm.reset()
        llm.eval([t % llm.n_vocab() for t in ids])
    return (f"llama.cpp (llama-cpp-python {llama_cpp.__version__})", "ggml CPU",
            "Q4_1 GGUF (real SmolLM2)", "—", run)


def measure(contenders, ids, repeat):
    """Rounds interleave the contenders, so that load from other processes hits all alike."""
    for *_, run in contenders:
        run(ids[:16])  # warm: allocators, lazy kernels
    times = [[] for _ in contenders]
    for _ in range(repeat):
        for t, (*_, run) in zip(times, contenders):
            w0, c0 = time.perf_counter(), time.process_time()
            run(ids)
            t.append((time.perf_counter() - w0, time.process_time() - c0))
    return times


def row(contender, times, n):
    name, provider, weights, setup, _ = contender
    wall, cpu = [w for w, _ in times], [c for _, c in times]
    return (f"| {name} | {provider} | {weights} | {n / min(wall):.0f} "
            f"| {n / statistics.median(wall):.0f} | {n / min(cpu):.0f} | {setup} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--dtypes", default="f32,q4", help="store dtypes to run, e.g. f32,q4,q8")
    ap.add_argument("--random", action="store_true",
                    help="random SmolLM2-shaped model even if the real store exists")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, SMOLLM2["vocab_size"], (a.tokens,), generator=gen).tolist()
    contenders, what = [], ""
    for dtype in a.dtypes.split(","):
        what, cs = tiercache_contenders(dtype, a.threads, a.random)
        contenders += cs
    llama = llama_cpp_contender(a.tokens, a.threads)
    contenders += [llama] if isinstance(llama, tuple) else []
    load0 = os.getloadavg()[0]
    times = measure(contenders, ids, a.repeat)
    print(f"\nPrefill of a {a.tokens}-token prompt, {a.threads} thread(s), tiercache on a {what}; "
          f"{a.repeat} interleaved rounds, fresh session each; CPU tok/s = tokens / process CPU "
          f"seconds (less sensitive to other processes on a shared VM); "
          f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, onnxruntime "
          f"{_ort_version()}; load average {load0:.1f} before, {os.getloadavg()[0]:.1f} after.\n")
    print("| engine | provider | weights | tok/s wall (best) | wall (median) | tok/s CPU (best) "
          "| setup (graphs, sessions) |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(row(c, t, a.tokens) for c, t in zip(contenders, times)))
    if isinstance(llama, str):
        print(f"| llama.cpp | — | Q4_1 GGUF | not measured: {llama} (DESIGN.md: ~135 tok/s at "
              "128 tokens) | | | |")


def _ort_version():
    try:
        import onnxruntime
        return onnxruntime.__version__
    except ImportError:
        return "not installed"


if __name__ == "__main__":
    main()
