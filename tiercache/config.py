"""Model configuration, keyed like HF config.json."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import UnsupportedModel

# model_type -> family the engine runs; Llama-shaped decoders differ only in flags.
SUPPORTED = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "smollm": "llama",
             "smollm2": "llama", "mixtral": "mixtral"}


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
        if self.hidden_act not in ("silu", "relu", "gelu", "gelu_pytorch_tanh", "relu2"):
            raise UnsupportedModel(f"unsupported activation '{self.hidden_act}'")

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
        if d["model_type"] not in SUPPORTED:
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
