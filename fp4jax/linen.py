"""Quantized Flax linen layers: drop-in ``Dense``, ``DenseGeneral``, ``Einsum``, ``Conv``.

Each layer subclasses the Flax layer and only swaps its matrix product for the
quantized one of a :class:`~fp4jax.recipes.Recipe` (forward, dgrad and wgrad GEMMs
through :func:`fp4jax.qdot_general`'s custom VJP). Parameters are created by Flax's own
code, so the parameter tree is the Flax layer's, name for name and shape for shape: a
BF16 checkpoint loads into a quantized model and back.

Randomness (stochastic rounding, random Hadamard signs) comes from the ``"quant"`` RNG
stream: ``model.apply(variables, x, rngs={"quant": step_key})``; each layer draws its own
key with ``make_rng``, so runs are reproducible and layers stay pure. During ``init`` a
missing ``"quant"`` stream is replaced by a fixed key (never by ``"params"``, which would
change the initialisation).

TetraJet's Q-EMA: pass the EMA of the parameters as the ``"q_ema"`` collection
(``{"params": p, "q_ema": fp4jax.optim.q_ema_reference(opt_state, p)}``); a layer whose
``kernel`` has an entry there rounds its forward weights toward it.

>>> import fp4jax.linen as qnn
>>> layer = qnn.QDense(features=128, recipe="nvfp4")   # same params as nn.Dense(128)
"""

from __future__ import annotations

import contextlib
import functools
import threading
import types
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import linear as flax_linear

from fp4jax import recipes as recipes_lib
from fp4jax.qconv import qconv_general_dilated
from fp4jax.qdot import qdot_general, qeinsum
from fp4jax.qragged import qragged_dot

QUANT_RNG = "quant"
Q_EMA_COLLECTION = "q_ema"

RecipeLike = Any  # str | recipes_lib.Recipe


def quant_key(module: nn.Module, recipe: recipes_lib.Recipe) -> jax.Array | None:
  """A fresh key from the ``"quant"`` stream when ``recipe`` needs randomness, else None."""
  if not recipe.needs_key:
    return None
  if module.has_rng(QUANT_RNG):
    return module.make_rng(QUANT_RNG)
  if module.is_initializing():
    # Init outputs are not trained on; drawing from "params" would shift the parameter
    # initialisation away from the Flax layer's, so a fixed key stands in.
    return jax.random.key(0)
  raise ValueError(
      f"recipe {recipe.name!r} rounds stochastically or uses random Hadamard signs: pass "
      f"rngs={{'{QUANT_RNG}': step_key}} to apply (module {'/'.join(module.path) or '<root>'})")


def kernel_reference(module: nn.Module) -> jax.Array | None:
  """The layer's Q-EMA reference kernel from the ``"q_ema"`` collection, if given."""
  if module.has_variable(Q_EMA_COLLECTION, "kernel"):
    return module.get_variable(Q_EMA_COLLECTION, "kernel")
  return None


class QuantDotGeneral(nn.Module):
  """A ``dot_general`` for Flax's ``dot_general_cls`` hook: quantized by ``recipe``,
  with its key and Q-EMA reference taken from the layer that owns it."""

  recipe: RecipeLike = "mxfp4"

  @nn.compact
  def __call__(self, lhs, rhs, dimension_numbers, precision=None,
               preferred_element_type=None, out_sharding=None):
    del precision, out_sharding  # products accumulate in float32
    recipe = recipes_lib.effective(self.recipe)   # fp4jax.recipe_override, if active
    owner = self.parent if isinstance(self.parent, nn.Module) else self
    ref = kernel_reference(owner)
    return qdot_general(lhs, rhs, dimension_numbers, recipe, quant_key(self, recipe),
                        preferred_element_type=preferred_element_type,
                        rhs_reference=None if ref is None else ref.astype(rhs.dtype))


class QuantConvGeneralDilated(nn.Module):
  """A ``conv_general_dilated`` for Flax's ``conv_general_dilated_cls`` hook."""

  recipe: RecipeLike = "mxfp4"

  @nn.compact
  def __call__(self, lhs, rhs, window_strides, padding, lhs_dilation=None,
               rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
               batch_group_count=1, precision=None, preferred_element_type=None):
    recipe = recipes_lib.effective(self.recipe)   # fp4jax.recipe_override, if active
    owner = self.parent if isinstance(self.parent, nn.Module) else self
    ref = kernel_reference(owner)
    if ref is not None and owner.mask is not None:
      ref = ref * owner.mask
    return qconv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, batch_group_count, precision, preferred_element_type,
        recipe=recipe, key=quant_key(self, recipe),
        rhs_reference=None if ref is None else ref.astype(rhs.dtype))


def _check_no_custom_hook(layer: nn.Module, *names: str):
  for n in names:
    v = getattr(layer, n)
    ours = isinstance(v, functools.partial) and v.func in (QuantDotGeneral,
                                                            QuantConvGeneralDilated)
    if v is not None and not ours:  # ours: a clone of a quantized layer
      raise ValueError(f"{type(layer).__name__}: {n} is set; quantized layers supply their "
                       f"own. Use the plain Flax layer for a custom {n}.")


def _install_hook(layer: nn.Module, attr: str, hook_cls) -> None:
  """Validates the recipe and points the Flax layer's ``attr`` hook at ``hook_cls``."""
  _check_no_custom_hook(layer, attr, attr.removesuffix("_cls"))
  recipes_lib.get(layer.recipe)  # fail early on an unknown recipe
  object.__setattr__(layer, attr, functools.partial(hook_cls, recipe=layer.recipe))


class QDense(nn.Dense):
  """``flax.linen.Dense`` whose matmul is quantized by ``recipe`` (same parameters)."""

  recipe: RecipeLike = "mxfp4"

  def __post_init__(self):
    _install_hook(self, "dot_general_cls", QuantDotGeneral)
    super().__post_init__()


class QDenseGeneral(nn.DenseGeneral):
  """``flax.linen.DenseGeneral`` quantized by ``recipe`` (same parameters)."""

  recipe: RecipeLike = "mxfp4"

  def __post_init__(self):
    _install_hook(self, "dot_general_cls", QuantDotGeneral)
    super().__post_init__()


class QConv(nn.Conv):
  """``flax.linen.Conv`` whose implicit GEMM is quantized by ``recipe`` (same
  parameters; see :mod:`fp4jax.qconv` for the reduction order)."""

  recipe: RecipeLike = "mxfp4"

  def __post_init__(self):
    _install_hook(self, "conv_general_dilated_cls", QuantConvGeneralDilated)
    super().__post_init__()


# Flax's Einsum has no hook: during its call, the name `jnp` inside flax.linen.linear
# resolves to a namespace whose `einsum` is the quantized one. Only that module's code
# sees it, and only while a quantized Einsum is being traced (a lock guards the swap).
_EINSUM_LOCK = threading.RLock()


@contextlib.contextmanager
def _flax_linear_einsum(fn):
  with _EINSUM_LOCK:
    saved = flax_linear.jnp
    proxy = types.SimpleNamespace(**{k: getattr(saved, k) for k in dir(saved)
                                     if not k.startswith("__")})
    proxy.einsum = fn
    flax_linear.jnp = proxy
    try:
      yield
    finally:
      flax_linear.jnp = saved


def einsum_call(module: nn.Einsum, orig_call, recipe: recipes_lib.Recipe, *args, **kwargs):
  """Runs a bound ``nn.Einsum``'s own ``__call__`` (``orig_call``) with its einsum
  quantized by ``recipe`` (or the active :func:`fp4jax.recipe_override`)."""
  recipe = recipes_lib.effective(recipe)
  key = quant_key(module, recipe)
  ref = kernel_reference(module)

  def einsum(subscripts, lhs, rhs, precision=None, preferred_element_type=None, **_):
    del precision
    return qeinsum(subscripts, lhs, rhs, recipe, key,
                   preferred_element_type=preferred_element_type,
                   rhs_reference=None if ref is None else ref.astype(rhs.dtype))

  with _flax_linear_einsum(einsum):
    return orig_call(*args, **kwargs)


class QEinsum(nn.Einsum):
  """``flax.linen.Einsum`` quantized by ``recipe`` (same parameters)."""

  recipe: RecipeLike = "mxfp4"

  def __post_init__(self):
    recipes_lib.get(self.recipe)
    super().__post_init__()

  def __call__(self, inputs: jax.Array, einsum_str: str | None = None) -> jax.Array:
    return einsum_call(self, super().__call__, recipes_lib.effective(self.recipe), inputs,
                       einsum_str)


class GroupedDense(nn.Module):
  """The expert GEMM of a mixture-of-experts layer: ``x`` (M, in) tokens sorted by expert
  times ``kernel`` (experts, in, features), ``group_sizes`` (experts,) rows per expert, as
  ``jax.lax.ragged_dot``; quantized per expert by ``recipe`` through
  :func:`fp4jax.qragged.qragged_dot` (forward, dgrad and wgrad), or in high precision for
  ``recipe=None``, where :func:`fp4jax.quantize_model`'s rules may pick one (layer kind
  ``"grouped"``; e.g. ``RULE_SETS["moe_experts_mxfp4"]`` matches a parent named
  ``experts``). Randomness from the ``"quant"`` stream, as the other layers.

  Attributes:
    experts: number of experts G.
    features: output width N of each expert.
    recipe: a recipe name or :class:`~fp4jax.recipes.Recipe`, or None.
    dtype: computation dtype (default: inferred from the input and the kernel).
    param_dtype: the kernel's dtype.
    kernel_init: initializer of the (experts, in, features) kernel (LeCun normal per
      expert by default).
  """

  experts: int
  features: int
  recipe: RecipeLike | None = None
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))

  def __post_init__(self):
    if self.recipe is not None:
      recipes_lib.get(self.recipe)  # fail early on an unknown recipe
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, group_sizes: jax.Array) -> jax.Array:
    kernel = self.param("kernel", self.kernel_init, (self.experts, x.shape[-1], self.features),
                        self.param_dtype)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    if self.recipe is None:
      return jax.lax.ragged_dot(x, kernel, group_sizes)
    recipe = recipes_lib.effective(recipes_lib.get(self.recipe))
    return qragged_dot(x, kernel, group_sizes, recipe, quant_key(self, recipe),
                       preferred_element_type=x.dtype)


LAYERS = {nn.Dense: QDense, nn.DenseGeneral: QDenseGeneral, nn.Conv: QConv,
          nn.Einsum: QEinsum}

__all__ = ["GroupedDense", "QConv", "QDense", "QDenseGeneral", "QEinsum", "QuantConvGeneralDilated",
           "QuantDotGeneral", "QUANT_RNG", "Q_EMA_COLLECTION", "kernel_reference",
           "quant_key"]
