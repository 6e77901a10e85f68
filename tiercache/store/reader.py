"""Reads store records with pread at known file offsets: O_DIRECT where the filesystem allows
(no page cache, so a RAM budget holds), in reads as large as the records, on I/O threads.

LMDB keeps a large value in contiguous overflow pages, so each record is one byte range of
data.mdb; its offset is found once by locating LMDB's own mapping in /proc/self/maps.
"""
from __future__ import annotations

import itertools
import mmap
import os
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import StoreError
from .format import Store

ALIGN = 4096
RING = 8  # read buffers in turn; at most RING reads' records may be alive at once


@dataclass
class IOStats:
    reads: int = 0
    bytes: int = 0
    sizes: dict = field(default_factory=dict)  # read size (rounded up to a power of two) -> count

    def add(self, n: int) -> None:
        self.reads += 1
        self.bytes += n
        b = 1 << max(12, (n - 1).bit_length())
        self.sizes[b] = self.sizes.get(b, 0) + 1


class RecordReader:
    def __init__(self, store: Store, threads: int = 2, direct: bool = True):
        self.store = store
        self.offsets = _record_offsets(store)
        path = store.path / "lmdb" / "data.mdb"
        self.direct = direct and hasattr(os, "O_DIRECT")
        try:
            self.fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if self.direct else 0))
        except OSError:  # tmpfs and some filesystems refuse O_DIRECT
            self.direct = False
            self.fd = os.open(path, os.O_RDONLY)
        self.pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="tc-io")
        self.stats = IOStats()
        # records already checked: a cycling cold cache re-reads the same ones every token, and
        # O_DIRECT reads come from the device, so one check per record and process suffices
        self.verified: set[str] = set()
        # read buffers are reused in turn: a fresh mmap per read cost ~3x the read itself in
        # page faults. A buffer is overwritten `RING` reads later; readers copy out before then.
        self._ring = [None] * RING
        self._turn = itertools.count()
        self._own = threading.local()  # one private buffer per thread (`private=True` reads)

    def read(self, key: str) -> bytes:
        """One record, checked against its crc32."""
        return self.read_many([key])[0]

    def read_many(self, keys: list[str], gap: int = 64 << 10, limit: int = 8 << 20) -> list[bytes]:
        """Records in `keys` order; neighbours in the file are read together (fewer, larger
        reads run faster: 1 MiB O_DIRECT reads are ~2x 64 KiB ones on this machine's disk)."""
        return [bytes(t.numpy()) for t in self.read_tensors(keys, gap, limit, private=True)]

    def read_tensors(self, keys: list[str], gap: int = 64 << 10, limit: int = 8 << 20,
                     private: bool = False) -> list[torch.Tensor]:
        """As `read_many`, as uint8 tensors viewing the read buffers: no copy after the read.
        private: into this thread's own buffer, valid until the thread's next private read (a
        caller that copies out at once, as streaming jobs do, then needs no ring)."""
        spans = sorted((self.offsets[k] + (k,) for k in keys))
        runs, run = [], []
        for span in spans:
            if run and (span[0] - (run[-1][0] + run[-1][1]) > gap
                        or span[0] + span[1] - run[0][0] > limit):
                runs.append(run)
                run = []
            run.append(span)
        if run:
            runs.append(run)
        out, at = {}, 0
        whole = self._buffer(sum(map(_run_size, runs)), True) if private else None
        for run in runs:  # a private read puts its runs side by side in the thread's buffer
            size = _run_size(run)
            out.update(self._read_run(run, None if whole is None else whole[at:at + size]))
            at += size
        return [out[k] for k in keys]

    def read_into(self, key: str, chunk: int = 2 << 20) -> torch.Tensor:
        """A whole record as a new uint8 tensor, read in pieces of at most `chunk` bytes and
        checked against its crc32: a large pinned tensor loads without a second copy."""
        n, crc = self.store.records[key]
        out, got = torch.empty(n, dtype=torch.uint8), 0
        for lo in range(0, n, chunk):
            part = self.read_range(key, lo, min(chunk, n - lo), private=True)
            out[lo:lo + part.numel()] = part
            got = zlib.crc32(part.numpy(), got)
        if got != crc:
            raise StoreError(f"{self.store.path}: record {key} is corrupt (checksum mismatch)")
        self.verified.add(key)
        return out

    def read_range(self, key: str, lo: int, n: int, private: bool = False) -> torch.Tensor:
        """Bytes [lo, lo + n) of a record, as a view of a read buffer (valid until `RING` reads
        later, or this thread's next private read). Not checked: callers read records that
        were checked whole once (`read_into`)."""
        off, size = self.offsets[key]
        if lo < 0 or lo + n > size:
            raise ValueError(f"range {lo}+{n} outside record {key} of {size} bytes")
        start = (off + lo) // ALIGN * ALIGN
        length = -(-(off + lo + n - start) // ALIGN) * ALIGN
        buf = self._buffer(length, private)
        got = os.preadv(self.fd, [memoryview(buf.numpy())], start)
        if got < off + lo + n - start:
            raise StoreError(f"{self.store.path}: record {key} is truncated")
        if not self.direct:
            os.posix_fadvise(self.fd, start, length, os.POSIX_FADV_DONTNEED)
        self.stats.add(length)
        return buf[off + lo - start: off + lo - start + n]

    def _read_run(self, run, whole: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        lo, size = run[0][0] // ALIGN * ALIGN, _run_size(run)
        whole = self._buffer(size) if whole is None else whole
        got = os.preadv(self.fd, [memoryview(whole.numpy())], lo)
        recs = {k: whole[off - lo: off - lo + n] for off, n, k in run}
        if not self.direct:  # keep the page cache out of the budget
            os.posix_fadvise(self.fd, lo, size, os.POSIX_FADV_DONTNEED)
        self.stats.add(size)
        for off, n, key in run:
            want = self.store.records[key]
            data = recs[key]
            if got < off - lo + n or len(data) != want[0]:
                raise StoreError(f"{self.store.path}: record {key} is truncated")
            if key not in self.verified:
                if zlib.crc32(data.numpy()) != want[1]:
                    raise StoreError(f"{self.store.path}: record {key} is corrupt (checksum mismatch)")
                self.verified.add(key)
        return recs

    def _buffer(self, size: int, private: bool = False) -> torch.Tensor:
        """A page-aligned buffer (as O_DIRECT wants) of at least `size` bytes, from the ring
        or this thread's own."""
        if private:
            buf = getattr(self._own, "buf", None)
            if buf is None or buf.numel() < size:
                buf = self._own.buf = _aligned(size)
            return buf[:size]
        i = next(self._turn) % RING
        buf = self._ring[i]
        if buf is None or buf.numel() < size:
            buf = self._ring[i] = _aligned(max(size, 2 << 20))
        return buf[:size]

    def drop_page_cache(self) -> None:
        """Finding the offsets faulted LMDB's pages in, and the kernel read the whole store
        around them: once LMDB's map is gone, let that page cache go, or a cgroup cap is
        charged for it (and evicts code pages instead)."""
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self):
        self.pool.shutdown(wait=True)
        os.close(self.fd)


def _run_size(run) -> int:
    """Bytes read for a run of (offset, length, key) spans: whole aligned blocks."""
    lo = run[0][0] // ALIGN * ALIGN
    return -(-(max(off + n for off, n, _ in run) - lo) // ALIGN) * ALIGN


def _aligned(size: int) -> torch.Tensor:
    """Page-aligned memory; private, so it counts as the process's anonymous memory (a shared
    anonymous map would be shmem, outside RssAnon and the budget's measure)."""
    m = mmap.mmap(-1, max(size, ALIGN), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(m, dtype=torch.uint8)


def _record_offsets(store: Store) -> dict[str, tuple[int, int]]:
    """key -> (file offset, length) of every record, from LMDB's mapping of data.mdb."""
    base = _map_base(store)
    out = {}
    with store.env.begin(buffers=True) as txn:
        for key in store.records:
            mv = txn.get(key.encode())
            if mv is None:
                raise StoreError(f"{store.path}: record {key} is missing")
            addr = np.frombuffer(mv, dtype=np.uint8).ctypes.data if len(mv) else base
            out[key] = (addr - base, len(mv))
    return out


def _map_base(store: Store) -> int:
    path = str((store.path / "lmdb" / "data.mdb").resolve())
    with store.env.begin():  # make sure the map exists
        pass
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[5] == path and int(parts[2], 16) == 0:
            return int(parts[0].split("-")[0], 16)
    raise StoreError(f"{store.path}: cannot locate the LMDB mapping (Linux /proc is needed)")
