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

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fp4jax import asymmetric, blocks, dispatch, encode, estimators, gemm, hadamard, outliers
from fp4jax import qdot_fused
from fp4jax.kernels import float_scale_operand as kernel_float
from fp4jax import recipes as recipes_lib
from fp4jax import reference_rounding
from fp4jax.dispatch import gemm_impl  # the user-facing policy override, re-exported here
from fp4jax.quantization import dequantize, element_scales, quantize, quantize_operand
from fp4jax.spec import QuantSpec

# Randomness: fold_in(key, i) per use. Operands take i = 0..5 (recipes.OPERANDS order), the
# three Hadamard transforms the next three.
_OP_INDEX = {op: i for i, op in enumerate(recipes_lib.OPERANDS)}
_H_FWD, _H_DGRAD, _H_WGRAD = 6, 7, 8
IMPLS = dispatch.POLICIES


def _key(key_data, i):
  return jax.random.fold_in(jax.random.wrap_key_data(key_data), i)


def _quantize_operand(x, spec: QuantSpec | None, axis: int, key_data, op: str,
                      estimator: str = "ste", params=(), asym: bool = False, reference=None,
                      impl: str = "xla"):
  """Float32 fake-quantized ``x`` (x itself when spec is None), for a non-STE estimator
  the surrogate-derivative multiplier at ``x`` (else None), and the QArray (None where
  there is none: no spec, asymmetric or reference rounding). A ``reference`` (Q-EMA)
  decides the rounding direction between x's grid neighbours. ``impl`` is a resolved
  policy of :mod:`fp4jax.dispatch`: a 2D operand (a batch of one) may take the Pallas
  kernels (:func:`fp4jax.quantization.quantize_operand`, falling back to XLA where they do
  not fit)."""
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
      q = quantize_operand(x[0], spec, axis, key, impl)
      value = dequantize(q, jnp.float32)[None]
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


def _rht(x, axis, key_data, block, which, transpose=False, spec=None):
  """The recipe's transform along ``axis`` (float32); ``spec``: the operand's, whose
  transform along its blocks may take the float-scale kernels' method in every path
  (:func:`fp4jax.kernels.float_scale_operand.transform_method`)."""
  if block is None:
    return x.astype(jnp.float32)
  method = kernel_float.transform_method(spec, axis, x.ndim, block,
                                         dispatch.device_facts().hadamard_method)
  return hadamard.rht(x, axis, _key(key_data, which), block, transpose, dtype=jnp.float32,
                      method=method)


_mm = gemm.einsum_f32


def _check_block_multiple(length, what, specs, recipe):
  mult = math.lcm(*[blocks.required_multiple(sp, -1) for sp in specs])
  if length % mult:
    raise ValueError(
        f"qdot_general: the {what} = {length} is not a multiple of {mult}, the block size "
        f"of recipe {recipe.name!r} along it: pad the operands along that axis with zeros "
        "(exact for the product) or keep this layer in BF16 (fp4jax.Rule(pattern, None)). "
        "(The token axis M of wgrad is zero-padded automatically.)")


def _backward_gemm(x, y, axis, key_data, block, which, ops, specs, eq, impl):
  """One backward GEMM: Hadamard both operands along the contraction ``axis``, quantize
  each along it with its spec, multiply in float32 (dgrad contracts the last axis of
  both, wgrad the first non-batch axis of both)."""
  if axis == -2:
    # wgrad contracts M (batch x tokens), which need not be a multiple of the block: pad
    # both operands with zero rows (exact: zero rows add nothing to A'^T dY, and a
    # Hadamard transform is orthogonal, so (H [A; 0])^T (H [dY; 0]) = A^T dY).
    m = x.shape[1]
    mult = math.lcm(*[blocks.required_multiple(sp, axis) for sp in specs], block or 1)
    if m % mult:
      pad = [(0, 0), (0, -m % mult), (0, 0)]
      x, y = jnp.pad(x, pad), jnp.pad(y, pad)
  xv, _, xq = _quantize_operand(_rht(x, axis, key_data, block, which, spec=specs[0]),
                                specs[0], axis, key_data, ops[0], impl=impl)
  yv, _, yq = _quantize_operand(_rht(y, axis, key_data, block, which, spec=specs[1]),
                                specs[1], axis, key_data, ops[1], impl=impl)
  kxq, kyq = xq, yq  # the kernels' layout: (M, K) . (K, N), both blocked along K
  if xq is not None and yq is not None and xq.ndim == 2:
    if axis == -1:   # dgrad: x (M, N) . y (K, N)^T
      kyq = yq.T
    else:            # wgrad: x (M, K)^T . y (M, N)
      kxq = xq.T
  return gemm.quantized_einsum(xv, xq, yv, yq, eq, impl, kernel_operands=(kxq, kyq))


class _Residual(NamedTuple):
  """What the forward GEMM saves for the backward ones."""

  a1: jax.Array              # A after the forward Hadamard transform (float32)
  w1: jax.Array              # W after the forward Hadamard transform (float32)
  aq: jax.Array              # fake-quantized A' (the forward GEMM's lhs values)
  wq: jax.Array              # fake-quantized W' (rhs values; Q-EMA-rounded if asked)
  a_mult: jax.Array | None   # A's surrogate-derivative multiplier (None for STE)
  w_mult: jax.Array | None   # W's surrogate-derivative multiplier (None for STE)
  key_data: jax.Array        # the step key's raw data (fold_in per operand)
  a_like: jax.Array          # empty array of A's dtype: the dtype of dA
  w_like: jax.Array          # empty array of W's dtype: the dtype of dW
  ref_zero: jax.Array | None  # zero cotangent of the Q-EMA reference (no gradient flows)


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
  y = gemm.quantized_einsum(aq, a_q, wq, w_q, "bmk,bkn->bmn", impl).astype(out_dtype)
  return y, _Residual(a1, w1, aq, wq, a_mult, w_mult, key_data,
                      a_like=jnp.zeros((0,), a.dtype), w_like=jnp.zeros((0,), w.dtype),
                      ref_zero=None if w_ref is None else jnp.zeros_like(w_ref))


def _qmatmul_bwd(recipe, impl, res: "_Residual", g):
  r = recipe
  a1, w1, aq, wq, a_mult, w_mult, key_data = res[:7]
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
  return da.astype(res.a_like.dtype), dw.astype(res.w_like.dtype), zero_key, res.ref_zero


def _check_dims(lhs, rhs, dimension_numbers):
  try:
    (lc, rc), (lb, rb) = dimension_numbers
  except (TypeError, ValueError):
    raise ValueError("dimension_numbers must be ((lhs_contracting, rhs_contracting), "
                     f"(lhs_batch, rhs_batch)), got {dimension_numbers!r}") from None
  def dims(ds, side, kind, nd):
    # As lax.dot_general: each dimension in range (negative ones counted from the end
    # here), none twice.
    out = []
    for d in tuple(ds):
      if not -nd <= int(d) < nd:
        raise ValueError(f"qdot_general: {side} {kind} dimension {d} is out of range for a "
                         f"rank-{nd} {side} (valid: 0..{nd - 1}, or -{nd}..-1)")
      out.append(int(d) % nd)
    if len(set(out)) != len(out):
      raise ValueError(f"qdot_general: {side} {kind} dimensions {tuple(ds)} repeat a "
                       "dimension")
    return tuple(out)

  lc, rc = dims(lc, "lhs", "contracting", lhs.ndim), dims(rc, "rhs", "contracting", rhs.ndim)
  lb, rb = dims(lb, "lhs", "batch", lhs.ndim), dims(rb, "rhs", "batch", rhs.ndim)
  for side, c, b in (("lhs", lc, lb), ("rhs", rc, rb)):
    if set(c) & set(b):
      raise ValueError(f"qdot_general: {side} dimensions {sorted(set(c) & set(b))} are both "
                       "contracting and batch dimensions")
  if len(lc) != len(rc) or len(lb) != len(rb):
    raise ValueError(f"dimension_numbers pair up {len(lc)}/{len(rc)} contracting and "
                     f"{len(lb)}/{len(rb)} batch dims; they must match")
  for name, a, b in (("contracting", lc, rc), ("batch", lb, rb)):
    for i, j in zip(a, b):
      if lhs.shape[i] != rhs.shape[j]:
        raise ValueError(f"qdot_general: {name} dimension sizes differ: lhs dim {i} has "
                         f"{lhs.shape[i]}, rhs dim {j} has {rhs.shape[j]}")
  return lc, rc, lb, rb


class _Canonical(NamedTuple):
  """A ``dot_general`` brought to ``(B, M, K) x (B, K, N)``, and how to undo it."""

  a: jax.Array                   # (B, M, K)
  w: jax.Array                   # (B, K, N)
  out_shape: tuple[int, ...]     # batch dims, lhs free dims, rhs free dims
  rhs_perm: tuple[int, ...]      # rhs transposition to (batch, contract, free)
  k: int                         # flattened contraction length


def _canonical(lhs, rhs, lc, rc, lb, rb) -> _Canonical:
  lf = [d for d in range(lhs.ndim) if d not in lc + lb]
  rf = [d for d in range(rhs.ndim) if d not in rc + rb]
  bshape = [lhs.shape[d] for d in lb]
  mshape = [lhs.shape[d] for d in lf]
  nshape = [rhs.shape[d] for d in rf]
  k = int(np.prod([lhs.shape[d] for d in lc], dtype=np.int64))
  bsz, m, n = (int(np.prod(s, dtype=np.int64)) for s in (bshape, mshape, nshape))
  rhs_perm = (*rb, *rc, *rf)
  a = jnp.transpose(lhs, (*lb, *lf, *lc)).reshape(bsz, m, k)
  w = jnp.transpose(rhs, rhs_perm).reshape(bsz, k, n)
  return _Canonical(a, w, (*bshape, *mshape, *nshape), rhs_perm, k)


def step_key_data(key, recipe: recipes_lib.Recipe) -> jax.Array:
  """The step key as raw uint32 data (what the custom VJP carries)."""
  if recipe.needs_key and key is None:
    raise ValueError(f"recipe {recipe.name!r} uses stochastic rounding or a random Hadamard "
                     "transform: pass key=jax.random.key(...) (one per step, fold_in per layer)")
  if key is None:
    return jnp.zeros(2, jnp.uint32)  # never read: the recipe needs no randomness
  encode.check_key(key)
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(key)
  return jnp.asarray(key, jnp.uint32)  # raw uint32 key data


def _canonical_reference(rhs_reference, rhs, canon: _Canonical):
  """The Q-EMA reference in the canonical rhs layout, with no gradient."""
  if rhs_reference is None:
    return None
  rhs_reference = jnp.asarray(rhs_reference)
  if rhs_reference.shape != rhs.shape:
    raise ValueError(f"rhs_reference must have rhs's shape {rhs.shape}, got "
                     f"{rhs_reference.shape}")
  return lax.stop_gradient(jnp.transpose(rhs_reference, canon.rhs_perm)
                           .reshape(canon.w.shape).astype(canon.w.dtype))


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
    impl: a policy of :mod:`fp4jax.dispatch`: None (the :func:`gemm_impl` context's,
      "auto" by default), "xla" (pure JAX, the reference), "auto" (on Hopper: "fused" where
      the recipe allows; on Blackwell: the fused quantize kernels and native FP4 GEMMs of
      :mod:`fp4jax.kernels`; the QArray path elsewhere; off a GPU: "xla"), "pallas" (the kernels wherever supported, in
      interpret mode off a GPU) or "fused" (every operand's quantized values emitted in
      BF16 inside XLA's fusions, :mod:`fp4jax.qdot_fused`, where the recipe allows; what
      "auto" runs on Hopper). Every path quantizes bit for bit as the reference; the GEMMs
      differ only in accumulation order (and where FP32 tensor scales are applied).

  Returns:
    ``lax.dot_general``'s output layout: batch dims, lhs free dims, rhs free dims.
  """
  recipe = recipes_lib.effective(recipe)   # fp4jax.recipe_override, if active
  lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
  for name, v in (("lhs", lhs), ("rhs", rhs)):
    if not jnp.issubdtype(v.dtype, jnp.floating):
      raise TypeError(f"qdot_general: {name} must be a float array, got {v.dtype}")
  out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(lhs, rhs))
  if recipe.is_identity:
    return lax.dot_general(lhs, rhs, dimension_numbers, preferred_element_type=out_dtype
                           if preferred_element_type is not None else None)
  canon = _canonical(lhs, rhs, *_check_dims(lhs, rhs, dimension_numbers))
  key_data = step_key_data(key, recipe)
  if lhs.size == 0 or rhs.size == 0:
    # An empty operand (e.g. a batch of no tokens) has no blocks to scale: the product is
    # empty or, for K = 0, exact zeros, as are its gradients; lax gives exactly that.
    return lax.dot_general(lhs, rhs, dimension_numbers, preferred_element_type=out_dtype)
  w_ref = _canonical_reference(rhs_reference, rhs, canon)
  _check_block_multiple(canon.k, "contraction length K", (recipe.fwd_lhs, recipe.fwd_rhs),
                        recipe)
  facts = dispatch.device_facts()
  policy = dispatch.resolve_policy(impl, facts)
  path = dispatch.choose_operand_path(recipe, policy, has_reference=w_ref is not None,
                                      n=canon.w.shape[-1], facts=facts)
  a = canon.a
  if recipe.occ_quantile is not None:
    a, residual = outliers.clamp_and_residual(a, recipe.occ_quantile)
  if path.impl is dispatch.OperandPath.FUSED:
    gemm_dtype = jnp.bfloat16 if facts.bf16_dot else jnp.float32
    kernel = dispatch.kernel_emit(dispatch.choose_operand_emitter(policy, facts), facts)
    y = qdot_fused.qmatmul_for(recipe, out_dtype, gemm_dtype, facts.keeps_subnormals,
                               kernel, hadamard_method=facts.hadamard_method)(
                                   a, canon.w, key_data)
  else:
    policy = "xla" if policy == "fused" else policy  # a layer "fused" cannot take: reference
    y = _qmatmul_for(recipe, out_dtype, policy)(a, canon.w, key_data, w_ref)
  if recipe.occ_quantile is not None:  # Microsoft's outlier compensation: + residual @ W
    y = (y.astype(jnp.float32) + _mm(residual.astype(jnp.float32),
                                     canon.w.astype(jnp.float32), "bmk,bkn->bmn")
         ).astype(out_dtype)
  return y.reshape(canon.out_shape)


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
  for name, sub in (("lhs", ls), ("rhs", rs)):
    repeated = sorted({c for c in sub if sub.count(c) > 1})
    if repeated:   # jnp.einsum takes a diagonal there; a quantized GEMM has no such operand
      diagonal = "".join(dict.fromkeys(sub))
      raise ValueError(
          f"qeinsum: {subscripts!r} repeats index {repeated[0]!r} within the {name} "
          f"({sub!r}), i.e. takes its diagonal, which a quantized GEMM cannot; take it first "
          f"(e.g. jnp.einsum('{sub}->{diagonal}', {name})) and pass the "
          "result")
  for c in sorted(set(out) - set(ls) - set(rs)):
    raise ValueError(f"qeinsum: output index {c!r} of {subscripts!r} is in neither operand")
  if len(set(out)) != len(out):
    raise ValueError(f"qeinsum: the output {out!r} of {subscripts!r} repeats an index")
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

