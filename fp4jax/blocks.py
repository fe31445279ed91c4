"""Which elements share a scale: block extents, padding, block reductions.

Every granularity is described by one number per dimension, the block *extent*: how
many consecutive indices along that dimension share a scale (1 = each its own). 1D
blocks set the quantization axis's extent to ``block_size``; 16x16 tiles set the last
two; per-channel sets the axis's extent to its full length; per-tensor sets every
extent to its length. Reductions and broadcasts then use one reshape rule,
``(d0/b0, b0, d1/b1, b1, ...)``, for all granularities.

Scales are stored with the input's rank: dimension ``d`` of the scale array has
length ``padded_shape[d] / extent[d]``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fp4jax.spec import QuantSpec


def normalize_axis(axis: int, ndim: int, name: str = "axis") -> int:
  """``axis`` as a negative index, with a clear error when out of range."""
  if isinstance(axis, bool) or not isinstance(axis, int):
    raise TypeError(f"{name} must be an int, got {type(axis).__name__}")
  if not -ndim <= axis < ndim or ndim == 0:
    raise ValueError(f"{name}={axis} is out of range for an array of rank {ndim} "
                     f"(valid: {-ndim} .. {ndim - 1})")
  return axis - ndim if axis >= 0 else axis


def block_extents(shape: tuple[int, ...], spec: QuantSpec, axis: int) -> tuple[int, ...]:
  """Per-dimension block extents for ``shape`` (before padding; axis is negative)."""
  nd = len(shape)
  ext = [1] * nd
  g = spec.granularity
  if g == "block":
    ext[axis] = spec.block_size
  elif g == "tile":
    if nd < 2:
      raise ValueError(f"tile granularity needs an array of rank >= 2, got rank {nd}")
    if axis not in (-1, -2):
      raise ValueError(f"with tile granularity the axis must be -1 or -2 (the tiled axes), "
                       f"got {axis}")
    ext[-2], ext[-1] = spec.tile
  elif g == "channel":
    ext[axis] = shape[axis]
  else:  # tensor
    ext = list(shape)
  return tuple(ext)


def padding(shape: tuple[int, ...], spec: QuantSpec, axis: int, pack_group: int,
            pad: bool) -> tuple[int, ...]:
  """Zeros to append per dimension so that blocks (and byte packing) divide evenly.

  Raises a ValueError naming the axis and the fix when ``pad`` is False and a blocked
  dimension does not divide.
  """
  ext = block_extents(shape, spec, axis)
  nd = len(shape)
  pads = []
  for d in range(-nd, 0):
    # channel/tensor blocks span their whole dimension: only blocks and tiles must divide.
    mult = ext[d] if spec.granularity in ("block", "tile") else 1
    if d == axis:
      mult = math.lcm(max(mult, 1), pack_group)
    need = (-shape[d]) % mult if mult > 1 else 0
    if need and not pad:
      what = (f"block_size {spec.block_size}" if spec.granularity == "block" and d == axis
              else f"tile {spec.tile}" if spec.granularity == "tile"
              else f"{pack_group} (codes of {spec.element.bits} bits are packed "
                   f"{pack_group} at a time)")
      raise ValueError(
          f"axis {d} has length {shape[d]}, which is not a multiple of {what}: pass "
          f"pad=True to zero-pad it, or choose a block size that divides {shape[d]}")
    pads.append(need)
  return tuple(pads)


def _interleaved(shape, ext):
  out = []
  for d, b in zip(shape, ext):
    out += [d // b, b]
  return out


def block_max(a: jax.Array, ext: tuple[int, ...]) -> jax.Array:
  """Max over each block; the result has the scale layout (rank kept)."""
  r = a.reshape(_interleaved(a.shape, ext))
  r = jnp.max(r, axis=tuple(range(1, 2 * a.ndim, 2)))
  return r


def expand(s: jax.Array, ext: tuple[int, ...], full_shape: tuple[int, ...]) -> jax.Array:
  """Broadcasts a scale-layout array back to the full (padded) element shape."""
  lead = s.ndim - len(ext)  # leading batch dims (e.g. under vmap they are not present)
  inter = []
  for d, b in zip(s.shape[lead:], ext):
    inter += [d, 1]
  r = s.reshape(*s.shape[:lead], *inter)
  tgt = []
  for d, b in zip(s.shape[lead:], ext):
    tgt += [d, b]
  r = jnp.broadcast_to(r, (*s.shape[:lead], *tgt))
  return r.reshape(*s.shape[:lead], *full_shape[len(full_shape) - len(ext):])
