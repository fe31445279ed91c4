"""Where a jitted step's GPU time goes: a summary of a ``jax.profiler`` trace.

``jax.profiler.trace(dir, create_perfetto_trace=True)`` writes
``dir/plugins/profile/<run>/<host>.trace.json.gz`` (Chrome trace format). On a GPU its
``/device:GPU:<n>`` process holds one thread per CUDA stream (``Stream #<id>(...)``) whose
complete (``"ph": "X"``) events are the kernels that ran. This module sums their durations
per kernel and per category, so a benchmark can say *why* a step is slow (GEMMs, fp4jax
quantize / unpack kernels, or XLA's elementwise fusions), not only how slow.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
from typing import Any

# First match wins; names are lower-cased before matching.
KERNEL_CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("fp4jax_quantize", ("fp4jax_quantize",)),
    ("fp4jax_unpack", ("fp4jax_unpack",)),
    ("fp4jax_matmul", ("fp4jax_matmul",)),
    ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "sm90_", "sm80_", "wgmma",
              "triton_gemm", "__cublas")),
    ("reduce", ("reduce", "reduction")),
    ("copy_transpose", ("copy", "transpose", "memcpy", "memset")),
    ("fusion", ("fusion", "loop_", "input_", "wrapped_")),
)


SMALL_KERNEL_US = 8.0  # kernels shorter than this (microseconds) are counted apart


def kernel_category(name: str) -> str:
  """The category (a ``KERNEL_CATEGORIES`` key, or ``"other"``) of a GPU kernel name."""
  low = name.lower()
  for category, needles in KERNEL_CATEGORIES:
    if any(n in low for n in needles):
      return category
  return "other"


def find_trace(trace_dir: str) -> str:
  """The newest ``*.trace.json.gz`` under ``trace_dir``; ValueError names the directory."""
  paths = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
  if not paths:
    raise ValueError(f"trace_dir={trace_dir!r} holds no *.trace.json.gz: run the step under "
                     "jax.profiler.trace(trace_dir, create_perfetto_trace=True) first")
  return max(paths, key=os.path.getmtime)


def summarize_trace_events(trace: dict[str, Any], steps: int, top: int = 15) -> dict[str, Any]:
  """Per-step GPU kernel time of a Chrome trace dict, by category and by kernel.

  Args:
    trace: the decoded trace (``{"traceEvents": [...]}``).
    steps: how many steps the trace covers; every time is divided by it.
    top: how many kernels to list, longest first.
  Returns:
    ``{"device_ms_per_step", "by_category_ms", "top_kernels": [(name, ms, calls)],
    "streams": {thread name: ms}, "kernels_per_step", "small_kernels_per_step",
    "small_kernels_ms_per_step"}`` (small: shorter than ``SMALL_KERNEL_US``, where a
    launch's fixed cost, not the work, sets the time); empty totals when the trace has no
    GPU process.
  """
  if steps < 1:
    raise ValueError(f"steps={steps} must be >= 1 (the number of steps the trace covers)")
  events = trace.get("traceEvents", [])
  process = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
  thread = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
            if e.get("ph") == "M" and e.get("name") == "thread_name"}
  gpu_pids = {pid for pid, name in process.items() if name.startswith("/device:GPU")}
  stream_threads = {key for key, name in thread.items()
                    if key[0] in gpu_pids and name.startswith("Stream")}
  if not stream_threads:  # another profiler version's naming: take every GPU thread
    stream_threads = {key for key in thread if key[0] in gpu_pids}
  per_kernel = collections.defaultdict(float)
  calls = collections.Counter()
  per_stream = collections.defaultdict(float)
  small, small_ms = 0, 0.0
  for e in events:
    if e.get("ph") != "X" or (e.get("pid"), e.get("tid")) not in stream_threads:
      continue
    ms = e.get("dur", 0.0) / 1e3
    per_kernel[e["name"]] += ms
    calls[e["name"]] += 1
    per_stream[thread[(e["pid"], e["tid"])]] += ms
    if e.get("dur", 0.0) < SMALL_KERNEL_US:
      small, small_ms = small + 1, small_ms + ms
  by_category = collections.defaultdict(float)
  for name, ms in per_kernel.items():
    by_category[kernel_category(name)] += ms
  ranked = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:top]
  return {
      "device_ms_per_step": sum(per_kernel.values()) / steps,
      "by_category_ms": {k: v / steps for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])},
      "top_kernels": [(name, ms / steps, calls[name] / steps) for name, ms in ranked],
      "streams": {k: v / steps for k, v in per_stream.items()},
      "kernels_per_step": sum(calls.values()) / steps,
      "small_kernels_per_step": small / steps,
      "small_kernels_ms_per_step": small_ms / steps,
  }


def summarize_trace(trace_dir: str, steps: int, top: int = 15) -> dict[str, Any]:
  """``summarize_trace_events`` of the newest trace under ``trace_dir``."""
  with gzip.open(find_trace(trace_dir), "rt") as f:
    return summarize_trace_events(json.load(f), steps, top)
