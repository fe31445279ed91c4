"""Exact float32 arithmetic on bit patterns.

XLA on CPU runs with denormals-are-zero / flush-to-zero: ``1e-40 * 2**100`` is 0 there,
and ``jnp.frexp(1e-40)`` returns 0. Quantization must not depend on that, so fp4jax
never takes an exponent from float arithmetic. Instead a float32 ``x`` is split into
integers ``(sign, M, k)`` with ``|x| = M * 2^k`` (``M < 2^24``), read straight from its
bits, and results are assembled back from integers with IEEE round-to-nearest-even,
subnormals included (:func:`compose_f32`).

Products and quotients that the numerics need (NVFP4's ``x * (1/s)``, ``amax / 6``)
go through :func:`mul_f32` / :func:`div_f32`, which equal IEEE float32 ``a*b`` / ``a/b``
bit for bit, subnormal operands and results included: the product of the 24-bit
significands is formed exactly in two 24-bit limbs, and a quotient is estimated by the
hardware on normalised significands and then corrected with an exact integer
remainder, so every result is rounded once.

All functions are elementwise ``jnp``/``lax`` integer ops with shift amounts kept in
``[0, 31]``, so they also lower inside Pallas kernels.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

U32 = jnp.uint32
I32 = jnp.int32

SIGN_MASK = 0x80000000
ABS_MASK = 0x7FFFFFFF
EXP_MASK = 0x7F800000
MANT_MASK = 0x007FFFFF
F32_INF_BITS = 0x7F800000
F32_NAN_BITS = 0x7FC00000


def u32(v) -> jax.Array:
  return jnp.asarray(v, U32)


def i32(v) -> jax.Array:
  return jnp.asarray(v, I32)


def to_f32_exact(x: jax.Array) -> jax.Array:
  """Widens bfloat16 / float16 / float32 to float32 without touching subnormals.

  bfloat16 is the top half of a float32, so the widening is a 16-bit shift of the bits.
  """
  x = jnp.asarray(x)
  if x.dtype == jnp.float32:
    return x
  if x.dtype == jnp.bfloat16:
    b = lax.bitcast_convert_type(x, jnp.uint16).astype(U32) << 16
    return lax.bitcast_convert_type(b, jnp.float32)
  if x.dtype == jnp.float16:
    # float16 subnormals are float32 normals; the conversion is exact (tested on CPU).
    return x.astype(jnp.float32)
  raise TypeError(f"expected a float32, bfloat16 or float16 array, got {x.dtype}")


def _is_constant(x) -> bool:
  """A small concrete value (a literal of the numerics), not a traced or large array.

  Literals of the numerics are numpy values: ``jnp.float32(c)`` inside a trace is a tracer
  (a Literal), which Pallas' Triton lowering cannot bitcast.
  """
  if isinstance(x, (int, float, np.generic)):
    return True
  if isinstance(x, (np.ndarray, jax.Array)) and not isinstance(x, jax.core.Tracer):
    return np.size(x) <= 64
  return False


def f32_bits(x: jax.Array) -> jax.Array:
  """The uint32 bit pattern of a float32 array."""
  if _is_constant(x):  # folded here: Pallas' Triton lowering cannot bitcast constants
    return jnp.asarray(np.asarray(x, np.float32).view(np.uint32))
  return lax.bitcast_convert_type(jnp.asarray(x, jnp.float32), U32)


def bits_f32(b: jax.Array) -> jax.Array:
  if _is_constant(b):
    return jnp.asarray(np.asarray(b).astype(np.uint32).view(np.float32))
  return lax.bitcast_convert_type(b.astype(U32), jnp.float32)


class Split(NamedTuple):
  """A float32 value as integers: ``(-1)^sign * M * 2^k`` (finite values)."""

  sign: jax.Array    # uint32, 0 or 1
  M: jax.Array       # uint32 significand, < 2^24 (implicit bit included for normals)
  k: jax.Array       # int32 exponent of the significand's last bit
  is_nan: jax.Array  # bool
  is_inf: jax.Array  # bool


def split_f32(b: jax.Array) -> Split:
  """Splits float32 bit patterns (uint32) into sign, integer significand and exponent."""
  b = b.astype(U32)
  sign = b >> 31
  e = ((b >> 23) & 0xFF).astype(I32)
  f = b & U32(MANT_MASK)
  M = jnp.where(e == 0, f, f | U32(0x800000))
  k = jnp.maximum(e, 1) - 150
  special = e == 255
  return Split(sign, M, k, special & (f != 0), special & (f == 0))


def bit_length(q: jax.Array) -> jax.Array:
  """Number of significant bits of a uint32 (0 for 0), as int32."""
  # clz of the same bits viewed as int32: Triton lowers clz for signed integers only.
  return 32 - lax.clz(lax.bitcast_convert_type(q.astype(U32), I32)).astype(I32)


def shl(q: jax.Array, s: jax.Array) -> jax.Array:
  """``q << s`` for ``s`` in [0, 31] (clamped so that no shift is out of range)."""
  return q.astype(U32) << jnp.clip(s, 0, 31).astype(U32)


def round_shift_right(q: jax.Array, s: jax.Array, rounding: str = "nearest",
                      random_bits: jax.Array | None = None) -> jax.Array:
  """``q / 2^s`` rounded to an integer, for uint32 ``q < 2^30`` and int32 ``s >= 0``.

  rounding:
    ``"nearest"``: ties to even. ``"toward_zero"``: truncation.
    ``"stochastic"``: rounds up iff the top ``s`` bits of ``random_bits`` (uint32) are
    below ``q mod 2^s``: with uniform 32-bit words, with probability ``(q mod 2^s) /
    2^s``; with fp4jax's own words (eight random bits each, :mod:`fp4jax.prng`) that
    probability rounded to a multiple of 1/256. For ``s > 31`` the remainder is first
    truncated to 31 bits, a bias below ``2^-31`` of one step.
  """
  q = q.astype(U32)
  s = s.astype(I32)
  if rounding == "stochastic":
    # Fold huge shifts into a truncation so that the random comparison stays 31-bit.
    extra = jnp.clip(s - 31, 0, 31).astype(U32)
    q = jnp.where(s > 31, q >> extra, q)
    s = jnp.minimum(s, 31)
  sc = jnp.clip(s, 0, 31).astype(U32)
  trunc = q >> sc
  rem = q & ((U32(1) << sc) - U32(1))
  if rounding == "toward_zero":
    return trunc
  if rounding == "nearest":
    half = U32(1) << jnp.clip(s - 1, 0, 31).astype(U32)  # s > 31: half > q, no round-up
    up = (s > 0) & ((rem > half) | ((rem == half) & ((trunc & 1) == 1)))
    return trunc + up.astype(U32)
  if rounding == "stochastic":
    if random_bits is None:
      raise ValueError("stochastic rounding needs random_bits")
    r = random_bits.astype(U32) >> jnp.clip(32 - s, 1, 31).astype(U32)  # the top s bits
    up = (s > 0) & (r < rem)
    return trunc + up.astype(U32)
  raise ValueError(f"unknown rounding {rounding!r}")


def compose_f32(sign: jax.Array, q: jax.Array, t: jax.Array) -> jax.Array:
  """The float32 nearest (ties to even) to ``(-1)^sign * q * 2^t``; overflow gives Inf.

  ``q`` is a uint32 below 2^30 and ``t`` an int32. Subnormal results are produced
  exactly from bits, so this is independent of flush-to-zero.
  """
  q = q.astype(U32)
  t = t.astype(I32)
  L = bit_length(q)
  e = L - 1 + t  # floor(log2(value)) for q > 0
  # Normal results: normalise q to 24 significant bits.
  s = L - 24
  qn = jnp.where(s > 0, round_shift_right(q, jnp.maximum(s, 0)), shl(q, -s))
  carry = qn >> 24  # rounding overflowed to 2^24
  qn = jnp.where(carry > 0, qn >> 1, qn)
  en = e + carry.astype(I32)
  normal_bits = (jnp.clip(en + 127, 0, 255).astype(U32) << 23) | (qn & U32(MANT_MASK))
  normal_bits = jnp.where(en + 127 >= 255, U32(F32_INF_BITS), normal_bits)
  # Subnormal results: count in units of 2^-149; rounding up to 2^23 lands on the
  # smallest normal, whose bit pattern is that same integer.
  ss = -149 - t
  qs = jnp.where(ss > 0, round_shift_right(q, jnp.maximum(ss, 0)), shl(q, -ss))
  mag = jnp.where(e < -126, qs, normal_bits)
  mag = jnp.where(q == 0, U32(0), mag)
  return bits_f32(mag | (sign.astype(U32) << 31))


def _normalized(sp: Split) -> tuple[jax.Array, jax.Array]:
  """Significand shifted to [2^23, 2^24) (for nonzero values) and the adjusted exponent."""
  sh = jnp.clip(24 - bit_length(sp.M), 0, 24)
  return shl(sp.M, sh), sp.k - sh


def _special_result(nan, inf, zero, sign, finite_value):
  out = jnp.where(zero, bits_f32(sign << 31), finite_value)
  out = jnp.where(inf, bits_f32((sign << 31) | U32(F32_INF_BITS)), out)
  return jnp.where(nan, bits_f32(np.uint32(F32_NAN_BITS)), out)


def _mul24(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Exact product of two uint32 < 2^24 as (hi, lo) with ``a*b = hi * 2^24 + lo``."""
  ah, al = a >> 12, a & U32(0xFFF)
  bh, bl = b >> 12, b & U32(0xFFF)
  mid = ah * bl + al * bh                      # < 2^25
  low = al * bl + ((mid & U32(0xFFF)) << 12)   # < 2^25
  hi = ah * bh + (mid >> 12) + (low >> 24)
  return hi, low & U32(0xFFFFFF)


def mul_f32(a: jax.Array, b: jax.Array) -> jax.Array:
  """IEEE float32 ``a * b`` (round to nearest even), exact also for subnormals."""
  sa, sb = split_f32(f32_bits(a)), split_f32(f32_bits(b))
  Ma, ka = _normalized(sa)
  Mb, kb = _normalized(sb)
  hi, lo = _mul24(Ma, Mb)  # exact 48-bit product, >= 2^46 for nonzero operands
  # Keep 26 leading bits plus a sticky bit below them: one rounding of that 27-bit
  # number by >= 2 bits equals rounding the exact product once.
  q26 = (hi << 2) | (lo >> 22)
  sticky = ((lo & U32(0x3FFFFF)) != 0).astype(U32)
  sign = sa.sign ^ sb.sign
  value = compose_f32(sign, (q26 << 1) | sticky, ka + kb + 21)
  za, zb = (sa.M == 0) & ~sa.is_nan & ~sa.is_inf, (sb.M == 0) & ~sb.is_nan & ~sb.is_inf
  nan = sa.is_nan | sb.is_nan | (sa.is_inf & zb) | (za & sb.is_inf)
  inf = (sa.is_inf | sb.is_inf) & ~nan
  return _special_result(nan, inf, (za | zb) & ~nan, sign, value)


def _quotient_estimate(r: jax.Array, d: jax.Array) -> jax.Array:
  """A float32 approximation of ``r / d`` (any division will do: Triton's is approximate,
  XLA may rewrite it as a product with a reciprocal). :func:`div_f32` corrects it."""
  return r.astype(jnp.float32) / d.astype(jnp.float32)


def div_f32(a: jax.Array, b: jax.Array) -> jax.Array:
  """IEEE float32 ``a / b`` (round to nearest even), exact also for subnormals.

  The 26-bit quotient ``Q = floor(r * 2^25 / Mb)`` of the normalised significands is
  estimated with a float division on normal values (so flush-to-zero cannot touch it,
  and an approximate division is fine), then made exact: the remainder
  ``R = r * 2^25 - Q * Mb`` is small (``|R| < 2^31`` for any estimate within 2^-20
  relative), so uint32 arithmetic modulo 2^32 gives it exactly; one integer step from
  ``floor(R / Mb)`` and one +-1 step put ``R`` in ``[0, Mb)``. The result does not depend
  on how a compiler lowers ``/``, and the same code runs inside Pallas kernels. The 26
  quotient bits plus a sticky bit (``R != 0``) are rounded once.
  """
  sa, sb = split_f32(f32_bits(a)), split_f32(f32_bits(b))
  Ma, ka = _normalized(sa)
  Mb, kb = _normalized(sb)
  Mb = jnp.maximum(Mb, U32(1 << 23))  # b = 0 (handled below): keep the estimate finite
  small = Ma < Mb  # quotient in [1/2, 1): take one more numerator bit
  r = jnp.where(small, Ma << 1, Ma)  # r / Mb in [1, 2), r < 2^25
  est = _quotient_estimate(r, Mb) * np.float32(2.0**25)
  q = jnp.clip(est, np.float32(2.0**25), np.float32(2.0**26)).astype(U32)
  rem = lax.bitcast_convert_type((r << 25) - q * Mb, I32)  # exact: |R| < 2^31
  step = jnp.floor(_quotient_estimate(rem, Mb.astype(I32))).astype(I32)
  q = (q.astype(I32) + step)
  rem = rem - step * Mb.astype(I32)
  under, mb = rem < 0, Mb.astype(I32)
  q, rem = jnp.where(under, q - 1, q), jnp.where(under, rem + mb, rem)
  over = rem >= mb
  q, rem = jnp.where(over, q + 1, q), jnp.where(over, rem - mb, rem)
  sticky = (rem != 0).astype(U32)
  sign = sa.sign ^ sb.sign
  value = compose_f32(sign, (q.astype(U32) << 1) | sticky, ka - kb - 26 - small.astype(I32))
  za, zb = (sa.M == 0) & ~sa.is_nan & ~sa.is_inf, (sb.M == 0) & ~sb.is_nan & ~sb.is_inf
  nan = sa.is_nan | sb.is_nan | (za & zb) | (sa.is_inf & sb.is_inf)
  inf = (sa.is_inf | zb) & ~nan
  zero = (za | sb.is_inf) & ~nan
  return _special_result(nan, inf, zero, sign, value)


def pow2_f32(e: jax.Array) -> jax.Array:
  """2^e as float32 for int32 ``e``, clamped to the normal range [-126, 127] (built from
  bits: no float arithmetic, so flush-to-zero cannot touch it)."""
  e = jnp.clip(jnp.asarray(e, I32), -126, 127)
  return bits_f32(((e + 127) << 23).astype(U32))


def abs_bits(b: jax.Array) -> jax.Array:
  """|x| as int32 bit patterns: for non-negative floats, integer order is float order,
  and every NaN pattern sorts above Inf, so a max over these propagates NaN."""
  return (b.astype(U32) & U32(ABS_MASK)).astype(I32)


def is_finite_bits(b: jax.Array) -> jax.Array:
  return (b.astype(U32) & U32(EXP_MASK)) != U32(EXP_MASK)
