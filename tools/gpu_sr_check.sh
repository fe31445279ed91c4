#!/usr/bin/env bash
# What session 14's stochastic-rounding bits (fp4jax.prng: one hash per four elements)
# still need from a GPU, in one ~8-minute call (kernels/NOTES.md, "Issue 18, sixth step"):
# the changed kernels compiled and checked, then every bit-generation variant timed side
# by side, then the SR operand and quantize rows against a copy. The training steps are a
# separate call: python -m kernels.bench_step --model=vit_s16 --scan=scanned (and
# --model=gpt_small --scan=scanned).
#
#   OUT=/some/dir tools/gpu_sr_check.sh      # logs and JSON under $OUT (default /tmp)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp}
export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda,cpu} XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
status=0
GPU_TESTS="tests/test_prng.py tests/test_kernels_operand.py tests/test_kernels_lower_sm90.py" \
  GPU_TIME_LIMIT=200 DURATIONS=3 timeout 240 tools/test_gpu.sh -q -x > "$OUT/sr_tests.log" 2>&1 \
  || status=$?
timeout 150 "$PY" -m pytest -q -x tests/test_kernels_quantize.py -k "sr or any_width" \
  >> "$OUT/sr_tests.log" 2>&1 || status=$?
tail -n 4 "$OUT/sr_tests.log"
for a in "nvfp4 -1" "nvfp4 0" "mxfp4 -1"; do
  set -- $a
  timeout 100 "$PY" -m kernels.profile_sr_bits --spec="$1" --axis="$2" \
    --out="$OUT/sr_bits_$1_$2.json" 2>&1 | grep -E "wall|Error" || status=$?
done
timeout 150 "$PY" -m kernels.bench_operand --configs=mxfp4_sr_rows,nvfp4_sr_rows,nvfp4_rows \
  --quantize_kernels=mxfp4_rows,mxfp4_sr_rows --out="$OUT/operand_sr.json" \
  > "$OUT/operand_sr.log" 2>&1 || status=$?
tail -n 20 "$OUT/operand_sr.log"
exit $status
