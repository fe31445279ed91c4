"""Rounding decided by a reference tensor: TetraJet's Q-EMA quantizer.

Chen et al. 2025 ("Oscillation-Reduced MXFP4 Training for Vision Transformers",
arXiv 2502.20853, Sec. 4) observe that MXFP4 weights oscillate: a latent weight near a
rounding boundary flips between its two grid neighbours from step to step. Q-EMA keeps
the block scales of ``W`` but lets an exponential moving average of the latent weights
decide the rounding direction:

    s = element_scale(quantize(W)),  {lo, hi} = the two grid points around W / s,
    Q_EMA(W) = s * argmin_{g in {lo, hi}} |g - W_ema / s|.

When ``W / s`` lies on the grid (or saturates) there is one candidate and the result is
the plain quantizer's. With ``reference == W`` the result is the plain quantizer's bit for
bit (ties keep the quantizer's own choice), so Q-EMA can be switched on at any step.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fp4jax import bits, packing
from fp4jax import rounding as rounding_lib
from fp4jax.formats import ElementFormat
from fp4jax.decode import dequantize, element_scales
from fp4jax.encode import quantize_reference as quantize
from fp4jax.spec import QuantSpec, get_spec


@functools.lru_cache(maxsize=None)
def signed_grid(fmt: ElementFormat) -> np.ndarray:
  """All finite values of ``fmt``, ascending, as float32 (one zero)."""
  mags = [g for g in fmt.grid() if np.isfinite(g)]
  return np.unique(np.asarray([-g for g in mags] + mags, np.float32))


def element_values(q) -> jax.Array:
  """The unscaled grid value of every element of a :class:`~fp4jax.QArray` (float32,
  exact), shape ``q.shape``."""
  codes = packing.unpack(q.codes, q.spec.element.bits, q.axis, q.spec.packed)
  out = rounding_lib.decode_to_f32(codes, q.spec.element)
  nd = len(q.padding)
  if any(q.padding):
    out = out[(Ellipsis,) + tuple(slice(0, n - p)
                                  for n, p in zip(out.shape[-nd:], q.padding))]
  return out


class Neighbours(NamedTuple):
  """Each element of ``x`` against its block-scaled grid (all float32, x's shape)."""

  base: jax.Array       # the quantizer's own result (dequantized)
  scale: jax.Array      # the element's scale
  value: jax.Array      # x / scale, exactly rounded
  nearest: jax.Array    # the quantizer's grid value (unscaled)
  other: jax.Array      # the grid neighbour on the other side of value (== nearest on-grid)


def grid_neighbours(x: jax.Array, spec: str | QuantSpec, axis: int = -1,
                    **quantize_kwargs) -> Neighbours:
  """The two grid points around each element of ``x`` under ``spec``'s block scales."""
  spec = get_spec(spec)
  x = jnp.asarray(x)
  q = quantize(x, spec, axis, **quantize_kwargs)
  s = element_scales(q)
  g0 = element_values(q)
  grid = jnp.asarray(signed_grid(spec.element))
  idx = jnp.clip(jnp.searchsorted(grid, g0), 0, grid.size - 1)
  # Plain float32 division: exact for power-of-two scales; for float scales only the side
  # of the quantizer's grid value is decided with it. (bits.div_f32 per element would be
  # exact but makes XLA compile a training step for minutes.)
  xs = bits.to_f32_exact(x) / s
  # The other neighbour lies on the side of g0 where x / s is (none beyond the range).
  other_idx = jnp.clip(jnp.where(xs > g0, idx + 1, jnp.where(xs < g0, idx - 1, idx)),
                       0, grid.size - 1)
  return Neighbours(dequantize(q, jnp.float32), s, xs, g0, grid[other_idx])


def boundary_distance(x: jax.Array, spec: str | QuantSpec, axis: int = -1) -> jax.Array:
  """Distance of ``x / s`` to the rounding boundary between its two grid neighbours, in
  units of their spacing: 0 on the boundary (about to flip), 0.5 on a grid point (and for
  values beyond the largest grid value, or NaN/Inf)."""
  n = grid_neighbours(x, spec, axis)
  gap = jnp.abs(n.other - n.nearest)
  mid = 0.5 * (n.other + n.nearest)
  d = jnp.abs(n.value - mid) / jnp.where(gap > 0, gap, 1.0)
  return jnp.where((gap > 0) & jnp.isfinite(d), jnp.minimum(d, 0.5), 0.5)


def round_toward_reference(x: jax.Array, reference: jax.Array, spec: str | QuantSpec,
                           axis: int = -1, **quantize_kwargs) -> jax.Array:
  """Fake-quantizes ``x`` with ``spec``'s scales, choosing between the two grid
  neighbours of each element the one nearest to ``reference`` (float32, x's shape).

  Args:
    x: the latent tensor whose blocks set the scales (e.g. the weights).
    reference: same shape; decides the rounding direction (e.g. their EMA).
    spec, axis, quantize_kwargs: as :func:`fp4jax.quantize`.
  """
  x = jnp.asarray(x)
  reference = jnp.asarray(reference)
  if reference.shape != x.shape:
    raise ValueError(f"reference must have x's shape {x.shape}, got {reference.shape}")
  n = grid_neighbours(x, spec, axis, **quantize_kwargs)
  rs = bits.to_f32_exact(reference) / n.scale
  take_other = ((jnp.abs(n.other - rs) < jnp.abs(n.nearest - rs)) & (rs != n.value)
                & jnp.isfinite(n.base) & jnp.isfinite(rs))
  return jnp.where(take_other, bits.mul_f32(n.other, n.scale), n.base)
