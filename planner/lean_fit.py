"""What the lean runtime does with a RAM budget, counted by its own functions.

On the stores it takes (q4 Llama and Mixtral, `tiercache.lean.unsupported`) `--ram` alone runs
the lean runtime, not the tiered engine whose regions a plan gives (and `--plan` runs it too
where the plan predicts it no slower: plan["runs"], planner/search.py). Its sizing is a
pure function of the store's manifest and the process's memory before weights
(`tiercache.lean.need_bytes` and the rest, given `runtime`), so the planner calls the same
functions with the lean process's runtime: numpy and tiercache.lean imported, no torch
(LEAN_RUNTIME_ANON), plus the tokenizer.

Its decode speed, on one thread (the profile's RAM rate is one thread's), is the weights a
token touches at LEAN_KERNEL_SHARE of that rate plus LEAN_LAYER_S a layer, or the store reads
where they take longer (they run ahead on reader threads while the kernels compute): a dense
model's streamed clusters, an MoE's expert misses under even routing. Real routing repeats
experts, so for MoE below its resident size the figure is a lower bound (the synthetic
Mixtral at 650 MiB: 53-62 tok/s measured, hit rate 0.92, where even routing predicts ~0.6).
"""
from __future__ import annotations

from tiercache import lean
from tiercache.store.format import Shape, tensor_key

from .accounting import TOKENIZER_BYTES_PER_TOKEN
from .cost import even_expert_misses
from .profiles import DeviceProfile

# anonymous memory of a process that has imported tiercache.api and tiercache.lean (numpy, no
# torch), before its tokenizer: 16.7 MiB measured on the reference VM (Python 3.11, numpy 2)
LEAN_RUNTIME_ANON = 17 << 20
# the share of the profile's one-thread RAM read rate the lean runtime's decode draws on the
# weights a token touches: reference VM (Zen 5, memory_bw 38.7 GB/s), 1 thread, resident:
# synthetic 1B 44.5 tok/s x 648 MB = 28.9 GB/s, synthetic Mixtral 102.8 x 272 MB = 28.0
LEAN_KERNEL_SHARE = 0.75
LEAN_LAYER_S = 25e-6  # a layer's decode-loop Python and C-call set-up, per token


def lean_fit(manifest: dict, ram: int | None, context: int = 2048, kv: str = "f16",
             dev: DeviceProfile | None = None) -> dict | None:
    """None where the lean runtime does not take the store (an estimate, or a store it does
    not run); else what it does within `ram` bytes: {"least_bytes" (the smallest --ram it
    runs in), "need_bytes" (everything resident), "fits", "resident_clusters" of
    "n_clusters" per layer (dense: the rest stream, "streamed_bytes_per_token" a decode
    step), "expert_bytes" of "all_expert_bytes" held (MoE: the rest read when routed)};
    with a device profile also "decode_tok_s" (one thread, see the module's docstring) and
    "read_bytes_per_token"."""
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
    record = sum(nb for _, _, nb in shape.cluster_parts(0))
    if a.is_moe:
        one = lean.expert_bytes(shape)
        every = a.num_hidden_layers * a.n_experts * one
        held = every if ram is None or out["need_bytes"] <= ram else (
            lean.expert_budget(shape, context, kv, ram, run) or 0)
        out.update(expert_bytes=min(held, every), all_expert_bytes=every)
        routed = a.num_hidden_layers * a.num_experts_per_tok * one  # a token's experts
        touched = lean.weight_bytes(shape) - every + routed
        reads = one * even_expert_misses(a.num_hidden_layers * a.n_experts,
                                         a.num_experts_per_tok / a.n_experts,
                                         int(out["expert_bytes"] // one))
        run_bytes = min(lean.RUN, shape.n_clusters) * record
        readers = lean.READERS
    else:
        resident = lean.resident_clusters(shape, context, kv, ram, run)
        reads = 0 if resident is None else (
            a.num_hidden_layers * (shape.n_clusters - resident) * record)
        out.update(resident_clusters=resident, streamed_bytes_per_token=reads)
        touched, run_bytes, readers = lean.weight_bytes(shape), record, lean.STREAM_READERS
    if not a.tie_word_embeddings:  # an embedding's rows are looked up, not read whole
        touched -= shape.records.get(tensor_key("model.embed_tokens.weight").decode(), [0])[0]
    if dev is not None and out["fits"]:
        compute = touched / (LEAN_KERNEL_SHARE * dev.memory_bw) \
            + a.num_hidden_layers * LEAN_LAYER_S
        read = dev.read_time(reads, run_bytes, readers)
        out.update(decode_tok_s=1 / max(compute, read), read_bytes_per_token=reads)
    return out
