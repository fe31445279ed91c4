"""Wall-clock timing and result files shared by the benchmarks (``kernels/bench_*.py``)."""

from __future__ import annotations

import json
import os
import statistics
import time

import jax


def median_time(fn, *args, reps: int = 20, runs: int = 5) -> float:
  """Median over ``runs`` runs of the mean time of ``reps`` back-to-back calls (seconds),
  after one untimed call (compilation, warm-up); waits for the device each run."""
  out = fn(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    for _ in range(reps):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / reps)
  return statistics.median(times)


def write_json(results: dict, path: str) -> None:
  """Writes a benchmark's results (creating the folder)."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    json.dump(results, f, indent=1)
