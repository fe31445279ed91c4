"""Low-precision optimizer states and FP8 gradient communication (Microsoft FP8-LM /
FP4 recipe: Peng et al. 2023, "FP8-LM: Training FP8 Large Language Models",
arXiv 2310.18313; Wang et al. 2025, arXiv 2501.17116).

:func:`quantize_state` wraps any optax transform and stores chosen leaves of its state in
a lower precision: ``"bf16"``/``"fp16"`` as that dtype, or any fp4jax spec/preset (e.g.
``"fp8_e4m3_tensor"``: FP8 with an FP32 per-tensor scale; ``"mxfp8_e4m3"``: with E8M0
block scales) as a :class:`~fp4jax.QArray`. Each step is exactly

    state_f32 = dequantize(state);  updates, state_f32' = inner.update(g, state_f32, p);
    state = quantize(state_f32')

so the only difference to the inner optimizer is the rounding of the stored state. FP8-LM
keeps the first moment in FP8 and the second in FP16 (``MS_AMP_FORMATS``).

:func:`quantize_gradients` rounds gradients to FP8 with a per-tensor scale (what a
data-parallel worker would send), and :func:`fp8_all_reduce_mean` is the reduction itself
inside a named axis (``shard_map``/``pmap``/``vmap``): a shared scale from the global amax
(``pmax``), FP8 codes, a sum in float32 and the mean.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fp4jax import formats
from fp4jax.optim.weights import path_str
from fp4jax.qarray import QArray
from fp4jax.quantization import dequantize, fake_quant, quantize
from fp4jax.rounding import round_to_format
from fp4jax.spec import QuantSpec, get_spec

DTYPE_FORMATS = {"bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16, "fp16": jnp.float16,
                 "float16": jnp.float16, "fp32": jnp.float32, "float32": jnp.float32}
MS_AMP_FORMATS = {"mu": "fp8_e4m3_tensor", "nu": "fp16"}


class QuantizedState(NamedTuple):
  inner_state: Any  # the inner optimizer's state with chosen leaves stored compressed


@jax.tree_util.register_pytree_node_class
class CastLeaf:
  """A state leaf stored in a narrower float dtype; ``orig_dtype`` is restored on load."""

  def __init__(self, value, orig_dtype):
    self.value, self.orig_dtype = value, jnp.dtype(orig_dtype)

  def tree_flatten(self):
    return (self.value,), self.orig_dtype

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(children[0], aux)


def _store(x: jax.Array, fmt):
  if isinstance(fmt, str) and fmt.lower() in DTYPE_FORMATS:
    return CastLeaf(x.astype(DTYPE_FORMATS[fmt.lower()]), x.dtype)
  return quantize(x, get_spec(fmt), -1, pad=True)


def _load(x):
  if isinstance(x, QArray):
    return dequantize(x)  # to the dtype it was quantized from
  return x.value.astype(x.orig_dtype)


def _stored(x) -> bool:
  return isinstance(x, (QArray, CastLeaf))


def _check_format(fmt):
  if isinstance(fmt, str) and fmt.lower() in DTYPE_FORMATS:
    return fmt
  try:
    return get_spec(fmt)
  except (ValueError, TypeError) as e:
    raise ValueError(f"state format {fmt!r} is neither one of {sorted(DTYPE_FORMATS)} nor an "
                     f"fp4jax spec/preset: {e}") from None


def _format_for(path, leaf, formats_by_name, default):
  if not (hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating)
          and jnp.ndim(leaf) >= 1):
    return None
  parts = path_str(path).split("/")
  for name, fmt in formats_by_name.items():
    if name in parts:
      return fmt
  return default


def quantize_state(inner: optax.GradientTransformation,
                   formats_by_name: dict[str, Any] | None = None,
                   default: Any = None) -> optax.GradientTransformation:
  """Stores float state leaves of ``inner`` (rank >= 1) in low precision.

  Args:
    inner: any optax transform (e.g. ``optax.adamw(3e-4)``).
    formats_by_name: state field name (a component of the leaf's path, e.g. ``"mu"``,
      ``"nu"``) -> format: ``"bf16"``, ``"fp16"``, or an fp4jax spec/preset.
      Default: :data:`MS_AMP_FORMATS` (FP8 first moment, FP16 second moment).
    default: format for float leaves no name matches (None: keep float32).
  """
  formats_by_name = dict(MS_AMP_FORMATS if formats_by_name is None else formats_by_name)
  formats_by_name = {k: _check_format(v) for k, v in formats_by_name.items()}
  default = None if default is None else _check_format(default)

  def compress(state):
    return jax.tree_util.tree_map_with_path(
        lambda p, x: (lambda f: x if f is None else _store(x, f))(
            _format_for(p, x, formats_by_name, default)), state)

  def expand(state):
    return jax.tree.map(lambda x: _load(x) if _stored(x) else x, state, is_leaf=_stored)

  def init(params):
    return QuantizedState(compress(inner.init(params)))

  def update(updates, state, params=None):
    # Barriers keep the three stages apart, so the inner update is computed exactly as it
    # would be on a materialised float state (XLA may not fuse across them).
    full = jax.lax.optimization_barrier(expand(state.inner_state))
    updates, new = inner.update(updates, full, params)
    updates, new = jax.lax.optimization_barrier((updates, new))
    return updates, QuantizedState(compress(new))

  return optax.GradientTransformation(init, update)


def state_nbytes(tree: Any) -> int:
  """Bytes held by an (optimizer) state: QArray leaves count codes + scales."""
  total = 0
  for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, QArray)):
    if isinstance(x, QArray):
      total += x.nbytes
    elif hasattr(x, "dtype") and hasattr(x, "shape"):
      total += int(np.prod(x.shape, dtype=np.int64)) * jnp.dtype(x.dtype).itemsize
  return total


def quantize_gradients(spec: str | QuantSpec = "fp8_e5m2_tensor",
                       min_ndim: int = 1) -> optax.GradientTransformation:
  """Rounds every float update leaf of rank >= ``min_ndim`` onto ``spec`` (per-tensor
  scaled FP8 E5M2 by default, FP8-LM's gradient format). Put it first in a chain.

  Non-finite entries (``inf``, ``nan``) pass through unchanged and take no part in the
  scales: the scales come from the finite values, so one ``inf`` does not turn every
  finite gradient into zero (as a scale from an infinite amax would), and anything
  downstream that clips or masks non-finite entries still sees them. Integer and other
  non-float leaves (step counters) pass through untouched.
  """
  spec = get_spec(spec)

  def quantize_leaf(g):
    if not jnp.issubdtype(jnp.result_type(g), jnp.floating) or jnp.ndim(g) < min_ndim:
      return g
    finite = jnp.isfinite(g)
    q = fake_quant(jnp.where(finite, g, jnp.zeros_like(g)), spec, -1, pad=True)
    return jnp.where(finite, q, g)

  def update(updates, state, params=None):
    del params
    return jax.tree.map(quantize_leaf, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def fp8_all_reduce_mean(grads: Any, axis_name: str, element: str = "e5m2") -> Any:
  """Mean of ``grads`` over the named axis with FP8 payloads and a shared scale.

  Per leaf: ``s = pmax(amax(g)) / max(element)`` (one scale for every participant, so
  codes add without rescaling), codes ``c = round_nearest_even(g / s)`` in ``element``
  (exact FP8 values), ``mean = psum(c) * s / n`` with the sum in float32. Zero tensors
  stay zero. Must run inside ``shard_map``/``pmap``/``vmap`` with ``axis_name``.
  """
  fmt = formats.get_element_format(element)
  try:
    n = jax.lax.psum(1, axis_name)
  except NameError as err:  # JAX: "unbound axis name: data"
    raise ValueError(
        f"fp8_all_reduce_mean(grads, {axis_name!r}): no mapped axis named {axis_name!r} is "
        "bound here; call it inside jax.shard_map / jax.pmap (or vmap) over that axis, e.g. "
        "in the per-device training step") from err

  def reduce(g):
    g32 = g.astype(jnp.float32)
    amax = jax.lax.pmax(jnp.max(jnp.abs(g32)), axis_name)
    s = jnp.where(amax > 0, amax / fmt.max_value, 1.0)
    codes = round_to_format(g32 / s, fmt)
    return (jax.lax.psum(codes, axis_name) * (s / n)).astype(g.dtype)

  return jax.tree.map(reduce, grads)
