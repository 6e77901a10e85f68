"""What $TIERCACHE_HOME holds: converted stores and fetched GGUFs (`tiercache list` / `rm`)."""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import TiercacheError, load_json_object
from .hub import MODELS, gguf_path, stores_dir


@dataclass
class Entry:
    name: str
    kind: str          # "store" | "gguf" | "known" (a known model not fetched yet)
    path: Path | None
    bytes: int = 0
    dtype: str = "-"
    profiled: str = "-"  # "yes" / "no" for stores

    def row(self) -> dict:
        return {"name": self.name, "kind": self.kind, "bytes": self.bytes, "dtype": self.dtype,
                "profile": self.profiled, "path": str(self.path) if self.path else None}


def disk_bytes(path: Path) -> int:
    """Bytes a file or directory takes on disk (allocated blocks: LMDB files are sparse)."""
    if path.is_file():
        return path.stat().st_blocks * 512
    return sum((Path(d) / f).stat().st_blocks * 512 for d, _, fs in os.walk(path) for f in fs)


def entries() -> list[Entry]:
    """Stores, then fetched GGUFs, then known models not fetched yet."""
    out = [_store_entry(p) for p in sorted(stores_dir().glob("[!.]*")) if p.is_dir()]
    for name in sorted(MODELS):
        g = gguf_path(name)
        out.append(Entry(name, "gguf", g, disk_bytes(g)) if g.is_file()
                   else Entry(name, "known", None))
    return out


def _store_entry(path: Path) -> Entry:
    try:
        m = load_json_object(path / "manifest.json", "store manifest")
    except TiercacheError:
        return Entry(path.name, "store", path, disk_bytes(path), "?", "?")  # partial or foreign
    return Entry(path.name, "store", path, disk_bytes(path), str(m.get("dtype", "?")),
                 "yes" if m.get("profile") else "no")


def remove(name: str) -> list[Entry]:
    """Delete the store NAME, or every store and the GGUF of the known model NAME; only ever
    inside $TIERCACHE_HOME. -> what was removed."""
    have = [e for e in entries() if e.kind != "known"]
    gone = [e for e in have if e.name == name or (name in MODELS and _store_of(e, name))]
    if not gone:
        names = ", ".join(sorted({e.name for e in have})) or "nothing"
        raise TiercacheError(f"no store or model named '{name}' (there is: {names})")
    for e in gone:
        shutil.rmtree(e.path) if e.path.is_dir() else e.path.unlink()
    return gone


def _store_of(e: Entry, model: str) -> bool:
    """A store `resolve_model` converted from the known model (named MODEL-DTYPE)."""
    return e.kind == "store" and e.name.rsplit("-", 1)[0] == model


def human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def table(rows: list[Entry]) -> str:
    head = ("NAME", "KIND", "SIZE", "DTYPE", "PROFILE", "WHERE")
    lines = [head] + [(e.name, e.kind, human(e.bytes) if e.path else "-", e.dtype, e.profiled,
                       str(e.path) if e.path else "not fetched (fetched on first use)")
                      for e in rows]
    widths = [max(len(r[i]) for r in lines) for i in range(len(head) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1]
                     for r in lines)
