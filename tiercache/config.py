"""Model configuration, keyed like HF config.json."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import TiercacheError, UnsupportedModel

# model_type -> family the engine runs; Llama-shaped decoders differ only in flags.
SUPPORTED = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "smollm": "llama",
             "smollm2": "llama", "mixtral": "mixtral"}
SIZES = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
         "vocab_size", "num_key_value_heads", "head_dim", "max_position_embeddings")
LARGEST = 1 << 24  # no real model has a dimension near this; a corrupt config may


@dataclass
class ModelArgs:
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    num_local_experts: int = 0
    num_experts_per_tok: int = 0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    architectures: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.model_type == "qwen2":
            self.attention_bias = True  # Qwen2 has q/k/v biases but no config flag for them
        self._check()
        if self.hidden_act not in ("silu", "relu", "gelu", "gelu_pytorch_tanh", "relu2"):
            raise UnsupportedModel(f"unsupported activation '{self.hidden_act}'")

    def _check(self) -> None:
        """Types and ranges of a config read from a file: one line naming the bad key."""
        for k in SIZES:
            _want(k, getattr(self, k), _is_int(getattr(self, k), 1), "a positive integer")
        for k in ("num_local_experts", "num_experts_per_tok"):
            _want(k, getattr(self, k), _is_int(getattr(self, k), 0), "an integer >= 0")
        for k in ("rms_norm_eps", "rope_theta"):
            v = getattr(self, k)
            _want(k, v, isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1e30,
                  "a positive number")
        _want("num_key_value_heads", self.num_key_value_heads,
              self.num_attention_heads % self.num_key_value_heads == 0,
              f"a divisor of num_attention_heads ({self.num_attention_heads})")
        _want("head_dim", self.head_dim, self.head_dim % 2 == 0, "even (rotary halves)")
        _want("num_experts_per_tok", self.num_experts_per_tok,
              self.num_experts_per_tok <= self.num_local_experts
              and (self.num_local_experts == 0 or self.num_experts_per_tok > 0),
              f"1..num_local_experts ({self.num_local_experts})")
        for k in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
            _want(k, getattr(self, k), isinstance(getattr(self, k), bool), "true or false")
        _want("hidden_act", self.hidden_act, isinstance(self.hidden_act, str), "a string")
        _want("bos_token_id", self.bos_token_id, self.bos_token_id is None
              or _is_int(self.bos_token_id, 0), "a token id")
        e = self.eos_token_id
        _want("eos_token_id", e, e is None or _is_int(e, 0) or (
            isinstance(e, list) and all(_is_int(i, 0) for i in e)), "a token id or a list of them")
        if self.rope_scaling is not None:
            _check_rope_scaling(self.rope_scaling)

    @property
    def family(self) -> str:
        return SUPPORTED[self.model_type]

    @property
    def is_moe(self) -> bool:
        return self.num_local_experts > 0

    @property
    def n_experts(self) -> int:
        """FFN blocks per layer: 1 for a dense model."""
        return max(1, self.num_local_experts)

    @property
    def eos_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else ([e] if isinstance(e, int) else list(e))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelArgs":
        if "model_type" not in d:
            raise UnsupportedModel("config has no model_type")
        if not isinstance(d["model_type"], str) or d["model_type"] not in SUPPORTED:
            raise UnsupportedModel(f"unsupported architecture '{d['model_type']}' "
                                   f"(tiercache runs: {', '.join(sorted(SUPPORTED))})")
        d = dict(d)
        rope = d.pop("rope_parameters", None)  # transformers 5 folds theta and scaling together
        if isinstance(rope, dict):
            d.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
            if rope.get("rope_type", "default") != "default":
                d.setdefault("rope_scaling", rope)
        fields = dataclasses.fields(cls)
        required = [f.name for f in fields if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING]
        absent = [k for k in required if d.get(k) is None]
        if absent:
            raise UnsupportedModel(f"config lacks {', '.join(absent)}")
        names = {f.name for f in fields}
        return cls(**{k: v for k, v in d.items() if k in names and v is not None})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _is_int(v, least: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and least <= v < LARGEST


def _want(key: str, value, ok: bool, what: str) -> None:
    if not ok:
        raise TiercacheError(f"config: {key} must be {what} (got {value!r:.40})")


def _check_rope_scaling(sc) -> None:
    _want("rope_scaling", sc, isinstance(sc, dict), "an object")
    kind = sc.get("rope_type", sc.get("type"))
    if kind in ("linear", "llama3"):
        f = sc.get("factor")
        _want("rope_scaling.factor", f, isinstance(f, (int, float)) and not isinstance(f, bool)
              and 0 < f < 1e6, "a positive number")
    if kind == "llama3":
        lo, hi = sc.get("low_freq_factor", 1.0), sc.get("high_freq_factor", 4.0)
        old = sc.get("original_max_position_embeddings", 8192)
        ok = all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0
                 for x in (lo, hi, old)) and hi > lo
        _want("rope_scaling", sc, ok, "llama3 scaling with 0 < low_freq_factor < "
              "high_freq_factor and a positive original_max_position_embeddings")
