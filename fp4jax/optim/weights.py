"""Which parameters are quantized weights, and how: the one rule the optax tools share.

A *weight spec function* maps ``(path, leaf)`` to ``(spec, axis)`` or None. The default,
:func:`kernel_weights`, treats every ``kernel`` leaf with at least two dimensions as a
GEMM weight quantized along its contraction axis ``-2`` (Flax ``Dense``/``Conv`` layout:
``(..., K, N)``), which is where :func:`fp4jax.qdot_general` blocks the forward weight.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from fp4jax.quantization import fake_quant
from fp4jax.spec import QuantSpec, get_spec

WeightSpecFn = Callable[[tuple, jax.Array], "tuple[QuantSpec, int] | None"]


def path_str(path) -> str:
  """``'/'``-joined key path (dict keys, attribute names, sequence indices)."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def kernel_weights(spec: str | QuantSpec = "mxfp4", axis: int = -2,
                   name: str = "kernel") -> WeightSpecFn:
  """Leaves whose path ends in ``name`` with ``ndim >= 2``, quantized with ``spec``
  along ``axis``."""
  spec = get_spec(spec)

  def fn(path, leaf):
    p = path_str(path)
    if (p == name or p.endswith("/" + name)) and jnp.ndim(leaf) >= 2:
      return spec, axis
    return None

  return fn


def as_weight_spec_fn(weights: Any) -> WeightSpecFn:
  """A spec function from a spec/preset name (kernels only) or a function."""
  if callable(weights) and not isinstance(weights, QuantSpec):
    return weights
  return kernel_weights(weights)


def quantized_weights(params: Any, weights: Any = "mxfp4") -> Any:
  """The forward-quantized value of every weight leaf (float32), None elsewhere.

  Blocks that do not divide are zero-padded (``pad=True``), as a layer would see them.
  """
  fn = as_weight_spec_fn(weights)

  def q(path, leaf):
    sa = fn(path, leaf)
    if sa is None:
      return None
    spec, axis = sa
    return fake_quant(jnp.asarray(leaf, jnp.float32), spec, axis, pad=True)

  return jax.tree_util.tree_map_with_path(q, params)
