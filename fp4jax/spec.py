"""The quantization spec: what format, which blocks, which scales, which rounding.

Every preset (``"mxfp4"``, ``"nvfp4"``, ...) is one :class:`QuantSpec`; sweeps rebuild
it with :meth:`QuantSpec.replace` (or ``dataclasses.replace``)::

    spec = fp4jax.get_spec("mxfp4").replace(block_size=16, scale_mode="rceil")
    spec = fp4jax.get_spec("nvfp4").replace(element="e2m3")        # NVFP6-style
    spec = fp4jax.get_spec("mxfp4").replace(scale_format="ue4m3", scale_mode="amax")

Granularity (one scale per ...):

* ``"block"``: ``block_size`` consecutive elements along the quantization axis (MX, NVFP4).
* ``"tile"``: a ``tile[0] x tile[1]`` tile of the last two axes (NVIDIA's 16x16 weights).
* ``"channel"``: the whole quantization axis (per-channel weights, per-token activations).
* ``"tensor"``: the whole tensor (per-tensor FP8 current scaling).

Scale modes:

* power-of-two scale formats (E8M0): ``"floor"`` (OCP MX v1.0 section 6.3),
  ``"ceil"``, ``"even"`` and ``"rceil"``, defined as torchao's ``ScaleCalculationMode``
  (see :mod:`fp4jax.scales`).
* float scale formats (UE4M3, BF16, FP32): ``"amax"``: ``scale = amax / max(element)``
  rounded to the scale format (NVFP4).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from fp4jax import formats
from fp4jax.formats import ElementFormat, ScaleFormat
from fp4jax.rounding import canonical_rounding

Granularity = Literal["block", "tile", "channel", "tensor"]
POW2_SCALE_MODES = ("floor", "ceil", "even", "rceil")
FLOAT_SCALE_MODES = ("amax",)
GRANULARITIES = ("block", "tile", "channel", "tensor")


# Second-level (FP32, per-tensor) scales: none; from the amax of every value (NVFP4 as
# NVIDIA and torchao define it: a NaN or Inf anywhere makes the whole tensor NaN); or from
# the amax of the finite values only (a non-finite element poisons only its block).
TENSOR_SCALES = (None, "amax", "finite_amax")


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """A complete, validated description of one quantizer.

  Attributes:
    element: element format (name or :class:`ElementFormat`).
    scale_format: scale format (name or :class:`ScaleFormat`).
    granularity: ``"block"``, ``"tile"``, ``"channel"`` or ``"tensor"``.
    block_size: elements per scale along the axis (granularity ``"block"``).
    tile: tile shape over the last two axes (granularity ``"tile"``).
    scale_mode: ``floor``/``ceil``/``even``/``rceil`` (pow2 scales) or ``amax`` (float).
    rounding: ``"nearest"`` (ties to even), ``"stochastic"`` or ``"toward_zero"``.
    tensor_scale: ``None``, ``"amax"`` or ``"finite_amax"`` (see ``TENSOR_SCALES``): a
      second-level FP32 scale
      ``amax(x) / (max(scale_format) * max(element))`` (NVFP4's two-level scaling).
    saturate: clamp overflow to the largest finite element value.
    packed: store 4-bit codes two per byte and 6-bit codes four per three bytes.
    name: the preset name this spec came from (informational).
  """

  element: ElementFormat
  scale_format: ScaleFormat
  granularity: Granularity = "block"
  block_size: int = 32
  tile: tuple[int, int] = (16, 16)
  scale_mode: str = "floor"
  rounding: str = "nearest"
  tensor_scale: str | None = None
  saturate: bool = True
  packed: bool = True
  name: str = ""

  def __post_init__(self):
    object.__setattr__(self, "element", formats.get_element_format(self.element))
    object.__setattr__(self, "scale_format", formats.get_scale_format(self.scale_format))
    object.__setattr__(self, "rounding", canonical_rounding(self.rounding))
    if self.element.bits > 8:
      raise ValueError(f"element format {self.element.name!r} has {self.element.bits} bits; "
                       "elements are at most 8 bits")
    if self.granularity not in GRANULARITIES:
      raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
    if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) \
        or self.block_size <= 0:
      raise ValueError(f"block_size must be a positive int, got {self.block_size!r}")
    tile = tuple(self.tile)
    if len(tile) != 2 or any((not isinstance(t, int)) or t <= 0 for t in tile):
      raise ValueError(f"tile must be two positive ints, got {self.tile!r}")
    object.__setattr__(self, "tile", tile)
    modes = POW2_SCALE_MODES if self.scale_format.is_pow2 else FLOAT_SCALE_MODES
    if self.scale_mode not in modes:
      raise ValueError(
          f"scale_mode {self.scale_mode!r} does not fit scale format "
          f"{self.scale_format.name!r}; valid: {modes}"
          + (" (power-of-two modes need an E8M0-like scale format)"
             if self.scale_mode in POW2_SCALE_MODES else ""))
    if self.tensor_scale not in TENSOR_SCALES:
      raise ValueError(f"tensor_scale must be one of {TENSOR_SCALES}, got "
                       f"{self.tensor_scale!r}")
    if self.tensor_scale is not None and self.scale_format.is_pow2:
      raise ValueError(f"tensor_scale={self.tensor_scale!r} (two-level scaling) needs a float "
                       "scale format such as 'ue4m3'; power-of-two scales already span the "
                       "range")

  def replace(self, **changes) -> "QuantSpec":
    """A copy with ``changes`` applied and validated (``name`` is kept unless given)."""
    return dataclasses.replace(self, **changes)

  def with_block_size(self, block_size: int) -> "QuantSpec":
    """The one meaning of "block size ``n``" for every granularity (``quantize``'s
    ``block_size=`` argument and the experiments' ``--block_size`` both use it):

    * ``"block"``: ``n`` consecutive elements along the axis share a scale;
    * ``"tile"``: ``n x n`` tiles (a tile is ``n`` long along either tiled axis);
    * ``"channel"``: switches to blocks of ``n`` along the axis;
    * ``"tensor"``: an error, per-tensor scaling has no blocks.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
      raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if self.granularity == "tile":
      return self.replace(tile=(block_size, block_size))
    if self.granularity == "tensor":
      raise ValueError(f"block_size={block_size}: {self.name or 'this spec'} has one scale per "
                       "tensor, no blocks; use a block or channel spec")
    return self.replace(granularity="block", block_size=block_size)

  @property
  def elements_per_scale(self) -> int | None:
    """Elements sharing one scale, or None where it depends on the shape."""
    if self.granularity == "block":
      return self.block_size
    if self.granularity == "tile":
      return self.tile[0] * self.tile[1]
    return None

  @property
  def bits_per_element(self) -> float | None:
    """Nominal storage cost: element bits plus scale bits shared over its block
    (4.25 for MXFP4, 4.5 for NVFP4; the single FP32 tensor scale is not counted)."""
    n = self.elements_per_scale
    if n is None:
      return None
    return self.element.bits + self.scale_format.storage_bits / n


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


def _mx(element, name, **kw) -> QuantSpec:
  return QuantSpec(element, formats.E8M0, "block", 32, scale_mode="floor", name=name, **kw)


PRESETS: dict[str, QuantSpec] = {
    # OCP Microscaling v1.0: 32-element blocks, E8M0 scales.
    "mxfp4": _mx("e2m1", "mxfp4"),
    "mxfp6_e2m3": _mx("e2m3", "mxfp6_e2m3"),
    "mxfp6_e3m2": _mx("e3m2", "mxfp6_e3m2"),
    "mxfp8_e4m3": _mx("e4m3", "mxfp8_e4m3"),
    "mxfp8_e5m2": _mx("e5m2", "mxfp8_e5m2"),
    "mxint8": _mx("mxint8", "mxint8"),
    # NVIDIA NVFP4: 16-element blocks, UE4M3 scales, FP32 tensor scale.
    "nvfp4": QuantSpec("e2m1", formats.UE4M3, "block", 16, scale_mode="amax",
                       tensor_scale="amax", name="nvfp4"),
    # NVFP4 with 16x16 weight tiles (NVIDIA's pretraining recipe for weights).
    "nvfp4_2d": QuantSpec("e2m1", formats.UE4M3, "tile", 16, (16, 16), scale_mode="amax",
                          tensor_scale="amax", name="nvfp4_2d"),
    # FP8 current scaling (Transformer-Engine style): FP32 scale = amax / max.
    "fp8_e4m3_tensor": QuantSpec("e4m3", formats.FP32_SCALE, "tensor", scale_mode="amax",
                                 name="fp8_e4m3_tensor"),
    "fp8_e5m2_tensor": QuantSpec("e5m2", formats.FP32_SCALE, "tensor", scale_mode="amax",
                                 name="fp8_e5m2_tensor"),
    "fp8_e4m3_channel": QuantSpec("e4m3", formats.FP32_SCALE, "channel", scale_mode="amax",
                                  name="fp8_e4m3_channel"),
    "fp8_e5m2_channel": QuantSpec("e5m2", formats.FP32_SCALE, "channel", scale_mode="amax",
                                  name="fp8_e5m2_channel"),
    # Integer group / channel quantization with FP32 (or BF16) scales.
    "int4_g32": QuantSpec("int4", formats.FP32_SCALE, "block", 32, scale_mode="amax",
                          name="int4_g32"),
    "int4_g128": QuantSpec("int4", formats.BF16_SCALE, "block", 128, scale_mode="amax",
                           name="int4_g128"),
    "int4_channel": QuantSpec("int4", formats.FP32_SCALE, "channel", scale_mode="amax",
                              name="int4_channel"),
    "int8_channel": QuantSpec("int8", formats.FP32_SCALE, "channel", scale_mode="amax",
                              name="int8_channel"),
    "int8_tensor": QuantSpec("int8", formats.FP32_SCALE, "tensor", scale_mode="amax",
                             name="int8_tensor"),
}


def get_spec(spec: str | QuantSpec) -> QuantSpec:
  """A preset by name, or the spec itself."""
  if isinstance(spec, QuantSpec):
    return spec
  if not isinstance(spec, str):
    raise TypeError(f"spec must be a preset name or a QuantSpec, got {type(spec).__name__}")
  try:
    return PRESETS[spec.lower()]
  except KeyError:
    raise ValueError(f"unknown quantization preset {spec!r}; valid names: "
                     f"{', '.join(sorted(PRESETS))} (or pass a fp4jax.QuantSpec)") from None


def resolve_spec(spec: str | QuantSpec, **overrides) -> QuantSpec:
  """``get_spec(spec)`` with every override that is not None applied."""
  base = get_spec(spec)
  changes = {k: v for k, v in overrides.items() if v is not None}
  if "block_size" in changes:
    base = base.with_block_size(changes.pop("block_size"))
  return base.replace(**changes) if changes else base
