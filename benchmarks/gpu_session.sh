#!/usr/bin/env bash
# The one prepared GPU session for the kernels (issues 6 and 14), run from the repository root on a CUDA machine:
#
#     bash benchmarks/gpu_session.sh [OUT_DIR]        # default OUT_DIR: $OUT, else runs/gpu
#
# 1. correctness: the GPU tests (every kernel path with a fixed config vs the exact product on realistic
#    shapes, one autotuned smoke test, PackedLinear and Int8OutlierLinear on CUDA);
# 2. the static profile with this machine's Triton (main-loop instructions per weight, launches per call,
#    registers, spills, shared memory: python3 -m lightning_quant.kernels.profile);
# 3. the benchmark on the goal shape (benchmarks/kernels.py --session: cuBLAS fp16 vs W4A16/W8A16/int8 and
#    the int8 layer, CUDA-graph timings for M <= 16, each goal scored on the shape it names), with the
#    prefill rows: at M = 512 and M = 4096 on 4096x14336, W4A16 g128 sym with path="gemm" (fused
#    dequantize-GEMM) vs path="prefill" (dequantize once, then cuBLAS) vs fp16 cuBLAS -- the measurement
#    that sets PREFILL_MIN_ROWS (lightning_quant/kernels/wq_matmul.py, an unmeasured placeholder until then).
# Budget: under 8 minutes on one H200 (step limits 180 + 90 + 200 s). Every step writes its own file under
# OUT_DIR with unbuffered output, and is stopped with SIGINT (pytest and Python print what they have), so a
# step that overruns still leaves its partial results and the others' figures. A wrong kernel output is a
# FAIL row, not the end of the table. Needs torch, triton, pytest; nothing is downloaded.
set -u -o pipefail
OUT_DIR=${1:-${OUT:-runs/gpu}}
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
start=$(date +%s)

$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA DEVICE')" \
    | tee "$OUT_DIR/env.txt"
if ! $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device: nothing to measure (the CPU checks are 'make test')" >&2
    exit 3
fi
status=0
step() {  # step <name> <seconds> <file> <command...>: time-limited, SIGINT first, SIGKILL 15 s later
    local name=$1 limit=$2 file=$3
    shift 3
    echo "== $name (limit ${limit}s)" | tee "$OUT_DIR/$file"
    timeout -s INT -k 15 "$limit" "$@" 2>&1 | tee -a "$OUT_DIR/$file"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 124 ] && echo "== $name: stopped at its ${limit}s limit (partial results above)" | tee -a "$OUT_DIR/$file"
    [ "$rc" -ne 0 ] && status=1
    echo "== $name: exit $rc after $(( $(date +%s) - start ))s in total" | tee -a "$OUT_DIR/$file"
}
step "1/3 GPU tests" "${GPU_TESTS_TIMEOUT:-180}" gpu_tests.txt \
    $PY -m pytest -q -p no:cacheprovider -m gpu -rfEs tests/kernels tests/layers
step "2/3 static profile (this machine's Triton)" "${AOT_TIMEOUT:-90}" profile.txt \
    $PY -m lightning_quant.kernels.profile
step "3/3 benchmark (goal shape; prefill vs gemm vs fp16 at M=512, 4096)" "${BENCH_TIMEOUT:-200}" kernels.txt \
    $PY benchmarks/kernels.py --session --runs 50
exit $status
