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

import torch

from ..errors import StoreError
from .format import Store

ALIGN = 4096
RING = 8  # read buffers in turn; at most RING reads' records may be alive at once


@dataclass
class ReadPlan:
    runs: list[tuple[int, int, int, int]]  # (file offset, bytes, offset in the buffer, file
                                           # offset where what is wanted ends), aligned
    size: int                              # buffer bytes the runs need
    keys: list[str]                        # whole records (checked once), or none for a range
    at: list[int]                          # where each key (or the range) is in the buffer
    checked: bool = False                  # every record's crc32 seen once


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
        self.offsets = store.offsets(store.records)
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
        plan = self.plan(keys, gap, limit)
        if private:
            whole = self._buffer(plan.size, True)
            self.read_plan(plan, whole)
            return [whole[at:at + self.store.records[k][0]] for k, at in zip(keys, plan.at)]
        out = {}
        for run in plan.runs:  # each run into its own ring buffer
            buf = self._buffer(run[1])
            self.read_plan(ReadPlan([run[:2] + (0, run[3])], run[1], [], []), buf)
            out.update({k: buf[at - run[2]:at - run[2] + self.store.records[k][0]]
                        for k, at in zip(plan.keys, plan.at) if run[2] <= at < run[2] + run[1]})
        self._check(plan, None, out)
        return [out[k] for k in keys]

    def plan(self, keys: list[str], gap: int = 64 << 10, limit: int = 8 << 20) -> "ReadPlan":
        """Where `keys` go in one buffer: neighbours in the file read together, runs side by
        side. The same keys give the same plan, so a caller reading them every token (the
        streamer) computes it once."""
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
        reads, where, at = [], {}, 0
        for run in runs:
            lo, size = run[0][0] // ALIGN * ALIGN, _run_size(run)
            reads.append((lo, size, at, max(off + n for off, n, _ in run)))
            where.update({k: at + off - lo for off, _, k in run})
            at += size
        return ReadPlan(reads, at, list(keys), [where[k] for k in keys])

    def read_plan(self, plan: "ReadPlan", buf: torch.Tensor) -> None:
        """Read a plan's runs into buf (at least plan.size bytes, page-aligned). Each record
        is checked against its crc32 the first time it is read."""
        for lo, size, at, end in plan.runs:
            got = os.preadv(self.fd, [memoryview(buf[at:at + size].numpy())], lo)
            if lo + got < end:
                raise StoreError(f"{self.store.path}: a record at {lo} is truncated")
            if not self.direct:  # keep the page cache out of the budget
                os.posix_fadvise(self.fd, lo, size, os.POSIX_FADV_DONTNEED)
            self.stats.add(size)
        if not plan.checked:
            self._check(plan, buf)

    def range_plan(self, key: str, lo: int, n: int) -> "ReadPlan":
        """Bytes [lo, lo + n) of a record (at plan.at[0] in the buffer). Not checked: callers
        read records that were checked whole once (`read_into`)."""
        off, size = self.offsets[key]
        if lo < 0 or lo + n > size:
            raise ValueError(f"range {lo}+{n} outside record {key} of {size} bytes")
        start = (off + lo) // ALIGN * ALIGN
        length = -(-(off + lo + n - start) // ALIGN) * ALIGN
        return ReadPlan([(start, length, 0, off + lo + n)], length, [], [off + lo - start],
                        checked=True)

    def _check(self, plan: "ReadPlan", buf: torch.Tensor | None, recs: dict | None = None):
        for key, at in zip(plan.keys, plan.at):  # (a range plan has no keys)
            if key in self.verified:
                continue
            n, crc = self.store.records[key]
            data = recs[key] if recs is not None else buf[at:at + n]
            if zlib.crc32(data.numpy()) != crc:
                raise StoreError(f"{self.store.path}: record {key} is corrupt (checksum mismatch)")
            self.verified.add(key)
        plan.checked = all(k in self.verified for k in plan.keys)

    def read_into(self, key: str, chunk: int = 2 << 20) -> torch.Tensor:
        """A whole record as a new uint8 tensor, read in pieces of at most `chunk` bytes and
        checked against its crc32: a large pinned tensor loads without a second copy."""
        out = torch.empty(self.store.records[key][0], dtype=torch.uint8)
        for lo, part in self.read_chunks(key, chunk):
            out[lo:lo + part.numel()] = part
        return out

    def read_chunks(self, key: str, chunk: int = 2 << 20):
        """Yields (offset, bytes) pieces of a record in order, each a view of this thread's
        read buffer (valid until the next piece), and checks the whole record's crc32 after
        the last: a consumer that writes pieces elsewhere never holds the record at once."""
        n, crc = self.store.records[key]
        got = 0
        for lo in range(0, n, chunk):
            part = self.read_range(key, lo, min(chunk, n - lo), private=True)
            got = zlib.crc32(part.numpy(), got)
            yield lo, part
        if got != crc:
            raise StoreError(f"{self.store.path}: record {key} is corrupt (checksum mismatch)")
        self.verified.add(key)

    def read_range(self, key: str, lo: int, n: int, private: bool = False) -> torch.Tensor:
        """Bytes [lo, lo + n) of a record, as a view of a read buffer (valid until `RING` reads
        later, or this thread's next private read). Not checked (see `range_plan`)."""
        plan = self.range_plan(key, lo, n)
        buf = self._buffer(plan.size, private)
        self.read_plan(plan, buf)
        return buf[plan.at[0]:plan.at[0] + n]

    def _buffer(self, size: int, private: bool = False) -> torch.Tensor:
        """A page-aligned buffer (as O_DIRECT wants) of at least `size` bytes, from the ring
        or this thread's own."""
        if private:
            buf = getattr(self._own, "buf", None)
            if buf is None or buf.numel() < size:
                buf = self._own.buf = aligned_buffer(size)
            return buf[:size]
        i = next(self._turn) % RING
        buf = self._ring[i]
        if buf is None or buf.numel() < size:
            buf = self._ring[i] = aligned_buffer(max(size, 2 << 20))
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


def aligned_buffer(size: int) -> torch.Tensor:
    """Page-aligned memory; private, so it counts as the process's anonymous memory (a shared
    anonymous map would be shmem, outside RssAnon and the budget's measure)."""
    m = mmap.mmap(-1, max(size, ALIGN), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(m, dtype=torch.uint8)

