#!/usr/bin/env bash
# The GPU test command (`make test-gpu`): every test file that means something on a GPU,
# compiled for it rather than interpreted, with every combination of the kernel sweeps
# (FP4JAX_FULL_SWEEPS=1; CPU runs take subsets, see tests/sweeps.py). Sized to finish inside
# one 10-minute call on the H200 machine (16 cores): several pytest workers, and
# XLA_PYTHON_CLIENT_PREALLOCATE=false, since with preallocation each worker's JAX claims
# most of the GPU's memory and 8 workers then fail hundreds of tests out of memory.
#
#   tools/test_gpu.sh                 # all GPU files, then fp4jax.distributed
#   WORKERS=8 tools/test_gpu.sh -x    # extra arguments go to the first pytest
#
# Needs python3 with jax[cuda], flax, optax, pytest, pytest-xdist (the GPU machine has them;
# the repository runs from the checkout, PYTHONPATH=.).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false FP4JAX_FULL_SWEEPS=1 PYTHONUNBUFFERED=1
# Workers share compiled executables (Triton compiles of the same kernel configuration
# recur across tests and workers): JAX's persistent compilation cache.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/fp4jax_jax_cache}"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0.2
# Most of the run is compilation, and XLA:GPU autotunes every GEMM and GEMM fusion it
# compiles (timing candidate algorithms on the GPU). The tests check values, not speed, and
# compare paths within float32 accumulation bounds, so the default algorithm is as good:
# level 0 turns the autotuner off.
export XLA_FLAGS="--xla_gpu_autotune_level=0${XLA_FLAGS:+ $XLA_FLAGS}"
# GPU_TESTS="tests/a.py tests/b.py::test_x" runs those instead (e.g. to re-check failures).
GPU_FILES=(
  tests/test_kernels_quantize.py tests/test_kernels_unpack.py tests/test_kernels_matmul.py
  tests/test_kernels_weight_only.py tests/test_lab_inkernel_matmul.py tests/test_dispatch.py
  tests/test_quantization.py tests/test_qdot.py tests/test_qconv.py tests/test_linen.py
  tests/test_nnx.py tests/test_operand.py tests/test_qdot_fused.py tests/test_kernels_operand.py
  tests/test_qragged.py tests/test_moe.py tests/test_hadamard.py
)
if [ -n "${GPU_TESTS:-}" ]; then read -r -a GPU_FILES <<< "$GPU_TESTS"; fi
# fp4jax.distributed builds 8-device meshes: on a one-GPU machine they are 8 host CPU
# devices (tests/conftest.py), under the GPU machine's jax; several GPUs would take them.
# They need no GPU, so they run beside the GPU files from the start, on two workers.
DIST_LOG=$(mktemp)
dist_pid=
if [ -z "${GPU_TESTS:-}" ]; then
  JAX_PLATFORMS=cpu "$PY" -m pytest -q -n 2 -p no:cacheprovider -p no:benchmark \
    tests/test_distributed.py > "$DIST_LOG" 2>&1 &
  dist_pid=$!
fi
# Longest first: tests/conftest.py sorts the tests by their seconds in the last GPU run
# (tests/gpu_test_seconds.json); after xdist's first round-robin quarter,
# --maxschedchunk=1 hands free workers one test at a time. The tests' own seconds sum to
# ~5,100-5,900 worker-seconds, ~370 s over 16 workers (H200, 2026-12-03); two runs that
# ended at 578 s with 729 of 731 passed were held up by one kernel compile (see
# fp4jax.kernels.quantize.MAX_COMPILED_COLUMN_PHASES), not by the order.
# SIGINT at the time limit still prints the failures so far and the durations.
JAX_PLATFORMS=cuda,cpu timeout -s INT "${GPU_TIME_LIMIT:-560}" "$PY" -m pytest -q \
  -n "${WORKERS:-16}" --dist load --maxschedchunk=1 -p no:cacheprovider -p no:benchmark -rf --tb=short \
  --durations="${DURATIONS:-20}" "${GPU_FILES[@]}" "$@"
rc=$?
rc2=0
if [ -n "$dist_pid" ]; then
  wait "$dist_pid"; rc2=$?
  echo "--- tests/test_distributed.py (run beside the GPU files, on the host CPU) ---"
  cat "$DIST_LOG"
fi
rm -f "$DIST_LOG"
exit $(( rc != 0 ? rc : rc2 ))
