r"""Unpack FP4 GEMM operands for a vendor GEMM: packed E2M1 codes + 8-bit block scales ->
one E4M3 or BF16 element per value, K-major, in one memory-bound pass.

The Hopper FP4 GEMMs of :mod:`fp4jax.kernels.matmul` (``impl="fp8_xla"`` / ``"bf16_xla"``)
hand the unpacked operands to XLA's GEMM (cuBLASLt), which on Hopper beats a Triton GEMM
that decodes nibbles between its MMAs (kernels/NOTES.md has the measurements). This
kernel is the decoding pass; it reads 4.25-4.5 bits per element and writes 8 or 16.

Layout. Both operands come out K-major, as ``(rows, K)``: ``role="lhs"`` takes ``a``
(M, K) blocked along K (codes (M, K/2)); ``role="rhs"`` takes ``b`` (K, N) blocked along K
(codes (K/2, N)) and writes its transpose (N, K), the "NT" form cuBLASLt's FP8 GEMM
needs. The contraction axis is permuted the same way for both: K is cut into tiles of
``2T`` elements (``T`` = :func:`k_tile_bytes` packed bytes) and within a tile the ``T``
even positions (low nibbles) come first, then the ``T`` odd ones (high nibbles). A dot
over K does not care about the order of K as long as both operands share it, and this
order needs no nibble interleaving (Triton cannot interleave values along a row).

Element values (``to``):

* ``"e4m3"`` (E8M0 scales only): ``value(c) * 2^(s - r)`` with ``r`` a reference scale
  code per output row (``ref_code``, usually the row's largest ``s``). Exact when
  ``-8 <= s - r <= 6``: E2M1 magnitudes 0.5..6 times 2^-8..2^6 are E4M3 numbers (down to
  its subnormal 2^-9, up to 384 <= 448). Outside, ``s - r`` is clamped: the caller checks
  the spread (and NaN scales, code 255) before trusting the result.
* ``"bf16"``: ``value(c) * scale`` with the scale decoded to float32 (E8M0 with NaN, or
  UE4M3 with subnormals and NaN): exact, as a product of a 2-significant-bit E2M1 value
  and a 4-bit E4M3 significand (or a power of two) fits BF16's 8 bits, and BF16 has
  float32's exponent range. It equals the float32 dequantized value wherever that is
  finite and non-NaN. Tensor scales (NVFP4's second level) are left to the caller.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from fp4jax import bits, packing, rounding as rounding_lib
from fp4jax.formats import E4M3
from fp4jax.qarray import QArray

U32, I32 = jnp.uint32, jnp.int32
ROLES = ("lhs", "rhs")
TARGETS = ("e4m3", "bf16")


def k_tile_bytes(k: int) -> int:
  """Packed bytes ``T`` per K tile for contraction length ``k`` (a multiple of 32): the
  largest of 128, 64, 32, 16 dividing ``k / 2``. Both operands of a GEMM must use it."""
  return next(t for t in (128, 64, 32, 16) if (k // 2) % t == 0)


def scale_codes(q: QArray) -> jax.Array:
  """The 8-bit scale codes of ``q`` as uint8 (E8M0 / UE4M3 bit patterns)."""
  s = q.scales
  if s.dtype in (jnp.float8_e8m0fnu, jnp.float8_e4m3fn):
    return jax.lax.bitcast_convert_type(s, jnp.uint8)
  if s.dtype != jnp.uint8:
    raise ValueError(f"8-bit scales expected, got {s.dtype}")
  return s


def _check(q: QArray, role: str, to: str, ref_code):
  if role not in ROLES:
    raise ValueError(f"gemm_operand: role must be one of {ROLES}, got {role!r}")
  if to not in TARGETS:
    raise ValueError(f"gemm_operand: to must be one of {TARGETS}, got {to!r}")
  if not isinstance(q, QArray) or q.ndim != 2:
    raise ValueError("gemm_operand: q must be a 2D QArray")
  want = -1 if role == "lhs" else -2
  if q.axis % 2 != want % 2:
    raise ValueError(f"gemm_operand: role={role!r} takes a QArray blocked along axis "
                     f"{want} (the contraction axis), got axis={q.axis}")
  sp = q.spec
  if not (rounding_lib.is_e2m1(sp.element) and sp.packed and sp.granularity == "block"
          and sp.scale_format.storage_bits == 8 and sp.block_size in (16, 32)
          and not any(q.padding)):
    raise ValueError(f"gemm_operand takes packed, unpadded E2M1 with 8-bit block scales "
                     f"and blocks of 16/32, got {sp.name}")
  if to == "e4m3":
    if not (sp.scale_format.is_pow2 and sp.scale_format.bias == 127):
      raise ValueError(f"gemm_operand: to='e4m3' takes E8M0 scales (MX formats), got "
                       f"{sp.name}; use to='bf16'")
    rows = q.shape[0] if role == "lhs" else q.shape[1]
    if ref_code is None or jnp.shape(ref_code) != (rows,):
      raise ValueError(f"gemm_operand: to='e4m3' needs ref_code of shape ({rows},) (one "
                       f"E8M0 code per output row), got "
                       f"{None if ref_code is None else jnp.shape(ref_code)}")


def scale_f32(code, pow2: bool):
  """float32 value of 8-bit scale codes (uint32): E8M0 (255 = NaN) or UE4M3."""
  if pow2:
    e = code.astype(I32) - 127
    e1 = jnp.clip(e, -126, 127)  # 2^-127 is one factor short of normal: two factors
    v = bits.pow2_f32(e1) * bits.pow2_f32(e - e1)
    return jnp.where(code == 255, jnp.float32(jnp.nan), v)
  return rounding_lib.decode_to_f32(code, E4M3)


def fold_e4m3(c, d):
  """E4M3 of ``value(c) * 2^d`` for 4-bit codes ``c`` and int32 ``d`` in [-8, 6]: exact."""
  v = rounding_lib.e2m1_f32_bits(c)
  nonzero = (v & U32(0x7FFFFFFF)) != 0
  v = jnp.where(nonzero, (v.astype(I32) + (d << 23)).astype(U32), v)  # exponent + d
  return bits.bits_f32(v).astype(jnp.float8_e4m3fn)


def _values(c, s, r, *, to, pow2, expand):
  """Elements of codes ``c`` (uint32, one nibble each) with scale codes ``s`` (one per
  block) and reference codes ``r`` (int32, e4m3 only); ``expand`` maps per-block to
  per-element."""
  if to == "e4m3":
    return fold_e4m3(c, expand(jnp.clip(s.astype(I32) - r, -8, 6)))
  return (bits.bits_f32(rounding_lib.e2m1_f32_bits(c)) * expand(scale_f32(s, pow2))
          ).astype(jnp.bfloat16)


def _unpack_kernel(c_ref, s_ref, r_ref, o_ref, *, role, to, block, pow2):
  c = c_ref[...].astype(U32)
  s = s_ref[...].astype(U32)
  if role == "rhs":  # (T, bn) -> (bn, T): K-major output
    c, s = c.T, s.T
  rows, t = c.shape
  nsb = s.shape[1]
  # byte j of a tile holds elements 2j, 2j+1, both in block j // (block / 2)
  expand = lambda v: jnp.broadcast_to(v[:, :, None], (rows, nsb, block // 2)).reshape(rows, t)
  r = r_ref[...]
  o_ref[:, pl.ds(0, t)] = _values(c & U32(15), s, r, to=to, pow2=pow2, expand=expand)
  o_ref[:, pl.ds(t, t)] = _values(c >> 4, s, r, to=to, pow2=pow2, expand=expand)


@functools.partial(jax.jit, static_argnames=("role", "to", "block", "pow2", "rows_tile", "interpret",
                                             "num_warps"))
def _unpack_call(codes, scodes, ref, *, role, to, block, pow2, rows_tile, interpret,
                 num_warps):
  if role == "lhs":
    rows, kh = codes.shape
  else:
    kh, rows = codes.shape
  k = 2 * kh
  t = k_tile_bytes(k)
  nsb = 2 * t // block
  bm = rows_tile
  grid = (pl.cdiv(rows, bm), kh // t)
  if role == "lhs":
    in_specs = [pl.BlockSpec((bm, t), lambda i, j: (i, j)),
                pl.BlockSpec((bm, nsb), lambda i, j: (i, j))]
  else:
    in_specs = [pl.BlockSpec((t, bm), lambda i, j: (j, i)),
                pl.BlockSpec((nsb, bm), lambda i, j: (j, i))]
  in_specs.append(pl.BlockSpec((bm, 1), lambda i, j: (i, 0)))
  extra = {}
  if not interpret:
    from jax.experimental.pallas import triton as pltriton
    extra["compiler_params"] = pltriton.CompilerParams(num_warps=num_warps, num_stages=1)
  dtype = jnp.float8_e4m3fn if to == "e4m3" else jnp.bfloat16
  kernel = functools.partial(_unpack_kernel, role=role, to=to, block=block, pow2=pow2)
  return pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((rows, k), dtype), grid=grid,
      in_specs=in_specs, out_specs=pl.BlockSpec((bm, 2 * t), lambda i, j: (i, j)),
      interpret=interpret, name=f"fp4jax_unpack_{role}_{to}", **extra,
  )(codes, scodes, ref)


def gemm_operand(q: QArray, *, role: str, to: str, ref_code: jax.Array | None = None,
                 interpret: bool = False, rows_tile: int = 64,
                 num_warps: int = 4) -> jax.Array:
  """Unpack a FP4 GEMM operand to E4M3 or BF16 elements, K-major (see the module doc).

  Args:
    q: ``role="lhs"``: (M, K) QArray blocked along K; ``role="rhs"``: (K, N) blocked
      along K. Packed E2M1 with 8-bit scales, blocks of 16 or 32.
    role: "lhs" or "rhs".
    to: "e4m3" (E8M0 scales; ``value * 2^(s - ref_code)``) or "bf16" (``value * scale``).
    ref_code: int32 (rows,) reference E8M0 codes per output row (``to="e4m3"`` only).
    interpret: Pallas interpret mode (CPU).
    rows_tile: output rows per program, a power of two (rows need not be a multiple:
      they are zero-padded to one).

  Returns:
    (M, K) or (N, K) float8_e4m3fn / bfloat16, K permuted as :func:`permute_k` says.
  """
  _check(q, role, to, ref_code)
  rows = q.shape[0] if role == "lhs" else q.shape[1]
  ref = (jnp.zeros((rows,), I32) if ref_code is None else ref_code.astype(I32))[:, None]
  codes, scodes = q.codes, scale_codes(q)
  # Ragged rows are zero-padded to whole tiles rather than left to masked loads and
  # stores: on an H100 a masked, transposed E4M3 tile came out permuted (9 rows of a
  # 32-row tile), so the kernel only ever sees whole tiles.
  rows_tile = min(rows_tile, max(8, 1 << (rows - 1).bit_length()))
  pad = -rows % rows_tile
  if pad:
    axis = 0 if role == "lhs" else 1
    widths = lambda x: [(0, pad) if d == axis else (0, 0) for d in range(x.ndim)]
    codes, scodes = jnp.pad(codes, widths(codes)), jnp.pad(scodes, widths(scodes))
    ref = jnp.pad(ref, ((0, pad), (0, 0)))
  y = _unpack_call(codes, scodes, ref, role=role, to=to, block=q.spec.block_size,
                   pow2=q.spec.scale_format.is_pow2, rows_tile=rows_tile,
                   interpret=interpret, num_warps=num_warps)
  return y[:rows] if pad else y


def permute_k(x: jax.Array) -> jax.Array:
  """(rows, K) in natural K order -> the tile order of :func:`gemm_operand`."""
  rows, k = x.shape
  t = k_tile_bytes(k)
  return x.reshape(rows, k // (2 * t), t, 2).transpose(0, 1, 3, 2).reshape(rows, k)


def gemm_operand_reference(q: QArray, *, role: str, to: str,
                           ref_code: jax.Array | None = None) -> jax.Array:
  """Pure-JAX :func:`gemm_operand` (same values, same K order), from
  :func:`fp4jax.packing.unpack` and whole-array scale repetition."""
  _check(q, role, to, ref_code)
  axis = -1 if role == "lhs" else -2
  codes = packing.unpack(q.codes, 4, axis, True).astype(U32)
  s = jnp.repeat(scale_codes(q).astype(U32), q.spec.block_size, axis=axis)
  if role == "rhs":
    codes, s = codes.T, s.T
  r = None if ref_code is None else ref_code.astype(I32)[:, None]
  v = _values(codes, s, r, to=to, pow2=q.spec.scale_format.is_pow2, expand=lambda x: x)
  return permute_k(v)


__all__ = ["fold_e4m3", "gemm_operand", "gemm_operand_reference", "k_tile_bytes",
           "permute_k", "scale_codes", "scale_f32"]
