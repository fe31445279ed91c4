"""Asymmetric (scale + shift) quantization, the Microsoft FP4 recipe's variant for
activations (Wang et al. 2025, arXiv 2501.17116): each block is centred on the midpoint
of its range before the symmetric quantizer sees it,

    z = (max(x_b) + min(x_b)) / 2,    Q_asym(x) = z + Q(x - z),

so a one-sided block uses the whole grid. ``z`` is kept in float32 beside the codes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fp4jax import blocks
from fp4jax.qarray import QArray
from fp4jax.decode import dequantize
from fp4jax.encode import quantize_reference as quantize
from fp4jax.spec import QuantSpec, resolve_spec


def block_midpoint(x: jax.Array, spec: QuantSpec, axis: int) -> jax.Array:
  """Per-block ``(max + min) / 2`` broadcast to ``x``'s shape (float32)."""
  spec = resolve_spec(spec)
  ax = blocks.normalize_axis(axis, x.ndim)
  ext = blocks.block_extents(x.shape, spec, ax)
  x32 = x.astype(jnp.float32)
  hi = blocks.block_max(x32, ext)
  lo = -blocks.block_max(-x32, ext)
  return blocks.expand((hi + lo) * 0.5, ext, x.shape)


def quantize_shifted(x: jax.Array, spec, axis: int = -1, **kwargs) -> tuple[jax.Array, QArray]:
  """``(z, quantize(x - z))`` with ``z`` the per-block midpoint (float32, constant)."""
  z = jax.lax.stop_gradient(block_midpoint(x, spec, axis))
  return z, quantize(x.astype(jnp.float32) - z, spec, axis, **kwargs)


def asymmetric_fake_quant(x: jax.Array, spec, axis: int = -1, **kwargs) -> jax.Array:
  """``z + fake_quant(x - z)`` with ``z`` the per-block midpoint; float32 result."""
  z, q = quantize_shifted(x, spec, axis, **kwargs)
  return z + dequantize(q, jnp.float32)
