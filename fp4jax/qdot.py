"""Quantized ``dot_general`` / ``einsum`` / ``matmul`` with a custom VJP.

Any ``dot_general`` is brought to the canonical batched form ``(B, M, K) x (B, K, N)``
(batch dims, lhs free dims, contracting dims flattened), which is what the three GEMMs
of :mod:`fp4jax.recipes` are defined on:

    forward:  Y  = Q_fl(A R_f) Q_fr(R_f^T W)                        (contract K)
    dgrad:    dA = [Q_dg(dY R_d) Q_dr(W' R_d)^T] * est_A' ... R_f^T  (contract N)
    wgrad:    dW = R_f [Q_wl(R_w^T A') ^T Q_wg(R_w^T dY)] * est_W'   (contract M)

``R_f, R_d, R_w`` are random Hadamard transforms (identity when the recipe has none),
``A' = A R_f`` and ``W' = R_f^T W`` (or their forward-quantized versions with double
quantization), ``est'`` the forward quantizers' surrogate derivatives (1 for STE).
Products accumulate in float32 (``Precision.HIGHEST``); the output dtype is
``preferred_element_type`` or the operands' result type. Reshapes and transposes
around the core are ordinary JAX ops, so autodiff maps the gradients back.

Randomness: a key is split per use with ``fold_in`` (0..5 for the six operands, 6..8
for the three Hadamard transforms), so one step key reproduces a run bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import contextvars
import functools
import logging
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fp4jax import asymmetric, estimators, hadamard, outliers, reference_rounding
from fp4jax import recipes as recipes_lib
from fp4jax.quantize import dequantize, element_scales, quantize
from fp4jax.spec import QuantSpec

_HIGHEST = lax.Precision.HIGHEST
_OP_INDEX = {op: i for i, op in enumerate(recipes_lib.OPERANDS)}
_H_FWD, _H_DGRAD, _H_WGRAD = 6, 7, 8


IMPLS = ("xla", "auto", "pallas")
# "auto": the kernels on a GPU (measured faster there: kernels/NOTES.md), "xla" elsewhere.
_DEFAULT_IMPL = contextvars.ContextVar("fp4jax_gemm_impl", default="auto")


@contextlib.contextmanager
def gemm_impl(impl: str):
  """Sets the ``impl`` of every :func:`qdot_general` traced inside (layers of
  :mod:`fp4jax.linen` / :mod:`fp4jax.nnx` included) that does not pass its own::

      with fp4jax.gemm_impl("auto"):      # kernels on a GPU, XLA elsewhere
        loss, grads = train_step(params, batch)   # traced (jit-compiled) in here

  It acts at trace time: a function jit-compiled before keeps the implementation it was
  traced with.
  """
  if impl not in IMPLS:
    raise ValueError(f"gemm_impl: impl must be one of {IMPLS}, got {impl!r}")
  token = _DEFAULT_IMPL.set(impl)
  try:
    yield
  finally:
    _DEFAULT_IMPL.reset(token)


def _key(key_data, i):
  return jax.random.fold_in(jax.random.wrap_key_data(key_data), i)


def _quantize_operand(x, spec: QuantSpec | None, axis: int, key_data, op: str,
                      estimator: str = "ste", params=(), asym: bool = False, reference=None,
                      impl: str = "xla"):
  """Float32 fake-quantized ``x`` (x itself when spec is None), for a non-STE estimator
  the surrogate-derivative multiplier at ``x`` (else None), and the QArray (None where
  there is none: no spec, asymmetric or reference rounding). A ``reference`` (Q-EMA)
  decides the rounding direction between x's grid neighbours. ``impl`` is
  :func:`fp4jax.quantize`'s (the Pallas kernels for 2D operands of a batch of one)."""
  x = x.astype(jnp.float32)
  if spec is None:
    return x, None, None
  key = _key(key_data, _OP_INDEX[op]) if spec.rounding == "stochastic" else None
  q = None
  if asym:
    z, q_asym = asymmetric.quantize_shifted(x, spec, axis, key=key)
    value, centred, scale_of = z + dequantize(q_asym, jnp.float32), x - z, q_asym
  else:
    if impl != "xla" and x.shape[0] == 1:  # the kernels take 2D operands
      from kernels import quantize as kq  # kernels import the core; never the reverse
      supported = kq.unsupported_reason(x.shape[1:], x.dtype, spec, axis) is None
      q2 = quantize(x[0], spec, axis, key=key, impl=impl if supported else "xla")
      value = dequantize(q2, jnp.float32)[None]
      q = q2
    else:
      q = quantize(x, spec, axis, key=key)
      value = dequantize(q, jnp.float32)
    centred, scale_of = x, q
    if reference is not None:
      value = reference_rounding.round_toward_reference(x, reference, spec, axis, key=key)
      q = None  # the GEMM must use the reference-rounded values
  if estimator == "ste":
    return value, None, q
  scales_full = element_scales(scale_of)
  if scales_full.ndim == centred.ndim - 1:
    scales_full = scales_full[None]
  mult = estimators.get_estimator(estimator)(centred / scales_full, spec.element,
                                             **dict(params))
  return value, mult, q


def _transposed(q):
  """The QArray of ``q``'s 2D transpose (codes and scales transposed, axis flipped)."""
  return q.__class__(q.codes.T, q.scales.T, q.tensor_scale, q.spec, -1 if q.axis % 2 == 0
                     else -2, tuple(reversed(q.padding)), q.orig_dtype)


def _gemm(xv, xq, yv, yq, eq, impl, kernel_operands=None):
  """``einsum(eq, x, y)`` in float32: through :func:`kernels.fp4_matmul.fp4_matmul` when
  ``impl`` asks for kernels and both operands are 2D QArrays of a supported pair (``xq``
  (M, K) blocked along K, ``yq`` (K, N) blocked along K); else an XLA BF16 GEMM of the
  dequantized operands where that is exact (:func:`_mm_bf16_exact`); else XLA's f32 GEMM
  on the fake-quantized values. All give the product of the same quantized values; only
  the accumulation order (and, for tensor-scaled operands off the reference path, where
  the tensor scale is applied) differs.

  ``xq``/``yq`` are the QArrays of ``xv``/``yv`` in their layout; ``kernel_operands``
  the same QArrays as the kernels take them (2D, (M, K) and (K, N)), default ``xq, yq``.
  """
  kxq, kyq = kernel_operands or (xq, yq)
  if impl != "xla" and kxq is not None and kyq is not None:
    from kernels import fp4_matmul as fm  # kernels import the core; never the reverse
    path = fm.kernel_path(kxq, kyq)
    fm_impl = path if impl == "pallas" else fm.choose_impl(kxq, kyq)
    tile = fm.default_tile(kxq.shape[0], kxq.shape[1], kyq.shape[1])
    if path is not None and (tile is not None or fm_impl.endswith("_xla")):
      if fm_impl != "xla":
        logging.getLogger("fp4jax").debug("qdot: GEMM %s via kernels/fp4_matmul (%s)", eq,
                                          fm_impl)
        return fm.fp4_matmul(kxq, kyq, impl=fm_impl, out_dtype=jnp.float32, tile=tile)[None]
  # BF16 tensor cores when every product stays exact. Tensor scales then move to the
  # epilogue (one f32 rounding per block scale away from the fake-quantized values), so
  # the reference path, impl="xla", takes this only for operands without them (MX).
  if (xq is not None and yq is not None and bf16_exact(xq.spec) and bf16_exact(yq.spec)
      and all(q.tensor_scale is None if impl == "xla" else
              q.tensor_scale is None or q.tensor_scale.size == 1 for q in (xq, yq))):
    return _mm_bf16_exact(xq, xv.shape, yq, yv.shape, eq)
  return _mm(xv, yv, eq)


def significand_bits(spec: QuantSpec) -> int | None:
  """Significant bits of ``element x block scale`` (the tensor scale left out), or None
  when the scale has more than 8 (FP32 / BF16 scales).

  An element of ``m`` mantissa bits has ``m + 1`` significant bits (integers: ``bits - 1``
  magnitude bits, ``mbits + 1`` too); a power-of-two scale adds none; a float scale of
  ``n`` mantissa bits multiplies two integer significands, ``(m + 1) + (n + 1)`` bits.
  """
  elem, sfmt = spec.element, spec.scale_format
  sig = elem.mbits + 1
  if sfmt.is_pow2:
    return sig
  if sfmt.element is None or sfmt.element.mbits > 7:
    return None
  return sig + sfmt.element.mbits + 1


def bf16_exact(spec: QuantSpec) -> bool:
  """Whether ``element x block scale`` is exactly a bfloat16 for every code and scale.

  BF16 has 8 significant bits and FP32's exponent range, so it holds the product when
  :func:`significand_bits` is at most 8: E2M1 x E8M0 (MXFP4, 2 bits), E2M1 x E4M3
  (NVFP4, 6), E4M3 x E4M3 (7), INT8 x E8M0 (7). Products below 2^-126 are BF16 subnormals
  with fewer bits; they are smaller than any term a normal-range product can be
  distinguished from at float32 accumulation, so they stay within the accumulation bound.
  """
  sig = significand_bits(spec)
  return sig is not None and sig <= 8


def _mm_bf16_exact(xq, x_shape, yq, y_shape, eq):
  """``einsum(eq, x, y)`` of two quantized operands on BF16 tensor cores, f32 accumulation.

  Each operand is dequantized *without* its tensor scale (exact in BF16 by
  :func:`bf16_exact`), so every product is exact in the f32 accumulator, as in the f32
  GEMM of the fake-quantized values; the FP32 tensor scales multiply the f32 result.
  Against ``_mm`` of the fake-quantized values (where the tensor scale is folded into each
  block scale, ``fl(t * s)``) this differs by accumulation order and by one f32 rounding
  per block scale, both inside the ``2^-22 * sum |x_i y_i|`` bound the tests use. The f32
  GEMM (``precision=HIGHEST``) runs on the GPU's FP32 pipes, ~10x slower than BF16.
  """
  def parts(q, shape):
    t = q.tensor_scale
    q = dataclasses.replace(q, tensor_scale=None) if t is not None else q
    return dequantize(q, jnp.bfloat16).reshape(shape), t
  a, ta = parts(xq, x_shape)
  b, tb = parts(yq, y_shape)
  if jax.default_backend() == "cpu":  # XLA:CPU has no BF16 x BF16 -> F32 dot thunk
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  out = jnp.einsum(eq, a, b, preferred_element_type=jnp.float32)
  for t in (ta, tb):
    if t is not None:
      out = out * t.reshape(())
  return out


def _rht(x, axis, key_data, block, which, transpose=False):
  if block is None:
    return x.astype(jnp.float32)
  return hadamard.rht(x.astype(jnp.float32), axis, _key(key_data, which), block, transpose)


def _mm(a, b, eq):
  return jnp.einsum(eq, a, b, precision=_HIGHEST, preferred_element_type=jnp.float32)


def _check_block_multiple(length, what, specs, recipe):
  mult = math.lcm(*[_axis_multiple(sp, -1) for sp in specs])
  if length % mult:
    raise ValueError(
        f"qdot_general: the {what} = {length} is not a multiple of {mult}, the block size "
        f"of recipe {recipe.name!r} along it: pad the operands along that axis with zeros "
        "(exact for the product) or keep this layer in BF16 (fp4jax.Rule(pattern, None)). "
        "(The token axis M of wgrad is zero-padded automatically.)")


def _axis_multiple(spec: QuantSpec | None, axis: int) -> int:
  """What the length of ``axis`` must be a multiple of for ``spec``'s scale blocks."""
  if spec is None:
    return 1
  if spec.granularity == "block":
    return spec.block_size
  if spec.granularity == "tile":
    return spec.tile[axis]
  return 1


def _backward_gemm(x, y, axis, key_data, block, which, ops, specs, eq, impl):
  """One backward GEMM: Hadamard both operands along the contraction ``axis``, quantize
  each along it with its spec, multiply in float32 (dgrad contracts the last axis of
  both, wgrad the first non-batch axis of both)."""
  if axis == -2:
    # wgrad contracts M (batch x tokens), which need not be a multiple of the block: pad
    # both operands with zero rows (exact: zero rows add nothing to A'^T dY, and a
    # Hadamard transform is orthogonal, so (H [A; 0])^T (H [dY; 0]) = A^T dY).
    m = x.shape[1]
    mult = math.lcm(*[_axis_multiple(sp, axis) for sp in specs], block or 1)
    if m % mult:
      pad = [(0, 0), (0, -m % mult), (0, 0)]
      x, y = jnp.pad(x, pad), jnp.pad(y, pad)
  xv, _, xq = _quantize_operand(_rht(x, axis, key_data, block, which), specs[0], axis,
                                key_data, ops[0], impl=impl)
  yv, _, yq = _quantize_operand(_rht(y, axis, key_data, block, which), specs[1], axis,
                                key_data, ops[1], impl=impl)
  kxq, kyq = xq, yq  # the kernels' layout: (M, K) . (K, N), both blocked along K
  if xq is not None and yq is not None and xq.ndim == 2:
    if axis == -1:   # dgrad: x (M, N) . y (K, N)^T
      kyq = _transposed(yq)
    else:            # wgrad: x (M, K)^T . y (M, N)
      kxq = _transposed(xq)
  return _gemm(xv, xq, yv, yq, eq, impl, kernel_operands=(kxq, kyq))


@functools.lru_cache(maxsize=None)
def _qmatmul_for(recipe: recipes_lib.Recipe, out_dtype, impl: str = "xla"):
  """The custom-VJP canonical GEMM ``(B,M,K) x (B,K,N)`` of one recipe, output dtype and
  implementation."""

  @jax.custom_vjp
  def qmatmul(a, w, key_data, w_ref):
    return _qmatmul_fwd(a, w, key_data, w_ref, recipe, out_dtype, impl)[0]

  qmatmul.defvjp(lambda a, w, kd, wr: _qmatmul_fwd(a, w, kd, wr, recipe, out_dtype, impl),
                 lambda res, g: _qmatmul_bwd(recipe, impl, res, g))
  return qmatmul


def _qmatmul_fwd(a, w, key_data, w_ref, recipe, out_dtype, impl="xla"):
  r = recipe
  a1 = _rht(a, -1, key_data, r.hadamard_fwd, _H_FWD)
  w1 = _rht(w, -2, key_data, r.hadamard_fwd, _H_FWD)
  ref1 = None if w_ref is None else _rht(w_ref, -2, key_data, r.hadamard_fwd, _H_FWD)
  aq, a_mult, a_q = _quantize_operand(a1, r.fwd_lhs, -1, key_data, "fwd_lhs",
                                      r.lhs_estimator, r.estimator_params, r.lhs_asymmetric,
                                      impl=impl)
  wq, w_mult, w_q = _quantize_operand(w1, r.fwd_rhs, -2, key_data, "fwd_rhs",
                                      r.rhs_estimator, r.estimator_params, reference=ref1,
                                      impl=impl)
  y = _gemm(aq, a_q, wq, w_q, "bmk,bkn->bmn", impl).astype(out_dtype)
  # Empty arrays carry the input dtypes (residuals must be arrays); multipliers may be None.
  ref_like = None if w_ref is None else jnp.zeros_like(w_ref)
  return y, (a1, w1, aq, wq, a_mult, w_mult, key_data, jnp.zeros((0,), a.dtype),
             jnp.zeros((0,), w.dtype), ref_like)


def _qmatmul_bwd(recipe, impl, res, g):
  r = recipe
  a1, w1, aq, wq, a_mult, w_mult, key_data, a_like, w_like, ref_grad = res
  g = g.astype(jnp.float32)
  _check_block_multiple(g.shape[-1], "output width N (dgrad contracts it)",
                        (r.dgrad_grad, r.dgrad_rhs), r)
  a_src, w_src = (aq, wq) if r.double_quant else (a1, w1)
  # dgrad: dA' = dY W'^T, contracting N; wgrad: dW' = A'^T dY, contracting M.
  da = _backward_gemm(g, w_src, -1, key_data, r.hadamard_dgrad, _H_DGRAD,
                      ("dgrad_grad", "dgrad_rhs"), (r.dgrad_grad, r.dgrad_rhs), "bmn,bkn->bmk",
                      impl)
  dw = _backward_gemm(a_src, g, -2, key_data, r.hadamard_wgrad, _H_WGRAD,
                      ("wgrad_lhs", "wgrad_grad"), (r.wgrad_lhs, r.wgrad_grad), "bmk,bmn->bkn",
                      impl)
  if a_mult is not None:
    da = da * a_mult
  if w_mult is not None:
    dw = dw * w_mult
  da = _rht(da, -1, key_data, r.hadamard_fwd, _H_FWD, transpose=True)
  dw = _rht(dw, -2, key_data, r.hadamard_fwd, _H_FWD, transpose=True)
  zero_key = np.zeros(key_data.shape, dtype=jax.dtypes.float0)
  return da.astype(a_like.dtype), dw.astype(w_like.dtype), zero_key, ref_grad


def _check_dims(lhs, rhs, dimension_numbers):
  try:
    (lc, rc), (lb, rb) = dimension_numbers
  except (TypeError, ValueError):
    raise ValueError("dimension_numbers must be ((lhs_contracting, rhs_contracting), "
                     f"(lhs_batch, rhs_batch)), got {dimension_numbers!r}") from None
  lc, rc, lb, rb = (tuple(int(d) % nd for d in ds) for ds, nd in
                    ((lc, lhs.ndim), (rc, rhs.ndim), (lb, lhs.ndim), (rb, rhs.ndim)))
  if len(lc) != len(rc) or len(lb) != len(rb):
    raise ValueError(f"dimension_numbers pair up {len(lc)}/{len(rc)} contracting and "
                     f"{len(lb)}/{len(rb)} batch dims; they must match")
  for name, a, b in (("contracting", lc, rc), ("batch", lb, rb)):
    for i, j in zip(a, b):
      if lhs.shape[i] != rhs.shape[j]:
        raise ValueError(f"qdot_general: {name} dimension sizes differ: lhs dim {i} has "
                         f"{lhs.shape[i]}, rhs dim {j} has {rhs.shape[j]}")
  return lc, rc, lb, rb


def qdot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers,
                 recipe: str | recipes_lib.Recipe = "mxfp4", key: jax.Array | None = None, *,
                 preferred_element_type: Any = None,
                 rhs_reference: jax.Array | None = None, impl: str | None = None) -> jax.Array:
  """``lax.dot_general`` with every GEMM of forward and backward quantized by ``recipe``.

  Args:
    lhs, rhs: float operands (lhs plays the activation ``A``, rhs the weight ``W``).
    dimension_numbers: as ``lax.dot_general``: ``((lhs_contract, rhs_contract),
      (lhs_batch, rhs_batch))``.
    recipe: a name from ``fp4jax.recipes.RECIPES`` or a :class:`~fp4jax.recipes.Recipe`.
    key: ``jax.random`` key; required when the recipe rounds stochastically or uses a
      random Hadamard transform. Use one key per step and ``fold_in`` per layer.
    preferred_element_type: output dtype (default: result type of the operands).
    rhs_reference: optional array of rhs's shape (e.g. an EMA of the weights) that decides
      the rounding direction of the forward weight quantizer (TetraJet's Q-EMA,
      :mod:`fp4jax.reference_rounding`); no gradient flows into it.
    impl: None (the :func:`gemm_impl` context's, "auto" by default), "xla" (pure JAX,
      the reference), "auto" (on a GPU: the fused quantize kernels
      and the FP4 GEMM kernels of ``kernels/`` for forward, dgrad and wgrad wherever the
      operand pair is supported (2D after flattening, E2M1 with 8-bit block scales),
      XLA elsewhere; off a GPU: "xla") or "pallas" (the kernels wherever supported, in
      interpret mode off a GPU). The kernels quantize bit for bit as the reference; the
      GEMM differs only in accumulation order.

  Returns:
    ``lax.dot_general``'s output layout: batch dims, lhs free dims, rhs free dims.
  """
  recipe = recipes_lib.get(recipe)
  lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
  for name, v in (("lhs", lhs), ("rhs", rhs)):
    if not jnp.issubdtype(v.dtype, jnp.floating):
      raise TypeError(f"qdot_general: {name} must be a float array, got {v.dtype}")
  out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(lhs, rhs))
  if recipe.is_identity:
    return lax.dot_general(lhs, rhs, dimension_numbers, preferred_element_type=out_dtype
                           if preferred_element_type is not None else None)
  lc, rc, lb, rb = _check_dims(lhs, rhs, dimension_numbers)
  if recipe.needs_key and key is None:
    raise ValueError(f"recipe {recipe.name!r} uses stochastic rounding or a random Hadamard "
                     "transform: pass key=jax.random.key(...) (one per step, fold_in per layer)")
  if key is None:
    key_data = jnp.zeros(2, jnp.uint32)  # never read: the recipe needs no randomness
  elif jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key_data = jax.random.key_data(key)
  else:
    key_data = jnp.asarray(key, jnp.uint32)  # raw uint32 key data

  lf = [d for d in range(lhs.ndim) if d not in lc + lb]
  rf = [d for d in range(rhs.ndim) if d not in rc + rb]
  bshape = [lhs.shape[d] for d in lb]
  mshape = [lhs.shape[d] for d in lf]
  nshape = [rhs.shape[d] for d in rf]
  k = int(np.prod([lhs.shape[d] for d in lc], dtype=np.int64))
  B, M, N = (int(np.prod(s, dtype=np.int64)) for s in (bshape, mshape, nshape))
  a = jnp.transpose(lhs, (*lb, *lf, *lc)).reshape(B, M, k)
  w = jnp.transpose(rhs, (*rb, *rc, *rf)).reshape(B, k, N)
  w_ref = None
  if rhs_reference is not None:
    rhs_reference = jnp.asarray(rhs_reference)
    if rhs_reference.shape != rhs.shape:
      raise ValueError(f"rhs_reference must have rhs's shape {rhs.shape}, got "
                       f"{rhs_reference.shape}")
    w_ref = lax.stop_gradient(
        jnp.transpose(rhs_reference, (*rb, *rc, *rf)).reshape(B, k, N).astype(w.dtype))

  _check_block_multiple(k, "contraction length K", (recipe.fwd_lhs, recipe.fwd_rhs), recipe)
  if recipe.occ_quantile is not None:
    a, residual = outliers.clamp_and_residual(a, recipe.occ_quantile)
  impl = _DEFAULT_IMPL.get() if impl is None else impl
  if impl not in IMPLS:
    raise ValueError(f"qdot_general: impl must be 'xla', 'auto' or 'pallas', got {impl!r}")
  if impl == "auto" and jax.default_backend() != "gpu":
    impl = "xla"  # off a GPU, "auto" is the reference path, bit for bit
  y = _qmatmul_for(recipe, out_dtype, impl)(a, w, key_data, w_ref)
  if recipe.occ_quantile is not None:
    y = (y.astype(jnp.float32) + _mm(residual.astype(jnp.float32), w.astype(jnp.float32),
                                     "bmk,bkn->bmn")).astype(out_dtype)
  return y.reshape(*bshape, *mshape, *nshape)


def qmatmul(x: jax.Array, w: jax.Array, recipe: str | recipes_lib.Recipe = "mxfp4",
            key: jax.Array | None = None, **kwargs) -> jax.Array:
  """``x @ w`` for activations ``x: (..., K)`` and a weight ``w: (K, N)``."""
  if w.ndim != 2:
    raise ValueError(f"qmatmul expects a 2D weight (K, N), got shape {w.shape}")
  return qdot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), recipe, key, **kwargs)


def qeinsum(subscripts: str, lhs: jax.Array, rhs: jax.Array,
            recipe: str | recipes_lib.Recipe = "mxfp4", key: jax.Array | None = None,
            **kwargs) -> jax.Array:
  """Two-operand ``einsum`` (explicit ``->`` output) through :func:`qdot_general`:
  letters in both inputs and the output are batch dims, letters in both inputs only are
  contracted. An ellipsis is expanded from the operand shapes."""
  if "->" not in subscripts:
    raise ValueError(f"qeinsum needs explicit output subscripts ('ij,jk->ik'), got "
                     f"{subscripts!r}")
  subscripts = subscripts.replace(" ", "")
  if "..." in subscripts:
    import opt_einsum  # a jax dependency
    ins_, out_, _ = opt_einsum.parser.parse_einsum_input((subscripts, lhs, rhs))
    subscripts = f"{ins_}->{out_}"
  ins, out = subscripts.split("->")
  try:
    ls, rs = ins.split(",")
  except ValueError:
    raise ValueError(f"qeinsum takes exactly two operands, got {subscripts!r}") from None
  if len(ls) != lhs.ndim or len(rs) != rhs.ndim:
    raise ValueError(f"qeinsum: {subscripts!r} does not match operand ranks "
                     f"{lhs.ndim} and {rhs.ndim}")
  for c in set(ls) ^ set(rs):
    if c not in out:
      raise ValueError(f"qeinsum: index {c!r} appears in one operand only and not in the "
                       "output; sum it out before calling")
  batch = [c for c in ls if c in rs and c in out]
  contract = [c for c in ls if c in rs and c not in out]
  dims = ((tuple(ls.index(c) for c in contract), tuple(rs.index(c) for c in contract)),
          (tuple(ls.index(c) for c in batch), tuple(rs.index(c) for c in batch)))
  y = qdot_general(lhs, rhs, dims, recipe, key, **kwargs)
  produced = batch + [c for c in ls if c not in rs] + [c for c in rs if c not in ls]
  return jnp.transpose(y, [produced.index(c) for c in out])

