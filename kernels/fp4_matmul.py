r"""FP4 GEMM: ``QArray (M, K) x QArray (K, N) -> (M, N)`` on Hopper (emulated) and Blackwell.

Operands are :class:`fp4jax.QArray`\ s blocked along the contraction axis: ``a`` with
``axis=-1`` (codes ``(M, K/2)``, scales ``(M, K/bs)``), ``b`` with ``axis=-2`` (codes
``(K/2, N)``, scales ``(K/bs, N)``), as :func:`kernels.quantize.quantize` and
:func:`fp4jax.quantize` produce them. Paths (``impl``):

* ``"fp8"`` (MX E2M1 with E8M0 scales; Hopper FP8 tensor cores). Per K tile of ``bk``
  and per row of ``a`` (column of ``b``) the kernel takes the largest block-scale
  exponent ``r`` of the tile and writes each element as E4M3 ``value * 2^(s - r)``:
  exact for ``s - r >= -8`` (E2M1 values 0.5..6 times 2^-8..2^0 are E4M3 numbers, down
  to its subnormal 2^-9). The tile's FP8 product is scaled by ``2^(rA + rB)`` and added
  to a float32 accumulator (promotion per K tile). **Exact products:** every product
  ``a_ik b_kj`` is formed exactly whenever each tile's per-row/column scale spread is at
  most 8 binades; a tile with a wider spread or a NaN scale is computed the exact way
  instead (dequantized to float32, float32 dot), so every product is exact always. What
  differs from the reference is only the order and precision of the accumulation
  (Hopper's FP8 MMA accumulates tile sums with a shortened mantissa; see the tests'
  bound).
* ``"bf16"`` (E2M1 with any 8-bit scale: NVFP4's UE4M3, or E8M0; BF16 tensor cores).
  ``value * s`` is exact in BF16 (E2M1 x E4M3 has at most 5 significant bits; E2M1 x
  2^s is a power-of-two scaling), the dot accumulates in float32 and the FP32 tensor
  scales ``tA * tB`` multiply the result in the epilogue.
* ``"fp8_xla"`` (MX E2M1): both operands unpacked once to E4M3 with one reference
  exponent per row of ``a`` / column of ``b`` (exact when each spans at most 8 binades of
  block scales; checked at run time, else the float32 reference), then XLA's FP8 GEMM
  (cuBLASLt on a GPU, "NT" layout) and the reference exponents in the epilogue. The
  unpack pass costs two elementwise passes; the GEMM is the vendor's.
* ``"xla"``: the fallback for every other format: both operands dequantized to float32 by
  :func:`fp4jax.dequantize`, XLA dot in float32 (what :func:`matmul_reference` does).
* ``"blackwell"``: :func:`jax.nn.scaled_matmul` (cuDNN block-scaled GEMM on sm_100+) with
  the codes as ``float4_e2m1fn`` and the scales as ``float8_e8m0fnu`` / ``float8_e4m3fn``;
  NVFP4 tensor scales in the epilogue. Written and dispatch-tested; it cannot run on
  Hopper (see kernels/NOTES.md).
* :func:`weight_only_matmul`: BF16 activations times FP4 weights, the weights unpacked in
  the kernel (skinny GEMMs read 4.25-4.5 instead of 16 bits per weight).

Both Triton kernels split K into even and odd positions: the low nibble of a packed byte
is an even ``k``, the high nibble the next odd one, for ``a`` along its rows and for ``b``
along its columns alike, so ``sum_k a_ik b_kj = A_even B_even + A_odd B_odd`` and no
nibble is ever interleaved back (Triton can only join along a trailing axis).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from fp4jax import bits, rounding as rounding_lib
from fp4jax.formats import E4M3
from fp4jax.qarray import QArray
from fp4jax.quantize import dequantize
from kernels import fp4_unpack as fu

log = logging.getLogger("fp4jax")
U32, I32 = jnp.uint32, jnp.int32
IMPLS = ("auto", "fp8_xla", "bf16_xla", "fp8", "bf16", "xla", "blackwell", "reference")
_HIGHEST = lax.Precision.HIGHEST
FP8_MIN_K = 2048  # contraction length from which "auto" takes the FP8 GEMM on Hopper


# ---------------------------------------------------------------------------- reference


def matmul_reference(a: QArray, b: QArray, out_dtype: Any = jnp.float32) -> jax.Array:
  """The float32 product of the dequantized operands (``Precision.HIGHEST``)."""
  _check(a, b)
  y = jnp.dot(dequantize(a, jnp.float32), dequantize(b, jnp.float32), precision=_HIGHEST,
              preferred_element_type=jnp.float32)
  return y.astype(out_dtype)


def _check(a, b, what=("a", "b")):
  for q, name, axis in ((a, what[0], -1), (b, what[1], -2)):
    if not isinstance(q, QArray):
      raise TypeError(f"fp4_matmul: {name} must be a QArray, got {type(q).__name__}")
    if q.ndim != 2:
      raise ValueError(f"fp4_matmul: {name} must be 2D, got shape {q.shape}")
    if q.axis % 2 != axis % 2:
      raise ValueError(f"fp4_matmul: {name} must be blocked along the contraction axis "
                       f"(axis={axis}), got axis={q.axis}; quantize it with axis={axis}")
  if a.shape[1] != b.shape[0]:
    raise ValueError(f"fp4_matmul: contraction lengths differ: a {a.shape}, b {b.shape}")


def kernel_path(a: QArray, b: QArray) -> str | None:
  """The Triton path these operands can take on Hopper ("fp8" / "bf16"), or None."""
  sa, sb = a.spec, b.spec
  if not (rounding_lib.is_e2m1(sa.element) and rounding_lib.is_e2m1(sb.element) and sa.packed and sb.packed):
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


# -------------------------------------------------------------------- in-kernel decoding


def _pow2_f32(e):
  """2^e as float32 for int32 e, in two normal factors' worth of range: returns a pair
  whose product is 2^e for e in [-252, 254] (each factor in [-126, 127])."""
  e1 = jnp.clip(e, -126, 127)
  return bits.pow2_f32(e1), bits.pow2_f32(e - e1)


def _halves(codes):
  """Packed uint8 codes -> (low nibbles, high nibbles) as uint32 (even, odd k)."""
  c = codes.astype(U32)
  return c & U32(15), c >> 4


# ---------------------------------------------------------------- MXFP4 on FP8 tensor cores


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

  def scale_f32(code, pow2):
    return fu.scale_f32(code, pow2)

  def body(kt, acc):
    ac = ac_ref[:, pl.ds(kt * hk, hk)]
    bc = bc_ref[pl.ds(kt * hk, hk), :]
    sa = scale_f32(as_ref[:, pl.ds(kt * na, na)].astype(U32), pow2_a)   # (bm, na)
    sb = scale_f32(bs_ref[pl.ds(kt * nb, nb), :].astype(U32), pow2_b)   # (nb, bn)
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


# ------------------------------------- unpack once, then XLA's GEMM (cuBLASLt on a GPU)


def _nt_dot(a, b, out_dtype):
  """``a (M, K) @ b (N, K)^T`` with float32 accumulation: the "NT" form cuBLASLt runs
  fastest (and the only one of its FP8 GEMMs on Hopper)."""
  y = lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  return y.astype(out_dtype)


def _bf16_xla_matmul(a: QArray, b: QArray, out_dtype, interpret):
  """Both operands unpacked to BF16 ``value * scale`` (exact; kernels/fp4_unpack.py),
  one XLA BF16 GEMM in float32, tensor scales in the epilogue (rounded once)."""
  a16 = fu.gemm_operand(a, role="lhs", to="bf16", interpret=interpret)
  b16 = fu.gemm_operand(b, role="rhs", to="bf16", interpret=interpret)
  scaled = a.tensor_scale is not None or b.tensor_scale is not None
  y = _nt_dot(a16, b16, jnp.float32 if scaled else out_dtype)
  return _apply_tensor_scales(y, a, b, out_dtype)


def fp8_reference_codes(a: QArray, b: QArray):
  """``(ra (M,), rb (N,), exact)``: the largest E8M0 scale code of each row of ``a`` and
  column of ``b`` (the references the FP8 path scales by) and whether every element is
  then an E4M3 number (every ``s - r >= -8``, no NaN scale)."""
  sa = fu.scale_codes(a).astype(I32)
  sb = fu.scale_codes(b).astype(I32)
  ra, rb = jnp.max(sa, axis=1), jnp.max(sb, axis=0)
  exact = ((jnp.min(sa - ra[:, None]) >= -8) & (jnp.min(sb - rb[None, :]) >= -8)
           & (jnp.max(ra) < 255) & (jnp.max(rb) < 255))
  return ra, rb, exact


def _fp8_xla_matmul(a: QArray, b: QArray, out_dtype, interpret):
  """MXFP4 x MXFP4 as one XLA FP8 GEMM on operands unpacked to E4M3 relative to one
  reference exponent per row of ``a`` / column of ``b``, the references applied in the
  epilogue; when some row or column spans more than 8 binades of block scales (decided at
  run time), the exact BF16 path instead."""
  ra, rb, exact = fp8_reference_codes(a, b)

  def fast():
    a8 = fu.gemm_operand(a, role="lhs", to="e4m3", ref_code=ra, interpret=interpret)
    b8 = fu.gemm_operand(b, role="rhs", to="e4m3", ref_code=rb, interpret=interpret)
    # A bf16 result is rounded by the GEMM, then scaled by 2^(ra + rb - 254): the same
    # as rounding once unless the result is below bf16's normal range or overflows.
    y = _nt_dot(a8, b8, jnp.bfloat16 if out_dtype == jnp.bfloat16 else jnp.float32)
    fa1, fa2 = _pow2_f32(ra[:, None] - 127)
    fb1, fb2 = _pow2_f32(rb[None, :] - 127)
    return ((((y.astype(jnp.float32) * fa1) * fb1) * (fa2 * fb2))).astype(out_dtype)

  return lax.cond(exact, fast, lambda: _bf16_xla_matmul(a, b, out_dtype, interpret))


# ------------------------------------------------- weight-only: BF16 activations x FP4 weights


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
    if pow2_b:
      sb = fu.scale_f32(code, True)
    else:
      sb = fu.scale_f32(code, False)
    sbe = jnp.broadcast_to(sb[:, None, :], (nb, bs_b // 2, bn)).reshape(hk, bn)
    b_lo, b_hi = _halves(bc)
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
  return _apply_tensor_scales(y, w, None, out_dtype)[:m]


def weight_only_rows_tile(m: int) -> int:
  """Rows per program of the weight-only kernel: 16, 32 or 64, the smallest covering
  ``m`` (Triton blocks are powers of two; past 64 the row tiles re-read the weights from
  L2 rather than spill registers)."""
  return 16 if m <= 16 else 32 if m <= 32 else 64


def weight_only_splits(m: int, n: int, k: int, bm: int, bn: int, bk: int,
                       programs: int = 264) -> int:
  """K splits for the weight-only kernel: doubled (while K allows) until the grid has
  ``programs`` programs (two per H100 SM), since a skinny GEMM has too few output tiles
  to fill the GPU."""
  splits, base = 1, -(-m // bm) * (n // bn)
  while base * splits < programs and (k // bk) % (2 * splits) == 0 and splits < 16:
    splits *= 2
  return splits


def weight_only_reference(x: jax.Array, w: QArray, out_dtype: Any = jnp.float32) -> jax.Array:
  """float32 product of ``x`` (as bf16, what the kernel multiplies) and dequantized ``w``."""
  xb = x.astype(jnp.bfloat16).astype(jnp.float32)
  return jnp.dot(xb, dequantize(w, jnp.float32), precision=_HIGHEST,
                 preferred_element_type=jnp.float32).astype(out_dtype)


def weight_only_matmul(x: jax.Array, w: QArray, *, out_dtype: Any = jnp.bfloat16,
                       tile: tuple[int, int, int] | None = None,
                       splits: int | None = None, interpret: bool | None = None,
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
  if not (rounding_lib.is_e2m1(w.spec.element) and w.spec.packed and not any(w.padding)
          and w.spec.scale_format.storage_bits == 8 and w.spec.block_size in (16, 32)):
    raise ValueError(f"weight_only_matmul takes packed E2M1 weights with 8-bit scales and "
                     f"blocks of 16/32, got {w.spec.name}; dequantize and use jnp.dot")
  m, k, n = x.shape[0], x.shape[1], w.shape[1]
  bm, bn, bk = tile or (weight_only_rows_tile(m), 64, 256)
  why = _tile_ok(bm, n, k, bm, bn, bk, w.spec.block_size, w.spec.block_size)
  if why:
    raise ValueError(f"weight_only_matmul: {why}")
  if splits is None:
    splits = weight_only_splits(m, n, k, bm, bn, bk)
  if splits < 1 or k % (splits * bk):
    raise ValueError(f"weight_only_matmul: splits={splits} must be >= 1 and divide K/bk = "
                     f"{k}/{bk}")
  if interpret is None:
    interpret = _device_kind()[0] != "gpu"
  return _weight_only_call(x, w, bm=bm, bn=bn, bk=bk, splits=splits,
                           out_dtype=jnp.dtype(out_dtype), interpret=interpret,
                           num_warps=num_warps, num_stages=num_stages)


# ----------------------------------------------------------------------------- wrappers


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
  return _apply_tensor_scales(y, a, b, out_dtype)


def _apply_tensor_scales(y, a, b, out_dtype):
  """``y * tA * tB`` (the operands' FP32 tensor scales, where they have one) rounded once
  to ``out_dtype``; ``a`` or ``b`` may be None."""
  t = None
  for q in (a, b):
    if q is not None and q.tensor_scale is not None:
      tq = q.tensor_scale.reshape(()).astype(jnp.float32)
      t = tq if t is None else t * tq
  if t is None:
    return y.astype(out_dtype)
  return (y.astype(jnp.float32) * t).astype(out_dtype)


def blackwell_operands(a: QArray, b: QArray):
  """``(lhs (1, M, K), rhs (1, N, K), lhs_scales, rhs_scales)`` for
  :func:`jax.nn.scaled_matmul`: codes as float4_e2m1fn values, scales as their float8
  dtypes, ``b`` transposed to K-major. Tensor scales are applied by the caller."""
  _check(a, b)
  from fp4jax import packing
  def values(q, axis):
    c = packing.unpack(q.codes, 4, axis, True)
    return bits.bits_f32(rounding_lib.e2m1_f32_bits(c.astype(U32))).astype(jnp.float4_e2m1fn)
  lhs = values(a, -1)[None]
  rhs = values(b, -2).T[None]
  return lhs, rhs, a.scales[None], b.scales.T[None]


def _blackwell_matmul(a, b, out_dtype):
  lhs, rhs, ls, rs = blackwell_operands(a, b)
  y = jax.nn.scaled_matmul(lhs, rhs, ls, rs, preferred_element_type=jnp.float32)[0]
  return _apply_tensor_scales(y, a, b, out_dtype)


def _device_kind() -> tuple[str, int]:
  """("gpu", compute capability major) or (platform, 0)."""
  try:
    dev = jax.devices()[0]
  except RuntimeError:
    return "cpu", 0
  if dev.platform != "gpu":
    return dev.platform, 0
  cc = getattr(dev, "compute_capability", "0")
  return "gpu", int(str(cc).split(".")[0])


def choose_impl(a: QArray, b: QArray, device: tuple[str, int] | None = None) -> str:
  """What ``impl="auto"`` runs for these operands on ``device`` (default: this one):
  Blackwell (sm_100+) and MXFP4/NVFP4-shaped operands -> "blackwell"; another GPU and
  E2M1 operands with 8-bit scales -> "fp8_xla" (E8M0 scales on both and K >=
  ``FP8_MIN_K``) or "bf16_xla" (NVFP4, mixed, short K); otherwise "xla". The in-kernel-decoding Triton GEMMs ("fp8", "bf16")
  are never chosen: on an H100 they measured 10-100x slower (kernels/NOTES.md)."""
  platform, major = device or _device_kind()
  path = kernel_path(a, b)
  if platform != "gpu" or path is None:
    return "xla"
  if major >= 10 and _blackwell_ok(a, b):
    return "blackwell"
  # XLA's FP8 GEMM beats its BF16 one at K = 8192 (1.45x for the whole path) but loses
  # at ViT-S's K = 384 (0.30x against 0.79x on an H100): FP8 from K = FP8_MIN_K on
  return "fp8_xla" if path == "fp8" and a.shape[1] >= FP8_MIN_K else "bf16_xla"


def _blackwell_ok(a, b) -> bool:
  sa, sb = a.spec, b.spec
  mx = sa.scale_format.is_pow2 and sa.block_size == 32
  nv = (not sa.scale_format.is_pow2) and sa.block_size == 16
  return sa.scale_format == sb.scale_format and sa.block_size == sb.block_size and (mx or nv)


def fp4_matmul(a: QArray, b: QArray, *, impl: str = "auto", out_dtype: Any = jnp.bfloat16,
               tile: tuple[int, int, int] | None = None, interpret: bool | None = None,
               num_warps: int = 4, num_stages: int = 3) -> jax.Array:
  """``a @ b`` of two quantized operands.

  Args:
    a: (M, K) QArray blocked along K (``axis=-1``).
    b: (K, N) QArray blocked along K (``axis=-2``).
    impl: "auto" (see :func:`choose_impl`), "fp8_xla", "bf16_xla", "fp8", "bf16", "xla",
      "blackwell" or "reference" (the module doc says what each does).
    out_dtype: result dtype (the accumulation is float32).
    tile: (bm, bn, bk) of the in-kernel-decoding GEMMs "fp8" / "bf16" (default:
      :func:`default_tile`; shapes must be multiples).
    interpret: run the Pallas kernels in interpret mode (default: off a GPU).

  Returns:
    (M, N) array of ``out_dtype``.
  """
  _check(a, b)
  if impl not in IMPLS:
    raise ValueError(f"fp4_matmul: unknown impl {impl!r}; choose one of {IMPLS}")
  if impl == "auto":
    impl = choose_impl(a, b)
    log.debug("fp4_matmul: impl=%s for %s x %s", impl, a.spec.name, b.spec.name)
  if impl in ("reference", "xla"):
    return matmul_reference(a, b, out_dtype)
  if impl == "blackwell":
    return _blackwell_matmul(a, b, out_dtype)
  path = kernel_path(a, b)
  if path is None or (impl.startswith("fp8") and path != "fp8"):
    raise ValueError(f"fp4_matmul: impl={impl!r} takes E2M1 operands with 8-bit scales "
                     f"({'E8M0 only' if impl.startswith('fp8') else 'E8M0 or UE4M3'}), "
                     f"unpadded, blocks 16/32; got {a.spec.name} x {b.spec.name}: use "
                     f"impl='xla'")
  if interpret is None:
    interpret = _device_kind()[0] != "gpu"
  out_dtype = jnp.dtype(out_dtype)
  if impl == "fp8_xla":
    return _fp8_xla_matmul(a, b, out_dtype, interpret)
  if impl == "bf16_xla":
    return _bf16_xla_matmul(a, b, out_dtype, interpret)
  m, k = a.shape
  bm, bn, bk = tile or default_tile(m, k, b.shape[1]) or (128, 128, 128)
  why = _tile_ok(m, b.shape[1], k, bm, bn, bk, a.spec.block_size, b.spec.block_size)
  if why:
    raise ValueError(f"fp4_matmul: {why}")
  return _triton_matmul(a, b, path=impl, bm=bm, bn=bn, bk=bk, out_dtype=out_dtype,
                        interpret=interpret, num_warps=num_warps, num_stages=num_stages)


__all__ = ["IMPLS", "blackwell_operands", "choose_impl", "default_tile", "fp4_matmul",
           "fp8_reference_codes", "kernel_path", "matmul_reference", "weight_only_matmul",
           "weight_only_reference", "weight_only_rows_tile", "weight_only_splits"]
