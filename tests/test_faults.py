"""Fault classes, one fast case each: a damaged store, tokenizer, manifest, GGUF header, config
or plan, an unwritable --out, what a killed writer leaves, and options out of range must end in
one clean line (exit 1 from the CLI), never a traceback, a signal or a lost store.
The long randomized trials are tools/faults.py."""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tiercache.errors import StoreError, TiercacheError
from tiercache.store.convert import convert
from tiercache.store.format import Store
from tiercache.store.integrity import sweep
from tiercache.tokenizer import Tokenizer


def run_cli(*args, home, preexec_fn=None):
    env = {**os.environ, "TIERCACHE_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "tiercache", *args], capture_output=True,
                          env=env, timeout=300, preexec_fn=preexec_fn)


def one_line_error(r, *words) -> str:
    """The run failed with exit 1 and exactly one `error:` line (a progress bar may precede
    it), and no traceback."""
    err = r.stderr.decode(errors="replace")
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert r.returncode == 1 and len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def store(stores, tmp_path):
    """A private copy of the tiny q8 store, to damage."""
    dst = tmp_path / "s"
    shutil.copytree(stores("llama", "q8"), dst)
    return dst


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# -- the LMDB file --------------------------------------------------------------------------------
def test_truncated_lmdb_is_refused_before_mapping(store, tmp_path):
    data = store / "lmdb" / "data.mdb"
    size = data.stat().st_size
    os.truncate(data, size - 4096 - 100)  # a partial copy: LMDB would SIGBUS on the last pages
    with pytest.raises(StoreError, match="truncated"):
        Store(store)
    r = run_cli("generate", str(store), "-p", "hi", "-n", "2", home=tmp_path / "home")
    one_line_error(r, "data.mdb", "truncated")
    os.truncate(data, 100)  # shorter than LMDB's own meta pages
    with pytest.raises(StoreError, match="truncated"):
        Store(store)


def test_damaged_btree_page_is_refused(store):
    m = json.loads((store / "manifest.json").read_text())
    first, _ = m["lmdb"]["structure"][-1]  # a leaf or branch page, not a record's
    data = store / "lmdb" / "data.mdb"
    raw = bytearray(data.read_bytes())
    raw[first * m["lmdb"]["page_size"] + 40] ^= 0x5A
    data.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="corrupt LMDB pages"):
        Store(store)


# -- side files and the manifest ------------------------------------------------------------------
def test_corrupt_tokenizer_files_are_detected(store):
    tj = store / "tokenizer.json"
    raw = bytearray(tj.read_bytes())
    for at in range(100, 100 + 64 * 37, 37):  # 64 damaged runs of bytes, as in the report
        raw[at:at + 3] = b"\xff\xfe\x00"
    tj.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=r"tokenizer\.json: corrupt \(checksum mismatch\)"):
        Tokenizer(store)
    shutil.copy(store / "tokenizer_config.json", tj)  # a whole file swapped
    with pytest.raises(StoreError, match="tokenizer.json: corrupt"):
        Tokenizer(store)


def test_tokenizer_outside_a_store_fails_in_one_line(hf_models, tmp_path):
    """Without a manifest there is no checksum: a damaged tokenizer.json still fails cleanly."""
    hf = tmp_path / "hf"
    shutil.copytree(hf_models["llama"][1], hf)
    (hf / "tokenizer.json").write_bytes(b"\xff\xfe{not json")
    with pytest.raises(TiercacheError, match="cannot load the tokenizer"):
        Tokenizer(hf)


def test_manifest_edits_and_absence_are_named(store, tmp_path):
    from tiercache.hub import resolve_model
    text = (store / "manifest.json").read_text()
    (store / "manifest.json").write_text(text.replace('"cluster_size": 32', '"cluster_size": 16'))
    with pytest.raises(StoreError, match="manifest.json: corrupt"):
        Store(store)
    (store / "manifest.json").unlink()
    with pytest.raises(StoreError, match="manifest.json is missing"):
        resolve_model(store)
    r = run_cli("generate", str(store), "-p", "hi", home=tmp_path / "home")
    one_line_error(r, "manifest.json", "missing")


# -- GGUF headers, config.json, plan.json ----------------------------------------------------------
def _tiny_gguf(path: Path) -> Path:
    pytest.importorskip("gguf")
    sys.path.insert(0, str(Path(__file__).parent))
    from test_gguf import write_tiny_gguf
    write_tiny_gguf(path)
    return path


def test_mutated_gguf_headers_fail_in_one_line(tmp_path):
    from gguf import GGUFReader
    src = _tiny_gguf(tmp_path / "t.gguf")
    r = GGUFReader(src, "r")
    f = r.fields["llama.embedding_length"]
    t = r.tensors[0].field
    cases = {  # byte offset -> new bytes
        "version": (4, (99).to_bytes(4, "little")),
        "value type": (f.offset + sum(p.nbytes for p in f.parts[:2]), b"\xff\xff\x00\x00"),
        "dimension": (f.offset + sum(p.nbytes for p in f.parts[:3]), (65).to_bytes(4, "little")),
        "tensor dims": (t.offset + sum(p.nbytes for p in t.parts[:3]),
                        (2 ** 40).to_bytes(8, "little")),
        "tensor name": (t.offset + 8, b"\xc3\x28"),
    }
    raw = src.read_bytes()
    for name, (at, new) in cases.items():
        bad = tmp_path / f"{name.replace(' ', '_')}.gguf"
        bad.write_bytes(raw[:at] + new + raw[at + len(new):])
        with pytest.raises(TiercacheError) as e:
            convert(bad, tmp_path / "out", progress=False)
        assert "\n" not in str(e.value) and bad.name in str(e.value), (name, e.value)
        assert not (tmp_path / "out").exists()


def test_bad_config_values_are_named(hf_models, tmp_path):
    hf = tmp_path / "hf"
    shutil.copytree(hf_models["llama"][1], hf)
    cfg = json.loads((hf / "config.json").read_text())
    for key, value, words in (("hidden_size", "64", "hidden_size must be a positive integer"),
                              ("num_key_value_heads", 3, "divisor of num_attention_heads"),
                              ("rms_norm_eps", -1, "rms_norm_eps"),
                              ("intermediate_size", 96, "has shape")):  # weights disagree
        (hf / "config.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(TiercacheError, match=words):
            convert(hf, tmp_path / "out", progress=False)
    (hf / "config.json").write_bytes(b'{"model_type": "ll\xffama"}')
    with pytest.raises(TiercacheError, match="config.json"):
        convert(hf, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_bad_plan_values_are_named(tmp_path):
    from planner.search import PLAN_VERSION, load_plan
    plan = {"plan_version": PLAN_VERSION, "limits": {"ram_bytes": 1 << 30},
            "engine": {"io_threads": 2, "context": 256, "compute": "f32"}}
    f = tmp_path / "plan.json"
    f.write_text(json.dumps(plan))
    assert load_plan(f)["engine"]["context"] == 256
    for key, bad in (("io_threads", "2"), ("context", -1), ("compute", "int3"),
                     ("hot_clusters", 1.5)):
        f.write_text(json.dumps({**plan, "engine": {**plan["engine"], key: bad}}))
        with pytest.raises(TiercacheError, match=f"engine.{key} must be"):
            load_plan(f)


# -- where the store is written --------------------------------------------------------------------
def test_unwritable_out_fails_in_one_line_and_leaves_nothing(hf_models, tmp_path):
    src = hf_models["llama"][1]
    afile = tmp_path / "a-file"
    afile.write_text("keep me")
    for out, why in ((Path("/proc/tiercache-test/s"), "cannot write the store"),
                     (afile / "s", "Not a directory")):
        with pytest.raises(StoreError, match=why) as e:
            convert(src, out, progress=False)
        assert str(out) in str(e.value)
    with pytest.raises(StoreError, match="not a tiercache store"):
        convert(src, afile, force=True, progress=False)  # --force replaces only a store
    assert afile.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_full_disk_fails_in_one_line(hf_models, tmp_path):
    """A file-size limit stands in for a full disk: the write fails with EFBIG mid-convert."""
    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))
    r = run_cli("convert", str(hf_models["llama"][1]), "--out", str(tmp_path / "s"),
                home=tmp_path / "home", preexec_fn=small_files)
    one_line_error(r, str(tmp_path / "s"), "cannot write the store")
    assert not any(p.name.startswith((".s", "s")) for p in tmp_path.iterdir())


# -- what a killed writer leaves -------------------------------------------------------------------
KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    from tiercache.store.format import Store, StoreWriter
    s = Store(sys.argv[1])
    w = StoreWriter(sys.argv[2], s.args, "q8", 32, map_size=64 << 20)
    w.put_record(b"x", b"half a store")
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_killed_writer_leaves_nothing_behind(store, tmp_path):
    out = tmp_path / "s"  # the store itself: profile rewrites it in place
    r = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(store), str(out)])
    assert r.returncode == -signal.SIGKILL
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".s.tmp-")]
    assert len(left) == 1
    sid = json.loads((out / "manifest.json").read_text())["store_id"]
    assert Store(out).manifest["store_id"] == sid  # the old store, intact; and the next open
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # cleaned what it left


def test_interrupted_swap_is_finished_or_undone(store, tmp_path):
    """Killed between moving the old store aside and renaming the new one in: the complete
    new store is put in place; with no complete new one, the old one goes back."""
    pid = dead_pid()
    old = tmp_path / f".s.old-{pid}-0000aaaa"
    os.rename(store, old)
    half = tmp_path / f".s.tmp-{pid}-0000bbbb"
    half.mkdir()  # no manifest: incomplete
    assert sweep(tmp_path / "s") == []
    assert Store(tmp_path / "s").manifest and sorted(os.listdir(tmp_path)) == ["s"]
    new = tmp_path / f".s.tmp-{pid}-0000cccc"
    os.rename(tmp_path / "s", new)  # a complete new store, and an old one aside
    shutil.copytree(new, tmp_path / f".s.old-{pid}-0000dddd")
    Store(tmp_path / "s")
    assert sorted(os.listdir(tmp_path)) == ["s"]


def test_live_writers_and_unknown_leftovers(store, tmp_path):
    mine = tmp_path / f".s.tmp-{os.getpid()}-0000eeee"  # a writer still running: left alone
    legacy = tmp_path / ".s.tmp-0000ffff"  # no owner recorded: reported, not removed
    mine.mkdir()
    legacy.mkdir()
    notes = sweep(store)
    assert mine.exists() and legacy.exists()
    assert len(notes) == 1 and str(legacy) in notes[0]
    with pytest.warns(UserWarning, match="0000ffff"):
        Store(store)


# -- options ---------------------------------------------------------------------------------------
def test_out_of_range_options_and_bad_prompts(store, tmp_path, monkeypatch):
    from typer.testing import CliRunner
    from tiercache.cli import app
    monkeypatch.setenv("TIERCACHE_HOME", str(tmp_path / "home"))
    for flags, words in ((["-n", "-1"], "--max-tokens must be an integer >= 1"),
                         (["--temp", "-1"], "--temp must be"), (["--threads", "0"], "--threads"),
                         (["--top-p", "nan"], "--top-p"),
                         (["-p", "", "--no-chat-template"], "the prompt is empty")):
        res = CliRunner().invoke(app, ["generate", str(store), "-p", "hi", *flags])
        assert isinstance(res.exception, TiercacheError), res.output  # main() prints one line
        assert words in str(res.exception) and "\n" not in str(res.exception)
    home = tmp_path / "home"
    r = subprocess.run([sys.executable, "-m", "tiercache", "generate", str(store), "-p",
                        b"caf\xe9 \xff", "-n", "1", "--threads", "999"], capture_output=True,
                       env={**os.environ, "TIERCACHE_HOME": str(home)}, timeout=300)
    one_line_error(r, "not valid UTF-8", "0xe9")
    assert r.stderr.decode().splitlines()[0].startswith("warning: --threads 999")
