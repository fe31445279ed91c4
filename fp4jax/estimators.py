"""Gradient estimators: surrogate derivatives of the quantizer, as one registry.

The forward pass always uses the hard quantizer ``Q(x) = s * q(x / s)``. The backward
pass multiplies the incoming gradient by a surrogate derivative ``Q'(x)``, evaluated on
the scaled value ``v = x / s`` (``s`` the block scale; scales are treated as constants,
as in every FP4 training recipe):

* ``ste``: straight-through, ``Q'(x) = 1`` (Bengio et al. 2013).
* ``clipped_ste``: 1 where ``|v| <= max(element)``, 0 where the block's value was clipped
  (only nonzero-measure with ``floor`` E8M0 scales or clamped float scales).
* ``dge``: the differentiable gradient estimator of Wang et al. 2025, "Optimizing Large
  Language Model Training Using FP4 Quantization" (arXiv 2501.17116), eq. 9-10: inside
  each quantization interval ``[lo, lo + delta]`` of the element grid the step function is
  approximated by ``f(u) = delta/2 * (1 + sign(2u/delta - 1) |2u/delta - 1|^(1/k))`` and
  its derivative ``(1/k) |2u/delta - 1|^(1/k - 1)`` is used, clipped at ``max_grad``
  (k = 5, clip 3, as the paper); zero outside the representable range.
* ``smooth``: a tanh soft step per interval, ``f(u) = 1/2 + tanh(T (u - 1/2)) / (2 tanh(T/2))``
  for the fraction ``u`` of the interval; ``f'(u) = T sech^2(T (u - 1/2)) / (2 tanh(T/2))``.
  ``T`` is the ``temperature``: as ``T -> 0`` the derivative tends to 1 (STE), as ``T``
  grows it approaches the hard step; zero outside the representable range.

Register a new one with :func:`register_estimator`::

    @fp4jax.estimators.register_estimator("my_est")
    def my_est(v, element, **params):   # v: scaled values (float32); element: ElementFormat
      return jnp.exp(-jnp.abs(v) / 6)   # the multiplier applied to the incoming gradient
"""

from __future__ import annotations

from typing import Callable, Protocol

import jax
import jax.numpy as jnp

from fp4jax import bits, rounding
from fp4jax.formats import ElementFormat


class Estimator(Protocol):
  def __call__(self, v: jax.Array, element: ElementFormat, **params) -> jax.Array:
    ...


ESTIMATORS: dict[str, Estimator] = {}


def register_estimator(name: str) -> Callable[[Estimator], Estimator]:
  """Decorator registering ``fn(v, element, **params) -> multiplier`` under ``name``."""
  def deco(fn: Estimator) -> Estimator:
    ESTIMATORS[name] = fn
    return fn
  return deco


def get_estimator(name: str) -> Estimator:
  try:
    return ESTIMATORS[name]
  except KeyError:
    raise ValueError(f"unknown estimator {name!r}; registered: {sorted(ESTIMATORS)} "
                     "(add one with fp4jax.estimators.register_estimator)") from None


def interval_position(v: jax.Array, element: ElementFormat) -> tuple[jax.Array, jax.Array]:
  """For scaled values ``v``: the fraction ``u`` in [0, 1) of the way from the grid point
  below ``|v|`` to the next one, and the interval width ``delta`` (both float32)."""
  av = jnp.abs(v.astype(jnp.float32))
  sp = bits.split_f32(bits.f32_bits(av))
  lo_code = rounding.encode(sp, element, "toward_zero")
  lo = rounding.decode_to_f32(lo_code, element)
  hi = rounding.decode_to_f32(jnp.minimum(lo_code + 1, element.max_code), element)
  delta = jnp.maximum(hi - lo, jnp.float32(element.min_subnormal))
  return jnp.clip((av - lo) / delta, 0.0, 1.0), delta


def in_range(v: jax.Array, element: ElementFormat) -> jax.Array:
  return jnp.abs(v) <= jnp.float32(element.max_value)


@register_estimator("ste")
def ste(v, element, **params):
  del element, params
  return jnp.ones_like(v, jnp.float32)


@register_estimator("clipped_ste")
def clipped_ste(v, element, **params):
  del params
  return in_range(v, element).astype(jnp.float32)


@register_estimator("dge")
def dge(v, element, k: float = 5.0, max_grad: float = 3.0, **params):
  del params
  u, _ = interval_position(v, element)
  d = jnp.abs(2.0 * u - 1.0)
  g = (1.0 / k) * jnp.power(jnp.maximum(d, 1e-12), 1.0 / k - 1.0)
  return jnp.where(in_range(v, element), jnp.minimum(g, max_grad), 0.0)


@register_estimator("smooth")
def smooth(v, element, temperature: float = 4.0, **params):
  del params
  u, _ = interval_position(v, element)
  t = jnp.float32(max(temperature, 1e-6))
  g = t / jnp.cosh(t * (u - 0.5)) ** 2 / (2.0 * jnp.tanh(t / 2.0))
  return jnp.where(in_range(v, element), g, 0.0)
