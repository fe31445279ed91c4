"""Rounding float32 values onto an element format's grid, and decoding codes back.

A finite value ``M * 2^k`` (integer significand ``M < 2^24``, from the float bits; see
:mod:`fp4jax.bits`) is rounded onto the grid of :class:`~fp4jax.formats.ElementFormat`
``ExMy`` as follows, entirely in integers:

* ``e = floor(log2(M * 2^k)) = bit_length(M) - 1 + k``
* the grid step there is ``2^t`` with ``t = max(e, emin) - m`` (subnormals share ``emin``)
* ``q = round(M / 2^(t - k))`` with the chosen rounding (nearest-even, toward zero or
  stochastic), and the sign-magnitude code is ``((t - emin + m) << m) + q``. Float
  codes are monotone in the value, so a rounding carry into the next binade, and the
  comparison with the largest code, need no special case.

Overflow (``code > max_code``) saturates to the largest finite value (OCP MX v1.0
section 6.3 and torchao's casts). With ``saturate=False`` it becomes Inf for formats
that have it (E5M2), NaN for E4M3FN, and still saturates for formats with neither.

Special inputs: NaN encodes to the format's NaN code if it has one, else to +0
(fp4jax's MX scales make every element of a block with a NaN or Inf NaN through the
scale, as the spec says, so the element code is never read as a value). Inf saturates
(or becomes Inf/NaN when ``saturate=False``).

A scale that is a power of two, ``2^s``, is applied by passing ``k - s``: no float
multiply takes place, so quantization is exact on backends that flush subnormals.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fp4jax import bits
from fp4jax.formats import ElementFormat

U32 = jnp.uint32
I32 = jnp.int32

ROUNDING_MODES = ("nearest", "stochastic", "toward_zero")
_ALIASES = {"rne": "nearest", "nearest_even": "nearest", "sr": "stochastic",
            "rtz": "toward_zero", "truncate": "toward_zero"}


def canonical_rounding(rounding: str) -> str:
  """Validates a rounding name (aliases: rne, sr, rtz) and returns its canonical form."""
  if not isinstance(rounding, str):
    raise TypeError(f"rounding must be a string, got {type(rounding).__name__}")
  r = _ALIASES.get(rounding.lower(), rounding.lower())
  if r not in ROUNDING_MODES:
    raise ValueError(f"unknown rounding {rounding!r}; valid: {ROUNDING_MODES} "
                     f"(aliases {sorted(_ALIASES)})")
  return r


def encode(sp: bits.Split, fmt: ElementFormat, rounding: str = "nearest",
           random_bits: jax.Array | None = None, saturate: bool = True,
           exp_shift: jax.Array | int = 0) -> jax.Array:
  """Rounds ``sp`` (a split float32, times ``2^-exp_shift``) to ``fmt`` and returns codes.

  Args:
    sp: the values, from :func:`fp4jax.bits.split_f32`.
    fmt: the element format.
    rounding: ``"nearest"`` (ties to even), ``"toward_zero"`` or ``"stochastic"``.
    random_bits: uint32 array broadcastable to the values; needed for stochastic.
    saturate: clamp overflow to the largest finite value (see module doc).
    exp_shift: int32 power-of-two scale exponent ``s``; the value encoded is ``x / 2^s``.

  Returns:
    uint32 codes: sign-magnitude for float formats, two's complement (``bits`` wide)
    for integer formats.
  """
  m, emin = fmt.mbits, fmt.emin
  M = sp.M.astype(U32)
  k = sp.k - jnp.asarray(exp_shift, I32)
  e = bits.bit_length(M) - 1 + k
  t = jnp.maximum(e, emin) - m
  s = t - k  # >= -m: a left shift only for values with fewer bits than the format
  q = jnp.where(s >= 0, bits.round_shift_right(M, jnp.maximum(s, 0), rounding, random_bits),
                bits.shl(M, -s))
  over = e > fmt.emax  # at least 2^(emax+1) > max: saturate without forming the code
  t_rel = jnp.clip(t - (emin - m), 0, 255).astype(U32)
  mag = (t_rel << m) + q
  overflow = over | (mag > U32(fmt.max_code)) | sp.is_inf
  if saturate or fmt.special == "none":
    over_code = U32(fmt.max_code)
  elif fmt.special == "ieee":
    over_code = U32(fmt.inf_code)
  else:
    over_code = U32(fmt.nan_code)
  mag = jnp.where(overflow, over_code, mag)
  mag = jnp.where(M == 0, U32(0), mag)
  mag = jnp.where(sp.is_inf, over_code, mag)
  nan_code = U32(fmt.nan_code if fmt.nan_code is not None else 0)
  sign = jnp.where(sp.is_nan, U32(0), sp.sign.astype(U32))
  mag = jnp.where(sp.is_nan, nan_code, mag)
  if fmt.is_int:
    mask = U32((1 << fmt.bits) - 1)
    return jnp.where(sign == 1, (U32(0) - mag) & mask, mag)
  return (sign << (fmt.ebits + fmt.mbits)) | mag


class Decoded(NamedTuple):
  """Codes as ``(-1)^sign * q * 2^t`` plus special flags."""

  sign: jax.Array
  q: jax.Array
  t: jax.Array
  is_nan: jax.Array
  is_inf: jax.Array


def decode(codes: jax.Array, fmt: ElementFormat) -> Decoded:
  """Splits element codes into sign, integer significand and exponent (exact)."""
  c = codes.astype(U32) & U32((1 << fmt.bits) - 1)
  m = fmt.mbits
  if fmt.is_int:
    sign = (c >> (fmt.bits - 1)) & 1
    q = jnp.where(sign == 1, (U32(1) << fmt.bits) - c, c)
    false = jnp.zeros(c.shape, bool)
    return Decoded(sign, q, jnp.full(c.shape, fmt.emin - m, I32), false, false)
  sign = c >> (fmt.ebits + m)
  mag = c & U32(fmt.sign_bit - 1)
  E = (mag >> m).astype(I32)
  F = mag & U32((1 << m) - 1)
  q = jnp.where(E == 0, F, F + U32(1 << m))
  t = jnp.maximum(E, 1) - fmt.bias - m
  top = E == (1 << fmt.ebits) - 1
  if fmt.special == "fn":
    is_nan, is_inf = mag == U32(fmt.nan_code), jnp.zeros(c.shape, bool)
  elif fmt.special == "ieee":
    is_nan, is_inf = top & (F != 0), top & (F == 0)
  else:
    is_nan = is_inf = jnp.zeros(c.shape, bool)
  return Decoded(sign, q, t, is_nan, is_inf)


def decode_to_f32(codes: jax.Array, fmt: ElementFormat,
                  exp_shift: jax.Array | int = 0) -> jax.Array:
  """Element codes to float32 values times ``2^exp_shift`` (exact, also for subnormals)."""
  d = decode(codes, fmt)
  out = bits.compose_f32(d.sign, d.q, d.t + jnp.asarray(exp_shift, I32))
  out = jnp.where(d.is_inf, jnp.where(d.sign == 1, -jnp.inf, jnp.inf).astype(jnp.float32), out)
  return jnp.where(d.is_nan, jnp.float32(jnp.nan), out)


def round_to_format(x: jax.Array, fmt: ElementFormat, rounding: str = "nearest",
                    random_bits: jax.Array | None = None,
                    saturate: bool = True) -> jax.Array:
  """``x`` rounded onto ``fmt``'s grid, returned as float32 (elementwise cast, no scale)."""
  sp = bits.split_f32(bits.f32_bits(bits.to_f32_exact(x)))
  return decode_to_f32(encode(sp, fmt, canonical_rounding(rounding), random_bits, saturate), fmt)


# ---------------------------------------------------------------------------------------
# E2M1 nearest-even fast paths (what the kernels use; equal to `encode`, tested
# exhaustively). `encode` is general integer code for any format; for E2M1 with
# nearest-even rounding the same codes come from a few float operations that are exact:
# power-of-two scalings of a 24-bit integer, one correctly rounded product, and the
# magic-number rounding (a + C) - C with C = 2^(23 + q), which rounds a to a multiple of
# 2^q ties-to-even in any IEEE float32 unit.


def _e2m1_magnitude_nearest(a: jax.Array) -> jax.Array:
  """uint32 E2M1 magnitude code of float32 ``a >= 0`` (Inf saturates, NaN -> garbage)."""
  e = (bits.f32_bits(a) >> 23).astype(I32)
  q = jnp.clip(e - 128, -1, 2)  # grid step 2^q: 0.5 below 2, 1 in [2, 4), 2 above
  c = bits.bits_f32(((q + 150) << 23).astype(U32))
  r = (a + c) - c
  rb = bits.f32_bits(r)
  er = (rb >> 23).astype(I32) - 127
  m = ((rb >> 22) & U32(1)).astype(I32)
  mag = jnp.where(er < 0, 1, (er + 1) * 2 + m)
  mag = jnp.where(r == 0, 0, jnp.minimum(mag, 7))
  return mag.astype(U32)


def e2m1_nearest_pow2(sp: bits.Split, exp_shift: jax.Array) -> jax.Array:
  """E2M1 codes of ``x / 2^exp_shift`` (nearest-even, saturating): equals
  ``encode(sp, E2M1, "nearest", exp_shift=exp_shift)``."""
  k = sp.k - jnp.asarray(exp_shift, I32)
  tiny = k < -126  # |x / 2^s| < 2^24 * 2^-127: code 0
  a = sp.M.astype(jnp.float32) * bits.pow2_f32(k)
  a = jnp.where(tiny, jnp.float32(0.0), a)
  a = jnp.where(sp.is_inf, jnp.float32(jnp.inf), a)
  mag = jnp.where(sp.is_nan, U32(0), _e2m1_magnitude_nearest(a))
  sign = jnp.where(sp.is_nan, U32(0), sp.sign.astype(U32))
  return (sign << 3) | mag


def e2m1_nearest_product(sx: bits.Split, sr: bits.Split) -> jax.Array:
  """E2M1 codes of the float32 product ``x * r`` (IEEE, as :func:`fp4jax.bits.mul_f32`),
  nearest-even, saturating: equals ``encode(split(f32_bits(mul_f32(x, r))), E2M1)``."""
  # x * r = Mx * Mr * 2^(kx + kr): one rounding of the 48-bit integer product to 24 bits,
  # then an exact power-of-two scaling (results below 2^-126 are far below code 1).
  p = sx.M.astype(jnp.float32) * sr.M.astype(jnp.float32)
  e = sx.k + sr.k
  pe = (bits.f32_bits(p) >> 23).astype(I32) - 127  # p >= 1 for nonzero operands
  a = p * bits.pow2_f32(e)
  a = jnp.where(e + pe < -126, jnp.float32(0.0), a)
  a = jnp.where(e + pe > 127, jnp.float32(jnp.inf), a)  # saturates
  zx, zr = (sx.M == 0) & ~sx.is_nan & ~sx.is_inf, (sr.M == 0) & ~sr.is_nan & ~sr.is_inf
  nan = sx.is_nan | sr.is_nan | (sx.is_inf & zr) | (zx & sr.is_inf)
  inf = (sx.is_inf | sr.is_inf) & ~nan
  zero = (zx | zr) & ~nan
  a = jnp.where(zero, jnp.float32(0.0), jnp.where(inf, jnp.float32(jnp.inf), a))
  sign = jnp.where(nan, U32(0), (sx.sign ^ sr.sign).astype(U32))
  mag = jnp.where(nan, U32(0), _e2m1_magnitude_nearest(a))
  return (sign << 3) | mag


def is_e2m1(fmt: ElementFormat) -> bool:
  """Whether ``fmt`` is FP4 E2M1 (the format of the fast paths here and in the kernels)."""
  return (fmt.ebits, fmt.mbits, fmt.bias, fmt.special, fmt.is_int) == (2, 1, 1, "none", False)


def e2m1_f32_bits(codes: jax.Array) -> jax.Array:
  """float32 bit patterns of E2M1 codes (uint32, 4 bits: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and
  their negatives): :func:`decode_to_f32` for E2M1 in a few integer operations (what the
  GEMM kernels spend per element; tested against it)."""
  c = codes.astype(U32)
  e, m = (c >> 1) & U32(3), c & U32(1)
  normal = ((e + U32(126)) << 23) | (m << 22)
  mag = jnp.where(e == 0, m * U32(0x3F000000), normal)
  return mag | ((c & U32(8)) << 28)


_F32_QUARTER, _F32_HALF = 0x3E800000, 0x3F000000
_F32_THREE_QUARTERS, _F32_ONE = 0x3F400000, 0x3F800000


def _e2m1_low_code_stochastic(ab: jax.Array, rb: jax.Array) -> jax.Array:
  """E2M1 code (int32: 0, 1 or 2) of ``0 <= a < 1`` (float32 bits ``ab``) rounded
  stochastically onto the step 0.5: ``round(M / 2^(149 - E))`` with round_shift_right's
  handling of shifts above 31 (the significand first truncated by the excess), computed
  in floating point in a few operations instead of variable shifts.

  With ``t = 2a`` (exact), ``round_shift_right`` rounds up iff ``rb >> (32 - s) < rem``,
  where ``rem / 2^s = frac(t)``; for integers that is ``rb < frac(t) 2^32``, and because
  ``frac(t) 2^32`` is even for ``s <= 31``, iff ``rb >> 1 < frac(t) 2^31``. Past a 31-bit
  shift (``a < 2^-9``) the truncated ``rem`` is ``floor(frac(t) 2^31)`` and the test is
  the same one, so one formula serves: ``floor(t) + (rb >> 1 < trunc(frac(t) 2^31))``.
  ``frac(t) 2^31 < 2^31`` is an exact float32 product that fits int32. Subnormal ``a``
  gives 0 whether or not the backend flushes it. Garbage for ``a >= 1`` (not selected)."""
  ge_half = ab >= U32(_F32_HALF)
  t = bits.bits_f32(ab) * jnp.float32(2.0)
  frac = t - ge_half.astype(jnp.float32)
  rem31 = (frac * jnp.float32(2.0 ** 31)).astype(I32)
  up = (rb >> U32(1)).astype(I32) < rem31
  return ge_half.astype(I32) + up.astype(I32)


def e2m1_magnitude_of_bits(ab: jax.Array, rounding: str = "nearest",
                           random_bits: jax.Array | None = None) -> jax.Array:
  """E2M1 magnitude code (uint32 in [0, 7], saturating) of ``a >= 0`` given by its
  float32 bits ``ab``: equals ``encode(split_f32(ab), E2M1, rounding, random_bits) & 7``
  for every normal or zero ``a`` and +Inf, and gives 0 for subnormal ``a`` (so it does not
  matter whether a backend flushed ``a`` to zero). Tested exhaustively against
  :func:`encode`.

  A dozen operations instead of :func:`encode`'s general ones (what the fused kernels
  spend per element):

  * ``a >= 1`` (E2M1 normals, one mantissa bit): round the 23-bit mantissa field to its top
    bit by an integer add (nearest-even: ``0x1FFFFF + lsb``; stochastic: the complement
    of the top 22 random bits, so the carry happens exactly when ``r < rem``), letting
    the carry run into the exponent; then the code is ``((E << 1) | m) - 252``.
  * ``a < 1`` (the subnormal step 0.5): nearest-even compares with the two midpoints
    0.25 (ties down to 0) and 0.75 (ties up to 1.0); stochastic is
    :func:`fp4jax.bits.round_shift_right` of the significand by ``149 - E``, decided by
    one exact float product (``_e2m1_low_code_stochastic`` says why that is the same).
  """
  ab = ab.astype(U32)
  if rounding == "nearest":
    lsb = (ab >> 22) & U32(1)
    hi = ((ab + U32(0x1FFFFF) + lsb) >> 22).astype(I32) - 252
    lo = (ab > U32(_F32_QUARTER)).astype(I32) + (ab >= U32(_F32_THREE_QUARTERS)).astype(I32)
  elif rounding == "stochastic":
    if random_bits is None:
      raise ValueError("stochastic rounding needs random_bits")
    rb = random_bits.astype(U32)
    hi = ((ab + ((rb >> 10) ^ U32(0x3FFFFF))) >> 22).astype(I32) - 252
    lo = _e2m1_low_code_stochastic(ab, rb)
  else:
    raise ValueError(f"e2m1_magnitude_of_bits rounds nearest or stochastic, got {rounding!r}")
  mag = jnp.where(ab >= U32(_F32_ONE), jnp.minimum(hi, 7), lo)
  return mag.astype(U32)


_F32_SIX = 0x40C00000


def e2m1_grid_bits(ab: jax.Array, rounding: str = "nearest",
                   random_bits: jax.Array | None = None) -> jax.Array:
  """float32 bits of ``a >= 0`` (bits ``ab``) rounded onto the E2M1 grid {0, 0.5, 1, 1.5,
  2, 3, 4, 6}, saturating: equals ``e2m1_f32_bits(e2m1_magnitude_of_bits(ab, rounding,
  random_bits))`` (tested), in fewer operations. For ``a >= 1`` the mantissa is rounded to
  its top bit in place (the carry running into the exponent) and masked, with no detour
  through a code; below 1 the three grid points are chosen as there."""
  ab = ab.astype(U32)
  if rounding == "nearest":
    hi = (ab + U32(0x1FFFFF) + ((ab >> 22) & U32(1))) & U32(0xFFC00000)
    lo = jnp.where(ab >= U32(_F32_THREE_QUARTERS), U32(_F32_ONE),
                   jnp.where(ab > U32(_F32_QUARTER), U32(_F32_HALF), U32(0)))
    return jnp.where(ab >= U32(_F32_ONE), jnp.minimum(hi, U32(_F32_SIX)), lo)
  if rounding != "stochastic":
    raise ValueError(f"e2m1_grid_bits rounds nearest or stochastic, got {rounding!r}")
  if random_bits is None:
    raise ValueError("stochastic rounding needs random_bits")
  rb = random_bits.astype(U32)
  hi = (ab + ((rb >> 10) ^ U32(0x3FFFFF))) & U32(0xFFC00000)
  code = _e2m1_low_code_stochastic(ab, rb).astype(U32)   # 0, 1 (0.5) or 2 (1.0)
  lo = jnp.where(code == 0, U32(0), U32(_F32_QUARTER) + (code << 23))
  return jnp.where(ab >= U32(_F32_ONE), jnp.minimum(hi, U32(_F32_SIX)), lo)
