"""Quantized convolution as an implicit GEMM (im2col) through :func:`fp4jax.qdot_general`.

A convolution with kernel ``(k_1..k_d, C_in/G, C_out)`` is the GEMM

    Y[p, o] = sum_{t, c} P[p, t, c] W[t, c, o],    K = prod(k) * C_in / G,

over output positions ``p`` and the reduction index ``(t, c)`` = (kernel tap, input
channel), with ``G`` feature groups as a batch dimension. fp4jax orders K tap-major and
channel-minor, which is the row order of the Flax kernel reshaped to ``(K, C_out)``; so
quantization blocks of the weight run along input channels within one tap (as in
``fp4jax.ptq`` and ``quantize(kernel, axis=-2)``), and the recipe's six operands are
those of an ordinary linear layer.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fp4jax import recipes as recipes_lib
from fp4jax.qdot import qdot_general


def _to_std(dn: lax.ConvDimensionNumbers):
  """Permutations to (N, spatial..., C) / (spatial..., I, O) and back to the output."""
  lhs_spec, rhs_spec, out_spec = dn
  lhs_perm = (lhs_spec[0], *lhs_spec[2:], lhs_spec[1])
  rhs_perm = (*rhs_spec[2:], rhs_spec[1], rhs_spec[0])
  std_out = (out_spec[0], *out_spec[2:], out_spec[1])  # std dim i lives at std_out[i]
  out_perm = tuple(int(i) for i in np.argsort(std_out))
  return lhs_perm, rhs_perm, out_perm


def qconv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                          padding: str | Sequence[tuple[int, int]],
                          lhs_dilation: Sequence[int] | None = None,
                          rhs_dilation: Sequence[int] | None = None,
                          dimension_numbers: Any = None, feature_group_count: int = 1,
                          batch_group_count: int = 1, precision: Any = None,
                          preferred_element_type: Any = None, *,
                          recipe: str | recipes_lib.Recipe = "mxfp4",
                          key: jax.Array | None = None,
                          rhs_reference: jax.Array | None = None) -> jax.Array:
  """``lax.conv_general_dilated`` with its GEMM quantized by ``recipe`` (forward, dgrad
  and wgrad through :func:`fp4jax.qdot_general`'s custom VJP).

  Same positional arguments as ``lax.conv_general_dilated``; ``precision`` is accepted
  for signature compatibility (products accumulate in float32). ``rhs_reference`` (the
  kernel's Q-EMA reference) has the kernel's shape.
  """
  del precision
  if batch_group_count != 1:
    raise NotImplementedError("qconv_general_dilated: batch_group_count != 1 (used only by "
                              "the weight gradient of grouped convolutions) is unsupported")
  lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
  nsp = lhs.ndim - 2
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  lhs_perm, rhs_perm, out_perm = _to_std(dn)
  x = jnp.transpose(lhs, lhs_perm)  # (N, spatial..., C)
  w = jnp.transpose(rhs, rhs_perm)  # (taps..., C/G, O)
  ref = None if rhs_reference is None else jnp.transpose(jnp.asarray(rhs_reference), rhs_perm)
  taps, cin, cout = w.shape[:nsp], x.shape[-1], w.shape[-1]
  g = int(feature_group_count)
  if cin % g or cout % g or w.shape[-2] * g != cin:
    raise ValueError(f"qconv_general_dilated: {cin} input channels, kernel input dim "
                     f"{w.shape[-2]}, {cout} output channels and feature_group_count={g} "
                     "do not fit (C_in = G * kernel_in, G | C_out)")
  std = ("N" + "".join(chr(ord("a") + i) for i in range(nsp)) + "C",
         "".join(chr(ord("a") + i) for i in range(nsp)) + "IO",
         "N" + "".join(chr(ord("a") + i) for i in range(nsp)) + "C")
  # Patches: (N, out_spatial..., C * taps), channel-major; exact (a 0/1 filter, HIGHEST).
  patches = lax.conv_general_dilated_patches(
      x, filter_shape=taps, window_strides=window_strides, padding=padding,
      lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=lax.conv_dimension_numbers(x.shape, (*taps, 1, 1), std),
      precision=lax.Precision.HIGHEST, preferred_element_type=x.dtype)
  out_sp = patches.shape[1:-1]
  ntap = int(np.prod(taps, dtype=np.int64))
  cg = cin // g
  # (P, G, Cg, T) -> (G, P, T, Cg): K tap-major, channel-minor, matching W's rows.
  p = patches.reshape(-1, g, cg, ntap).transpose(1, 0, 3, 2).reshape(g, -1, ntap * cg)
  wk = w.reshape(ntap * cg, g, cout // g).transpose(1, 0, 2)
  refk = None if ref is None else ref.reshape(ntap * cg, g, cout // g).transpose(1, 0, 2)
  y = qdot_general(p, wk, (((2,), (1,)), ((0,), (0,))), recipe, key,
                   preferred_element_type=preferred_element_type, rhs_reference=refk)
  y = y.transpose(1, 0, 2).reshape(x.shape[0], *out_sp, cout)  # (N, spatial..., O)
  return jnp.transpose(y, out_perm)
