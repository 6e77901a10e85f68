"""Interactive chat: chat template, streamed output, multi-turn with KV reuse."""
from __future__ import annotations

import sys

from . import api


def run_chat(model: str, max_tokens: int = 512, temp: float = 0.7, top_p: float = 0.9,
             top_k: int = 0, seed: int | None = None, threads: int | None = None,
             dtype: str | None = None, system: str | None = None, ram=None, engine: str = "tiered",
             context: int = 2048, sparse: bool | None = None, backend: str = "auto",
             plan=None) -> None:
    print(f"loading {model} ...", file=sys.stderr, flush=True)
    engine, tok = api.load(model, threads=threads, dtype=dtype, ram=ram, engine=engine,
                           context=context, sparse=sparse, backend=backend, plan=plan)
    session = engine.new_session()
    messages = [{"role": "system", "content": system}] if system else []
    print("type a message; /exit or Ctrl-D to leave, /reset to start over", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print(file=sys.stderr)
            return
        if line.strip() in ("/exit", "/quit", "/bye"):
            return
        if line.strip() == "/reset":
            messages, session = messages[:1] if system else [], engine.new_session()
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        reply = _turn(engine, tok, messages, session, max_tokens, temp, top_p, top_k, seed)
        messages.append({"role": "assistant", "content": reply})


def _turn(engine, tok, messages, session, max_tokens, temp, top_p, top_k, seed) -> str:
    parts, last = [], None
    for r in api.stream_generate(engine, tok, messages, max_tokens=max_tokens, temp=temp,
                                 top_p=top_p, top_k=top_k, seed=seed, session=session):
        sys.stdout.write(r.text)
        sys.stdout.flush()
        parts.append(r.text)
        last = r
    print()
    if last is not None:
        print(f"[{last.generation_tps:.1f} tok/s, {last.generation_tokens} tokens]", file=sys.stderr)
    return "".join(parts)
