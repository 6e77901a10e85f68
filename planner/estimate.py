"""Size an unconverted model without loading it, like `accelerate estimate-memory`.

HF directories: config.json plus the safetensors headers (8-byte length, JSON: dtype, shape,
data_offsets per tensor). GGUF files: gguf.GGUFReader's metadata and tensor infos. The result is
a manifest-like dict (config, tensors, ffn layout, weight_bytes) for the store that
`tiercache convert` would write, so the planner treats stores and estimates alike.
"""
from __future__ import annotations

import json
import re
import struct
from collections import Counter
from pathlib import Path

import numpy as np

from tiercache.config import ModelArgs
from tiercache.errors import StoreError, TiercacheError
from tiercache.store import quant

from .sizes import category, nbytes_as

DEFAULT_CLUSTER = 32  # neurons per cluster when a model is not converted yet
_ST_DTYPES = {"F32": "f32", "F16": "f16", "BF16": "bf16"}
_GGUF_NAMES = [  # GGUF tensor name -> HF name (llama.cpp's convert_hf_to_gguf mapping)
    (r"^token_embd\.", "model.embed_tokens."), (r"^output_norm\.", "model.norm."),
    (r"^output\.", "lm_head."), (r"^blk\.(\d+)\.attn_norm\.", r"model.layers.\1.input_layernorm."),
    (r"^blk\.(\d+)\.ffn_norm\.", r"model.layers.\1.post_attention_layernorm."),
    (r"^blk\.(\d+)\.attn_q\.", r"model.layers.\1.self_attn.q_proj."),
    (r"^blk\.(\d+)\.attn_k\.", r"model.layers.\1.self_attn.k_proj."),
    (r"^blk\.(\d+)\.attn_v\.", r"model.layers.\1.self_attn.v_proj."),
    (r"^blk\.(\d+)\.attn_output\.", r"model.layers.\1.self_attn.o_proj."),
    (r"^blk\.(\d+)\.ffn_gate_inp\.", r"model.layers.\1.block_sparse_moe.gate."),
    (r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.", r"model.layers.\1.block_sparse_moe.experts.\2."),
    (r"^blk\.(\d+)\.ffn_(gate|up|down)\.", r"model.layers.\1.mlp.\2_proj."),
]


def load_model(model) -> dict:
    """A store's manifest, or an estimate for an HF directory or a GGUF file."""
    if isinstance(model, dict):
        return model
    path = Path(model)
    if (path / "manifest.json").is_file():
        return read_manifest(path)
    if path.exists():
        return estimate_from_source(path)
    resolved = _resolve_name(str(model))
    if resolved is None:
        raise TiercacheError(f"{model}: no such store, HF directory or GGUF file")
    return load_model(resolved)


def read_manifest(path: Path) -> dict:
    from tiercache.store import format as fmt  # the store's own checks and messages
    m = fmt._read_manifest(Path(path))
    m.setdefault("name", Path(path).name)
    return m


def _resolve_name(name: str):
    try:
        from tiercache.hub import resolve_model
    except ImportError:
        return None
    try:
        return resolve_model(name)
    except TiercacheError:
        return None


def estimate_from_source(path, dtype: str | None = None,
                         cluster_size: int = DEFAULT_CLUSTER) -> dict:
    """Manifest-like sizes of the store `convert` would make from `path` in `dtype`
    (default: the source's own precision; GGUF quantizations map to q4/q8)."""
    path = Path(path)
    if not path.exists():
        raise TiercacheError(f"{path}: no such file or directory")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TiercacheError(f"{path}: not an HF model directory (no config.json)")
        config, tensors, kind = _hf_config(path), _hf_tensors(path), "hf"
    elif path.suffix == ".gguf" or _is_gguf(path):
        config, tensors, kind = *_gguf(path), "gguf"
    else:
        raise TiercacheError(f"{path}: not an HF model directory or a GGUF file")
    if not tensors:
        raise TiercacheError(f"{path}: no weights found")
    return _as_manifest(path, kind, ModelArgs.from_dict(config), tensors, dtype, cluster_size)


def _as_manifest(path, kind, args, tensors, dtype, cluster_size) -> dict:
    """tensors: {hf_name: (shape, source_dtype, source_nbytes)}."""
    dtype = dtype or _dominant(tensors)
    if dtype not in quant.DTYPES:
        raise TiercacheError(f"unknown dtype {dtype} (one of {', '.join(quant.DTYPES)})")
    ffn_dtype = _ffn_dtype(args, dtype, cluster_size)
    stored = {n: {"shape": list(s), "dtype": _store_dtype(n, s, dtype)}
              for n, (s, _, _) in tensors.items() if category(n) != "ffn"}
    F, d, units = args.intermediate_size, args.hidden_size, args.num_hidden_layers * args.n_experts
    n_clusters = -(-F // cluster_size)
    ffn_bytes = units * sum(3 * quant.nbytes((min(cluster_size, F - c * cluster_size), d),
                                             ffn_dtype) for c in range(n_clusters))
    weight = sum(nbytes_as(t["shape"], t["dtype"]) for t in stored.values()) + ffn_bytes
    return {
        "format": "tiercache-estimate", "name": path.name, "config": args.to_dict(),
        "dtype": dtype,
        "ffn": {"cluster_size": cluster_size, "n_clusters": n_clusters, "dtype": ffn_dtype,
                "layers": args.num_hidden_layers, "experts": args.n_experts,
                "intermediate_size": F, "hidden_size": d},
        "tensors": stored, "weight_bytes": int(weight),
        "estimate": {"kind": kind, "path": str(path),
                     "source_bytes": int(sum(nb for _, _, nb in tensors.values())),
                     "source_dtypes": dict(Counter(dt for _, dt, _ in tensors.values())),
                     "source_tensors": len(tensors)},
    }


def restate(manifest: dict, dtype: str) -> dict:
    """The same estimate for a store converted to another dtype (no file is read again)."""
    args = ModelArgs.from_dict(manifest["config"])
    ffn = dict(manifest["ffn"])
    ffn["dtype"] = _ffn_dtype(args, dtype, ffn["cluster_size"])
    tensors = {n: {"shape": t["shape"], "dtype": _store_dtype(n, t["shape"], dtype)}
               for n, t in manifest["tensors"].items()}
    cs, F, d = ffn["cluster_size"], ffn["intermediate_size"], ffn["hidden_size"]
    units = ffn["layers"] * ffn["experts"]
    ffn_bytes = units * sum(3 * quant.nbytes((min(cs, F - lo), d), ffn["dtype"])
                            for lo in range(0, F, cs))
    weight = sum(nbytes_as(t["shape"], t["dtype"]) for t in tensors.values()) + ffn_bytes
    return {**manifest, "dtype": dtype, "ffn": ffn, "tensors": tensors,
            "weight_bytes": int(weight)}


def _ffn_dtype(args: ModelArgs, dtype: str, cluster_size: int) -> str:
    """StoreWriter.ffn_dtype: q8/q4 need groups of 32 along d and along each cluster; q4 in
    whole blocks of 64 neurons is stored in the int4 kernel's layout (q4k, same bytes)."""
    ok = all(v % quant.GROUP == 0 for v in (args.hidden_size, cluster_size,
                                            args.intermediate_size))
    if dtype not in ("q8", "q4"):
        return dtype
    if not ok:
        return "f16"
    kernel = (cluster_size % 64 == 0 and args.hidden_size % 64 == 0
              and args.intermediate_size % cluster_size == 0)
    return "q4k" if dtype == "q4" and kernel else dtype


def _store_dtype(name: str, shape, dtype: str) -> str:
    """The dtype StoreWriter.put_tensor gives a non-FFN tensor (store format 3: q4 stores keep
    the head in q8r and attention in q4k, the int8 / int4 kernels' layouts)."""
    from tiercache.store import format as fmt
    if dtype in ("q8", "q4"):
        is_matrix = name.endswith(".weight") and "norm" not in name
        if not (quant.can_quantize(shape) and is_matrix):
            return "f16" if len(shape) == 2 else "f32"
    if dtype == "q4" and name in getattr(fmt, "HEAD_TENSORS", ()):
        return "q8r"
    if dtype == "q4" and ".self_attn." in name and name.endswith("_proj.weight") \
            and shape[0] % 64 == 0:
        return "q4k"
    return dtype


def _dominant(tensors: dict) -> str:
    by = Counter()
    for shape, dt, nb in tensors.values():
        by[_to_store_dtype(dt)] += nb
    return by.most_common(1)[0][0]


def _to_store_dtype(source: str) -> str:
    s = source.upper()
    if s in _ST_DTYPES:
        return _ST_DTYPES[s]
    if s.startswith(("Q8", "Q6")):
        return "q8"
    if s.startswith(("Q", "IQ", "TQ")):
        return "q4"
    return "f32"


# -- HF ------------------------------------------------------------------------------------------
def _hf_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise TiercacheError(f"{path}/config.json is not valid JSON ({e})") from None


def _hf_tensors(path: Path) -> dict:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise TiercacheError(f"{path}: no .safetensors files (other formats are not read)")
    out = {}
    for f in files:
        for name, meta in safetensors_header(f).items():
            if name.endswith((".weight", ".bias")):
                lo, hi = meta["data_offsets"]
                out[name] = (tuple(meta["shape"]), meta["dtype"], hi - lo)
    return out


def safetensors_header(path: Path) -> dict:
    """{name: {dtype, shape, data_offsets}} from a safetensors file, reading only its header."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise StoreError(f"{path}: truncated safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > 100 << 20:
            raise StoreError(f"{path}: not a safetensors file (header of {n} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StoreError(f"{path}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    return header


# -- GGUF ----------------------------------------------------------------------------------------
def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _gguf(path: Path) -> tuple[dict, dict]:
    import gguf
    try:
        fields, infos = read_gguf_header(path)
    except (ValueError, KeyError, struct.error, UnicodeDecodeError) as e:
        raise TiercacheError(f"{path}: not a readable GGUF file ({e})") from None
    tensors = {}
    for name, dims, ggml_type in infos:
        qt = gguf.GGMLQuantizationType(ggml_type)
        block, size = gguf.GGML_QUANT_SIZES[qt]
        n = int(np.prod(dims)) if dims else 1
        shape = tuple(reversed(dims))  # GGUF lists ne0 (columns) first
        tensors[gguf_to_hf(name)] = (shape, qt.name, n // block * size)
    return _gguf_config(fields, tensors), tensors


# GGUF value types -> struct codes (strings and arrays handled apart)
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q",
                 11: "q", 12: "d"}


def read_gguf_header(path: Path) -> tuple[dict, list]:
    """({key: value}, [(name, dims, ggml_type)]) from a GGUF file's header, without its data.
    Arrays become their length unless short; gguf.GGUFReader builds every field and takes
    seconds on a model with a large vocabulary."""
    with open(path, "rb") as f:
        r = _Cursor(f.read(64 << 20))  # headers are far smaller than this
    if r.take(4) != b"GGUF":
        raise ValueError("bad magic")
    version, n_tensors, n_kv = r.unpack("<I"), r.unpack("<Q"), r.unpack("<Q")
    if version < 2:
        raise ValueError(f"GGUF version {version} is too old")
    fields = {}
    for _ in range(n_kv):
        key = r.string()
        fields[key] = r.value(r.unpack("<I"))
    infos = []
    for _ in range(n_tensors):
        name = r.string()
        dims = [r.unpack("<Q") for _ in range(r.unpack("<I"))]
        infos.append((name, dims, r.unpack("<I")))
        r.unpack("<Q")  # data offset
    return fields, infos


class _Cursor:
    def __init__(self, buf: bytes):
        self.buf, self.pos = buf, 0

    def take(self, n: int) -> bytes:
        out = self.buf[self.pos:self.pos + n]
        if len(out) != n:
            raise ValueError("truncated header")
        self.pos += n
        return out

    def unpack(self, fmt: str):
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return v

    def _skip(self, etype: int, n: int) -> None:
        if etype == 8:
            for _ in range(n):
                self.pos += 8 + struct.unpack_from("<Q", self.buf, self.pos)[0]
        elif etype == 9:
            for _ in range(n):
                self.value(9)
        else:
            self.pos += n * struct.calcsize("<" + _GGUF_SCALARS[etype])
        if self.pos > len(self.buf):
            raise ValueError("truncated header")

    def string(self) -> str:
        return self.take(self.unpack("<Q")).decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype == 8:
            return self.string()
        if vtype == 9:
            etype, n = self.unpack("<I"), self.unpack("<Q")
            if n > 64:  # a vocabulary or merges: skip it, keep its length
                self._skip(etype, n)
                return n
            return [self.value(etype) for _ in range(n)]
        return self.unpack("<" + _GGUF_SCALARS[vtype])


def gguf_to_hf(name: str) -> str:
    for pat, rep in _GGUF_NAMES:
        if re.match(pat, name):
            return re.sub(pat, rep, name)
    return name


def _gguf_config(fields: dict, tensors: dict) -> dict:
    def get(key, default=None):
        return fields.get(key, default)

    arch = get("general.architecture", "")
    n_exp = int(get(f"{arch}.expert_count", 0) or 0)
    tokens = get("tokenizer.ggml.tokens", 0)
    vocab = get(f"{arch}.vocab_size") or (tokens if isinstance(tokens, int) else len(tokens))
    return {
        "model_type": "mixtral" if n_exp else arch, "hidden_size": get(f"{arch}.embedding_length"),
        "num_hidden_layers": get(f"{arch}.block_count"),
        "intermediate_size": get(f"{arch}.feed_forward_length"),
        "num_attention_heads": get(f"{arch}.attention.head_count"),
        "num_key_value_heads": get(f"{arch}.attention.head_count_kv"),
        "head_dim": get(f"{arch}.attention.key_length"), "vocab_size": vocab,
        "max_position_embeddings": get(f"{arch}.context_length", 4096),
        "rope_theta": get(f"{arch}.rope.freq_base", 10000.0),
        "rms_norm_eps": get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "num_local_experts": n_exp, "num_experts_per_tok": int(get(f"{arch}.expert_used_count", 0)),
    }
