"""Python API in the shape of mlx-lm: load / stream_generate / generate."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Union

from .engine.sample import make_sampler
from .engine.session import Session, StepStats, generate_step
from .errors import BudgetError, TiercacheError
from .memory import peak_memory, trim_heap
from .store.format import Store
from .tokenizer import Tokenizer

if TYPE_CHECKING:  # the lean runtime never imports torch; the other engines do, when loaded
    from .engine import Engine

Prompt = Union[str, list[int], list[dict]]


@dataclass
class GenerationResponse:
    text: str                   # the new piece of text (may be empty while UTF-8 is incomplete)
    token: int
    finish_reason: str | None   # None while generating, then "stop" or "length"
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: int            # bytes; see peak_memory_method
    peak_memory_method: str
    stats: dict | None = None   # tiered engines: cache hit rate, store bytes read, regions


def default_threads() -> int:
    n = os.cpu_count() or 1
    return 1 if n <= 2 else n // 2  # SMT siblings rarely help matvec-bound decode


ENGINES = ("auto", "lean", "tiered", "dense")


def load(model: str, threads: int | None = None, dtype: str | None = None, ram: int | str | None = None,
         engine: str = "auto", context: int = 2048, kv: str = "f16", io_threads: int = 2,
         sparse: bool | None = None, backend: str = "auto",
         plan: str | None = None, experts: str | None = None, expert_cut: float | None = None,
         vram: int | str | None = None) -> tuple[Engine, Tokenizer]:
    """Load MODEL (store dir, HF dir, GGUF file or known name) -> (engine, tokenizer).

    engine="auto" runs the lean runtime (`tiercache.lean`: no torch in the process) where it
    runs the store within `ram` (a dense model's FFN clusters, or an MoE's experts, that do
    not fit are read from the store), else the tiered engine. engine="lean" asks for it (an
    error says why it cannot); "tiered" keeps FFN clusters in a segmented cache
    inside `ram` bytes (everything resident when ram is None); "dense" is the naive all-in-RAM
    float32 reference.
    kv: the KV cache's dtype, f16 (default) or f32.
    backend picks prefill's backend (auto|torch|torch:cuda|ort[:PROVIDER]); decode is torch.
    Under a RAM budget `auto` stays on torch: an ONNX Runtime graph holds its own weights.
    plan: a `tiercache plan --out` file, whose engine settings replace ram/context/io_threads
    (and its vram_bytes, unless vram is given); a plan that runs on the lean runtime
    (plan["runs"]) gives it the plan's RAM budget and context.
    MoE stores (Mixtral family): experts (lru | freq+lru; None: by the budget) is the expert
    cache's policy; expert_cut turns on reading a layer's experts ahead (those its router gives
    at least this probability from the previous layer's input; None: the tiered engine reads
    the top-k, the lean runtime reads none: it measured slower, BENCHMARKS.md);
    `engine.stats()["experts"]` reports hits, misses, bytes read and read-ahead per layer.
    vram: a CUDA GPU's bytes for weights (tiered engine): the head, then the first layers (an
    MoE's: every layer's attention and router, then whole experts) go there as float16 and
    compute there, the rest stays in RAM and on flash (layout.py); `engine.stats()["vram"]`
    says what went.
    """
    from .hub import resolve_model
    from planner.units import parse_size
    if engine not in ENGINES:
        raise TiercacheError(f"--engine {engine}: one of {', '.join(ENGINES)}")
    from .cache.experts import POLICIES  # (no torch there)
    if experts not in (None, *POLICIES):
        raise TiercacheError(f"--experts {experts}: the expert cache's policy is one of "
                             + ", ".join(POLICIES))
    path = resolve_model(model, dtype=dtype)
    tok = Tokenizer(path)  # before the engine, so its memory is inside the measured budget
    trim_heap()  # parsing tokenizer.json leaves ~27 MiB of freed blocks in malloc (SmolLM2's)
    ram_bytes = parse_size(ram) if ram is not None else None
    lean_short = None  # why the lean runtime did not fit --ram, where that was why
    if engine in ("auto", "lean"):
        lean_ram, lean_context, lean_plan = ram_bytes, context, plan
        if plan is not None and vram is None:
            from planner.search import load_plan
            planned = load_plan(plan)
            if planned.get("runs") == "lean":  # the plan's engine, sized as planned
                lean_ram, lean_plan = planned["limits"]["ram_bytes"], None
                lean_context = planned["engine"].get("context", context)
        asked = dict(vram=vram, plan=lean_plan, sparse=sparse,
                     backend=None if backend == "auto" else backend)
        lean, lean_short = _lean(path, engine == "lean", asked, lean_ram, lean_context, kv,
                                 threads or default_threads(), experts, expert_cut)
        if lean is not None:
            return lean, tok
    try:
        return _torch_engine(path, tok, threads, ram, engine, context, kv, io_threads, sparse,
                             backend, plan, experts, expert_cut, vram)
    except BudgetError as e:
        if lean_short is None:
            raise
        # neither fits: say both, the lean runtime's (the smaller process) first
        raise BudgetError(f"--ram {ram_bytes / 2**20:.0f} MiB is too small for either engine: "
                          f"the lean runtime {lean_short}; the tiered engine: {e}") from None


def _torch_engine(path, tok, threads, ram, engine, context, kv, io_threads, sparse, backend,
                  plan, experts, expert_cut, vram) -> tuple[Engine, Tokenizer]:
    """The tiered or dense engine (torch) for the store at `path`, as `load` asked."""
    import torch
    from planner.units import parse_size
    from .engine import load_dense
    from .engine.tiered import TierConfig, config_from_plan, load_tiered
    torch.set_num_threads(threads or default_threads())
    vram_bytes = parse_size(vram) if vram is not None else None
    if engine == "dense":
        if vram_bytes:
            raise TiercacheError("--vram places weights for the tiered engine; the dense "
                                 "engine runs on --backend torch:cuda whole")
        return (load_dense(Store(path), context=context, kv=kv,
                           backends=_handed(backend, threads)), tok)
    if plan is not None:
        from planner.search import load_plan
        cfg = config_from_plan(load_plan(plan))
        cfg.experts, cfg.expert_cut = experts, expert_cut or 0.0
        if vram_bytes is not None:  # --vram over the plan's
            cfg.vram_bytes = vram_bytes
        ram = cfg.ram_bytes
    else:  # planned for this machine where it is probed; else the engine sizes itself
        own = TierConfig(ram_bytes=parse_size(ram) if ram is not None else None,
                         context=context, kv=kv, io_threads=io_threads, sparse=sparse,
                         experts=experts, expert_cut=expert_cut or 0.0, vram_bytes=vram_bytes)
        cfg = (_planned(path, parse_size(ram), context, kv)
               if ram is not None and sparse is None and not vram_bytes else None) or own
    if cfg.vram_bytes and backend not in ("auto", "torch"):
        raise TiercacheError(f"--backend {backend} with --vram: the VRAM tier computes its "
                             "layers itself; leave --backend auto")
    if backend == "auto" and (ram is not None or cfg.vram_bytes):
        backend = "torch"
    hand = _handed(backend, threads)
    try:
        eng = load_tiered(Store(path, readahead=False), cfg, hand)
    except BudgetError:
        if plan is not None or cfg is own:
            raise
        # the plan's regions do not fit what this process measures: size them here
        eng = load_tiered(Store(path, readahead=False), own, hand)
    if eng.int4:  # q4 weights: the threads go to the kernels that run them (q4.share_threads)
        from .engine import q4
        q4.share_threads(threads or default_threads())
    return eng, tok


def _lean(path, asked_for: bool, asked: dict, ram: int | None, context: int, kv: str,
          threads: int, experts: str | None = None,
          expert_cut: float | None = None):
    """(the lean runtime for the store at `path`, None) or, where the tiered engine is the one
    to run it, (None, why it did not fit --ram, or None where that was not why); asked_for:
    an error instead, with the reason."""
    from . import lean
    from .engine import q4
    store = Store(path, readahead=False)
    given = [f"--{k}" for k, v in asked.items() if v not in (None, False)]
    why = lean.why_not(store)
    why = f"does not take {', '.join(given)} (the tiered engine's)" if given else (
        why and f"does not run {why}")
    resident = None if why else lean.resident_clusters(store, context, kv, ram)
    budget = None
    if why is None and resident is None and store.args.is_moe:  # experts read when routed
        budget = lean.expert_budget(store, context, kv, ram)
        resident = None if budget is None else store.n_clusters
    short = None
    if why is None and resident is None:
        least = lean.least_bytes(store, context, kv)
        held = ("one token's routed experts" if store.args.is_moe
                else "all but the FFN clusters, which stream")
        fits = next((c for c in (context // 2, context // 4, context // 8) if c >= 128
                     and lean.least_bytes(store, c, kv) <= ram), None)
        short = why = (f"needs {least / 2**20:.0f} MiB ({held}, KV, runtime), over --ram "
                       f"{ram / 2**20:.0f} MiB" + (f"; --context {fits} would fit" if fits
                                                   else ""))
    if why is not None:
        store.close()
        if asked_for:
            raise (BudgetError if short else TiercacheError)(
                f"--engine lean: the lean runtime {why}")
        return None, short
    q4.share_threads(threads)
    return lean.LeanEngine(store, context, kv, threads, resident, budget, experts,
                           expert_cut), None


def _handed(backend: str, threads: int | None):
    """The prefill backend handed to the engine when it is built (None: torch)."""
    if backend == "torch":
        return None
    import backends
    return backends.phases(backend, threads or default_threads(), decode=False)


def _planned(path, ram: int, context: int, kv: str):
    """`--ram` alone: the planner's regions for this machine, when its probe is cached
    (`tiercache device probe`). None when there is no probe or no plan fits: then the engine
    sizes its regions itself, and refuses a budget too small with its own numbers."""
    from planner.probe import cached_profile
    from planner.search import make_plan
    from .engine.tiered import config_from_plan
    from .errors import TiercacheError
    dev = cached_profile()
    if dev is None:
        return None
    try:
        cfg = config_from_plan(make_plan(str(path), dev, ram=ram, context=context))
    except TiercacheError:
        return None
    cfg.kv = kv  # plans count an f16 cache; the engine refuses a larger one that does not fit
    return cfg


MODE_NAMES = {"dense": "all-clusters", "gate": "sparse-gate", "predictor": "predictor"}


def mode_name(mode: str) -> str:
    """The tiered engine's FFN mode as reports name it: its "dense" computes every cluster
    (read from the cache and the store), which is not the all-in-RAM `--engine dense`."""
    return MODE_NAMES.get(mode, mode)


def encode_prompt(tokenizer: Tokenizer, prompt: Prompt, chat_template: bool = True) -> list[int]:
    if isinstance(prompt, str):
        if chat_template and tokenizer.chat_template:
            return tokenizer.encode_chat([{"role": "user", "content": prompt}])
        return tokenizer.encode(prompt)
    if prompt and isinstance(prompt[0], dict):
        return tokenizer.encode_chat(prompt)
    return list(prompt)


def stream_generate(engine: Engine, tokenizer: Tokenizer, prompt: Prompt, max_tokens: int = 256,
                    temp: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                    seed: int | None = None, chat_template: bool = True,
                    session: Session | None = None) -> Iterator[GenerationResponse]:
    """Yield one response per generated token; the last one carries the finish reason."""
    ids = encode_prompt(tokenizer, prompt, chat_template)
    session = session or engine.new_session()
    sampler = make_sampler(temp, top_p, top_k, seed)
    stats, detok = StepStats(), tokenizer.detokenizer()
    eos = tokenizer.eos_ids | set(engine.args.eos_ids)
    n = 0
    for n, token in enumerate(generate_step(session, ids, sampler, max_tokens, stats), 1):
        done = "stop" if token in eos else ("length" if n == max_tokens else None)
        text = "" if token in eos else detok.add(token)
        mem, how = peak_memory()
        tier = engine.stats() if done and hasattr(engine, "stats") else None
        yield GenerationResponse(text, token, done, len(ids), stats.prefill_tok_s, n,
                                 stats.decode_tok_s, mem, how, tier)
        if done:
            break


def generate(engine: Engine, tokenizer: Tokenizer, prompt: Prompt, verbose: bool = False,
             **kwargs) -> str:
    """Generate and return the whole text; with verbose, stream it to stdout."""
    out = []
    for r in stream_generate(engine, tokenizer, prompt, **kwargs):
        out.append(r.text)
        if verbose:
            print(r.text, end="", flush=True)
    return "".join(out)
