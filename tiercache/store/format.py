"""The on-disk store: one LMDB environment plus a JSON manifest, in one directory.

    STORE/manifest.json   format, version, config, tensor index, FFN cluster layout, checksums
    STORE/lmdb/           LMDB environment (data.mdb) holding every record
    STORE/tokenizer.json, tokenizer_config.json (chat_template), generation_config.json

Records (keys sort so that a layer's clusters are contiguous and in order):
    t:{name}                          a whole tensor (attention, norms, embeddings, router)
    f:{layer:04d}:{expert:03d}:{c:05d} one FFN cluster: `cluster_size` neuron bundles, laid out as
                                      encode(gate rows [n, d]) | encode(up rows [n, d])
                                      | encode(down columns [d, n]); q8/q4 group the down
                                      part along n, as llama.cpp does, so n is a multiple of 32
    meta:store_id                     the uuid in the manifest; a mismatch means a foreign store

Every record's crc32 is in manifest["records"][key] = [nbytes, crc32] and is checked on read;
the manifest's own crc32, the side files' and data.mdb's size and B-tree pages are checked when
the store opens, before LMDB maps anything (integrity.py).
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
import weakref
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import lmdb
import numpy as np

from ..config import ModelArgs
from ..errors import StoreError, load_json_object, warn
from . import dtypes, integrity

if TYPE_CHECKING:  # decoding to tensors imports torch; reading records does not
    import torch

FORMAT = "tiercache-store"
FORMAT_VERSION = 3  # 2: down columns stored [d, n]; q4k FFN records. 3: q4 stores keep
# attention in q4k and the head in q8r (kernel layouts: pinned or streamed as read)
MANIFEST = "manifest.json"
FFN_PARTS = ("gate_proj", "up_proj", "down_proj")
HEAD_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")


def tensor_key(name: str) -> bytes:
    return f"t:{name}".encode()


def cluster_key(layer: int, expert: int, cluster: int) -> bytes:
    return f"{CLUSTER_PREFIX}{layer:04d}:{expert:03d}:{cluster:05d}".encode()


def predictor_key(layer: int, expert: int) -> bytes:
    """An activation predictor of one layer (engine/predictor.py's record; the profile)."""
    return f"p:{layer:04d}:{expert:03d}".encode()


CLUSTER_PREFIX = "f:"  # every cluster record's key starts so (cluster_key)


def threshold_key(layer: int, expert: int) -> bytes:
    """Per-neuron sparsity thresholds of one layer (float32 [F], store order; the profile)."""
    return f"n:{layer:04d}:{expert:03d}".encode()


def is_store(path) -> bool:
    return (Path(path) / MANIFEST).is_file()


class Shape:
    """What a store's manifest says of its model and records, nothing opened: what memory
    counts read (Store is one; the planner makes one of a manifest it holds)."""

    def __init__(self, manifest: dict):
        self.manifest = manifest
        self.args = ModelArgs.from_dict(manifest["config"])
        ffn = manifest["ffn"]
        self.cluster_size, self.n_clusters = int(ffn["cluster_size"]), int(ffn["n_clusters"])
        self.ffn_dtype = ffn["dtype"]
        self.records = dict(manifest["records"])

    def cluster_rows(self, cluster: int) -> int:
        """Neurons in cluster `cluster` (the last one may be short)."""
        f = self.args.intermediate_size
        return min(self.cluster_size, f - cluster * self.cluster_size)

    def cluster_parts(self, cluster: int):
        """[(shape, byte offset, nbytes)] of gate, up and down inside a cluster record."""
        n, d = self.cluster_rows(cluster), self.args.hidden_size
        shapes = ((n, d), (n, d), (d, n))
        sizes = [dtypes.nbytes(s, self.ffn_dtype) for s in shapes]
        return [(s, sum(sizes[:i]), sizes[i]) for i, s in enumerate(shapes)]


class Store(Shape):
    """Read side of a store. Every read is checked against the manifest's crc32."""

    def __init__(self, path, readahead: bool = True):
        self.path = Path(path)
        for note in integrity.sweep(self.path):
            warn(note)
        try:
            Shape.__init__(self, _read_manifest(self.path))
        except (KeyError, TypeError, ValueError) as e:
            why = f"{type(e).__name__}: {e}"
            raise StoreError(f"{self.path / MANIFEST}: malformed ({why})") from None
        self.readahead = readahead
        integrity.check_lmdb(self.path, self.manifest.get("lmdb"))
        self.env = _open_env(self.path / "lmdb", readahead)
        sid = self._get(b"meta:store_id", check=False)
        if sid is None or sid.decode() != self.manifest["store_id"]:
            raise StoreError(f"{self.path}: manifest and LMDB data belong to different stores")

    # -- raw records -------------------------------------------------------------------------
    def _get(self, key: bytes, check: bool = True):
        if self.env is None:  # let go of by an engine that reads with pread; map it again
            self.env = _open_env(self.path / "lmdb", self.readahead)
        try:
            with self.env.begin(buffers=False) as txn:
                buf = txn.get(key)
        except lmdb.Error as e:  # a damaged page LMDB noticed (the checks above missed it)
            raise StoreError(f"{self.path}: LMDB data is corrupt ({e})") from None
        if check:
            self._verify(key, buf)
        return buf

    def _verify(self, key: bytes, buf) -> None:
        want = self.records.get(key.decode())
        if buf is None or want is None:
            raise StoreError(f"{self.path}: record {key.decode()} is missing")
        if len(buf) != want[0] or zlib.crc32(buf) != want[1]:
            raise StoreError(f"{self.path}: record {key.decode()} is corrupt (checksum mismatch)")

    # -- tensors ------------------------------------------------------------------------------
    @property
    def tensor_names(self) -> list[str]:
        return list(self.manifest["tensors"])

    def tensor(self, name: str, out_dtype=None) -> torch.Tensor:
        """A tensor decoded to float (torch; out_dtype None: float32)."""
        from . import quant
        meta = self.manifest["tensors"][name]
        return quant.decode(self._get(tensor_key(name)), meta["shape"], meta["dtype"], out_dtype)

    def cluster_bytes(self, layer: int, expert: int, cluster: int) -> bytes:
        return self._get(cluster_key(layer, expert, cluster))

    def decode_cluster(self, buf, cluster: int, out_dtype=None):
        """-> (gate [n, d], up [n, d], down [d, n]) for one cluster record."""
        from . import quant
        mv = memoryview(buf)
        return tuple(quant.decode(mv[o:o + nb], s, self.ffn_dtype, out_dtype)
                     for s, o, nb in self.cluster_parts(cluster))

    def ffn_weights(self, layer: int, expert: int = 0, out_dtype=None, read=None):
        """Whole FFN of one layer/expert in HF shapes: gate [F, d], up [F, d], down [d, F].
        read: record keys -> their bytes (e.g. RecordReader.read_many); else from LMDB."""
        if read is None:
            bufs = [self.cluster_bytes(layer, expert, c) for c in range(self.n_clusters)]
        else:
            bufs = read([cluster_key(layer, expert, c).decode() for c in range(self.n_clusters)])
        import torch
        parts = [self.decode_cluster(buf, c, out_dtype) for c, buf in enumerate(bufs)]
        gate, up, down = zip(*parts)
        return torch.cat(gate), torch.cat(up), torch.cat(down, dim=1)

    def weights(self, out_dtype=None) -> Iterator[tuple[str, torch.Tensor]]:
        """Every weight as (HF name, tensor): what a model's `load_weights` consumes."""
        for name in self.tensor_names:
            yield name, self.tensor(name, out_dtype)
        for layer in range(self.args.num_hidden_layers):
            for expert in range(self.args.n_experts):
                for part, w in zip(FFN_PARTS, self.ffn_weights(layer, expert, out_dtype)):
                    yield ffn_name(self.args, layer, expert, part), w

    def offsets(self, keys) -> dict[str, tuple[int, int]]:
        """key -> (offset in data.mdb, length) of each record: the manifest's, written with the
        store; else looked up through LMDB's map, which pages in every record it is asked for
        (python-lmdb's get touches the whole value: ~9 s for the 0.7 GB 1B shape, cold)."""
        known = self.manifest.get("offsets")
        if known is None:
            if self.env is None:  # let go of by a reader; map it again
                self.env = _open_env(self.path / "lmdb", self.readahead)
            return record_offsets(self.env, self.path / "lmdb" / "data.mdb", keys)
        try:
            return {k: (int(known[k]), self.records[k][0]) for k in keys}
        except KeyError as e:
            raise StoreError(f"{self.path}: record {e.args[0]} is missing") from None

    @property
    def weight_bytes(self) -> int:
        return self.manifest["weight_bytes"]

    def side_files(self) -> dict[str, bytes]:
        """Every file next to the manifest (tokenizer.json, ...), checked against it."""
        return integrity.read_side_files(self.path, self.manifest)

    def close(self):
        self.env = None  # shared environments close when their last Store lets go


class _Env:
    """One LMDB environment shared by every Store on the same files: LMDB refuses to open an
    environment twice in one process. Closed when the last Store lets go of it."""

    def __init__(self, env):
        self._env = env

    def __getattr__(self, name):
        return getattr(self._env, name)

    def close(self):  # a Store done with reading; the environment closes when unreferenced
        pass

    def __del__(self):
        self._env.close()


_ENVS: "weakref.WeakValueDictionary[tuple, _Env]" = weakref.WeakValueDictionary()


def _open_env(path: Path, readahead: bool) -> _Env:
    try:
        # not keyed by readahead (a hint): LMDB cannot open the same files twice in a process
        key = (str(path.resolve()), (path / "data.mdb").stat().st_ino)
    except FileNotFoundError:
        raise StoreError(f"{path.parent}: LMDB data is missing") from None
    env = _ENVS.get(key)
    if env is None:
        try:
            env = _Env(lmdb.open(str(path), readonly=True, lock=False, readahead=readahead,
                                 max_readers=256))
        except lmdb.Error as e:
            raise StoreError(f"{path.parent}: cannot open the LMDB environment ({e})") from None
        _ENVS[key] = env
    return env


def record_offsets(env, data: Path, keys) -> dict[str, tuple[int, int]]:
    """key -> (file offset, length) of each record, from LMDB's mapping of `data` (data.mdb)."""
    base = _map_base(env, data)
    out = {}
    try:
        with env.begin(buffers=True) as txn:
            for key in keys:
                mv = txn.get(key.encode())
                if mv is None:
                    raise StoreError(f"{data.parent.parent}: record {key} is missing")
                addr = np.frombuffer(mv, dtype=np.uint8).ctypes.data if len(mv) else base
                out[key] = (addr - base, len(mv))
    except lmdb.Error as e:
        raise StoreError(f"{data.parent.parent}: LMDB data is corrupt ({e})") from None
    return out


def _map_base(env, data: Path) -> int:
    path = str(data.resolve())
    with env.begin():  # make sure the map exists
        pass
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[5] == path and int(parts[2], 16) == 0:
            return int(parts[0].split("-")[0], 16)
    raise StoreError(f"{data}: cannot locate the LMDB mapping (Linux /proc is needed)")


def side_files(path, names=TOKENIZER_FILES) -> dict[str, bytes]:
    """A store's side files checked against its manifest; an HF directory's as they are."""
    path = Path(path)
    return integrity.read_side_files(path, _read_manifest(path) if is_store(path) else None,
                                     names)


def ffn_name(args: ModelArgs, layer: int, expert: int, part: str) -> str:
    if args.is_moe:
        return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{part}.weight"
    return f"model.layers.{layer}.mlp.{part}.weight"


def _read_manifest(path: Path) -> dict:
    if not path.exists():
        raise StoreError(f"{path}: no such store")
    if not (path / MANIFEST).exists() and (path / "lmdb").is_dir():
        raise StoreError(f"{path}: the store's {MANIFEST} is missing (an incomplete copy?)")
    m = load_json_object(path / MANIFEST, "tiercache store manifest", StoreError)
    if m.get("format") != FORMAT:
        raise StoreError(f"{path}: not a tiercache store (foreign manifest)")
    if m.get("format_version") != FORMAT_VERSION:
        raise StoreError(f"{path}: store format version {m.get('format_version')} is not "
                         f"supported (this tiercache reads version {FORMAT_VERSION}); reconvert it")
    integrity.check_manifest(path, m)  # after the version: another version may seal otherwise
    return m


@contextmanager
def writing(out: Path):
    """OS and LMDB errors while writing the store at `out` -> one line naming it and why."""
    try:
        yield
    except OSError as e:
        raise StoreError(f"{out}: cannot write the store ({e.strerror or e})") from None
    except lmdb.Error as e:
        raise StoreError(f"{out}: cannot write the store ({e})") from None


class StoreWriter:
    """Writes a store into a temporary sibling directory; `commit` renames it into place."""

    def __init__(self, out, args: ModelArgs, dtype: str, cluster_size: int, map_size: int):
        self.out = Path(out)
        for note in integrity.sweep(self.out):  # what a killed writer of the same store left
            warn(note)
        self.tmp = integrity.work_dir(self.out, "tmp", uuid.uuid4().hex[:8])
        with writing(self.out):
            self.tmp.mkdir(parents=True)
        self.args, self.dtype, self.cluster_size = args, dtype, cluster_size
        self.env = None
        with writing(self.out):
            try:
                self.env = lmdb.open(str(self.tmp / "lmdb"), map_size=map_size, subdir=True,
                                     sync=False, writemap=False)
            except BaseException:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise
        self.records: dict[str, list[int]] = {}
        self.tensors: dict[str, dict] = {}
        self.q4k_zeros = False  # whether any q4k record has a zero other than 0
        self.store_id = uuid.uuid4().hex
        self._put(b"meta:store_id", self.store_id.encode(), record=False)

    def _put(self, key: bytes, value: bytes, record: bool = True):
        with writing(self.out), self.env.begin(write=True) as txn:
            txn.put(key, value)
        if record:
            self.records[key.decode()] = [len(value), zlib.crc32(value)]

    def put_tensor(self, name: str, w: torch.Tensor, dtype: str | None = None):
        from . import quant
        dtype = tensor_dtype(name, tuple(w.shape), dtype or self.dtype)
        self._put(tensor_key(name), self._note(quant.encode(w, dtype), tuple(w.shape), dtype))
        self.tensors[name] = {"shape": list(w.shape), "dtype": dtype}

    def _note(self, blob: bytes, shape: tuple, dtype: str) -> bytes:
        if dtype == "q4k" and not self.q4k_zeros:
            self.q4k_zeros = dtypes.q4k_zeros(blob, shape)
        return blob

    def put_record(self, key: bytes, blob: bytes):
        """A record outside the tensor index (activation predictors), crc-checked like all."""
        self._put(key, blob)

    def put_raw(self, name: str, blob: bytes, meta: dict):
        """Copy an already encoded tensor record (no re-quantization)."""
        self._put(tensor_key(name), self._note(blob, tuple(meta["shape"]), meta["dtype"]))
        self.tensors[name] = dict(meta)

    def put_ffn(self, layer: int, expert: int, gate, up, down):
        """gate/up [F, d], down [d, F] in HF shapes -> clusters of neuron bundles."""
        from . import quant
        for c, lo in enumerate(range(0, gate.shape[0], self.cluster_size)):
            hi = lo + self.cluster_size
            parts = (gate[lo:hi], up[lo:hi], down[:, lo:hi])
            self._put(cluster_key(layer, expert, c),
                      b"".join(self._note(quant.encode(p, self.ffn_dtype), tuple(p.shape),
                                          self.ffn_dtype) for p in parts))

    @property
    def ffn_dtype(self) -> str:
        return ffn_dtype(self.args, self.dtype, self.cluster_size)

    def commit(self, extra: dict, files: dict[str, bytes], force: bool = False) -> Path:
        with writing(self.out):
            self.env.sync(True)
            self.env.close()
            return self._commit(extra, files, force)

    def _commit(self, extra: dict, files: dict[str, bytes], force: bool) -> Path:
        f = self.args.intermediate_size
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "store_id": self.store_id,
            "config": self.args.to_dict(), "dtype": self.dtype,
            "quantization": ({"scheme": self.dtype, "group_size": dtypes.GROUP,
                              **({"q4k_zeros": self.q4k_zeros} if self.dtype == "q4" else {})}
                             if self.dtype in ("q8", "q4") else None),
            "ffn": {"cluster_size": self.cluster_size,
                    "n_clusters": -(-f // self.cluster_size), "dtype": self.ffn_dtype,
                    "layers": self.args.num_hidden_layers, "experts": self.args.n_experts,
                    "intermediate_size": f, "hidden_size": self.args.hidden_size},
            "tensors": self.tensors,
            "weight_bytes": sum(n for n, _ in self.records.values()),
            "records": self.records, **extra,
            "files": integrity.file_sums(files),
        }
        offsets = self._offsets()
        manifest["lmdb"] = integrity.lmdb_facts(self.tmp / "lmdb" / "data.mdb", offsets)
        manifest["offsets"] = {k: off for k, (off, _) in offsets.items()}
        for name, data in files.items():
            (self.tmp / name).write_bytes(data)
        # written last: a manifest that reads whole marks a complete store (integrity.sweep)
        (self.tmp / MANIFEST).write_text(json.dumps(integrity.seal(manifest), indent=1))
        return _swap_into_place(self.tmp, self.out, force)

    def _offsets(self) -> dict[str, tuple[int, int]]:
        data = self.tmp / "lmdb" / "data.mdb"
        env = lmdb.open(str(data.parent), readonly=True, lock=False)
        try:
            return record_offsets(env, data, self.records)
        finally:
            env.close()

    def abort(self):
        try:
            if self.env is not None:
                self.env.close()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


def tensor_dtype(name: str, shape: tuple, dtype: str) -> str:
    """The dtype a store of `dtype` keeps a non-FFN tensor in (store format 3)."""
    if dtype in ("q8", "q4") and not (dtypes.can_quantize(shape) and _is_matrix(name)):
        return "f16" if len(shape) == 2 else "f32"  # norms, biases, odd shapes stay exact-ish
    if dtype == "q4" and name in HEAD_TENSORS:
        return "q8r"  # 8 bits as llama.cpp's Q4 files keep them: 4-bit logits cost too much
    if dtype == "q4" and _is_attention(name) and shape[0] % 64 == 0:
        return "q4k"  # the int4 kernel's layout: used, pinned or streamed, as read
    return dtype


def ffn_dtype(args: ModelArgs, dtype: str, cluster_size: int) -> str:
    """The dtype of a store's FFN cluster records: q8/q4 need groups of 32 along d (gate, up)
    and along each cluster (down); q4 takes the int4 kernel's own layout (q4k) when clusters
    are whole blocks of 64 neurons."""
    a, n = args, cluster_size
    ok = (a.hidden_size % dtypes.GROUP == 0 and n % dtypes.GROUP == 0
          and a.intermediate_size % dtypes.GROUP == 0)
    if dtype not in ("q8", "q4"):
        return dtype
    if not ok:
        return "f16"
    kernel = n % 64 == 0 and a.hidden_size % 64 == 0 and a.intermediate_size % n == 0
    return "q4k" if dtype == "q4" and kernel else dtype


def _is_attention(name: str) -> bool:
    return ".self_attn." in name and name.endswith("_proj.weight")


def _is_matrix(name: str) -> bool:
    return name.endswith(".weight") and "norm" not in name


def _swap_into_place(tmp: Path, out: Path, force: bool) -> Path:
    """Rename tmp to out; with force an existing store at out is moved aside first and removed
    after. A writer killed in between leaves both named for `integrity.sweep` to finish."""
    old = None
    if out.exists() or out.is_symlink():
        if not force or not is_store(out):
            shutil.rmtree(tmp, ignore_errors=True)
            raise StoreError(f"{out} already exists (use --force to overwrite)" if not force
                             else f"{out} exists and is not a tiercache store; not replacing it")
        old = integrity.work_dir(out, "old", uuid.uuid4().hex[:8])
        os.rename(out, old)
        os.utime(old)  # its mtime tells `sweep` this process put it aside (not a reused pid)
    try:
        os.rename(tmp, out)
    except OSError:
        if old is not None:
            os.rename(old, out)  # lose nothing: the old store goes back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out
