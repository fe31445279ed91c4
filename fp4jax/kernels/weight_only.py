r"""Weight-only FP4 GEMM: BF16/F32 activations times packed FP4 weights.

The weights ``w`` (K, N), blocked along K, are read packed (4.25-4.5 bits per weight)
and decoded in the kernel, which is what pays on Hopper for skinny M (decoding,
evaluation): the GEMM is then bound by reading the weights. Activations are rounded to
BF16; products accumulate in float32. The reference is :func:`weight_only_reference`.

Like the GEMM kernels, the contraction axis is split into even and odd positions: the low
nibble of a packed byte is an even ``k``, the high nibble the next odd one, and the
activations are loaded with matching strides, so no nibble is interleaved back (Triton
can only join along a trailing axis). :func:`fp4jax.weight_only_matmul` is the public
entry (it takes ``interpret`` from :mod:`fp4jax.dispatch`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from fp4jax import bits, decode, rounding as rounding_lib
from fp4jax.kernels import unpack as fu
from fp4jax.kernels.matmul import apply_tensor_scales
from fp4jax.kernels.quantize import largest_dividing
from fp4jax.qarray import QArray

U32 = jnp.uint32
BLOCK_SIZES = (16, 32)
PROGRAMS_TO_FILL = 264   # two programs per SM of an H100 (132 SMs)
MAX_SPLITS = 16
_HIGHEST = lax.Precision.HIGHEST


def halves(codes):
  """Packed uint8 codes -> (low nibbles, high nibbles) as uint32 (even, odd k)."""
  c = codes.astype(U32)
  return c & U32(15), c >> 4


def _tile_reason(m, n, k, bm, bn, bk, block) -> str | None:
  if m % bm or n % bn or k % bk:
    return (f"shape (M={m}, K={k}, N={n}) is not a multiple of the tile "
            f"(bm={bm}, bk={bk}, bn={bn}); pad the operands or pass a smaller tile=")
  if bk % block:
    return f"bk={bk} is not a multiple of the block size {block}"
  return None


def _weight_only_kernel(x_ref, bc_ref, bs_ref, o_ref, *, bk, bs_b, nk, pow2_b):
  bm, bn = o_ref.shape  # the leading split axis is squeezed
  hk = bk // 2
  nb = bk // bs_b

  def body(kt, acc):
    # even / odd k of the activations as two strided loads, matching the nibbles of w
    xe = x_ref[:, pl.ds(kt * bk, hk, stride=2)].astype(jnp.bfloat16)
    xo = x_ref[:, pl.ds(kt * bk + 1, hk, stride=2)].astype(jnp.bfloat16)
    bc = bc_ref[pl.ds(kt * hk, hk), :]
    code = bs_ref[pl.ds(kt * nb, nb), :].astype(U32)
    sb = fu.scale_f32(code, pow2_b)
    sbe = jnp.broadcast_to(sb[:, None, :], (nb, bs_b // 2, bn)).reshape(hk, bn)
    b_lo, b_hi = halves(bc)
    vb = lambda c: (bits.bits_f32(rounding_lib.e2m1_f32_bits(c)) * sbe).astype(jnp.bfloat16)
    return (acc + jnp.dot(xe, vb(b_lo), preferred_element_type=jnp.float32)
            + jnp.dot(xo, vb(b_hi), preferred_element_type=jnp.float32))

  acc = lax.fori_loop(0, nk, body, jnp.zeros((bm, bn), jnp.float32))
  o_ref[...] = acc  # this K split's float32 partial sum


@functools.partial(jax.jit, static_argnames=("bm", "bn", "bk", "splits", "out_dtype",
                                             "interpret", "num_warps", "num_stages"))
def _weight_only_call(x, w: QArray, *, bm, bn, bk, splits, out_dtype, interpret, num_warps,
                      num_stages):
  m, k = x.shape
  n = w.shape[1]
  bs_b = w.spec.block_size
  mp = -(-m // bm) * bm
  xp = jnp.pad(x, ((0, mp - m), (0, 0))) if mp != m else x
  ks = k // splits  # each program reduces one K split; XLA adds the partials
  kernel = functools.partial(_weight_only_kernel, bk=bk, bs_b=bs_b, nk=ks // bk,
                             pow2_b=w.spec.scale_format.is_pow2)
  extra = {}
  if not interpret:
    from jax.experimental.pallas import triton as pltriton
    extra["compiler_params"] = pltriton.CompilerParams(num_warps=num_warps,
                                                       num_stages=num_stages)
  part = pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((splits, mp, n), jnp.float32),
      grid=(mp // bm, n // bn, splits),
      in_specs=[pl.BlockSpec((bm, ks), lambda i, j, s: (i, s)),
                pl.BlockSpec((ks // 2, bn), lambda i, j, s: (s, j)),
                pl.BlockSpec((ks // bs_b, bn), lambda i, j, s: (s, j))],
      out_specs=pl.BlockSpec((None, bm, bn), lambda i, j, s: (s, i, j)),
      interpret=interpret, name="fp4jax_matmul_weight_only", **extra,
  )(xp, w.codes, fu.scale_codes(w))
  y = jnp.sum(part, axis=0) if splits > 1 else part[0]
  return apply_tensor_scales(y, w, None, out_dtype)[:m]


def weight_only_rows_tile(m: int) -> int:
  """Rows per program of the weight-only kernel: 16, 32 or 64, the smallest covering
  ``m`` (Triton blocks are powers of two; past 64 the row tiles re-read the weights from
  L2 rather than spill registers)."""
  return 16 if m <= 16 else 32 if m <= 32 else 64


def weight_only_splits(m: int, n: int, k: int, bm: int, bn: int, bk: int,
                       programs: int = PROGRAMS_TO_FILL) -> int:
  """K splits for the weight-only kernel: doubled (while K allows) until the grid has
  ``programs`` programs (two per H100 SM), since a skinny GEMM has too few output tiles
  to fill the GPU."""
  splits, base = 1, -(-m // bm) * (n // bn)
  while base * splits < programs and (k // bk) % (2 * splits) == 0 and splits < MAX_SPLITS:
    splits *= 2
  return splits


def weight_only_reference(x: jax.Array, w: QArray, out_dtype: Any = jnp.float32) -> jax.Array:
  """float32 product of ``x`` (as bf16, what the kernel multiplies) and dequantized ``w``."""
  xb = x.astype(jnp.bfloat16).astype(jnp.float32)
  return jnp.dot(xb, decode.dequantize(w, jnp.float32), precision=_HIGHEST,
                 preferred_element_type=jnp.float32).astype(out_dtype)


# Tile bounds of :func:`weight_only_tile`: the defaults, and the smallest tiles Triton's
# dot takes (16 on each side).
DEFAULT_BN, DEFAULT_BK, MIN_TILE = 64, 256, 16


def weight_only_tile(m: int, k: int, n: int, block: int) -> tuple[int, int, int] | None:
  """The (bm, bn, bk) tile for an (M, K) x (K, N) weight-only GEMM: the default where it
  divides, else the largest power of two below it that divides N (bn) or K (bk, a multiple
  of the quantization block); None where none does (then the weights are dequantized and
  XLA's GEMM runs, see :func:`fp4jax.dispatch.choose_weight_only`). M is padded."""
  bn = largest_dividing(n, DEFAULT_BN, MIN_TILE)
  bk = largest_dividing(k, DEFAULT_BK, max(MIN_TILE, block))
  if bn is None or bk is None:
    return None
  return weight_only_rows_tile(m), bn, bk


def _takes_weights(w: QArray) -> bool:
  """Packed E2M1 codes with 8-bit scales in 1D blocks of 16/32, unpadded."""
  s = w.spec
  return (rounding_lib.is_e2m1(s.element) and s.packed and not any(w.padding)
          and s.scale_format.storage_bits == 8 and s.block_size in BLOCK_SIZES
          and s.granularity == "block")


def unsupported_reason(x_shape, w: Any) -> str | None:
  """Why :func:`weight_only_matmul` cannot take ``x @ w`` (None: it can, with
  :func:`weight_only_tile`)."""
  if not isinstance(w, QArray) or w.ndim != 2 or w.axis % 2 != 0:
    return "the weight is not a 2D QArray blocked along K (axis -2)"
  if len(x_shape) != 2 or x_shape[1] != w.shape[0]:
    return f"x {tuple(x_shape)} and w {w.shape} do not contract"
  s = w.spec
  if not _takes_weights(w):
    return (f"{s.name or 'the spec'} is not packed E2M1 with 8-bit scales in blocks of "
            f"{'/'.join(map(str, BLOCK_SIZES))} (unpadded)")
  if weight_only_tile(x_shape[0], x_shape[1], w.shape[1], s.block_size) is None:
    return (f"no tile divides K={x_shape[1]}, N={w.shape[1]} (powers of two >= {MIN_TILE}, "
            f"K's a multiple of the block {s.block_size})")
  return None


def weight_only_matmul(x: jax.Array, w: QArray, *, out_dtype: Any = jnp.bfloat16,
                       tile: tuple[int, int, int] | None = None,
                       splits: int | None = None, interpret: bool = False,
                       num_warps: int = 4, num_stages: int = 3) -> jax.Array:
  """``x @ w`` for BF16/F32 activations ``x`` (M, K) and FP4 weights ``w`` (K, N), blocked
  along K: the weights are read packed (4.25-4.5 bits) and unpacked in the kernel, which
  is what pays on Hopper for skinny M (decoding, evaluation). ``x`` is rounded to bf16.

  tile: (bm, bn, bk), default (:func:`weight_only_rows_tile`, 64, 256); M is padded to
    bm, K and N must be multiples; bm, bn, bk powers of two on a GPU.
  splits: K splits, each a program's float32 partial sum, added by XLA (default
    :func:`weight_only_splits`).
  """
  if not isinstance(w, QArray) or w.ndim != 2 or w.axis % 2 != 0:
    raise ValueError("weight_only_matmul: w must be a 2D QArray blocked along K (axis=-2)")
  if x.ndim != 2 or x.shape[1] != w.shape[0]:
    raise ValueError(f"weight_only_matmul: x {x.shape} and w {w.shape} do not contract")
  if not _takes_weights(w):
    raise ValueError(f"weight_only_matmul takes packed E2M1 weights with 8-bit scales and "
                     f"blocks of 16/32, got {w.spec.name}; dequantize and use jnp.dot")
  m, k, n = x.shape[0], x.shape[1], w.shape[1]
  bm, bn, bk = tile or (weight_only_rows_tile(m), 64, 256)
  why = _tile_reason(bm, n, k, bm, bn, bk, w.spec.block_size)
  if why:
    raise ValueError(f"weight_only_matmul: {why}")
  if splits is None:
    splits = weight_only_splits(m, n, k, bm, bn, bk)
  if splits < 1 or k % (splits * bk):
    raise ValueError(f"weight_only_matmul: splits={splits} must be >= 1 and divide K/bk = "
                     f"{k}/{bk}")
  return _weight_only_call(x, w, bm=bm, bn=bn, bk=bk, splits=splits,
                           out_dtype=jnp.dtype(out_dtype), interpret=interpret,
                           num_warps=num_warps, num_stages=num_stages)


__all__ = ["halves", "unsupported_reason", "weight_only_matmul", "weight_only_tile", "weight_only_reference", "weight_only_rows_tile",
           "weight_only_splits"]
