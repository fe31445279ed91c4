"""Quantized grouped GEMM for mixture-of-experts layers: ``lax.ragged_dot`` with a recipe.

Semantics of :func:`jax.lax.ragged_dot`: ``lhs`` (M, K) holds the tokens sorted by expert,
``group_sizes`` (G,) how many rows each of the G experts takes (in order), ``rhs``
(G, K, N) the experts' weights; row block ``g`` of the output is ``lhs_g @ rhs[g]``.

Each expert's three GEMMs are quantized exactly as :func:`fp4jax.qdot_general` quantizes
a dense layer whose operands are that expert's rows and weight:

    forward:  Y_g  = Q_fl(A_g R_f) Q_fr(R_f^T W_g)                      (contract K)
    dgrad:    dA_g = Q_dg(dY_g R_d) Q_dr(W_g' R_d)^T R_f^T                (contract N)
    wgrad:    dW_g = R_f Q_wl(R_w^T A_g')^T Q_wg(R_w^T dY_g)              (contract M_g)

*Per expert* means:

* two-level scales (NVFP4's FP32 tensor scale) come from each expert's own rows and own
  weight, not from the whole grouped tensor;
* wgrad's blocks run along the tokens, and a block never straddles two experts: each
  group's rows are copied to a block-aligned offset and padded with zero rows (the
  *padded-group layout*; exact, as qdot's wgrad padding: zero rows add nothing to
  ``A^T dY`` and the Hadamard transform is orthogonal). Group ``g`` starts at
  ``sum_{h<g} ceil(s_h / c) c`` where ``c`` is the lcm of the wgrad blocks along the tokens
  and the wgrad Hadamard size; the layout holds ``ceil(M / c) c + G c`` rows.

So for deterministic recipes every quantized operand equals, bit for bit, what a loop
over experts calling ``qdot_general(lhs_g, rhs[g], ..., recipe, key)`` with the same key
quantizes; the products differ only in float32 accumulation order and in applying
two-level tensor scales to the results instead of folding them into each block scale (as
:mod:`fp4jax.qdot_fused`; the tests compare outputs and gradients with the loop's within
float32 accumulation bounds). Stochastic rounding draws its bits for the whole
grouped operand (``fold_in(key, operand)``, as qdot), reproducible and unbiased, but not
the loop's bits.

Operand scales this layout can keep per expert: token-axis operands (``fwd_lhs``,
``dgrad_grad``: one row at a time; ``wgrad_*``: chunks of ``c`` rows) take ``"block"``
scales (and ``"channel"`` for the row operands, a row being its own channel; ``"tile"`` for
the chunked ones); the expert weights take any granularity. Recipes with ``"tensor"``
scaled activations (``fp8``), non-STE estimators, asymmetric activations or outlier
compensation (``msfp4``) raise :class:`NotImplementedError` naming the reason.

Group sizes: non-negative and summing to M. Concrete sizes are checked when called (a
``ValueError``); traced ones (computed from a router under ``jit``) cannot be, so if they
are invalid the output and its gradients are NaN rather than a silently wrong product.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fp4jax import bits, blocks, dispatch, hadamard, prng, qdot, scales, tensor_amax
from fp4jax import recipes as recipes_lib
from fp4jax.quantization import dequantize, quantize
from fp4jax.spec import QuantSpec

_OP_INDEX = {op: i for i, op in enumerate(recipes_lib.OPERANDS)}  # fold_in: qdot's indices
_H_FWD, _H_DGRAD, _H_WGRAD = 6, 7, 8
_HIGHEST = lax.Precision.HIGHEST
# ((lhs_contract, rhs_contract), (lhs_batch, rhs_batch)) of wgrad's ragged contraction:
# (P, K) x (P, N) -> (G, K, N), the P rows split into the groups.
_WGRAD_DIMS = lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([0], [0]), ([], [])), lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[])

ROW_OPERANDS = ("fwd_lhs", "dgrad_grad")        # quantized one token row at a time
CHUNK_OPERANDS = ("wgrad_lhs", "wgrad_grad")    # quantized in chunks of c token rows
EXPERT_OPERANDS = ("fwd_rhs", "dgrad_rhs")      # quantized one expert weight at a time
_ROW_GRANULARITIES = ("block", "channel")
_CHUNK_GRANULARITIES = ("block", "tile")


def unsupported_reason(recipe: recipes_lib.Recipe) -> str | None:
  """Why :func:`qragged_dot` cannot quantize ``recipe`` per expert (None: it can)."""
  r = recipe
  if r.occ_quantile is not None:
    return "outlier clamping and compensation (occ_quantile)"
  if r.lhs_asymmetric:
    return "asymmetric activations"
  if r.lhs_estimator != "ste" or r.rhs_estimator != "ste":
    return f"estimators {r.lhs_estimator}/{r.rhs_estimator} (STE only)"
  for ops, allowed in ((ROW_OPERANDS, _ROW_GRANULARITIES),
                       (CHUNK_OPERANDS, _CHUNK_GRANULARITIES)):
    for op in ops:
      sp = getattr(r, op)
      if sp is not None and sp.granularity not in allowed:
        return (f"{op} has {sp.granularity!r} scales, which would span several experts' "
                f"tokens (this operand takes {' or '.join(map(repr, allowed))})")
  return None


def _key(key_data, i):
  return jax.random.fold_in(jax.random.wrap_key_data(key_data), i)


def _rht(x, axis, key_data, block, which, transpose=False):
  if block is None:
    return x
  return hadamard.rht(x, axis, _key(key_data, which), block, transpose, dtype=jnp.float32,
                      method=dispatch.device_facts().hadamard_method)


class _Operand(NamedTuple):
  """A quantized GEMM operand: its values without the tensor scale (in the GEMM's dtype),
  the two-level tensor scales (None for one-level specs): per token row / chunk / expert
  (``t``) and per group (``t_group``, (G,)), and, when asked for, the quantized numbers
  exactly as ``dequantize`` gives them (float32, ``q * (t * s)``: double quantization
  re-quantizes these)."""

  values: jax.Array
  t: jax.Array | None = None
  t_group: jax.Array | None = None
  numbers: jax.Array | None = None


def _strip_tensor_scale(q, dtype, numbers: bool = False):
  """Exact values ``q * s`` of a QArray without its tensor scale, the scale, and (if
  ``numbers``) the float32 numbers ``dequantize(q)`` itself gives (else None)."""
  full = dequantize(q, jnp.float32) if numbers else None
  t = q.tensor_scale
  if t is not None:
    q = dataclasses.replace(q, tensor_scale=None)
    t = t.reshape(())
  return dequantize(q, dtype), t, full


def _random_bits(spec: QuantSpec, key_data, op: str, shape):
  if spec.rounding != "stochastic":
    return None
  return prng.random_bits_for(_key(key_data, _OP_INDEX[op]), shape)


def _group_tensor_scales(chunks, chunk_group, num_groups: int, spec: QuantSpec):
  """Each group's FP32 tensor scale from the amax of its chunks (NaN and Inf as the spec's
  ``tensor_scale`` mode says), then each chunk's. ``chunks``: (C, ...) float32."""
  abs_bits = bits.abs_bits(bits.f32_bits(chunks))
  source = tensor_amax.amax_source(abs_bits, abs_bits, spec.tensor_scale)
  chunk_amax = jnp.max(source.reshape(source.shape[0], -1), axis=1)
  # Chunks outside every group (id G) land in an extra segment that is dropped.
  group_amax = jax.ops.segment_max(chunk_amax, chunk_group, num_segments=num_groups + 1,
                                   indices_are_sorted=True)[:num_groups]
  group_amax = tensor_amax.reduce_amax_bits(group_amax)   # global across manual shards
  t_group = scales.tensor_scale_from_amax(bits.bits_f32(group_amax), spec.element,
                                          spec.scale_format)
  return t_group, t_group[jnp.minimum(chunk_group, num_groups - 1)]


def _token_operand(x, spec: QuantSpec | None, axis: int, chunk: int, chunk_group,
                   num_groups: int, key_data, op: str, dtype, numbers: bool = False
                   ) -> _Operand:
  """Quantizes a token-major operand ``x`` (T, F) per group: along the features
  (``axis=-1``, one row at a time, ``chunk=1``) or along the tokens (``axis=0``, in
  chunks of ``chunk`` rows, each inside one group). ``chunk_group``: (T/chunk,) group id
  of each chunk (G for none). Two-level specs get their group's tensor scale, returned
  per chunk as (T/chunk,)."""
  x = x.astype(jnp.float32)
  if spec is None:
    return _Operand(x.astype(dtype), numbers=x if numbers else None)
  rbits = _random_bits(spec, key_data, op, x.shape)
  if spec.tensor_scale is None:  # every scale is per row / per chunk already
    values, _, full = _strip_tensor_scale(quantize(x, spec, axis, random_bits=rbits), dtype,
                                          numbers)
    return _Operand(values, numbers=full)
  t_rows, feat = x.shape
  xc = x.reshape(t_rows // chunk, chunk, feat)
  t_group, t_chunk = _group_tensor_scales(xc, chunk_group, num_groups, spec)
  inner_axis = 0 if axis == 0 else -1

  def one(xi, ti, ri):
    values, _, full = _strip_tensor_scale(quantize(xi, spec, inner_axis, tensor_scale=ti,
                                                   random_bits=ri), dtype, numbers)
    return values, full

  rc = None if rbits is None else rbits.reshape(xc.shape)
  values, full = jax.vmap(one, in_axes=(0, 0, None if rc is None else 0))(xc, t_chunk, rc)
  return _Operand(values.reshape(x.shape), t_chunk, t_group,
                  None if full is None else full.reshape(x.shape))


def _expert_operand(w, spec: QuantSpec | None, axis: int, key_data, op: str, dtype,
                    numbers: bool = False) -> _Operand:
  """Quantizes each expert's weight ``w[g]`` (G, K, N) along ``axis`` (-2: K, -1: N) as
  ``quantize(w[g], spec, axis)`` would; two-level tensor scales per expert, (G,)."""
  w = w.astype(jnp.float32)
  if spec is None:
    return _Operand(w.astype(dtype), numbers=w if numbers else None)
  rbits = _random_bits(spec, key_data, op, w.shape)

  def one(wg, rg):
    return _strip_tensor_scale(quantize(wg, spec, axis, random_bits=rg), dtype, numbers)

  values, t, full = jax.vmap(one, in_axes=(0, None if rbits is None else 0))(w, rbits)
  return _Operand(values, t, t, full)


class _Groups(NamedTuple):
  """Where each token row sits: its group, and the padded-group layout of wgrad."""

  sizes: jax.Array         # (G,) int32 group sizes
  row_group: jax.Array     # (M,) group id of each row (G: past the last group)
  padded_sizes: jax.Array  # (G,) sizes rounded up to the chunk
  padded_src: jax.Array    # (P,) source row of each padded row (M: a zero row)
  chunk_group: jax.Array   # (P / chunk,) group id of each padded chunk (G: none)
  bad: jax.Array           # () bool: negative sizes or a sum other than M


def _groups(group_sizes, m: int, chunk: int) -> _Groups:
  g = group_sizes.shape[0]
  sizes = group_sizes.astype(jnp.int32)
  ends = jnp.cumsum(sizes)
  row_group = jnp.searchsorted(ends, jnp.arange(m, dtype=jnp.int32), side="right")
  padded = -(-jnp.maximum(sizes, 0) // chunk) * chunk
  p = -(-m // chunk) * chunk + g * chunk   # >= sum of the padded sizes for any split of m
  pends = jnp.cumsum(padded)
  pos = jnp.arange(p, dtype=jnp.int32)
  pgroup = jnp.searchsorted(pends, pos, side="right")
  gi = jnp.minimum(pgroup, g - 1)
  local = pos - (pends[gi] - padded[gi])
  valid = (pgroup < g) & (local < sizes[gi])
  src = jnp.where(valid, ends[gi] - sizes[gi] + local, m)
  chunk_group = pgroup[::chunk]
  bad = jnp.any(sizes < 0) | (ends[-1] != m)
  return _Groups(sizes, row_group, padded, src.astype(jnp.int32), chunk_group, bad)


def _gather_rows(x, src):
  return jnp.take(x, src, axis=0, mode="fill", fill_value=0)


def _row_scale(t_rows, t_expert, row_group):
  """Per-row factor ``t_row * t_expert[group]`` (None when both are one-level)."""
  g = None if t_expert is None else t_expert[jnp.minimum(row_group, t_expert.shape[0] - 1)]
  if t_rows is None:
    return g
  return t_rows if g is None else t_rows * g


def _mul_rows(y, factor):
  return y if factor is None else y * factor[:, None]


def _ragged(a, w, sizes, dtype):
  precision = _HIGHEST if dtype == jnp.float32 else None
  return lax.ragged_dot(a, w, sizes, precision=precision, preferred_element_type=jnp.float32)


def _poison(x, bad):
  return jnp.where(bad, jnp.float32(jnp.nan), x)


class _Residual(NamedTuple):
  """What the forward saves for the backward GEMMs."""

  a_src: jax.Array      # wgrad's A: after the forward transform, or its quantized values
  w_src: jax.Array      # dgrad's W: likewise
  group_sizes: jax.Array
  key_data: jax.Array
  a_like: jax.Array     # empty arrays of A's and W's dtypes (the gradients' dtypes)
  w_like: jax.Array


def _chunk(recipe) -> int:
  r = recipe
  return math.lcm(*(blocks.required_multiple(getattr(r, op), 0) for op in CHUNK_OPERANDS),
                  r.hadamard_wgrad or 1)


@functools.lru_cache(maxsize=None)
def _qragged_for(recipe: recipes_lib.Recipe, out_dtype, gemm_dtype):
  """The custom-VJP grouped GEMM of one recipe, output dtype and GEMM operand dtype."""

  @jax.custom_vjp
  def qragged(a, w, group_sizes, key_data):
    return _fwd(a, w, group_sizes, key_data, recipe, out_dtype, gemm_dtype)[0]

  qragged.defvjp(lambda a, w, gs, kd: _fwd(a, w, gs, kd, recipe, out_dtype, gemm_dtype),
                 lambda res, g: _bwd(recipe, gemm_dtype, res, g))
  return qragged


def _fwd(a, w, group_sizes, key_data, recipe, out_dtype, gemm_dtype):
  r = recipe
  m, num_groups = a.shape[0], w.shape[0]
  grp = _groups(group_sizes, m, 1)
  a1 = _rht(a, -1, key_data, r.hadamard_fwd, _H_FWD)
  w1 = _rht(w, -2, key_data, r.hadamard_fwd, _H_FWD)
  dq = r.double_quant   # the backward GEMMs re-quantize the forward's quantized numbers
  aq = _token_operand(a1, r.fwd_lhs, -1, 1, grp.row_group, num_groups, key_data, "fwd_lhs",
                      gemm_dtype, numbers=dq)
  wq = _expert_operand(w1, r.fwd_rhs, -2, key_data, "fwd_rhs", gemm_dtype, numbers=dq)
  y = _mul_rows(_ragged(aq.values, wq.values, grp.sizes, gemm_dtype),
                _row_scale(aq.t, wq.t, grp.row_group))
  a_src, w_src = (aq.numbers, wq.numbers) if dq else (a1, w1)
  res = _Residual(a_src, w_src, group_sizes, key_data, jnp.zeros((0,), a.dtype),
                  jnp.zeros((0,), w.dtype))
  return _poison(y, grp.bad).astype(out_dtype), res


def _check_block_multiple(length, what, specs, recipe, extra=1):
  mult = math.lcm(*[blocks.required_multiple(sp, -1) for sp in specs], extra)
  if length % mult:
    raise ValueError(
        f"qragged_dot: the {what} = {length} is not a multiple of {mult}, the block size "
        f"of recipe {recipe.name!r} along it: pad the expert weights along that axis with "
        "zeros (exact for the product) or keep the experts in BF16 (fp4jax.Rule(pattern, "
        "None)). (The tokens of wgrad are laid out per expert and zero-padded automatically.)")


def _bwd(recipe, gemm_dtype, res: _Residual, g):
  r = recipe
  a_src, w_src, group_sizes, key_data = res[:4]
  m, num_groups, n = a_src.shape[0], w_src.shape[0], g.shape[-1]
  _check_block_multiple(n, "output width N (dgrad contracts it)",
                        (r.dgrad_grad, r.dgrad_rhs), r, r.hadamard_dgrad or 1)
  chunk = _chunk(r)
  grp = _groups(group_sizes, m, chunk)
  g = g.astype(jnp.float32)
  # dgrad: dA_g = dY_g W_g'^T, contracting N.
  g1 = _rht(g, -1, key_data, r.hadamard_dgrad, _H_DGRAD)
  w1 = _rht(w_src, -1, key_data, r.hadamard_dgrad, _H_DGRAD)
  gq = _token_operand(g1, r.dgrad_grad, -1, 1, grp.row_group, num_groups, key_data,
                      "dgrad_grad", gemm_dtype)
  wq = _expert_operand(w1, r.dgrad_rhs, -1, key_data, "dgrad_rhs", gemm_dtype)
  da = _mul_rows(_ragged(gq.values, jnp.swapaxes(wq.values, -1, -2), grp.sizes, gemm_dtype),
                 _row_scale(gq.t, wq.t, grp.row_group))
  # wgrad: dW_g = A_g'^T dY_g over the group's tokens, in the padded-group layout.
  xs = _rht(_gather_rows(a_src, grp.padded_src), 0, key_data, r.hadamard_wgrad, _H_WGRAD)
  ys = _rht(_gather_rows(g, grp.padded_src), 0, key_data, r.hadamard_wgrad, _H_WGRAD)
  xq = _token_operand(xs, r.wgrad_lhs, 0, chunk, grp.chunk_group, num_groups, key_data,
                      "wgrad_lhs", gemm_dtype)
  yq = _token_operand(ys, r.wgrad_grad, 0, chunk, grp.chunk_group, num_groups, key_data,
                      "wgrad_grad", gemm_dtype)
  precision = _HIGHEST if gemm_dtype == jnp.float32 else None
  dw = lax.ragged_dot_general(xq.values, yq.values, grp.padded_sizes, _WGRAD_DIMS,
                              precision=precision, preferred_element_type=jnp.float32)
  t_w = [op.t_group for op in (xq, yq) if op.t_group is not None]
  if t_w:
    dw = dw * functools.reduce(jnp.multiply, t_w)[:, None, None]
  da = _rht(da, -1, key_data, r.hadamard_fwd, _H_FWD, transpose=True)
  dw = _rht(dw, -2, key_data, r.hadamard_fwd, _H_FWD, transpose=True)
  da, dw = _poison(da, grp.bad), _poison(dw, grp.bad)
  zero_key = np.zeros(key_data.shape, dtype=jax.dtypes.float0)
  zero_sizes = np.zeros(group_sizes.shape, dtype=jax.dtypes.float0)   # integer input
  return da.astype(res.a_like.dtype), dw.astype(res.w_like.dtype), zero_sizes, zero_key


def _check_group_sizes(group_sizes, m: int, g: int):
  gs = jnp.asarray(group_sizes) if not hasattr(group_sizes, "dtype") else group_sizes
  if not jnp.issubdtype(gs.dtype, jnp.integer):
    raise TypeError(f"qragged_dot: group_sizes must be an integer array, got {gs.dtype}")
  if gs.shape != (g,):
    raise ValueError(f"qragged_dot: group_sizes must have shape ({g},), one size per expert "
                     f"of rhs (G, K, N) = {g}, got shape {gs.shape}")
  if not isinstance(gs, jax.core.Tracer):
    sizes = np.asarray(gs).astype(np.int64)   # numpy: a jnp op here could be staged
    if (sizes < 0).any():
      raise ValueError(f"qragged_dot: group_sizes must be non-negative, got {sizes.tolist()} "
                       f"(negative at experts {np.flatnonzero(sizes < 0).tolist()})")
    if int(sizes.sum()) != m:
      raise ValueError(f"qragged_dot: group_sizes sum to {int(sizes.sum())}, but lhs has "
                       f"{m} token rows; they must sum to M = {m} (put rows that belong to "
                       "no expert in a group of their own, or drop them)")
  return gs


def qragged_dot(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array,
                recipe: str | recipes_lib.Recipe = "mxfp4", key: jax.Array | None = None, *,
                preferred_element_type: Any = None, impl: str | None = None) -> jax.Array:
  """``jax.lax.ragged_dot(lhs, rhs, group_sizes)`` with every GEMM of forward and backward
  quantized per expert by ``recipe`` (module docstring).

  Args:
    lhs: (M, K) float token rows, sorted by expert.
    rhs: (G, K, N) float expert weights.
    group_sizes: (G,) integers, the rows of each expert, non-negative, summing to M.
    recipe: a recipe name or :class:`~fp4jax.recipes.Recipe` (:func:`unsupported_reason`
      says which it takes).
    key: ``jax.random`` key; required when the recipe rounds stochastically or uses a
      random Hadamard transform (one per step, ``fold_in`` per layer).
    preferred_element_type: output dtype (default: the operands' result type).
    impl: ``"xla"`` (float32 GEMMs at HIGHEST precision, the reference) or None / "auto" /
      "fused" / "pallas" (:func:`fp4jax.dispatch.choose_grouped_gemm`: BF16 GEMMs of the
      exactly representable quantized values on a GPU). The quantization is the same.

  Returns:
    (M, N): row block g is expert g's quantized product; gradients flow to ``lhs`` and
    ``rhs`` through the recipe's dgrad and wgrad GEMMs, none to ``group_sizes``.
  """
  recipe = recipes_lib.effective(recipe)
  lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
  for name, v in (("lhs", lhs), ("rhs", rhs)):
    if not jnp.issubdtype(v.dtype, jnp.floating):
      raise TypeError(f"qragged_dot: {name} must be a float array, got {v.dtype}")
  if lhs.ndim != 2 or rhs.ndim != 3:
    raise ValueError(f"qragged_dot: lhs must be (M, K) and rhs (G, K, N), got shapes "
                     f"{lhs.shape} and {rhs.shape}")
  if lhs.shape[1] != rhs.shape[1]:
    raise ValueError(f"qragged_dot: lhs (M, K) = {lhs.shape} and rhs (G, K, N) = "
                     f"{rhs.shape} disagree on K")
  if rhs.shape[0] == 0:
    raise ValueError("qragged_dot: rhs has no experts (G = 0)")
  gs = _check_group_sizes(group_sizes, lhs.shape[0], rhs.shape[0])
  out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(lhs, rhs))
  if recipe.is_identity:
    return lax.ragged_dot(lhs, rhs, gs, preferred_element_type=out_dtype)
  why = unsupported_reason(recipe)
  if why is not None:
    raise NotImplementedError(f"qragged_dot: recipe {recipe.name!r} cannot be quantized per "
                              f"expert: {why}; choose a block-scaled recipe (e.g. 'mxfp4', "
                              "'nvfp4', 'mxfp8')")
  key_data = qdot.step_key_data(key, recipe)
  if lhs.size == 0 or rhs.size == 0:
    return lax.ragged_dot(lhs, rhs, gs, preferred_element_type=out_dtype)
  _check_block_multiple(lhs.shape[1], "contraction length K",
                        (recipe.fwd_lhs, recipe.fwd_rhs), recipe, recipe.hadamard_fwd or 1)
  choice = dispatch.choose_grouped_gemm(recipe, impl)
  gemm_dtype = jnp.bfloat16 if choice.impl is dispatch.GroupedGemmImpl.BF16 else jnp.float32
  return _qragged_for(recipe, out_dtype, jnp.dtype(gemm_dtype))(lhs, rhs, gs, key_data)


__all__ = ["CHUNK_OPERANDS", "EXPERT_OPERANDS", "ROW_OPERANDS", "qragged_dot",
           "unsupported_reason"]
