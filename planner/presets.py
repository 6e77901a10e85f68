"""Device presets built from published figures; every figure names its source.

Hardware figures (RAM, DRAM and VRAM bandwidth, FLOP/s, storage data sheets) are published
numbers. Three things no data sheet gives are stated assumptions, the same for every preset:
  - one CPU core streams CORE_BW_SHARE of the DRAM's peak bandwidth;
  - torch reaches that bandwidth on f32 matvecs, and other dtypes run at the ratios to f32 that
    planner/probe.py measured on the reference VM (TORCH_RATIO; dequantizing q4 in torch is slow);
  - the Python + torch runtime is ~220 MB RSS (DESIGN.md, measured on the reference VM).
Flash curves come from `_nvme_curve` (QD1 latency from the QD1 4K IOPS figure, bandwidth
capped by the sequential figure and the high-queue-depth IOPS figure) or, for phones, from the
published block-size curve.
"""
from __future__ import annotations

from .profiles import DeviceProfile

GiB = 1 << 30
BLOCKS = (4096, 16384, 65536, 262144, 1 << 20, 4 << 20)
PARALLEL = (1, 2, 4, 8)
RUNTIME = 220_000_000
RUNTIME_SRC = "DESIGN.md: `import torch` ~220 MB RSS (reference VM); assumed the same here"
# torch CPU kernels relative to an f32 matvec (bandwidth-bound) / f32 matmul; measured by
# planner/probe.py on the reference VM (Xeon, torch 2.13, 1 thread). bf16 matmul is not
# carried over: its 2x+ came from AMX, which these CPUs lack.
# q4 is torch's int4 CPU kernel (`_weight_int4pack_mm_for_cpu`), as the engine runs it.
TORCH_RATIO = {"matvec": {"f32": 1.0, "f16": 0.25, "bf16": 0.5, "q8": 0.05, "q4": 0.42},
               "matmul": {"f32": 1.0, "f16": 1.0, "bf16": 1.0, "q8": 0.7, "q4": 0.28},
               "dequant": {"f16": 0.15, "bf16": 0.3, "q8": 0.1, "q4": 0.011},
               "repack": {"q4": 0.023}}
MISS_SRC = "150 x the CPU op cost (ratio measured by planner/probe.py on the reference VM)"
RATIO_SRC = ("dtype ratios to f32 measured by planner/probe.py (torch 2.13, 1 thread) on the "
             "reference VM")
CUDA_DISPATCH = 10e-6  # a torch eager CUDA op: launch + Python, ~10 us (assumption)
MISS_OPS = 150  # a cache miss's software cost in mean-op units: ~0.6-0.9 ms at ~4-6 us per op,
# measured by planner/probe.py on the reference VM
CPU_DISPATCH = 6e-6  # a torch eager CPU op, measured ~3-8 us on the reference VM


def _nvme_curve(qd1_iops: float, seq_bw: float, max_iops: float) -> list[list[float]]:
    """bw(b, p) = min(p * b / (lat + b / seq), max_iops * b, seq), lat from QD1 4K IOPS."""
    lat = 1 / qd1_iops - 4096 / seq_bw
    return [[b, p, min(p * b / (lat + b / seq_bw), max_iops * b, seq_bw)]
            for b in BLOCKS for p in PARALLEL]


def _published_curve(points: list[tuple[int, float]]) -> list[list[float]]:
    """A block-size curve published at one parallelism, used for every thread count."""
    return [[b, p, bw] for b, bw in points for p in PARALLEL]


def _cpu(core_bw: float, core_flops: float, dispatch: float = CPU_DISPATCH) -> dict:
    return {"device": "cpu",
            "matvec": {k: core_bw * r for k, r in TORCH_RATIO["matvec"].items()},
            "matmul": {k: core_flops * r for k, r in TORCH_RATIO["matmul"].items()},
            "dequant": {k: core_bw * r for k, r in TORCH_RATIO["dequant"].items()},
            "repack": {k: core_bw * r for k, r in TORCH_RATIO["repack"].items()},
            "dispatch_s": dispatch}


def _gpu(vram_bw: float, fp32: float, fp16: float) -> dict:
    eff = 0.7  # share of peak a torch eager kernel reaches (assumption)
    return {"device": "gpu",
            "matvec": {"f32": vram_bw * eff, "f16": vram_bw * eff, "bf16": vram_bw * eff,
                       "q8": vram_bw * eff * 0.5, "q4": vram_bw * eff * 0.5},
            "matmul": {"f32": fp32 * eff, "f16": fp16 * eff, "bf16": fp16 * eff,
                       "q8": fp16 * eff * 0.5, "q4": fp16 * eff * 0.5},
            "dequant": {"f16": vram_bw * eff, "q8": vram_bw * eff * 0.5,
                        "q4": vram_bw * eff * 0.5},
            "dispatch_s": CUDA_DISPATCH}


def phone_12gb_ufs4() -> DeviceProfile:
    peak = 76.8e9  # LPDDR5X-4800 (9600 MT/s), 64-bit bus
    core_bw, core_flops = peak * CORE_BW_SHARE["phone"], 3.3e9 * 32 * 0.5
    return DeviceProfile(
        name="phone-12gb-ufs4",
        description="flagship phone: Snapdragon 8 Gen 3 (Cortex-X4 3.3 GHz), 12 GB LPDDR5X, "
                    "UFS 4.0 (PowerInfer-2's OnePlus 12 class)",
        ram_bytes=12 * GiB, unified_memory=True, memory_bw=core_bw, copy_bw=core_bw / 2,
        flash=_published_curve([(4096, 450e6), (524288, 4.0e9), (4 << 20, 4.2e9)]),
        compute={"torch": _cpu(core_bw, core_flops)}, runtime_overhead_bytes=RUNTIME,
        miss_overhead_s=MISS_OPS * CPU_DISPATCH,
        readahead_bytes=128 * 1024,
        sources={
            "ram_bytes": "12 GB LPDDR5X configuration (OnePlus 12 spec sheet)",
            "flash": "PowerInfer-2 (Xue et al. 2024, arXiv:2406.06282): UFS 4.0 reads ~450 "
                     "MB/s at 4 KB to ~4 GB/s at 512 KB; 4.2 GB/s sequential (Samsung UFS 4.0 "
                     "announcement, 2022); thread count not modelled",
            "memory_bw": f"Snapdragon 8 Gen 3 product brief: LPDDR5X 4800 MHz x 64-bit = 76.8 "
                         f"GB/s peak; x {CORE_BW_SHARE['phone']} for one core (assumption)",
            "copy_bw": "half of memory_bw (a copy reads and writes)",
            "compute": "Cortex-X4: 4x128-bit FP/NEON pipes = 32 f32 FLOP/cycle at 3.3 GHz, 50% "
                       f"reached (assumption); {RATIO_SRC}",
            "runtime_overhead_bytes": RUNTIME_SRC,
            "miss_overhead_s": MISS_SRC,
            "readahead_bytes": "Linux default read_ahead_kb = 128"})


def phone_8gb_ufs31() -> DeviceProfile:
    peak = 51.2e9  # LPDDR5-3200 (6400 MT/s), 64-bit
    core_bw, core_flops = peak * CORE_BW_SHARE["phone"], 2.84e9 * 32 * 0.5
    return DeviceProfile(
        name="phone-8gb-ufs31",
        description="2021 flagship phone: Snapdragon 888 (Cortex-X1 2.84 GHz), 8 GB LPDDR5, "
                    "UFS 3.1",
        ram_bytes=8 * GiB, unified_memory=True, memory_bw=core_bw, copy_bw=core_bw / 2,
        flash=_published_curve([(4096, 100_000 * 4096), (524288, 2.1e9)]),
        compute={"torch": _cpu(core_bw, core_flops)}, runtime_overhead_bytes=RUNTIME,
        miss_overhead_s=MISS_OPS * CPU_DISPATCH,
        readahead_bytes=128 * 1024,
        sources={
            "ram_bytes": "8 GB LPDDR5 configuration (Snapdragon 888 phones)",
            "flash": "Samsung eUFS 3.1 announcement (2020): 2,100 MB/s sequential read, "
                     "100,000 IOPS random read (= 410 MB/s at 4 KB, high queue depth); "
                     "log-log between them; thread count not modelled",
            "memory_bw": "Snapdragon 888 product brief: LPDDR5 3200 MHz x 64-bit = 51.2 GB/s "
                         f"peak; x {CORE_BW_SHARE['phone']} for one core (assumption)",
            "copy_bw": "half of memory_bw (a copy reads and writes)",
            "compute": "Cortex-X1: 4x128-bit NEON = 32 f32 FLOP/cycle at 2.84 GHz, 50% reached "
                       f"(assumption); {RATIO_SRC}",
            "runtime_overhead_bytes": RUNTIME_SRC,
            "miss_overhead_s": MISS_SRC,
            "readahead_bytes": "Linux default read_ahead_kb = 128"})


def laptop_8gb_nvme() -> DeviceProfile:
    peak = 51.2e9  # DDR4-3200 dual channel
    core_bw, core_flops = peak * CORE_BW_SHARE["laptop"], 4.2e9 * 32 * 0.5
    return DeviceProfile(
        name="laptop-8gb-nvme",
        description="thin laptop: 4-core x86 (AVX2, 4.2 GHz turbo), 8 GB DDR4-3200, PCIe 3.0 "
                    "NVMe (Samsung 980 class)",
        ram_bytes=8 * GiB, memory_bw=core_bw, copy_bw=core_bw / 2,
        flash=_nvme_curve(qd1_iops=17_000, seq_bw=3.5e9, max_iops=500_000),
        compute={"torch": _cpu(core_bw, core_flops)}, runtime_overhead_bytes=RUNTIME,
        miss_overhead_s=MISS_OPS * CPU_DISPATCH,
        sources={
            "ram_bytes": "8 GB configuration",
            "flash": "Samsung 980 data sheet: 3,500 MB/s sequential read, 4 KB random read "
                     "17,000 IOPS at QD1 and 500,000 IOPS at QD32; curve from _nvme_curve",
            "memory_bw": "DDR4-3200 dual channel = 51.2 GB/s peak; x "
                         f"{CORE_BW_SHARE['laptop']} for one core (assumption)",
            "copy_bw": "half of memory_bw (a copy reads and writes)",
            "compute": "AVX2: 2 FMA x 8 f32 = 32 FLOP/cycle at 4.2 GHz, 50% reached "
                       f"(assumption); {RATIO_SRC}",
            "runtime_overhead_bytes": RUNTIME_SRC,
            "miss_overhead_s": MISS_SRC,
            "readahead_bytes": "Linux default read_ahead_kb = 128"})


def laptop_16gb_rtx4060_8gb() -> DeviceProfile:
    peak = 89.6e9  # DDR5-5600 dual channel
    core_bw, core_flops = peak * CORE_BW_SHARE["laptop"], 4.5e9 * 32 * 0.5
    vram_bw = 256e9  # 128-bit GDDR6 at 16 Gbps
    return DeviceProfile(
        name="laptop-16gb-rtx4060-8gb",
        description="gaming laptop: 16 GB DDR5-5600, GeForce RTX 4060 Laptop 8 GB, PCIe 4.0 "
                    "NVMe",
        ram_bytes=16 * GiB, vram_bytes=8 * GiB, memory_bw=core_bw, copy_bw=core_bw / 2,
        vram_bw=vram_bw, h2d_bw=16e9 * 0.8, h2d_latency_s=10e-6,
        gpu_runtime_overhead_bytes=500_000_000,
        flash=_nvme_curve(qd1_iops=17_000, seq_bw=7.0e9, max_iops=1_000_000),
        compute={"torch": _cpu(core_bw, core_flops),
                 "torch:cuda": _gpu(vram_bw, fp32=15.1e12, fp16=60e12)},
        runtime_overhead_bytes=RUNTIME, miss_overhead_s=MISS_OPS * CPU_DISPATCH,
        sources={
            "ram_bytes": "16 GB configuration", "vram_bytes": "RTX 4060 Laptop: 8 GB GDDR6",
            "vram_bw": "RTX 4060 Laptop: 128-bit GDDR6 at 16 Gbps = 256 GB/s",
            "h2d_bw": "PCIe 4.0 x8 (RTX 4060 Laptop) = 16 GB/s, 80% reached (assumption)",
            "flash": "Samsung PM9A1 data sheet: 7,000 MB/s sequential read, 1,000,000 IOPS "
                     "random read; QD1 17,000 IOPS as the 980 (assumption); _nvme_curve",
            "memory_bw": "DDR5-5600 dual channel = 89.6 GB/s peak; x "
                         f"{CORE_BW_SHARE['laptop']} for one core (assumption)",
            "copy_bw": "half of memory_bw (a copy reads and writes)",
            "compute": "CPU: 32 f32 FLOP/cycle at 4.5 GHz, 50% (assumption), "
                       f"{RATIO_SRC}; GPU: NVIDIA spec 3072 CUDA cores at 2.46 GHz = 15.1 "
                       "TFLOPS f32, ~60 TFLOPS f16 tensor (dense, f32 accumulate), 70% reached "
                       "(assumption)",
            "runtime_overhead_bytes": RUNTIME_SRC,
            "miss_overhead_s": MISS_SRC,
            "gpu_runtime_overhead_bytes": "CUDA context + cuBLAS host RSS, ~500 MB (assumption)",
            "readahead_bytes": "Linux default read_ahead_kb = 128"})


def desktop_rtx4090_24gb() -> DeviceProfile:
    peak = 89.6e9  # DDR5-5600 dual channel
    core_bw, core_flops = peak * CORE_BW_SHARE["desktop"], 5.5e9 * 32 * 0.5
    vram_bw = 1008e9
    return DeviceProfile(
        name="desktop-rtx4090-24gb",
        description="desktop: 64 GB DDR5-5600, GeForce RTX 4090 24 GB, PCIe 4.0 NVMe "
                    "(Samsung 990 PRO)",
        ram_bytes=64 * GiB, vram_bytes=24 * GiB, memory_bw=core_bw, copy_bw=core_bw / 2,
        vram_bw=vram_bw, h2d_bw=32e9 * 0.8, h2d_latency_s=8e-6,
        gpu_runtime_overhead_bytes=500_000_000,
        flash=_nvme_curve(qd1_iops=22_000, seq_bw=7.45e9, max_iops=1_400_000),
        compute={"torch": _cpu(core_bw, core_flops),
                 "torch:cuda": _gpu(vram_bw, fp32=82.6e12, fp16=165.2e12)},
        runtime_overhead_bytes=RUNTIME, miss_overhead_s=MISS_OPS * CPU_DISPATCH,
        sources={
            "ram_bytes": "64 GB configuration", "vram_bytes": "RTX 4090: 24 GB GDDR6X",
            "vram_bw": "RTX 4090: 384-bit GDDR6X at 21 Gbps = 1,008 GB/s (NVIDIA spec)",
            "h2d_bw": "PCIe 4.0 x16 = 32 GB/s, 80% reached (assumption)",
            "flash": "Samsung 990 PRO data sheet: 7,450 MB/s sequential read, random read "
                     "22,000 IOPS at QD1 and 1,400,000 at high QD; _nvme_curve",
            "memory_bw": "DDR5-5600 dual channel = 89.6 GB/s peak; x "
                         f"{CORE_BW_SHARE['desktop']} for one core (assumption)",
            "copy_bw": "half of memory_bw (a copy reads and writes)",
            "compute": f"CPU: 32 f32 FLOP/cycle at 5.5 GHz, 50% (assumption), {RATIO_SRC}; "
                       "GPU: Ada whitepaper: 82.6 TFLOPS f32, 165.2 TFLOPS f16 tensor with f32 "
                       "accumulate (dense), 70% reached (assumption)",
            "runtime_overhead_bytes": RUNTIME_SRC,
            "miss_overhead_s": MISS_SRC,
            "gpu_runtime_overhead_bytes": "CUDA context + cuBLAS host RSS, ~500 MB (assumption)",
            "readahead_bytes": "Linux default read_ahead_kb = 128"})


def rpi5_8gb() -> DeviceProfile:
    peak = 17.1e9  # LPDDR4X-4267, 32-bit
    core_bw, core_flops = peak * CORE_BW_SHARE["rpi"], 2.4e9 * 16 * 0.5
    return DeviceProfile(
        name="rpi5-8gb",
        description="Raspberry Pi 5 8 GB: 4x Cortex-A76 2.4 GHz, LPDDR4X-4267, A2 microSD "
                    "(SDR104)",
        ram_bytes=8 * GiB, memory_bw=core_bw, copy_bw=core_bw / 2,
        flash=_nvme_curve(qd1_iops=1_500, seq_bw=90e6, max_iops=4_000),
        compute={"torch": _cpu(core_bw, core_flops, dispatch=CPU_DISPATCH * 2)},
        runtime_overhead_bytes=RUNTIME, miss_overhead_s=MISS_OPS * CPU_DISPATCH * 2,
        sources={
            "ram_bytes": "Raspberry Pi 5 product brief: 8 GB LPDDR4X-4267",
            "flash": "SD Association performance classes: A1 >= 1,500 and A2 >= 4,000 random "
                     "read IOPS (taken as QD1 and high-QD); SDR104 bus 104 MB/s, ~90 MB/s "
                     "sequential (Raspberry Pi 5 product brief: SDR104); _nvme_curve",
            "memory_bw": "LPDDR4X-4267 x 32-bit = 17.1 GB/s peak; x "
                         f"{CORE_BW_SHARE['rpi']} for one core (assumption)",
            "copy_bw": "half of memory_bw (a copy reads and writes)",
            "compute": "Cortex-A76: 2x128-bit NEON = 16 f32 FLOP/cycle at 2.4 GHz, 50% "
                       f"(assumption); {RATIO_SRC}; dispatch 2x the reference VM's (slower core)",
            "runtime_overhead_bytes": RUNTIME_SRC,
            "miss_overhead_s": MISS_SRC,
            "readahead_bytes": "Linux default read_ahead_kb = 128"})


# share of peak DRAM bandwidth one core streams (assumption; a single core cannot fill a
# multi-channel controller: ~25-40% on phones and PCs, more on the Pi's narrow bus)
CORE_BW_SHARE = {"phone": 0.25, "laptop": 0.3, "desktop": 0.4, "rpi": 0.4}

PRESETS = {
    "phone-12gb-ufs4": phone_12gb_ufs4,
    "phone-8gb-ufs31": phone_8gb_ufs31,
    "laptop-8gb-nvme": laptop_8gb_nvme,
    "laptop-16gb-rtx4060-8gb": laptop_16gb_rtx4060_8gb,
    "desktop-rtx4090-24gb": desktop_rtx4090_24gb,
    "rpi5-8gb": rpi5_8gb,
}
