"""tiercache: run language models larger than RAM/VRAM from a tiered LMDB store."""
import os
import sys

__version__ = "0.1.0"

# torch's OpenMP threads busy-wait after each parallel op, on the cores where ONNX Runtime's
# threads run the resident layers (1B shape, 2 threads, decode: 11.8 -> 13.5 tok/s passive;
# and 14.9 -> 6.8 when ORT's threads spin too). libgomp reads this when torch is imported:
# set before that, unless the user chose a policy. OMP_PASSIVE: what torch's threads do here.
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
OMP_PASSIVE = os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"

# numpy's OpenBLAS starts a thread per core whose spinning after each call (the lean runtime's
# prompt attention) takes a core from tiercache's kernel pool: 1B shape, 2 threads, prefill
# 220-235 -> 342-349 tok/s and decode 63 -> 70 with it at 1. Read when numpy is imported.
if "numpy" not in sys.modules:
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
