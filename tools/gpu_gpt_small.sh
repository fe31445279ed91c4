#!/usr/bin/env bash
# GPT-small in FP4 on one GPU: each recipe trains in its own process, all at once (their
# XLA compilations overlap on the host's cores; the GPU interleaves their steps), then one
# --report_only pass writes the comparison's summary, final.json and plots.
#
#   tools/gpu_gpt_small.sh                              # bf16,fp8,mxfp4,nvfp4, 1000 steps
#   BUDGET=480 WORKDIR=/tmp/gs tools/gpu_gpt_small.sh   # stop each run cleanly after 480 s
#   tools/gpu_gpt_small.sh                              # again: every run goes on (--resume)
#
# BUDGET (seconds, 0 = none) sends each run Ctrl-C (SIGINT) when it is up: the run saves
# a checkpoint and stops, and the same command later continues it where it stopped.
# Extra arguments go to every run (e.g. --seeds=3). The logs are <WORKDIR>/<run>.log.
set -uo pipefail
cd "$(dirname "$0")/.."
WORKDIR=${WORKDIR:-runs/gpt_small}
RUNS=${RUNS:-bf16,fp8,mxfp4,nvfp4}
BUDGET=${BUDGET:-0}
STEPS=${STEPS:-1000}
PYTHON=${PYTHON:-python}
n=$(tr ',' '\n' <<< "$RUNS" | wc -l)
# Each process takes its share of the GPU's memory (JAX preallocates 75% otherwise).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-$("$PYTHON" -c "print(round(0.9 / $n, 3))")}
export PYTHONPATH=${PYTHONPATH:-.}
FLAGS=(--model=gpt_small --scan_layers --steps="$STEPS" --batch_size=8 --lr=6e-4 --warmup=100
       --eval_every=100 --log_every=25 --checkpoint_every=250 --workdir="$WORKDIR" "$@")
mkdir -p "$WORKDIR"
pids=()
for run in ${RUNS//,/ }; do
  if [ "$BUDGET" -gt 0 ]; then limit=(timeout -s INT "$BUDGET"); else limit=(); fi
  "${limit[@]}" "$PYTHON" -m experiments.gpt_fp4 --compare="$run" --resume "${FLAGS[@]}" \
      > "$WORKDIR/$run.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
tail -n 3 "$WORKDIR"/*.log
"$PYTHON" -m experiments.gpt_fp4 --compare="$RUNS" --report_only "${FLAGS[@]}" || status=$?
exit $status
