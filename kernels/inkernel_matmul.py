r"""The first Hopper FP4 GEMMs, kept in the kernel lab for comparison: Triton kernels that
decode packed E2M1 nibbles between their MMAs.

* ``"fp8"`` (MX E2M1 with E8M0 scales; FP8 tensor cores). Per K tile of ``bk`` and per row
  of ``a`` (column of ``b``) the kernel takes the largest block-scale exponent ``r`` of the
  tile and writes each element as E4M3 ``value * 2^(s - r)``: exact for ``s - r >= -8``.
  The tile's FP8 product is scaled by ``2^(rA + rB)`` and added to a float32 accumulator;
  a tile with a wider spread or a NaN scale is computed the exact way instead.
* ``"bf16"`` (E2M1 with any 8-bit scale; BF16 tensor cores): ``value * s`` is exact in
  BF16, the dot accumulates in float32, tensor scales in the epilogue.

On an H100 they measured 10-100x slower than unpacking once and calling cuBLAS
(:mod:`fp4jax.kernels.matmul`, ``kernels/NOTES.md``), so the library never runs them;
``kernels/bench_matmul.py`` still times them and ``tests/test_lab_inkernel_matmul.py``
keeps them correct. Both split K into even and odd positions (the low nibble of a byte is
an even ``k``), so ``sum_k a_ik b_kj = A_even B_even + A_odd B_odd`` and no nibble is ever
interleaved back.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from fp4jax import bits, rounding as rounding_lib
from fp4jax.kernels import unpack as fu
from fp4jax.kernels.matmul import apply_tensor_scales, check_operands, pow2_f32
from fp4jax.kernels.weight_only import halves as _halves
from fp4jax.qarray import QArray

U32, I32 = jnp.uint32, jnp.int32
PATHS = ("fp8", "bf16")
_HIGHEST = lax.Precision.HIGHEST
_pow2_f32 = pow2_f32


def kernel_path(a: QArray, b: QArray) -> str | None:
  """The Triton path these operands can take ("fp8" / "bf16"), or None."""
  sa, sb = a.spec, b.spec
  if not (rounding_lib.is_e2m1(sa.element) and rounding_lib.is_e2m1(sb.element)
          and sa.packed and sb.packed):
    return None
  if any(a.padding) or any(b.padding) or sa.granularity != "block" or sb.granularity != "block":
    return None
  if sa.block_size not in (16, 32) or sb.block_size not in (16, 32):
    return None
  pow2 = sa.scale_format.is_pow2 and sb.scale_format.is_pow2
  if pow2 and sa.scale_format.bias == 127 and sb.scale_format.bias == 127:
    return "fp8"
  if all(s.scale_format.storage_bits == 8 for s in (sa, sb)):
    return "bf16"
  return None


def _mx_fp8_kernel(ac_ref, as_ref, bc_ref, bs_ref, o_ref, *, bk, bs_a, bs_b, nk):
  bm, bn = o_ref.shape
  hk = bk // 2
  na, nb = bk // bs_a, bk // bs_b

  def body(kt, acc):
    ac = ac_ref[:, pl.ds(kt * hk, hk)]
    bc = bc_ref[pl.ds(kt * hk, hk), :]
    asc = as_ref[:, pl.ds(kt * na, na)].astype(I32)   # (bm, na) E8M0 codes
    bsc = bs_ref[pl.ds(kt * nb, nb), :].astype(I32)   # (nb, bn)
    ra = jnp.max(asc, axis=1)                          # (bm,)
    rb = jnp.max(bsc, axis=0)                          # (bn,)
    da, db = asc - ra[:, None], bsc - rb[None, :]
    ok = ((jnp.min(da) >= -8) & (jnp.min(db) >= -8) & (jnp.max(ra) < 255)
          & (jnp.max(rb) < 255))
    a_lo, a_hi = _halves(ac)   # (bm, hk) each: even / odd k
    b_lo, b_hi = _halves(bc)   # (hk, bn)
    # block of half-position p along K: p // (bs / 2)
    exp_a = lambda v: jnp.broadcast_to(v[:, :, None], (bm, na, bs_a // 2)).reshape(bm, hk)
    exp_b = lambda v: jnp.broadcast_to(v[:, None, :], (nb, bs_b // 2, bn)).reshape(hk, bn)

    def fast():
      dae, dbe = exp_a(da), exp_b(db)
      part = (jnp.dot(fu.fold_e4m3(a_lo, dae), fu.fold_e4m3(b_lo, dbe),
                      preferred_element_type=jnp.float32)
              + jnp.dot(fu.fold_e4m3(a_hi, dae), fu.fold_e4m3(b_hi, dbe),
                        preferred_element_type=jnp.float32))
      fa1, fa2 = _pow2_f32(ra - 127)
      fb1, fb2 = _pow2_f32(rb - 127)
      return ((part * fa1[:, None]) * fb1[None, :]) * (fa2[:, None] * fb2[None, :])

    def exact():  # dequantize to float32 and multiply in float32: any scale spread, NaN
      def deq(c, code):
        e1, e2 = _pow2_f32(code - 127)
        v = bits.bits_f32(rounding_lib.e2m1_f32_bits(c)) * e1 * e2
        return jnp.where(code == 255, jnp.float32(jnp.nan), v)

      ae, be = exp_a(asc), exp_b(bsc)
      return (jnp.dot(deq(a_lo, ae), deq(b_lo, be), precision=_HIGHEST,
                      preferred_element_type=jnp.float32)
              + jnp.dot(deq(a_hi, ae), deq(b_hi, be), precision=_HIGHEST,
                        preferred_element_type=jnp.float32))

    return acc + lax.cond(ok, fast, exact)

  acc = lax.fori_loop(0, nk, body, jnp.zeros((bm, bn), jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


# ------------------------------------------------------------- E2M1 on BF16 tensor cores


def _bf16_kernel(ac_ref, as_ref, bc_ref, bs_ref, o_ref, *, bk, bs_a, bs_b, nk, pow2_a,
                 pow2_b):
  bm, bn = o_ref.shape
  hk = bk // 2
  na, nb = bk // bs_a, bk // bs_b

  def body(kt, acc):
    ac = ac_ref[:, pl.ds(kt * hk, hk)]
    bc = bc_ref[pl.ds(kt * hk, hk), :]
    sa = fu.scale_f32(as_ref[:, pl.ds(kt * na, na)].astype(U32), pow2_a)   # (bm, na)
    sb = fu.scale_f32(bs_ref[pl.ds(kt * nb, nb), :].astype(U32), pow2_b)   # (nb, bn)
    sae = jnp.broadcast_to(sa[:, :, None], (bm, na, bs_a // 2)).reshape(bm, hk)
    sbe = jnp.broadcast_to(sb[:, None, :], (nb, bs_b // 2, bn)).reshape(hk, bn)
    a_lo, a_hi = _halves(ac)
    b_lo, b_hi = _halves(bc)
    # value * scale is exact in bf16 (<= 5 significant bits; see the module doc)
    va = lambda c: (bits.bits_f32(rounding_lib.e2m1_f32_bits(c)) * sae).astype(jnp.bfloat16)
    vb = lambda c: (bits.bits_f32(rounding_lib.e2m1_f32_bits(c)) * sbe).astype(jnp.bfloat16)
    return (acc + jnp.dot(va(a_lo), vb(b_lo), preferred_element_type=jnp.float32)
            + jnp.dot(va(a_hi), vb(b_hi), preferred_element_type=jnp.float32))

  acc = lax.fori_loop(0, nk, body, jnp.zeros((bm, bn), jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def default_tile(m: int, k: int, n: int) -> tuple[int, int, int] | None:
  """The largest (bm, bn, bk) of the GEMM kernels dividing (m, n, k) (128 down to 16;
  bk a multiple of the 32-element blocks), or None if no tile divides them."""
  pick = lambda d, opts: next((t for t in opts if d % t == 0), None)
  bm, bn, bk = pick(m, (128, 64, 32, 16)), pick(n, (128, 64, 32, 16)), pick(k, (128, 64, 32))
  return None if None in (bm, bn, bk) else (bm, bn, bk)


def _tile_ok(m, n, k, bm, bn, bk, bs_a, bs_b) -> str | None:
  if m % bm or n % bn or k % bk:
    return (f"shape (M={m}, K={k}, N={n}) is not a multiple of the tile "
            f"(bm={bm}, bk={bk}, bn={bn}); pad the operands or pass a smaller tile=")
  if bk % bs_a or bk % bs_b:
    return f"bk={bk} is not a multiple of the block sizes {bs_a}, {bs_b}"
  return None


@functools.partial(jax.jit, static_argnames=("path", "bm", "bn", "bk", "out_dtype",
                                             "interpret", "num_warps", "num_stages"))
def _triton_matmul(a: QArray, b: QArray, *, path, bm, bn, bk, out_dtype, interpret,
                   num_warps, num_stages):
  m, k = a.shape
  n = b.shape[1]
  bs_a, bs_b = a.spec.block_size, b.spec.block_size
  nk = k // bk
  if path == "fp8":
    kernel = functools.partial(_mx_fp8_kernel, bk=bk, bs_a=bs_a, bs_b=bs_b, nk=nk)
  else:
    kernel = functools.partial(_bf16_kernel, bk=bk, bs_a=bs_a, bs_b=bs_b, nk=nk,
                               pow2_a=a.spec.scale_format.is_pow2,
                               pow2_b=b.spec.scale_format.is_pow2)
  extra = {}
  if not interpret:
    from jax.experimental.pallas import triton as pltriton
    extra["compiler_params"] = pltriton.CompilerParams(num_warps=num_warps,
                                                       num_stages=num_stages)
  scaled = a.tensor_scale is not None or b.tensor_scale is not None
  kernel_dtype = jnp.float32 if scaled else out_dtype  # round once, after the tensor scales
  y = pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((m, n), kernel_dtype), grid=(m // bm, n // bn),
      in_specs=[pl.BlockSpec((bm, k // 2), lambda i, j: (i, 0)),
                pl.BlockSpec((bm, k // bs_a), lambda i, j: (i, 0)),
                pl.BlockSpec((k // 2, bn), lambda i, j: (0, j)),
                pl.BlockSpec((k // bs_b, bn), lambda i, j: (0, j))],
      out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
      interpret=interpret, name=f"fp4jax_matmul_{path}", **extra,
  )(a.codes, fu.scale_codes(a), b.codes, fu.scale_codes(b))
  return apply_tensor_scales(y, a, b, out_dtype)


def inkernel_matmul(a: QArray, b: QArray, *, path: str | None = None,
                    out_dtype: Any = jnp.bfloat16, tile: tuple[int, int, int] | None = None,
                    interpret: bool = False, num_warps: int = 4,
                    num_stages: int = 3) -> jax.Array:
  """``a @ b`` through the in-kernel-decoding Triton GEMM ``path`` ("fp8" or "bf16";
  default: :func:`kernel_path`). ``tile`` is (bm, bn, bk), default :func:`default_tile`."""
  check_operands(a, b)
  supported = kernel_path(a, b)
  path = path or supported
  if path not in PATHS:
    raise ValueError(f"inkernel_matmul: path must be one of {PATHS}, got {path!r}")
  if supported is None or (path == "fp8" and supported != "fp8"):
    raise ValueError(f"inkernel_matmul: path={path!r} takes E2M1 operands with 8-bit scales "
                     f"({'E8M0 only' if path == 'fp8' else 'E8M0 or UE4M3'}), unpadded, "
                     f"blocks 16/32; got {a.spec.name} x {b.spec.name}")
  m, k = a.shape
  bm, bn, bk = tile or default_tile(m, k, b.shape[1]) or (128, 128, 128)
  why = _tile_ok(m, b.shape[1], k, bm, bn, bk, a.spec.block_size, b.spec.block_size)
  if why:
    raise ValueError(f"inkernel_matmul: {why}")
  return _triton_matmul(a, b, path=path, bm=bm, bn=bn, bk=bk, out_dtype=jnp.dtype(out_dtype),
                        interpret=interpret, num_warps=num_warps, num_stages=num_stages)
