"""The three GEMMs of a quantized linear layer from GEMM-ready operands.

The canonical ``(B, M, K) x (B, K, N)`` product of :mod:`fp4jax.qdot`, with the same
recipe semantics (six operand specs, double quantization, random Hadamard transforms,
``fold_in`` keys), but every operand is emitted by :func:`fp4jax.operand.gemm_operand`:
its quantized values in the GEMM's input dtype, computed inside the XLA fusion that reads
the operand, with no packed codes written and read back. The GEMMs multiply those values
on BF16 tensor cores with float32 accumulation (float32 GEMMs where the backend has no
BF16 dot, XLA:CPU), and NVFP4's FP32 tensor scales multiply the float32 results.

Against the reference (:func:`fp4jax.qdot.qdot_general` with ``impl="xla"``) every operand
holds the same quantized numbers bit for bit; the products differ only in float32
accumulation order and, for two-level scales, in applying ``t`` to the result instead of
folding it into each block scale (one float32 rounding per block scale). Tests bound both.

What it saves, besides the packing round trip:

* residuals stay in the operands' own dtype (BF16 activations are not widened to float32);
* a weight quantized in 2D tiles with nearest rounding (NVFP4's 16x16) is quantized once:
  the forward's values serve dgrad (the tiles are the same whichever axis the GEMM
  contracts), as NVIDIA's recipe intends;
* the gradient ``dY`` is read by XLA for both of its quantizations (along N for dgrad,
  along the tokens for wgrad), which it may fuse into one pass.

The recipes it takes: :func:`unsupported_reason`.
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

from fp4jax import blocks, hadamard, operand, prng
from fp4jax import recipes as recipes_lib
from fp4jax.kernels import float_scale_operand as kernel_float
from fp4jax.kernels import operand as kernel_operand
from fp4jax.spec import QuantSpec

_OP_INDEX = {op: i for i, op in enumerate(recipes_lib.OPERANDS)}  # fold_in of each operand
_H_FWD, _H_DGRAD, _H_WGRAD = 6, 7, 8                                 # ... and each transform


def unsupported_reason(recipe: recipes_lib.Recipe, *, has_reference: bool = False,
                       n: int | None = None) -> str | None:
  """Why this path cannot run ``recipe`` (None: it can). ``has_reference``: a Q-EMA
  reference is given; ``n``: the output width (dgrad contracts it)."""
  r = recipe
  if has_reference:
    return "a Q-EMA reference decides the weight rounding"
  if r.lhs_estimator != "ste" or r.rhs_estimator != "ste":
    return f"estimators {r.lhs_estimator}/{r.rhs_estimator} (STE only)"
  if r.lhs_asymmetric:
    return "asymmetric activations"
  for op in recipes_lib.OPERANDS:
    why = operand.unsupported_reason(getattr(r, op))
    if why is not None:
      return f"{op}: {why}"
  if r.double_quant and any(getattr(r, op).tensor_scale is not None
                            for op in ("fwd_lhs", "fwd_rhs")):
    return "double quantization of two-level (tensor-scaled) operands"
  if n is not None:
    mult = math.lcm(*(blocks.required_multiple(getattr(r, op), -1)
                      for op in ("dgrad_grad", "dgrad_rhs")), r.hadamard_dgrad or 1)
    if n % mult:
      return f"the output width {n} is not a multiple of {mult} (dgrad's blocks)"
  return None


def reuses_forward_weight(recipe: recipes_lib.Recipe) -> bool:
  """Whether dgrad multiplies the forward's quantized weight: the same 2D-tiled spec with
  nearest rounding, no transform in between, no double quantization."""
  r = recipe
  return (r.fwd_rhs == r.dgrad_rhs and r.fwd_rhs.granularity == "tile"
          and r.fwd_rhs.rounding == "nearest" and not r.double_quant
          and r.hadamard_fwd is None and r.hadamard_dgrad is None)


def _key(key_data, i):
  return jax.random.fold_in(jax.random.wrap_key_data(key_data), i)


def _transform_with(x, axis, key_data, block, which, transpose=False, *, method):
  """The recipe's random Hadamard transform along ``axis`` (float32, exactly the
  reference's when ``method`` is the device's), or ``x`` untouched when it has none."""
  if block is None:
    return x
  return hadamard.rht(x, axis, _key(key_data, which), block, transpose, method=method,
                      dtype=jnp.float32)


@dataclasses.dataclass(frozen=True)
class KernelEmit:
  """Operands go through the Pallas operand kernel (:mod:`fp4jax.kernels.operand`: one
  read, one write) wherever it takes them, they hold at least ``min_elements`` elements
  (below that, a launch costs more than XLA's fusion) and ``choices`` does not send them
  to XLA; the rest through :func:`fp4jax.operand.gemm_operand`. :mod:`fp4jax.dispatch`
  decides whether to, and fills ``choices`` from the measured table
  (:mod:`fp4jax.kernels.operand_tuning`)."""

  interpret: bool = False      # Pallas interpret mode (CPU tests)
  min_elements: int = 1 << 20
  # The kernel's one-multiply variant (fp4jax.kernels.operand.gemm_operand): where its
  # float32 multiply was checked to keep subnormals (the table's kernel_ieee_subnormals).
  ieee_subnormals: bool = False
  # (("rows/nearest", ("pallas", OperandKernelConfig)), ("both/stochastic", ("separate",
  # None)), ...): a key missing here takes the kernel with its default tile.
  choices: tuple = ()

  def choice(self, orient: str, rounding: str) -> tuple[str, Any]:
    """``(emitter, config)`` for an orientation and rounding: ``"pallas"`` (with its
    config, None for the default), ``"xla"``, or for ``"both"`` ``"separate"``."""
    return dict(self.choices).get(f"{orient}/{rounding}", ("pallas", None))


def _orient(axis: int, ndim: int) -> str:
  return "rows" if axis in (-1, ndim - 1) else "cols"


def _kernel_config(x, spec: QuantSpec, axis: int, kernel: KernelEmit | None):
  """(True, config) where the kernel emits this operand, else (False, None)."""
  if (kernel is None or x.size < kernel.min_elements
      or kernel_operand.unsupported_reason(x.shape, x.dtype, spec, axis) is not None):
    return False, None
  emitter, config = kernel.choice(_orient(axis, x.ndim), spec.rounding)
  return emitter == "pallas", config


class _Op(NamedTuple):
  """One operand to emit: the tensor, its spec and axis, and its name in the recipe."""

  x: jax.Array
  spec: QuantSpec
  axis: int
  op: str
  kernel: KernelEmit | None
  # (block, fold_in index): a random Hadamard transform along ``axis`` still to apply to
  # ``x`` (in the float-scale kernels where they take it, else in XLA first).
  transform: tuple[int, int] | None = None


def _float_kernel_config(o: _Op, method: str) -> tuple[bool, Any]:
  """(True, config) where the float-scale kernels (:mod:`fp4jax.kernels.float_scale_operand`)
  emit this operand, transform included, else (False, None). A transform goes there only
  under the butterfly method, the one whose bits the kernels reproduce
  (:func:`fp4jax.kernels.float_scale_operand.transform_method` picks it for them)."""
  block = None if o.transform is None else o.transform[0]
  k = o.kernel
  if (k is None or o.x.size < k.min_elements or (block is not None and method != "butterfly")
      or kernel_float.unsupported_reason(o.x.shape, o.x.dtype, o.spec, o.axis, block)
      is not None):
    return False, None
  orient = kernel_float.orientation(o.axis, o.x.ndim, block)
  emitter, config = k.choice(f"float_{orient}", o.spec.rounding)
  return emitter == "pallas", config


def _layer_keys(key_data, ops: list[_Op]) -> tuple[list[Any], list[Any]]:
  """Per operand: its stochastic rounding's key as :class:`fp4jax.prng.SeedWords` (None
  when nearest) and its transform's typed key (None without one), ``fold_in(key, i)``
  with qdot's indices, from one batched ``fold_in`` and one batched draw for the whole
  layer (:func:`fp4jax.prng.derived_seeds`; the same bits as one derivation per use,
  without a pair of tiny kernels per key)."""
  rounding = [_OP_INDEX[o.op] if o.spec.rounding == "stochastic" else None for o in ops]
  transform = [None if o.transform is None else o.transform[1] for o in ops]
  wanted = sorted({i for i in rounding + transform if i is not None})
  if not wanted:
    return [None] * len(ops), [None] * len(ops)
  keys, seeds = prng.derived_seeds(jax.random.wrap_key_data(key_data), wanted)
  at = {i: j for j, i in enumerate(wanted)}
  return ([None if i is None else seeds[at[i]] for i in rounding],
          [None if i is None else keys[at[i]] for i in transform])


def _emit_all(ops: list[_Op], key_data, dtype, ieee: bool, method: str
              ) -> list[tuple[jax.Array, Any]]:
  """``(values, t)`` of each operand: through a Pallas kernel where one takes it (power-of-two
  scales: :mod:`fp4jax.kernels.operand`, one read; float scales:
  :mod:`fp4jax.kernels.float_scale_operand`'s passes), the rest through XLA's emitter
  (:mod:`fp4jax.operand`), all float-scaled ones sharing one tensor-scale and table
  computation (:func:`fp4jax.operand.block_factor_sets`)."""
  out: list[Any] = [None] * len(ops)
  staged = []   # (index, float-kernel request or None, XLA request, its block pass)
  rounding_keys, transform_keys = _layer_keys(key_data, ops)
  for i, o in enumerate(ops):
    key = rounding_keys[i]
    op_method = method if o.transform is None else kernel_float.transform_method(
        o.spec, o.axis, o.x.ndim, o.transform[0], method)
    takes, config = _float_kernel_config(o, op_method)
    if takes:
      block, which = o.transform or (None, None)
      req = kernel_float.FloatScaleRequest(o.x, o.spec, o.axis, key, transform_keys[i],
                                           block, config)
      staged.append((i, req, None, kernel_float.request_block_maxima(
          req, interpret=o.kernel.interpret)))
      continue
    x = o.x
    if o.transform is not None:
      x = hadamard.rht(x, o.axis, transform_keys[i], o.transform[0], method=op_method,
                       dtype=jnp.float32)
    takes, config = _kernel_config(x, o.spec, o.axis, o.kernel)
    if takes:
      out[i] = kernel_operand.gemm_operand(x, o.spec, o.axis, key, dtype=dtype,
                                           config=config, interpret=o.kernel.interpret,
                                           ieee_subnormals=o.kernel.ieee_subnormals), None
    else:
      req = operand.OperandRequest(x, o.spec, o.axis, key)
      staged.append((i, None, req, operand.prepare(req)))
  factor_sets = operand.block_factor_sets([
      operand.FactorRequest(p, fr.spec) if fr is not None
      else operand.FactorRequest(p.amax, xr.spec, None, p.tensor_amax)
      for _, fr, xr, p in staged])
  for (i, fr, xr, p), (factors, t) in zip(staged, factor_sets):
    if fr is not None:
      k = ops[i].kernel
      out[i] = kernel_float.request_values(fr, factors, dtype=dtype, interpret=k.interpret,
                                           ieee_subnormals=k.ieee_subnormals), t
    else:
      out[i] = operand.element_values(p, factors, xr.spec, dtype, ieee), t
  return out


def _gemm(x, y, eq: str, tx, ty):
  """float32 ``einsum`` of two GEMM-ready operands, times their tensor scales."""
  precision = lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
  out = jnp.einsum(eq, x, y, precision=precision, preferred_element_type=jnp.float32)
  for t in (tx, ty):
    if t is not None:
      out = out * t
  return out


class _Residual(NamedTuple):
  """What the forward saves for the backward GEMMs."""

  a_src: jax.Array          # wgrad's A: A' (double quantization: its quantized values)
  w_src: jax.Array          # dgrad's W: W', its quantized values, or (reused) the forward's
  w_scale: jax.Array | None  # the tensor scale of a reused forward weight
  key_data: jax.Array       # the step key's raw data (fold_in per operand)
  a_like: jax.Array         # empty array of A's dtype: the dtype of dA
  w_like: jax.Array         # empty array of W's dtype: the dtype of dW


@functools.lru_cache(maxsize=None)
def qmatmul_for(recipe: recipes_lib.Recipe, out_dtype, gemm_dtype=jnp.bfloat16,
                ieee_subnormals: bool = False, kernel: KernelEmit | None = None, *,
                hadamard_method: str):
  """The custom-VJP canonical GEMM ``(B,M,K) x (B,K,N) -> (B,M,N)`` of one recipe, with
  operands emitted as ``gemm_dtype`` (bfloat16, or float32 where BF16 dots are not
  native); ``ieee_subnormals`` as :func:`fp4jax.operand.gemm_operand`; ``kernel``: where
  the Pallas operand kernel emits (None: XLA everywhere); ``hadamard_method``: how the
  random Hadamard transforms run (:func:`fp4jax.hadamard.rht`), required because the
  reference runs the device's (:attr:`fp4jax.dispatch.DeviceFacts.hadamard_method`) and
  the two paths' operands are equal only under the same one."""
  r = recipe
  reuse = reuses_forward_weight(r)
  _transform = functools.partial(_transform_with, method=hadamard_method)

  def fwd(a, w, key_data):
    a1 = _transform(a, -1, key_data, r.hadamard_fwd, _H_FWD)
    w1 = _transform(w, -2, key_data, r.hadamard_fwd, _H_FWD)
    (av, ta), (wv, tw) = _emit_all([_Op(a1, r.fwd_lhs, -1, "fwd_lhs", kernel),
                                    _Op(w1, r.fwd_rhs, -2, "fwd_rhs", kernel)],
                                   key_data, gemm_dtype, ieee_subnormals, hadamard_method)
    y = _gemm(av, wv, "bmk,bkn->bmn", ta, tw).astype(out_dtype)
    a_src = av if r.double_quant else a1
    w_src = wv if (reuse or r.double_quant) else w1
    return y, _Residual(a_src, w_src, tw if reuse else None, key_data,
                        jnp.zeros((0,), a.dtype), jnp.zeros((0,), w.dtype))

  def bwd(res: _Residual, g):
    kd = res.key_data
    m = res.a_src.shape[1]
    mult = math.lcm(*(blocks.required_multiple(getattr(r, op), -2)
                      for op in ("wgrad_lhs", "wgrad_grad")), r.hadamard_wgrad or 1)
    # dY's two quantizations (along N for dgrad, along the tokens for wgrad) from one
    # kernel read when neither has a transform and the tokens need no padding.
    g_both = (r.hadamard_dgrad is None and r.hadamard_wgrad is None and m % mult == 0
              and _kernel_config(g, r.dgrad_grad, -1, kernel)[0]
              and _kernel_config(g, r.wgrad_grad, -2, kernel)[0])
    g_kernel = kernel
    if g_both:
      sr = "stochastic" in (r.dgrad_grad.rounding, r.wgrad_grad.rounding)
      emitter, both_config = kernel.choice("both", "stochastic" if sr else "nearest")
      g_both = emitter == "pallas"
      g_kernel = None if emitter == "xla" else kernel  # XLA's two emits measured fastest
    if g_both:
      (dgrad_key, wgrad_key), _ = _layer_keys(kd, [_Op(g, r.dgrad_grad, -1, "dgrad_grad", None),
                                                   _Op(g, r.wgrad_grad, -2, "wgrad_grad", None)])
      gv, gv2 = kernel_operand.gemm_operand_both(
          g, r.dgrad_grad, r.wgrad_grad, dgrad_key, wgrad_key, dtype=gemm_dtype, config=both_config,
          interpret=kernel.interpret, ieee_subnormals=kernel.ieee_subnormals)
      tg = tg2 = None
    # The rest emitted together (one tensor-scale and table computation for NVFP4's).
    ops = {}
    if not g_both:
      ops["dgrad_grad"] = _Op(_transform(g, -1, kd, r.hadamard_dgrad, _H_DGRAD), r.dgrad_grad,
                              -1, "dgrad_grad", g_kernel)
    if not reuse:
      ops["dgrad_rhs"] = _Op(_transform(res.w_src, -1, kd, r.hadamard_dgrad, _H_DGRAD),
                             r.dgrad_rhs, -1, "dgrad_rhs", kernel)
    # wgrad: dW' = A'^T dY, contracting the tokens M, zero-padded to whole blocks (exact,
    # as in the reference: zero rows add nothing, and a Hadamard transform is orthogonal).
    a_src, g2 = res.a_src, g
    if m % mult:
      pad = [(0, 0), (0, -m % mult), (0, 0)]
      a_src, g2 = jnp.pad(a_src, pad), jnp.pad(g2, pad)
    # The wgrad transform is left to _emit_all: the float-scale kernels apply it in place.
    wgrad_transform = None if r.hadamard_wgrad is None else (r.hadamard_wgrad, _H_WGRAD)
    ops["wgrad_lhs"] = _Op(a_src, r.wgrad_lhs, -2, "wgrad_lhs", kernel, wgrad_transform)
    if not g_both:
      ops["wgrad_grad"] = _Op(g2, r.wgrad_grad, -2, "wgrad_grad", g_kernel, wgrad_transform)
    emitted = dict(zip(ops, _emit_all(list(ops.values()), kd, gemm_dtype, ieee_subnormals,
                                      hadamard_method)))
    if not g_both:
      (gv, tg), (gv2, tg2) = emitted["dgrad_grad"], emitted["wgrad_grad"]
    # dgrad: dA' = dY W'^T, contracting N.
    wv, tw = (res.w_src, res.w_scale) if reuse else emitted["dgrad_rhs"]
    da = _gemm(gv, wv, "bmn,bkn->bmk", tg, tw)
    av, ta = emitted["wgrad_lhs"]
    dw = _gemm(av, gv2, "bmk,bmn->bkn", ta, tg2)
    da = _transform(da, -1, kd, r.hadamard_fwd, _H_FWD, transpose=True)
    dw = _transform(dw, -2, kd, r.hadamard_fwd, _H_FWD, transpose=True)
    zero_key = np.zeros(kd.shape, dtype=jax.dtypes.float0)
    return da.astype(res.a_like.dtype), dw.astype(res.w_like.dtype), zero_key

  @jax.custom_vjp
  def qmatmul(a, w, key_data):
    return fwd(a, w, key_data)[0]

  qmatmul.defvjp(fwd, bwd)
  return qmatmul


__all__ = ["KernelEmit", "qmatmul_for", "reuses_forward_weight", "unsupported_reason"]
