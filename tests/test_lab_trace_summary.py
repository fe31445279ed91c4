"""kernels.trace_summary: per-step GPU kernel time from a Chrome trace."""

import gzip
import json

import pytest

from kernels import trace_summary as ts


def _trace():
  meta = [
      {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
      {"ph": "M", "pid": 1, "tid": 5, "name": "thread_name", "args": {"name": "python"}},
      {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}},
      {"ph": "M", "pid": 2, "tid": 7, "name": "thread_name", "args": {"name": "Stream #7(Compute)"}},
      {"ph": "M", "pid": 2, "tid": 8, "name": "thread_name", "args": {"name": "XLA Ops"}},
  ]
  kernels = [("fp4jax_quantize_rows", 300.0), ("sm90_xmma_gemm_e4m3", 1000.0),
             ("loop_multiply_fusion", 50.0), ("fp4jax_quantize_rows", 100.0),
             ("fp4jax_unpack_lhs_e4m3", 20.0), ("input_reduce_fusion", 30.0)]
  x = [{"ph": "X", "pid": 2, "tid": 7, "ts": i, "dur": d, "name": n}
       for i, (n, d) in enumerate(kernels)]
  # Host events and the derived "XLA Ops" line must not be counted.
  x += [{"ph": "X", "pid": 1, "tid": 5, "ts": 0, "dur": 1e6, "name": "python_call"},
        {"ph": "X", "pid": 2, "tid": 8, "ts": 0, "dur": 1e6, "name": "dot.3"}]
  return {"traceEvents": meta + x}


@pytest.mark.parametrize("steps", [1, 2])
def test_summary_counts_stream_kernels_per_step(steps):
  s = ts.summarize_trace_events(_trace(), steps)
  assert s["device_ms_per_step"] == pytest.approx(1.5 / steps), s
  assert s["by_category_ms"] == pytest.approx(
      {"gemm": 1.0 / steps, "fp4jax_quantize": 0.4 / steps, "fusion": 0.05 / steps,
       "reduce": 0.03 / steps, "fp4jax_unpack": 0.02 / steps}), s["by_category_ms"]
  name, ms, calls = s["top_kernels"][0]
  assert (name, calls) == ("sm90_xmma_gemm_e4m3", 1 / steps) and ms == pytest.approx(1.0 / steps)
  assert s["top_kernels"][1][0] == "fp4jax_quantize_rows" and s["top_kernels"][1][2] == 2 / steps
  assert set(s["streams"]) == {"Stream #7(Compute)"}
  # Six kernels, none shorter than SMALL_KERNEL_US (8 us).
  assert s["kernels_per_step"] == 6 / steps and s["small_kernels_per_step"] == 0


def test_summary_counts_small_kernels():
  t = _trace()
  t["traceEvents"] += [{"ph": "X", "pid": 2, "tid": 7, "ts": 99, "dur": d, "name": "loop_tiny"}
                       for d in (2.0, 3.0, 7.5)]
  s = ts.summarize_trace_events(t, 1)
  assert s["kernels_per_step"] == 9 and s["small_kernels_per_step"] == 3
  assert s["small_kernels_ms_per_step"] == pytest.approx(0.0125)


@pytest.mark.parametrize("name,category", [
    ("fp4jax_quantize_cols", "fp4jax_quantize"), ("nvjet_tst_128x256", "gemm"),
    ("cutlass_80_tensorop_bf16_s16816gemm", "gemm"), ("loop_convert_fusion_3", "fusion"),
    ("memcpy32_post", "copy_transpose"), ("some_unknown_kernel", "other")])
def test_kernel_category(name, category):
  assert ts.kernel_category(name) == category, f"{name} should be {category}"


def test_summarize_trace_reads_the_gz_file(tmp_path):
  d = tmp_path / "plugins" / "profile" / "run"
  d.mkdir(parents=True)
  with gzip.open(d / "host.trace.json.gz", "wt") as f:
    json.dump(_trace(), f)
  assert ts.summarize_trace(str(tmp_path), 1)["device_ms_per_step"] == pytest.approx(1.5)


def test_bad_input_names_the_argument(tmp_path):
  with pytest.raises(ValueError, match="trace_dir=.*jax.profiler.trace"):
    ts.find_trace(str(tmp_path))
  with pytest.raises(ValueError, match="steps=0 must be >= 1"):
    ts.summarize_trace_events(_trace(), 0)
