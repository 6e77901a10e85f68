"""Tiny random HF models built in code, converted once per session."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

# The suite's own home (downloads and converted stores), never the user's ~/.cache: set before
# any test runs so that subprocesses inherit it. Kept between runs, under the temp directory.
os.environ["TIERCACHE_HOME"] = str(Path(tempfile.gettempdir()) / "tiercache-test-home")


def pytest_report_header(config):
    """Which CPU kernels this run checks: the int4 layout differs between CPUs."""
    from tiercache.engine.kernels import cpu_capability
    return f"tiercache: torch CPU capability {cpu_capability()}, TIERCACHE_HOME={os.environ['TIERCACHE_HOME']}"

VOCAB = 256
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_config(kind: str):
    import transformers as T
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=1,
                  eos_token_id=2)
    if kind == "llama":
        return T.LlamaConfig(intermediate_size=160, tie_word_embeddings=True, **common)
    if kind == "llama3":  # llama3 rope scaling, untied head
        return T.LlamaConfig(intermediate_size=128, rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}, **common)
    if kind == "qwen2":
        return T.Qwen2Config(intermediate_size=160, **common)
    if kind == "mixtral":
        return T.MixtralConfig(intermediate_size=96, num_local_experts=4, num_experts_per_tok=2,
                               **common)
    raise ValueError(kind)


def write_tokenizer(path: Path) -> None:
    """A byte-level BPE with no merges over 256 ids, plus chat special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    alphabet = ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet)[: VOCAB - 3])}
    for i, t in enumerate(("<|im_start|>", "<|im_end|>", "<|endoftext|>")):
        vocab[t] = VOCAB - 3 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": CHAT_TEMPLATE, "eos_token": "<|im_end|>", "bos_token": None}))


def build_hf(kind: str, path: Path, seed: int = 0):
    return save_random(tiny_config(kind), path, seed)


def save_random(cfg, path: Path, seed: int = 0):
    """An HF model of `cfg` with random weights, saved to path with the test tokenizer."""
    import transformers as T
    torch.manual_seed(seed)
    cls = getattr(T, type(cfg).__name__.replace("Config", "ForCausalLM"))
    model = cls(cfg).eval()
    with torch.no_grad():  # larger weights than HF's init so that logits are well separated
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(path)
    write_tokenizer(path)
    return model


def build_sparse_relu(path: Path, seed: int = 0, hot: float = 0.15):
    """A tiny ReLU Llama whose FFNs are sparse the way ReLU-family models are: a constant
    direction in the embeddings meets a negative weight in most gate rows (cold neurons,
    rarely active) and a positive one in a few (hot, nearly always active). ~6-35% of
    neurons active per layer; after a hot -> cold reorder, 12-55% of 16-neuron clusters."""
    import transformers as T
    torch.manual_seed(seed)
    cfg = T.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=256,
                        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                        hidden_act="relu", max_position_embeddings=256,
                        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    model = T.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.08)
        model.model.embed_tokens.weight[:, 0] = 0.8
        for layer in model.model.layers:
            w = torch.full((cfg.intermediate_size,), -0.4)
            w[torch.randperm(cfg.intermediate_size)[:int(hot * cfg.intermediate_size)]] = 0.1
            layer.mlp.gate_proj.weight[:, 0] = w
    model.save_pretrained(path)
    write_tokenizer(path)
    return model


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """kind -> (hf model, hf dir)."""
    root = tmp_path_factory.mktemp("hf")
    return {k: (build_hf(k, root / k), root / k) for k in ("llama", "llama3", "qwen2", "mixtral")}


@pytest.fixture(scope="session")
def stores(hf_models, tmp_path_factory):
    """(kind, dtype) -> store path, converted lazily."""
    from tiercache.store.convert import convert
    root, made = tmp_path_factory.mktemp("stores"), {}

    def get(kind: str, dtype: str = "f32", cluster_size: int = 32) -> Path:
        key = (kind, dtype, cluster_size)
        if key not in made:
            made[key] = convert(hf_models[kind][1], root / f"{kind}-{dtype}-{cluster_size}",
                                dtype=dtype, cluster_size=cluster_size, progress=False)
        return made[key]
    return get
