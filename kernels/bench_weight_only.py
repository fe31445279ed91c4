r"""Weight-only FP4 GEMM (BF16 activations x packed FP4 weights) against BF16 and against
what a user writes in plain JAX, at the skinny shapes of decoding and evaluation.

    python -m kernels.bench_weight_only [--rows=1,16,64,256] [--k=8192 --n=8192] [--smoke]

Variants, each timed as many calls inside one jitted ``lax.fori_loop`` (small GEMMs take
~0.01-0.1 ms: one call per dispatch would time the host):

* ``bf16``: XLA's GEMM on BF16 weights (the baseline: what the packed weights replace);
* ``naive``: :func:`kernels.naive.naive_weight_only_dot`, plain JAX unpacking the codes,
  a 16-entry table lookup and repeated scales before a BF16 GEMM, on every call;
* ``dequantize``: ``fp4jax.dequantize(w, bf16)`` then the BF16 GEMM, on every call;
* ``kernel_prmt`` / ``kernel_alu``: :func:`fp4jax.kernels.weight_only.weight_only_matmul`
  with each decoder (inline-PTX byte tables / integer arithmetic), default tile;
  ``kernel_prmt/bn<bn>_s<splits>_w<warps>``: other tiles;
* ``dispatch``: :func:`fp4jax.gemm.weight_only_dot`, what the library runs under
  ``gemm_impl("auto")``.

Correctness first: every variant against :func:`weight_only_reference` (float32 GEMM of
the BF16-rounded activations and the dequantized weights), as a multiple of the largest
|x| @ |w| entry; NaN positions must match. Writes ``kernels/results/weight_only_<gpu>.json``.
"""

from __future__ import annotations

import os
import statistics
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax import lax

import fp4jax
from fp4jax import dispatch
from fp4jax.kernels import weight_only as wo
from kernels.naive import naive_weight_only_dot
from kernels.timing import write_json

FLAGS = flags.FLAGS
flags.DEFINE_list("rows", ["1", "16", "64", "256"], "M values")
flags.DEFINE_integer("k", 8192, "contraction K", lower_bound=32)
flags.DEFINE_integer("n", 8192, "output width N", lower_bound=16)
flags.DEFINE_list("formats", ["mxfp4", "nvfp4"], "weight formats")
flags.DEFINE_integer("iters", 200, "GEMMs per timed jitted loop", lower_bound=1)
flags.DEFINE_integer("runs", 5, "timed loops (median)", lower_bound=1)
flags.DEFINE_bool("tiles", True, "also time a few other kernel tiles")
flags.DEFINE_integer("tile_rows", 16, "time the other tiles for M up to this")
flags.DEFINE_bool("sweep", False, "also time the layouts/algorithms/tiles of SWEEP (M <= "
                  "tile_rows and M = 64)")
flags.DEFINE_list("sweep_formats", ["mxfp4"], "formats --sweep times")
flags.DEFINE_list("sweep_rows", ["1", "2", "4", "16", "64"], "M values --sweep times")
flags.DEFINE_bool("smoke", False, "a small shape in interpret mode (CPU smoke run)")
flags.DEFINE_string("out", None, "JSON path (default kernels/results/weight_only_<gpu>.json)")

TILES = ((128, None, 4), (64, None, 8), (128, None, 8))   # (bn, splits, warps)
# --sweep: (layout, algorithm, bn, bk, warps, stages, split factor over the default).
# The first sweep (results/weight_only_layouts_nvidia_h200.log) found the (N, K) layout no
# faster and bk=512 / 8 warps slower; this one searches smaller K tiles and deeper pipelines.
SWEEP = (("kn", "mma", 128, 128, 4, 4, 1), ("kn", "mma", 128, 128, 4, 5, 1),
         ("kn", "mma", 128, 128, 4, 6, 1), ("kn", "mma", 64, 128, 4, 5, 1),
         ("kn", "mma", 128, 64, 4, 6, 1), ("kn", "mma", 128, 64, 4, 8, 1),
         ("kn", "mma", 256, 64, 4, 6, 1), ("kn", "mma", 256, 128, 8, 5, 1),
         ("kn", "mma", 128, 128, 4, 5, 2), ("kn", "mma", 64, 64, 4, 8, 2),
         ("kn", "gemv", 128, 32, 4, 4, 1), ("kn", "gemv", 64, 64, 4, 4, 1),
         ("kn", "gemv", 256, 32, 4, 4, 1), ("kn", "gemv", 128, 64, 4, 4, 2))


def loop_seconds(fn, x, w, iters: int, runs: int) -> float:
  """Seconds per call of ``fn(x, w)``: ``iters`` calls chained in one jitted loop (each
  call's input depends on the previous output, so none is hoisted), median of ``runs``."""
  @jax.jit
  def many(x, w):
    def body(_, xc):
      y = fn(xc, w)
      # A zero the compiler cannot fold (0 * NaN is NaN): the next call waits for this one.
      return xc + jnp.zeros((), xc.dtype) * y[:, :1].astype(xc.dtype)
    return lax.fori_loop(0, iters, body, x)

  jax.block_until_ready(many(x, w))
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    jax.block_until_ready(many(x, w))
    times.append((time.perf_counter() - t0) / iters)
  return statistics.median(times)


def variants(name: str, m: int, interpret: bool):
  v = {"bf16": lambda x, w: jnp.dot(x, w["bf16"], preferred_element_type=jnp.float32),
       "naive": lambda x, w: naive_weight_only_dot(
           x, w["q"].codes, w["q"].scales, w["q"].tensor_scale, w["q"].spec.block_size),
       "dequantize": lambda x, w: jnp.dot(x, fp4jax.dequantize(w["q"], jnp.bfloat16),
                                          preferred_element_type=jnp.float32),
       "dispatch": lambda x, w: fp4jax.gemm.weight_only_dot(x, w["q"],
                                                            out_dtype=jnp.float32)}
  decoders = ("alu",) if interpret else ("prmt", "alu")
  for d in decoders:
    v[f"kernel_{d}"] = lambda x, w, d=d: wo.weight_only_matmul(
        x, w["q"], out_dtype=jnp.float32, interpret=interpret, decoder=d)
  if FLAGS.tiles and not interpret and m <= FLAGS.tile_rows:
    bm = wo.weight_only_rows_tile(m)
    for bn, splits, warps in TILES:
      if FLAGS.n % bn:
        continue
      v[f"kernel_prmt/bn{bn}_w{warps}"] = lambda x, w, bn=bn, warps=warps: \
          wo.weight_only_matmul(x, w["q"], out_dtype=jnp.float32, tile=(bm, bn, 256),
                                num_warps=warps, decoder="prmt")
  if not interpret:
    v["kernel_prmt/nk"] = lambda x, w: wo.weight_only_linear(
        x, w["qt"], out_dtype=jnp.float32, decoder="prmt", algorithm="mma")
    if m <= wo.GEMV_MAX_ROWS:
      v["kernel_prmt/gemv"] = lambda x, w: wo.weight_only_matmul(
          x, w["q"], out_dtype=jnp.float32, decoder="prmt", algorithm="gemv")
  if FLAGS.sweep and not interpret \
      and name in FLAGS.sweep_formats and m in [int(r) for r in FLAGS.sweep_rows]:
    for layout, alg, bn, bk, warps, stages, sf in SWEEP:
      if alg == "gemv" and m > wo.GEMV_MAX_ROWS or FLAGS.n % bn or FLAGS.k % bk:
        continue
      bm = wo.gemv_rows_tile(m) if alg == "gemv" else wo.weight_only_rows_tile(m)
      splits = sf * wo.weight_only_splits(m, FLAGS.n, FLAGS.k, bm, bn, bk)
      if FLAGS.k % (splits * bk):
        continue
      call = wo.weight_only_matmul if layout == "kn" else wo.weight_only_linear
      key = f"kernel_prmt/{layout}_{alg}_bn{bn}_bk{bk}_w{warps}_st{stages}_s{splits}"
      v[key] = lambda x, w, call=call, q="q" if layout == "kn" else "qt", t=(bm, bn, bk), \
          sp=splits, nw=warps, ns=stages, a=alg: call(
              x, w[q], out_dtype=jnp.float32, tile=t, splits=sp, num_warps=nw,
              num_stages=ns, decoder="prmt", algorithm=a)
  return v


# Error bounds, as a multiple of max(|x| @ |w|): float32 accumulation in another order for
# the kernels and the naive version (exact products); 2^-8 where the weights themselves
# are rounded to BF16 (dequantize to BF16: NVFP4's FP32 tensor scale makes them inexact).
ACCUMULATION_BOUND, BF16_WEIGHTS_BOUND = 2.0**-18, 2.0**-8


def check(y, ref, mag, bound: float = ACCUMULATION_BOUND) -> dict:
  y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
  nan_ok = bool((np.isnan(y) == np.isnan(ref)).all())
  fin = np.isfinite(ref)
  err = float(np.max(np.abs(y - ref)[fin]) / max(float(np.max(mag)), 1e-30)) if fin.any() else 0.0
  return {"max_err_over_mag": err, "bound": bound, "nan_positions_match": nan_ok,
          "ok": nan_ok and err <= bound}


def main(argv):
  del argv
  interpret = FLAGS.smoke or not dispatch.device_facts().on_gpu
  rows = [int(r) for r in FLAGS.rows]
  k, n = FLAGS.k, FLAGS.n
  iters, runs = FLAGS.iters, FLAGS.runs
  if FLAGS.smoke:
    rows, k, n, iters, runs = [1, 16], 512, 128, 2, 1
  dev = jax.devices()[0]
  gpu = dev.device_kind.lower().replace(" ", "_")
  rng = np.random.default_rng(0)
  w32 = jnp.asarray(rng.standard_normal((k, n)).astype(np.float32))
  results = {"device": dev.device_kind, "jax": jax.__version__, "k": k, "n": n,
             "iters_per_loop": iters, "runs": runs, "rows": {}}
  out = FLAGS.out or os.path.join(os.path.dirname(__file__), "results",
                                  f"weight_only_{'smoke' if FLAGS.smoke else gpu}.json")
  print(f"weight-only GEMM, K={k} N={n}, {dev.device_kind}, {iters} calls per jitted loop; "
        "ms per call, x = BF16's time / this one's")
  for m in rows:
    x = jnp.asarray(rng.standard_normal((m, k)).astype(np.float32)).astype(jnp.bfloat16)
    row = {}
    for name in FLAGS.formats:
      q = fp4jax.quantize(w32, name, -2)
      w = {"bf16": w32.astype(jnp.bfloat16), "q": q,
           "qt": fp4jax.quantize(w32.T, name, -1)}   # the same blocks, (N, K) layout
      ref = wo.weight_only_reference(x, q)
      mag = np.abs(np.asarray(x, np.float64)) @ np.abs(
          np.asarray(fp4jax.dequantize(q, jnp.float32), np.float64))
      for vname, fn in variants(name, m, interpret).items():
        key = vname if vname == "bf16" else f"{name}/{vname}"
        if key in row:
          continue
        entry = {}
        try:
          if vname != "bf16":
            rounded = vname == "dequantize" or (vname == "dispatch" and interpret)
            entry.update(check(jax.jit(fn)(x, w), ref, mag,
                               BF16_WEIGHTS_BOUND if rounded else ACCUMULATION_BOUND))
          entry["ms"] = 1e3 * loop_seconds(fn, x, w, iters, runs)
        except Exception as e:  # a variant that does not compile is reported, not fatal
          entry["error"] = f"{type(e).__name__}: {e}"[:2000]
          traceback.print_exc()
        row[key] = entry
    base = row.get("bf16", {}).get("ms")
    for key, e in row.items():
      if base and e.get("ms"):
        e["x_bf16"] = base / e["ms"]
      flag = "" if e.get("ok", True) else "  WRONG"
      if "error" in e:
        print(f"M={m:4d} {key:36s} ERROR {e['error'][:200]}")
      else:
        err = f"  err {e['max_err_over_mag']:.1e}" if "max_err_over_mag" in e else ""
        print(f"M={m:4d} {key:36s} {e['ms']:.4f} ms  {e.get('x_bf16', 1.0):.2f}x{err}{flag}")
    results["rows"][str(m)] = row
    write_json(results, out)   # after every M: a run stopped by a time limit keeps its rows
  print(f"wrote {out}")


if __name__ == "__main__":
  app.run(main)
