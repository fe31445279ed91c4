"""The pure-JAX quantizer: the reference every kernel equals, and ``impl="xla"``.

:func:`quantize_reference` reads the input's float bits once, takes block maxima on
integer bit patterns, derives scales (:mod:`fp4jax.scales`), rounds every element onto
the element grid (:mod:`fp4jax.rounding`) and packs the codes (:mod:`fp4jax.packing`)
into a :class:`~fp4jax.qarray.QArray`. Nothing here uses float arithmetic that a
flush-to-zero backend could change. Decoding is :mod:`fp4jax.decode`; the public entry
points, which may choose a Pallas kernel instead, are in :mod:`fp4jax.quantization`.

The steps, each a function below:

1. :func:`resolve_request`: the spec with the call's overrides, and an explicit FP32
   tensor scale if the caller gave one;
2. :func:`_input_bits`: float32 bit patterns, zero-padded to whole blocks;
3. block maxima of ``|x|`` (:func:`fp4jax.blocks.block_max`), made global for
   per-tensor scales (:mod:`fp4jax.tensor_amax`);
4. :func:`_random_bits` for stochastic rounding;
5. :func:`_encode_pow2` (E8M0-like scales) or :func:`_encode_float` (UE4M3 / BF16 / FP32
   scales, with NVFP4's optional tensor scale): element codes and stored scales;
6. packing along the axis.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fp4jax import bits, blocks, packing, prng, scales, tensor_amax
from fp4jax import rounding as rounding_lib
from fp4jax.qarray import QArray
from fp4jax.spec import TENSOR_SCALES, QuantSpec, resolve_spec

SPEC_DEFAULT: Any = "spec"  # sentinel for ``tensor_scale``: use the spec's own setting
FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


class Request(NamedTuple):
  """A quantization request after its overrides are applied."""

  spec: QuantSpec                    # the spec that runs (tensor_scale mode resolved)
  tensor_scale: jax.Array | None     # an explicit FP32 tensor scale (shape ()), or None


def resolve_request(spec: str | QuantSpec, *, block_size: int | None = None,
                    scale_mode: str | None = None, rounding: str | None = None,
                    saturate: bool | None = None,
                    tensor_scale: Any = SPEC_DEFAULT) -> Request:
  """The spec with ``quantize``'s overrides applied, and the explicit tensor scale.

  ``tensor_scale``: :data:`SPEC_DEFAULT` (the spec's setting), ``"amax"`` (two-level),
  ``"finite_amax"`` (two-level, from the finite values' amax), ``None`` (one level) or an
  FP32 scalar used as the tensor scale itself.
  """
  spec = resolve_spec(spec, block_size=block_size, scale_mode=scale_mode, rounding=rounding,
                      saturate=saturate)
  if tensor_scale is SPEC_DEFAULT:
    return Request(spec, None)
  if tensor_scale is None or (isinstance(tensor_scale, str) and tensor_scale in TENSOR_SCALES):
    return Request(spec.replace(tensor_scale=tensor_scale), None)
  if isinstance(tensor_scale, str):
    raise ValueError(f"tensor_scale must be 'amax', 'finite_amax', None or an FP32 value, got "
                     f"{tensor_scale!r}")
  explicit = jnp.asarray(tensor_scale, jnp.float32)
  if explicit.size != 1:
    raise ValueError(f"tensor_scale must be a scalar, got shape {explicit.shape}")
  if not isinstance(explicit, jax.core.Tracer):
    # A concrete scale that is zero, negative or not finite would quantize every element
    # to zero or NaN; a traced one (from a previous step's amax) cannot be checked here.
    # numpy, not a jnp op: inside a trace (a fori_loop body closing over the scale) any
    # jnp op on a concrete array is staged and would come back a tracer.
    value = float(np.asarray(explicit).reshape(()))
    if not (np.isfinite(value) and value > 0):
      raise ValueError(f"tensor_scale must be a positive finite FP32 value, got {value}; "
                       "use tensor_scale='amax' to derive it from the tensor, or "
                       "fp4jax.scales.tensor_scale_from_amax(amax, ...) from a known amax")
  return Request(spec.replace(tensor_scale=spec.tensor_scale or "amax"), explicit.reshape(()))


def check_key(key: Any, what: str = "key") -> Any:
  """``key`` if it is None or a ``jax.random`` key (typed, or a raw uint32[2] from
  ``jax.random.PRNGKey``); else an error that says what to pass."""
  if key is None:
    return key
  dtype = getattr(key, "dtype", None)
  if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
    return key
  if dtype is not None and jnp.dtype(dtype) == jnp.uint32 and tuple(key.shape) in ((2,), (4,)):
    return key
  got = f"{type(key).__name__}" + (f" of dtype {dtype} and shape {tuple(key.shape)}"
                                   if dtype is not None else f" {key!r}")
  raise TypeError(f"{what} must be a jax.random key, e.g. {what}=jax.random.key(0) (or "
                  f"jax.random.PRNGKey(0)), got {got}")


def check_input(x: Any) -> jax.Array:
  """``x`` as a float array of rank >= 1, or an error that says how to fix it."""
  x = jnp.asarray(x)
  if x.dtype not in [jnp.dtype(d) for d in FLOAT_DTYPES]:
    raise TypeError(f"quantize: x must be float32, bfloat16 or float16, got {x.dtype}; "
                    "cast it first (e.g. x.astype(jnp.float32))")
  if x.ndim == 0:
    raise ValueError("quantize: x must have at least one dimension (got a scalar); "
                     "reshape it, e.g. x.reshape(1)")
  return x


def _input_bits(x: jax.Array, spec: QuantSpec, axis: int, pad: bool):
  """(float32 bit patterns of x, zero-padded to whole blocks and packing groups; the
  padding per dimension)."""
  group = packing.codes_per_group(spec.element.bits, spec.packed)[0]
  pads = blocks.padding(x.shape, spec, axis, group, pad)
  b = bits.f32_bits(bits.to_f32_exact(x))
  if any(pads):
    b = jnp.pad(b, [(0, p) for p in pads])
  return b, pads


def _random_bits(spec: QuantSpec, key, random_bits, shape, pads, full):
  """uint32 rounding bits of the padded shape for stochastic rounding (else None): the
  caller's ``random_bits`` or :func:`fp4jax.prng.random_bits_for` of ``key``."""
  if spec.rounding != "stochastic":
    return None
  if random_bits is None:
    return prng.random_bits_for(key, full)
  random_bits = jnp.asarray(random_bits)
  if random_bits.shape != shape or random_bits.dtype != jnp.uint32:
    raise ValueError(f"random_bits must be uint32 of shape {shape}, got "
                     f"{random_bits.dtype}{random_bits.shape}")
  return jnp.pad(random_bits, [(0, p) for p in pads]) if any(pads) else random_bits


def _encode_pow2(b, amax, ext, spec: QuantSpec, rbits):
  """Power-of-two scales: element codes of ``x / 2^s`` (an exponent shift on the bits)
  and the stored scale codes; a NaN scale (a NaN/Inf in the block) gives NaN codes."""
  elem, sfmt = spec.element, spec.scale_format
  full = b.shape
  code = scales.pow2_scale_code(amax, elem, sfmt, spec.scale_mode)
  shift = blocks.expand(scales.pow2_scale_exponent(code, sfmt), ext, full)
  codes = rounding_lib.encode(bits.split_f32(b), elem, spec.rounding, rbits, spec.saturate,
                              exp_shift=shift)
  nan_block = blocks.expand(scales.pow2_scale_is_nan(code, sfmt), ext, full)
  codes = jnp.where(nan_block, jnp.uint32(elem.nan_code or 0), codes)
  return codes, scales.store_pow2_scale(code, sfmt)


def tensor_scale(amax, spec: QuantSpec, explicit=None):
  """NVFP4's FP32 tensor scale ``amax / (max(scale) * max(element))`` from the global
  amax (or the caller's value), materialised as a scalar. ``amax``: float32 bit patterns
  of magnitudes whose max is the tensor amax (:func:`fp4jax.tensor_amax.amax_source`)."""
  if explicit is not None:
    ts = explicit
  else:
    tensor_amax_bits = tensor_amax.reduce_amax_bits(jnp.max(amax)).astype(jnp.uint32)
    ts = scales.tensor_scale_from_amax(bits.bits_f32(tensor_amax_bits), spec.element,
                                       spec.scale_format)
  # Materialise the scalar: otherwise XLA fuses the whole-tensor reduction into every
  # consumer of the exact-division graph and compile time explodes.
  return jax.lax.optimization_barrier(ts)


def _encode_float(b, amax, ext, spec: QuantSpec, rbits, explicit_ts):
  """Float block scales (UE4M3, BF16, FP32), optionally under an FP32 tensor scale ``t``:
  element codes of ``x * fl((1/t) / s)`` (torchao's NVFP4 order), the stored scales, and
  ``t`` (None for one level)."""
  elem, sfmt = spec.element, spec.scale_format
  full = b.shape
  ts = None
  if spec.tensor_scale is not None:
    source = tensor_amax.amax_source(bits.abs_bits(b), amax, spec.tensor_scale)
    ts = tensor_scale(source, spec, explicit_ts)
  s = scales.float_block_scale(amax, elem, sfmt, ts)
  # Per-block values are materialised before being broadcast to elements: XLA would
  # otherwise duplicate the exact-division graph into every element fusion (minutes of
  # compile time on CPU).
  s, recip = jax.lax.optimization_barrier((s, scales.float_scale_reciprocal(s, ts)))
  y = bits.mul_f32(bits.bits_f32(b), blocks.expand(recip, ext, full))
  codes = rounding_lib.encode(bits.split_f32(bits.f32_bits(y)), elem, spec.rounding, rbits,
                              spec.saturate)
  return codes, scales.encode_float_scale(s, sfmt), ts


def quantize_reference(x: jax.Array, spec: str | QuantSpec = "mxfp4", axis: int = -1,
                       key: jax.Array | None = None, *, tensor_scale: Any = SPEC_DEFAULT,
                       pad: bool = False, random_bits: jax.Array | None = None,
                       **overrides) -> QArray:
  """:func:`fp4jax.quantize` in pure JAX (its ``impl="xla"``): same arguments, same
  result. ``overrides`` are ``block_size``, ``scale_mode``, ``rounding``, ``saturate``."""
  req = resolve_request(spec, tensor_scale=tensor_scale, **overrides)
  return quantize_request(check_input(x), req, axis, key, pad=pad, random_bits=random_bits)


def quantize_request(x: jax.Array, req: Request, axis: int, key: jax.Array | None, *,
                     pad: bool = False, random_bits: jax.Array | None = None) -> QArray:
  """Quantizes a checked float ``x`` as a resolved :class:`Request` asks."""
  spec = req.spec
  ax = blocks.normalize_axis(axis, x.ndim)
  if spec.rounding == "stochastic" and key is None and random_bits is None:
    raise ValueError("rounding='stochastic' needs key=jax.random.key(...) (or random_bits=)")
  b, pads = _input_bits(x, spec, ax, pad)
  ext = blocks.block_extents(b.shape, spec, ax)
  amax = blocks.block_max(bits.abs_bits(b), ext)
  if spec.granularity == "tensor":  # one scale for the whole tensor: global across shards
    amax = tensor_amax.reduce_amax_bits(amax)
  rbits = _random_bits(spec, key, random_bits, x.shape, pads, b.shape)
  ts = None
  if spec.scale_format.is_pow2:
    codes, stored_scales = _encode_pow2(b, amax, ext, spec, rbits)
  else:
    codes, stored_scales, ts = _encode_float(b, amax, ext, spec, rbits, req.tensor_scale)
  packed = packing.pack(codes, spec.element.bits, ax, spec.packed)
  # The codes are quantize's product: materialise them, so that a following dequantize
  # is not fused into (and duplicated through) the encoding graph.
  packed = jax.lax.optimization_barrier(packed)
  ts_store = None if ts is None else ts.reshape((1,) * x.ndim)
  return QArray(packed, stored_scales, ts_store, spec, ax, pads, x.dtype)


__all__ = ["FLOAT_DTYPES", "Request", "SPEC_DEFAULT", "check_input", "quantize_reference", "tensor_scale",
           "quantize_request", "resolve_request"]
