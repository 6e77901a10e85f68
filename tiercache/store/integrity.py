"""A store's integrity, checked before anything is mapped, and what a killed writer left behind.

- The manifest carries a crc32 of itself (`checksum`, over its canonical JSON without that key),
  and [nbytes, crc32] of every side file (tokenizer.json, ...) under `files`.
- `lmdb` in the manifest records data.mdb's size and a crc32 of its structural pages (meta,
  branch, leaf, free-list: every page that is not a record's overflow page). A truncated copy
  would fault (SIGBUS) inside LMDB's map, and a damaged B-tree page can send LMDB anywhere, so
  both are checked with plain reads before LMDB opens the file. Records carry their own crc32.
- A writer works in `.NAME.tmp-PID-x` next to the store and swaps it in through
  `.NAME.old-PID-x`; `sweep` finishes or undoes the swap of a writer that was killed, and
  removes what it left, once that process is gone.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
import zlib
from pathlib import Path

from ..errors import StoreError, load_json_object

MAGIC = 0xBEEFC0DE  # LMDB's meta page magic
PAGE_HEADER = 16    # LMDB's page header: pgno (8), pad (2), flags (2), lower/upper (4)
P_META = 0x08
_META = struct.Struct("<IIQQ")  # magic, version, address, mapsize (after the page header)
_LAST = struct.Struct("<QQ")    # last page number, txnid (after the two 48-byte DB records)
_META_LAST = PAGE_HEADER + _META.size + 2 * 48


# -- the manifest and side files ----------------------------------------------------------------
def seal(manifest: dict) -> dict:
    """The manifest with its own checksum added."""
    m = {k: v for k, v in manifest.items() if k != "checksum"}
    return {**m, "checksum": _crc_json(m)}


def check_manifest(path: Path, m: dict) -> None:
    if "checksum" not in m:  # stores from before the checksum, and hand-made test manifests
        return
    body = {k: v for k, v in m.items() if k != "checksum"}
    if m["checksum"] != _crc_json(body):
        raise StoreError(f"{path / 'manifest.json'}: corrupt (checksum mismatch)")


def _crc_json(d: dict) -> int:
    return zlib.crc32(json.dumps(d, sort_keys=True, separators=(",", ":")).encode())


def file_sums(files: dict[str, bytes]) -> dict[str, list[int]]:
    return {name: [len(data), zlib.crc32(data)] for name, data in files.items()}


def read_side_files(path: Path, manifest: dict | None, names=None) -> dict[str, bytes]:
    """A store's side files (those in `names`, or all), each checked against the manifest's
    size and crc32 (files a store from before the checksums has are read as they are)."""
    want = (manifest or {}).get("files") or {}
    if not isinstance(want, dict):
        raise StoreError(f"{path / 'manifest.json'}: malformed 'files' entry")
    out = {}
    for f in sorted(path.iterdir()) if names is None else [path / n for n in names]:
        if f.name != "manifest.json" and f.is_file():
            try:
                out[f.name] = f.read_bytes()
            except OSError as e:
                raise StoreError(f"{f}: cannot read ({e.strerror})") from None
    for name, sums in want.items():
        if names is not None and name not in names:
            continue
        n, crc = sums if isinstance(sums, list) and len(sums) == 2 else (None, None)
        data = out.get(name)
        if data is None:
            raise StoreError(f"{path / name}: missing (the manifest lists it)")
        if len(data) != n or zlib.crc32(data) != crc:
            raise StoreError(f"{path / name}: corrupt (checksum mismatch)")
    return out


# -- the LMDB file ---------------------------------------------------------------------------
def lmdb_facts(data: Path, record_offsets: dict[str, tuple[int, int]]) -> dict:
    """What `check_lmdb` compares: data.mdb's size, its page size, and the structural pages
    (every page not holding a record's value) as [first, count] runs with their crc32."""
    size = data.stat().st_size
    with open(data, "rb") as f:
        psize, last = _meta(f, data, size)
        overflow = set()
        for off, n in record_offsets.values():
            if (off - PAGE_HEADER) % psize == 0 and n:  # a value in its own overflow pages
                first = (off - PAGE_HEADER) // psize
                overflow.update(range(first, first + -(-(n + PAGE_HEADER) // psize)))
        runs = _runs(p for p in range(last + 1) if p not in overflow)
        crc = _crc_pages(f, runs, psize)
    return {"bytes": size, "page_size": psize, "structure": runs, "structure_crc32": crc}


def check_lmdb(store: Path, facts: dict | None) -> None:
    """Refuse a data.mdb that is shorter than its pages, or whose B-tree pages changed, before
    LMDB maps it (a page past the end of a file is SIGBUS, not an error)."""
    data = store / "lmdb" / "data.mdb"
    try:
        size = data.stat().st_size
        with open(data, "rb") as f:
            psize, last = _meta(f, store, size)
            if size < (last + 1) * psize:
                raise StoreError(f"{data}: truncated ({size} bytes, its pages need "
                                 f"{(last + 1) * psize}); a partial copy?")
            if facts is None:
                return
            if size != facts["bytes"]:
                how = "truncated: a partial copy?" if size < facts["bytes"] else "altered"
                raise StoreError(f"{data}: {size} bytes where the store wrote {facts['bytes']} "
                                 f"({how})")
            if _crc_pages(f, facts["structure"], facts["page_size"]) != facts["structure_crc32"]:
                raise StoreError(f"{data}: corrupt LMDB pages (checksum mismatch)")
    except FileNotFoundError:
        raise StoreError(f"{store}: LMDB data is missing ({data})") from None
    except OSError as e:
        raise StoreError(f"{data}: cannot read ({e.strerror})") from None
    except (KeyError, TypeError, ValueError):
        raise StoreError(f"{store / 'manifest.json'}: malformed 'lmdb' entry") from None


def _meta(f, where: Path, size: int) -> tuple[int, int]:
    """(page size, last page number) from the newer of LMDB's two meta pages."""
    head = f.read(PAGE_HEADER + _META.size + 4)
    if len(head) < PAGE_HEADER + _META.size + 4:
        raise StoreError(f"{where}: LMDB data is truncated ({size} bytes)")
    magic = _META.unpack_from(head, PAGE_HEADER)[0]
    psize = struct.unpack_from("<I", head, PAGE_HEADER + _META.size)[0]  # free DB's md_pad
    if magic != MAGIC or psize < 512 or psize & (psize - 1) or psize > 1 << 16:
        raise StoreError(f"{where}: not LMDB data, or its header is corrupt")
    best = None
    for page in (0, 1):
        f.seek(page * psize)
        buf = f.read(_META_LAST + _LAST.size)
        if len(buf) < _META_LAST + _LAST.size:
            raise StoreError(f"{where}: LMDB data is truncated ({size} bytes)")
        flags = struct.unpack_from("<H", buf, 10)[0]
        if not flags & P_META or _META.unpack_from(buf, PAGE_HEADER)[0] != MAGIC:
            raise StoreError(f"{where}: LMDB meta page {page} is corrupt")
        last, txn = _LAST.unpack_from(buf, _META_LAST)
        best = max(best or (txn, last), (txn, last))
    return psize, best[1]


def _runs(pages) -> list[list[int]]:
    runs: list[list[int]] = []
    for p in pages:
        if runs and runs[-1][0] + runs[-1][1] == p:
            runs[-1][1] += 1
        else:
            runs.append([p, 1])
    return runs


def _crc_pages(f, runs, psize: int) -> int:
    crc = 0
    for first, count in runs:
        f.seek(first * psize)
        crc = zlib.crc32(f.read(count * psize), crc)
    return crc


# -- what killed writers leave -------------------------------------------------------------------
_LEFT = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)-(?:(?P<pid>\d+)-)?[0-9a-f]{8}")


def work_dir(out: Path, kind: str, tag: str) -> Path:
    """Where a writer of `out` works (kind "tmp") or puts the old store aside ("old")."""
    return out.parent / f".{out.name}.{kind}-{os.getpid()}-{tag}"


def sweep(out: Path) -> list[str]:
    """Finish what killed writers of `out` left: with `out` gone mid-swap, their complete new
    store (else the old one) is put back; then their directories are removed. Directories of
    live writers are left alone. -> one line per directory that could not be cleaned."""
    out = Path(out)
    left = _left_behind(out)
    if not left:
        return []
    dead = [p for p, pid in left if pid is not None and not _alive(pid, p)]
    notes = [f"{p}: left by an earlier convert or profile of unknown process; remove it"
             for p, pid in left if pid is None]
    if not out.exists():
        new = [p for p in dead if ".tmp-" in p.name and _complete(p)]
        old = [p for p in dead if ".old-" in p.name and _complete(p)]
        for p in (new or old)[:1]:
            try:
                os.rename(p, out)
                dead.remove(p)
            except OSError as e:
                notes.append(f"{p}: holds the store {out} but cannot be moved back ({e.strerror})")
    for p in dead:
        shutil.rmtree(p, ignore_errors=True)
        if p.exists():
            notes.append(f"{p}: left by a killed convert or profile; cannot remove it")
    return notes


def _left_behind(out: Path) -> list[tuple[Path, int | None]]:
    try:
        names = os.listdir(out.parent)
    except OSError:
        return []
    found = []
    for n in names:
        m = _LEFT.fullmatch(n)
        if m and m["name"] == out.name:
            found.append((out.parent / n, int(m["pid"]) if m["pid"] else None))
    return found


def _complete(p: Path) -> bool:
    """A committed store: its manifest is written last, so one that reads whole is complete."""
    try:
        m = load_json_object(p / "manifest.json", "manifest", StoreError)
        check_manifest(p, m)
        return "store_id" in m
    except StoreError:
        return False


def _alive(pid: int, made: Path) -> bool:
    """Whether the process that made `made` still runs (a reused pid started after it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    started = _start_time(pid)
    try:
        return started is None or started <= made.stat().st_mtime + 1
    except OSError:
        return False


def _start_time(pid: int) -> float | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = next(float(ln.split()[1]) for ln in Path("/proc/stat").read_text().splitlines()
                    if ln.startswith("btime"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22: start time in clock ticks
    return boot + ticks / os.sysconf("SC_CLK_TCK")
