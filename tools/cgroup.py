"""Emulate a low-RAM device: run a command inside a cgroup-v1 memory group (RSS + page cache
capped together, as on a phone), optionally with the blkio controller throttling reads."""
from __future__ import annotations

import os
import subprocess
import uuid
from contextlib import contextmanager
from pathlib import Path

MEM = Path("/sys/fs/cgroup/memory")
BLKIO = Path("/sys/fs/cgroup/blkio")


def available() -> bool:
    return os.access(MEM, os.W_OK)


def drop_caches() -> None:
    """Start each run cold: a page cached by an earlier run would be a free, uncharged hit."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass


def run_capped(cmd: list[str], limit: int | None, timeout: float = 600,
               read_bps: int | None = None, device: str = "254:0",
               env: dict | None = None) -> dict:
    """Run cmd with memory (and read bandwidth) capped -> {rc, stdout, stderr, max_usage, oom}."""
    name = f"tiercache-bench-{uuid.uuid4().hex[:8]}"
    mem = MEM / name
    mem.mkdir()
    blk = BLKIO / name if read_bps else None
    try:
        if limit:
            (mem / "memory.limit_in_bytes").write_text(str(limit))
        if blk:
            blk.mkdir()
            (blk / "blkio.throttle.read_bps_device").write_text(f"{device} {read_bps}")
        procs = [mem / "cgroup.procs"] + ([blk / "cgroup.procs"] if blk else [])

        def enter():
            for p in procs:
                p.write_text(str(os.getpid()))

        drop_caches()
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                               preexec_fn=enter, env=env)
            rc, out, err = r.returncode, r.stdout, r.stderr
        except subprocess.TimeoutExpired as e:
            rc, out, err = 124, e.stdout or "", e.stderr or ""
        oom = "oom_kill 1" in (mem / "memory.oom_control").read_text() or rc == -9
        return {"rc": rc, "stdout": out if isinstance(out, str) else out.decode(),
                "stderr": err if isinstance(err, str) else err.decode(),
                "max_usage": int((mem / "memory.max_usage_in_bytes").read_text()), "oom": oom}
    finally:
        for g in (mem, blk):
            if g is not None and g.exists():
                try:
                    g.rmdir()
                except OSError:
                    pass


def queue_dir(path: Path) -> Path | None:
    """The block queue settings of the disk holding `path` (a partition's parent disk's)."""
    dev = os.stat(path).st_dev
    sysdev = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    for d in (sysdev / "queue", sysdev / ".." / "queue"):
        if (d / "read_ahead_kb").exists():
            return d.resolve()
    return None


@contextmanager
def read_ahead(kb: int, path: Path):
    """Set read_ahead_kb of the disk holding `path` for the block, then restore it. A fresh
    VM may have 8192: under a cap every page fault then reads 8 MiB and runs thrash; 128 is a
    common default. Yields the value in force (None where it cannot be read)."""
    q = queue_dir(path)
    f = q / "read_ahead_kb" if q else None
    old = f.read_text().strip() if f else None
    try:
        if f:
            f.write_text(str(kb))
        yield int(f.read_text()) if f else None
    finally:
        if f and old is not None:
            f.write_text(old)
