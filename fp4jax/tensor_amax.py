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


__all__ = ["current_axes", "reduce_amax_bits", "reduced_over"]
