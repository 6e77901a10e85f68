"""`tiercache serve`: an OpenAI-compatible HTTP server over one engine (Starlette + uvicorn).

Imported only by `tiercache serve` (and tests), so that generate and chat never load the web
stack. The stack is imported before the engine loads, so the engine's `--ram` budget, which
measures the process before any weight, counts the server's own memory.
"""
from __future__ import annotations

import socket
import sys
from pathlib import Path

DEFAULT_PORT = 8080


def serve(model: str, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
          api_key: str | None = None, max_queue: int = 64, sessions: int = 1,
          context: int = 2048, ram=None, **load_kwargs) -> None:
    """Load MODEL and answer OpenAI API requests on host:port until interrupted.

    sessions: conversations whose KV cache is kept between requests; each reserves `context`
    positions, inside `ram` when one is given. load_kwargs go to `api.load`."""
    from ..errors import TiercacheError
    try:
        import uvicorn
        from .app import create_app
    except ImportError as e:
        raise TiercacheError(f"serve needs {e.name}: pip install 'tiercache[serve]'") from None
    from .. import api
    from .worker import Worker
    sock = bind(host, port)  # before loading: a port in use fails at once
    print(f"loading {model} ...", file=sys.stderr, flush=True)
    # the engine reserves KV positions for every kept session inside `ram`
    engine, tok = api.load(model, ram=ram, context=context * max(1, sessions), **load_kwargs)
    context = min(context, engine.context)  # a request's own limit (a plan may set less)
    if ram is not None and context * sessions > engine.context:
        from ..errors import warn
        warn(f"--ram reserves KV for {engine.context // context} of the {sessions} sessions "
             f"(the model holds {engine.context} positions); the rest grow past the budget")
    worker = Worker(engine, tok, max_queue=max_queue, sessions=sessions)
    app = create_app(worker, model_name(model, engine), context, api_key,
                     aliases=(str(model),))
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    where = sock.getsockname()
    print(f"serving {model_name(model, engine)} at http://{_url_host(where[0])}:{where[1]}/v1 "
          f"(Ctrl-C to stop)", file=sys.stderr, flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        worker.close()


def model_name(model: str, engine) -> str:
    """The id clients use: a known model's name, else the store directory's name."""
    from ..hub import MODELS
    return str(model) if str(model) in MODELS else Path(engine.store.path).name


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free port, printed in the ready line)."""
    from ..errors import TiercacheError
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise TiercacheError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
