"""Element and scale formats, described as data.

Every element format is one :class:`ElementFormat` row: sign bit, ``ebits`` exponent
bits, ``mbits`` mantissa bits, an exponent ``bias`` and which special values exist.
Nothing else in fp4jax branches on a format's name; the rounding, encoding and
decoding code reads these fields only.

Values of a float format with exponent field ``E`` and mantissa field ``F``::

    E == 0 (subnormal):  (-1)^s * F / 2^m * 2^(1 - bias)
    E >  0 (normal):     (-1)^s * (1 + F / 2^m) * 2^(E - bias)

Special values (OCP MX v1.0 section 5.3 and the OCP FP8 spec):

* ``"none"`` (E2M1, E2M3, E3M2): every code is finite; no Inf, no NaN.
* ``"fn"`` (E4M3 "finite, NaN"): no Inf; the single all-ones code S.1111.111 is NaN.
* ``"ieee"`` (E5M2): the all-ones exponent holds Inf (mantissa 0) and NaN.

Integer formats (INT4, INT8, and MXINT8 whose elements are two's complement integers
with an implicit 2^-6) are the same grid as a float format with one exponent bit:
INT(b, frac) has values ``k * 2^-frac`` for ``|k| <= 2^(b-1) - 1``, which is exactly
``E1M(b-2)`` with ``bias = frac - b + 3``; only the bit layout of the code differs
(two's complement instead of sign-magnitude). So one rounding routine serves both.

Scale formats (:class:`ScaleFormat`) are either powers of two (E8M0: ``2^(byte-127)``,
byte 0xFF is NaN, no zero, no sign) or a float format (UE4M3 for NVFP4, BF16, FP32).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax.numpy as jnp

Special = Literal["none", "fn", "ieee"]


@dataclasses.dataclass(frozen=True)
class ElementFormat:
  """A signed low-precision number format (float ExMy or integer), as data.

  Attributes:
    name: short name used in presets and reports (``"e2m1"``, ``"int8"``).
    ebits: exponent bits (1 for integer formats).
    mbits: mantissa bits (``bits - 2`` for integer formats).
    bias: exponent bias.
    special: which special values exist: ``"none"``, ``"fn"`` or ``"ieee"``.
    is_int: codes are two's complement integers (values ``code * 2^-frac_bits``).
  """

  name: str
  ebits: int
  mbits: int
  bias: int
  special: Special = "none"
  is_int: bool = False

  def __post_init__(self):
    if self.ebits < 1:
      raise ValueError(f"ElementFormat {self.name!r}: ebits must be >= 1, got {self.ebits}")
    if self.mbits < 0:
      raise ValueError(f"ElementFormat {self.name!r}: mbits must be >= 0, got {self.mbits}")
    if self.special not in ("none", "fn", "ieee"):
      raise ValueError(f"ElementFormat {self.name!r}: special must be 'none', 'fn' or 'ieee'")
    if self.special == "fn" and self.mbits == 0:
      raise ValueError(f"ElementFormat {self.name!r}: 'fn' NaN encoding needs mbits >= 1")
    if self.special == "ieee" and self.ebits < 2:
      raise ValueError(f"ElementFormat {self.name!r}: 'ieee' specials need ebits >= 2")
    if self.is_int and (self.ebits != 1 or self.special != "none"):
      raise ValueError(f"ElementFormat {self.name!r}: integer formats are E1M(b-2), no specials")

  # ---- derived constants (Python ints/floats, usable as static values) ----
  @property
  def bits(self) -> int:
    """Bits per element code, sign included."""
    return 1 + self.ebits + self.mbits

  @property
  def emin(self) -> int:
    """Unbiased exponent of the smallest normal number (also the subnormal exponent)."""
    return 1 - self.bias

  @property
  def max_exp_field(self) -> int:
    """Largest exponent field that holds finite numbers."""
    top = (1 << self.ebits) - 1
    return top - 1 if self.special == "ieee" else top

  @property
  def max_mant_field(self) -> int:
    """Largest mantissa field at the top finite exponent."""
    full = (1 << self.mbits) - 1
    return full - 1 if self.special == "fn" else full

  @property
  def emax(self) -> int:
    """floor(log2(max_value)): the 'emax' of OCP MX section 6.3 used to derive scales."""
    if self.is_int:  # max = (2^(b-1) - 1) * 2^-frac lies in [2^emin, 2^(emin+1))
      return self.emin
    return self.max_exp_field - self.bias

  @property
  def max_code(self) -> int:
    """Sign-magnitude code (sign bit clear) of the largest finite value."""
    return (self.max_exp_field << self.mbits) | self.max_mant_field

  @property
  def max_value(self) -> float:
    return self.code_to_float(self.max_code)

  @property
  def min_subnormal(self) -> float:
    return 2.0 ** (self.emin - self.mbits)

  @property
  def min_normal(self) -> float:
    return 2.0 ** self.emin

  @property
  def sign_bit(self) -> int:
    return 1 << (self.ebits + self.mbits)

  @property
  def nan_code(self) -> int | None:
    """Sign-magnitude code of the canonical (positive) NaN, or None."""
    if self.special == "none":
      return None
    return (1 << (self.ebits + self.mbits)) - 1

  @property
  def inf_code(self) -> int | None:
    if self.special != "ieee":
      return None
    return ((1 << self.ebits) - 1) << self.mbits

  @property
  def frac_bits(self) -> int:
    """For integer formats: the implicit 2^-frac_bits of each integer step."""
    return self.mbits - self.emin

  def code_to_float(self, code: int) -> float:
    """Python-side decode of one sign-magnitude code (for tables, tests, docs)."""
    sign = -1.0 if code & self.sign_bit else 1.0
    mag = code & (self.sign_bit - 1)
    if self.nan_code is not None and mag == self.nan_code and self.special == "fn":
      return math.nan
    e_field, m_field = mag >> self.mbits, mag & ((1 << self.mbits) - 1)
    if self.special == "ieee" and e_field == (1 << self.ebits) - 1:
      return sign * math.inf if m_field == 0 else math.nan
    if e_field == 0:
      return sign * m_field * 2.0 ** (self.emin - self.mbits)
    return sign * ((1 << self.mbits) + m_field) * 2.0 ** (e_field - self.bias - self.mbits)

  def grid(self) -> list[float]:
    """All finite non-negative values of the format, ascending."""
    return [self.code_to_float(c) for c in range(self.max_code + 1)]


def exmy(ebits: int, mbits: int, bias: int | None = None, special: Special = "none",
         name: str | None = None) -> ElementFormat:
  """A generic float format ``ExMy`` (default bias ``2^(ebits-1) - 1``).

  ``exmy(1, 2)`` is E1M2, ``exmy(3, 0)`` is E3M0 (powers of two), and so on.
  """
  if ebits < 1:
    raise ValueError(f"exmy: ebits must be >= 1, got {ebits}")
  if 1 + ebits + mbits > 8:
    raise ValueError(f"exmy: at most 8 bits per element (1 sign + ebits + mbits), got "
                     f"{1 + ebits + mbits}")
  if bias is None:
    bias = (1 << (ebits - 1)) - 1
  return ElementFormat(name or f"e{ebits}m{mbits}", ebits, mbits, bias, special)


def intn(bits: int, frac_bits: int = 0, name: str | None = None) -> ElementFormat:
  """A symmetric integer format: values ``k * 2^-frac_bits``, ``|k| <= 2^(bits-1) - 1``.

  Internally the grid of ``E1M(bits-2)`` with ``bias = frac_bits - bits + 3``.
  """
  if bits < 2:
    raise ValueError(f"intn: bits must be >= 2, got {bits}")
  return ElementFormat(name or f"int{bits}", 1, bits - 2, frac_bits - bits + 3, "none", True)


# ---- the element format table ----
E2M1 = exmy(2, 1, name="e2m1")                 # FP4: 0, .5, 1, 1.5, 2, 3, 4, 6
E2M3 = exmy(2, 3, name="e2m3")                 # FP6, max 7.5
E3M2 = exmy(3, 2, name="e3m2")                 # FP6, max 28
E4M3 = exmy(4, 3, special="fn", name="e4m3")   # FP8 E4M3FN, max 448
E5M2 = exmy(5, 2, special="ieee", name="e5m2")  # FP8 E5M2, max 57344
INT4 = intn(4, name="int4")                    # -7..7
INT8 = intn(8, name="int8")                    # -127..127
MXINT8 = intn(8, 6, name="mxint8")             # OCP MXINT8: k * 2^-6, max 1.984375

ELEMENT_FORMATS: dict[str, ElementFormat] = {
    f.name: f for f in (E2M1, E2M3, E3M2, E4M3, E5M2, INT4, INT8, MXINT8)
}
ELEMENT_FORMATS.update({"fp4": E2M1, "fp6_e2m3": E2M3, "fp6_e3m2": E3M2,
                        "fp8_e4m3": E4M3, "fp8_e5m2": E5M2})


def get_element_format(fmt: str | ElementFormat) -> ElementFormat:
  """Looks up an element format by name; ``"eXmY"`` names any generic float format."""
  if isinstance(fmt, ElementFormat):
    return fmt
  if not isinstance(fmt, str):
    raise TypeError(f"element format must be a name or ElementFormat, got {type(fmt).__name__}")
  key = fmt.lower()
  if key in ELEMENT_FORMATS:
    return ELEMENT_FORMATS[key]
  # A well-formed generic name that exmy / intn reject (e.g. wider than 8 bits) keeps
  # their reason rather than "unknown format".
  parts = key[1:].split("m") if key.startswith("e") else []
  if len(parts) == 2 and all(p.isdigit() for p in parts):
    try:
      return exmy(int(parts[0]), int(parts[1]))
    except ValueError as err:
      raise ValueError(f"element format {fmt!r}: {err}") from None
  if key.startswith("int") and key[3:].isdigit():
    try:
      return intn(int(key[3:]))
    except ValueError as err:
      raise ValueError(f"element format {fmt!r}: {err}") from None
  raise ValueError(f"unknown element format {fmt!r}; valid names: {sorted(ELEMENT_FORMATS)}"
                   " or any 'eXmY' / 'intN'")


@dataclasses.dataclass(frozen=True)
class ScaleFormat:
  """The number format of block scales.

  Attributes:
    name: ``"e8m0"``, ``"ue4m3"``, ``"bf16"``, ``"fp32"``, ...
    kind: ``"pow2"`` (scale = 2^(code - bias), code all-ones = NaN, no zero) or
      ``"float"`` (a positive float of format ``element``; FP32 is used as is).
    bits: code width for ``pow2`` scales.
    bias: exponent bias for ``pow2`` scales.
    element: for ``float`` scales, the float format the scale is rounded to (None = FP32).
  """

  name: str
  kind: Literal["pow2", "float"]
  bits: int = 8
  bias: int = 127
  element: ElementFormat | None = None

  @property
  def is_pow2(self) -> bool:
    return self.kind == "pow2"

  @property
  def min_exp(self) -> int:
    """pow2 only: the smallest representable exponent (code 0)."""
    return -self.bias

  @property
  def max_exp(self) -> int:
    """pow2 only: the largest representable exponent (code all-ones is NaN)."""
    return (1 << self.bits) - 2 - self.bias

  @property
  def nan_code(self) -> int:
    return (1 << self.bits) - 1

  @property
  def max_value(self) -> float:
    if self.is_pow2:
      return 2.0 ** self.max_exp
    return float(jnp.finfo(jnp.float32).max) if self.element is None else self.element.max_value

  @property
  def min_normal(self) -> float:
    """float only: the lower clamp applied to computed scales (smallest normal)."""
    if self.is_pow2:
      return 2.0 ** self.min_exp
    return float(jnp.finfo(jnp.float32).tiny) if self.element is None else self.element.min_normal

  @property
  def storage_dtype(self):
    """dtype of stored scales: float8_e8m0fnu, float8_e4m3fn, bfloat16, float32 or uint8/16."""
    if self.name == "e8m0":
      return jnp.float8_e8m0fnu
    if self.element is None:
      return jnp.float32
    if self.element == E4M3:
      return jnp.float8_e4m3fn
    if self.element == BF16_GRID:
      return jnp.bfloat16
    return jnp.uint8 if self.element.bits <= 8 else jnp.uint16

  @property
  def storage_bits(self) -> int:
    if self.is_pow2:
      return self.bits
    return 32 if self.element is None else self.element.bits


# BF16 as a rounding grid for scales (16 bits: a scale grid, never an element format;
# QuantSpec limits elements to 8 bits).
BF16_GRID = ElementFormat("bf16", 8, 7, 127, "ieee")

E8M0 = ScaleFormat("e8m0", "pow2", bits=8, bias=127)
UE4M3 = ScaleFormat("ue4m3", "float", element=E4M3)
BF16_SCALE = ScaleFormat("bf16", "float", element=BF16_GRID)
FP32_SCALE = ScaleFormat("fp32", "float", element=None)

SCALE_FORMATS: dict[str, ScaleFormat] = {
    "e8m0": E8M0, "ue4m3": UE4M3, "e4m3": UE4M3, "bf16": BF16_SCALE, "fp32": FP32_SCALE,
}


def pow2_scale(bits: int, bias: int | None = None) -> ScaleFormat:
  """A generic power-of-two scale with ``bits`` exponent bits (E8M0 is ``pow2_scale(8)``)."""
  if not 2 <= bits <= 8:
    raise ValueError(f"pow2_scale: bits must be in [2, 8], got {bits}")
  bias = (1 << (bits - 1)) - 1 if bias is None else bias
  return ScaleFormat(f"e{bits}m0", "pow2", bits=bits, bias=bias)


def get_scale_format(fmt: str | ScaleFormat) -> ScaleFormat:
  """Looks up a scale format by name (``e8m0``, ``ue4m3``/``e4m3``, ``bf16``, ``fp32``, ``eNm0``)."""
  if isinstance(fmt, ScaleFormat):
    return fmt
  if not isinstance(fmt, str):
    raise TypeError(f"scale format must be a name or ScaleFormat, got {type(fmt).__name__}")
  key = fmt.lower()
  if key in SCALE_FORMATS:
    return SCALE_FORMATS[key]
  if key.startswith("e") and key.endswith("m0"):
    try:
      return pow2_scale(int(key[1:-2]))
    except ValueError:
      pass
  if key.startswith("ue") and "m" in key:
    elem = get_element_format(key[1:])
    return ScaleFormat(key, "float", element=elem)
  raise ValueError(f"unknown scale format {fmt!r}; valid names: {sorted(SCALE_FORMATS)},"
                   " 'eNm0' (power of two) or 'ueXmY'")
