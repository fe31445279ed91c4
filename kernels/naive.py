"""The baseline every fp4jax speed claim is measured against: MXFP4 fake quantization as
a researcher writes it by hand in plain JAX (no fp4jax), for ``kernels.bench_step``,
``kernels.bench_operand`` and ``kernels.bench_grouped``.

For each GEMM operand: blocks of 32 along its contraction axis, the block amax, an E8M0
floor scale ``2^(floor(log2 amax) - 2)``, ``x / s`` cast to ``float4_e2m1fn`` and back,
times ``s``; a straight-through gradient; a BF16 ``dot`` with float32 accumulation. On
normal data it computes OCP MXFP4 (floor scales, nearest-even); it is not bit-exact at
the edges (zeros, subnormals, NaN/Inf, the log2 of a float), which is what fp4jax adds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


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


@jax.custom_vjp
def naive_ragged_dot(a: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
  """A mixture-of-experts grouped GEMM (``jax.lax.ragged_dot``: a (M, K), w (G, K, N)) with
  every operand of its three GEMMs through :func:`naive_fake_quant`, as one writes it by
  hand: the whole grouped operand quantized at once (wgrad's token blocks straddle
  experts), a straight-through gradient, ``ragged_dot`` in the operands' dtype (BF16 in
  the benchmark) with float32 accumulation."""
  return jax.lax.ragged_dot(naive_fake_quant(a, -1), naive_fake_quant(w, 1), group_sizes,
                            preferred_element_type=jnp.float32).astype(a.dtype)


def _naive_ragged_fwd(a, w, group_sizes):
  return naive_ragged_dot(a, w, group_sizes), (a, w, group_sizes)


def _naive_ragged_bwd(res, g):
  a, w, group_sizes = res
  da = jax.lax.ragged_dot(naive_fake_quant(g, -1),
                          jnp.swapaxes(naive_fake_quant(w, -1), -1, -2), group_sizes,
                          preferred_element_type=jnp.float32)
  # dW_g = A_g^T dY_g: the transpose of ragged_dot in its rhs, on the quantized operands.
  aq, gq = naive_fake_quant(a, 0), naive_fake_quant(g, 0)
  _, vjp = jax.vjp(lambda w_: jax.lax.ragged_dot(aq, w_, group_sizes,
                                                 preferred_element_type=jnp.float32),
                   jnp.zeros(w.shape, aq.dtype))
  (dw,) = vjp(gq.astype(jnp.float32))
  zero_sizes = np.zeros(group_sizes.shape, jax.dtypes.float0)
  return da.astype(a.dtype), dw.astype(w.dtype), zero_sizes


naive_ragged_dot.defvjp(_naive_ragged_fwd, _naive_ragged_bwd)


def naive_weight_only_dot(x: jax.Array, codes: jax.Array, scales: jax.Array,
                          tensor_scale: jax.Array | None, block: int) -> jax.Array:
  """``x @ w`` for packed FP4 weights as a user writes it in plain JAX (no fp4jax), e.g.
  from a gpt-oss / safetensors checkpoint: ``codes`` (K/2, N) uint8 with two E2M1 codes
  per byte along K (low nibble first), ``scales`` (K/block, N) as ``float8_e8m0fnu`` or
  ``float8_e4m3fn``, an optional FP32 tensor scale; every call unpacks the nibbles, looks
  the values up in a 16-entry table, repeats the scales along K and runs a BF16 ``dot``
  with float32 accumulation (XLA writes the BF16 weights out before the GEMM)."""
  table = jnp.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6],
                    jnp.bfloat16)
  nib = jnp.stack([codes & 15, codes >> 4], axis=1)             # (K/2, 2, N)
  w = table[nib.reshape(-1, codes.shape[1]).astype(jnp.int32)]  # (K, N)
  w = w * jnp.repeat(scales.astype(jnp.bfloat16), block, axis=0)
  y = jnp.dot(x.astype(jnp.bfloat16), w, preferred_element_type=jnp.float32)
  return y if tensor_scale is None else y * tensor_scale.reshape(())
