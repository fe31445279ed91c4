r"""GEMM-ready operands (fp4jax.operand): bit-exactness on this device, and speed against
a copy and the naive fake quantization, in one run.

    python -m kernels.bench_operand [--size 16384] [--out kernels/results/operand_<gpu>.json]

1. Correctness, compiled for this device: :func:`fp4jax.operand.gemm_operand` against
   :func:`fp4jax.operand.gemm_operand_reference` bit for bit, for MXFP4 (every scale mode)
   and NVFP4 (1x16, 16x16), nearest and stochastic rounding, blocks along rows and
   columns, both variants (``ieee_subnormals`` False, and True where the device keeps
   subnormals), on every bf16 bit pattern and on wide-range float32 data with zero,
   subnormal, tiny and near-max blocks.
2. Speed on a ``size x size`` bf16 matrix, median of 5 runs of ``--reps`` calls: a copy
   (``-x``: one read, one write, the floor of any bf16 -> bf16 pass), the naive MXFP4 fake
   quantization of :mod:`kernels.naive`, ``gemm_operand`` per configuration (the variant
   the fused layers run on this device), the Pallas operand kernel
   (:mod:`fp4jax.kernels.operand`: rows, columns, and both from one read, whose bytes are
   1.5 copies'), and the Pallas quantize kernels (packed codes, ``--quantize_kernels``).
   "of copy" = copy time / time: the fraction of copy bandwidth reached for the same bytes
   (for "both", 1.5 x copy time / time; for packed outputs, the copy's bytes are more).
3. The Pallas operand kernel checked like (1), compiled, MX specs (its scope), both of its
   variants (the one-multiply ``ieee_subnormals=True`` is exact only if Triton's float32
   multiply keeps subnormals; the dispatch runs the other).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import fp4jax
from fp4jax import dispatch, operand
from fp4jax.kernels import operand as kernel_operand
from fp4jax.kernels import quantize as kernel_quantize
from kernels.naive import naive_fake_quant
from kernels.timing import median_time

FLAGS = flags.FLAGS
flags.DEFINE_integer("size", 16384, "square matrix side")
flags.DEFINE_integer("reps", 20, "timed calls per run (median of 5 runs)")
flags.DEFINE_bool("check", True, "run the bit-exactness checks first")
flags.DEFINE_list("quantize_kernels", ["mxfp4_rows", "mxfp4_sr_rows"],
                  f"packed quantize kernels to time, of {sorted(['mxfp4_rows', 'mxfp4_sr_rows', 'nvfp4_rows', 'nvfp4_sr_rows', 'nvfp4_h16_rows'])} "
                  "(NVFP4 kernels compile for minutes under Triton)")
flags.DEFINE_string("out", None, "JSON path (default kernels/results/operand_<gpu>.json)")

MX = fp4jax.get_spec("mxfp4")
NV = fp4jax.get_spec("nvfp4")
SR = {"rounding": "stochastic"}
CONFIGS = {  # name -> (spec, axis)
    "mxfp4_rows": (MX, -1), "mxfp4_cols": (MX, -2), "mxfp4_rceil_rows": (MX.replace(
        scale_mode="rceil"), -1), "mxfp4_sr_rows": (MX.replace(**SR), -1),
    "mxfp4_sr_cols": (MX.replace(**SR), -2),
    "nvfp4_rows": (NV, -1), "nvfp4_cols": (NV, -2), "nvfp4_sr_rows": (NV.replace(**SR), -1),
    "nvfp4_2d": (fp4jax.get_spec("nvfp4_2d"), -1),
}


def _bits(x):
  return np.asarray(jax.lax.bitcast_convert_type(
      x, jnp.uint16 if x.dtype == jnp.bfloat16 else jnp.uint32))


def check_inputs(seed=0):
  """Every bf16 bit pattern (shuffled into (512, 128)) and wide-range float32 data."""
  rng = np.random.default_rng(seed)
  pats = rng.permutation(np.arange(65536, dtype=np.uint32))
  every = jnp.asarray((pats << 16).view(np.float32).reshape(512, 128)).astype(jnp.bfloat16)
  finite = np.asarray(every.astype(jnp.float32))
  finite = jnp.asarray(np.where(np.isfinite(finite), finite, 1.0)).astype(jnp.bfloat16)
  wide = (rng.standard_normal((256, 128)) * np.exp2(rng.integers(-30, 30, (256, 128))))
  wide = wide.astype(np.float32)
  wide[0, :32] = rng.standard_normal(32) * 1e-39
  wide[1, :32] = 0.0
  wide[2, :32] = rng.standard_normal(32) * 2.0 ** -124
  wide[3, :4] = [3.0e38, -2.0e38, 1e-45, -0.0]
  return {"every_bf16": every, "finite_bf16": finite, "wide_f32": jnp.asarray(wide)}


def check(key, ieee: bool) -> dict:
  out = {}
  inputs = check_inputs()
  specs = dict(CONFIGS)
  specs.update({f"mxfp4_{m}_rows": (MX.replace(scale_mode=m), -1) for m in ("ceil", "even")})
  for name, (spec, axis) in specs.items():
    bad = 0
    for data_name, x in inputs.items():
      if data_name == "every_bf16" and not spec.scale_format.is_pow2:
        continue  # NaN/Inf make NVFP4's tensor scale NaN: every value is NaN (checked on CPU)
      got, t = jax.jit(lambda v: operand.gemm_operand(v, spec, axis, key,
                                                      ieee_subnormals=ieee))(x)
      ref, tr = jax.jit(lambda v: operand.gemm_operand_reference(v, spec, axis, key))(x)
      bad += int((_bits(got) != _bits(ref)).sum())
      if t is not None:
        bad += int(_bits(t) != _bits(tr))
    out[name] = bad
    print(f"check {name:18} ieee_subnormals={ieee!s:5}: "
          f"{'bit-exact' if bad == 0 else f'{bad} MISMATCHES'}", flush=True)
  return out


KERNEL_CONFIGS = {  # name -> (rows spec, cols spec): the operand kernel's scope, MX specs
    "mxfp4_rows": (MX, None), "mxfp4_cols": (None, MX), "mxfp4_both": (MX, MX),
    "mxfp4_sr_rows": (MX.replace(**SR), None), "mxfp4_sr_cols": (None, MX.replace(**SR)),
    "mxfp4_sr_both": (MX.replace(**SR), MX.replace(**SR)),
    "mxfp4_rceil_rows": (MX.replace(scale_mode="rceil"), None),
    "mxfp4_b16_cols": (None, MX.replace(block_size=16)),
}
QUANTIZE_KERNELS = {  # name -> (spec, hadamard block)
    "mxfp4_rows": (MX, None), "mxfp4_sr_rows": (MX.replace(**SR), None),
    "nvfp4_rows": (NV, None), "nvfp4_sr_rows": (NV.replace(**SR), None),
    "nvfp4_h16_rows": (NV, 16),
}


def _kernel_fn(rows, cols, key, ieee):
  def fn(v):
    if rows is not None and cols is not None:
      return kernel_operand.gemm_operand_both(v, rows, cols, key, key, ieee_subnormals=ieee)
    spec, axis = (rows, -1) if rows is not None else (cols, -2)
    return kernel_operand.gemm_operand(v, spec, axis, key, ieee_subnormals=ieee)
  return jax.jit(fn)


def check_kernel(key, ieee: bool) -> dict:
  out = {}
  inputs = check_inputs()
  for name, (rows, cols) in KERNEL_CONFIGS.items():
    bad = 0
    for data_name, x in inputs.items():
      got = _kernel_fn(rows, cols, key, ieee)(x)
      got = got if isinstance(got, tuple) else (got,)
      want = [kernel_operand.gemm_operand_reference(x, s, a, key)
              for s, a in ((rows, -1), (cols, -2)) if s is not None]
      bad += sum(int((_bits(g) != _bits(w)).sum()) for g, w in zip(got, want))
    out[name] = bad
    print(f"check kernel {name:16} ieee_subnormals={ieee!s:5}: "
          f"{'bit-exact' if bad == 0 else f'{bad} MISMATCHES'}", flush=True)
  return out


def main(argv):
  del argv
  facts = dispatch.device_facts()
  out_path = FLAGS.out or os.path.join(os.path.dirname(__file__), "results",
                                       f"operand_{facts.slug}.json")
  key = jax.random.key(0)
  res = {"device": facts.kind, "jax": jax.__version__, "size": FLAGS.size, "timings_ms": {}}
  ieee = facts.keeps_subnormals  # the variant fp4jax.qdot's fused path runs here
  res["ieee_subnormals"] = ieee
  if FLAGS.check:
    res["mismatches"] = {str(v): check(key, v) for v in sorted({False, ieee})}
    if facts.on_gpu:
      res["kernel_mismatches"] = {str(v): check_kernel(key, v) for v in (False, True)}
  n = FLAGS.size
  x = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
  fns = {"copy": jax.jit(lambda v: -v),
         "naive_mxfp4_rows": jax.jit(lambda v: naive_fake_quant(v, -1)),
         "naive_mxfp4_cols": jax.jit(lambda v: naive_fake_quant(v, -2))}
  for name, (spec, axis) in CONFIGS.items():
    fns[name] = jax.jit(lambda v, spec=spec, axis=axis: operand.gemm_operand(
        v, spec, axis, key, ieee_subnormals=ieee)[0])
  interpret = dispatch.interpret_mode(facts)
  for name, (rows, cols) in KERNEL_CONFIGS.items():
    if not interpret:
      fns[f"kernel_{name}"] = _kernel_fn(rows, cols, key, False)
  if not interpret:
    fns["kernel_mxfp4_rows_ieee"] = _kernel_fn(MX, None, key, True)
    fns["kernel_mxfp4_both_ieee"] = _kernel_fn(MX, MX, key, True)
  for name in FLAGS.quantize_kernels:
    spec, h = QUANTIZE_KERNELS[name]
    fns[f"quantize_kernel_{name}"] = jax.jit(
        lambda v, spec=spec, h=h: kernel_quantize.quantize(v, spec, -1, key, hadamard_block=h,
                                                           interpret=interpret))
  t_copy = None
  for name, fn in fns.items():
    try:
      t = median_time(fn, x, reps=FLAGS.reps, runs=5)
    except Exception as e:  # a configuration that fails is recorded, the others still run
      res["timings_ms"][name] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
      print(name, res["timings_ms"][name], flush=True)
      continue
    t_copy = t if name == "copy" else t_copy
    copies = 1.5 if name.startswith("kernel_") and "_both" in name else 1.0
    res["timings_ms"][name] = {"ms": t * 1e3, "of_copy": copies * t_copy / t,
                               "GB_per_s_bf16_in_out": 4 * copies * n * n / t / 1e9}
    print(f"{name:32} {t * 1e3:8.3f} ms  {copies * t_copy / t:5.2f} of copy  "
          f"{4 * copies * n * n / t / 1e9:7.0f} GB/s (bf16 in + out)", flush=True)
  os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
  with open(out_path, "w") as f:
    json.dump(res, f, indent=1)
  print(f"wrote {out_path}")


if __name__ == "__main__":
  app.run(main)
