"""Synthetic Llama / Mixtral shapes as GGUF files, for speed and memory benchmarks.

Random weights written straight in ggml's block formats (Q4_0 matrices, Q8_0 tied embedding,
F32 norms and routers), with the SmolLM2 tokenizer copied from the default model's GGUF, so
llama.cpp and `tiercache convert` read the identical file. Random weights say nothing about
quality or activation sparsity; they are for tok/s, bytes read and memory only.

    python tools/synth.py 1b --out /work/bench-data/synth-1b.gguf
    python tools/synth.py moe --skew 4 --out /work/bench-data/synth-moe-skew4.gguf
    python tools/synth.py --list

--skew S scales the router rows of --skew-experts experts per layer by S: those experts win
the top-k more often. A random router is expected to spread tokens evenly, but on text the
random-weight models route most tokens of a layer to a few experts anyway (measured with
tools/expert_trace.py: the 2 most used of 8 take 0.60-0.83 of the uses, even is 0.25).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TOKENIZER_PREFIX = "tokenizer."
Q4_0, Q8_0 = 2, 8  # GGMLQuantizationType values
BLOCK = 32
WEIGHT_STD = 0.02  # the usual init: activations stay finite through 16-28 random layers


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    ffn: int  # per expert for MoE
    heads: int
    kv_heads: int
    experts: int = 0
    experts_used: int = 0
    note: str = ""

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def params(self, vocab: int) -> int:
        d, hd = self.hidden, self.head_dim
        attn = d * hd * (2 * self.heads + 2 * self.kv_heads)
        ffn = 3 * d * self.ffn * max(1, self.experts) + d * self.experts
        return self.layers * (attn + ffn + 2 * d) + vocab * d + d


SHAPES = {
    "0.5b": Shape(1024, 24, 4096, 16, 4, note="0.5B-class Llama (d 1024, 24 layers)"),
    "1b": Shape(2048, 16, 8192, 32, 8, note="Llama-3.2-1B shape"),
    "3b": Shape(3072, 28, 8192, 24, 8, note="Llama-3.2-3B shape"),
    "moe": Shape(1024, 16, 3584, 16, 4, experts=8, experts_used=2,
                 note="Mixtral shape, 8 experts top-2"),
}


def tokenizer_fields(gguf_path: Path) -> list[tuple[str, object, object, object]]:
    """(key, value, type, sub_type) of every tokenizer.* field of a GGUF file."""
    from gguf import GGUFReader, GGUFValueType
    r = GGUFReader(gguf_path)
    out = []
    for key, f in r.fields.items():
        if key.startswith(TOKENIZER_PREFIX):
            sub = f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None
            out.append((key, f.contents(), f.types[0], sub))
    return out


def default_tokenizer_gguf() -> Path:
    from tiercache import hub
    return hub.fetch_gguf(hub.DEFAULT_MODEL)


def _q4_0(rng, rows: int, cols: int, lead: tuple = ()) -> np.ndarray:
    """Q4_0 blocks [*lead, rows, cols/32*18]: an f16 scale (random sign, so the -0.5 mean of
    uniform nibbles cancels) and 16 bytes of uniform nibbles (std 4.6 steps), the first one 0:
    llama.cpp's quantizer maps each block's largest |x| to -8 d, so every real Q4_0 block has
    a 0 (a converter that finds d from the largest |x|, as tiercache's, then copies it exactly;
    without it ~12% of uniform blocks lack a 0)."""
    n = int(np.prod(lead, dtype=np.int64)) * rows * (cols // BLOCK)
    blocks = np.empty((n, 18), np.uint8)
    scale = np.float16(WEIGHT_STD / 4.61)
    signs = np.where(rng.integers(0, 2, n, dtype=np.uint8) == 1, scale, -scale).astype(np.float16)
    blocks[:, :2] = signs.view(np.uint8).reshape(n, 2)
    blocks[:, 2:] = rng.integers(0, 256, (n, 16), dtype=np.uint8)
    blocks[:, 2] &= 0xF0  # element 0 (byte 0's low nibble) at q = 0
    return blocks.reshape(*lead, rows, cols // BLOCK * 18)


def _q8_0(rng, rows: int, cols: int) -> np.ndarray:
    n = rows * (cols // BLOCK)
    blocks = np.empty((n, 34), np.uint8)
    blocks[:, :2] = np.full(n, np.float16(WEIGHT_STD / 73.0)).view(np.uint8).reshape(n, 2)
    blocks[:, 2:] = rng.integers(-127, 128, (n, 32), dtype=np.int8).view(np.uint8)
    return blocks.reshape(rows, cols // BLOCK * 34)


def tensor_plan(s: Shape, vocab: int) -> list[tuple[str, str, tuple]]:
    """(GGUF name, kind, numpy-order shape) in file order; kind: q4, q8, f32, router."""
    d, hd, f, e = s.hidden, s.head_dim, s.ffn, s.experts
    out = [("token_embd.weight", "q8", (vocab, d))]
    for i in range(s.layers):
        b = f"blk.{i}."
        out += [(b + "attn_norm.weight", "f32", (d,)),
                (b + "attn_q.weight", "q4", (s.heads * hd, d)),
                (b + "attn_k.weight", "q4", (s.kv_heads * hd, d)),
                (b + "attn_v.weight", "q4", (s.kv_heads * hd, d)),
                (b + "attn_output.weight", "q4", (d, s.heads * hd)),
                (b + "ffn_norm.weight", "f32", (d,))]
        if e:
            out += [(b + "ffn_gate_inp.weight", "router", (e, d)),
                    (b + "ffn_gate_exps.weight", "q4", (e, f, d)),
                    (b + "ffn_up_exps.weight", "q4", (e, f, d)),
                    (b + "ffn_down_exps.weight", "q4", (e, d, f))]
        else:
            out += [(b + "ffn_gate.weight", "q4", (f, d)), (b + "ffn_up.weight", "q4", (f, d)),
                    (b + "ffn_down.weight", "q4", (d, f))]
    return out + [("output_norm.weight", "f32", (d,))]


def _data(kind: str, shape: tuple, rng, skew: float, skew_experts: int) -> np.ndarray:
    if kind == "f32":
        return np.ones(shape, np.float32)
    if kind == "router":  # random router; rows of the first skew_experts scaled by skew
        w = rng.standard_normal(shape, dtype=np.float32) * np.float32(1 / np.sqrt(shape[1]))
        w[:skew_experts] *= np.float32(skew)
        return w
    if kind == "q8":
        return _q8_0(rng, *shape)
    return _q4_0(rng, shape[-2], shape[-1], tuple(shape[:-2]))


def _nbytes(kind: str, shape: tuple) -> tuple[tuple, int]:
    """(byte shape, bytes) of a tensor as stored."""
    if kind in ("f32", "router"):
        return shape, 4 * int(np.prod(shape))
    per = 18 if kind == "q4" else 34
    bshape = (*shape[:-1], shape[-1] // BLOCK * per)
    return bshape, int(np.prod(bshape))


def write(shape: str, out: Path, skew: float = 1.0, skew_experts: int = 2, seed: int = 0,
          tokenizer_gguf: Path | None = None) -> Path:
    """Write SHAPES[shape] to `out` (atomically: a .part file renamed at the end)."""
    import gguf
    s = SHAPES[shape]
    if skew != 1.0 and not s.experts:
        raise SystemExit(f"--skew needs an MoE shape; {shape} has no router")
    tok = tokenizer_fields(tokenizer_gguf or default_tokenizer_gguf())
    vocab = len(next(v for k, v, *_ in tok if k == "tokenizer.ggml.tokens"))
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".part")
    w = gguf.GGUFWriter(part, "llama")
    _metadata(w, s, vocab, f"synthetic-{shape}" + (f"-skew{skew:g}" if skew != 1.0 else ""))
    for key, val, vtype, sub in tok:
        w.add_key_value(key, val, vtype, sub)
    plan = tensor_plan(s, vocab)
    types = {"q4": gguf.GGMLQuantizationType.Q4_0, "q8": gguf.GGMLQuantizationType.Q8_0}
    for name, kind, shp in plan:
        bshape, nb = _nbytes(kind, shp)
        dtype = np.uint8 if kind in types else np.float32
        w.add_tensor_info(name, bshape, np.dtype(dtype), nb, raw_dtype=types.get(kind))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for i, (name, kind, shp) in enumerate(plan):  # one tensor in memory at a time
        w.write_tensor_data(_data(kind, shp, np.random.default_rng([seed, i]), skew, skew_experts))
    w.close()
    part.rename(out)
    return out


def _metadata(w, s: Shape, vocab: int, name: str) -> None:
    w.add_name(name)
    w.add_block_count(s.layers)
    w.add_context_length(4096)
    w.add_embedding_length(s.hidden)
    w.add_feed_forward_length(s.ffn)  # per expert for MoE, as llama.cpp's Mixtral files
    w.add_head_count(s.heads)
    w.add_head_count_kv(s.kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(s.head_dim)
    w.add_vocab_size(vocab)
    w.add_file_type(2)  # LlamaFileType.MOSTLY_Q4_0
    if s.experts:
        w.add_expert_count(s.experts)
        w.add_expert_used_count(s.experts_used)


def ensure(shape: str, into: Path, skew: float = 1.0, skew_experts: int = 2) -> Path:
    """The synthetic GGUF for (shape, skew) under `into`, written the first time."""
    name = f"synth-{shape}" + (f"-skew{skew:g}x{skew_experts}" if skew != 1.0 else "") + ".gguf"
    path = into / name
    return path if path.is_file() else write(shape, path, skew, skew_experts)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("shape", nargs="?", choices=sorted(SHAPES))
    p.add_argument("--out", type=Path)
    p.add_argument("--skew", type=float, default=1.0, help="scale of the skewed router rows")
    p.add_argument("--skew-experts", type=int, default=2, help="experts per layer skewed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--list", action="store_true", help="list the shapes and exit")
    a = p.parse_args()
    if a.list or not a.shape:
        for k, s in SHAPES.items():
            print(f"{k:5s} {s.params(49152) / 1e9:.2f}B params  {s.note}: d {s.hidden}, "
                  f"{s.layers} layers, F {s.ffn}, GQA {s.heads}/{s.kv_heads}"
                  + (f", {s.experts} experts top-{s.experts_used}" if s.experts else ""))
        return
    if a.out is None:
        p.error("--out is required")
    path = write(a.shape, a.out, a.skew, a.skew_experts, a.seed)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
