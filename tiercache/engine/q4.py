"""tiercache's own int4 x int8 kernel (tiercache/_q4.c) on the int4 layout weights already have
in RAM (kernels.py: this CPU's row block of 32 or 64, bf16 scale and zero per group of 32), so a
cluster read from the store is computed on as read, pinned, cached or streamed alike, and takes
no more RAM than its stored bytes (ORT's prepacked MatMulNBits takes ~1.4x).

Activations are quantized to int8 per group of 32, as llama.cpp's q8_0 and MatMulNBits'
accuracy_level 4 do. Three paths, picked by the CPU's flags at run time: AVX-512 VNNI
(vpdpbusd, whole groups summed in int32; prompts on row blocks unpacked once and read by three
activation rows at a time: 2x ORT's MatMulNBits at 128 rows on Zen 5), AVX2/FMA (maddubs; a
prompt's rows one by one per block, ~1.3x torch's int4 kernel, below ORT's GEMM), and scalar C
elsewhere. The best one that matches a float reference on a small block here is used
(`available`), so a CPU that reports a flag it cannot run falls back (tools/bench_kernels.py).
"""
from __future__ import annotations

import functools
import os
import sys
from typing import TYPE_CHECKING

import numpy as np

from ..store.dtypes import GROUP

if TYPE_CHECKING:  # torch is imported by the functions on torch tensors, not for the check
    import torch

_THREADS: list = []  # set by share_threads


def threads() -> int:
    """Threads for this kernel and ORT's sessions: what `share_threads` gave them, else torch's
    (1 where torch is not loaded: the lean runtime always shares them)."""
    if _THREADS:
        return _THREADS[-1]
    return sys.modules["torch"].get_num_threads() if "torch" in sys.modules else 1


def share_threads(n: int) -> None:
    """n threads for the kernels that do the work (this one, ORT's), 1 for torch's ops, which
    at decode are small ones between them. Where all take n, the spinning workers of each pool
    keep the others' off the 2 cores: 1B shape, 2 threads, resident, decode 9.8-10.4 tok/s on
    this kernel (11.2-12.6 on ORT's MatMulNBits) against 13.3-14.3 (12.4-13.2) so; prompts of
    128 tokens ~40-50 tok/s either way. Only where this kernel runs (torch's int4 one needs
    torch's threads); torch is not imported for it."""
    if available():
        _THREADS[:] = [max(1, n)]
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(1)


@functools.cache
def _ext():
    try:
        from .. import _q4
    except ImportError:  # built without a C compiler: torch's kernel does it all
        return None
    return _q4


ISAS = {"scalar": 0, "avx2": 1, "vnni": 2}  # the C side's ISA_* values


def isas() -> list[str]:
    """The paths this CPU's flags allow, best first ([] without the extension).
    TIERCACHE_ISA=avx2 (or scalar) caps them, to run as a CPU without the better ones."""
    ext = _ext()
    names = {v: k for k, v in ISAS.items()}
    cap = ISAS.get(os.environ.get("TIERCACHE_ISA", ""), max(ISAS.values()))
    return [names[i] for i in ext.isas() if i <= cap] if ext is not None else []


def path() -> str | None:
    """'vnni', 'avx2' or 'scalar' (the one that runs here), None when the extension is
    missing or no path's result matches the reference on this CPU."""
    return _checked()


def available() -> bool:
    return _checked() is not None


@functools.cache
def _checked() -> str | None:
    for isa in isas():
        if all(_matches(isa, bn) for bn in (32, 64)) and _matches8(isa):
            return isa
    return None


def _bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits (uint16), rounded to nearest even."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _f32(bf16: np.ndarray) -> np.ndarray:
    return (bf16.astype(np.uint32) << 16).view(np.float32)


def _matches(isa: str, bn: int) -> bool:
    """The kernel against dequantized floats on two row blocks of `bn` rows, K 128, for 1 and
    5 activation rows (VNNI: a decode row on the packed bytes, a prompt on unpacked ones)."""
    g = np.random.default_rng(1)
    n, k = 2 * bn, 128
    q = g.integers(0, 16, (n, k), dtype=np.uint8)
    sz = _bf16(g.standard_normal((k // GROUP, n, 2)) * 0.05)   # [K/32, N, (scale, zero)]
    packed = pack_np(q, bn)
    for sz in (sz, np.ascontiguousarray(sz[..., 0])):           # pairs; scales alone
        s = _f32(sz.reshape(k // GROUP, n, -1)).transpose(1, 0, 2)[:, :, None, :]  # [N, G, 1, *]
        zero = s[..., 1] if s.shape[-1] == 2 else 0.0
        w = ((q.astype(np.float32) - 8).reshape(n, -1, GROUP) * s[..., 0] + zero).reshape(n, k)
        for rows in (1, 5):
            x = g.standard_normal((rows, k)).astype(np.float32)
            ref = x @ w.T
            try:
                y = gemm_np(x, [(packed, sz)], bn, 1, isa)[0]
            except (RuntimeError, ValueError):
                return False
            if not np.abs(y - ref).max() <= 0.02 * np.abs(ref).max():
                return False
    return True


def _matches8(isa: str) -> bool:
    """The int8-row kernel against floats on [70, 128] (a last block of 6 rows)."""
    g = np.random.default_rng(2)
    q = g.integers(-127, 128, (70, 128), dtype=np.int8)
    scale = _bf16(g.random(70) * 0.01 + 0.001)
    x = g.standard_normal((2, 128)).astype(np.float32)
    ref = x @ (q.astype(np.float32) * _f32(scale)[:, None]).T
    try:
        y = gemm8_np(x, q, scale, 1, isa)
    except (RuntimeError, ValueError):
        return False
    return bool(np.abs(y - ref).max() <= 0.02 * np.abs(ref).max())


def pack_np(q: np.ndarray, bn: int) -> np.ndarray:
    """q uint8 [N, K] -> row blocks of bn: [N/bn, K, bn/2], byte j holding rows j and j+bn/2."""
    n, k = q.shape
    q = q.reshape(n // bn, 2, bn // 2, k)
    return np.ascontiguousarray((q[:, 0] | (q[:, 1] << 4)).transpose(0, 2, 1))


def gemm_np(x: np.ndarray, weights: list, bn: int, threads: int, isa: str) -> list:
    """x f32 [T, K] @ each (packed u8, sz bf16 bits: (scale, zero) pairs [K/32, N, 2], or
    scales alone [K/32, N] where every zero is 0) -> [T, N] f32 (numpy; the lean runtime and
    the CPU check)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    m, k = x.shape
    mats, ys = [], []
    for packed, sz in weights:
        n = sz.shape[1]
        if (not (packed.flags.c_contiguous and sz.flags.c_contiguous) or packed.size != n * k // 2
                or sz.size != n * k // GROUP * (sz.ndim - 1)):
            raise ValueError(f"q4 mm: packed {packed.shape}, sz {sz.shape} for K {k}")
        ys.append(np.empty((m, n), np.float32))
        mats.append((packed.ctypes.data, sz.ctypes.data, n, ys[-1].ctypes.data, int(sz.ndim == 2)))
    _ext().gemm(x.ctypes.data, m, k, mats, bn, threads, ISAS[isa])
    return ys


def gemm8_np(x: np.ndarray, q: np.ndarray, scale: np.ndarray, threads: int, isa: str):
    """x f32 [T, K] @ (int8 rows q [N, K] * bf16 bits scale [N])^T -> [T, N] f32 (numpy)."""
    n, k = q.shape
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not q.flags.c_contiguous or scale.dtype != np.uint16 or scale.size != n:
        raise ValueError(f"q8 mm: q {q.shape}, scale {scale.shape}")
    y = np.empty((x.shape[0], n), np.float32)
    _ext().gemm8(x.ctypes.data, x.shape[0], k, q.ctypes.data,
                 np.ascontiguousarray(scale).ctypes.data, n, y.ctypes.data, threads, ISAS[isa])
    return y


def pack(q: torch.Tensor, bn: int) -> torch.Tensor:
    """`pack_np` on a torch uint8 tensor."""
    import torch
    return torch.from_numpy(pack_np(q.numpy(), bn))


def mm(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, bn: int) -> torch.Tensor:
    """x [T, K] f32 -> [T, N] f32, for packed (row blocks of bn, N*K/2 contiguous bytes) and
    sz bf16 [K/32, N, 2]."""
    return gemm(x, packed, sz, bn, threads(), _checked())


def gemm(x, packed, sz, bn: int, threads: int, isa: str) -> torch.Tensor:
    """`mm` on a chosen path ('vnni', 'avx2', 'scalar') and thread count (tests run every
    path this CPU has)."""
    return gemm_many(x, [(packed, sz)], bn, threads, isa)[0]


def mm_many(x: torch.Tensor, weights: list, bn: int) -> list:
    """`mm` of x with 1-4 (packed, sz) at once (q|k|v, gate|up): x is quantized once and the
    pool splits all their row blocks in one call."""
    return gemm_many(x, weights, bn, threads(), _checked())


def gemm_many(x, weights: list, bn: int, threads: int, isa: str) -> list:
    import torch
    x = x.float().contiguous()
    m, k = x.shape
    mats, ys = [], []
    for packed, sz in weights:
        n = sz.shape[1]
        if (not packed.is_contiguous() or packed.numel() != n * k // 2 or not sz.is_contiguous()
                or sz.numel() != n * k // GROUP * (sz.dim() - 1)):
            raise ValueError(f"q4 mm: packed {tuple(packed.shape)}, sz {tuple(sz.shape)} for "
                             f"K {k}")
        ys.append(torch.empty(m, n))
        mats.append((packed.data_ptr(), sz.data_ptr(), n, ys[-1].data_ptr(), int(sz.dim() == 2)))
    _ext().gemm(x.data_ptr(), m, k, mats, bn, threads, ISAS[isa])
    return ys


def mm8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [T, K] f32 -> [T, N] f32 for int8 rows q [N, K] (contiguous) with bf16 scale [N]."""
    return gemm8(x, q, scale, threads(), _checked())


def gemm8(x, q, scale, threads: int, isa: str) -> torch.Tensor:
    """`mm8` on a chosen path and thread count."""
    import torch
    n, k = q.shape
    x = x.float().contiguous()
    if not q.is_contiguous() or scale.dtype != torch.bfloat16 or scale.numel() != n:
        raise ValueError(f"q8 mm: q {tuple(q.shape)}, scale {tuple(scale.shape)}")
    y = torch.empty(x.shape[0], n)
    _ext().gemm8(x.data_ptr(), x.shape[0], k, q.data_ptr(), scale.contiguous().data_ptr(), n,
                 y.data_ptr(), threads, ISAS[isa])
    return y
