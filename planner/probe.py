"""Measure this machine into a DeviceProfile in under a minute (`quick=True`: a few seconds).

Flash: cold reads of a temporary file at several block sizes and thread counts, with O_DIRECT
(page-aligned mmap buffers) or, where the filesystem refuses it, plain reads after
posix_fadvise(DONTNEED). Memory: streaming read and copy bandwidth. Compute: torch matvec and
matmul at one thread per dtype on FFN-shaped matrices that together overflow the caches: q4 as
the engine runs it (kernels.int4_mm: tiercache's int4 kernel, else torch's; else dequantize
then multiply), q8 on the engine's int8 kernel (kernels.int8_mm); plus what a miss costs to
prepare (dequantize to f32, or repack into the int4 kernel's layout). Runtime: RSS of a fresh
python after `import torch` (a subprocess, so this process's state does not count).
"""
from __future__ import annotations

import mmap
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from .cost import LAYER_OPS
from .profiles import DeviceProfile

BLOCKS = (4096, 16384, 65536, 262144, 1 << 20)
THREADS = (1, 2, 4)
ROWS, COLS = 1536, 576  # SmolLM2-135M's FFN matrix: realistic op sizes for the default model
GROUP = 32


# 2: the runtime measured with the engine's own model set-up (version 1 counted +67 MB of
# sympy that the engine no longer imports, and planned ~45 MB too little room for weights)
PROBE_VERSION = 2


def home() -> Path:
    return Path(os.environ.get("TIERCACHE_HOME") or Path.home() / ".cache" / "tiercache")


def this_machine(refresh: bool = False) -> DeviceProfile:
    """The probed profile of this machine, cached at $TIERCACHE_HOME/device.json."""
    path = home() / "device.json"
    if path.is_file() and not refresh:
        prof = DeviceProfile.from_json(path)
        if _current(prof):
            return prof
    prof = probe(path=home())
    prof.to_json(path)
    return prof


def cached_profile() -> DeviceProfile | None:
    """This machine's probed profile if one is cached (no probing): for callers that must
    not spend the probe's time, such as `--ram` without a plan."""
    path = home() / "device.json"
    if not path.is_file():
        return None
    try:
        prof = DeviceProfile.from_json(path)
    except Exception:  # noqa: BLE001 - a stale or foreign cache is as good as none here
        return None
    return prof if _current(prof) else None


def _current(prof: DeviceProfile) -> bool:
    """A cached profile still describes this machine: probed here, by this probe."""
    return prof.host in ("", socket.gethostname()) and (
        not prof.measured or prof.probe_version >= PROBE_VERSION)


def probe(quick: bool = False, path=None) -> DeviceProfile:
    """Measure this machine. `path`: a directory on the disk the stores live on."""
    where = Path(path) if path else home()
    where.mkdir(parents=True, exist_ok=True)
    flash, direct, miss_s = measure_flash(where, size=(16 if quick else 1024) << 20,
                                          seconds=0.03 if quick else 0.5,
                                          misses=20 if quick else 200)
    # working sets past the last-level cache (300 MiB on the reference VM), as a decode step's
    # weights are: otherwise matvec looks faster than it is on a real model
    mem_bw, copy_bw = measure_memory((16 if quick else 512) << 20)
    compute = {"torch": measure_torch(n_mats=4 if quick else 100, reps=1 if quick else 5)}
    ort = measure_ort(quick)
    before, after, anon, files = runtime_footprint()
    if ort:
        compute["ort:CPUExecutionProvider"] = ort
    how = "O_DIRECT" if direct else "buffered reads after posix_fadvise(DONTNEED), no O_DIRECT"
    size = "16 MiB" if quick else "1 GiB"
    src = f"probe on {socket.gethostname()} ({time.strftime('%Y-%m-%d')})"
    return DeviceProfile(
        name="this", description=f"{platform.node()}: {_cpu_name()}, {os.cpu_count()} cores",
        ram_bytes=ram_bytes(), flash=flash, memory_bw=mem_bw, copy_bw=copy_bw, compute=compute,
        runtime_overhead_bytes=after, runtime_anon_bytes=anon, runtime_file_bytes=files,
        direct_io=direct, miss_overhead_s=miss_s,
        readahead_bytes=readahead_bytes(where), threads=1, measured=True,
        probe_version=PROBE_VERSION,
        host=socket.gethostname(),
        sources={
            "ram_bytes": f"{src}: min(MemTotal, cgroup memory limit)",
            "flash": f"{src}: random {how} reads of a {size} file in {where}",
            "memory_bw": f"{src}: torch sum over a large f32 tensor, 1 thread",
            "copy_bw": f"{src}: torch copy_ of a large tensor, 1 thread",
            "compute": f"{src}: torch {_torch_version()} (and onnxruntime where installed) "
                       f"on [{ROWS}, {COLS}] matrices, 1 thread",
            "runtime_overhead_bytes": f"{src}: VmRSS of a fresh python after importing torch, "
                                      f"numpy, lmdb, tokenizers, safetensors and a first op "
                                      f"({before / 1e6:.0f} MB before)",
            "runtime_anon_bytes": f"{src}: RssAnon of that python once torch has set up a "
                                  "model on the meta device (as the engine does first)",
            "runtime_file_bytes": f"{src}: RssFile of that python (library pages it maps)",
            "readahead_bytes": f"{src}: /sys/block/*/queue/read_ahead_kb",
            "miss_overhead_s": f"{src}: an engine-like miss (I/O thread, aligned buffer, "
                               "checksum, int4 repack, slot copy) minus a plain 64 KiB read",
        },
        notes=[f"quick probe: {quick}"])


# -- flash ---------------------------------------------------------------------------------------
def measure_flash(where: Path, size: int, seconds: float, blocks=BLOCKS, threads=THREADS,
                  misses: int = 200) -> tuple[list[list[float]], bool, float]:
    """-> ([[block, threads, bytes/s], ...], whether O_DIRECT was used, seconds of software
    overhead per cache miss on top of its read).

    Each point reads its own region of the file, each block once, in random order: a block
    read twice may come from a cache below the filesystem (the VM host's) and flatter the disk.
    """
    fd_w, name = tempfile.mkstemp(prefix=".probe-", dir=where)
    try:
        _write_random(fd_w, size)
        os.close(fd_w)
        fd, direct = _open_cold(name)
        points = [(b, t) for b in blocks for t in threads]
        region = size // (len(points) + 1) // max(blocks) * max(blocks)
        try:
            table = [[b, t, _read_rate(fd, (i * region, region), b, t, seconds, direct)]
                     for i, (b, t) in enumerate(points)]
            miss = _one_thread(lambda: _miss_overhead(fd, (len(points) * region, region),
                                                      direct, misses))
        finally:
            os.close(fd)
        return table, direct, miss
    finally:
        os.unlink(name)


def _miss_overhead(fd: int, region: tuple[int, int], direct: bool, n: int) -> float:
    """What a cache miss costs beyond its read, done the way the tiered engine does it: an I/O
    thread reads into a fresh aligned buffer, copies out and checksums the record, repacks it
    with small tensor ops (the int4 layout), and the main thread waits and copies it into a
    slot. Measured on 64 KiB records against plain reads of the same size."""
    from concurrent.futures import ThreadPoolExecutor
    import torch
    block, (start, length) = 1 << 16, region
    offs = start + np.random.default_rng(7).permutation(max(2, length // block))[:2 * n] * block
    n = len(offs) // 2
    raw = mmap.mmap(-1, block)
    t0 = time.perf_counter()
    for off in offs[:n]:
        os.preadv(fd, [raw], int(off))
    t_raw = (time.perf_counter() - t0) / max(1, len(offs[:n]))
    raw.close()
    slot = torch.zeros(16, 2 * block, dtype=torch.uint8)
    with ThreadPoolExecutor(max_workers=1) as pool:
        for off in offs[:3]:  # the first ops in a new thread set up torch's state
            pool.submit(_engine_like_miss, fd, int(off), block).result()
        t0 = time.perf_counter()
        for i, off in enumerate(offs[n:]):
            out = pool.submit(_engine_like_miss, fd, int(off), block).result()
            slot[i % 16, :out.numel()] = out
        t_job = (time.perf_counter() - t0) / max(1, len(offs[n:]))
    if not direct:
        _drop_cache(fd)
    return max(0.0, t_job - t_raw)


def _engine_like_miss(fd: int, off: int, block: int):
    import zlib
    import torch
    buf = mmap.mmap(-1, block)
    try:
        os.preadv(fd, [buf], off)
        data = buf[:block]
    finally:
        buf.close()
    zlib.crc32(data)
    b = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    halves = []
    for part in b.view(2, -1):  # up and down of 64 neurons x 512: nibbles, f16 scales and mins
        p, sm = part[:16384], part[16384:20480]
        q = torch.stack([p & 0xF, p >> 4], -1).view(64, -1)
        q = q.view(1, 2, 32, -1)
        packed = (q[:, 0] | (q[:, 1] << 4)).transpose(1, 2).contiguous()
        sc = sm.view(torch.float16).float().view(2, -1)
        sz = torch.stack([sc[0], sc[1] + 8 * sc[0]], -1).to(torch.bfloat16).contiguous()
        halves += [packed.view(-1), sz.view(torch.uint8).view(-1)]
    return torch.cat(halves)


def _write_random(fd: int, size: int) -> None:
    rng = np.random.default_rng(0)
    chunk = 4 << 20
    for _ in range(0, size, chunk):
        os.write(fd, rng.bytes(chunk))  # incompressible, so no layer below can shortcut it
    os.fsync(fd)


def _open_cold(name: str) -> tuple[int, bool]:
    try:
        return os.open(name, os.O_RDONLY | getattr(os, "O_DIRECT")), True
    except (AttributeError, OSError):
        fd = os.open(name, os.O_RDONLY)
        _drop_cache(fd)
        return fd, False


def _drop_cache(fd: int) -> None:
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)


def _read_rate(fd: int, region: tuple[int, int], block: int, n_threads: int, seconds: float,
               direct: bool) -> float:
    if not direct:
        _drop_cache(fd)
    start, length = region
    offsets = start + np.random.default_rng(block + n_threads).permutation(
        max(1, length // block)) * block
    shares = np.array_split(offsets, n_threads)
    done = [0] * n_threads
    deadline = time.perf_counter() + seconds
    workers = [threading.Thread(target=_reader, args=(fd, shares[i], block, deadline, done, i))
               for i in range(n_threads)]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(done) / (time.perf_counter() - t0)


def _reader(fd, offsets, block, deadline, done, i):
    buf = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT needs
    try:
        for j in range(0, len(offsets), 16):
            for off in offsets[j:j + 16]:
                done[i] += os.preadv(fd, [buf], int(off))
            if time.perf_counter() > deadline:  # checked every 16 reads, off the clock's path
                break
    finally:
        buf.close()


# -- memory, compute -----------------------------------------------------------------------------
def _one_thread(fn):
    import torch
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


def _best(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_memory(nbytes: int) -> tuple[float, float]:
    """-> (streaming read bytes/s, copy bytes/s), one thread."""
    import torch

    def run():
        x = torch.ones(nbytes // 4)
        y = torch.empty_like(x)
        y.copy_(x)
        t_read = _best(lambda: x.sum(), 3)
        t_copy = _best(lambda: y.copy_(x), 3)
        return nbytes / t_read, nbytes / t_copy
    return _one_thread(run)


def measure_torch(n_mats: int = 24, reps: int = 3) -> dict:
    """matvec (weight bytes/s), matmul (FLOP/s), dequant (encoded bytes/s), dispatch (s/op)."""
    return _one_thread(lambda: _measure_torch(n_mats, reps))


def _measure_torch(n_mats: int, reps: int) -> dict:
    import torch
    torch.manual_seed(0)
    ws = [torch.randn(ROWS, COLS) for _ in range(n_mats)]
    few = ws[:max(2, n_mats // 8)]  # dequantizing is compute-bound: no need to overflow caches
    held = {"f32": ws, "f16": [w.half() for w in ws], "bf16": [w.bfloat16() for w in ws],
            "q8": [_q8(w) for w in few], "q4": [_q4(w) for w in few]}
    if int4_available():  # q4 held the way the engine holds it: torch's int4 CPU kernel
        held["q4"] = [_int4(w) for w in ws]
    if hasattr(torch.ops.aten, "_weight_int8pack_mm"):  # q8: int8 rows, torch's int8 kernel
        held["q8"] = [_int8(w) for w in ws]
    x = torch.randn(COLS)
    X = torch.randn(128, COLS)
    out = {"device": "cpu", "matvec": {}, "matmul": {}, "dequant": {}}
    for dt, mats in held.items():
        _check(mats[0], ws[0], X[:4], dt)
        nb = sum(_nbytes(m) for m in mats)
        mv = _best(lambda: [_mul(m, x, dt) for m in mats], reps)
        mm = _best(lambda: [_mul(m, X, dt) for m in mats[:4]], reps)
        out["matvec"][dt] = nb / mv
        out["matmul"][dt] = 2 * 128 * ROWS * COLS * 4 / mm
    for dt in ("f16", "bf16", "q8", "q4"):  # a miss read into an f32 cache
        enc = held[dt] if dt in ("f16", "bf16") else [(_q8 if dt == "q8" else _q4)(w)
                                                      for w in few]
        out["dequant"][dt] = sum(map(_nbytes, enc)) / _best(lambda: [_deq(m, dt) for m in enc],
                                                            reps)
    if int4_available():  # a miss read into the int4 kernel's layout (unpack + repack)
        enc = [_q4(w) for w in few]
        out["repack"] = {"q4": sum(map(_nbytes, enc)) / _best(
            lambda: [_repack(m) for m in enc], reps)}
    out["dispatch_s"] = _dispatch()
    return out


def int4_available() -> bool:
    from tiercache.engine.kernels import int4_available as ok
    return ok()


def _check(m, w, X, dt) -> None:
    """A kernel's result against the float matmul of the weights it was made from, before it
    is timed: a wrong layout would otherwise be timed (and planned for) as if it worked."""
    ref = X @ w.T
    err = float((_mul(m, X, dt) - ref).abs().max())
    tol = {"f32": 1e-4, "f16": 0.02, "bf16": 0.05, "q8": 0.05, "q4": 0.3}[dt] * float(
        ref.abs().max())
    if not err <= tol:
        from tiercache.errors import TiercacheError
        raise TiercacheError(f"{dt} kernel gives wrong results on this CPU "
                         f"(max error {err:.3g} > {tol:.3g}); not timing it")


def _int4(w):
    """(packed uint8 [N/64, K, 32], scale-and-zero bf16 [K/32, N, 2]): the engine's layout
    (tiercache/engine/kernels.py) for its int4 kernel (`int4_mm`)."""
    return _repack(_q4(w))


def _int8(w):
    """("int8", q int8 [N, K], per-row scale bf16 [N]): the engine's q8 layout."""
    import torch
    scale = (w.abs().amax(1) / 127.0).clamp_min(1e-12)
    q = torch.round(w / scale[:, None]).to(torch.int8)
    return ("int8", q, scale.to(torch.bfloat16))


def _repack(m):
    import torch
    from tiercache.engine.kernels import int4_pack, int4_scales
    p, s, mn = m
    q = torch.stack([p & 0xF, p >> 4], -1).view(ROWS, COLS)
    return int4_pack(q), int4_scales(s.float(), mn.float())


def _q8(w):
    import torch
    g = w.view(ROWS, -1, GROUP)
    s = (g.abs().amax(-1) / 127).half()
    q = torch.round(g / s.float().unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return (q.view(ROWS, COLS), s)


def _q4(w):
    import torch
    g = w.view(ROWS, -1, GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    s, m = ((hi - lo) / 15).half(), lo.half()
    q = torch.round((g - m.float().unsqueeze(-1)) / s.float().unsqueeze(-1)).clamp(0, 15)
    q = q.to(torch.uint8).view(ROWS, COLS // 2, 2)
    return (q[..., 0] | (q[..., 1] << 4), s, m)


def _nbytes(m) -> int:
    parts = m if isinstance(m, tuple) else (m,)
    return sum(p.numel() * p.element_size() for p in parts if not isinstance(p, str))


def _deq(m, dt):
    import torch
    if dt == "q8":
        q, s = m
        return (q.view(ROWS, -1, GROUP).float() * s.float().unsqueeze(-1)).view(ROWS, COLS)
    if dt == "q4":
        p, s, mn = m
        q = torch.stack([p & 0xF, p >> 4], -1).view(ROWS, -1, GROUP).float()
        return (q * s.float().unsqueeze(-1) + mn.float().unsqueeze(-1)).view(ROWS, COLS)
    return m.float()


def _mul(m, x, dt):
    if isinstance(m, tuple) and m[0] == "int8":  # the engine's int8 kernel (kernels.int8_mm)
        from tiercache.engine.kernels import int8_mm
        return int8_mm(x.view(-1, COLS), m[1], m[2])
    if dt == "q4" and len(m) == 2:  # the engine's int4 kernel: [T, K] x [N, K]^T
        from tiercache.engine.kernels import int4_mm
        return int4_mm(x.view(-1, COLS), *m).float()
    w = _deq(m, dt) if dt in ("q8", "q4") else m
    x = x.to(w.dtype)
    return w @ x if x.dim() == 1 else x @ w.T  # [ROWS] or [T, ROWS]


def _dispatch() -> float:
    """Mean cost of an eager op in a decode layer's mix (cost.LAYER_OPS), on tiny tensors."""
    import torch
    import torch.nn.functional as F
    w, x = torch.randn(16, 64), torch.randn(64)
    q, kc = torch.randn(2, 1, 8), torch.randn(1, 2, 32, 8)
    ops = {"matvec": lambda: w @ x, "add": lambda: x + x, "mul": lambda: x * x,
           "reduce": lambda: x.pow(2).mean(-1), "unary": lambda: torch.rsqrt(x),
           "cat": lambda: torch.cat([x, x]), "view": lambda: x.view(8, 8)[:4],
           "copy": lambda: kc[0, :, 3].copy_(q[:, 0]),
           "sdpa": lambda: F.scaled_dot_product_attention(q.unsqueeze(0), kc, kc),
           "select": lambda: (x > 0).nonzero()}
    n = 100
    total = sum(LAYER_OPS[k] * _best(lambda: [op() for _ in range(n)], 3) / n
                for k, op in ops.items())
    return total / sum(LAYER_OPS.values())


def measure_ort(quick: bool) -> dict | None:
    """matmul throughput of onnxruntime's CPU provider at one thread, if it is installed."""
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    w = np.random.default_rng(0).standard_normal((COLS, ROWS)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, COLS])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, ROWS])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10  # DESIGN.md: ORT rejects newer IR versions
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    X = np.random.default_rng(1).standard_normal((128, COLS)).astype(np.float32)
    n = 2 if quick else 10
    t = _best(lambda: [sess.run(None, {"x": X}) for _ in range(n)], 3) / n
    x1 = X[:1]
    t1 = _best(lambda: [sess.run(None, {"x": x1}) for _ in range(n)], 3) / n
    return {"device": "cpu", "matmul": {"f32": 2 * 128 * ROWS * COLS / t},
            # one cached matrix: an upper bound for matvec, kept for completeness only
            "matvec": {"f32": ROWS * COLS * 4 / t1}, "dispatch_s": t1 / 2}


# -- system facts --------------------------------------------------------------------------------
def runtime_overhead() -> int:
    """VmRSS (bytes) of a fresh interpreter after importing the engine's runtime."""
    return runtime_footprint()[1]


def runtime_footprint() -> tuple[int, int, int, int]:
    """(VmRSS before, after) a fresh interpreter imports the engine's libraries and runs its
    first ops (torch allocates thread pools and kernel caches lazily), then its RssAnon and
    RssFile once it has also built a model as the engine does, in bytes."""
    code = ("def rss(f='VmRSS'):\n"
            " return int(open('/proc/self/status').read().split(f + ':')[1].split()[0])\n"
            "before = rss()\n"
            "import torch, numpy\n"
            "for name in ('lmdb', 'tokenizers', 'safetensors'):\n"
            " try:\n  __import__(name)\n except ImportError:\n  pass\n"
            "torch.set_num_threads(1)\n"
            "x = torch.ones(64, 64); q = torch.ones(1, 2, 4, 8)\n"
            "x @ x; torch.nn.functional.scaled_dot_product_attention(q, q, q)\n"
            "b = x.to(torch.bfloat16); ops = torch.ops.aten\n"
            "if hasattr(ops, '_weight_int4pack_mm_for_cpu'):\n"
            " p = torch.zeros(64, 32, dtype=torch.uint8)\n"
            " sz = torch.ones(2, 64, 2, dtype=b.dtype)\n"
            " ops._weight_int4pack_mm_for_cpu(b, p, 32, sz)\n"
            "if hasattr(ops, '_weight_int8pack_mm'):\n"
            " ops._weight_int8pack_mm(b, x.to(torch.int8), torch.ones(64, dtype=b.dtype))\n"
            "after = rss()\n"
            # the engine builds its model on the meta device first, as here: whatever torch
            # sets up for that is part of the runtime it measures (torch's reference ops
            # once imported sympy for it: +67 MB, until `tiercache.models.materialize`)
            "from tiercache.config import ModelArgs\n"
            "from tiercache.models import Model, materialize\n"
            "with torch.device('meta'):\n"
            " m = Model(ModelArgs('llama', 64, 1, 128, 4, 256, tie_word_embeddings=True))\n"
            "materialize(m)\n"
            "import ctypes\n"
            "try:\n ctypes.CDLL('libc.so.6').malloc_trim(0)\nexcept OSError:\n pass\n"
            "print(before, after, rss('RssAnon'), rss('RssFile'))\n")
    try:
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=120, check=True)
        before, after, anon, files = (int(v) * 1024 for v in res.stdout.split())
        return before, after, anon, files
    except (subprocess.SubprocessError, ValueError, OSError):
        return 0, 220_000_000, 0, 0  # DESIGN.md's figure, where /proc is absent


def ram_bytes() -> int:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = _cgroup_limit()
    return min(total, limit) if limit else total


def _cgroup_limit() -> int | None:
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, ctrl, rel = line.split(":", 2)
        cands = ([f"/sys/fs/cgroup/memory{rel}/memory.limit_in_bytes"] if "memory" in ctrl
                 else [f"/sys/fs/cgroup{rel}/memory.max"] if ctrl == "" else [])
        for c in cands:
            try:
                v = Path(c).read_text().strip()
            except OSError:
                continue
            if v.isdigit() and int(v) < 1 << 60:
                return int(v)
    return None


def readahead_bytes(where: Path) -> int:
    try:
        dev = os.stat(where).st_dev
        q = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
        for cand in (q / "queue/read_ahead_kb", q / "../queue/read_ahead_kb"):
            if cand.exists():
                return int(cand.read_text()) * 1024
    except (OSError, ValueError):
        pass
    return 128 * 1024


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _torch_version() -> str:
    import torch
    return torch.__version__
