#!/usr/bin/env bash
# The GPU checks, in stages that each fit one 10-minute call of the device tool.
# Run from the repository root on a machine with a CUDA GPU whose python3 already
# holds torch, triton, pybind11, cmake, ninja and pytest (the lent machines do; no
# network is needed). Logs go to $OUT (the device tool's folder) or, without it,
# to benchmarks/results/gpu-session/.
#
#   scripts/gpu_session.sh build      build the CUDA extension (editable install)
#   scripts/gpu_session.sh test       build, then the gpu-marked tests and the Triton tests at real sizes
#   scripts/gpu_session.sh sanitize   compute-sanitizer memcheck and racecheck on small shapes
#   scripts/gpu_session.sh bench [ARGS...]   the benchmark sweep (python -m benchmarks ARGS) into $OUT/bench
#
# Every log starts with the device, driver, versions and commit.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results/gpu-session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

header() {
  echo "# $(date -u +%FT%TZ) commit $(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo -dirty)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/# gpu: /'
  $PY -c "import torch, triton; print(f'# torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}), triton {triton.__version__}')"
  nvcc --version 2>/dev/null | tail -1 | sed 's/^/# nvcc: /'
}

build() {
  { header; $PY -m pip install --no-build-isolation --no-deps -v -e . 2>&1 | grep -E "lstm_kernels|error|Error|warning" ;
    $PY -c "import lstm_kernels; print('available:', lstm_kernels.available_backends()); print('unavailable:', lstm_kernels.unavailable_backends())"; } \
    2>&1 | tee "$OUT/build.log"
}

ensure_built() {
  $PY -c "import lstm_kernels._C" 2>/dev/null || build
}

case "${1:-test}" in
  build)
    build ;;
  test)
    build
    { header; $PY -m pytest -q -m gpu tests --ignore=tests/triton -rs --durations=15; } 2>&1 | tee "$OUT/gpu_tests.log"
    { header; $PY -m pytest -q tests/triton -rs --durations=15; } 2>&1 | tee "$OUT/triton_gpu_tests.log" ;;
  sanitize)
    ensure_built
    for tool in memcheck racecheck; do
      { header; compute-sanitizer --tool "$tool" --error-exitcode 1 $PY tests/sanitize_cuda.py; echo "exit: $?"; } \
        2>&1 | tee "$OUT/sanitize_$tool.log"
    done ;;
  bench)
    shift
    ensure_built
    # results under $OUT so that they come back from the device; --out in ARGS overrides
    { header; $PY -m benchmarks --out "$OUT/bench" "$@"; } 2>&1 | tee "$OUT/bench.log" ;;
  *)
    echo "usage: $0 build|test|sanitize|bench [ARGS...]" >&2
    exit 2 ;;
esac
