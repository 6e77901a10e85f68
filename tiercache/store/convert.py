"""Convert an HF model directory or a GGUF file into a store (atomically, with a progress bar)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from tqdm import tqdm

from ..config import ModelArgs
from ..errors import StoreError, TiercacheError, load_json_object
from ..models.llama import Model, sanitize
from . import quant
from .format import CLUSTER_PREFIX, FFN_PARTS, TOKENIZER_FILES, StoreWriter, is_store

_FFN = re.compile(r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe\.experts\.(\d+))\.(\w+_proj)\.weight")


class HFSource:
    """An HF model directory: config.json plus one or more safetensors files."""

    def __init__(self, path: Path):
        self.path = path
        cfg = path / "config.json"
        if not cfg.is_file():
            raise TiercacheError(f"{path}: not an HF model directory (no config.json)")
        self.config = load_json_object(cfg, "model config (JSON object)")
        try:  # name an unsupported architecture or a bad value before anything else
            ModelArgs.from_dict(self.config)
        except TiercacheError as e:
            raise type(e)(f"{cfg}: {e}") from None
        self.files = self._shards()

    def _shards(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            wm = load_json_object(index, "safetensors index").get("weight_map")
            if not isinstance(wm, dict) or not all(isinstance(n, str) for n in wm.values()):
                raise TiercacheError(f"{index}: no weight_map of tensor -> file names")
            return [self.path / n for n in sorted(set(wm.values()))]
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise TiercacheError(f"{self.path}: no safetensors weights found")
        return files

    def count(self) -> int:
        try:
            return sum(len(safe_open(f, "pt").keys()) for f in self.files)
        except (OSError, ValueError) as e:  # what safetensors raises for a damaged header
            raise TiercacheError(f"cannot read safetensors ({e})") from None

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        for f in self.files:
            try:
                with safe_open(f, "pt") as st:
                    for k in st.keys():
                        yield k, st.get_tensor(k).float()
            except (OSError, ValueError) as e:  # safetensors raises these for damaged files
                raise TiercacheError(f"{f}: cannot read safetensors ({e})") from None

    def tokenizer_files(self) -> dict[str, bytes]:
        return {n: (self.path / n).read_bytes() for n in TOKENIZER_FILES
                if (self.path / n).is_file()}


def open_source(src) -> "HFSource":
    src = Path(src)
    if not src.exists():
        raise TiercacheError(f"{src}: no such file or directory")
    if src.is_dir():
        return HFSource(src)
    from .gguf import GGUFSource  # the gguf package is only needed for GGUF input
    return GGUFSource(src)


def convert(src, out, dtype: str = "f32", cluster_size: int = 32, force: bool = False,
            progress: bool = True) -> Path:
    """Write SRC (HF dir or .gguf) as a store at OUT; refuses to overwrite without force."""
    if dtype not in quant.DTYPES:
        raise TiercacheError(f"unknown dtype '{dtype}' (choose from {', '.join(quant.DTYPES)})")
    if cluster_size < 1:
        raise TiercacheError("cluster size must be at least 1")
    out = Path(out)
    if out.exists() and not force:
        raise StoreError(f"{out} already exists (use --force to overwrite)")
    if out.exists() and not is_store(out):  # --force replaces a store, never anything else
        raise StoreError(f"{out} exists and is not a tiercache store; not replacing it")
    source = open_source(src)
    args = ModelArgs.from_dict(source.config)
    if args.mlp_bias:
        raise TiercacheError("FFN biases (mlp_bias) are not supported")
    writer = StoreWriter(out, args, dtype, cluster_size, map_size=_map_size(args))
    try:
        _write_weights(writer, args, source, progress)
        extra = {"source": {"path": str(Path(src).resolve()), "kind": type(source).__name__}}
        return writer.commit(extra, source.tokenizer_files(), force=force)
    except BaseException:
        writer.abort()
        raise


def _write_weights(writer: StoreWriter, args: ModelArgs, source, progress: bool) -> None:
    pending: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    shapes = _shapes(args)
    bar = tqdm(total=getattr(source, "count", lambda: None)(), unit="tensor",
               desc="convert", disable=not progress)
    with bar:  # closed before an error is printed
        _write_stream(writer, args, source, bar, pending, shapes)
    _check_complete(writer, args, pending)


def _write_stream(writer: StoreWriter, args: ModelArgs, source, bar, pending, shapes) -> None:
    for name, w in source.weights():
        bar.update(1)
        name = sanitize(args, name)
        if name is None:
            continue
        if name in shapes and tuple(w.shape) != shapes[name]:
            raise StoreError(f"{source.path}: tensor {name} has shape {list(w.shape)} where "
                             f"the model's config says {list(shapes[name])}")
        m = _FFN.fullmatch(name)
        if m is None:
            writer.put_tensor(name, w)
            continue
        key = (int(m.group(1)), int(m.group(2) or 0))
        parts = pending.setdefault(key, {})
        parts[m.group(3)] = w
        if len(parts) == 3:  # a layer's (or expert's) FFN is complete: bundle and free it
            writer.put_ffn(*key, *(parts[p] for p in FFN_PARTS))
            del pending[key]


def _shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every parameter the config implies."""
    with torch.device("meta"):
        return {n: tuple(p.shape) for n, p in Model(args).named_parameters()}


def _check_complete(writer: StoreWriter, args: ModelArgs, pending) -> None:
    names = set(_shapes(args))
    ffn = {n for n in names if _FFN.fullmatch(n)}
    missing = sorted(names - ffn - set(writer.tensors))
    done = {k for k in writer.records if k.startswith(CLUSTER_PREFIX)}
    want = args.num_hidden_layers * args.n_experts * -(-args.intermediate_size // writer.cluster_size)
    if missing or pending or len(done) != want:
        first = missing[:3] or [f"FFN of layer/expert {k}" for k in list(pending)[:3]] or ["FFN weights"]
        raise StoreError(f"source is incomplete: missing {', '.join(first)}")


def _map_size(args: ModelArgs) -> int:
    d, f, L, v = args.hidden_size, args.intermediate_size, args.num_hidden_layers, args.vocab_size
    attn = d * args.head_dim * (2 * args.num_attention_heads + 2 * args.num_key_value_heads)
    params = 2 * v * d + L * (attn + 3 * d * f * args.n_experts + 4 * d)
    return int(params * 4 * 1.5) + (64 << 20)  # f32 worst case plus LMDB page overhead
