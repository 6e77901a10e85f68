"""The `tiercache` command line. Each command's flags are one public function's keyword args."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import TiercacheError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Run language models larger than memory from a tiered LMDB store.")

DEFAULT_MODEL = "smollm2-135m-instruct"


@app.command()
def convert(src: Path = typer.Argument(..., help="HF model directory or .gguf file"),
            out: Path = typer.Option(..., "--out", "-o", help="store directory to write"),
            dtype: str = typer.Option("f32", help="f32|f16|bf16|q8|q4"),
            cluster_size: int = typer.Option(32, help="FFN neurons per cluster record"),
            force: bool = typer.Option(False, help="overwrite an existing store")):
    """Convert a model into a tiercache store."""
    from .store.convert import convert as _convert
    path = _convert(src, out, dtype=dtype, cluster_size=cluster_size, force=force)
    typer.echo(f"wrote {path}", err=True)


@app.command()
def pull(name: str = typer.Argument(DEFAULT_MODEL), dtype: str = typer.Option("f32")):
    """Download a known model and convert it into $TIERCACHE_HOME once."""
    from .hub import pull as _pull
    typer.echo(str(_pull(name, dtype=dtype)))


@app.command()
def generate(model: str = typer.Argument(DEFAULT_MODEL, help="store, HF dir, GGUF or model name"),
             prompt: str = typer.Option(..., "--prompt", "-p"),
             max_tokens: int = typer.Option(256, "--max-tokens", "-n"),
             temp: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             seed: Optional[int] = None, threads: Optional[int] = None,
             dtype: str = typer.Option("f32", help="store dtype when MODEL needs converting"),
             chat_template: bool = typer.Option(True, "--chat-template/--no-chat-template"),
             json_out: bool = typer.Option(False, "--json", help="last stdout line: a JSON report")):
    """Generate text for one prompt, streamed to stdout."""
    from . import api
    engine, tok = api.load(model, threads=threads, dtype=dtype)
    ids = api.encode_prompt(tok, prompt, chat_template)
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
    import torch
    from .memory import peak_memory
    mem, how = peak_memory()
    return {"text": text, "prompt_tokens": ids, "tokens": tokens,
            "finish_reason": last.finish_reason if last else None,
            "prefill_tok_s": last.prompt_tps if last else 0.0,
            "decode_tok_s": last.generation_tps if last else 0.0,
            "weight_bytes": engine.store.weight_bytes, "peak_memory_bytes": mem,
            "peak_memory_method": how, "threads": torch.get_num_threads(),
            "backend": engine.backend, "store": str(engine.store.path)}


@app.command()
def chat(model: str = typer.Argument(DEFAULT_MODEL, help="store, HF dir, GGUF or model name"),
         max_tokens: int = typer.Option(512, "--max-tokens", "-n"),
         temp: float = 0.7, top_p: float = 0.9, top_k: int = 0, seed: Optional[int] = None,
         threads: Optional[int] = None, dtype: str = "f32",
         system: Optional[str] = typer.Option(None, help="system prompt")):
    """Chat with a model in the terminal (/exit or Ctrl-D to leave)."""
    from .chat import run_chat
    run_chat(model, max_tokens=max_tokens, temp=temp, top_p=top_p, top_k=top_k, seed=seed,
             threads=threads, dtype=dtype, system=system)


def main():
    try:
        app()
    except TiercacheError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
