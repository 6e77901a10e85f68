"""Read a GGUF file (llama.cpp's format) as an HF config, HF-named float32 tensors, tokenizer files.

GGUF stores matrices with ggml's reversed dims; the `gguf` reader already gives numpy arrays in
HF order ([out, in]). llama.cpp's converter permutes the q/k rows of Llama-architecture models
(interleaved rotary halves), which `weights()` undoes so the tensors equal the HF checkpoint's.
"""
from __future__ import annotations

import json
import math
import re
import struct
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..config import ModelArgs
from ..errors import TiercacheError, UnsupportedModel

# general.architecture -> (HF model_type, HF architecture, q/k rows permuted by llama.cpp)
ARCHS = {
    "llama": ("llama", "LlamaForCausalLM", True),
    "mistral": ("mistral", "MistralForCausalLM", True),
    "qwen2": ("qwen2", "Qwen2ForCausalLM", False),
}

# GGUF tensor names -> HF names; per-layer ones are under blk.{i}. / model.layers.{i}.
TOP_LEVEL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
             "output": "lm_head"}
PER_LAYER = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "block_sparse_moe.gate",
}
# stacked expert tensors [n_expert, ...] -> Mixtral's per-expert HF names
EXPERTS = {"ffn_gate_exps": "w1", "ffn_down_exps": "w2", "ffn_up_exps": "w3"}
LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")
# tokenizer.ggml.pre values for which llama.cpp splits off every digit ("\p{N}") before GPT-2's
# regex, as the original HF tokenizers do (Digits(individual_digits)); transformers 5.x does not.
DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                   "minerva-7b"}
# what the gguf package and numpy raise on a damaged header or tensor table
PARSE_ERRORS = (ValueError, IndexError, KeyError, TypeError, ArithmeticError, MemoryError,
                UnicodeDecodeError, struct.error, OSError)


class GGUFSource:
    """A GGUF file seen as an HF checkpoint: `config`, `weights()`, `tokenizer_files()`."""

    def __init__(self, path):
        self.path = Path(path)
        self.reader = _open_reader(self.path)
        try:
            self._read_header()
        except PARSE_ERRORS as e:
            raise TiercacheError(f"{self.path}: corrupt GGUF metadata ({_why(e)})") from None

    def _read_header(self) -> None:
        self.arch = self._str("general.architecture")
        if self.arch not in ARCHS:
            raise UnsupportedModel(
                f"{self.path.name}: unsupported GGUF architecture '{self.arch}' "
                f"(tiercache reads: {', '.join(sorted(ARCHS))})")
        self.tensors = {t.name: t for t in self.reader.tensors}
        unknown = [n for n in self.tensors if n != "rope_freqs.weight" and _split_name(n) is None]
        if unknown:  # fail before a conversion starts, not halfway through it
            raise UnsupportedModel(f"{self.path.name}: unknown tensors {', '.join(unknown[:3])}"
                                   + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""))
        self.config = self._build_config()
        try:
            ModelArgs.from_dict(self.config)
        except TiercacheError as e:
            raise type(e)(f"{self.path.name}: {e}") from None

    # -- metadata -----------------------------------------------------------------------------
    def meta(self, key: str, default=None):
        field = self.reader.fields.get(key)
        return default if field is None else _field_value(field)

    def _str(self, key: str) -> str | None:
        v = self.meta(key)
        return v if isinstance(v, str) else None

    def _arch(self, key: str, default=None):
        return self.meta(f"{self.arch}.{key}", default)

    def _build_config(self) -> dict:
        shapes = {n: tuple(int(x) for x in t.shape) for n, t in self.tensors.items()}
        cfg = hf_config(self.arch, self.meta, shapes, self.path.name)
        scaling = self._rope_scaling(cfg["head_dim"], cfg["rope_theta"])
        if scaling:
            cfg["rope_scaling"] = scaling
        return cfg

    def _rope_scaling(self, head_dim: int, theta: float) -> dict | None:
        if "rope_freqs.weight" in self.tensors:  # Llama 3.1+: per-frequency divisors as a tensor
            freqs = _dequant(self.tensors["rope_freqs.weight"]).reshape(-1)
            return _llama3_scaling(freqs, head_dim, theta, self.path.name)
        kind = self._arch("rope.scaling.type")
        if kind in (None, "none"):
            return None
        factor = float(self._arch("rope.scaling.factor", 1.0))
        if kind == "linear":
            return {"rope_type": "linear", "factor": factor}
        if kind == "yarn":
            return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings":
                    self._arch("rope.scaling.original_context_length")}
        raise UnsupportedModel(f"{self.path.name}: unsupported rope scaling '{kind}'")

    # -- weights ------------------------------------------------------------------------------
    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, float32 tensor in HF shape), one tensor at a time in file order."""
        for t in self.reader.tensors:
            if t.name == "rope_freqs.weight":
                continue  # folded into config["rope_scaling"]
            try:
                pairs = list(self._to_hf(t.name, _dequant(t)))
            except PARSE_ERRORS as e:
                raise TiercacheError(
                    f"{self.path}: corrupt GGUF tensor {t.name} ({_why(e)})") from None
            for name, w in pairs:
                yield name, torch.from_numpy(w)

    def count(self) -> int:
        """How many tensors weights() yields (a progress bar's total)."""
        return sum(int(t.shape[-1]) if _split_name(t.name)[1] in EXPERTS else 1
                   for t in self.reader.tensors if t.name != "rope_freqs.weight")

    def _to_hf(self, gguf_name: str, w: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
        _, part, _ = _split_name(gguf_name)
        names = hf_names(gguf_name, w.shape[0] if part in EXPERTS else 1)
        if part in EXPERTS:  # [n_expert, out, in] -> one HF tensor per expert
            yield from ((name, w[e]) for e, name in enumerate(names))
        else:
            yield names[0], self._unpermute(part, w)

    def _unpermute(self, part: str, w: np.ndarray) -> np.ndarray:
        if not ARCHS[self.arch][2] or part not in ("attn_q", "attn_k"):
            return w
        heads = self.config["num_attention_heads" if part == "attn_q" else "num_key_value_heads"]
        return unpermute_qk(w, heads)

    # -- tokenizer ----------------------------------------------------------------------------
    def tokenizer_files(self) -> dict[str, bytes]:
        """tokenizer.json, tokenizer_config.json (with chat_template), special_tokens_map.json,
        generation_config.json, built from the GGUF vocabulary by transformers' converter."""
        saved = self._transformers_tokenizer_files()
        tok_cfg = json.loads(saved.get("tokenizer_config.json", b"{}"))
        tok_cfg.update(self._special_tokens())
        template = self._str("tokenizer.chat_template")
        if template:
            tok_cfg["chat_template"] = template
        for key in ("gguf_file", "is_local", "local_files_only", "backend"):
            tok_cfg.pop(key, None)  # loading details of this run, not of the tokenizer
        # transformers 5 writes "TokenizersBackend", which 4.x cannot load; both read this one
        tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        tok_cfg["model_max_length"] = self.config["max_position_embeddings"]
        files = {"tokenizer.json": self._fix_pre_tokenizer(saved["tokenizer.json"]),
                 "tokenizer_config.json": _json(tok_cfg),
                 "generation_config.json": _json(self._generation_config())}
        if "special_tokens_map.json" in saved:
            files["special_tokens_map.json"] = saved["special_tokens_map.json"]
        return files

    def _transformers_tokenizer_files(self) -> dict[str, bytes]:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
        except (NotImplementedError, *PARSE_ERRORS) as e:
            raise UnsupportedModel(
                f"{self.path.name}: cannot build its tokenizer ({_why(e)})") from None
        with tempfile.TemporaryDirectory(prefix="tiercache-tok-") as tmp:
            tok.save_pretrained(tmp)
            return {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}

    def _fix_pre_tokenizer(self, tokenizer_json: bytes) -> bytes:
        """Split digits one by one where llama.cpp does; without it "a  1" encodes as
        a|Ġ|Ġ|1 instead of a|ĠĠ|1 (30 of 7.6k tokens differ on ordinary text)."""
        tj = json.loads(tokenizer_json)
        pre = tj.get("pre_tokenizer") or {}
        if self._str("tokenizer.ggml.pre") not in DIGIT_SPLIT_PRE or pre.get("type") != "ByteLevel":
            return tokenizer_json
        digits = {"type": "Digits", "individual_digits": True}
        tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [digits, pre]}
        return json.dumps(tj, ensure_ascii=False).encode()

    def _token(self, key: str) -> str | None:
        i = self.meta(key)
        tokens = self.reader.fields.get("tokenizer.ggml.tokens")
        if i is None or tokens is None or i >= len(tokens.data):
            return None
        return bytes(tokens.parts[tokens.data[i]]).decode("utf-8", errors="replace")

    def _special_tokens(self) -> dict:
        out = {}
        for role in ("bos", "eos", "unk", "pad"):
            tok = self._token(f"tokenizer.ggml.{role}_token_id")
            if tok is not None:
                out[f"{role}_token"] = tok
        for flag in ("add_bos_token", "add_eos_token"):
            v = self.meta(f"tokenizer.ggml.{flag}")
            if v is not None:
                out[flag] = bool(v)
        return out

    def _generation_config(self) -> dict:
        gen = {"bos_token_id": self.config["bos_token_id"],
               "eos_token_id": self.config["eos_token_id"]}
        pad = self.meta("tokenizer.ggml.padding_token_id")
        if pad is not None:
            gen["pad_token_id"] = pad
        return {k: v for k, v in gen.items() if v is not None}


def hf_config(arch: str, meta, shapes: dict, where: str) -> dict:
    """The HF config of a GGUF file from its metadata (`meta(key, default)`) and its tensors'
    shapes in ggml order ({GGUF name: (ne0, ne1, ...)}), rope scaling aside (it may need a
    tensor's data). GGUFSource and the planner's estimate both read a GGUF file so."""
    if arch not in ARCHS:
        raise UnsupportedModel(f"{where}: unsupported GGUF architecture '{arch}' "
                               f"(tiercache reads: {', '.join(sorted(ARCHS))})")
    model_type, hf_arch, _ = ARCHS[arch]

    def get(key, default=None):
        return meta(f"{arch}.{key}", default)
    hidden, heads = get("embedding_length"), get("attention.head_count")
    if hidden is None or heads is None or "token_embd.weight" not in shapes:
        raise UnsupportedModel(f"{where}: GGUF lacks the {arch} dimensions")
    head_dim = get("attention.key_length", hidden // heads)
    if get("rope.dimension_count", head_dim) != head_dim:
        raise UnsupportedModel(f"{where}: partial rotary embeddings are not supported")
    n_experts = get("expert_count", 0) or 0
    cfg = {
        "model_type": "mixtral" if n_experts else model_type,
        "architectures": ["MixtralForCausalLM" if n_experts else hf_arch],
        "hidden_size": hidden,
        "num_hidden_layers": get("block_count"),
        "intermediate_size": get("expert_feed_forward_length") or get("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "vocab_size": int(shapes["token_embd.weight"][-1]),  # ggml: [d, vocab]
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": get("context_length", 4096),
        "tie_word_embeddings": "output.weight" not in shapes,
        "hidden_act": "silu",
        "bos_token_id": meta("tokenizer.ggml.bos_token_id", None),
        "eos_token_id": _stop_ids(meta),
    }
    if n_experts:
        cfg["num_local_experts"] = n_experts
        cfg["num_experts_per_tok"] = get("expert_used_count")
    return cfg


def _stop_ids(meta) -> int | list[int] | None:
    """eos plus end-of-turn/-message ids (Llama 3 chat ends turns with eot, not eos)."""
    ids = [meta(f"tokenizer.ggml.{k}_token_id", None) for k in ("eos", "eot", "eom")]
    ids = list(dict.fromkeys(i for i in ids if i is not None))
    return ids[0] if len(ids) == 1 else (ids or None)


def hf_names(gguf_name: str, experts: int = 1) -> list[str]:
    """The HF names a GGUF tensor becomes: one, or one per expert for stacked experts
    (`experts` of them); [] for a tensor with no HF counterpart (rope_freqs: in the config)
    or an unknown one."""
    split = _split_name(gguf_name)
    if split is None:
        return []
    prefix, part, kind = split
    if part in TOP_LEVEL:
        return [f"{TOP_LEVEL[part]}.{kind}"]
    if part in EXPERTS:
        return [f"{prefix}block_sparse_moe.experts.{e}.{EXPERTS[part]}.{kind}"
                for e in range(experts)]
    return [f"{prefix}{PER_LAYER[part]}.{kind}"]


def _split_name(gguf_name: str) -> tuple[str, str, str] | None:
    """"blk.3.attn_q.weight" -> ("model.layers.3.", "attn_q", "weight"); None if unknown."""
    stem, _, kind = gguf_name.rpartition(".")
    if stem in TOP_LEVEL and kind in ("weight", "bias"):
        return "", stem, kind
    m = LAYER_RE.match(gguf_name)
    if m is None or (m[2] not in PER_LAYER and m[2] not in EXPERTS):
        return None
    return f"model.layers.{int(m[1])}.", m[2], m[3]


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Invert convert_hf_to_gguf's permute: rows (head, half, i) were stored as (head, i, half)."""
    rows = w.shape[0]
    return (w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's permute (for building test files): interleave the two rotary halves."""
    rows = w.shape[0]
    return (w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _open_reader(path: Path):
    if not path.is_file():
        raise TiercacheError(f"{path}: no such GGUF file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise TiercacheError(f"{path}: not a GGUF file (magic {magic!r})")
    from gguf import GGUFReader

    try:
        return GGUFReader(path, "r")
    except PARSE_ERRORS as e:
        raise TiercacheError(f"{path}: corrupt GGUF file ({_why(e)})") from None


def _why(e: Exception) -> str:
    msg = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {msg[:120]}" if msg else type(e).__name__


def shortest_f32(v) -> float:
    """A float32 metadata value as the shortest float32 repr: 1e-05, not 9.99999974e-06."""
    return float(str(np.float32(v)))


def _field_value(field):
    """A metadata value as a Python str/int/float/bool or list of them."""
    from gguf import GGUFValueType

    def scalar(part, vtype):
        if vtype == GGUFValueType.STRING:
            return bytes(part).decode("utf-8", errors="replace")
        if part.dtype == np.float32:
            return shortest_f32(part[0])
        return part[0].item()

    if field.types[0] == GGUFValueType.ARRAY:
        return [scalar(field.parts[i], field.types[-1]) for i in field.data]
    return scalar(field.parts[field.data[0]], field.types[0])


def _dequant(t) -> np.ndarray:
    """float32 array in HF order (ggml's dims reversed), owned and writable for torch."""
    from gguf.quants import dequantize

    w = dequantize(t.data, t.tensor_type)
    shape = tuple(int(d) for d in reversed(t.shape))
    w = np.asarray(w, dtype=np.float32).reshape(shape)
    return w if w.flags.writeable and w.flags.c_contiguous else np.array(w)  # memmap -> copy


def _llama3_scaling(freqs: np.ndarray, head_dim: int, theta: float, name: str) -> dict:
    """Recover Llama 3.1's rope_scaling from llama.cpp's rope_freqs tensor (it stores the
    per-frequency divisors), checking the standard low/high factors and original context."""
    factor = float(freqs.max())
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if freqs.shape != inv.shape or not np.allclose(_llama3_divisors(inv, scaling), freqs,
                                                   rtol=1e-3):
        raise UnsupportedModel(f"{name}: rope_freqs does not match Llama 3 rope scaling")
    return scaling


def _llama3_divisors(inv_freq: np.ndarray, s: dict) -> np.ndarray:
    old = s["original_max_position_embeddings"]
    lo, hi = s["low_freq_factor"], s["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    smooth = np.clip((old / wavelen - lo) / (hi - lo), 0.0, 1.0)
    return 1.0 / ((1 - smooth) / s["factor"] + smooth)


def _json(d: dict) -> bytes:
    return (json.dumps(d, indent=2, ensure_ascii=False) + "\n").encode()
