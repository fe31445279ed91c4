r"""Correctness and speed of the FP4 GEMM paths, in one run.

    python -m kernels.bench_matmul [--shapes square4096,square8192,vit_qkv,...] [--sweep]

1. Correctness (compiled on this device): every path (MXFP4 through XLA's FP8 GEMM, NVFP4
   and MXFP4 through its BF16 GEMM, weight-only; with ``--inkernel`` also the Triton GEMMs
   that decode in the kernel) against the float32 product of the
   dequantized operands, on random operands and on operands with a wide per-block
   exponent spread, zero blocks and a NaN scale; the worst error as a multiple of
   ``sum_k |a_ik b_kj|`` is recorded (tests/test_kernels_matmul.py bounds it).
2. Speed (median of 5 runs of ``--reps`` calls) per shape: XLA BF16 dot, XLA FP8 E4M3 dot
   (B transposed, "NT"), ``jax.nn.scaled_matmul`` on pre-quantized MXFP8,
   ``jax.nn.scaled_dot_general`` MXFP8 / NVFP4 including its quantization, naive
   fake-quant (fp4jax.quantize + dequantize to bf16 + BF16 dot), the unpack pass alone,
   and fp4jax's paths on pre-quantized operands and including the fused quantize kernels.
   TFLOP/s = 2 M N K / t. Skinny shapes time the weight-only kernel (default tile and
   split, and a few others) against the XLA BF16 dot.

Writes ``kernels/results/matmul_<gpu>.json`` after every measurement.
"""

from __future__ import annotations

import os
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import fp4jax
from fp4jax import dispatch
from fp4jax.kernels import matmul as fm
from fp4jax.kernels import quantize as kq
from fp4jax.kernels import unpack as fu
from fp4jax.kernels import weight_only as wo
from fp4jax.quantization import dequantize
from kernels import inkernel_matmul as im
from kernels.timing import median_time as bench, write_json

INTERPRET = not dispatch.device_facts().on_gpu  # a CPU smoke run interprets the kernels


def gemm(a, b, impl, *, out_dtype=jnp.bfloat16, tile=None, num_warps=4):
  """One GEMM path by name: the library's (fp4jax.kernels.matmul.IMPLS) or the lab's
  in-kernel-decoding Triton GEMMs ("fp8", "bf16")."""
  if impl in im.PATHS:
    return im.inkernel_matmul(a, b, path=impl, out_dtype=out_dtype, tile=tile,
                              num_warps=num_warps, interpret=INTERPRET)
  return fm.fp4_matmul(a, b, impl=impl, out_dtype=out_dtype, interpret=INTERPRET)

FLAGS = flags.FLAGS
SHAPES = {  # name -> (M, K, N)
    "square4096": (4096, 4096, 4096), "square8192": (8192, 8192, 8192),
    # ViT-S/16 at batch 256 (197 tokens, width 384, MLP 1536)
    "vit_qkv": (50432, 384, 1152), "vit_fc1": (50432, 384, 1536), "vit_fc2": (50432, 1536, 384),
    # GPT-small (width 768, MLP 3072) at 8 x 1024 tokens
    "gpt_qkv": (8192, 768, 2304), "gpt_fc1": (8192, 768, 3072), "gpt_fc2": (8192, 3072, 768),
    # skinny: decoding / evaluation with 8192 x 8192 weights
    "skinny1": (1, 8192, 8192), "skinny16": (16, 8192, 8192), "skinny64": (64, 8192, 8192), "skinny256": (256, 8192, 8192),
}
SMOKE_SHAPES = {"smoke": (1024, 256, 256), "smoke_skinny": (16, 1024, 512)}  # CPU smoke runs
flags.DEFINE_list("shapes", list(SHAPES), f"shapes to time: {', '.join(SHAPES)} "
                  f"(or {', '.join(SMOKE_SHAPES)} for a CPU smoke run)")
flags.DEFINE_string("out", None, "JSON path (default kernels/results/matmul_<gpu>.json)")
flags.DEFINE_integer("reps", 10, "timed calls per run (median of 5 runs)")
flags.DEFINE_bool("check", True, "run the correctness checks first")
flags.DEFINE_bool("sweep", False, "try several tiles / warps for the in-kernel-decoding "
                  "FP8 and BF16 GEMMs at 8192^3")
flags.DEFINE_bool("weight_only_tiles", True, "skinny shapes: also time the weight-only "
                  "kernel at a few other tiles than its default")
flags.DEFINE_bool("inkernel", False, "also check and time the in-kernel-decoding Triton GEMMs "
                  "(impl fp8 / bf16: slow, and long to compile)")

MX, NV = fp4jax.get_spec("mxfp4"), fp4jax.get_spec("nvfp4")


def _error_ratio(y, a, b):
  """max |y - ref| / sum_k |a_ik b_kj| over finite entries, and whether NaNs match."""
  da, db = dequantize(a, jnp.float32), dequantize(b, jnp.float32)
  hi = jax.lax.Precision.HIGHEST
  ref = jnp.dot(da, db, precision=hi)
  mag = jnp.dot(jnp.abs(da), jnp.abs(db), precision=hi)
  y = y.astype(jnp.float32)
  nan_ok = bool(jnp.all(jnp.isnan(y) == jnp.isnan(ref)))
  fin = jnp.isfinite(ref) & jnp.isfinite(mag) & (mag > 0)
  ratio = jnp.where(fin, jnp.abs(y - ref) / jnp.where(fin, mag, 1.0), 0.0)
  return float(jnp.max(ratio)), nan_ok


def _operands(rng, m, k, n, spec_a, spec_b, adversarial):
  x = rng.standard_normal((m, k)).astype(np.float32)
  w = rng.standard_normal((k, n)).astype(np.float32)
  if adversarial:
    x *= np.exp2(rng.integers(-40, 41, (m, k // 32))).repeat(32, 1).astype(np.float32)
    w *= np.exp2(rng.integers(-40, 41, (k // 32, n))).repeat(32, 0).astype(np.float32)
    x[:, 64:96] = 0.0
  a = fp4jax.quantize(jnp.asarray(x), spec_a, -1)
  b = fp4jax.quantize(jnp.asarray(w), spec_b, -2)
  if adversarial and spec_a.scale_format.is_pow2:  # one NaN scale: row 3 must be NaN
    s = jax.lax.bitcast_convert_type(a.scales, jnp.uint8).at[3, 2].set(255)
    a = a.__class__(a.codes, jax.lax.bitcast_convert_type(s, a.scales.dtype), a.tensor_scale,
                    a.spec, a.axis, a.padding, a.orig_dtype)
  return a, b


def check_all(rng, save) -> dict:
  res = {}
  cases = {"mxfp4_fp8_xla": (MX, MX, "fp8_xla"), "mxfp4_bf16_xla": (MX, MX, "bf16_xla"),
           "nvfp4_bf16_xla": (NV, NV, "bf16_xla")}
  if FLAGS.inkernel:
    cases.update({"mxfp4_fp8": (MX, MX, "fp8"), "mxfp4_bf16": (MX, MX, "bf16"),
                  "nvfp4_bf16": (NV, NV, "bf16")})
  for label, (sa, sb, impl) in cases.items():
    for adv in (False, True):
      key = f"{label}/{'adversarial' if adv else 'random'}"
      try:
        a, b = _operands(rng, 512, 1024, 384, sa, sb, adv)
        y = gemm(a, b, impl, out_dtype=jnp.float32)
        ratio, nan_ok = _error_ratio(y, a, b)
        res[key] = {"max_err_over_sum_abs": ratio, "nan_positions_match": nan_ok}
      except Exception as e:
        res[key] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
        traceback.print_exc()
      print(f"check {key:32} {res[key]}", flush=True)
      save(res)
  for name, spec in (("mxfp4", MX), ("nvfp4", NV)):
    key = f"weight_only_{name}"
    try:
      w = fp4jax.quantize(jnp.asarray(rng.standard_normal((1024, 384)).astype(np.float32)),
                          spec, -2)
      x = jnp.asarray(rng.standard_normal((40, 1024)).astype(np.float32))
      y = wo.weight_only_matmul(x, w, out_dtype=jnp.float32, interpret=INTERPRET)
      ref = wo.weight_only_reference(x, w)
      xb = jnp.abs(x.astype(jnp.bfloat16).astype(jnp.float32))
      mag = jnp.dot(xb, jnp.abs(dequantize(w, jnp.float32)), precision="highest")
      res[key] = {"max_err_over_sum_abs": float(jnp.max(jnp.abs(y - ref) / mag))}
    except Exception as e:
      res[key] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
      traceback.print_exc()
    print(f"check {key:32} {res[key]}", flush=True)
    save(res)
  return res


def naive_fake_quant_mxfp4(x, axis):
  """MXFP4 fake quantization as one writes it by hand in XLA (blocks of 32 along
  ``axis``): log2/floor scales, per-binade jnp.round, back to bf16."""
  xm = jnp.moveaxis(x.astype(jnp.float32), axis, -1)
  lead, k = xm.shape[:-1], xm.shape[-1]
  xb = xm.reshape(*lead, k // 32, 32)
  amax = jnp.max(jnp.abs(xb), axis=-1, keepdims=True)
  scale = jnp.exp2(jnp.floor(jnp.log2(jnp.maximum(amax, 1e-38))) - 2.0)
  y = jnp.abs(xb) / scale
  q = jnp.where(y < 2, jnp.round(y * 2) / 2, jnp.where(y < 4, jnp.round(y),
                                                      jnp.round(y / 2) * 2))
  q = jnp.sign(xb) * jnp.minimum(q, 6.0) * scale
  return jnp.moveaxis(q.reshape(*lead, k), -1, axis).astype(jnp.bfloat16)


def _variants(m, k, n, rng, tile):
  """name -> (jitted function, args) for one shape."""
  x = jnp.asarray(rng.standard_normal((m, k)).astype(np.float32)).astype(jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((k, n)).astype(np.float32)).astype(jnp.bfloat16)
  v = {}
  v["xla_bf16"] = (jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32)
                           .astype(jnp.bfloat16)), (x, w))
  if m < 1024:  # skinny: BF16 activations x FP4 weights
    for name, spec in (("mxfp4", MX), ("nvfp4", NV)):
      wq = fp4jax.quantize(w, spec, -2)
      v[f"weight_only_{name}"] = (jax.jit(lambda x, wq: wo.weight_only_matmul(
          x, wq, interpret=INTERPRET)), (x, wq))
      # What the library runs for it (fp4jax.dispatch.choose_weight_only under "auto").
      v[f"weight_only_{name}_dispatch"] = (jax.jit(lambda x, wq: fp4jax.gemm.weight_only_dot(
          x, wq, impl="auto", out_dtype=jnp.bfloat16)), (x, wq))
      bm = wo.weight_only_rows_tile(m)
      tiles = ((128, None, 4), (64, 8, 4), (64, None, 8), (32, None, 4))
      for bn, splits, warps in (tiles if FLAGS.weight_only_tiles else ()):
        v[f"weight_only_{name}/bn{bn}_s{splits}_w{warps}"] = (jax.jit(
            lambda x, wq, bn=bn, splits=splits, warps=warps, bm=bm: wo.weight_only_matmul(
                x, wq, tile=(bm, bn, 256), splits=splits, num_warps=warps,
                interpret=INTERPRET)), (x, wq))
    return v
  x8, wt8 = x.astype(jnp.float8_e4m3fn), w.T.astype(jnp.float8_e4m3fn)
  v["xla_fp8_nt"] = (jax.jit(lambda a, bt: jax.lax.dot_general(
      a, bt, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32).astype(jnp.bfloat16)),
                     (x8, wt8))
  for mode in ("mxfp8", "nvfp4"):
    try:
      cfg = jax.nn.get_scaled_dot_general_config(mode)
      v[f"scaled_dot_general_{mode}_incl_quant"] = (jax.jit(
          lambda x, w, cfg=cfg: jax.nn.scaled_dot_general(
              x, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.bfloat16,
              configs=[cfg, cfg, cfg])), (x, w))
    except Exception as e:  # older jax: no such mode
      print(f"  (no scaled_dot_general {mode}: {type(e).__name__})")
  v["naive_fakequant_mxfp4_bf16"] = (jax.jit(lambda x, w: jnp.dot(
      naive_fake_quant_mxfp4(x, 1), naive_fake_quant_mxfp4(w, 0),
      preferred_element_type=jnp.float32).astype(jnp.bfloat16)), (x, w))
  interp = INTERPRET
  v["xla_bf16_nt"] = (jax.jit(lambda a, bt: jax.lax.dot_general(
      a, bt, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32).astype(jnp.bfloat16)),
                      (x, w.T))
  a, b = fp4jax.quantize(x, MX, -1), fp4jax.quantize(w, MX, -2)
  ra, rb, _ = fm.fp8_reference_codes(a, b)
  v["unpack_only_mxfp4_e4m3"] = (jax.jit(lambda a, b, ra, rb: (
      fu.gemm_operand(a, role="lhs", to="e4m3", ref_code=ra, interpret=interp),
      fu.gemm_operand(b, role="rhs", to="e4m3", ref_code=rb, interpret=interp))),
                                 (a, b, ra, rb))
  v["unpack_only_mxfp4_bf16"] = (jax.jit(lambda a, b: (
      fu.gemm_operand(a, role="lhs", to="bf16", interpret=interp),
      fu.gemm_operand(b, role="rhs", to="bf16", interpret=interp))), (a, b))
  paths = [("mxfp4_fp8_xla", MX, "fp8_xla"), ("mxfp4_bf16_xla", MX, "bf16_xla"),
           ("nvfp4_bf16_xla", NV, "bf16_xla")]
  if FLAGS.inkernel:
    paths += [("mxfp4_fp8", MX, "fp8"), ("mxfp4_bf16", MX, "bf16"), ("nvfp4_bf16", NV, "bf16")]
  for name, spec, impl in paths:
    a, b = fp4jax.quantize(x, spec, -1), fp4jax.quantize(w, spec, -2)
    v[f"fp4jax_{name}"] = (jax.jit(lambda a, b, impl=impl: gemm(a, b, impl, tile=tile)), (a, b))
    v[f"fp4jax_{name}_incl_quant"] = (jax.jit(lambda x, w, spec=spec, impl=impl: gemm(
        kq.quantize(x, spec, -1, interpret=interp), kq.quantize(w, spec, -2, interpret=interp),
        impl, tile=tile)), (x, w))
  return v


def main(argv):
  del argv
  facts = dispatch.device_facts()
  out_path = FLAGS.out or os.path.join(os.path.dirname(__file__), "results",
                                       f"matmul_{facts.slug}.json")
  res = {"device": facts.kind, "jax": jax.__version__, "checks": {}, "timings": {},
         "sweep": {}}

  def save():
    write_json(res, out_path)

  rng = np.random.default_rng(0)
  start = time.perf_counter()
  if FLAGS.check:
    check_all(rng, lambda r: (res.__setitem__("checks", r), save()))
  tile = None
  if FLAGS.sweep:
    m = k = n = 8192
    x = jnp.asarray(rng.standard_normal((m, k)).astype(np.float32)).astype(jnp.bfloat16)
    best = {}
    for name, spec, impl in (("mxfp4_fp8", MX, "fp8"), ("nvfp4_bf16", NV, "bf16")):
      a, b = fp4jax.quantize(x, spec, -1), fp4jax.quantize(x, spec, -2)
      for t in ((128, 128, 128), (128, 256, 128), (256, 128, 128), (128, 128, 64)):
        for warps in (4, 8):
          label = f"{name}/{t[0]}x{t[1]}x{t[2]}/w{warps}"
          try:
            f = jax.jit(lambda a, b, t=t, warps=warps, impl=impl: gemm(
                a, b, impl, tile=t, num_warps=warps))
            s = bench(f, a, b, reps=FLAGS.reps)
            res["sweep"][label] = {"ms": s * 1e3, "tflops": 2 * m * n * k / s / 1e12}
            if name == "mxfp4_fp8" and (not best or s < best["s"]):
              best = {"s": s, "tile": t}
          except Exception as e:
            res["sweep"][label] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
          print(f"sweep {label:32} {res['sweep'][label]}", flush=True)
          save()
    tile = best.get("tile")
  for shape in FLAGS.shapes:
    m, k, n = {**SHAPES, **SMOKE_SHAPES}[shape]
    row = {"shape": [m, k, n]}
    res["timings"][shape] = row
    for name, (fn, args) in _variants(m, k, n, rng, tile).items():
      try:
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        first = time.perf_counter() - t0
        s = bench(fn, *args, reps=FLAGS.reps)
        row[name] = {"ms": s * 1e3, "tflops": 2 * m * n * k / s / 1e12, "first_call_s": first}
      except Exception as e:
        row[name] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
      save()
    base = row["xla_bf16"]["ms"] if isinstance(row.get("xla_bf16"), dict) else float("nan")
    print(f"\n{shape} M={m} K={k} N={n} on {facts.kind} "
          f"({time.perf_counter() - start:.0f} s)")
    for name, r in row.items():
      if isinstance(r, dict):
        print(f"  {name:40} {r['ms']:9.3f} ms {r['tflops']:8.1f} TFLOP/s "
              f"{base / r['ms']:6.2f} x XLA bf16", flush=True)
      elif name != "shape":
        print(f"  {name:40} {r}", flush=True)
  save()
  print(f"wrote {out_path}")


if __name__ == "__main__":
  app.run(main)
