"""Choosing backends by name and running the engine's phases on them.

  get_backend("auto" | "torch" | "torch:cuda" | "ort" | "ort:PROVIDER", threads)
  make_prefill(engine, spec, threads) -> callable(session, ids) -> logits [V]
  install(engine, spec, threads)      -> prefill through `spec`, decode on torch; returns the report
  phase_report(engine)                -> {"prefill": {...}, "decode": {...}} for `generate --json`

`auto` (rule measured on this VM with tools/bench_prefill.py, 1 thread, 512-token prompt):
prefill through ONNX Runtime's CPU provider when onnxruntime imports (fused layer graphs were
faster than torch for f32 and q4 stores), prompts shorter than AUTO_MIN_TOKENS stay on torch
(a per-layer call costs more than it saves there); with a CUDA GPU, torch:cuda for both phases
(no GPU was available to measure ORT CUDA against it); decode is always torch.
"""
from __future__ import annotations

import importlib.util

import torch

from tiercache.errors import TiercacheError

from .base import Backend
from .torch_backend import TorchBackend

AUTO_MIN_TOKENS = 8
SPECS = "auto, torch, torch:cuda, ort, ort:PROVIDER"


def get_backend(spec: str = "auto", threads: int = 1, **ort_options) -> Backend:
    """A backend by name; `ort_options` (bucket, max_len, spinning, ...) go to OrtBackend."""
    kind, _, arg = spec.partition(":")
    if kind == "auto":
        return get_backend(auto_spec("prefill"), threads, **ort_options)
    if kind == "torch":
        return TorchBackend(arg or "cpu", threads)
    if kind == "ort":
        from .ort_backend import OrtBackend
        return OrtBackend(arg or "CPUExecutionProvider", threads, **ort_options)
    raise TiercacheError(f"unknown backend '{spec}' (choose from {SPECS})")


def auto_spec(phase: str) -> str:
    if torch.cuda.is_available():
        return "torch:cuda"
    if phase == "prefill" and importlib.util.find_spec("onnxruntime") is not None:
        return "ort:CPUExecutionProvider"
    return "torch"


@torch.no_grad()
def forward_last(model, backend: Backend, session, ids: list[int]) -> torch.Tensor:
    """Embeddings -> every layer on `backend` -> final norm and lm_head of the last position."""
    x = torch.tensor([ids], dtype=torch.long, device=backend.device)
    h = model.model.embed_tokens(x)  # [1, T, d]
    cos, sin = model.rope(session.caches[0].offset, len(ids), x.device)
    h = backend.prefill_layers(range(model.args.num_hidden_layers), h, cos, sin, session.caches)
    session.tokens.extend(ids)
    return model.logits(h[:, -1:])[0, -1]


class Phase:
    """callable(session, ids) -> logits [V]; short prompts may go to a second backend."""

    def __init__(self, model, backend: Backend, spec: str, short: Backend | None = None,
                 min_tokens: int = 0):
        self.model, self.backend, self.spec = model, backend, spec
        self.short, self.min_tokens = short, min_tokens
        self.last = backend  # which backend ran the latest call

    def __call__(self, session, ids: list[int]) -> torch.Tensor:
        use_short = self.short is not None and len(ids) < self.min_tokens
        self.last = self.short if use_short else self.backend
        return forward_last(self.model, self.last, session, ids)

    def describe(self) -> dict:
        d = {"spec": self.spec, **self.backend.describe()}
        if self.short is not None:
            d["short_prompts"] = {"below_tokens": self.min_tokens, **self.short.describe()}
        return d


def make_prefill(engine, spec: str = "auto", threads: int = 1, **ort_options) -> Phase:
    """Prefill of `engine`'s model through `spec`, writing the session's KV caches."""
    backend = get_backend(spec, threads, **ort_options).bind(engine.model, engine.store)
    short = None
    if spec == "auto" and backend.name == "ort":
        short = TorchBackend(str(backend.device), threads).bind(engine.model, engine.store)
    return Phase(engine.model, backend, spec, short, AUTO_MIN_TOKENS if short else 0)


def make_decode(engine, spec: str = "auto", threads: int = 1) -> Phase:
    """Decode on torch (the device follows `spec`: torch:cuda keeps the model on the GPU)."""
    device = "cuda" if (spec == "torch:cuda" or (spec == "auto" and torch.cuda.is_available())) else "cpu"
    backend = TorchBackend(device, threads).bind(engine.model, engine.store)
    return Phase(engine.model, backend, f"torch:{device}")


def install(engine, backend: str = "auto", threads: int = 1, **ort_options) -> dict:
    """Route `engine.prefill` through `backend` and keep decode on torch; -> the phase report.

    Only the instance's attributes change; the engine's class and other engines are untouched.
    """
    prefill = make_prefill(engine, backend, threads, **ort_options)
    decode = make_decode(engine, backend, threads)
    engine.prefill = prefill
    engine.decode = lambda session, token: decode(session, [token])
    engine.phases = {"prefill": prefill, "decode": decode}
    return phase_report(engine)


def phase_report(engine) -> dict:
    """Backend and provider of each phase (what `generate --json` reports)."""
    phases = getattr(engine, "phases", None)
    if not phases:
        torch_cpu = {"spec": "torch", "backend": "torch", "provider": "torch:cpu", "device": "cpu"}
        return {"prefill": torch_cpu, "decode": dict(torch_cpu)}
    report = {name: p.describe() for name, p in phases.items()}
    last = phases["prefill"].last
    report["prefill"]["last_run"] = last.describe()["provider"]
    return report
