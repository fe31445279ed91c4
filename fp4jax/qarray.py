"""``QArray``: a quantized array as a pytree (codes, scales, tensor scale + static spec)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fp4jax import bits, decode, packing
from fp4jax import rounding as rounding_lib
from fp4jax.spec import QuantSpec


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True, eq=False)
class QArray:
  """A quantized array.

  Leaves (arrays, so the whole thing works under ``jit``, ``vmap``, ``grad`` as data,
  and ``jax.tree`` utilities):
    codes: ``uint8`` element codes in the input's layout, packed along ``axis``
      (two E2M1 codes per byte, low nibble first; see :mod:`fp4jax.packing`).
    scales: block scales with the input's rank (``float8_e8m0fnu`` for E8M0,
      ``float8_e4m3fn`` for UE4M3, ``bfloat16``/``float32``).
    tensor_scale: FP32 second-level scale of rank-kept shape ``(1,)*ndim``, or None.

  Static metadata: ``spec``, the packed ``axis`` (negative), per-dimension zero
  ``padding`` (trailing dims) and the original ``orig_dtype``.
  """

  codes: Any
  scales: Any
  tensor_scale: Any
  spec: QuantSpec
  axis: int
  padding: tuple[int, ...]
  orig_dtype: Any

  def tree_flatten(self):
    return (self.codes, self.scales, self.tensor_scale), (
        self.spec, self.axis, self.padding, self.orig_dtype)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, *aux)

  # ---- shape information, derived from the leaves so that vmap stays consistent ----
  @property
  def padded_shape(self) -> tuple[int, ...]:
    shape = list(self.codes.shape)
    shape[self.axis] = packing.unpacked_length(shape[self.axis], self.spec.element.bits,
                                               self.spec.packed)
    return tuple(shape)

  @property
  def shape(self) -> tuple[int, ...]:
    """Logical shape of the quantized array (padding removed)."""
    shape = list(self.padded_shape)
    for i, p in enumerate(self.padding):
      shape[len(shape) - len(self.padding) + i] -= p
    return tuple(shape)

  @property
  def ndim(self) -> int:
    return len(self.codes.shape)

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def dtype(self):
    """The dtype the array had before quantization (and dequantizes to by default)."""
    return self.orig_dtype

  @property
  def nbytes(self) -> int:
    """Bytes actually stored: codes + scales + tensor scale."""
    n = self.codes.size * np.dtype(self.codes.dtype).itemsize
    n += self.scales.size * np.dtype(self.scales.dtype).itemsize
    if self.tensor_scale is not None:
      n += self.tensor_scale.size * np.dtype(self.tensor_scale.dtype).itemsize
    return int(n)

  @property
  def bits_per_element(self) -> float:
    """Storage bits per logical element, codes + block scales (tensor scale excluded):
    4.25 for MXFP4, 4.5 for NVFP4 when nothing is padded."""
    n = self.codes.size * np.dtype(self.codes.dtype).itemsize
    n += self.scales.size * np.dtype(self.scales.dtype).itemsize
    return 8.0 * n / max(self.size, 1)

  def dequantize(self, dtype=None) -> jax.Array:
    """The represented values, as ``dtype`` (default: the original dtype); exact
    (:func:`fp4jax.decode.dequantize`)."""
    return decode.dequantize(self, dtype)

  def element_scales(self) -> jax.Array:
    """The float32 scale of every element (:func:`fp4jax.decode.element_scales`)."""
    return decode.element_scales(self)

  def transpose(self) -> "QArray":
    """The QArray of the 2D transpose: codes and scales transposed, the blocked axis
    flipped (a (M, K) array blocked along K becomes (K, M) blocked along K, i.e.
    ``axis=-2``). No element is re-encoded, so it is exact and free of rounding."""
    if self.ndim != 2:
      raise ValueError(f"QArray.transpose takes 2D arrays, got shape {self.shape}; use "
                       "matrix_transpose (.mT) to swap the last two axes of a batch")
    return self.matrix_transpose()

  @property
  def T(self) -> "QArray":  # noqa: N802 (numpy's name)
    """:meth:`transpose`."""
    return self.transpose()

  def matrix_transpose(self) -> "QArray":
    """The QArray with its last two axes swapped (leading axes, e.g. experts, kept), as
    ``jnp.matrix_transpose``: codes and scales swapped, the blocked axis following them.
    No element is re-encoded. A (E, N, K) weight blocked along K (the gpt-oss / PyTorch
    layout) becomes a (E, K, N) Flax-style kernel blocked along axis -2."""
    if self.ndim < 2:
      raise ValueError(f"QArray.matrix_transpose needs at least 2 axes, got shape {self.shape}")
    n = self.ndim
    swap = lambda a: None if a is None else jnp.swapaxes(a, -1, -2)
    axis = self.axis % n
    axis = {n - 1: n - 2, n - 2: n - 1}.get(axis, axis) - n
    spec = self.spec
    if spec.granularity == "tile":
      spec = spec.replace(tile=tuple(reversed(spec.tile)))
    padding = self.padding[:-2] + (self.padding[-1], self.padding[-2])
    return QArray(swap(self.codes), swap(self.scales), swap(self.tensor_scale), spec, axis,
                  padding, self.orig_dtype)

  def scaled_matmul_operand(self) -> tuple[jax.Array, jax.Array]:
    """``(values, scales)`` as :func:`jax.nn.scaled_matmul` takes an operand: the blocked
    (contraction) axis moved last, element codes as their float dtype (``float4_e2m1fn``
    for E2M1, ``float8_e4m3fn`` / ``float8_e5m2`` for MXFP8) and block scales as stored
    (``float8_e8m0fnu`` for E8M0, ``float8_e4m3fn`` for NVFP4's UE4M3).

    For ``a @ b`` with ``a`` (M, K) blocked along K and ``b`` (K, N) blocked along K,
    ``scaled_matmul(lhs[None], rhs[None], ls[None], rs[None])`` with ``lhs, ls =
    a.scaled_matmul_operand()`` and ``rhs, rs = b.scaled_matmul_operand()`` (N, K) is the
    product without the tensor scales, which the caller multiplies in (two-level specs).
    Shapes are the padded ones (padding is zeros, which add nothing to a product).

    Raises:
      ValueError: the spec is not one cuDNN's block-scaled GEMM takes (E2M1 or 8-bit float
        elements, blocks of 16 or 32, E8M0 or UE4M3 scales), or it is not 2D/3D.
    """
    s = self.spec
    floats = {"e2m1": jnp.float4_e2m1fn, "e4m3": jnp.float8_e4m3fn, "e5m2": jnp.float8_e5m2}
    why = None
    if s.granularity != "block" or s.block_size not in (16, 32):
      why = f"{s.granularity} scales with blocks of {s.block_size} (needs blocks of 16 or 32)"
    elif s.element.name not in floats:
      why = f"{s.element.name} elements (needs E2M1, E4M3 or E5M2)"
    elif s.scale_format.name not in ("e8m0", "ue4m3"):
      why = f"{s.scale_format.name} scales (needs E8M0 or UE4M3)"
    elif self.ndim not in (2, 3):
      why = f"rank {self.ndim} (needs (M, K) or (batch, M, K))"
    if why:
      raise ValueError(f"QArray.scaled_matmul_operand: {s.name or 'this spec'} has {why}")
    axis = self.axis % self.ndim
    if s.element.name == "e2m1":
      c = packing.unpack(self.codes, 4, self.axis, s.packed).astype(jnp.uint32)
      values = bits.bits_f32(rounding_lib.e2m1_f32_bits(c)).astype(jnp.float4_e2m1fn)
    else:   # 8-bit float codes are the float8 bit patterns themselves
      values = jax.lax.bitcast_convert_type(self.codes.astype(jnp.uint8), floats[s.element.name])
    return jnp.moveaxis(values, axis, -1), jnp.moveaxis(self.scales, axis, -1)

  @property
  def mT(self) -> "QArray":  # noqa: N802 (the array API's name)
    """:meth:`matrix_transpose`."""
    return self.matrix_transpose()

  def __repr__(self) -> str:
    ts = "" if self.tensor_scale is None else ", tensor_scale=f32"
    return (f"QArray(shape={self.shape}, spec={self.spec.name or 'custom'}, "
            f"element={self.spec.element.name}, scale={self.spec.scale_format.name}, "
            f"axis={self.axis}, codes={self.codes.dtype}{list(self.codes.shape)}, "
            f"scales={self.scales.dtype}{list(self.scales.shape)}{ts})")
