"""Whole-tensor amaxes that stay global inside manual SPMD regions.

A whole-tensor scale (NVFP4's FP32 tensor scale, ``granularity="tensor"`` scales) is a
function of the *global* tensor. Under ``jit`` with the SPMD partitioner that holds by
itself: ``fp4jax`` sees the logical array and XLA all-reduces the max. Inside a
``shard_map`` body, however, each device holds only its shard, so the max must be
reduced across the manual axes explicitly. This module is that one hook, kept at the
bottom of the numerics (it knows nothing of meshes, Flax or training): the quantizers
call :func:`reduce_amax_bits` on every whole-tensor amax, and whoever opens a manual
region (``fp4jax.distributed.data_parallel_value_and_grad``, or a user's own
``shard_map``) wraps its body's tracing in :func:`reduced_over`.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp

# float32 +Inf's bit pattern: |x| patterns at or above it are Inf or NaN.
_F32_INF_BITS = 0x7F800000

_AXES: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
    "fp4jax_tensor_amax_axes", default=())


@contextlib.contextmanager
def reduced_over(axis_names: Sequence[str]) -> Iterator[None]:
  """While tracing inside this context (a ``shard_map`` body manual over ``axis_names``),
  whole-tensor amaxes are max-reduced across those axes, so every shard uses the global
  tensor's scale. Acts at trace time, like every context of fp4jax."""
  if isinstance(axis_names, str):
    axis_names = (axis_names,)
  token = _AXES.set(tuple(axis_names))
  try:
    yield
  finally:
    _AXES.reset(token)


def current_axes() -> tuple[str, ...]:
  """The mesh axes whole-tensor amaxes are reduced over here (empty outside a region)."""
  return _AXES.get()


def reduce_amax_bits(amax_bits: jax.Array) -> jax.Array:
  """A whole-tensor amax (as float bit patterns) made global over the axes of
  :func:`reduced_over`; unchanged outside such a region. Bit patterns of ``|x|`` order
  like the values, so an integer max is the float max (NaN's patterns are largest)."""
  axes = _AXES.get()
  if not axes:
    return amax_bits
  return jax.lax.pmax(amax_bits, axes)


def finite_abs_bits(abs_bits: jax.Array) -> jax.Array:
  """``|x|`` float32 bit patterns with NaN and Inf replaced by 0: the source of a tensor
  amax over finite values only (``QuantSpec(tensor_scale="finite_amax")``), so one
  non-finite element leaves the tensor scale finite and poisons only its own block, as in
  the MX formats."""
  return jnp.where(abs_bits < _F32_INF_BITS, abs_bits, jnp.zeros_like(abs_bits))


def amax_source(abs_bits: jax.Array, block_amax: jax.Array, tensor_scale: str | None):
  """What a spec's tensor amax is the max of: the block amaxes (``"amax"``: every value,
  so a NaN or Inf anywhere makes the tensor scale, and then the whole tensor, non-finite,
  as in torchao) or the finite element magnitudes (``"finite_amax"``)."""
  return finite_abs_bits(abs_bits) if tensor_scale == "finite_amax" else block_amax


__all__ = ["amax_source", "current_axes", "finite_abs_bits", "reduce_amax_bits", "reduced_over"]
