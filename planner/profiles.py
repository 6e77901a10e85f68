"""Device profiles: what a machine can hold, read and compute, each figure with its source.

The flash read curve is a table of (block_bytes, parallel_reads) -> bytes/s measured cold (no
page cache), interpolated in log(block size) and log(parallel reads). Below the smallest block a
read costs as long as the smallest one (IOPS-bound); above the largest, bandwidth stays flat.

Compute is per backend ("torch", "torch:cuda", "ort:CPUExecutionProvider", ...):
  matvec[dtype]   weight bytes per second streamed through y = W x, W held in that dtype
  matmul[dtype]   FLOP/s of Y = X W^T for a prompt-sized X, W held in that dtype
  dequant[dtype]  encoded bytes per second turned into f32 (a miss read into an f32 cache)
  repack[dtype]   encoded bytes per second turned into the int4 kernel's layout (q4 misses)
  dispatch_s      seconds of fixed cost per operator call (framework overhead)
Figures are for `threads` compute threads.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from tiercache.errors import TiercacheError, load_json_object

PAGE = 4096
DTYPES = ("f32", "f16", "bf16", "q8", "q4")
# figures every profile must cite; GPU figures only where there is a GPU
SOURCED = ("ram_bytes", "flash", "memory_bw", "copy_bw", "compute", "runtime_overhead_bytes")
SOURCED_GPU = ("vram_bytes", "vram_bw", "h2d_bw")


@dataclass
class DeviceProfile:
    name: str
    description: str
    ram_bytes: int
    flash: list[list[float]]  # [[block_bytes, parallel_reads, bytes_per_s], ...]
    memory_bw: float  # bytes/s, one thread streaming reads from RAM
    copy_bw: float  # bytes/s copied (memcpy), one thread
    compute: dict[str, dict]
    runtime_overhead_bytes: int  # process RSS once the runtime is imported (python + torch)
    sources: dict[str, str]
    vram_bytes: int = 0
    unified_memory: bool = False
    vram_bw: float = 0.0
    h2d_bw: float = 0.0  # host -> device bytes/s (pinned copies)
    h2d_latency_s: float = 0.0  # one small transfer + synchronisation
    gpu_runtime_overhead_bytes: int = 0  # host RSS the GPU runtime adds (CUDA context)
    # of that: anonymous memory (with torch's set-up for a model), and the file pages it maps;
    # 0 where not measured (then the whole overhead counts as anonymous)
    runtime_anon_bytes: int = 0
    runtime_file_bytes: int = 0
    direct_io: bool = True  # O_DIRECT reads work on the store's filesystem
    readahead_bytes: int = 128 * 1024  # kernel read-ahead window for buffered/mmap reads
    miss_overhead_s: float = 600e-6  # software cost of one cache miss beyond its read
    threads: int = 1
    measured: bool = False
    host: str = ""  # hostname a probed profile was measured on
    probe_version: int = 0  # the probe that measured it (probe.PROBE_VERSION); older: re-probe
    notes: list[str] = field(default_factory=list)

    # -- flash curve ---------------------------------------------------------------------------
    def flash_bw(self, block: float, parallel: float = 1) -> float:
        """Cold read bandwidth (bytes/s) for reads of `block` bytes, `parallel` at a time."""
        cache = self.__dict__.setdefault("_bw_cache", {})  # not a field: never serialised
        key = (float(block), float(parallel), id(self.flash), len(self.flash))
        if key not in cache:
            cache[key] = self._flash_bw(block, parallel)
        return cache[key]

    def _flash_bw(self, block: float, parallel: float) -> float:
        levels = sorted({int(p) for _, p, _ in self.flash})
        lo = max([p for p in levels if p <= parallel], default=levels[0])
        hi = min([p for p in levels if p >= parallel], default=levels[-1])
        b_lo, b_hi = self._bw_at(block, lo), self._bw_at(block, hi)
        if hi == lo:
            return b_lo
        t = (math.log(parallel) - math.log(lo)) / (math.log(hi) - math.log(lo))
        return math.exp((1 - t) * math.log(b_lo) + t * math.log(b_hi))

    def _bw_at(self, block: float, parallel: int) -> float:
        pts = sorted((b, bw) for b, p, bw in self.flash if int(p) == parallel)
        if block <= pts[0][0]:
            return pts[0][1] * block / pts[0][0]  # same time per read: IOPS-bound
        if block >= pts[-1][0]:
            return pts[-1][1]
        for (b0, w0), (b1, w1) in zip(pts, pts[1:]):
            if b0 <= block <= b1:
                t = (math.log(block) - math.log(b0)) / (math.log(b1) - math.log(b0))
                return math.exp((1 - t) * math.log(w0) + t * math.log(w1))
        raise AssertionError("unreachable")

    def read_time(self, nbytes: float, block: float, parallel: float = 1) -> float:
        """Seconds to read `nbytes` in reads of `block` bytes, `parallel` in flight."""
        if nbytes <= 0:
            return 0.0
        return nbytes / self.flash_bw(min(block, max(nbytes, PAGE)), parallel)

    @property
    def max_parallel(self) -> int:
        return max(int(p) for _, p, _ in self.flash)

    @property
    def runtime_anon(self) -> int:
        """Anonymous memory of the runtime before a model loads (what the engine measures)."""
        return self.runtime_anon_bytes or self.runtime_overhead_bytes

    # -- compute -------------------------------------------------------------------------------
    def backends(self, kind: str | None = None) -> list[str]:
        return [b for b, c in self.compute.items() if kind is None or c.get("device") == kind]

    def matvec(self, backend: str, dtype: str) -> float:
        return _lookup(self.compute[backend]["matvec"], dtype, backend, "matvec")

    def matmul(self, backend: str, dtype: str) -> float:
        return _lookup(self.compute[backend]["matmul"], dtype, backend, "matmul")

    def dequant(self, backend: str, dtype: str) -> float:
        table = self.compute[backend].get("dequant", {})
        return table.get(dtype) or self.copy_bw

    def dispatch(self, backend: str) -> float:
        return float(self.compute[backend].get("dispatch_s", 0.0))

    @property
    def has_gpu(self) -> bool:
        return bool(self.backends("gpu")) and (self.vram_bytes > 0 or self.unified_memory)

    # -- (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DeviceProfile":
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                   and f.name not in d]
        if missing:
            raise TiercacheError(f"device profile lacks {', '.join(missing)}")
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_json(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def from_json(cls, path) -> "DeviceProfile":
        return cls.from_dict(load_json_object(path, "device profile")).validate()

    def validate(self) -> "DeviceProfile":
        problems = _problems(self)
        if problems:
            raise TiercacheError(f"device profile '{self.name}' is invalid: {'; '.join(problems)}")
        return self

    def scaled(self, flash: float = 1.0, compute: float = 1.0) -> "DeviceProfile":
        """A copy with a faster (factor > 1) or slower disk and compute: for what-ifs and tests."""
        fl = [[b, p, bw * flash] for b, p, bw in self.flash]
        comp = json.loads(json.dumps(self.compute))
        for c in comp.values():
            for op in ("matvec", "matmul", "dequant", "repack"):
                c[op] = {k: v * compute for k, v in c.get(op, {}).items()}
            c["dispatch_s"] = c.get("dispatch_s", 0.0) / compute
        return dataclasses.replace(self, flash=fl, compute=comp, name=f"{self.name}*")


def _lookup(table: dict, dtype: str, backend: str, op: str) -> float:
    if dtype in table:
        return float(table[dtype])
    raise TiercacheError(f"device profile has no {op} figure for {dtype} on {backend}")


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 and math.isfinite(x)


def _problems(p: DeviceProfile) -> list[str]:
    out = []
    for name in ("ram_bytes", "memory_bw", "copy_bw", "runtime_overhead_bytes"):
        if not _positive(getattr(p, name)):
            out.append(f"{name} must be a positive number")
    if not p.flash or any(len(e) != 3 or not all(_positive(x) for x in e) for e in p.flash):
        out.append("flash must be a non-empty list of [block_bytes, parallel_reads, bytes/s]")
    out += _compute_problems(p.compute)
    if p.vram_bytes and not (_positive(p.vram_bw) and _positive(p.h2d_bw)):
        out.append("a device with VRAM needs vram_bw and h2d_bw")
    need = SOURCED + (SOURCED_GPU if p.vram_bytes else ())
    out += [f"no source for {k}" for k in need if not str(p.sources.get(k, "")).strip()]
    return out


def _compute_problems(compute: dict) -> list[str]:
    if not isinstance(compute, dict) or not compute:
        return ["compute must name at least one backend"]
    out = []
    for name, c in compute.items():
        if c.get("device") not in ("cpu", "gpu", "npu"):
            out.append(f"compute[{name}].device must be cpu, gpu or npu")
        for op in ("matvec", "matmul"):
            table = c.get(op) or {}
            if "f32" not in table and c.get("device") != "npu":
                out.append(f"compute[{name}].{op} needs an f32 figure")
            if any(k not in DTYPES or not _positive(v) for k, v in table.items()):
                out.append(f"compute[{name}].{op} has a bad entry")
    if not any(c.get("device") == "cpu" for c in compute.values()):
        out.append("compute needs a cpu backend")
    return out


# -- where profiles come from --------------------------------------------------------------------
def list_presets() -> list[str]:
    from .presets import PRESETS
    return list(PRESETS)


def preset(name: str) -> DeviceProfile:
    from .presets import PRESETS
    if name not in PRESETS:
        raise TiercacheError(f"unknown device '{name}' (presets: {', '.join(PRESETS)}; "
                             "or 'this', or a profile JSON file)")
    return PRESETS[name]().validate()


def resolve_device(device) -> DeviceProfile:
    """A DeviceProfile, a preset name, "this" (probed once, cached), or a JSON file."""
    if isinstance(device, DeviceProfile):
        return device.validate()
    text = str(device)
    if text == "this":
        from .probe import this_machine
        return this_machine()
    if text.endswith(".json") or Path(text).is_file():
        return DeviceProfile.from_json(text)
    return preset(text)
