"""GEMM-ready operands with float block scales (NVFP4's UE4M3) from Pallas passes.

The float-scale twin of :mod:`fp4jax.kernels.operand`. A two-level spec needs the
tensor's amax before any block's scale, so its operand takes two reads of the input
wherever it runs: block maxima, then values. XLA's emitter
(:func:`fp4jax.operand.gemm_operands`) does both as fusions, and with NVFP4's 16-point
random Hadamard transform along the blocks (the wgrad inputs) it first materialises the
transform in float32: a GEMM writing 4 bytes per element that the two passes then read,
16 bytes moved per element of a BF16 operand. Here:

* :func:`block_maxima` (only with a transform): per tile, the transform in registers and
  the blocks' ``max |y|`` bit patterns, ``(..., M / bs, K)`` uint32;
* the per-block factors (tensor scale, UE4M3 tables, one gather per block) from
  :func:`fp4jax.operand.block_factor_sets`, in XLA on 1/16 of the elements, batched over a
  layer's operands;
* the element pass: the tile read again (and transformed again: cheaper than storing the
  float32 transform), the block factors read, ``q * s`` written in the GEMM's dtype with
  :func:`fp4jax.operand.element_value_bits`, the XLA emitter's own element math.

That is 6 to 7 bytes per element with a transform; without one (blocks along rows, NVFP4's
forward activations and dgrad's stochastically rounded ``dY``) the block maxima stay an
XLA reduction and the element pass is this kernel's, with the Pallas operand kernel's
stochastic-rounding words (one hash per four elements, in registers).

The transform is :func:`fp4jax.hadamard.rht` with ``method="butterfly"`` bit for bit: the
block's 16 entries are 16 strided row loads of the tile (the blocks run along the
columns, so a Hadamard block is a scale block), times the signs, the butterfly in
:func:`fp4jax.hadamard.butterfly_entries`' order, times ``1/sqrt(16)``; every step is an
elementwise float32 operation in the reference's order. So the kernel equals the
reference only under the butterfly method (``fp4jax.dispatch`` sends transformed operands
here only then). Tests: ``tests/test_kernels_float_scale_operand.py``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from fp4jax import bits, blocks, hadamard, operand, prng
from fp4jax.kernels.operand import OUTPUT_DTYPES, OperandKernelConfig, tiled_operand_reason
from fp4jax.kernels.quantize import largest_dividing, round_up, tile_random_bits
from fp4jax.spec import QuantSpec

U32 = jnp.uint32
ORIENTATIONS = ("rows", "cols", "cols_hadamard")
BLOCK_SIZES = (16, 32)

# Measured defaults: kernels/NOTES.md ("Issue 18, eighth step"); a tile shrinks to divide
# the operand.
# On an H100 (16384^2 bf16) rows took 16 x 512 (0.90 ms SR, 0.82 nearest; 32 x 256: 0.93,
# 0.85), the Hadamard columns 64 x 128 (0.75 ms nearest, 0.91 SR; the best tile 0.90).
DEFAULT_CONFIG = {"rows": OperandKernelConfig(16, 512, 8),
                  "cols": OperandKernelConfig(64, 128, 4),
                  "cols_hadamard": OperandKernelConfig(64, 128, 4)}


def orientation(axis: int, ndim: int, hadamard_block: int | None) -> str:
  """The kernel's orientation name for blocks along ``axis`` (-1 rows, -2 columns) with or
  without a transform along them (the key of :data:`DEFAULT_CONFIG` and the dispatch
  table)."""
  if axis in (-1, ndim - 1):
    return "rows"
  return "cols_hadamard" if hadamard_block else "cols"


def transform_method(spec: QuantSpec, axis: int, ndim: int, block: int | None,
                     method: str) -> str:
  """The Hadamard method of a random transform of one operand along its blocks, in every
  path alike (the reference, XLA's emitter and these kernels, so that they stay equal bit
  for bit): ``"butterfly"`` where these kernels apply the transform in place (float block
  scales in blocks of 16 or 32 along the columns, one transform per scale block: NVFP4's
  wgrad inputs), whatever the device runs elsewhere; otherwise ``method`` (the device's,
  :attr:`fp4jax.dispatch.DeviceFacts.hadamard_method`). Shape-independent on purpose: an
  operand too small for the kernels takes the same method in XLA."""
  if (block is not None and spec is not None and not spec.scale_format.is_pow2
      and spec.granularity == "block" and spec.block_size in BLOCK_SIZES
      and block == spec.block_size and axis in (-2, ndim - 2)):
    return "butterfly"
  return method


def unsupported_reason(shape: tuple[int, ...], dtype: Any, spec: QuantSpec | None, axis: int,
                       hadamard_block: int | None = None) -> str | None:
  """Why the kernels cannot emit this operand (None: they can): ``axis`` -1 (rows) or -2
  (columns) of an array of rank >= 2 in bf16 / f32, a spec the XLA emitter takes with
  float block scales in blocks of 16 or 32, a tensor amax over every value (``"amax"``)
  or none, and a transform (``hadamard_block``) only along columns, one per scale block."""
  why = tiled_operand_reason(shape, dtype, spec, axis)
  if why is not None:
    return why
  if spec.scale_format.is_pow2:
    return (f"power-of-two block scales ({spec.scale_format.name}): "
            "fp4jax.kernels.operand takes them in one read")
  if spec.granularity != "block" or spec.block_size not in BLOCK_SIZES:
    return f"{spec.granularity} of {spec.block_size} (blocks of {BLOCK_SIZES})"
  if spec.tensor_scale == "finite_amax":
    return "a finite_amax tensor scale (a second reduction of the elements): the XLA emitter"
  if hadamard_block is not None:
    if axis in (-1, len(shape) - 1):
      return "a transform along the rows: the XLA emitter"
    if hadamard_block != spec.block_size:
      return (f"a {hadamard_block}-point transform over {spec.block_size}-element blocks "
              "(one transform per scale block only)")
  return None


def gemm_operand_reference(x: jax.Array, spec: QuantSpec, axis: int = -1,
                           key: jax.Array | None = None, *, dtype: Any = jnp.bfloat16,
                           hadamard_key: jax.Array | None = None,
                           hadamard_block: int | None = None
                           ) -> tuple[jax.Array, jax.Array | None]:
  """What :func:`gemm_operand` must equal: the butterfly transform
  (:func:`fp4jax.hadamard.rht`, float32) where ``hadamard_block`` is given, then
  :func:`fp4jax.operand.gemm_operand_reference` (values and tensor scale)."""
  if hadamard_block is not None:
    x = hadamard.rht(x, axis, hadamard_key, hadamard_block, method="butterfly",
                     dtype=jnp.float32)
  return operand.gemm_operand_reference(x, spec, axis, key, dtype=dtype)


def _transformed_entries(x_ref, signs_ref, bs: int) -> list[jax.Array]:
  """float32 bits of the transformed tile, entry ``r`` = rows ``r, r + bs, ...`` (position
  ``r`` of every column block): :func:`fp4jax.hadamard.rht`'s butterfly, its order."""
  g = x_ref.shape[0] // bs
  v = [bits.bits_f32(operand.input_bits(x_ref[pl.ds(r, g, stride=bs), :])) * signs_ref[r]
       for r in range(bs)]
  v = hadamard.butterfly_entries(v)
  norm = jnp.float32(1.0 / math.sqrt(bs))
  return [bits.f32_bits(c * norm) for c in v]


def _block_maxima_kernel(x_ref, signs_ref, amax_ref, *, bs):
  entries = _transformed_entries(x_ref, signs_ref, bs)
  m = bits.abs_bits(entries[0])
  for e in entries[1:]:
    m = jnp.maximum(m, bits.abs_bits(e))
  amax_ref[...] = m


def _values_kernel(x_ref, mult_ref, scale_ref, seed_ref, signs_ref, out_ref, *, spec, orient,
                   bm, bk, width, ieee, dtype, hash_per_word):
  i, j = pl.program_id(0), pl.program_id(1)
  bs = spec.block_size
  sr = spec.rounding == "stochastic"
  mult, scale = mult_ref[...], scale_ref[...]
  if orient == "cols_hadamard":
    g = bm // bs
    factors = operand.BlockFactors(mult, scale)
    for r, b in enumerate(_transformed_entries(x_ref, signs_ref, bs)):
      rb = (tile_random_bits(seed_ref[0], seed_ref[1], i, j, bm, bk, width, rows=g,
                             row_step=bs, row_offset=r) if sr else None)
      out = operand.element_value_bits(b, factors, spec, rb, ieee)
      out_ref[pl.ds(r, g, stride=bs), :] = operand.emit(out, dtype)
    return
  b = operand.input_bits(x_ref[...])
  rb = (tile_random_bits(seed_ref[0], seed_ref[1], i, j, bm, bk, width, per_word=hash_per_word)
        if sr else None)
  if orient == "rows":
    view, block_axis = (lambda v: v.reshape(bm, bk // bs, bs)), 2
  else:
    view, block_axis = (lambda v: v.reshape(bm // bs, bs, bk)), 1
  factors = operand.BlockFactors(jnp.expand_dims(mult, block_axis),
                                 jnp.expand_dims(scale, block_axis))
  out = operand.element_value_bits(view(b), factors, spec, None if rb is None else view(rb),
                                   ieee)
  out_ref[...] = operand.emit(out, dtype).reshape(bm, bk)


def _tile(m: int, k: int, orient: str, bs: int, config: OperandKernelConfig | None):
  cfg = config or DEFAULT_CONFIG[orient]
  row_floor = min(8, cfg.block_rows) if orient == "rows" else bs
  col_floor = bs if orient == "rows" else 16
  rows_cap, cols_cap = max(cfg.block_rows, row_floor), max(cfg.block_cols, col_floor)
  bm = largest_dividing(m, rows_cap, row_floor) or rows_cap
  bk = largest_dividing(k, cols_cap, col_floor) or cols_cap
  return bm, bk, cfg


def _compiler_params(interpret: bool, cfg: OperandKernelConfig) -> dict:
  if interpret:
    return {}
  from jax.experimental.pallas import triton as pltriton
  return {"compiler_params": pltriton.CompilerParams(num_warps=cfg.num_warps,
                                                     num_stages=cfg.num_stages)}


def _pad2(a, rows: int, cols: int):
  m, k = a.shape
  return jnp.pad(a, ((0, rows - m), (0, cols - k))) if (rows, cols) != (m, k) else a


@functools.partial(jax.jit, static_argnames=("bs", "bm", "bk", "interpret", "cfg"))
def _block_maxima_call(x, signs, *, bs, bm, bk, interpret, cfg):
  m, k = x.shape
  mp, kp = round_up(m, bm), round_up(k, bk)
  out = pl.pallas_call(
      functools.partial(_block_maxima_kernel, bs=bs),
      out_shape=jax.ShapeDtypeStruct((mp // bs, kp), U32), grid=(mp // bm, kp // bk),
      in_specs=[pl.BlockSpec((bm, bk), lambda i, j: (i, j)),
                pl.BlockSpec((bs,), lambda i, j: (0,))],
      out_specs=pl.BlockSpec((bm // bs, bk), lambda i, j: (i, j)), interpret=interpret,
      name="fp4jax_float_scale_block_maxima", **_compiler_params(interpret, cfg))(
          _pad2(x, mp, kp), signs)
  return out[:m // bs, :k]


@functools.partial(jax.jit, static_argnames=("spec", "orient", "bm", "bk", "ieee", "dtype",
                                             "interpret", "cfg"))
def _values_call(x, mult, scale, seed, signs, *, spec, orient, bm, bk, ieee, dtype, interpret,
                 cfg):
  m, k = x.shape
  mp, kp = round_up(m, bm), round_up(k, bk)
  bs = spec.block_size
  fm, fk = (bm, bk // bs) if orient == "rows" else (bm // bs, bk)
  factor_rows, factor_cols = (mp, kp // bs) if orient == "rows" else (mp // bs, kp)
  factor = pl.BlockSpec((fm, fk), lambda i, j: (i, j))
  kernel = functools.partial(_values_kernel, spec=spec, orient=orient, bm=bm, bk=bk, width=k,
                             ieee=ieee, dtype=dtype, hash_per_word=cfg.hash_per_word)
  out = pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((mp, kp), dtype), grid=(mp // bm, kp // bk),
      in_specs=[pl.BlockSpec((bm, bk), lambda i, j: (i, j)), factor, factor,
                pl.BlockSpec((2,), lambda i, j: (0,)),
                pl.BlockSpec((signs.shape[0],), lambda i, j: (0,))],
      out_specs=pl.BlockSpec((bm, bk), lambda i, j: (i, j)), interpret=interpret,
      name="fp4jax_float_scale_operand", **_compiler_params(interpret, cfg))(
          _pad2(x, mp, kp), _pad2(mult, factor_rows, factor_cols),
          _pad2(scale, factor_rows, factor_cols), seed, signs)
  return out[:m, :k]


class FloatScaleRequest(NamedTuple):
  """One operand for :func:`gemm_operands`."""

  x: jax.Array                          # (..., M, K) bfloat16 / float32, untransformed
  spec: QuantSpec
  axis: int = -1                        # -1: blocks along K; -2: along M
  key: jax.Array | None = None          # stochastic rounding's key
  hadamard_key: jax.Array | None = None  # the transform's signs (None: plain Hadamard)
  hadamard_block: int | None = None     # a transform along the blocks (axis -2 only)
  config: OperandKernelConfig | None = None


def _seed_words(r: FloatScaleRequest) -> jax.Array:
  if r.spec.rounding != "stochastic":
    return jnp.zeros(2, U32)
  if r.key is None:
    raise ValueError("fp4jax.kernels.float_scale_operand: stochastic rounding needs "
                     "key=jax.random.key(...)")
  return prng.seed_from_key(r.key)


def _signs(r: FloatScaleRequest) -> jax.Array:
  if r.hadamard_block is None:
    return jnp.ones((1,), jnp.float32)           # unused by the kernel
  if r.hadamard_key is None:
    return jnp.ones((r.hadamard_block,), jnp.float32)
  return hadamard.random_signs(r.hadamard_key, r.hadamard_block)


def block_maxima(x: jax.Array, spec: QuantSpec, signs: jax.Array, *, interpret: bool = False,
                 config: OperandKernelConfig | None = None) -> jax.Array:
  """uint32 bits of ``max |y|`` per column block of ``y``, the butterfly transform of ``x``
  along its columns with ``signs`` (``spec.block_size`` floats +-1), in the scale layout
  ``(..., M / bs, K)``: :func:`fp4jax.blocks.block_max` of the transform's
  :func:`fp4jax.bits.abs_bits`, bit for bit."""
  why = unsupported_reason(x.shape, x.dtype, spec, -2, spec.block_size)
  if why is not None:
    raise ValueError(f"fp4jax.kernels.float_scale_operand.block_maxima: unsupported operand "
                     f"({why})")
  bs = spec.block_size
  x2 = x.reshape(-1, x.shape[-1])
  bm, bk, cfg = _tile(*x2.shape, "cols_hadamard", bs, config)
  out = _block_maxima_call(x2, jnp.asarray(signs, jnp.float32), bs=bs, bm=bm, bk=bk,
                           interpret=interpret, cfg=cfg)
  return out.reshape(*x.shape[:-2], x.shape[-2] // bs, x.shape[-1])


def check(r: FloatScaleRequest) -> FloatScaleRequest:
  """``r`` (as a :class:`FloatScaleRequest`), or ValueError naming why the kernels cannot
  emit it."""
  r = FloatScaleRequest(*r)
  why = unsupported_reason(r.x.shape, r.x.dtype, r.spec, r.axis, r.hadamard_block)
  if why is not None:
    raise ValueError("fp4jax.kernels.float_scale_operand: unsupported operand "
                     f"({why}); fp4jax.operand.gemm_operand (XLA) takes more")
  return r


def request_block_maxima(r: FloatScaleRequest, *, interpret: bool = False) -> jax.Array:
  """The first pass of one operand: uint32 bits of its blocks' ``max |x|`` (of the
  transform with one), in the scale layout, materialised (the tensor amax reads them)."""
  r = check(r)
  if r.hadamard_block is not None:
    return block_maxima(r.x, r.spec, _signs(r), interpret=interpret, config=r.config)
  ext = blocks.block_extents(r.x.shape, r.spec, r.axis)
  return jax.lax.optimization_barrier(
      blocks.block_max(bits.abs_bits(operand.input_bits(r.x)), ext))


def request_values(r: FloatScaleRequest, factors: operand.BlockFactors, *,
                   dtype: Any = jnp.bfloat16, interpret: bool = False,
                   ieee_subnormals: bool = False) -> jax.Array:
  """The element pass of one operand from its block factors
  (:func:`fp4jax.operand.block_factor_sets` of :func:`request_block_maxima`): the values,
  ``x.shape`` in ``dtype``."""
  if jnp.dtype(dtype) not in [jnp.dtype(d) for d in OUTPUT_DTYPES]:
    raise ValueError("fp4jax.kernels.float_scale_operand: dtype must be bfloat16 or float32, "
                     f"got {dtype}")
  r = check(r)
  orient = orientation(r.axis, r.x.ndim, r.hadamard_block)
  x2 = r.x.reshape(-1, r.x.shape[-1])
  bm, bk, cfg = _tile(*x2.shape, orient, r.spec.block_size, r.config)
  flat = lambda v: v.reshape(-1, v.shape[-1])
  values = _values_call(x2, flat(factors.mult), flat(factors.scale), _seed_words(r), _signs(r),
                        spec=r.spec, orient=orient, bm=bm, bk=bk, ieee=bool(ieee_subnormals),
                        dtype=jnp.dtype(dtype), interpret=interpret, cfg=cfg)
  return values.reshape(r.x.shape)


def gemm_operands(requests: Sequence[FloatScaleRequest], *, dtype: Any = jnp.bfloat16,
                  interpret: bool = False, ieee_subnormals: bool = False
                  ) -> list[tuple[jax.Array, jax.Array | None]]:
  """``(values, t)`` per operand, each equal bit for bit to :func:`gemm_operand_reference`
  (values ``x.shape`` in ``dtype``, ``t`` the float32 tensor scale or None), the layer's
  tensor scales and UE4M3 tables made once (:func:`fp4jax.operand.block_factor_sets`):
  :func:`request_block_maxima`, the factors, :func:`request_values`.

  Args:
    requests: :class:`FloatScaleRequest` each, a spec :func:`unsupported_reason` takes.
    dtype: bfloat16 (the GEMM's input) or float32.
    interpret: Pallas interpret mode (CPU).
    ieee_subnormals: the kernel's float32 multiply keeps subnormals (one multiply per
      element: :func:`fp4jax.operand.element_value_bits`).
  """
  requests = [check(r) for r in requests]
  maxima = [request_block_maxima(r, interpret=interpret) for r in requests]
  factor_sets = operand.block_factor_sets(
      [operand.FactorRequest(a, r.spec) for a, r in zip(maxima, requests)])
  return [(request_values(r, factors, dtype=dtype, interpret=interpret,
                          ieee_subnormals=ieee_subnormals), t)
          for r, (factors, t) in zip(requests, factor_sets)]


def gemm_operand(x: jax.Array, spec: QuantSpec, axis: int = -1, key: jax.Array | None = None,
                 *, dtype: Any = jnp.bfloat16, hadamard_key: jax.Array | None = None,
                 hadamard_block: int | None = None, interpret: bool = False,
                 config: OperandKernelConfig | None = None, ieee_subnormals: bool = False
                 ) -> tuple[jax.Array, jax.Array | None]:
  """One operand of :func:`gemm_operands`: ``(values, t)``, equal bit for bit to
  :func:`gemm_operand_reference`.

  Args:
    x: (..., M, K) bfloat16 / float32; the blocked axis divides into whole blocks.
    spec: float block scales (e.g. ``get_spec("nvfp4")``); :func:`unsupported_reason`.
    axis: -1 (blocks along K) or -2 (along M, never across leading dimensions).
    key: ``jax.random`` key for stochastic rounding (the reference's bits).
    hadamard_key, hadamard_block: a random Hadamard transform of ``hadamard_block``
      points along the blocks (axis -2) with signs from ``hadamard_key``, applied in the
      kernels (the reference's ``rht(method="butterfly")``).
    dtype, interpret, ieee_subnormals: as :func:`gemm_operands`; ``config``: the tiles.
  """
  return gemm_operands([FloatScaleRequest(x, spec, axis, key, hadamard_key, hadamard_block,
                                          config)], dtype=dtype, interpret=interpret,
                       ieee_subnormals=ieee_subnormals)[0]


__all__ = ["BLOCK_SIZES", "DEFAULT_CONFIG", "ORIENTATIONS", "FloatScaleRequest", "block_maxima",
           "check", "gemm_operand", "gemm_operand_reference", "gemm_operands", "orientation",
           "request_block_maxima", "request_values", "transform_method", "unsupported_reason"]
