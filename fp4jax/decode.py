"""Exact decoding of a quantized array's leaves: values and per-element scales.

These functions read only what a :class:`~fp4jax.qarray.QArray` stores (packed codes,
block scales, the optional FP32 tensor scale, and its static spec, axis and padding), so
the ``QArray`` class itself can offer them as methods without an import loop: this module
sits below ``qarray`` and knows the array only by those attributes. The public, checked
entry points are :func:`fp4jax.dequantize` and :func:`fp4jax.element_scales`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fp4jax import bits, blocks, packing, scales
from fp4jax import rounding as rounding_lib


def _layout(q) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(the padded element shape, the block extents of its trailing dims)."""
  spec = q.spec
  full = list(q.codes.shape)
  full[q.axis] = packing.unpacked_length(full[q.axis], spec.element.bits, spec.packed)
  full = tuple(full)
  nd = len(q.padding)
  return full, blocks.block_extents(full[len(full) - nd:], spec, q.axis)


def _unpad(out: jax.Array, q) -> jax.Array:
  if not any(q.padding):
    return out
  nd = len(q.padding)
  full = out.shape[-nd:]
  return out[(Ellipsis,) + tuple(slice(0, n - p) for n, p in zip(full, q.padding))]


def _float_block_scales(q) -> jax.Array:
  """Float block scales times the tensor scale (``fl(t * s)``), per block."""
  s = scales.decode_float_scale(q.scales, q.spec.scale_format)
  if q.tensor_scale is not None:
    s = bits.mul_f32(q.tensor_scale, s)  # shape (lead..., 1, ..., 1) broadcasts
  return s


def dequantize(q, dtype: Any = None) -> jax.Array:
  """The values ``q`` represents, as ``dtype`` (default: ``q.orig_dtype``).

  Exact: element values times scales are formed from bits (E8M0) or with exactly
  rounded float32 products (float scales, as torchao: ``q * (t * s)``), then cast.
  """
  spec = q.spec
  elem, sfmt = spec.element, spec.scale_format
  codes = packing.unpack(q.codes, elem.bits, q.axis, spec.packed)
  full, ext = _layout(q)
  if sfmt.is_pow2:
    code = scales.load_pow2_scale(q.scales)
    shift = blocks.expand(scales.pow2_scale_exponent(code, sfmt), ext, full)
    out = rounding_lib.decode_to_f32(codes, elem, exp_shift=shift)
    out = jnp.where(blocks.expand(scales.pow2_scale_is_nan(code, sfmt), ext, full),
                    jnp.float32(jnp.nan), out)
  else:
    # Materialised per block: keeps block math out of the element fusions (see encode).
    s = jax.lax.optimization_barrier(_float_block_scales(q))
    out = bits.mul_f32(rounding_lib.decode_to_f32(codes, elem), blocks.expand(s, ext, full))
  return _unpad(out, q).astype(q.orig_dtype if dtype is None else dtype)


def element_scales(q) -> jax.Array:
  """The float32 scale multiplying each element's code value (shape ``q.shape``):
  ``2^s`` for power-of-two scales, ``s`` or ``t * s`` for float scales. Surrogate
  gradients evaluate on ``x / element_scales(q)``."""
  sfmt = q.spec.scale_format
  full, ext = _layout(q)
  if sfmt.is_pow2:
    code = scales.load_pow2_scale(q.scales)
    s = bits.compose_f32(jnp.zeros_like(code), jnp.ones_like(code),
                         scales.pow2_scale_exponent(code, sfmt))
    s = jnp.where(scales.pow2_scale_is_nan(code, sfmt), jnp.float32(jnp.nan), s)
  else:
    s = _float_block_scales(q)
  return _unpad(blocks.expand(s, ext, full), q)


__all__ = ["dequantize", "element_scales"]
