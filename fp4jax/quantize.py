"""quantize / dequantize / fake_quant: the public entry points of the numerics.

``quantize`` reads the input's float bits once, takes block maxima on integer bit
patterns, derives scales (:mod:`fp4jax.scales`), rounds every element onto the element
grid (:mod:`fp4jax.rounding`) and packs the codes (:mod:`fp4jax.packing`) into a
:class:`~fp4jax.qarray.QArray`. ``dequantize`` inverts the encoding exactly.
Nothing here uses float arithmetic that a flush-to-zero backend could change.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fp4jax import bits, blocks, distributed, packing, prng, scales
from fp4jax import rounding as rounding_lib
from fp4jax.qarray import QArray
from fp4jax.spec import QuantSpec, resolve_spec

_SPEC_DEFAULT: Any = "spec"  # sentinel: use the spec's own tensor_scale setting
_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _check_input(x: Any) -> jax.Array:
  x = jnp.asarray(x)
  if x.dtype not in [jnp.dtype(d) for d in _FLOAT_DTYPES]:
    raise TypeError(f"quantize: x must be float32, bfloat16 or float16, got {x.dtype}; "
                    "cast it first (e.g. x.astype(jnp.float32))")
  if x.ndim == 0:
    raise ValueError("quantize: x must have at least one dimension (got a scalar); "
                     "reshape it, e.g. x.reshape(1)")
  return x


def quantize(x: jax.Array, spec: str | QuantSpec = "mxfp4", axis: int = -1,
             block_size: int | None = None, scale_mode: str | None = None,
             rounding: str | None = None, key: jax.Array | None = None, *,
             tensor_scale: Any = _SPEC_DEFAULT, pad: bool = False,
             random_bits: jax.Array | None = None, saturate: bool | None = None,
             impl: str = "xla") -> QArray:
  """Quantizes ``x`` to a block-scaled low-precision format.

  Args:
    x: float32 / bfloat16 / float16 array of any rank ``>= 1``.
    spec: a preset name (``"mxfp4"``, ``"nvfp4"``, ... see ``fp4jax.PRESETS``) or a
      :class:`QuantSpec`.
    axis: the axis along which elements share a scale (blocks run along it, codes are
      packed along it); for GEMM operands, the contraction axis.
    block_size: overrides the spec's block size (switches per-channel specs to blocks).
    scale_mode: overrides the scale mode (``floor``/``ceil``/``even``/``rceil`` for
      E8M0 scales, ``amax`` for float scales). None keeps the spec's.
    rounding: overrides the rounding: ``"nearest"``, ``"stochastic"``, ``"toward_zero"``.
    key: ``jax.random`` key for stochastic rounding (bits from :mod:`fp4jax.prng`).
    tensor_scale: ``"amax"`` (two-level, NVFP4's default), ``None`` (one level) or an
      FP32 value used as the tensor scale itself (e.g. from a previous step's amax via
      :func:`fp4jax.scales.tensor_scale_from_amax`). Default: the spec's setting.
    pad: zero-pad blocked axes that do not divide; otherwise that is an error.
    random_bits: uint32 array of ``x.shape``, an alternative to ``key``.
    saturate: overrides the spec's overflow behaviour.
    impl: ``"xla"`` (this pure-JAX implementation), ``"pallas"`` (the fused kernels of
      ``kernels/quantize.py``; interpret mode off GPU; an error for configurations they do
      not take) or ``"auto"`` (Pallas on a GPU where supported, else ``"xla"``). The
      choice is logged at DEBUG level on the ``"fp4jax"`` logger.

  Returns:
    A :class:`QArray` with ``codes`` (uint8, packed along ``axis``), ``scales`` of the
    input's rank with blocked dimensions divided by their block extent, and
    ``tensor_scale`` (shape ``(1,)*x.ndim``) for two-level scaling.
  """
  if impl not in ("xla", "auto", "pallas"):
    raise ValueError(f"impl must be 'xla', 'pallas' or 'auto', got {impl!r}")
  if impl != "xla":
    q = _maybe_pallas(x, spec, axis, block_size, scale_mode, rounding, key, tensor_scale,
                      pad, random_bits, saturate, impl)
    if q is not None:
      return q
  spec = resolve_spec(spec, block_size=block_size, scale_mode=scale_mode, rounding=rounding,
                      saturate=saturate)
  explicit_ts = None
  if tensor_scale is not _SPEC_DEFAULT:
    if tensor_scale is None or (isinstance(tensor_scale, str) and tensor_scale == "amax"):
      spec = spec.replace(tensor_scale=tensor_scale)
    elif isinstance(tensor_scale, str):
      raise ValueError(f"tensor_scale must be 'amax', None or an FP32 value, got {tensor_scale!r}")
    else:
      spec = spec.replace(tensor_scale="amax")
      explicit_ts = jnp.asarray(tensor_scale, jnp.float32)
      if explicit_ts.size != 1:
        raise ValueError(f"tensor_scale must be a scalar, got shape {explicit_ts.shape}")
      explicit_ts = explicit_ts.reshape(())
  x = _check_input(x)
  ax = blocks.normalize_axis(axis, x.ndim)
  elem, sfmt = spec.element, spec.scale_format
  if spec.rounding == "stochastic" and key is None and random_bits is None:
    raise ValueError("rounding='stochastic' needs key=jax.random.key(...) (or random_bits=)")

  group = packing.codes_per_group(elem.bits, spec.packed)[0]
  pads = blocks.padding(x.shape, spec, ax, group, pad)
  b = bits.f32_bits(bits.to_f32_exact(x))
  if any(pads):
    b = jnp.pad(b, [(0, p) for p in pads])
  full = b.shape
  ext = blocks.block_extents(full, spec, ax)
  amax = blocks.block_max(bits.abs_bits(b), ext)
  if spec.granularity == "tensor":  # one scale for the whole tensor: global across shards
    amax = distributed.reduce_amax_bits(amax)

  rbits = None
  if spec.rounding == "stochastic":
    if random_bits is not None:
      random_bits = jnp.asarray(random_bits)
      if random_bits.shape != x.shape or random_bits.dtype != jnp.uint32:
        raise ValueError(f"random_bits must be uint32 of shape {x.shape}, got "
                         f"{random_bits.dtype}{random_bits.shape}")
      rbits = jnp.pad(random_bits, [(0, p) for p in pads]) if any(pads) else random_bits
    else:
      rbits = prng.random_bits_for(key, full)

  ts_store = None
  if sfmt.is_pow2:
    code = scales.pow2_scale_code(amax, elem, sfmt, spec.scale_mode)
    shift = blocks.expand(scales.pow2_scale_exponent(code, sfmt), ext, full)
    codes = rounding_lib.encode(bits.split_f32(b), elem, spec.rounding, rbits, spec.saturate,
                            exp_shift=shift)
    nan_block = blocks.expand(scales.pow2_scale_is_nan(code, sfmt), ext, full)
    codes = jnp.where(nan_block, jnp.uint32(elem.nan_code or 0), codes)
    stored_scales = scales.store_pow2_scale(code, sfmt)
  else:
    ts = None
    if spec.tensor_scale == "amax":
      if explicit_ts is not None:
        ts = explicit_ts
      else:
        tensor_amax = bits.bits_f32(
            distributed.reduce_amax_bits(jnp.max(amax)).astype(jnp.uint32))
        ts = scales.tensor_scale_from_amax(tensor_amax, elem, sfmt)
      # Materialise the scalar: otherwise XLA fuses the whole-tensor reduction into
      # every consumer of the exact-division graph and compile time explodes.
      ts = jax.lax.optimization_barrier(ts)
      ts_store = ts.reshape((1,) * x.ndim)
    s = scales.float_block_scale(amax, elem, sfmt, ts)
    # Per-block values are materialised before being broadcast to elements: XLA would
    # otherwise duplicate the exact-division graph into every element fusion (minutes
    # of compile time on CPU).
    s, recip = jax.lax.optimization_barrier((s, scales.float_scale_reciprocal(s, ts)))
    recip = blocks.expand(recip, ext, full)
    y = bits.mul_f32(bits.bits_f32(b), recip)
    codes = rounding_lib.encode(bits.split_f32(bits.f32_bits(y)), elem, spec.rounding, rbits,
                            spec.saturate)
    stored_scales = scales.encode_float_scale(s, sfmt)
  packed = packing.pack(codes, elem.bits, ax, spec.packed)
  # The codes are quantize's product: materialise them, so that a following dequantize
  # is not fused into (and duplicated through) the encoding graph.
  packed = jax.lax.optimization_barrier(packed)
  return QArray(packed, stored_scales, ts_store, spec, ax, pads, x.dtype)


def _maybe_pallas(x, spec, axis, block_size, scale_mode, rounding, key, tensor_scale, pad,
                  random_bits, saturate, impl) -> QArray | None:
  """The one dispatch point to the Pallas kernels (imported lazily): a QArray from
  ``kernels.quantize``, or None where ``impl="auto"`` falls back to this module."""
  import logging
  log = logging.getLogger("fp4jax")
  from kernels import quantize as kq  # kernels import the core; never the reverse at import
  spec = resolve_spec(spec, block_size=block_size, scale_mode=scale_mode, rounding=rounding,
                      saturate=saturate)
  x = jnp.asarray(x)
  why = kq.unsupported_reason(x.shape, x.dtype, spec, axis)
  if why is None and random_bits is not None:
    why = "explicit random_bits (kernels hash their own from key)"
  if why is None and pad:
    why = "pad=True"
  if why is None and tensor_scale is not _SPEC_DEFAULT and tensor_scale != spec.tensor_scale:
    if tensor_scale is None or isinstance(tensor_scale, str):
      why = "a tensor_scale mode other than the spec's"
  gpu = kq.on_gpu()
  if why is None and impl == "auto" and not gpu:
    why = "not on a GPU"
  if why is not None:
    if impl == "pallas":
      raise ValueError(f"quantize(impl='pallas'): unsupported configuration: {why}; use "
                       "impl='auto' to fall back to the pure-JAX path")
    log.debug("fp4jax.quantize: %s via xla (%s)", spec.name or "custom", why)
    return None
  explicit = None if tensor_scale is _SPEC_DEFAULT or isinstance(tensor_scale, str) \
      else tensor_scale
  log.debug("fp4jax.quantize: %s axis %d via pallas%s", spec.name or "custom", axis,
            "" if gpu else " (interpret mode)")
  return kq.quantize(x, spec, axis, key, tensor_scale=explicit, interpret=not gpu)


def dequantize(q: QArray, dtype: Any = None) -> jax.Array:
  """The values a :class:`QArray` represents, as ``dtype`` (default: the input's dtype).

  Exact: element values times scales are formed from bits (E8M0) or with exactly
  rounded float32 products (float scales, as torchao: ``q * (t * s)``), then cast.
  """
  if not isinstance(q, QArray):
    raise TypeError(f"dequantize expects a QArray, got {type(q).__name__}")
  spec = q.spec
  elem, sfmt = spec.element, spec.scale_format
  codes = packing.unpack(q.codes, elem.bits, q.axis, spec.packed)
  full = codes.shape
  nd = len(q.padding)
  ext = blocks.block_extents(full[-nd:], spec, q.axis)
  if sfmt.is_pow2:
    code = scales.load_pow2_scale(q.scales)
    shift = blocks.expand(scales.pow2_scale_exponent(code, sfmt), ext, full)
    out = rounding_lib.decode_to_f32(codes, elem, exp_shift=shift)
    out = jnp.where(blocks.expand(scales.pow2_scale_is_nan(code, sfmt), ext, full),
                    jnp.float32(jnp.nan), out)
  else:
    s = scales.decode_float_scale(q.scales, sfmt)
    if q.tensor_scale is not None:
      s = bits.mul_f32(q.tensor_scale, s)  # shape (lead..., 1, ..., 1) broadcasts
    s = jax.lax.optimization_barrier(s)  # see quantize: keep block math out of element fusions
    out = bits.mul_f32(rounding_lib.decode_to_f32(codes, elem), blocks.expand(s, ext, full))
  if any(q.padding):
    out = out[(Ellipsis,) + tuple(slice(0, n - p) for n, p in zip(full[-nd:], q.padding))]
  return out.astype(q.orig_dtype if dtype is None else dtype)


def element_scales(q: QArray) -> jax.Array:
  """The float32 scale multiplying each element's code value (shape ``q.shape``):
  ``2^s`` for power-of-two scales, ``s`` or ``t * s`` for float scales. Surrogate
  gradients evaluate on ``x / element_scales(q)``."""
  if not isinstance(q, QArray):
    raise TypeError(f"element_scales expects a QArray, got {type(q).__name__}")
  spec = q.spec
  sfmt = spec.scale_format
  full = packing.unpack(q.codes, spec.element.bits, q.axis, spec.packed).shape
  nd = len(q.padding)
  ext = blocks.block_extents(full[-nd:], spec, q.axis)
  if sfmt.is_pow2:
    code = scales.load_pow2_scale(q.scales)
    s = bits.compose_f32(jnp.zeros_like(code), jnp.ones_like(code),
                         scales.pow2_scale_exponent(code, sfmt))
    s = jnp.where(scales.pow2_scale_is_nan(code, sfmt), jnp.float32(jnp.nan), s)
  else:
    s = scales.decode_float_scale(q.scales, sfmt)
    if q.tensor_scale is not None:
      s = bits.mul_f32(q.tensor_scale, s)
  out = blocks.expand(s, ext, full)
  if any(q.padding):
    out = out[(Ellipsis,) + tuple(slice(0, n - p) for n, p in zip(full[-nd:], q.padding))]
  return out


def fake_quant(x: jax.Array, spec: str | QuantSpec = "mxfp4", axis: int = -1,
               **kwargs) -> jax.Array:
  """``dequantize(quantize(x, spec, axis, **kwargs), x.dtype)``: x rounded onto the format."""
  x = jnp.asarray(x)
  return dequantize(quantize(x, spec, axis, **kwargs), x.dtype)
