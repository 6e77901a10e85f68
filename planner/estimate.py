"""Size an unconverted model without loading it, like `accelerate estimate-memory`.

HF directories: config.json plus the safetensors headers (8-byte length, JSON: dtype, shape,
data_offsets per tensor). GGUF files: gguf.GGUFReader's metadata and tensor infos. The result is
a manifest-like dict (config, tensors, ffn layout, weight_bytes) for the store that
`tiercache convert` would write, so the planner treats stores and estimates alike.
"""
from __future__ import annotations

import json
import struct
from collections import Counter
from pathlib import Path

import numpy as np

from tiercache.config import ModelArgs
from tiercache.errors import StoreError, TiercacheError
from tiercache.store import format as fmt  # the store's facts: dtype rules, GGUF names
from tiercache.store import gguf as store_gguf
from tiercache.store import quant

from .sizes import category, nbytes_as

DEFAULT_CLUSTER = 32  # neurons per cluster when a model is not converted yet
_ST_DTYPES = {"F32": "f32", "F16": "f16", "BF16": "bf16"}

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
    m = fmt._read_manifest(Path(path))  # the store's own checks and messages
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
    ffn_dtype = fmt.ffn_dtype(args, dtype, cluster_size)
    stored = {n: {"shape": list(s), "dtype": fmt.tensor_dtype(n, tuple(s), dtype)}
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
    ffn["dtype"] = fmt.ffn_dtype(args, dtype, ffn["cluster_size"])
    tensors = {n: {"shape": t["shape"], "dtype": fmt.tensor_dtype(n, tuple(t["shape"]), dtype)}
               for n, t in manifest["tensors"].items()}
    cs, F, d = ffn["cluster_size"], ffn["intermediate_size"], ffn["hidden_size"]
    units = ffn["layers"] * ffn["experts"]
    ffn_bytes = units * sum(3 * quant.nbytes((min(cs, F - lo), d), ffn["dtype"])
                            for lo in range(0, F, cs))
    weight = sum(nbytes_as(t["shape"], t["dtype"]) for t in tensors.values()) + ffn_bytes
    return {**manifest, "dtype": dtype, "ffn": ffn, "tensors": tensors,
            "weight_bytes": int(weight)}


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
        stacked = store_gguf.hf_names(name, dims[-1]) if "_exps." in name else None
        if stacked:  # [n_expert, out, in]: one HF tensor per expert, as convert writes them
            for hf in stacked:
                tensors[hf] = (shape[1:], qt.name, n // block * size // len(stacked))
        else:
            for hf in store_gguf.hf_names(name) or ([] if name == "rope_freqs.weight" else [name]):
                tensors[hf] = (shape, qt.name, n // block * size)
    shapes = {name: tuple(dims) for name, dims, _ in infos}
    arch = fields.get("general.architecture", "")
    return store_gguf.hf_config(arch, fields.get, shapes, path.name), tensors


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
        v = self.unpack("<" + _GGUF_SCALARS[vtype])
        return store_gguf.shortest_f32(v) if vtype == 6 else v  # as the store reads float32
