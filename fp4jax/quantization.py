"""``quantize``, ``dequantize``, ``fake_quant``, ``element_scales``: the public entry points
of the numerics.

``quantize`` checks its arguments, resolves the spec with the call's overrides, asks
:mod:`fp4jax.dispatch` which implementation runs (the pure-JAX reference of
:mod:`fp4jax.encode`, or the fused Pallas kernel of :mod:`fp4jax.kernels.quantize`, bit
for bit the same) and returns a :class:`~fp4jax.qarray.QArray`. ``dequantize`` decodes it
exactly (:mod:`fp4jax.decode`).

``quantize`` and ``dequantize`` are data transforms: rounding has a zero derivative almost
everywhere, so differentiating through them gives zeros. The functions to differentiate
are :func:`fake_quant` (a custom VJP with a surrogate derivative from
:mod:`fp4jax.estimators`, straight-through by default, as qwix, AQT, torchao and
Transformer Engine do) and :func:`fp4jax.qdot_general` (and the layers built on it),
whose custom VJP applies the recipe's estimators to each GEMM operand.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fp4jax import blocks, decode, dispatch, encode, estimators
from fp4jax.kernels import quantize as kernel_quantize
from fp4jax.qarray import QArray
from fp4jax.spec import QuantSpec

SPEC_DEFAULT = encode.SPEC_DEFAULT


def quantize(x: jax.Array, spec: str | QuantSpec = "mxfp4", axis: int = -1,
             block_size: int | None = None, scale_mode: str | None = None,
             rounding: str | None = None, key: jax.Array | None = None, *,
             tensor_scale: Any = SPEC_DEFAULT, pad: bool = False,
             random_bits: jax.Array | None = None, saturate: bool | None = None,
             impl: str = "xla") -> QArray:
  """Quantizes ``x`` to a block-scaled low-precision format.

  Args:
    x: float32 / bfloat16 / float16 array of any rank ``>= 1``.
    spec: a preset name (``"mxfp4"``, ``"nvfp4"``, ... see ``fp4jax.PRESETS``) or a
      :class:`QuantSpec`.
    axis: the axis along which elements share a scale (blocks run along it, codes are
      packed along it); for GEMM operands, the contraction axis.
    block_size: overrides the spec's block size (:meth:`QuantSpec.with_block_size`: tiles
      become ``n x n``, per-channel specs switch to blocks).
    scale_mode: overrides the scale mode (``floor``/``ceil``/``even``/``rceil`` for
      E8M0 scales, ``amax`` for float scales). None keeps the spec's.
    rounding: overrides the rounding: ``"nearest"``, ``"stochastic"``, ``"toward_zero"``.
    key: ``jax.random`` key for stochastic rounding (bits from :mod:`fp4jax.prng`).
    tensor_scale: ``"amax"`` (two-level, NVFP4's default: a NaN or Inf anywhere makes the
      tensor scale, hence every element, NaN, as in torchao), ``"finite_amax"`` (two-level
      from the finite values' amax: a non-finite element poisons only its own block, like
      the MX formats), ``None`` (one level) or an FP32 value used as the tensor scale itself (e.g. from a previous step's amax via
      :func:`fp4jax.scales.tensor_scale_from_amax`). Default: the spec's setting.
    pad: zero-pad blocked axes that do not divide; otherwise that is an error.
    random_bits: uint32 array of ``x.shape``, an alternative to ``key``.
    saturate: overrides the spec's overflow behaviour.
    impl: ``"xla"`` (the pure-JAX implementation), ``"pallas"`` (the fused kernels of
      :mod:`fp4jax.kernels.quantize`; interpret mode off GPU; an error for configurations
      they do not take) or ``"auto"`` (Pallas on a GPU where supported, else ``"xla"``).
      :mod:`fp4jax.dispatch` decides and logs the choice at DEBUG on ``"fp4jax"``.

  Returns:
    A :class:`QArray` with ``codes`` (uint8, packed along ``axis``), ``scales`` of the
    input's rank with blocked dimensions divided by their block extent, and
    ``tensor_scale`` (shape ``(1,)*x.ndim``) for two-level scaling.
  """
  dispatch.check_policy(impl, "quantize")
  req = encode.resolve_request(spec, block_size=block_size, scale_mode=scale_mode,
                               rounding=rounding, saturate=saturate, tensor_scale=tensor_scale)
  x = encode.check_input(x)
  key = encode.check_key(key)
  axis = blocks.normalize_axis(axis, x.ndim)  # before dispatch: the kernels read axis % 2
  if x.size == 0 and req.spec.tensor_scale is not None and req.tensor_scale is None:
    raise ValueError(f"quantize: x is empty (shape {x.shape}), so its tensor scale (from the "
                     f"amax, {req.spec.name}) is undefined; pass tensor_scale= explicitly or "
                     "skip quantizing empty tensors (fp4jax.qmatmul / qdot_general accept "
                     "empty operands)")
  choice = dispatch.choose_quantize(x.shape, x.dtype, req.spec, axis, impl, pad=pad,
                                    random_bits=random_bits is not None)
  return _run(choice, x, req, axis, key, pad=pad, random_bits=random_bits)


def _run(choice: dispatch.Choice, x, req: encode.Request, axis: int, key, *, pad=False,
         random_bits=None) -> QArray:
  if choice.impl is dispatch.QuantizeImpl.PALLAS:
    return kernel_quantize.quantize(x, req.spec, axis, key, tensor_scale=req.tensor_scale,
                                    interpret=choice.interpret)
  return encode.quantize_request(x, req, axis, key, pad=pad, random_bits=random_bits)


def quantize_operand(x: jax.Array, spec: QuantSpec, axis: int, key: jax.Array | None,
                     policy: str) -> QArray:
  """A GEMM operand's quantization (:mod:`fp4jax.qdot`): like :func:`quantize` under a
  resolved ``policy``, but an operand the kernels do not take falls back to XLA under
  ``"pallas"`` too (it must quantize whatever its shape); one decision per operand."""
  x = encode.check_input(x)
  axis = blocks.normalize_axis(axis, x.ndim)
  choice = dispatch.choose_quantize(x.shape, x.dtype, spec, axis, policy, strict=False)
  return _run(choice, x, encode.Request(spec, None), axis, key)


def _check_qarray(q: Any, what: str) -> QArray:
  if not isinstance(q, QArray):
    raise TypeError(f"{what} expects a QArray, got {type(q).__name__}")
  return q


def dequantize(q: QArray, dtype: Any = None) -> jax.Array:
  """The values a :class:`QArray` represents, as ``dtype`` (default: the input's dtype).

  Exact: element values times scales are formed from bits (E8M0) or with exactly
  rounded float32 products (float scales, as torchao: ``q * (t * s)``), then cast.
  """
  if dtype is not None and not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
    raise TypeError(f"dequantize: dtype must be a float type (e.g. jnp.float32 or "
                    f"jnp.bfloat16), got {jnp.dtype(dtype)}; round or cast the float result "
                    "yourself if integers are wanted")
  return decode.dequantize(_check_qarray(q, "dequantize"), dtype)


def element_scales(q: QArray) -> jax.Array:
  """The float32 scale multiplying each element's code value (shape ``q.shape``):
  ``2^s`` for power-of-two scales, ``s`` or ``t * s`` for float scales. Surrogate
  gradients evaluate on ``x / element_scales(q)``."""
  return decode.element_scales(_check_qarray(q, "element_scales"))


def fake_quant(x: jax.Array, spec: str | QuantSpec = "mxfp4", axis: int = -1, *,
               estimator: str | None = "ste",
               estimator_params: Mapping[str, float] | tuple = (), **kwargs) -> jax.Array:
  """``dequantize(quantize(x, spec, axis, **kwargs), x.dtype)``: x rounded onto the
  format, differentiable through a surrogate derivative.

  Forward: exactly the quantized values (bit for bit ``dequantize(quantize(...))``).
  Backward: ``dL/dx = dL/dy * E(x / s)`` with ``s`` each element's scale
  (:func:`element_scales`, held constant, as every FP4 training recipe does) and ``E`` the
  named estimator of :mod:`fp4jax.estimators` (``"ste"``: 1, the straight-through
  estimator of Bengio et al. 2013; ``"clipped_ste"``: 0 where the block's value was
  clipped; ``"dge"``: Wang et al. 2025; ``"smooth"``; or any registered one), with
  ``estimator_params`` its keyword arguments. ``estimator=None`` keeps the true
  derivative of the hard quantizer (zero almost everywhere). Random keys, explicit random
  bits and tensor scales get no gradient. Works under ``jit``, ``vmap``, ``grad`` and
  ``remat`` (reverse mode; ``jax.jvp`` raises, as for any ``jax.custom_vjp``).

  Args:
    x: float array; ``spec``, ``axis`` and ``**kwargs`` as :func:`quantize`.
    estimator: a registered estimator name, or None.
    estimator_params: the estimator's keyword arguments (a mapping or ``(name, value)``
      pairs), e.g. ``{"k": 5.0, "max_grad": 3.0}`` for ``"dge"``.
  """
  x = jnp.asarray(x)
  if estimator is None:
    return dequantize(quantize(x, spec, axis, **kwargs), x.dtype)
  if not isinstance(estimator, str):
    raise TypeError(f"fake_quant: estimator must be a registered name or None, got "
                    f"{type(estimator).__name__}")
  estimators.get_estimator(estimator)          # unknown names: the registry's error
  try:
    params = tuple(sorted((k, float(v)) for k, v in dict(estimator_params).items()))
  except (TypeError, ValueError):
    raise TypeError(f"fake_quant: estimator_params must map names to numbers, got "
                    f"{estimator_params!r}") from None
  # A numeric tensor scale is data (it may change every step), not configuration.
  if isinstance(kwargs.get("tensor_scale"), (int, float)) and not isinstance(
      kwargs["tensor_scale"], bool):
    kwargs["tensor_scale"] = jnp.float32(kwargs["tensor_scale"])
  # Arrays among the keyword arguments (key, random_bits, tensor_scale) travel as
  # arguments of the custom VJP (no closure over tracers); the rest are static.
  arrays = {k: v for k, v in kwargs.items() if _is_array(v)}
  static = tuple(sorted((k, v) for k, v in kwargs.items() if k not in arrays))
  for k, v in static:
    try:
      hash(v)
    except TypeError:
      raise TypeError(f"fake_quant: {k}={v!r} must be hashable configuration (a str, number, "
                      "bool, None or tuple) or an array") from None
  return _fake_quant_vjp(spec, axis, estimator, params, static)(x, arrays)


def _is_array(v: Any) -> bool:
  return isinstance(v, (jax.Array, np.ndarray)) or hasattr(v, "aval")


def _zero_cotangent(v: jax.Array):
  v = jnp.asarray(v) if not hasattr(v, "dtype") else v
  if jnp.issubdtype(v.dtype, jnp.inexact):
    return jnp.zeros_like(v)
  return np.zeros(v.shape, jax.dtypes.float0)  # integer bits, PRNG keys


@functools.lru_cache(maxsize=256)
def _fake_quant_vjp(spec, axis: int, estimator: str, params: tuple, static: tuple):
  """The custom-VJP fake quantizer of one static configuration."""

  def forward(x, arrays):
    q = quantize(x, spec, axis, **dict(static), **arrays)
    y = dequantize(q, x.dtype)
    if estimator == "ste":
      return y, None
    v = x.astype(jnp.float32) / element_scales(q)
    return y, estimators.get_estimator(estimator)(v, q.spec.element, **dict(params))

  @jax.custom_vjp
  def fq(x, arrays):
    return forward(x, arrays)[0]

  def fwd(x, arrays):
    y, mult = forward(x, arrays)
    return y, (mult, jax.tree.map(_zero_cotangent, arrays), jnp.zeros((0,), x.dtype))

  def bwd(res, g):
    mult, zero_arrays, x_like = res
    dx = g if mult is None else (g.astype(jnp.float32) * mult)
    return dx.astype(x_like.dtype), zero_arrays

  fq.defvjp(fwd, bwd)
  return fq


__all__ = ["dequantize", "element_scales", "fake_quant", "quantize"]
