"""Store format: atomic writes, refusals, and bad input caught with one-line errors."""
import json
import subprocess
import sys

import pytest

from tiercache.engine import load_dense
from tiercache.errors import StoreError, TiercacheError, UnsupportedModel
from tiercache.store.convert import convert
from tiercache.store.format import Store


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "tiercache", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300)


def assert_one_line_error(r, *words):
    """Exit 1 with one `error:` line and no traceback (a first-use progress line such as
    "converting ... (once)" may come before it)."""
    assert r.returncode == 1, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and r.stderr.strip().endswith(lines[0]), r.stderr
    assert "Traceback" not in r.stderr
    for w in words:
        assert w in lines[0], lines[0]
    assert r.stdout == "", "no output may come from a failed run"


def test_layout_and_checksums(stores):
    s = Store(stores("llama", "q4"))
    m = s.manifest
    assert m["ffn"]["n_clusters"] == 5 and m["ffn"]["dtype"] == "q4"
    keys = sorted(k for k in m["records"] if k.startswith("f:0000:"))
    assert keys == [f"f:0000:000:{c:05d}" for c in range(5)]  # a layer is contiguous in key order
    assert m["weight_bytes"] == sum(n for n, _ in m["records"].values())
    assert (s.path / "tokenizer.json").is_file()


def test_refuses_overwrite_and_force_replaces(hf_models, tmp_path):
    out = convert(hf_models["llama"][1], tmp_path / "s", progress=False)
    first = Store(out).manifest["store_id"]
    with pytest.raises(StoreError, match="already exists"):
        convert(hf_models["llama"][1], out, progress=False)
    convert(hf_models["llama"][1], out, dtype="q8", force=True, progress=False)
    assert Store(out).manifest["store_id"] != first
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no temporary directories left


def test_failed_convert_leaves_nothing(hf_models, tmp_path):
    import shutil
    from safetensors.torch import load_file, save_file
    src = tmp_path / "src"
    shutil.copytree(hf_models["llama"][1], src)
    w = load_file(src / "model.safetensors")
    del w["model.layers.1.mlp.down_proj.weight"]
    save_file(w, src / "model.safetensors")
    with pytest.raises(StoreError, match="incomplete"):
        convert(src, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def _corrupt_a_cluster(store_path):
    s = Store(store_path)
    blob = s.cluster_bytes(1, 0, 2)
    data = store_path / "lmdb" / "data.mdb"
    raw = bytearray(data.read_bytes())
    at = raw.find(blob)
    assert at >= 0
    raw[at + len(blob) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))


def test_corrupt_record_is_detected(hf_models, tmp_path):
    out = convert(hf_models["llama"][1], tmp_path / "s", progress=False)
    _corrupt_a_cluster(out)
    with pytest.raises(StoreError, match="f:0001:000:00002 is corrupt"):
        load_dense(Store(out))
    r = run_cli("generate", out, "--prompt", "hi", "--max-tokens", "4")
    assert_one_line_error(r, "corrupt", "checksum")


def test_record_pieces_are_checked_at_the_end(hf_models, tmp_path):
    """read_chunks (how a resident head is written into its ORT graph, a piece at a time)
    gives the record's bytes in order and still refuses a damaged record after its last
    piece."""
    from tiercache.store.reader import RecordReader
    out = convert(hf_models["llama"][1], tmp_path / "s", progress=False)
    key = "f:0001:000:00002"
    whole = bytes(Store(out).cluster_bytes(1, 0, 2))
    reader = RecordReader(Store(out))
    pieces = [(lo, bytes(p.numpy())) for lo, p in reader.read_chunks(key, chunk=100)]
    assert [lo for lo, _ in pieces] == list(range(0, len(whole), 100))
    assert b"".join(p for _, p in pieces) == whole
    _corrupt_a_cluster(out)
    reader = RecordReader(Store(out))
    chunks = reader.read_chunks(key, chunk=100)
    next(chunks)  # the first piece comes before the whole record is checked
    with pytest.raises(StoreError, match=f"{key} is corrupt"):
        list(chunks)


def test_foreign_and_mismatched_stores(stores, tmp_path):
    import shutil
    a = tmp_path / "a"
    shutil.copytree(stores("llama"), a)
    from tiercache.store.integrity import seal
    m = json.loads((a / "manifest.json").read_text())
    m["store_id"] = "0" * 32
    (a / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match="manifest.json: corrupt"):  # its own checksum
        Store(a)
    (a / "manifest.json").write_text(json.dumps(seal(m)))
    with pytest.raises(StoreError, match="different stores"):
        Store(a)
    (a / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(StoreError, match="foreign"):
        Store(a)
    m["format_version"] = 99
    (a / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match="version 99"):
        Store(a)


def test_bad_inputs_give_one_line_errors(tmp_path):
    env = {**__import__("os").environ, "TIERCACHE_HOME": str(tmp_path / "home")}
    assert_one_line_error(run_cli("generate", tmp_path / "missing", "-p", "hi", env=env), "missing")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"this is not a model" * 10)
    assert_one_line_error(run_cli("convert", junk, "--out", tmp_path / "o"), "junk.gguf")
    assert_one_line_error(run_cli("generate", junk, "-p", "hi", env=env), "junk.gguf")
    hf = tmp_path / "gpt2"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64}))
    assert_one_line_error(run_cli("convert", hf, "--out", tmp_path / "o2"), "unsupported architecture 'gpt2'")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o2").exists()


def test_unknown_dtype_and_arch_messages(hf_models, tmp_path):
    with pytest.raises(TiercacheError, match="unknown dtype"):
        convert(hf_models["llama"][1], tmp_path / "x", dtype="q3")
    from tiercache.config import ModelArgs
    with pytest.raises(UnsupportedModel, match="'falcon'"):
        ModelArgs.from_dict({"model_type": "falcon"})


def test_manifest_offsets_are_lmdb_s(stores):
    """A store keeps each record's offset in data.mdb in its manifest (reads need not page
    every record in through LMDB's map to find them): the same as LMDB's own."""
    from tiercache.store.format import record_offsets
    s = Store(stores("llama", "q4", 64))
    keys = list(s.records)
    assert "offsets" in s.manifest
    assert s.offsets(keys) == record_offsets(s.env, s.path / "lmdb" / "data.mdb", keys)
