"""The int4 GEMV kernels side by side on this CPU: tiercache's own (engine/q4.py), torch's
`_weight_int4pack_mm_for_cpu`, and ONNX Runtime's prepacked MatMulNBits (accuracy_level 4).

    python tools/bench_kernels.py [--threads 1 2] [--rows 1 4 128] [--shape 8192 2048]

Each kernel cycles over enough distinct matrices (default 24 x 10 MB q4) to leave the L3 cache,
as a decode step does, and reports ms per matrix, weights per second and the q4 bytes per
second (0.625 B per weight as stored). ORT's row holds its packed copy (~1.4x the bytes).
"""
from __future__ import annotations

import argparse
import time

import torch

from tiercache.engine import kernels, nbits, q4
from tiercache.store import quant


def timed(fn, mats, reps: int) -> float:
    for m in mats[:2]:
        fn(m)
    t0 = time.perf_counter()
    for _ in range(reps):
        for m in mats:
            fn(m)
    return (time.perf_counter() - t0) / (reps * len(mats))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 128])
    p.add_argument("--shape", type=int, nargs=2, default=[8192, 2048], metavar=("N", "K"))
    p.add_argument("--matrices", type=int, default=24)
    p.add_argument("--ort", action=argparse.BooleanOptionalAction, default=True)
    a = p.parse_args()
    n, k = a.shape
    g = torch.Generator().manual_seed(0)
    raws = [torch.frombuffer(bytearray(quant.encode(torch.randn(n, k, generator=g), "q4k")),
                             dtype=torch.uint8) for _ in range(a.matrices)]
    ours = [kernels.QLinear.from_q4k(r.clone(), (n, k)) for r in raws]
    h = kernels.int4_layout()
    theirs = [(kernels.int4_pack(torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8),
                                 h), lin.sz) for lin in ours] if h else []
    print(f"CPU: torch {torch.backends.cpu.get_cpu_capability()}, tiercache kernel "
          f"{q4.path()}, [rows, {k}] x [{n}, {k}] q4, {a.matrices} matrices")
    for t in a.threads:
        torch.set_num_threads(t)
        sessions = []
        if a.ort and nbits.available():
            for r in raws:
                gr = nbits._Graph()
                y = gr.matmul("x", nbits.q4k_weight(r, (n, k)))
                sessions.append(gr.session(k, [(y, [n])]))
        for rows in a.rows:
            x = torch.randn(rows, k)
            reps = max(1, 8 // rows)
            cases = []
            if q4.available():  # every SIMD path this CPU runs
                for isa in q4.isas()[:-1] or ["scalar"]:
                    cases.append((f"tiercache {isa}",
                                  lambda m, isa=isa: q4.gemm(x, m.packed, m.sz, 64, t, isa), ours))
            if theirs:
                cases.append(("torch int4", lambda m: kernels._torch_int4_mm(x, *m), theirs))
            if sessions:
                xn = x.numpy()
                cases.append(("ORT MatMulNBits", lambda s: s.run(None, {"x": xn}), sessions))
            for name, fn, mats in cases:
                s = timed(fn, mats, reps)
                print(f"threads {t} rows {rows:4d} {name:16s} {s * 1e3:8.3f} ms  "
                      f"{n * k * rows / s / 1e9:6.1f} G weight-rows/s  "
                      f"{n * k * 0.625 / s / 1e9:5.1f} GB/s of q4")


if __name__ == "__main__":
    main()
