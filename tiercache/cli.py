"""The `tiercache` command line. Each command's flags are one public function's keyword args."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import TiercacheError, TiercacheWarning, warn

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Run language models larger than memory from a tiered LMDB store.")

DEFAULT_MODEL = "smollm2-135m-instruct"
DTYPE = typer.Option(None, help="store dtype when MODEL needs converting (default: q4 for "
                                "known models, f32 otherwise)")
RAM = typer.Option(None, help="memory the process may use in all (RSS + page cache), e.g. 400M")
VRAM = typer.Option(None, help="a CUDA GPU's memory for weights, e.g. 8G: the head and the "
                               "first layers (MoE: every layer's attention, then whole "
                               "experts) go there and compute there (tiered engine)")
ENGINE = typer.Option("auto", help="auto (lean where it runs within --ram, else tiered) | "
                      "lean (numpy + the q4 kernel, no torch: q4 Llama and Mixtral stores) | "
                      "tiered (caches, sparsity, VRAM, backends) | dense (all in RAM, f32 "
                      "reference)")
CONTEXT = typer.Option(2048, help="context length reserved for the KV cache")
KV = typer.Option("f16", "--kv", help="KV cache dtype: f16 (half the memory) or f32")
SPARSE = typer.Option(None, "--sparse/--no-sparse", show_default="auto: when the profile says it pays",
                      help="skip FFN neurons the profile marks inactive (thresholds on the "
                           "gate; predictors, for ReLU-family models)")
PLAN = typer.Option(None, help="a plan from `tiercache plan --out` (sets the RAM regions)")
EXPERTS = typer.Option(None, help="MoE expert cache policy: lru | freq+lru (default: by the "
                                  "budget, measured: frequency pins below one token's routed "
                                  "experts, else LRU)")
EXPERT_CUT = typer.Option(None, help="MoE read-ahead: read a layer's experts while the one "
                                     "before computes, those its router gives at least this "
                                     "probability from that layer's input (0: its top-k). "
                                     "Default: the tiered engine 0; the lean runtime none "
                                     "(measured slower: BENCHMARKS.md)")
BACKEND = typer.Option("auto", help="prefill backend: auto|torch|torch:cuda|ort[:PROVIDER[@BUCKET]]")
THREADS = typer.Option(None, help="compute threads (default: half the logical CPUs; 1 on "
                                      "two or fewer)")
MODEL = typer.Argument(DEFAULT_MODEL, help="store, HF dir, GGUF or known model name")
TOP_K = typer.Option(0, help="sample among the K likeliest tokens only (0: no limit)")
SEED = typer.Option(None, help="random seed for sampling (same seed, same text)")


def _temp(default: float):
    return typer.Option(default, help="sampling temperature (0: greedy, the likeliest token)")


def _top_p(default: float):
    return typer.Option(default, help="sample among the likeliest tokens whose probabilities "
                                      "add up to P (1: no limit)")


def _max_tokens(default: int):
    return typer.Option(default, "--max-tokens", "-n", help="most tokens to generate")


def _version(value: bool) -> None:
    if value:
        from . import __version__
        typer.echo(f"tiercache {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print the version and exit")):
    """Run language models larger than memory from a tiered LMDB store."""


@app.command("list")
def list_(json_out: bool = typer.Option(False, "--json", help="one JSON object per line")):
    """Converted stores and known models in $TIERCACHE_HOME: size, dtype, profile, place."""
    from .home import entries, table
    rows = entries()
    typer.echo("\n".join(json.dumps(e.row()) for e in rows) if json_out else table(rows))


@app.command()
def rm(names: list[str] = typer.Argument(..., help="store names, or a known model's name "
                                                    "(its stores and GGUF); see tiercache list")):
    """Delete stores or downloaded models from $TIERCACHE_HOME."""
    from .home import human, remove
    for name in names:
        for e in remove(name):
            typer.echo(f"removed {e.kind} {e.name} ({human(e.bytes)}, {e.path})", err=True)


@app.command()
def convert(src: Path = typer.Argument(..., help="HF model directory or .gguf file"),
            out: Path = typer.Option(..., "--out", "-o", help="store directory to write"),
            dtype: str = typer.Option("f32", help="f32|f16|bf16|q8|q4"),
            cluster_size: int = typer.Option(64, help="FFN neurons per cluster record (q4 runs "
                                                       "the int4 kernel with multiples of 64)"),
            force: bool = typer.Option(False, help="overwrite an existing store")):
    """Convert a model into a tiercache store."""
    from .store.convert import convert as _convert
    path = _convert(src, out, dtype=dtype, cluster_size=cluster_size, force=force)
    typer.echo(f"wrote {path}", err=True)


@app.command()
def pull(name: str = typer.Argument(DEFAULT_MODEL, help="a known model (tiercache list)"),
         dtype: Optional[str] = DTYPE):
    """Download a known model and convert it into $TIERCACHE_HOME once."""
    from .hub import pull as _pull
    typer.echo(str(_pull(name, dtype=dtype)))


@app.command()
def generate(model: str = typer.Argument(DEFAULT_MODEL, help="store, HF dir, GGUF or model name"),
             prompt: str = typer.Option(..., "--prompt", "-p", help="the prompt (a user message "
                                        "under the chat template unless --no-chat-template)"),
             max_tokens: int = _max_tokens(256),
             temp: float = _temp(0.0), top_p: float = _top_p(1.0), top_k: int = TOP_K,
             seed: Optional[int] = SEED, threads: Optional[int] = THREADS,
             dtype: Optional[str] = DTYPE,
             ram: Optional[str] = RAM, vram: Optional[str] = VRAM, engine: str = ENGINE,
             context: int = CONTEXT, kv: str = KV, sparse: Optional[bool] = SPARSE, backend: str = BACKEND,
             plan: Optional[Path] = PLAN, experts: Optional[str] = EXPERTS,
             expert_cut: Optional[float] = EXPERT_CUT,
             chat_template: bool = typer.Option(True, "--chat-template/--no-chat-template",
                                                help="wrap the prompt in the model's chat "
                                                     "template"),
             json_out: bool = typer.Option(False, "--json", help="last stdout line: a JSON report")):
    """Generate text for one prompt, streamed to stdout."""
    _check_options(max_tokens=max_tokens, temp=temp, top_p=top_p, top_k=top_k, threads=threads,
                   context=context)
    from . import api
    eng, tok = api.load(model, threads=threads, dtype=dtype, ram=ram, engine=engine,
                        context=context, kv=kv, sparse=sparse, backend=backend, plan=plan,
                        experts=experts, expert_cut=expert_cut, vram=vram)
    engine = eng
    ids = api.encode_prompt(tok, prompt, chat_template)
    if not ids:
        raise TiercacheError("the prompt is empty: there is no token to start from")
    tokens, text, last = [], [], None
    for r in api.stream_generate(engine, tok, ids, max_tokens=max_tokens, temp=temp,
                                 top_p=top_p, top_k=top_k, seed=seed):
        tokens.append(r.token)
        text.append(r.text)
        last = r
        if not json_out:
            sys.stdout.write(r.text)
            sys.stdout.flush()
    report = _report(engine, ids, tokens, "".join(text), last)
    if json_out:
        typer.echo(json.dumps(report))
    else:
        typer.echo("")
        typer.echo(f"prefill {report['prefill_tok_s']:.1f} tok/s ({len(ids)} tokens), decode "
                   f"{report['decode_tok_s']:.1f} tok/s, peak {report['peak_memory_bytes'] / 2**20:.0f} MiB "
                   f"({report['peak_memory_method']})", err=True)


def _report(engine, ids, tokens, text, last) -> dict:
    from .memory import peak_memory
    mem, how = peak_memory()
    tier = (last.stats if last else None) or {}
    extra = {k: tier[k] for k in ("cache_hit_rate", "store_bytes_read", "store_bytes_per_token",
                                  "regions", "sparse", "mode", "compute", "read_ahead_hits",
                                  "demand_reads", "prefetched", "prefetch_unused", "experts")
             if k in tier}
    if "mode" in extra:
        from .api import mode_name
        extra["mode"] = mode_name(extra["mode"])
    return {**extra, "text": text, "prompt_tokens": ids, "tokens": tokens,
            "finish_reason": last.finish_reason if last else None,
            "prefill_tok_s": last.prompt_tps if last else 0.0,
            "decode_tok_s": last.generation_tps if last else 0.0,
            "weight_bytes": engine.store.weight_bytes, "peak_memory_bytes": mem,
            "peak_memory_method": how, "threads": _threads(engine),
            "backend": _phases(engine), "store": str(engine.store.path)}


def _threads(engine) -> int:
    if engine.backend == "lean":  # no torch in this process
        return engine.threads
    import torch
    return torch.get_num_threads()


def _phases(engine) -> dict:
    if engine.backend == "lean":
        return {phase: {"spec": "lean", "backend": "lean", "provider": "q4 kernel",
                        "device": "cpu"} for phase in ("prefill", "decode")}
    import backends
    return backends.phase_report(engine)


@app.command()
def chat(model: str = typer.Argument(DEFAULT_MODEL, help="store, HF dir, GGUF or model name"),
         max_tokens: int = _max_tokens(512),
         temp: float = _temp(0.7), top_p: float = _top_p(0.9), top_k: int = TOP_K,
         seed: Optional[int] = SEED,
         threads: Optional[int] = THREADS, dtype: Optional[str] = DTYPE, ram: Optional[str] = RAM,
         vram: Optional[str] = VRAM, engine: str = ENGINE, context: int = CONTEXT, kv: str = KV,
         sparse: Optional[bool] = SPARSE, backend: str = BACKEND, plan: Optional[Path] = PLAN,
         experts: Optional[str] = EXPERTS, expert_cut: Optional[float] = EXPERT_CUT,
         system: Optional[str] = typer.Option(None, help="system prompt"),
         prompt: Optional[list[str]] = typer.Argument(None, help="answer this one message and "
                                                      "exit (also: a message piped to stdin)"),
         quiet: bool = typer.Option(False, "--quiet", "-q", help="no stats line after answers"),
         interactive: bool = typer.Option(False, "--interactive", "-i",
                                          help="read messages line by line even from a pipe")):
    """Chat with a model in the terminal (/help for commands, /exit or Ctrl-D to leave)."""
    _check_options(max_tokens=max_tokens, temp=temp, top_p=top_p, top_k=top_k, threads=threads,
                   context=context)
    from .chat import run_chat
    run_chat(model, max_tokens=max_tokens, temp=temp, top_p=top_p, top_k=top_k, seed=seed,
             threads=threads, dtype=dtype, system=system, ram=ram, engine=engine,
             context=context, kv=kv, sparse=sparse, backend=backend, plan=plan, prompt=prompt,
             quiet=quiet, interactive=interactive, experts=experts, expert_cut=expert_cut,
             vram=vram)


@app.command()
def serve(model: str = typer.Argument(DEFAULT_MODEL, help="store, HF dir, GGUF or model name"),
          host: str = typer.Option("127.0.0.1", help="address to listen on (the default is "
                                                     "this machine only)"),
          port: int = typer.Option(8080, help="TCP port (0: any free one, printed at start)"),
          api_key: Optional[str] = typer.Option(None, envvar="TIERCACHE_API_KEY",
                                                help="require `Authorization: Bearer KEY` on /v1"),
          max_queue: int = typer.Option(64, "--queue", min=0, help="requests that may wait "
                                        "behind the running one; more get 429 + Retry-After"),
          sessions: int = typer.Option(1, min=1, help="conversations whose KV cache is kept "
                                       "between requests (each reserves --context in --ram)"),
          threads: Optional[int] = THREADS, dtype: Optional[str] = DTYPE, ram: Optional[str] = RAM,
          vram: Optional[str] = VRAM, engine: str = ENGINE, context: int = CONTEXT, kv: str = KV,
          sparse: Optional[bool] = SPARSE, backend: str = BACKEND, plan: Optional[Path] = PLAN,
          experts: Optional[str] = EXPERTS, expert_cut: Optional[float] = EXPERT_CUT):
    """Serve MODEL over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions,
    /v1/models, /health, /stats, /metrics)."""
    _check_options(threads=threads, context=context)
    from .server import serve as _serve
    _serve(model, host=host, port=port, api_key=api_key, max_queue=max_queue, sessions=sessions,
           context=context, ram=ram, threads=threads, dtype=dtype, engine=engine, sparse=sparse,
           backend=backend, plan=plan, kv=kv, experts=experts, expert_cut=expert_cut,
           vram=vram)


@app.command("eval")
def eval_(model: str = MODEL,
          text: Path = typer.Option(..., "--text", help="UTF-8 text file"),
          max_tokens: int = typer.Option(4096, "--max-tokens", help="tokens of the text to score"),
          chunk: int = typer.Option(256, help="tokens per window, each from an empty cache"),
          threads: Optional[int] = THREADS, dtype: Optional[str] = DTYPE, ram: Optional[str] = RAM,
          vram: Optional[str] = VRAM, engine: str = ENGINE, kv: str = KV,
          sparse: Optional[bool] = SPARSE,
          backend: str = BACKEND, plan: Optional[Path] = PLAN,
          experts: Optional[str] = EXPERTS, expert_cut: Optional[float] = EXPERT_CUT,
          json_out: bool = typer.Option(False, "--json", help="print a JSON report")):
    """Perplexity of MODEL on a text, in exactly the configuration being run."""
    from . import api
    from .evaluate import perplexity  # (numpy: no torch on the lean runtime)
    _check_options(max_tokens=max_tokens, chunk=chunk, threads=threads)
    eng, tok = api.load(model, threads=threads, dtype=dtype, ram=ram, engine=engine,
                        context=chunk, kv=kv, sparse=sparse, backend=backend, plan=plan,
                        experts=experts, expert_cut=expert_cut, vram=vram)
    ids = tok.encode(_read_text(text))[:max_tokens]
    if len(ids) < 2:
        raise TiercacheError(f"{text}: fewer than 2 tokens to score")
    ppl = perplexity(eng, ids, chunk, progress=not json_out)
    stats = eng.stats() if hasattr(eng, "stats") else {}
    if "mode" in stats:
        stats["mode"] = api.mode_name(stats["mode"])
    report = {"perplexity": ppl, "tokens": len(ids), "engine": engine, "ram": ram,
              **{k: v for k, v in stats.items() if k in ("cache_hit_rate", "sparse", "mode",
                                                         "compute")}}
    typer.echo(json.dumps(report) if json_out else f"perplexity {ppl:.3f} over {len(ids)} tokens")


@app.command()
def profile(model: str = typer.Argument(DEFAULT_MODEL, help="store directory (rewritten in place)"),
            text: Path = typer.Option(..., "--text", help="calibration text"),
            tokens: int = typer.Option(8192, help="calibration tokens to use"),
            budget: float = typer.Option(0.05, help="allowed perplexity increase, e.g. 0.05 = +5%"),
            predictor: Optional[bool] = typer.Option(
                None, "--predictor/--no-predictor", show_default="auto: ReLU-family models",
                help="train low-rank activation predictors (decode then picks clusters "
                     "without a pinned gate, and reads the next layer's ahead)"),
            rank: Optional[int] = typer.Option(None, help="predictor rank (default min(d, F)/4)"),
            criterion: str = typer.Option("weighted", help="weighted: |act(gate x)| times each "
                                          "neuron's E|up x| * |down column|; act: |act| alone"),
            threads: Optional[int] = THREADS, dtype: Optional[str] = DTYPE):
    """Record FFN activation statistics, pick sparsity thresholds, order neurons hot -> cold."""
    import torch
    from .api import default_threads
    from .hub import resolve_model
    from .profile import profile_store
    from .tokenizer import Tokenizer
    _check_options(tokens=tokens, budget=budget, threads=threads, rank=rank)
    torch.set_num_threads(threads or default_threads())
    path = resolve_model(model, dtype=dtype)
    ids = Tokenizer(path).encode(_read_text(text))[:tokens]
    p = profile_store(path, ids, budget=budget, predictor=predictor, rank=rank,
                      criterion=criterion)
    typer.echo(f"profiled {path}: {p['skip_fraction']:.0%} of FFN activations skipped, held-out "
               f"perplexity {p['perplexity_dense']:.2f} -> {p['perplexity_sparse']:.2f}", err=True)
    if "predictor" in p:
        q = p["predictor"]
        typer.echo(f"predictors (rank {q['rank']}): held-out recall {q['recall']:.1%}, "
                   f"{q['clusters_predicted']:.0%} of clusters predicted active per token",
                   err=True)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TiercacheError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise TiercacheError(f"{path}: not UTF-8 text") from None


# option -> (what a valid value is, the test); checked before anything loads
_RANGES = {
    "max_tokens": ("an integer >= 1", lambda v: v >= 1),
    "temp": ("a number >= 0", lambda v: v >= 0),
    "top_p": ("a number in (0, 1]", lambda v: 0 < v <= 1),
    "top_k": ("an integer >= 0 (0: off)", lambda v: v >= 0),
    "threads": ("an integer >= 1", lambda v: v >= 1),
    "context": ("an integer >= 1", lambda v: v >= 1),
    "chunk": ("an integer >= 2", lambda v: v >= 2),
    "tokens": ("an integer >= 2", lambda v: v >= 2),
    "budget": ("a number >= 0", lambda v: v >= 0),
    "rank": ("an integer >= 1", lambda v: v >= 1),
}


def _check_options(**values) -> None:
    """One line naming an option out of its range (NaN is out of every range); a warning when
    --threads outnumbers the cores (decode then slows down many times over)."""
    for name, v in values.items():
        what, ok = _RANGES[name]
        if v is not None and not ok(v):
            raise TiercacheError(f"--{name.replace('_', '-')} must be {what} (got {v})")
    cores = _cores()
    if values.get("threads") and values["threads"] > cores:
        warn(f"--threads {values['threads']} is more than this machine's {cores} cores; "
             f"threads that share a core slow decode down")


def _cores() -> int:
    import os
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _register_planner() -> None:
    """`tiercache plan` and `tiercache device ...` live in planner/ (which never imports us)."""
    from planner.cli import device_app, plan
    app.command("plan")(plan)
    app.add_typer(device_app, name="device")


_register_planner()


def _one_line_warnings() -> None:
    """tiercache's own warnings print as `warning: ...`, one line, without a source line."""
    import warnings
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, TiercacheWarning):
            typer.echo(f"warning: {message}", err=True)
        else:
            shown(message, category, filename, lineno, file, line)
    warnings.showwarning = show


def main():
    _one_line_warnings()
    try:
        app()
    except TiercacheError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
