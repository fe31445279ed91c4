"""Shared checks of the FP4 GEMM tests (library kernels and the lab's in-kernel GEMMs).

Products are exact in every path; only the accumulation differs, so results must agree
within ``TOL * sum_k |a_ik b_kj|``: 2^-20 in interpret mode (CPU, float32 accumulation in
another order), 2^-10 compiled on Hopper (its FP8 tensor cores accumulate tile sums with a
shortened mantissa). NaN positions must match exactly.
"""

import jax.numpy as jnp
import numpy as np

import fp4jax

INTERPRET = not fp4jax.dispatch.device_facts().on_gpu
TOL = 2.0**-20 if INTERPRET else 2.0**-10
MX, NV = fp4jax.get_spec("mxfp4"), fp4jax.get_spec("nvfp4")


def assert_close(y, a, b, what, tol=None):
  tol = TOL if tol is None else tol
  da = np.asarray(fp4jax.dequantize(a, jnp.float32))
  db = np.asarray(fp4jax.dequantize(b, jnp.float32))
  with np.errstate(all="ignore"):
    ref = da.astype(np.float64) @ db.astype(np.float64)
    mag = np.abs(da).astype(np.float64) @ np.abs(db).astype(np.float64)
  y = np.asarray(y, np.float64)
  assert (np.isnan(y) == np.isnan(ref)).all(), f"{what}: NaN positions differ from the reference"
  fin = np.isfinite(ref) & np.isfinite(mag)
  err = np.abs(y - ref)[fin]
  bound = tol * mag[fin] + 1e-30
  worst = np.max(err / bound) if err.size else 0.0
  assert (err <= bound).all(), f"{what}: error up to {worst:.2f}x the bound TOL*sum|ab|"


def operands(rng, m, k, n, spec_a, spec_b, spread=0, zero_blocks=False):
  """(a (m, k) blocked along K, b (k, n) blocked along K), random; ``spread``: a random
  power of two per 32-block (scale exponents far apart); ``zero_blocks``: some all-zero."""
  x = rng.standard_normal((m, k)).astype(np.float32)
  w = rng.standard_normal((k, n)).astype(np.float32)
  if spread:
    x *= np.exp2(rng.integers(-spread, spread + 1, (m, k // 32))).repeat(32, 1).astype(np.float32)
    w *= np.exp2(rng.integers(-spread, spread + 1, (k // 32, n))).repeat(32, 0).astype(np.float32)
  if zero_blocks:
    x[:, 32:64] = 0.0
    w[64:96, :] = 0.0
  return fp4jax.quantize(jnp.asarray(x), spec_a, -1), fp4jax.quantize(jnp.asarray(w), spec_b, -2)


def with_nan_scales(a, b):
  """``a`` with E8M0 scale (5, 3) and ``b`` with (1, 40) set to NaN (code 255): row 5 and
  column 40 of the product must be NaN, nothing else."""
  import jax
  sa = np.asarray(jax.lax.bitcast_convert_type(a.scales, jnp.uint8)).copy()
  sb = np.asarray(jax.lax.bitcast_convert_type(b.scales, jnp.uint8)).copy()
  sa[5, 3] = 255
  sb[1, 40] = 255
  a = a.__class__(a.codes, jax.lax.bitcast_convert_type(jnp.asarray(sa), jnp.float8_e8m0fnu),
                  a.tensor_scale, a.spec, a.axis, a.padding, a.orig_dtype)
  b = b.__class__(b.codes, jax.lax.bitcast_convert_type(jnp.asarray(sb), jnp.float8_e8m0fnu),
                  b.tensor_scale, b.spec, b.axis, b.padding, b.orig_dtype)
  return a, b
