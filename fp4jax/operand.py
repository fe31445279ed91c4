"""GEMM-ready operands: a tensor's fake-quantized values in the GEMM's input dtype, in one
pass that XLA fuses with the tensor's producer.

On Hopper nothing needs the packed bytes of a training activation or gradient that a GEMM
consumes at once: the GEMM reads BF16 values. For E2M1 elements (MXFP4 with any E8M0
scale mode, NVFP4 with UE4M3 block scales and an optional FP32 tensor scale) every value
``q * s`` (element times block scale, *without* the tensor scale) is exact in BF16
(:func:`fp4jax.spec.bf16_exact`), so a BF16 GEMM with float32 accumulation multiplies
exactly the quantized numbers; the tensor scales multiply its float32 result.

:func:`gemm_operand` returns those values and the tensor scale, bit for bit equal to
:func:`gemm_operand_reference` (``dequantize`` of :func:`fp4jax.encode.quantize_reference`
with the tensor scale left out), with no packing, no optimization barrier between the
element math and its consumer, and a few integer operations per element:

* block maxima on ``|x|`` bit patterns and the scales from :mod:`fp4jax.scales` (the
  reference's own functions per block; UE4M3 scales and their ``(1/t)/s`` from
  per-tensor tables, :func:`fp4jax.scales.ue4m3_tables`, equal bit for bit);
* ``y = |x| * m`` with ``m = 2^-s`` (power-of-two scales) or ``m = (1/t)/s`` (float
  scales) as one float32 multiply. That is the IEEE product of the reference
  (:func:`fp4jax.bits.mul_f32`) whenever it is normal, and a product below ``2^-126``
  has code 0 in the reference under either rounding (nearest: it is far below 0.25;
  stochastic: a 32-bit random word cannot reach below ``2^-33``), so it does
  not matter whether the backend flushes it. A subnormal ``x`` (which XLA:CPU's
  denormals-are-zero would read as 0) is multiplied from its integer significand
  instead, ``((F * 2^-23) * m) * 2^-126``;
* ``y`` rounded onto the E2M1 grid in place (:func:`fp4jax.rounding.e2m1_grid_bits`),
  then the value ``v * 2^s`` or ``v * s``: a float32 product that is exact, or, for
  ``2^s`` with subnormal results on a flushing backend, from bits; with the sign and the
  NaN of a NaN block.

Per-block multipliers and scales are materialised once (an ``optimization_barrier``), so
the element fusion reads two floats per block and spends a dozen integer operations per
element; ``ieee_subnormals=True`` (XLA:GPU) drops the subnormal-input detour.

Which operands it takes: :func:`unsupported_reason`. Everything else takes the QArray path.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fp4jax import bits, blocks, decode, encode, prng, scales, tensor_amax
from fp4jax import rounding as rounding_lib
from fp4jax.spec import QuantSpec

U32 = jnp.uint32
I32 = jnp.int32
GEMM_DTYPES = (jnp.bfloat16, jnp.float32)   # what the values can be emitted as
_F32_TWO_POW_M23 = np.float32(2.0 ** -23)
_F32_TWO_POW_M126 = np.float32(2.0 ** -126)


def unsupported_reason(spec: QuantSpec | None, shape: tuple[int, ...] | None = None,
                       axis: int = -1) -> str | None:
  """Why :func:`gemm_operand` cannot emit this operand (None: it can).

  It takes E2M1 elements with E8M0-like power-of-two scales (any mode) or UE4M3 block
  scales (``scale_mode="amax"``, with or without NVFP4's FP32 tensor scale), in blocks
  along ``axis`` or tiles of the last two axes, rounded to nearest-even or
  stochastically; ``shape``, when given, must divide into whole blocks."""
  if spec is None:
    return "the operand is not quantized"
  if not rounding_lib.is_e2m1(spec.element):
    return f"element format {spec.element.name} is not E2M1"
  sfmt = spec.scale_format
  if not (sfmt.is_pow2 or scales.is_e4m3fn(sfmt)):
    return f"scale format {sfmt.name} is neither power-of-two nor UE4M3"
  if spec.granularity not in ("block", "tile"):
    return f"granularity {spec.granularity!r} (blocks or tiles only)"
  if spec.rounding not in ("nearest", "stochastic"):
    return f"rounding {spec.rounding!r}"
  if not spec.saturate:
    return "saturate=False"
  if shape is not None:
    axis = blocks.normalize_axis(axis, len(shape))
    if spec.granularity == "tile" and (len(shape) < 2 or axis not in (-1, -2)):
      return "tiles need the quantization axis among the last two"
    ext = blocks.block_extents(tuple(shape), spec, axis)
    for d, (n, e) in enumerate(zip(shape, ext)):
      if n % e:
        return f"axis {d - len(shape)} has length {n}, not a multiple of its block {e}"
  return None


def input_bits(x: jax.Array) -> jax.Array:
  """float32 bit patterns (uint32) of a bf16 / f16 / f32 array, exact."""
  if x.dtype == jnp.bfloat16:
    return jax.lax.bitcast_convert_type(x, jnp.uint16).astype(U32) << 16
  return bits.f32_bits(bits.to_f32_exact(x))


def _scaled_magnitude_bits(b: jax.Array, mult: jax.Array) -> jax.Array:
  """Bits of ``|x| * mult`` (``mult`` a positive normal float32, broadcast), exact
  wherever the product is at least ``2^-126``, for normal and subnormal ``x`` alike, on
  backends that flush subnormals or not (see the module doc)."""
  a = b & U32(bits.ABS_MASK)
  normal = bits.bits_f32(a) * mult
  # A subnormal x = F 2^-149 from its integer significand: F 2^-23 is a normal float.
  frac = (a & U32(bits.MANT_MASK)).astype(I32).astype(jnp.float32) * _F32_TWO_POW_M23
  tiny = (frac * mult) * _F32_TWO_POW_M126
  return bits.f32_bits(jnp.where((a >> 23) == 0, tiny, normal))


def _pow2_value_bits(vb: jax.Array, shift: jax.Array) -> jax.Array:
  """float32 bits of ``v * 2^shift`` for E2M1 grid values ``v`` (float32 bits ``vb``) and
  int32 exponents ``shift`` in [-127, 127], from bits (subnormal results included)."""
  e = (vb >> 23).astype(I32) + shift                # the result's biased exponent
  normal = vb + (shift << 23).astype(U32)
  # e <= 0: a subnormal result; v has one mantissa bit, so the shift (<= 2) drops nothing.
  sub = ((vb & U32(bits.MANT_MASK)) | U32(0x800000)) >> jnp.clip(1 - e, 0, 31).astype(U32)
  return jnp.where(vb == 0, U32(0), jnp.where(e >= 1, normal, sub))


def _pow2_bits(shift: jax.Array) -> jax.Array:
  """float32 bits of ``2^shift`` for int32 ``shift`` in [-149, 127] (subnormals too)."""
  return jnp.where(shift >= -126, ((shift + 127) << 23).astype(U32),
                   U32(1) << jnp.clip(shift + 149, 0, 22).astype(U32))


def emit(value_bits: jax.Array, dtype) -> jax.Array:
  """float32 bit patterns to ``dtype`` (bfloat16: the top half; every value here has
  at most 6 significant bits and is at least 2^-128, so that is exact)."""
  if jnp.dtype(dtype) == jnp.bfloat16:
    return jax.lax.bitcast_convert_type((value_bits >> 16).astype(jnp.uint16), jnp.bfloat16)
  return bits.bits_f32(value_bits)


class OperandRequest(NamedTuple):
  """One operand for :func:`gemm_operands`: :func:`gemm_operand`'s arguments."""

  x: jax.Array
  spec: QuantSpec
  axis: int = -1
  key: jax.Array | None = None
  random_bits: jax.Array | None = None
  tensor_scale: jax.Array | None = None


def gemm_operand(x: jax.Array, spec: QuantSpec, axis: int = -1, key: jax.Array | None = None,
                 *, dtype: Any = jnp.bfloat16, random_bits: jax.Array | None = None,
                 tensor_scale: jax.Array | None = None, ieee_subnormals: bool = False
                 ) -> tuple[jax.Array, jax.Array | None]:
  """The GEMM-ready values of ``x`` quantized by ``spec`` along ``axis``, and its tensor
  scale.

  Args:
    x: float32 / bfloat16 / float16 array whose blocked dimensions divide into blocks.
    spec: a spec that :func:`unsupported_reason` accepts.
    axis: the contraction axis (blocks run along it).
    key: ``jax.random`` key for stochastic rounding (bits from :mod:`fp4jax.prng`, as
      ``quantize``); or ``random_bits``, uint32 of ``x.shape``.
    dtype: ``bfloat16`` (the GEMM's input) or ``float32``.
    tensor_scale: an explicit FP32 tensor scale (two-level specs); default: from the
      tensor's amax, as ``quantize``.
    ieee_subnormals: the backend's float32 multiply keeps subnormal operands and results
      (XLA:GPU's default; :attr:`fp4jax.dispatch.DeviceFacts.keeps_subnormals`): then the
      scaling is one multiply per element, with no integer detour for subnormal ``x`` and
      results. False (XLA:CPU flushes them) is exact on every backend.

  Returns:
    ``(values, t)``: ``values`` of ``x.shape`` and ``dtype``, equal bit for bit to
    :func:`gemm_operand_reference`; ``t`` the float32 tensor scale (shape ``()``) for
    two-level specs, else None. ``values * t`` are the quantized numbers.
  """
  return gemm_operands([OperandRequest(x, spec, axis, key, random_bits, tensor_scale)],
                       dtype=dtype, ieee_subnormals=ieee_subnormals)[0]


class Prepared(NamedTuple):
  """An operand's block pass (:func:`prepare`): its bits, block maxima and random bits."""

  b: jax.Array                 # uint32 float32 bits of x
  ext: tuple[int, ...]         # block extents
  amax: jax.Array              # uint32 bits of max |x| per block
  rbits: jax.Array | None      # stochastic rounding's random bits
  tensor_amax: jax.Array | None  # uint32 bits of a "finite_amax" tensor amax, else None


def prepare(r: OperandRequest) -> Prepared:
  """The block pass of :func:`gemm_operands` for one operand (its block maxima are
  materialised for two-level specs); :func:`element_values` finishes it."""
  why = unsupported_reason(r.spec, r.x.shape, r.axis)
  if why is not None:
    raise ValueError(f"gemm_operand: unsupported operand ({why}); use "
                     "fp4jax.quantize + dequantize for it")
  spec = r.spec
  x = encode.check_input(r.x)
  axis = blocks.normalize_axis(r.axis, x.ndim)
  rbits = None
  if spec.rounding == "stochastic":
    random_bits = r.random_bits
    if random_bits is None:
      if r.key is None:
        raise ValueError("gemm_operand: stochastic rounding needs key=jax.random.key(...) "
                         "(or random_bits=)")
      random_bits = prng.random_bits_for(r.key, x.shape)
    rbits = jnp.asarray(random_bits, U32)
  b = input_bits(x)
  ext = blocks.block_extents(x.shape, spec, axis)
  amax = blocks.block_max(bits.abs_bits(b), ext)
  tensor_amax_bits = None
  if spec.tensor_scale is not None:
    # Materialised: the tensor amax is taken from these maxima (block_factor_sets).
    amax = jax.lax.optimization_barrier(amax)
    if r.tensor_scale is None and spec.tensor_scale == "finite_amax":
      source = tensor_amax.amax_source(bits.abs_bits(b), amax, spec.tensor_scale)
      tensor_amax_bits = tensor_amax.reduce_amax_bits(jnp.max(source)).astype(U32)
  return Prepared(b, ext, amax, rbits, tensor_amax_bits)


def gemm_operands(requests: Sequence[OperandRequest], *, dtype: Any = jnp.bfloat16,
                  ieee_subnormals: bool = False) -> list[tuple[jax.Array, jax.Array | None]]:
  """:func:`gemm_operand` of several operands (``(values, t)`` each, equal bit for bit to
  one call per operand), with their per-tensor scalar work done once for all: the
  two-level specs' tensor scales (one exact division) and UE4M3 tables
  (:func:`fp4jax.scales.ue4m3_tables`, two exact divisions) are batched over the
  operands that derive their tensor scale. That scalar graph is most of an NVFP4
  operand's HLO (a few hundred instructions, tiny kernels on a GPU): emitting a layer's
  operands together divides its size, compile time and launches by their number.

  Args:
    requests: the operands (:class:`OperandRequest`: ``x``, ``spec``, ``axis``, ``key``,
      ``random_bits``, ``tensor_scale`` as :func:`gemm_operand` takes them).
    dtype, ieee_subnormals: as :func:`gemm_operand`, for all of them.
  """
  _check_gemm_dtype(dtype)
  requests = [OperandRequest(*r) for r in requests]
  prepared = [prepare(r) for r in requests]
  factor_sets = block_factor_sets([
      FactorRequest(p.amax, r.spec, r.tensor_scale, p.tensor_amax)
      for r, p in zip(requests, prepared)])
  return [(element_values(p, factors, r.spec, dtype, ieee_subnormals), t)
          for r, p, (factors, t) in zip(requests, prepared, factor_sets)]


def element_values(p: Prepared, factors: "BlockFactors", spec: QuantSpec, dtype: Any,
                   ieee_subnormals: bool) -> jax.Array:
  """The element pass of :func:`gemm_operands`: the values of an operand after :func:`prepare`,
  from its block factors (:func:`block_factor_sets`), in ``dtype``."""
  expand = lambda v: None if v is None else blocks.expand(v, p.ext, p.b.shape)
  values = element_value_bits(p.b, BlockFactors(*(expand(f) for f in factors)), spec,
                              p.rbits, ieee_subnormals)
  return emit(values, dtype)


def _check_gemm_dtype(dtype) -> None:
  if jnp.dtype(dtype) not in [jnp.dtype(d) for d in GEMM_DTYPES]:
    raise ValueError(f"gemm_operand: dtype must be bfloat16 or float32, got {dtype}")


class FactorRequest(NamedTuple):
  """One operand's block maxima, to be turned into its per-block factors."""

  amax: jax.Array                         # uint32 bits of max |x| per block
  spec: QuantSpec
  tensor_scale: jax.Array | None = None   # an explicit FP32 tensor scale (two-level specs)
  # uint32 bits of the tensor amax where it is not the max of ``amax`` (a spec's
  # "finite_amax"); None: derived from ``amax`` (two-level specs without tensor_scale).
  tensor_amax: jax.Array | None = None


def block_factor_sets(requests: Sequence[FactorRequest]
                      ) -> list[tuple["BlockFactors", jax.Array | None]]:
  """``(factors, t)`` per operand from its block maxima: :class:`BlockFactors` of the
  block shape (materialised: an element pass reads two floats per block instead of
  repeating the block math per element) and the tensor scale (two-level specs, else
  None), the specs' tensor scales and UE4M3 tables batched over the operands that derive
  theirs (as :func:`gemm_operands`). The stage between a block-maxima pass and an element
  pass, so that a kernel can do either (:mod:`fp4jax.kernels.float_scale_operand`)."""
  requests = [FactorRequest(*r) for r in requests]
  ts: list[jax.Array | None] = [None] * len(requests)
  tables: list[scales.UE4M3Tables | None] = [None] * len(requests)
  groups: dict[tuple[str, str], list[int]] = {}
  tensor_amaxes: list[jax.Array | None] = [None] * len(requests)
  for i, r in enumerate(requests):
    if r.spec.tensor_scale is None:
      continue
    if r.tensor_scale is not None:  # an explicit tensor scale, materialised as quantize does
      ts[i] = encode.tensor_scale(None, r.spec, r.tensor_scale)
      continue
    amax = r.tensor_amax
    if amax is None:
      # The tensor amax from the materialised block maxima (1/16 of the bytes): left to
      # itself XLA:GPU re-reads the whole input for it (kernels/NOTES.md).
      amax = tensor_amax.reduce_amax_bits(jnp.max(r.amax)).astype(U32)
    tensor_amaxes[i] = amax
    groups.setdefault((r.spec.element.name, r.spec.scale_format.name), []).append(i)
  for members in groups.values():
    spec = requests[members[0]].spec
    amax = bits.bits_f32(jnp.stack([tensor_amaxes[i] for i in members]))
    # Materialised, as encode.tensor_scale does: otherwise XLA fuses the tensor-wide
    # reductions into every consumer of the exact-division graph.
    t = jax.lax.optimization_barrier(
        scales.tensor_scale_from_amax(amax, spec.element, spec.scale_format))
    tab = None
    if scales.is_e4m3fn(spec.scale_format):  # block_factors' table path
      tab = jax.lax.optimization_barrier(scales.ue4m3_tables(spec.element, t))
    for j, i in enumerate(members):
      ts[i] = t[j]
      tables[i] = None if tab is None else scales.tables_row(tab, j)
  return [(jax.lax.optimization_barrier(
               block_factors(r.amax, r.spec, t, derived_ts=r.tensor_scale is None, tables=tab)),
           t) for r, t, tab in zip(requests, ts, tables)]


class BlockFactors(NamedTuple):
  """What every element of a block needs (each field: per block, or broadcast to the
  elements). Power-of-two scales fill all four; float scales ``mult`` and ``scale``."""

  mult: jax.Array                  # float32 multiplier of |x|: 2^-s, or (1/t)/s
  scale: jax.Array                 # float32 block scale 2^s or s (NaN for a NaN block)
  shift: jax.Array | None = None   # power-of-two scales: int32 exponent s
  nan_block: jax.Array | None = None  # power-of-two scales: the NaN scale code


def block_factors(amax: jax.Array, spec: QuantSpec, ts: jax.Array | None, *,
                  derived_ts: bool = False, tables: scales.UE4M3Tables | None = None
                  ) -> BlockFactors:
  """:class:`BlockFactors` from block maxima (uint32 bits of ``max |x|`` per block) and
  the tensor scale ``ts`` (two-level specs; else None), with the scale functions of
  :mod:`fp4jax.scales` (power-of-two scales: the reference's, per block).

  UE4M3 scales under a tensor scale made from the tensor's amax by
  :func:`fp4jax.scales.tensor_scale_from_amax` (``derived_ts=True``: the tables are exact
  only for the scales it makes, in [2^-120, f32max/2688], NaN, +Inf; an explicit one takes
  the general path) or under none come from per-tensor tables
  (:func:`fp4jax.scales.ue4m3_tables`: no division per block, equal bit for bit); other
  float scales from :func:`fp4jax.bits.div_f32`'s exact divisions. (XLA:GPU's own float32
  ``/`` is not correctly rounded: ``kernels/NOTES.md``, "NVFP4 operands".) ``tables``:
  those tables when the caller made them (of the same ``ts``), else they are made here."""
  elem, sfmt = spec.element, spec.scale_format
  if sfmt.is_pow2:
    code = scales.pow2_scale_code(amax, elem, sfmt, spec.scale_mode)
    # E2M1 scales stay within [-127, 126] (emax = 2); 128 is the NaN code.
    shift = jnp.clip(scales.pow2_scale_exponent(code, sfmt), -127, 127)
    nan_block = scales.pow2_scale_is_nan(code, sfmt)
    mult = bits.pow2_f32(-shift)                                   # 2^-s, a normal
    # The scale 2^s as a float (subnormal for s = -127), NaN for a NaN block.
    scale = bits.bits_f32(jnp.where(nan_block, U32(bits.F32_NAN_BITS), _pow2_bits(shift)))
    return BlockFactors(mult, scale, shift, nan_block)
  if scales.is_e4m3fn(sfmt) and (ts is None or derived_ts):
    if tables is None:
      tables = scales.ue4m3_tables(elem, ts)
    scale, _, recip = scales.ue4m3_from_tables(amax, tables, sfmt, ts)
    return BlockFactors(recip, scale)
  if scales.is_e4m3fn(sfmt):
    scale, _ = scales.float_block_scale_and_code(amax, elem, sfmt, ts)
  else:
    scale = scales.float_block_scale(amax, elem, sfmt, ts)
  return BlockFactors(scales.float_scale_reciprocal(scale, ts), scale)


def element_value_bits(b: jax.Array, f: BlockFactors, spec: QuantSpec,
                       rbits: jax.Array | None, ieee_subnormals: bool) -> jax.Array:
  """float32 bits of the quantized values ``q * s`` of elements with float32 bits ``b``
  (uint32), given their block's factors ``f`` broadcast to ``b``'s shape and, for
  stochastic rounding, their random bits; ``ieee_subnormals`` as :func:`gemm_operand`."""
  sign = b & U32(bits.SIGN_MASK)
  if ieee_subnormals:
    y = bits.f32_bits(bits.bits_f32(b & U32(bits.ABS_MASK)) * f.mult)
  else:
    y = _scaled_magnitude_bits(b, f.mult)
  grid = rounding_lib.e2m1_grid_bits(y, spec.rounding, rbits)
  if ieee_subnormals or f.shift is None:
    # v * s: exact (v has two significant bits; 2^s or a UE4M3 value), and a subnormal
    # 2^-127 scale is only multiplied where subnormals are IEEE.
    v = bits.bits_f32(grid | sign) * f.scale
    return jnp.where(jnp.isnan(v), U32(bits.F32_NAN_BITS), bits.f32_bits(v))
  out = _pow2_value_bits(grid, f.shift) | sign
  return jnp.where(f.nan_block, U32(bits.F32_NAN_BITS), out)


def gemm_operand_reference(x: jax.Array, spec: QuantSpec, axis: int = -1,
                           key: jax.Array | None = None, *, dtype: Any = jnp.bfloat16,
                           random_bits: jax.Array | None = None,
                           tensor_scale: jax.Array | None = None
                           ) -> tuple[jax.Array, jax.Array | None]:
  """What :func:`gemm_operand` must equal: ``quantize_reference`` then exact decoding
  without the tensor scale (``q * s``), and the tensor scale (shape ``()``) or None."""
  q = encode.quantize_reference(x, spec, axis, key, random_bits=random_bits,
                                tensor_scale=encode.SPEC_DEFAULT if tensor_scale is None
                                else tensor_scale)
  t = q.tensor_scale
  if t is not None:
    q = dataclasses.replace(q, tensor_scale=None)
    t = t.reshape(())
  return decode.dequantize(q, dtype), t


__all__ = ["GEMM_DTYPES", "BlockFactors", "FactorRequest", "OperandRequest", "block_factor_sets",
           "block_factors", "element_values", "Prepared", "prepare",
           "element_value_bits", "emit", "input_bits", "gemm_operand", "gemm_operand_reference",
           "gemm_operands", "unsupported_reason"]
