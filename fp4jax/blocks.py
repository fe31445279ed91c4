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


def required_multiple(spec: QuantSpec | None, axis: int) -> int:
  """What the length of ``axis`` must be a multiple of for ``spec``'s scale blocks: the
  block size along a blocked axis, the tile side along a tiled one (``axis`` -2 or -1 of
  the tiled pair), 1 for channel / tensor scales or no spec. The one alignment rule:
  GEMM shape checks, FSDP shard sizes, model-fit checks and padding all ask it."""
  if spec is None:
    return 1
  if spec.granularity == "block":
    return spec.block_size
  if spec.granularity == "tile":
    return spec.tile[-2 if axis in (-2, 0) else -1]
  return 1


def alignment(specs, *extra: int | None) -> int:
  """Least common multiple of :func:`required_multiple` over ``specs`` (each along its
  own blocked axis, tiles along both sides) and any ``extra`` lengths (e.g. Hadamard
  block sizes; None ignored): a length or shard boundary that is a multiple of it never
  splits a scale block, a tile or a transform block."""
  align = 1
  for spec in specs:
    if spec is not None:
      align = math.lcm(align, required_multiple(spec, -1), required_multiple(spec, -2))
  for n in extra:
    if n:
      align = math.lcm(align, int(n))
  return align


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
