#!/usr/bin/env bash
# The GPU checks of lstm_kernels, in stages. Run from the repository root on a machine with a CUDA
# GPU whose python3 (or $PYTHON) already holds torch, triton, pybind11, cmake, ninja and pytest;
# no network is needed. Each stage fits in about ten minutes on one H100-class GPU. Logs go to
# $OUT, by default benchmarks/results/gpu-checks/.
#
#   scripts/gpu_checks.sh check      build, then python -m lstm_kernels check: every backend verified,
#                                     timed against nn.LSTM; report in $OUT/check (run this first)
#   scripts/gpu_checks.sh build      build the CUDA extension (editable install)
#   scripts/gpu_checks.sh test       build, then the gpu-marked tests and the Triton tests at real sizes
#   scripts/gpu_checks.sh sanitize [TOOL...]   compute-sanitizer memcheck, racecheck, synccheck and
#                                     initcheck (or the TOOLs named) on small shapes of both backends
#                                     (tests/sanitize_cuda.py; SANITIZE_BACKENDS="cuda triton" by default),
#                                     without torch's caching allocator; runs every tool (each for at most
#                                     SANITIZE_TIMEOUT=540 s: name one tool per run where they do not
#                                     fit together), then exits non-zero if any failed
#   scripts/gpu_checks.sh bench [ARGS...]   the benchmark sweep (python -m benchmarks ARGS) into $OUT/bench
#   scripts/gpu_checks.sh profile [ARGS...] Nsight Compute (ncu) on one flagship forward + backward per
#                                     implementation (benchmarks/profile_flagship.py ARGS: cuDNN, the cuda
#                                     fused kernels with W_hh in shared memory and in registers, the triton
#                                     persistent kernels): per kernel its duration, L2 / DRAM / shared-memory
#                                     traffic, tensor instructions and barrier / membar stalls, as CSV in
#                                     $OUT/profile/<implementation>.csv (each at most PROFILE_TIMEOUT=240 s)
#
# Every log starts with the device, driver, versions and commit.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results/gpu-checks}
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
  check)
    build
    { header; $PY -m lstm_kernels check --out "$OUT/check"; } 2>&1 | tee "$OUT/check.log"
    rc=${PIPESTATUS[0]}
    echo "exit: $rc" | tee -a "$OUT/check.log"
    [ "$rc" -eq 0 ] ;;
  test)
    build
    # every gpu test has a per-test timeout (tests/conftest.py): a hang ends the run with the stacks
    { header; $PY -m pytest -q -m gpu tests --ignore=tests/triton -rs --durations=15; } 2>&1 | tee "$OUT/gpu_tests.log"
    rc_gpu=${PIPESTATUS[0]}
    { header; $PY -m pytest -q tests/triton -rs --durations=15; } 2>&1 | tee "$OUT/triton_gpu_tests.log"
    rc_triton=${PIPESTATUS[0]}
    echo "exit: gpu tests $rc_gpu, triton tests $rc_triton"
    [ "$rc_gpu" -eq 0 ] && [ "$rc_triton" -eq 0 ] ;;
  sanitize)
    shift
    ensure_built
    tools=("$@")
    [ ${#tools[@]} -gt 0 ] || tools=(memcheck racecheck synccheck initcheck)
    backend_args=()
    for b in ${SANITIZE_BACKENDS:-cuda triton}; do backend_args+=(--backend "$b"); done
    # Without torch's caching allocator every tensor is its own cudaMalloc, so memcheck sees
    # an access past a tensor's end instead of landing inside a pooled block.
    export PYTORCH_NO_CUDA_MEMORY_CACHING=1
    failed=()
    for tool in "${tools[@]}"; do
      log="$OUT/sanitize_$tool.log"
      { header; timeout "${SANITIZE_TIMEOUT:-540}" compute-sanitizer --tool "$tool" --error-exitcode 1 \
          $PY tests/sanitize_cuda.py "${backend_args[@]}"; } 2>&1 | tee "$log"
      rc=${PIPESTATUS[0]}  # the sanitizer's status (the group's last command), not tee's
      echo "exit: $rc" | tee -a "$log"
      [ "$rc" -eq 0 ] || failed+=("$tool")
    done
    if [ ${#failed[@]} -gt 0 ]; then
      echo "sanitize: FAILED: ${failed[*]} (logs in $OUT)" | tee -a "$OUT/sanitize_summary.log" >&2
      exit 1
    fi
    echo "sanitize: passed: ${tools[*]}" | tee -a "$OUT/sanitize_summary.log" ;;
  bench)
    shift
    ensure_built
    # results under $OUT, beside the logs; --out in ARGS overrides
    { header; $PY -m benchmarks --out "$OUT/bench" "$@"; } 2>&1 | tee "$OUT/bench.log" ;;
  profile)
    shift
    ensure_built
    metrics=gpu__time_duration.sum,lts__t_bytes.sum,dram__bytes.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum
    metrics+=,sm__inst_executed_pipe_tensor.sum,smsp__average_warp_latency_issue_stalled_barrier.ratio
    metrics+=,smsp__average_warp_latency_issue_stalled_membar.ratio
    metrics+=,smsp__average_warp_latency_issue_stalled_long_scoreboard.ratio
    mkdir -p "$OUT/profile"
    failed=()
    for impl in $($PY -m benchmarks.profile_flagship --list "$@"); do
      log="$OUT/profile/$impl.csv"
      { header; timeout "${PROFILE_TIMEOUT:-240}" ncu --nvtx --nvtx-include "$impl/" --csv --metrics "$metrics" \
          $PY -m benchmarks.profile_flagship --impl "$impl" "$@"; } 2>&1 | tee "$log"
      rc=${PIPESTATUS[0]}
      echo "# exit: $rc" | tee -a "$log"
      [ "$rc" -eq 0 ] || failed+=("$impl")
    done
    if [ ${#failed[@]} -gt 0 ]; then
      echo "profile: FAILED: ${failed[*]} (logs in $OUT/profile)" >&2
      exit 1
    fi ;;
  *)
    echo "usage: $0 check|build|test|sanitize|bench|profile [ARGS...]" >&2
    exit 2 ;;
esac
