"""What the lean runtime does with a RAM budget, counted by its own functions.

On the stores it takes (q4 Llama and Mixtral, `tiercache.lean.unsupported`) `--ram` alone runs
the lean runtime, not the tiered engine a plan describes (`--plan` runs that). Its sizing is a
pure function of the store's manifest and the process's memory before weights
(`tiercache.lean.need_bytes` and the rest, given `runtime`), so the planner calls the same
functions with the lean process's runtime: numpy and tiercache.lean imported, no torch
(LEAN_RUNTIME_ANON), plus the tokenizer. Its speed is not modelled.
"""
from __future__ import annotations

from tiercache import lean
from tiercache.store.format import Shape

from .accounting import TOKENIZER_BYTES_PER_TOKEN

# anonymous memory of a process that has imported tiercache.api and tiercache.lean (numpy, no
# torch), before its tokenizer: 16.7 MiB measured on the reference VM (Python 3.11, numpy 2)
LEAN_RUNTIME_ANON = 17 << 20


def lean_fit(manifest: dict, ram: int | None, context: int = 2048,
             kv: str = "f16") -> dict | None:
    """None where the lean runtime does not take the store (an estimate, or a store it does
    not run); else what it does within `ram` bytes: {"least_bytes" (the smallest --ram it
    runs in), "need_bytes" (everything resident), "fits", "resident_clusters" of
    "n_clusters" per layer (dense: the rest stream, "streamed_bytes_per_token" a decode
    step), "expert_bytes" of "all_expert_bytes" held (MoE: the rest read when routed)}."""
    if manifest.get("estimate") or "records" not in manifest:
        return None
    shape = Shape(manifest)
    if lean.unsupported(shape.args, manifest):
        return None
    a = shape.args
    run = LEAN_RUNTIME_ANON + a.vocab_size * TOKENIZER_BYTES_PER_TOKEN
    least = lean.least_bytes(shape, context, kv, run)
    out = {"least_bytes": least, "need_bytes": lean.need_bytes(shape, context, kv, run),
           "fits": ram is None or least <= ram, "n_clusters": shape.n_clusters,
           "runtime_bytes": run}
    if a.is_moe:
        every = a.num_hidden_layers * a.n_experts * lean.expert_bytes(shape)
        held = every if ram is None or out["need_bytes"] <= ram else (
            lean.expert_budget(shape, context, kv, ram, run) or 0)
        return {**out, "expert_bytes": min(held, every), "all_expert_bytes": every}
    resident = lean.resident_clusters(shape, context, kv, ram, run)
    record = sum(nb for _, _, nb in shape.cluster_parts(0))
    streamed = 0 if resident is None else (
        a.num_hidden_layers * (shape.n_clusters - resident) * record)
    return {**out, "resident_clusters": resident, "streamed_bytes_per_token": streamed}
