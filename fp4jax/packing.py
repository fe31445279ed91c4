"""Packing element codes into bytes.

* 4-bit codes (E2M1, INT4): two per ``uint8`` along the packed axis, element ``2i`` in
  the low nibble and ``2i+1`` in the high nibble: the OCP MX / PyTorch
  ``float4_e2m1fn_x2`` layout (torchao's ``pack_uint4``).
* 6-bit codes (E2M3, E3M2): four per three bytes, as a little-endian bit stream:
  element ``4i+j`` occupies bits ``6j .. 6j+5`` of the 24-bit word made of bytes
  ``3i, 3i+1, 3i+2`` (byte ``3i`` holds bits 0..7).
* 8-bit codes: one per byte.

Functions work along any axis; the packed axis length must be a multiple of the
number of codes per group (2 or 4).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

U8 = jnp.uint8


def codes_per_group(bits: int, packed: bool = True) -> tuple[int, int]:
  """(codes, bytes) per packing group for a code width."""
  if not packed or bits == 8:
    return 1, 1
  if bits == 4:
    return 2, 1
  if bits == 6:
    return 4, 3
  return 1, 1


def pack(codes: jax.Array, bits: int, axis: int = -1, packed: bool = True) -> jax.Array:
  """Packs integer codes (values < 2^bits) along ``axis`` into uint8."""
  n_codes, n_bytes = codes_per_group(bits, packed)
  codes = codes.astype(U8)
  if n_codes == 1:
    return codes
  axis = axis % codes.ndim
  length = codes.shape[axis]
  if length % n_codes:
    raise ValueError(f"pack: axis {axis} has length {length}, not a multiple of {n_codes} "
                     f"({bits}-bit codes pack {n_codes} per {n_bytes} byte(s)); pad it "
                     "(quantize(..., pad=True)) or use a spec with packed=False")
  c = jnp.moveaxis(codes, axis, -1)
  c = c.reshape(*c.shape[:-1], length // n_codes, n_codes)
  if bits == 4:
    out = c[..., 0] | (c[..., 1] << 4)
  else:  # 6-bit: 24-bit little-endian word from four codes, then its three bytes
    w = [c[..., j].astype(jnp.uint32) << (6 * j) for j in range(4)]
    word = w[0] | w[1] | w[2] | w[3]
    out = jnp.stack([(word >> (8 * j)) & 0xFF for j in range(3)], axis=-1).astype(U8)
    out = out.reshape(*out.shape[:-2], out.shape[-2] * out.shape[-1])  # not -1: see unpack
  return jnp.moveaxis(out.astype(U8), -1, axis)


def unpack(packed_codes: jax.Array, bits: int, axis: int = -1, packed: bool = True) -> jax.Array:
  """Inverse of :func:`pack`: uint8 codes, one per element."""
  n_codes, n_bytes = codes_per_group(bits, packed)
  if n_codes == 1:
    return packed_codes.astype(U8)
  axis = axis % packed_codes.ndim
  p = jnp.moveaxis(packed_codes.astype(U8), axis, -1)
  if bits == 4:
    out = jnp.stack([p & 0xF, p >> 4], axis=-1)
  else:
    g = p.reshape(*p.shape[:-1], p.shape[-1] // 3, 3).astype(jnp.uint32)
    word = g[..., 0] | (g[..., 1] << 8) | (g[..., 2] << 16)
    out = jnp.stack([(word >> (6 * j)) & 0x3F for j in range(4)], axis=-1).astype(U8)
  # An explicit length: reshape(-1) is ambiguous when another axis is empty.
  out = out.reshape(*out.shape[:-2], out.shape[-2] * out.shape[-1])
  return jnp.moveaxis(out, -1, axis)


def packed_length(length: int, bits: int, packed: bool = True) -> int:
  n_codes, n_bytes = codes_per_group(bits, packed)
  return length // n_codes * n_bytes


def unpacked_length(length: int, bits: int, packed: bool = True) -> int:
  n_codes, n_bytes = codes_per_group(bits, packed)
  return length // n_bytes * n_codes
