#!/usr/bin/env bash
# The one prepared GPU session for the kernels (issue 6), run from the repository root on a CUDA machine:
#
#     bash benchmarks/gpu_session.sh [OUT_DIR]        # default OUT_DIR: $OUT, else runs/gpu
#
# 1. correctness: the GPU tests (every kernel vs the exact product on realistic shapes, PackedLinear on CUDA);
# 2. the ahead-of-time resource table with this machine's Triton (shared memory, registers, spills);
# 3. the benchmark table (benchmarks/kernels.py: cuBLAS fp16 vs W4A16/W8A16/int8, roofline, goals).
# Each step has its own time limit and writes a file under OUT_DIR, so a step that overruns still leaves
# the others' figures. Needs torch, triton, transformers and pytest; nothing is downloaded.
set -u -o pipefail
OUT_DIR=${1:-${OUT:-runs/gpu}}
PY=${PYTHON:-python}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA DEVICE')" \
    | tee "$OUT_DIR/env.txt"
if ! $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device: nothing to measure (the CPU checks are 'make test')" >&2
    exit 3
fi
status=0
echo "== 1/3 GPU tests" | tee "$OUT_DIR/gpu_tests.txt"
timeout "${GPU_TESTS_TIMEOUT:-200}" $PY -m pytest -q -p no:cacheprovider -m gpu tests/kernels tests/layers 2>&1 \
    | tee -a "$OUT_DIR/gpu_tests.txt" || status=1
echo "== 2/3 ahead-of-time resources (this machine's Triton, sm_90)" | tee "$OUT_DIR/aot.txt"
timeout "${AOT_TIMEOUT:-90}" $PY -m lightning_quant.kernels.aot 2>&1 | tee -a "$OUT_DIR/aot.txt" || status=1
echo "== 3/3 benchmark" | tee "$OUT_DIR/kernels.txt"
timeout "${BENCH_TIMEOUT:-280}" $PY benchmarks/kernels.py 2>&1 | tee -a "$OUT_DIR/kernels.txt" || status=1
exit $status
