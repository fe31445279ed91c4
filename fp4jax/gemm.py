"""GEMMs of quantized operands: one function per question, the implementation from
:mod:`fp4jax.dispatch`.

* :func:`fp4_matmul`: ``QArray (M, K) @ QArray (K, N)`` for users holding quantized
  operands (pre-quantized weights, benchmarks).
* :func:`weight_only_matmul`: BF16 activations times packed FP4 weights.
* :func:`quantized_einsum`: what :mod:`fp4jax.qdot` runs for each of a layer's three
  GEMMs, given the fake-quantized values and their QArrays.

Every path multiplies the same quantized values exactly; they differ only in float32
accumulation order (and, off the ``"xla"`` policy, in applying FP32 tensor scales in the
epilogue: one rounding per block scale).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from fp4jax import decode, dispatch
from fp4jax.dispatch import GemmImpl
from fp4jax.kernels import matmul as kernel_matmul
from fp4jax.kernels import weight_only as kernel_weight_only
from fp4jax.qarray import QArray

_HIGHEST = lax.Precision.HIGHEST


def einsum_f32(a: jax.Array, b: jax.Array, eq: str) -> jax.Array:
  """The reference GEMM: float32 operands, ``Precision.HIGHEST``, float32 result."""
  return jnp.einsum(eq, a, b, precision=_HIGHEST, preferred_element_type=jnp.float32)


def einsum_bf16_exact(xq: QArray, x_shape, yq: QArray, y_shape, eq: str,
                      facts: dispatch.DeviceFacts | None = None) -> jax.Array:
  """``einsum(eq, x, y)`` of two quantized operands on BF16 tensor cores, f32 accumulation.

  Each operand is dequantized *without* its tensor scale (exact in BF16 by
  :func:`fp4jax.spec.bf16_exact`), so every product is exact in the f32 accumulator, as in
  the f32 GEMM of the fake-quantized values; the FP32 tensor scales multiply the f32
  result. Against :func:`einsum_f32` of the fake-quantized values (where the tensor scale
  is folded into each block scale, ``fl(t * s)``) this differs by accumulation order and
  by one f32 rounding per block scale, both inside the ``2^-22 * sum |x_i y_i|`` bound the
  tests use. The f32 GEMM runs on a GPU's FP32 pipes, ~10x slower than BF16.
  """
  def parts(q, shape):
    t = q.tensor_scale
    q = dataclasses.replace(q, tensor_scale=None) if t is not None else q
    return decode.dequantize(q, jnp.bfloat16).reshape(shape), t

  a, ta = parts(xq, x_shape)
  b, tb = parts(yq, y_shape)
  if not (facts or dispatch.device_facts()).bf16_dot:
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  out = jnp.einsum(eq, a, b, preferred_element_type=jnp.float32)
  for t in (ta, tb):
    if t is not None:
      out = out * t.reshape(())
  return out


def quantized_einsum(xv: jax.Array, xq: QArray | None, yv: jax.Array, yq: QArray | None,
                     eq: str, policy: str,
                     kernel_operands: tuple[Any, Any] | None = None) -> jax.Array:
  """``einsum(eq, x, y)`` in float32 of two (possibly) quantized operands.

  ``xv``/``yv`` are the fake-quantized float32 values, ``xq``/``yq`` their QArrays in the
  same layout (None where an operand has none); ``kernel_operands`` the same QArrays as
  the kernels take them (2D, (M, K) and (K, N), both blocked along K; default
  ``(xq, yq)``). For ``eq`` of a batch of one (``"bmk,bkn->bmn"`` and its backward forms)
  a kernel result gets the batch axis back.
  """
  choice = dispatch.choose_gemm(xq, yq, policy, kernel_operands=kernel_operands)
  if choice.impl.uses_kernels:
    kxq, kyq = kernel_operands or (xq, yq)
    return kernel_matmul.fp4_matmul(kxq, kyq, impl=choice.impl.value, out_dtype=jnp.float32,
                                    interpret=choice.interpret)[None]
  if choice.impl is GemmImpl.BF16_EXACT:
    return einsum_bf16_exact(xq, xv.shape, yq, yv.shape, eq)
  return einsum_f32(xv, yv, eq)


def fp4_matmul(a: QArray, b: QArray, *, impl: str = "auto", out_dtype: Any = jnp.bfloat16) -> jax.Array:
  """``a @ b`` of two quantized operands.

  Args:
    a: (M, K) QArray blocked along K (``axis=-1``).
    b: (K, N) QArray blocked along K (``axis=-2``).
    impl: a policy (``"auto"``, ``"xla"``, ``"pallas"``: :mod:`fp4jax.dispatch` chooses) or
      one implementation by name (:data:`fp4jax.kernels.matmul.IMPLS`: ``"fp8_xla"``,
      ``"bf16_xla"``, ``"blackwell"``, ``"reference"``).
    out_dtype: result dtype (the accumulation is float32).

  Returns:
    (M, N) array of ``out_dtype``.
  """
  kernel_matmul.check_operands(a, b)
  facts = dispatch.device_facts()
  if impl in dispatch.POLICIES:
    choice = dispatch.choose_gemm(a, b, dispatch.resolve_policy(impl, facts), facts=facts)
    if not choice.impl.uses_kernels:
      return kernel_matmul.matmul_reference(a, b, out_dtype)
    impl, interpret = choice.impl.value, choice.interpret
  elif impl in kernel_matmul.IMPLS:
    interpret = dispatch.interpret_mode(facts)
  else:
    raise ValueError(f"fp4_matmul: unknown impl {impl!r}; choose a policy "
                     f"{dispatch.POLICIES} or one of {kernel_matmul.IMPLS}")
  return kernel_matmul.fp4_matmul(a, b, impl=impl, out_dtype=out_dtype, interpret=interpret)


def weight_only_matmul(x: jax.Array, w: QArray, **kwargs) -> jax.Array:
  """``x @ w`` for activations ``x`` (M, K) and packed FP4 weights ``w`` (K, N) blocked
  along K, decoded inside the kernel (:func:`fp4jax.kernels.weight_only.weight_only_matmul`,
  whose keyword arguments pass through); interpret mode off a GPU."""
  kwargs.setdefault("interpret", dispatch.interpret_mode())
  return kernel_weight_only.weight_only_matmul(x, w, **kwargs)


def weight_only_linear(x: jax.Array, w: QArray, **kwargs) -> jax.Array:
  """``x @ w.T`` for activations ``x`` (M, K) and packed FP4 weights ``w`` (N, K) blocked
  along K: the PyTorch / gpt-oss orientation that :func:`fp4jax.interop.load_safetensors`
  returns, read as stored (:func:`fp4jax.kernels.weight_only.weight_only_linear`, whose
  keyword arguments pass through); interpret mode off a GPU."""
  kwargs.setdefault("interpret", dispatch.interpret_mode())
  return kernel_weight_only.weight_only_linear(x, w, **kwargs)


def weight_only_dot(x: jax.Array, w: QArray, *, impl: str | None = None,
                    out_dtype: Any = None, strict: bool = True) -> jax.Array:
  """``x @ w`` for float activations ``x`` (..., K) and stored FP4 weights ``w`` (K, N)
  blocked along K (a Flax kernel as :func:`fp4jax.ptq.quantize_params` stores it): the
  path :func:`fp4jax.dispatch.choose_weight_only` picks, the weight-only kernel or
  ``x @ dequantize(w)``. Returns (..., N) in ``out_dtype`` (default ``x.dtype``).
  ``strict=False``: ``impl="pallas"`` dequantizes where the kernel cannot take the GEMM
  instead of raising (a whole model's layers, :func:`fp4jax.ptq.weight_only_apply`)."""
  out_dtype = jnp.dtype(out_dtype or x.dtype)
  if not isinstance(w, QArray) or w.ndim != 2:
    raise TypeError(f"weight_only_dot: w must be a 2D QArray (K, N), got "
                    f"{type(w).__name__} {getattr(w, 'shape', '')}")
  if x.shape[-1] != w.shape[0]:
    raise ValueError(f"weight_only_dot: x {x.shape} and w {w.shape} do not contract "
                     "(x's last axis is K, w's first)")
  lead = x.shape[:-1]
  x2 = x.reshape(-1, x.shape[-1])
  choice = dispatch.choose_weight_only(x2.shape, w, impl, strict=strict, x_dtype=x2.dtype)
  if choice.impl is dispatch.WeightOnlyImpl.KERNEL:
    # The kernel picks its algorithm and tile (the GEMV at M = 1, 128 x 128 MMA tiles).
    y = kernel_weight_only.weight_only_matmul(x2, w, out_dtype=jnp.float32,
                                              interpret=choice.interpret)
  else:
    wd = decode.dequantize(w, x2.dtype)
    y = jnp.dot(x2, wd, preferred_element_type=jnp.float32)
  return y.astype(out_dtype).reshape(*lead, w.shape[1])


__all__ = ["einsum_bf16_exact", "einsum_f32", "fp4_matmul", "quantized_einsum",
           "weight_only_dot", "weight_only_linear", "weight_only_matmul"]
