#!/usr/bin/env bash
# The GPU machine's whole check in one run (device time is minutes): the test suite, then the
# VRAM-tier benchmark, results under $OUT (or ./gpu-out). Run from the repository root:
#
#   bash tools/gpu_check.sh [--quick]      # --quick: the GPU-marked tests and a tiny benchmark
#   bash tools/gpu_check.sh --moe          # the Mixtral benchmark alone (issue 15's GPU target)
#
# Packages that machine lacks (lmdb, gguf; see DESIGN.md "GPU machine facts") travel as wheels
# in .whl/ and are installed to /tmp/site first; the repository runs from its tree
# (PYTHONPATH), nothing is installed into that Python.
set -u
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
# tiercache's C kernel (tiercache/_q4.c), built in place as `pip install -e` would; without a
# compiler the engine runs torch's int4 kernel instead
python3 setup.py -q build_ext --inplace >"$OUT/build.txt" 2>&1 || echo "q4 kernel not built" >>"$OUT/build.txt"
{
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
  python3 - <<'EOF'
import importlib
for name in ("lmdb", "gguf", "onnxruntime", "onnx", "transformers", "accelerate", "typer",
             "safetensors", "tokenizers", "pytest", "numpy"):
    try:
        importlib.import_module(name)
    except ImportError as e:
        print("missing:", name, e)
EOF
} 2>&1 | tee "$OUT/machine.txt"
if [ "${1:-}" = "--moe" ]; then
  timeout 480 python3 tools/bench_gpu.py --work /tmp/gpu-bench --shape moe --out "$OUT/BENCH.md" \
    2>&1 | tail -6 | tee "$OUT/bench-moe.txt"
  exit 0
fi
if [ "${1:-}" = "--quick" ]; then
  python3 -m pytest -q -m gpu tests 2>&1 | tail -30 | tee "$OUT/tests.txt"
  timeout 300 python3 tools/bench_gpu.py --work /tmp/gpu-bench --shape tiny --prompt 64 \
    --decode 16 --out "$OUT/BENCH.md" 2>&1 | tail -6 | tee "$OUT/bench.txt"
  exit 0
fi
timeout 420 python3 -m pytest -q -x tests 2>&1 | tail -30 | tee "$OUT/tests.txt"
timeout 480 python3 tools/bench_gpu.py --work /tmp/gpu-bench --out "$OUT/BENCH.md" 2>&1 \
  | tail -6 | tee "$OUT/bench.txt"
