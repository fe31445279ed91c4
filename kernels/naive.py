"""The baseline every fp4jax speed claim is measured against: MXFP4 fake quantization as
a researcher writes it by hand in plain JAX (no fp4jax), for ``kernels.bench_step`` and
``kernels.bench_operand``.

For each GEMM operand: blocks of 32 along its contraction axis, the block amax, an E8M0
floor scale ``2^(floor(log2 amax) - 2)``, ``x / s`` cast to ``float4_e2m1fn`` and back,
times ``s``; a straight-through gradient; a BF16 ``dot`` with float32 accumulation. On
normal data it computes OCP MXFP4 (floor scales, nearest-even); it is not bit-exact at
the edges (zeros, subnormals, NaN/Inf, the log2 of a float), which is what fp4jax adds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


NAIVE_BLOCK = 32


def naive_fake_quant(x: jax.Array, axis: int) -> jax.Array:
  """MXFP4 fake quantization as a user writes it: blocks of 32 along ``axis``, E8M0
  floor scale from ``log2`` of the block amax, a cast to ``float4_e2m1fn`` and back."""
  xf = jnp.moveaxis(x.astype(jnp.float32), axis, -1)
  n = xf.shape[-1]
  xp = jnp.pad(xf, [(0, 0)] * (xf.ndim - 1) + [(0, -n % NAIVE_BLOCK)])  # ragged token counts
  blk = xp.reshape(*xp.shape[:-1], xp.shape[-1] // NAIVE_BLOCK, NAIVE_BLOCK)
  amax = jnp.max(jnp.abs(blk), axis=-1, keepdims=True)
  s = jnp.exp2(jnp.floor(jnp.log2(jnp.maximum(amax, 1e-30))) - 2)
  q = (blk / s).astype(jnp.float4_e2m1fn).astype(jnp.float32) * s
  q = q.reshape(xp.shape)[..., :n]
  return jnp.moveaxis(q, -1, axis).astype(x.dtype)


@jax.custom_vjp
def _naive_matmul(a, w):
  return jnp.dot(naive_fake_quant(a, -1), naive_fake_quant(w, 0),
                 preferred_element_type=jnp.float32).astype(a.dtype)


def _naive_fwd(a, w):
  return _naive_matmul(a, w), (a, w)


def _naive_bwd(res, g):
  a, w = res
  da = jnp.dot(naive_fake_quant(g, -1), naive_fake_quant(w, -1).T,
               preferred_element_type=jnp.float32)
  dw = jnp.dot(naive_fake_quant(a, 0).T, naive_fake_quant(g, 0),
               preferred_element_type=jnp.float32)
  return da.astype(a.dtype), dw.astype(w.dtype)


_naive_matmul.defvjp(_naive_fwd, _naive_bwd)


def naive_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """``flax.linen.Dense``'s ``dot_general`` (``x (..., K) @ w (K, N)``), every GEMM
  operand through :func:`naive_fake_quant` with a straight-through gradient."""
  del precision, preferred_element_type
  (lc, rc), _ = dimension_numbers
  assert tuple(lc) == (lhs.ndim - 1,) and tuple(rc) == (0,), dimension_numbers
  lead = lhs.shape[:-1]
  dt = jnp.result_type(lhs, rhs)
  y = _naive_matmul(lhs.reshape(-1, lhs.shape[-1]).astype(dt), rhs.astype(dt))
  return y.reshape(*lead, rhs.shape[-1])
