"""Block scales from block maxima, bit for bit as torchao's ``mx_formats``.

All inputs are ``amax`` bit patterns (int32, from :func:`fp4jax.bits.abs_bits`); a NaN
anywhere in a block makes its amax NaN, an Inf makes it Inf.

Power-of-two scales (E8M0: ``scale = 2^(code - 127)``, code 0xFF = NaN), with
``emax = floor(log2(max(element)))`` (2 for E2M1, 8 for E4M3, 15 for E5M2) and
``E``/``F`` the exponent and mantissa fields of ``amax`` as float32:

* ``floor`` (OCP MX v1.0 section 6.3): ``E - 127 - emax``
  (a subnormal amax counts as 2^-127).
* ``ceil``: ``E + (F != 0) - 127 - emax``.
* ``even``: ``floor`` of amax with its mantissa rounded to the element's ``m`` bits
  (``(bits + 2^(22-m)) & 0xFF800000``); a carry into Inf gives NaN, as in torchao.
* ``floor``/``ceil``/``even`` clamp the exponent to ``[-127, 128]``; 128 is the NaN
  code. Non-finite amax gives NaN.
* ``rceil`` (cuBLAS / NVIDIA's recipe): ``descale = amax * (1/max(element))`` in
  float32, then the E8M0 code is ``E + (F != 0)`` of ``descale`` (for a subnormal
  descale: ``F > 2^22``), unclamped; non-finite gives NaN. This is the smallest power
  of two ``s`` with ``amax / s <= max(element)``, so nothing is clipped.

Elements are then ``x * 2^-s`` (exact; see :mod:`fp4jax.rounding`).

Float scales (``scale_mode="amax"``, NVFP4 and per-tensor/channel FP8/INT), as
torchao's ``nvfp4_quantize``::

    one level:  s = cast(clamp(amax / max(element), min_normal, max))      # UE4M3 etc.
                x_scaled = x * (1 / s)
    two level:  t = amax(tensor) / (max(scale) * max(element))             # FP32
                s = cast(clamp((amax / max(element)) / t, min_normal, max))
                x_scaled = x * ((1 / t) / s)          dequant: q * (t * s)

``cast`` rounds to nearest even (FP32 scales are not rounded); ``min_normal`` is the
scale format's smallest normal (2^-6 for UE4M3), so an all-zero block gets that scale.
Two deliberate deviations from torchao, both only for degenerate tensors and both in
the direction of NVIDIA Transformer Engine, which keeps its encode scale finite:

* all-zero tensor: torchao's tensor scale is 0 and ``0/0`` makes every scale NaN;
  fp4jax uses ``t = 1``, so zeros stay zeros.
* tiny tensor (``amax < 2688 * 2^-120``, about 2e-33): ``1/t`` overflows to Inf in
  torchao, which then saturates every nonzero element to +-6 and turns zeros into NaN
  (encoded as a finite code). fp4jax clamps ``t`` from below to
  ``2^(-126 - log2(min_normal(scale)))`` (2^-120 for UE4M3) so that ``(1/t)/s`` is finite
  for every block scale; such tensors then quantize like any other.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fp4jax import bits
from fp4jax import rounding
from fp4jax.formats import ElementFormat, ScaleFormat

U32 = jnp.uint32
I32 = jnp.int32


def pow2_scale_code(amax_bits: jax.Array, element: ElementFormat, scale_format: ScaleFormat,
                    mode: str) -> jax.Array:
  """Power-of-two scale codes (uint32; E8M0 byte values) from block-amax bit patterns."""
  a = amax_bits.astype(U32)
  bias, nan = scale_format.bias, scale_format.nan_code
  if mode == "rceil":
    descale = bits.mul_f32(bits.bits_f32(a), np.float32(1.0) / np.float32(element.max_value))
    d = bits.f32_bits(descale)
    E = ((d >> 23) & 0xFF).astype(I32)
    F = d & U32(bits.MANT_MASK)
    up = jnp.where(E == 0, F > U32(0x400000), F != 0)
    code = E + up.astype(I32) - 127 + bias
    code = jnp.clip(code, 0, nan)
    return jnp.where(bits.is_finite_bits(d), code, nan).astype(U32)
  if mode == "even":
    rounded = (a + U32(1 << (22 - element.mbits))) & U32(0xFF800000)
    a = jnp.where((((a >> 23) & 0xFF) == 0xFF) & ((a & U32(bits.MANT_MASK)) != 0), a, rounded)
  E = ((a >> 23) & 0xFF).astype(I32)
  exp = E - 127 - element.emax
  if mode == "ceil":
    exp = exp + ((a & U32(bits.MANT_MASK)) != 0).astype(I32)
  elif mode not in ("floor", "even"):
    raise ValueError(f"unknown power-of-two scale mode {mode!r}")
  exp = jnp.clip(exp, scale_format.min_exp, scale_format.max_exp + 1)
  code = exp + bias
  return jnp.where(bits.is_finite_bits(a), code, nan).astype(U32)


def pow2_scale_exponent(code: jax.Array, scale_format: ScaleFormat) -> jax.Array:
  """The int32 exponent ``s`` of a power-of-two scale code (scale = 2^s)."""
  return code.astype(I32) - scale_format.bias


def pow2_scale_is_nan(code: jax.Array, scale_format: ScaleFormat) -> jax.Array:
  return code.astype(U32) == U32(scale_format.nan_code)


def tensor_scale_from_amax(amax: jax.Array, element: ElementFormat,
                           scale_format: ScaleFormat) -> jax.Array:
  """NVFP4's FP32 tensor scale ``amax / (max(scale) * max(element))`` (1 for amax = 0)."""
  amax = jnp.asarray(amax, jnp.float32)
  denom = np.float32(scale_format.max_value * element.max_value)
  t = bits.div_f32(amax, denom)
  # Smallest t with (1/t)/s finite for every block scale s >= min_normal (see module doc).
  t_min = 2.0 ** (-126 - math.floor(math.log2(scale_format.min_normal)))
  t_min_bits = bits.abs_bits(bits.f32_bits(np.float32(t_min)))
  tb = bits.abs_bits(bits.f32_bits(t))
  t = jnp.where(tb < t_min_bits, jnp.float32(t_min), t)  # NaN bit patterns sort above
  return jnp.where(bits.abs_bits(bits.f32_bits(amax)) == 0, jnp.float32(1.0), t)


def round_to_scale_format(s: jax.Array, scale_format: ScaleFormat) -> jax.Array:
  """Clamps a positive float32 scale to the format's [min_normal, max] and rounds to it.

  Returns float32 values (exactly representable in the scale format). NaN stays NaN.
  """
  lo, hi = np.float32(scale_format.min_normal), np.float32(scale_format.max_value)
  # Clamp on bit patterns (positive floats order as integers), so a subnormal s is
  # seen as itself, not as zero, on backends that flush subnormals.
  sb = bits.abs_bits(bits.f32_bits(s))
  lo_b = bits.abs_bits(bits.f32_bits(lo))
  hi_b = bits.abs_bits(bits.f32_bits(hi))
  nan = sb > bits.F32_INF_BITS
  sb = jnp.where(nan, sb, jnp.clip(sb, lo_b, hi_b))
  s = bits.bits_f32(sb.astype(U32))
  if scale_format.element is None:
    return s
  return rounding.round_to_format(s, scale_format.element, "nearest")


def float_block_scale(amax_bits: jax.Array, element: ElementFormat, scale_format: ScaleFormat,
                      tensor_scale: jax.Array | None = None) -> jax.Array:
  """The float32 value of each block's stored scale (see module doc)."""
  amax = bits.bits_f32(amax_bits.astype(U32))
  block = bits.div_f32(amax, np.float32(element.max_value))
  if tensor_scale is not None:
    block = bits.div_f32(block, tensor_scale)
  return round_to_scale_format(block, scale_format)


def float_scale_reciprocal(scale: jax.Array, tensor_scale: jax.Array | None = None,
                           tensor_scale_reciprocal: jax.Array | None = None) -> jax.Array:
  """``1/s`` (one level) or ``(1/t)/s`` (two level), as torchao multiplies.

  ``tensor_scale_reciprocal``: ``1/t`` when the caller already has it (kernels compute
  it once per tensor, outside the per-block code)."""
  one = np.float32(1.0)
  if tensor_scale is None:
    return bits.div_f32(one, scale)
  if tensor_scale_reciprocal is None:
    tensor_scale_reciprocal = bits.div_f32(one, tensor_scale)
  return bits.div_f32(tensor_scale_reciprocal, scale)


def e4m3_round_normal_bits(b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(value, code)`` of the E4M3 nearest (ties to even) to positive float32 bits ``b``
  in E4M3's normal range [2^-6, 448]: the 23-bit mantissa field is rounded to 3 bits by an
  integer add, the carry running into the exponent."""
  b = b.astype(U32)
  rounded = (b + U32(0x7FFFF) + ((b >> 20) & U32(1))) >> 20
  return bits.bits_f32(rounded << 20), rounded - U32((127 - 7) << 3)


def is_e4m3fn(scale_format: ScaleFormat) -> bool:
  e = scale_format.element
  return e is not None and (e.ebits, e.mbits, e.bias, e.special) == (4, 3, 7, "fn")


def float_block_scale_and_code(amax_bits: jax.Array, element: ElementFormat,
                               scale_format: ScaleFormat,
                               tensor_scale: jax.Array | None = None
                               ) -> tuple[jax.Array, jax.Array]:
  """``(float_block_scale(...), its code in the scale format)``, uint32 codes.

  For E4M3 scales (NVFP4's UE4M3) the clamped scale is a positive normal, so its code is
  a round of the float32 mantissa field to 3 bits by an integer add (nearest-even, the
  carry running into the exponent) and its value is the code's bits moved back: a few
  operations per block instead of the general :func:`fp4jax.rounding.encode` twice and
  :func:`fp4jax.rounding.decode_to_f32` (what the kernels spend per block). Other formats
  take the general path. Equal to the general path bit for bit (tested).
  """
  if not is_e4m3fn(scale_format):
    s = float_block_scale(amax_bits, element, scale_format, tensor_scale)
    code = rounding.encode(bits.split_f32(bits.f32_bits(s)), scale_format.element)
    return s, code
  amax = bits.bits_f32(amax_bits.astype(U32))
  block = bits.div_f32(amax, np.float32(element.max_value))
  if tensor_scale is not None:
    block = bits.div_f32(block, tensor_scale)
  lo = bits.abs_bits(bits.f32_bits(np.float32(scale_format.min_normal)))
  hi = bits.abs_bits(bits.f32_bits(np.float32(scale_format.max_value)))
  sb = bits.abs_bits(bits.f32_bits(block))
  nan = sb > bits.F32_INF_BITS
  sb = jnp.clip(sb, lo, hi).astype(U32)  # a normal in [2^-6, 448]: E4M3 normal, no overflow
  s, code = e4m3_round_normal_bits(sb)
  code = jnp.where(nan, U32(scale_format.element.nan_code), code)
  s = jnp.where(nan, bits.bits_f32(np.uint32(bits.F32_NAN_BITS)), s)
  return s, code


# ------------------------------------------------- UE4M3 block scales from per-tensor tables
#
# The code of a UE4M3 block scale, E4M3(clip(((amax / emax) / t))), is a non-decreasing
# step function of the block's amax (each of its steps is monotone), with at most 127
# steps. So instead of two exact software divisions per block, the thresholds where the
# code steps up are found once per tensor (118 of them, with exact divisions), and a
# block's code is an approximate code corrected by comparing its amax with the two
# thresholds around it; ``(1/t)/s`` is a 128-entry table over the codes. Bit for bit the
# reference's (tested over amaxes at and around every threshold, many t).

_E4M3_VALUE_BIAS = (127 - 7) << 3   # float32 bits of an E4M3 normal value: (code + this) << 20
_E4M3_MIN_CODE, _E4M3_MAX_CODE = 8, 126  # 2^-6 and 448: the clipped scale's range
_THRESHOLD_WINDOW = 3  # ulps each side of an approximate threshold (2 suffice; see below)


def _e4m3_normal_value(code: jax.Array) -> jax.Array:
  """float32 value of E4M3 normal codes (uint32, 8..126): their bits moved into place."""
  return bits.bits_f32((code + U32(_E4M3_VALUE_BIAS)) << 20)


def _e4m3_round_up_bounds() -> np.ndarray:
  """uint32 float32 bits ``B[c]``, c = 9..126: the smallest float32 whose E4M3 rounding
  (:func:`e4m3_round_normal_bits`) is code ``c`` or above (a constant)."""
  out = []
  for c in range(_E4M3_MIN_CODE + 1, _E4M3_MAX_CODE + 1):
    r = c + _E4M3_VALUE_BIAS
    b = ((r - 1) << 20) + 0x80000            # the midpoint between codes c - 1 and c
    rounded = (b + 0x7FFFF + ((b >> 20) & 1)) >> 20
    out.append(b if rounded >= r else b + 1)  # the tie goes to the even code
  return np.asarray(out, np.uint32)


_E4M3_BOUNDS = _e4m3_round_up_bounds()


def _window(approx: jax.Array) -> jax.Array:
  """uint32 float32 bits ``approx + d`` for ``d`` in ``+-_THRESHOLD_WINDOW`` ulps, clamped
  to [0, Inf], along a new last axis."""
  d = jnp.arange(-_THRESHOLD_WINDOW, _THRESHOLD_WINDOW + 1, dtype=jnp.int32)
  return jnp.clip(approx.astype(jnp.int32)[..., None] + d, 0, bits.F32_INF_BITS).astype(U32)


def _first_passing(cand: jax.Array, ok: jax.Array) -> jax.Array:
  """The smallest candidate (last axis, increasing) that passes ``ok``, a monotone
  predicate: the least float32 in the window with the property (see :func:`_window`)."""
  return jnp.min(jnp.where(ok, cand, U32(bits.F32_INF_BITS)), axis=-1)


class UE4M3Tables(NamedTuple):
  """Per-tensor tables of :func:`ue4m3_tables` (indexed by the E4M3 code, 0..127)."""

  thresholds: jax.Array  # uint32 amax bits: the smallest amax whose code is >= c
  recips: jax.Array      # float32 (1/t)/s(c), or 1/s(c) for one-level scales
  inv_divisor: jax.Array  # float32 ~1/(emax t): the approximate code's multiplier


def ue4m3_tables(element: ElementFormat, tensor_scale: jax.Array | None) -> UE4M3Tables:
  """The tables that give :func:`float_block_scale_and_code` for UE4M3 (E4M3, clamped to
  [2^-6, 448]) block scales without per-block divisions (:func:`ue4m3_from_tables`).

  ``tensor_scale``: NVFP4's FP32 ``t`` as :func:`tensor_scale_from_amax` makes it (a
  positive normal, or NaN / +Inf for a tensor holding NaN / Inf, which
  :func:`ue4m3_from_tables` handles apart), of any shape (the tables then have that
  shape's leading axes: one table per tensor, :func:`tables_row` picks one), or None (one
  level: ``amax / emax``).

  Why each threshold is within the window: with ``q(A) = fl(fl(A/e)/t)``, code ``>= c``
  iff ``q(A) >= B[c]`` (the code's rounding bound, clipping cannot cross it), iff
  ``fl(A/e) >= Y`` with ``Y`` the least float32 with ``fl(Y/t) >= B[c]``, the float32
  ceiling of ``B[c]^- t`` (``B[c]^-`` the real lower end of ``B[c]``'s rounding interval,
  ``B[c] (1 - 2^-24)`` or above): within two ulps of ``fl(B[c] t)``; then likewise
  ``A >= T`` with ``T`` within two ulps of ``fl(e Y)``. Products stay normal and finite
  for ``t`` in [2^-120, f32max / 2688]."""
  if element.max_value != 6.0:
    raise ValueError(f"ue4m3_tables: element must be E2M1 (max 6), got {element.name}; "
                     "other elements take float_block_scale_and_code")
  emax = np.float32(element.max_value)
  bounds = jnp.asarray(_E4M3_BOUNDS)                  # (118,)
  nb = _E4M3_BOUNDS.size * (2 * _THRESHOLD_WINDOW + 1)  # candidates per search
  one = np.float32(1.0)
  codes = jnp.clip(jnp.arange(128, dtype=U32), _E4M3_MIN_CODE, _E4M3_MAX_CODE)
  values = _e4m3_normal_value(codes)
  if tensor_scale is None:
    cand = _window(bits.f32_bits(bits.bits_f32(bounds) * emax))
    ok = bits.f32_bits(bits.div_f32(bits.bits_f32(cand), emax)) >= bounds[:, None]
    thresholds = _first_passing(cand, ok)
    recips = bits.div_f32(one, values)
    inv = jnp.asarray(np.float32(1.0 / element.max_value))
  else:
    # Batched over t's shape, and each stage's divisions in one exact division of
    # concatenated operands: the graph's size (compile time, small kernels) does not grow
    # with the number of tensors batched together (fp4jax.operand.gemm_operands).
    t = jnp.asarray(tensor_scale, jnp.float32)
    lead = t.shape
    tt = t[..., None]
    cand = _window(bits.f32_bits(bits.bits_f32(bounds) * tt))        # lead + (118, w)
    q = bits.div_f32(jnp.concatenate([bits.bits_f32(cand).reshape(lead + (nb,)),
                                      jnp.ones(lead + (1,), jnp.float32)], -1), tt)
    y = _first_passing(cand, bits.f32_bits(q[..., :nb]).reshape(cand.shape)
                       >= bounds[:, None])                            # lead + (118,)
    inv_t = q[..., nb:]                                               # 1/t, lead + (1,)
    cand = _window(bits.f32_bits(bits.bits_f32(y) * emax))
    q = bits.div_f32(
        jnp.concatenate([bits.bits_f32(cand).reshape(lead + (nb,)),
                         jnp.broadcast_to(inv_t, lead + (128,))], -1),
        jnp.concatenate([jnp.full(lead + (nb,), emax), jnp.broadcast_to(values, lead + (128,))],
                        -1))
    thresholds = _first_passing(cand, bits.f32_bits(q[..., :nb]).reshape(cand.shape)
                                >= y[..., None])
    recips = q[..., nb:]                                              # (1/t)/s(c)
    inv = one / (emax * t)
  # Codes 0..8: any amax (the clip's floor); code 127 (NaN) never by threshold.
  lead = thresholds.shape[:-1]
  thresholds = jnp.concatenate([jnp.zeros(lead + (_E4M3_MIN_CODE + 1,), U32), thresholds,
                                jnp.full(lead + (1,), bits.F32_INF_BITS + 1, U32)], -1)
  return UE4M3Tables(thresholds, recips, jnp.asarray(inv, jnp.float32))


def tables_row(tables: UE4M3Tables, index) -> UE4M3Tables:
  """The tables of one tensor out of a batch of :func:`ue4m3_tables`."""
  return UE4M3Tables(*(v[index] for v in tables))


def ue4m3_from_tables(amax_bits: jax.Array, tables: UE4M3Tables, scale_format: ScaleFormat,
                      tensor_scale: jax.Array | None = None
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(scale, code, recip)`` per block, bit for bit :func:`float_block_scale_and_code`'s
  ``(scale, code)`` and :func:`float_scale_reciprocal`'s ``(1/t)/s``, from block maxima
  and :func:`ue4m3_tables` (of the same ``tensor_scale``): an approximate code from one
  multiply (within one code of the true one), corrected by the two thresholds around it."""
  if not is_e4m3fn(scale_format):
    raise ValueError(f"ue4m3_from_tables: scale_format must be UE4M3 (E4M3 'fn'), got "
                     f"{scale_format.name}; other scale formats take float_block_scale_and_code")
  a = amax_bits.astype(U32) & U32(bits.ABS_MASK)  # magnitudes, as the reference reads them
  nan = a > U32(bits.F32_INF_BITS)
  q = bits.bits_f32(jnp.minimum(a, U32(bits.F32_INF_BITS))) * tables.inv_divisor
  lo = bits.abs_bits(bits.f32_bits(np.float32(scale_format.min_normal)))
  hi = bits.abs_bits(bits.f32_bits(np.float32(scale_format.max_value)))
  _, c0 = e4m3_round_normal_bits(jnp.clip(bits.f32_bits(q), lo, hi).astype(U32))
  c0 = c0.astype(I32)
  code = (c0 - (a < tables.thresholds[c0]).astype(I32)
          + (a >= tables.thresholds[c0 + 1]).astype(I32))
  recip = tables.recips[code]
  code = code.astype(U32)
  if tensor_scale is not None:
    # A tensor holding NaN has t = NaN (every scale NaN); one holding Inf has t = +Inf:
    # (amax/6)/Inf = 0 clips to the smallest scale, Inf/Inf is NaN, (1/Inf)/s = 0.
    tb = bits.abs_bits(bits.f32_bits(jnp.asarray(tensor_scale, jnp.float32)))
    t_inf, t_nan = tb == U32(bits.F32_INF_BITS), tb > U32(bits.F32_INF_BITS)
    nan = nan | t_nan | (t_inf & (a == U32(bits.F32_INF_BITS)))
    code = jnp.where(t_inf, U32(_E4M3_MIN_CODE), code)
    recip = jnp.where(t_inf, jnp.float32(0.0), recip)
  scale = _e4m3_normal_value(code)
  code = jnp.where(nan, U32(scale_format.element.nan_code), code)
  f32_nan = bits.bits_f32(np.uint32(bits.F32_NAN_BITS))
  return jnp.where(nan, f32_nan, scale), code, jnp.where(nan, f32_nan, recip)


def encode_float_scale(scale: jax.Array, scale_format: ScaleFormat) -> jax.Array:
  """Stores float32 scale values in the scale format's storage dtype (exact)."""
  dt = scale_format.storage_dtype
  if dt == jnp.float32:
    return scale
  if dt == jnp.bfloat16:
    return jax.lax.bitcast_convert_type((bits.f32_bits(scale) >> 16).astype(jnp.uint16),
                                        jnp.bfloat16)
  codes = rounding.encode(bits.split_f32(bits.f32_bits(scale)), scale_format.element)
  codes = codes.astype(jnp.uint8 if scale_format.element.bits <= 8 else jnp.uint16)
  if dt == jnp.float8_e4m3fn:
    return jax.lax.bitcast_convert_type(codes, jnp.float8_e4m3fn)
  return codes


def decode_float_scale(stored: jax.Array, scale_format: ScaleFormat) -> jax.Array:
  """Float32 values of stored float scales (exact, without relying on dtype casts)."""
  if stored.dtype == jnp.float32:
    return stored
  if stored.dtype == jnp.bfloat16:
    return bits.to_f32_exact(stored)
  if stored.dtype == jnp.float8_e4m3fn:
    stored = jax.lax.bitcast_convert_type(stored, jnp.uint8)
  return rounding.decode_to_f32(stored, scale_format.element)


def store_pow2_scale(code: jax.Array, scale_format: ScaleFormat) -> jax.Array:
  code = code.astype(jnp.uint8)
  if scale_format.storage_dtype == jnp.float8_e8m0fnu:
    return jax.lax.bitcast_convert_type(code, jnp.float8_e8m0fnu)
  return code


def load_pow2_scale(stored: jax.Array) -> jax.Array:
  if stored.dtype == jnp.float8_e8m0fnu:
    stored = jax.lax.bitcast_convert_type(stored, jnp.uint8)
  return stored.astype(U32)
