r"""NVFP4 (float block scales) GEMM-ready operands: the float-scale Pallas passes against
XLA's emitter, checked bit for bit and timed in one run.

    python -m kernels.bench_float_operand [--size=16384] [--tiles=64x128x4,...]

Per case (blocks along rows or along columns with the 16-point Hadamard; nearest or
stochastic rounding), on a ``size x size`` bfloat16 input:

* ``copy``: ``-x`` (one read, one write: the yardstick; "of copy" = copy time / time);
* ``naive``: what a user writes in plain ``jnp`` for NVFP4 fake quantization (tensor amax,
  ``amax / 6 / t`` cast to E4M3, ``x / (s t)`` cast to E2M1 and back; nearest only, the
  Hadamard as an ``einsum``);
* ``xla_<method>``: :func:`fp4jax.operand.gemm_operand` of :func:`fp4jax.hadamard.rht`
  (the ``auto`` path before the kernels; ``dot_bf16`` is the GPU's default method);
* ``kernel_<tile>``: :mod:`fp4jax.kernels.float_scale_operand` (``ieee_subnormals`` where
  its check passed), one row per tile, checked against ``xla_butterfly`` first.

Writes ``kernels/results/float_operand_<gpu>.json``.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from fp4jax import dispatch, hadamard, operand
from fp4jax.kernels import float_scale_operand as kf
from fp4jax.kernels.operand import OperandKernelConfig
from fp4jax.spec import get_spec
from kernels.timing import median_time, write_json

FLAGS = flags.FLAGS
flags.DEFINE_integer("size", 16384, "square matrix side")
flags.DEFINE_integer("reps", 20, "timed calls per run (median of 5 runs)")
flags.DEFINE_list("tiles", ["16x512x8", "32x256x8", "64x128x4", "64x256x8", "128x128x8"],
                  "kernel tiles to time, rows x cols x warps")
flags.DEFINE_list("cases", ["rows", "rows_sr", "cols_h", "cols_h_sr"], "which cases")
flags.DEFINE_string("out", None, "JSON path (default kernels/results/float_operand_<gpu>.json)")

NV = get_spec("nvfp4")
NV_SR = NV.replace(rounding="stochastic")
CASES = {"rows": (NV, -1, None), "rows_sr": (NV_SR, -1, None),
         "cols_h": (NV, -2, 16), "cols_h_sr": (NV_SR, -2, 16)}
E4M3_MAX, E2M1_MAX = 448.0, 6.0


def naive_nvfp4(x: jax.Array, axis: int) -> jax.Array:
  """NVFP4 fake quantization as a user writes it: blocks of 16 along ``axis``."""
  xf = jnp.moveaxis(x.astype(jnp.float32), axis, -1)
  t = jnp.max(jnp.abs(xf)) / (E2M1_MAX * E4M3_MAX)
  b = xf.reshape(*xf.shape[:-1], -1, 16)
  s = (jnp.max(jnp.abs(b), axis=-1, keepdims=True) / E2M1_MAX / t).astype(jnp.float8_e4m3fn)
  st = s.astype(jnp.float32) * t
  q = jnp.where(st > 0, b / st, 0.0).astype(jnp.float4_e2m1fn).astype(jnp.float32) * st
  return jnp.moveaxis(q.reshape(xf.shape), -1, axis).astype(jnp.bfloat16)


def _same_bits(a, b) -> dict:
  a = np.asarray(jnp.asarray(a, jnp.float32))
  b = np.asarray(jnp.asarray(b, jnp.float32))
  nan = np.isnan(a) & np.isnan(b)
  diff = (a.view(np.uint32) != b.view(np.uint32)) & ~nan
  return {"mismatches": int(diff.sum()), "nan_both": int(nan.sum())}


def _check_inputs(n: int) -> dict:
  """Random data over many binades with adversarial entries (zeros, subnormals, the top
  of the range, an Inf and a NaN in inputs of their own)."""
  rng = np.random.default_rng(0)
  x = (rng.standard_normal((n, n)) * np.exp2(rng.integers(-20, 20, (n, n)))).astype(np.float32)
  flat = x.reshape(-1)
  flat[:4096] = 0.0
  flat[4096:8192] = -0.0
  flat[8192:12288] = rng.choice([1e-40, -3e-39, 2.0 ** -130], 4096)
  flat[12288:12304] = 6.0 * 448.0 * 2.0 ** 20
  out = {"wide": x}
  inf = x.copy()
  inf.reshape(-1)[77] = np.inf
  nan = x.copy()
  nan.reshape(-1)[99] = np.nan
  out.update(inf=inf, nan=nan)
  return {k: jnp.asarray(v, jnp.bfloat16) for k, v in out.items()} | {
      "wide_f32": jnp.asarray(x)}


def _tile(s: str) -> OperandKernelConfig:
  """``rows x cols x warps``."""
  r, c, w = (int(v) for v in s.split("x"))
  return OperandKernelConfig(r, c, w)


def main(argv):
  del argv
  facts = dispatch.device_facts()
  interpret = dispatch.interpret_mode(facts)
  out_path = FLAGS.out or os.path.join(os.path.dirname(__file__), "results",
                                       f"float_operand_{facts.slug}.json")
  key, hkey = jax.random.key(0), jax.random.key(1)
  res = {"device": facts.kind, "jax": jax.__version__, "size": FLAGS.size, "checks": {},
         "timings_ms": {}, "of_copy": {}}

  def xla_fn(spec, axis, block, method):
    def fn(v):
      y = v if block is None else hadamard.rht(v, axis, hkey, block, method=method,
                                                dtype=jnp.float32)
      return operand.gemm_operand(y, spec, axis, key, ieee_subnormals=facts.keeps_subnormals)[0]
    return jax.jit(fn)

  def kernel_fn(spec, axis, block, cfg, ieee):
    return jax.jit(lambda v: kf.gemm_operand(v, spec, axis, key, hadamard_key=hkey,
                                             hadamard_block=block, config=cfg,
                                             interpret=interpret, ieee_subnormals=ieee)[0])

  # Checks: each case, both multiply variants, every input, the default tile and one more.
  n_check = 512 if interpret else 2048
  inputs = _check_inputs(n_check)
  ieee_ok = {}
  for case in FLAGS.cases:
    spec, axis, block = CASES[case]
    ref = xla_fn(spec, axis, block, "butterfly")
    for ieee in sorted({False, facts.keeps_subnormals}):
      for tile in [None] + FLAGS.tiles[:1]:
        fn = kernel_fn(spec, axis, block, None if tile is None else _tile(tile), ieee)
        for name, v in inputs.items():
          r = _same_bits(fn(v), ref(v))
          res["checks"][f"{case}/ieee={ieee}/{tile or 'default'}/{name}"] = r
          print(f"check {case} ieee={ieee} tile={tile or 'default'} {name}: {r}", flush=True)
      ieee_ok[(case, ieee)] = all(
          v["mismatches"] == 0 for k, v in res["checks"].items()
          if k.startswith(f"{case}/ieee={ieee}/"))
  exact = all(v["mismatches"] == 0 for v in res["checks"].values())
  res["all_exact"] = exact
  print("all exact:", exact, flush=True)

  n = FLAGS.size
  x = jax.random.normal(jax.random.key(2), (n, n), jnp.bfloat16)
  t_copy = median_time(jax.jit(lambda v: -v), x, reps=FLAGS.reps) * 1e3
  res["timings_ms"]["copy"] = t_copy
  print(f"copy {t_copy:.3f} ms", flush=True)
  for case in FLAGS.cases:
    spec, axis, block = CASES[case]
    fns = {}
    if spec.rounding == "nearest":
      fns["naive"] = jax.jit(lambda v, axis=axis, block=block: naive_nvfp4(
          v if block is None else hadamard.rht(v, axis, hkey, block, method="dot_bf16",
                                               dtype=jnp.float32), axis))
    for method in (["dot_bf16", "butterfly"] if block else ["none"]):
      fns[f"xla_{method}"] = xla_fn(spec, axis, block, method)
    ieee = facts.keeps_subnormals and ieee_ok.get((case, True), False)
    for tile in FLAGS.tiles:
      fns[f"kernel_{tile}"] = kernel_fn(spec, axis, block, _tile(tile), ieee)
    for name, fn in fns.items():
      try:
        t = median_time(fn, x, reps=FLAGS.reps) * 1e3
      except Exception as e:  # a tile that does not compile is reported, not fatal
        print(f"{case} {name}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
        continue
      res["timings_ms"][f"{case}/{name}"] = t
      res["of_copy"][f"{case}/{name}"] = t_copy / t
      print(f"{case:10s} {name:18s} {t:7.3f} ms  {t_copy / t:5.2f} of copy", flush=True)
  write_json(res, out_path)
  print("wrote", out_path)


if __name__ == "__main__":
  app.run(main)
