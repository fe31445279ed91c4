"""Quantized Flax nnx layers: ``QLinear``, ``QLinearGeneral``, ``QEinsum``, ``QConv``, and
``GroupedLinear``, a mixture-of-experts' expert GEMM.

Subclasses of ``nnx.Linear`` / ``nnx.LinearGeneral`` / ``nnx.Einsum`` / ``nnx.Conv`` with
one more argument, ``recipe``: parameters are created by nnx's own code (identical
``nnx.Param`` tree), only the matrix product goes through :func:`fp4jax.qdot_general`.
``QDense`` / ``QDenseGeneral`` are aliases, matching :mod:`fp4jax.linen`'s names.

Randomness comes from the ``"quant"`` stream of the ``nnx.Rngs`` given at construction
(nnx falls back to ``"default"`` when there is none), forked per layer as
``nnx.Dropout`` does; a call may pass ``key=`` instead. The stream's state is part of the
model's state, so ``nnx.jit`` steps are reproducible.

Q-EMA: :func:`set_kernel_references` stores a reference kernel (e.g. the EMA from
``fp4jax.optim.q_ema``) in each layer; the forward weight quantizer rounds toward it.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fp4jax import recipes as recipes_lib
from fp4jax.qconv import qconv_general_dilated
from fp4jax.qdot import qdot_general, qeinsum
from fp4jax.qragged import qragged_dot

QUANT_RNG = "quant"


def iter_modules(model):
  """``(path, module)`` pairs (``nnx.iter_modules`` where it exists, else the method)."""
  fn = getattr(nnx, "iter_modules", None)
  return fn(model) if fn is not None else model.iter_modules()


class KernelReference(nnx.Variable):
  """A layer's Q-EMA reference kernel (not a parameter: no gradient, not optimized)."""


_CALL = threading.local()


@contextlib.contextmanager
def _quantized_call(recipe, key, reference):
  stack = _CALL.__dict__.setdefault("stack", [])
  stack.append((recipe, key, reference))
  try:
    yield
  finally:
    stack.pop()


def _current():
  stack = getattr(_CALL, "stack", None)
  if not stack:
    raise RuntimeError("fp4jax.nnx hook called outside a quantized layer's __call__")
  return stack[-1]


def _ref(reference, like):
  return None if reference is None else reference.astype(like.dtype)


def _dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                 out_sharding=None):
  del precision, out_sharding
  recipe, key, ref = _current()
  return qdot_general(lhs, rhs, dimension_numbers, recipe, key,
                      preferred_element_type=preferred_element_type,
                      rhs_reference=_ref(ref, rhs))


def _einsum(subscripts, lhs, rhs, precision=None, preferred_element_type=None,
            out_sharding=None, **_):
  del precision, out_sharding
  recipe, key, ref = _current()
  return qeinsum(subscripts, lhs, rhs, recipe, key,
                 preferred_element_type=preferred_element_type, rhs_reference=_ref(ref, rhs))


def _conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
          dimension_numbers=None, feature_group_count=1, batch_group_count=1,
          precision=None, preferred_element_type=None, out_sharding=None):
  del out_sharding
  recipe, key, ref = _current()
  return qconv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                               dimension_numbers, feature_group_count, batch_group_count,
                               precision, preferred_element_type, recipe=recipe, key=key,
                               rhs_reference=_ref(ref, rhs))


class _Quantized:
  """Mixin: recipe, ``"quant"`` stream and the per-call key/reference context."""

  _hook_attr: str = ""
  _hook_fn: Any = None

  def _init_quant(self, recipe, rngs):
    self.recipe = recipes_lib.get(recipe)
    if isinstance(rngs, nnx.Rngs) and QUANT_RNG in rngs:
      self.quant_rngs = rngs[QUANT_RNG].fork()
    elif isinstance(rngs, nnx.RngStream):
      self.quant_rngs = rngs.fork()
    else:
      self.quant_rngs = nnx.data(None)
    setattr(self, self._hook_attr, type(self)._hook_fn)

  def _key(self, key):
    recipe = recipes_lib.effective(self.recipe)   # fp4jax.recipe_override, if active
    if not recipe.needs_key:
      return None
    if key is not None:
      return key
    if self.quant_rngs is None:
      raise ValueError(f"recipe {recipe.name!r} rounds stochastically or uses random "
                       "Hadamard signs: construct the layer with rngs=nnx.Rngs(..., quant=...) "
                       "or call it with key=")
    return self.quant_rngs()

  def _quant_call(self, parent_call, inputs, key, **kwargs):
    ref = getattr(self, "kernel_reference", None)
    ref = None if ref is None else ref[...]
    with _quantized_call(self.recipe, self._key(key), ref):
      return parent_call(inputs, **kwargs)


def _take_rngs(kwargs):
  return kwargs.get("rngs")


class QLinear(_Quantized, nnx.Linear):
  """``nnx.Linear`` quantized by ``recipe`` (same parameters)."""

  _hook_attr, _hook_fn = "dot_general", staticmethod(_dot_general)

  def __init__(self, in_features: int, out_features: int, *, recipe="mxfp4", **kwargs):
    super().__init__(in_features, out_features, **kwargs)
    self._init_quant(recipe, _take_rngs(kwargs))

  def __call__(self, inputs, out_sharding=None, *, key=None):
    return self._quant_call(super().__call__, inputs, key, out_sharding=out_sharding)


class QLinearGeneral(_Quantized, nnx.LinearGeneral):
  """``nnx.LinearGeneral`` quantized by ``recipe`` (same parameters)."""

  _hook_attr, _hook_fn = "dot_general", staticmethod(_dot_general)

  def __init__(self, in_features, out_features, *, recipe="mxfp4", **kwargs):
    if kwargs.get("dot_general_cls") is not None:
      raise ValueError("QLinearGeneral supplies its own dot_general; drop dot_general_cls")
    super().__init__(in_features, out_features, **kwargs)
    self._init_quant(recipe, _take_rngs(kwargs))

  def __call__(self, inputs, out_sharding=None, *, key=None):
    return self._quant_call(super().__call__, inputs, key, out_sharding=out_sharding)


class QEinsum(_Quantized, nnx.Einsum):
  """``nnx.Einsum`` quantized by ``recipe`` (same parameters)."""

  _hook_attr, _hook_fn = "einsum_op", staticmethod(_einsum)

  def __init__(self, einsum_str, kernel_shape, bias_shape=None, *, recipe="mxfp4", **kwargs):
    super().__init__(einsum_str, kernel_shape, bias_shape, **kwargs)
    self._init_quant(recipe, _take_rngs(kwargs))

  def __call__(self, inputs, einsum_str=None, out_sharding=None, *, key=None):
    return self._quant_call(super().__call__, inputs, key, einsum_str=einsum_str,
                            out_sharding=out_sharding)


class QConv(_Quantized, nnx.Conv):
  """``nnx.Conv`` whose implicit GEMM is quantized by ``recipe`` (same parameters)."""

  _hook_attr, _hook_fn = "conv_general_dilated", staticmethod(_conv)

  def __init__(self, in_features, out_features, kernel_size, *, recipe="mxfp4", **kwargs):
    super().__init__(in_features, out_features, kernel_size, **kwargs)
    self._init_quant(recipe, _take_rngs(kwargs))

  def __call__(self, inputs, out_sharding=None, *, key=None):
    return self._quant_call(super().__call__, inputs, key, out_sharding=out_sharding)


class GroupedLinear(nnx.Module):
  """The expert GEMM of a mixture-of-experts layer, as :class:`fp4jax.linen.GroupedDense`:
  ``x`` (M, in) tokens sorted by expert times ``kernel`` (experts, in, out) with
  ``group_sizes`` (experts,) rows per expert (``jax.lax.ragged_dot``), quantized per expert
  by ``recipe`` (:func:`fp4jax.qragged_dot`) or in high precision for ``recipe=None``,
  where :func:`fp4jax.quantize_model`'s rules may pick one (layer kind ``"grouped"``).
  Randomness from ``rngs``' ``"quant"`` stream (forked), or ``key=`` per call."""

  def __init__(self, experts: int, in_features: int, out_features: int, *, recipe=None,
               kernel_init=nnx.initializers.lecun_normal(in_axis=-2, out_axis=-1,
                                                         batch_axis=(0,)),
               param_dtype=jnp.float32, dtype=None, rngs: nnx.Rngs):
    self.experts, self.in_features, self.out_features = experts, in_features, out_features
    self.dtype = dtype
    self.kernel = nnx.Param(kernel_init(rngs.params(), (experts, in_features, out_features),
                                        param_dtype))
    self._set_recipe(recipe, rngs)

  def _set_recipe(self, recipe, rngs):
    self.recipe = None if recipe is None else recipes_lib.get(recipe)
    stream = rngs[QUANT_RNG] if isinstance(rngs, nnx.Rngs) and QUANT_RNG in rngs else rngs
    self.quant_rngs = stream.fork() if isinstance(stream, nnx.RngStream) else nnx.data(None)

  def __call__(self, x: jax.Array, group_sizes: jax.Array, *, key=None) -> jax.Array:
    kernel = self.kernel[...]
    dtype = self.dtype or jnp.result_type(x, kernel)
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    if self.recipe is None:
      return jax.lax.ragged_dot(x, kernel, group_sizes)
    recipe = recipes_lib.effective(self.recipe)
    if recipe.needs_key and key is None:
      if self.quant_rngs is None:
        raise ValueError(f"recipe {recipe.name!r} rounds stochastically or uses random "
                         "Hadamard signs: construct the layer with rngs=nnx.Rngs(..., "
                         "quant=...) or call it with key=")
      key = self.quant_rngs()
    return qragged_dot(x, kernel, group_sizes, recipe, key, preferred_element_type=dtype)


QDense = QLinear
QDenseGeneral = QLinearGeneral

LAYERS = {nnx.Linear: QLinear, nnx.LinearGeneral: QLinearGeneral, nnx.Einsum: QEinsum,
          nnx.Conv: QConv}


def quantized_copy(layer: nnx.Module, recipe, rngs: nnx.Rngs | None = None) -> nnx.Module:
  """The quantized counterpart of an nnx ``Linear``/``LinearGeneral``/``Einsum``/``Conv``
  (or a :class:`GroupedLinear` given a recipe) that shares ``layer``'s attributes (its
  ``nnx.Param`` objects included)."""
  if type(layer) is GroupedLinear:
    new = object.__new__(GroupedLinear)
    vars(new).update(vars(layer))
    new._set_recipe(recipe, rngs)
    return new
  for base, qcls in LAYERS.items():
    if type(layer) is base or type(layer) is qcls:
      break
  else:
    raise TypeError(f"no quantized counterpart for {type(layer).__name__}; supported: "
                    f"{', '.join(c.__name__ for c in LAYERS)}")
  new = object.__new__(qcls)
  vars(new).update(vars(layer))
  new._init_quant(recipe, rngs)
  return new


def set_kernel_references(model: nnx.Module, references: Any) -> None:
  """Stores Q-EMA reference kernels in the quantized layers of ``model``.

  ``references`` is a pure dict shaped like ``nnx.state(model, nnx.Param)`` (e.g.
  ``fp4jax.optim.q_ema_reference(opt_state, params)``); each quantized layer with a
  ``kernel`` entry at its path gets it as a :class:`KernelReference`.
  """
  for path, module in iter_modules(model):
    if not isinstance(module, _Quantized):
      continue
    node = references
    try:
      for p in path:
        node = node[p]
      value = node["kernel"]
    except (KeyError, IndexError, TypeError):
      continue
    value = value[...] if isinstance(value, nnx.Variable) else value
    if getattr(module, "kernel_reference", None) is None:
      module.kernel_reference = KernelReference(jnp.asarray(value))
    else:
      module.kernel_reference[...] = jnp.asarray(value)


__all__ = ["GroupedLinear", "KernelReference", "QConv", "QDense", "QDenseGeneral", "QEinsum", "QLinear",
           "QLinearGeneral", "QUANT_RNG", "quantized_copy", "set_kernel_references"]
