"""Outlier clamping and compensation (OCC), Wang et al. 2025, "Optimizing Large Language
Model Training Using FP4 Quantization" (arXiv 2501.17116), section 3.2.

Activations are clamped at the ``quantile`` of their absolute values (0.99 - 0.999 in
the paper): ``A_c = clamp(A, -t, t)``; only ``A_c`` is quantized, and the sparse
residual ``dA = A - A_c`` (about ``1 - quantile`` of the entries) is multiplied in high
precision and added back: ``Y = Q(A_c) Q(W) + dA W``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def clamp_threshold(x: jax.Array, quantile: float) -> jax.Array:
  """The ``quantile`` of ``|x|`` over the whole tensor (a constant for autodiff)."""
  if not 0.0 < quantile <= 1.0:
    raise ValueError(f"OCC quantile must be in (0, 1], got {quantile}")
  return jax.lax.stop_gradient(jnp.quantile(jnp.abs(x.astype(jnp.float32)), quantile))


def clamp_and_residual(x: jax.Array, quantile: float) -> tuple[jax.Array, jax.Array]:
  """``(A_c, dA)`` with ``A_c + dA == x``; gradients flow to both parts."""
  t = clamp_threshold(x, quantile).astype(x.dtype)
  clamped = jnp.clip(x, -t, t)
  return clamped, x - clamped
