"""Choosing backends by name and running the engine's phases on them.

  get_backend("auto" | "torch" | "torch:cuda" | "ort" | "ort:PROVIDER[@BUCKET]", threads)
  make_prefill(engine, spec, threads) -> callable(session, ids) -> logits [V]
  phases(spec, threads, decode)       -> what an engine is handed when it is built
                                         (load_dense / load_tiered `backends=`): it binds the
                                         prefill (and decode) phase to the engine's model
  phase_report(engine)                -> {"prefill": {...}, "decode": {...}} for `generate --json`

`auto` is a rule measured on this VM with tools/bench_prefill.py (1 thread, 512-token prompt,
SmolLM2-135M shape): prefill through ONNX Runtime's CPU provider when onnxruntime imports and
the store holds float weights (ORT ~5% less CPU time than torch, equal or better wall time);
torch for q8/q4 stores (MatMulNBits prefill ran at ~0.65x of torch on dequantized weights:
it keeps 4-bit weights, but computes in f32 after dequantizing each call); prompts shorter than
AUTO_MIN_TOKENS stay on torch (the per-layer graph calls cost more than they save there); with a
CUDA GPU, torch:cuda for both phases (no GPU was available to measure ORT CUDA against it).
Decode is always torch.
"""
from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass, field

import torch

from tiercache.errors import TiercacheError

from .base import Backend, BackendFallbackWarning, BackendUnsupported
from .torch_backend import TorchBackend

AUTO_MIN_TOKENS = 8
SPECS = "auto, torch, torch:cuda, ort, ort:PROVIDER, ort:PROVIDER@BUCKET (static shapes)"


def get_backend(spec: str = "auto", threads: int = 1, gpu: bool = True,
                **ort_options) -> Backend:
    """A backend by name; `ort_options` (bucket, max_len, spinning, ...) go to OrtBackend.
    gpu=False: `auto` chooses among the CPU backends."""
    kind, _, arg = spec.partition(":")
    if kind == "auto":
        return get_backend(auto_spec("prefill", arg or None, gpu), threads, **ort_options)
    if kind == "torch":
        return TorchBackend(arg or "cpu", threads)
    if kind == "ort":
        from .ort_backend import OrtBackend
        provider, _, bucket = arg.partition("@")  # ort:QNN@128: T padded to 128-token buckets
        if bucket:
            if not bucket.isdigit() or int(bucket) < 1:
                raise TiercacheError(f"bad bucket in backend '{spec}' (e.g. ort:QNN@128)")
            ort_options["bucket"] = int(bucket)
        return OrtBackend(provider or "CPUExecutionProvider", threads, **ort_options)
    raise TiercacheError(f"unknown backend '{spec}' (choose from {SPECS})")


def auto_spec(phase: str, weights: str | None = None, gpu: bool = True) -> str:
    """What `auto` means for `phase` ("prefill" | "decode") on a store of `weights` dtype
    (gpu=False: for an engine that computes on the CPU only)."""
    if gpu and torch.cuda.is_available():
        return "torch:cuda"
    ort = importlib.util.find_spec("onnxruntime") is not None
    if phase == "prefill" and ort and weights not in ("q8", "q4"):
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
        if self.last.name != "ort":
            return forward_last(self.model, self.last, session, ids)
        offsets = [c.offset for c in session.caches]
        try:
            return forward_last(self.model, self.last, session, ids)
        except TiercacheError:
            raise
        except Exception as e:  # a node the provider rejects at run time: torch from now on
            for cache, offset in zip(session.caches, offsets):
                cache.offset = offset  # what the failed call wrote is dropped
            why = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
            warnings.warn(f"backend {self.spec}: ONNX Runtime failed ({why}); prefill runs on "
                          "torch", BackendFallbackWarning, stacklevel=2)
            self.backend = self.short or TorchBackend(str(self.last.device), self.last.threads
                                                      ).bind(self.model)
            self.short, self.last = None, self.backend
            return forward_last(self.model, self.last, session, ids)

    def describe(self) -> dict:
        d = {"spec": self.spec, **self.backend.describe()}
        if self.short is not None:
            d["short_prompts"] = {"below_tokens": self.min_tokens, **self.short.describe()}
        return d


def make_prefill(engine, spec: str = "auto", threads: int = 1, **ort_options) -> Phase:
    """Prefill of `engine`'s model through `spec`, writing the session's KV caches."""
    return prefill_phase(engine.model, engine.store, spec, threads, **ort_options)


def prefill_phase(model, store, spec: str = "auto", threads: int = 1, cpu_only: bool = False,
                  **ort_options) -> Phase:
    """A backend that cannot run this model (BackendUnsupported: a graph its provider
    rejects) leaves prefill on torch, with a one-line warning. cpu_only: the engine's modules
    compute on the CPU (`auto` picks a CPU backend; one on another device is refused)."""
    asked = spec
    if spec == "auto":
        spec = "auto:" + store.manifest.get("dtype", "f32")  # the rule depends on weights
    try:
        backend = get_backend(spec, threads, not cpu_only, **ort_options)
        if cpu_only and backend.device.type != "cpu":
            raise TiercacheError(f"backend {asked} computes on {backend.device.type}, but the "
                                 "tiered engine computes on the CPU (--engine dense runs there)")
        backend = backend.bind(model, store)
    except BackendUnsupported as e:
        warnings.warn(f"backend {asked}: {e}; prefill runs on torch", BackendFallbackWarning,
                      stacklevel=2)
        return Phase(model, TorchBackend("cpu", threads).bind(model, store), spec)
    short = None
    if spec.startswith("auto") and backend.name == "ort":
        short = TorchBackend(str(backend.device), threads).bind(model, store)
    return Phase(model, backend, spec, short, AUTO_MIN_TOKENS if short else 0)


def make_decode(engine, device: str = "cpu", threads: int = 1) -> Phase:
    """Decode on torch, on the device where prefill left the model and the KV caches."""
    return decode_phase(engine.model, engine.store, device, threads)


def decode_phase(model, store, device: str = "cpu", threads: int = 1) -> Phase:
    backend = TorchBackend(device, threads).bind(model, store)
    return Phase(model, backend, f"torch:{device}")


@dataclass(frozen=True)
class Phases:
    """Backends handed to an engine when it is built: `bind(model, store)` -> the phases it
    runs ("prefill", and "decode" with decode=True: torch on the device prefill left the
    model on). decode=False leaves decode to the engine's own path (the tiered FFN)."""
    spec: str = "auto"
    threads: int = 1
    decode: bool = True
    ort_options: dict = field(default_factory=dict)

    def bind(self, model, store, cpu_only: bool = False) -> dict:
        prefill = prefill_phase(model, store, self.spec, self.threads, cpu_only,
                                **self.ort_options)
        out = {"prefill": prefill}
        if self.decode:
            device = prefill.backend.device.type
            out["decode"] = decode_phase(model, store, device, self.threads)
        return out


def phases(spec: str = "auto", threads: int = 1, decode: bool = True, **ort_options) -> Phases:
    """What to hand an engine (load_dense / load_tiered `backends=`) to run prefill through
    `spec` (and decode on torch where decode=True)."""
    return Phases(spec, threads, decode, ort_options)


_TORCH_CPU = {"spec": "torch", "backend": "torch", "provider": "torch:cpu", "device": "cpu"}


def phase_report(engine) -> dict:
    """Backend and provider of each phase (what `generate --json` reports)."""
    phases = getattr(engine, "phases", {})
    report = {name: dict(_TORCH_CPU) for name in ("prefill", "decode")}
    report.update({name: p.describe() for name, p in phases.items()})
    if "prefill" in phases:
        report["prefill"]["last_run"] = phases["prefill"].last.describe()["provider"]
    return report
