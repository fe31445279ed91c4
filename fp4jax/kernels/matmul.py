r"""FP4 GEMM on Hopper (emulated) and Blackwell: ``QArray (M, K) x QArray (K, N) -> (M, N)``.

Operands are :class:`fp4jax.QArray`\ s blocked along the contraction axis: ``a`` with
``axis=-1`` (codes ``(M, K/2)``, scales ``(M, K/bs)``), ``b`` with ``axis=-2`` (codes
``(K/2, N)``, scales ``(K/bs, N)``), as :func:`fp4jax.quantize` produces them. The
implementations (``impl``; :class:`fp4jax.dispatch.GemmImpl` names them and
:func:`fp4jax.dispatch.choose_gemm` picks one):

* ``"fp8_xla"`` (MX E2M1 with E8M0 scales): both operands unpacked once
  (:mod:`fp4jax.kernels.unpack`) to E4M3 with one reference exponent per row of ``a`` /
  column of ``b`` (exact when each spans at most 8 binades of block scales; checked at run
  time, else the exact BF16 path), then XLA's FP8 GEMM (cuBLASLt on a GPU, "NT" layout)
  and the reference exponents in the epilogue.
* ``"bf16_xla"`` (E2M1 with any 8-bit scale: NVFP4's UE4M3, or E8M0): unpacked to BF16
  ``value * scale`` (exact: 2 significant bits times a power of two or a 4-bit E4M3
  significand fit BF16's 8), XLA BF16 GEMM accumulating in float32, FP32 tensor scales in
  the epilogue.
* ``"blackwell"``: :func:`jax.nn.scaled_matmul` (cuDNN block-scaled GEMM on sm_100+) with
  the codes as ``float4_e2m1fn`` and the scales as ``float8_e8m0fnu`` / ``float8_e4m3fn``;
  NVFP4 tensor scales in the epilogue. Written and dispatch-tested; it cannot run on
  Hopper (see kernels/NOTES.md).
* ``"reference"``: :func:`matmul_reference`, both operands dequantized to float32, an XLA
  float32 dot (``Precision.HIGHEST``).

Every path forms each product ``a_ik b_kj`` exactly; they differ from the reference only
in the order and precision of the float32 accumulation (Hopper's FP8 MMA accumulates tile
sums with a shortened mantissa; the tests state the bound).

The first Hopper attempt, Triton GEMMs that decode nibbles between their MMAs, measured
10-100x slower than unpack + cuBLAS on an H100 and was never chosen: it lives in the
kernel lab (``kernels/inkernel_matmul.py``) for the benchmarks' comparison.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from fp4jax import bits, decode, packing, rounding as rounding_lib
from fp4jax.kernels import unpack as fu
from fp4jax.qarray import QArray

U32, I32 = jnp.uint32, jnp.int32
IMPLS = ("fp8_xla", "bf16_xla", "blackwell", "reference")
BLOCK_SIZES = (16, 32)   # scale blocks the unpack kernel takes
K_MULTIPLE = 32          # the unpack kernel's K tiles are >= 16 packed bytes
E8M0_BIAS = 127
E4M3_SPREAD = 8          # binades of block scales below the row's largest that E4M3 holds
_HIGHEST = lax.Precision.HIGHEST


# ---------------------------------------------------------------------------- reference


def matmul_reference(a: QArray, b: QArray, out_dtype: Any = jnp.float32) -> jax.Array:
  """The float32 product of the dequantized operands (``Precision.HIGHEST``)."""
  check_operands(a, b)
  y = jnp.dot(decode.dequantize(a, jnp.float32), decode.dequantize(b, jnp.float32),
              precision=_HIGHEST, preferred_element_type=jnp.float32)
  return y.astype(out_dtype)


def check_operands(a, b, what=("a", "b")) -> None:
  """Raises unless ``a`` (M, K) and ``b`` (K, N) are 2D QArrays blocked along K."""
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


def _operand_reason(q: QArray) -> str | None:
  sp = q.spec
  if not (rounding_lib.is_e2m1(sp.element) and sp.packed):
    return f"{sp.name or 'the spec'} is not packed E2M1"
  if any(q.padding):
    return "padded operand"
  if sp.granularity != "block" or sp.block_size not in BLOCK_SIZES:
    return f"scale blocks of {sp.granularity} {sp.block_size} (unpack takes 1D blocks of 16/32)"
  if sp.scale_format.storage_bits != 8:
    return f"{sp.scale_format.name} scales (unpack takes 8-bit scales)"
  return None


def _is_e8m0(q: QArray) -> bool:
  sf = q.spec.scale_format
  return sf.is_pow2 and sf.bias == E8M0_BIAS and sf.storage_bits == 8


def blackwell_pair(a: QArray, b: QArray) -> bool:
  """Whether cuDNN's block-scaled GEMM takes the pair: MXFP4 (E8M0, blocks of 32) or
  NVFP4 (UE4M3, blocks of 16), the same on both sides."""
  sa, sb = a.spec, b.spec
  mx = sa.scale_format.is_pow2 and sa.block_size == 32
  nv = (not sa.scale_format.is_pow2) and sa.block_size == 16
  return sa.scale_format == sb.scale_format and sa.block_size == sb.block_size and (mx or nv)


def unsupported_reason(a: QArray, b: QArray, impl: str) -> str | None:
  """Why ``impl`` cannot multiply these operands (None: it can). ``"reference"`` takes
  any pair of 2D QArrays blocked along K."""
  if impl not in IMPLS:
    return f"unknown impl {impl!r}; choose one of {IMPLS}"
  if impl == "reference":
    return None
  for q in (a, b):
    why = _operand_reason(q)
    if why:
      return why
  if impl in ("fp8_xla", "bf16_xla") and a.shape[1] % K_MULTIPLE:
    return (f"contraction length {a.shape[1]} is not a multiple of {K_MULTIPLE} (the unpack "
            "kernel's smallest K tile)")
  if impl == "fp8_xla" and not (_is_e8m0(a) and _is_e8m0(b)):
    return f"fp8_xla takes E8M0 scales on both operands (MX formats), got {a.spec.name} x {b.spec.name}"
  if impl == "blackwell" and not blackwell_pair(a, b):
    return f"blackwell takes MXFP4 x MXFP4 or NVFP4 x NVFP4, got {a.spec.name} x {b.spec.name}"
  return None


# ------------------------------------- unpack once, then XLA's GEMM (cuBLASLt on a GPU)


def pow2_f32(e):
  """2^e as float32 for int32 e, in two normal factors' worth of range: returns a pair
  whose product is 2^e for e in [-252, 254] (each factor in [-126, 127])."""
  e1 = jnp.clip(e, -126, 127)
  return bits.pow2_f32(e1), bits.pow2_f32(e - e1)


def _nt_dot(a, b, out_dtype):
  """``a (M, K) @ b (N, K)^T`` with float32 accumulation: the "NT" form cuBLASLt runs
  fastest (and the only one of its FP8 GEMMs on Hopper)."""
  y = lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  return y.astype(out_dtype)


def apply_tensor_scales(y, a, b, out_dtype):
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


def _bf16_xla_matmul(a: QArray, b: QArray, out_dtype, interpret):
  """Both operands unpacked to BF16 ``value * scale`` (exact; :mod:`fp4jax.kernels.unpack`),
  one XLA BF16 GEMM in float32, tensor scales in the epilogue (rounded once)."""
  a16 = fu.gemm_operand(a, role="lhs", to="bf16", interpret=interpret)
  b16 = fu.gemm_operand(b, role="rhs", to="bf16", interpret=interpret)
  scaled = a.tensor_scale is not None or b.tensor_scale is not None
  y = _nt_dot(a16, b16, jnp.float32 if scaled else out_dtype)
  return apply_tensor_scales(y, a, b, out_dtype)


def fp8_reference_codes(a: QArray, b: QArray):
  """``(ra (M,), rb (N,), exact)``: the largest E8M0 scale code of each row of ``a`` and
  column of ``b`` (the references the FP8 path scales by) and whether every element is
  then an E4M3 number (every ``s - r >= -8``, no NaN scale)."""
  sa = fu.scale_codes(a).astype(I32)
  sb = fu.scale_codes(b).astype(I32)
  ra, rb = jnp.max(sa, axis=1), jnp.max(sb, axis=0)
  nan = 2 * E8M0_BIAS + 1
  exact = ((jnp.min(sa - ra[:, None]) >= -E4M3_SPREAD)
           & (jnp.min(sb - rb[None, :]) >= -E4M3_SPREAD)
           & (jnp.max(ra) < nan) & (jnp.max(rb) < nan))
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
    fa1, fa2 = pow2_f32(ra[:, None] - E8M0_BIAS)
    fb1, fb2 = pow2_f32(rb[None, :] - E8M0_BIAS)
    return ((((y.astype(jnp.float32) * fa1) * fb1) * (fa2 * fb2))).astype(out_dtype)

  return lax.cond(exact, fast, lambda: _bf16_xla_matmul(a, b, out_dtype, interpret))


# ------------------------------------------------------------------------- Blackwell


def blackwell_operands(a: QArray, b: QArray):
  """``(lhs (1, M, K), rhs (1, N, K), lhs_scales, rhs_scales)`` for
  :func:`jax.nn.scaled_matmul`: codes as float4_e2m1fn values, scales as their float8
  dtypes, ``b`` transposed to K-major. Tensor scales are applied by the caller."""
  check_operands(a, b)
  lhs, ls = a.scaled_matmul_operand()      # (M, K), (M, K/bs)
  rhs, rs = b.scaled_matmul_operand()      # (N, K), (N, K/bs)
  return lhs[None], rhs[None], ls[None], rs[None]


def _blackwell_matmul(a, b, out_dtype):
  lhs, rhs, ls, rs = blackwell_operands(a, b)
  y = jax.nn.scaled_matmul(lhs, rhs, ls, rs, preferred_element_type=jnp.float32)[0]
  return apply_tensor_scales(y, a, b, out_dtype)


# ----------------------------------------------------------------------------- entry


def fp4_matmul(a: QArray, b: QArray, *, impl: str, out_dtype: Any = jnp.bfloat16,
               interpret: bool = False) -> jax.Array:
  """``a @ b`` of two quantized operands through one named implementation.

  This is the kernel layer: it runs what it is told. :func:`fp4jax.fp4_matmul` (with
  ``impl="auto"``) asks :mod:`fp4jax.dispatch` which implementation fits the device.

  Args:
    a: (M, K) QArray blocked along K (``axis=-1``).
    b: (K, N) QArray blocked along K (``axis=-2``).
    impl: one of :data:`IMPLS` (the module doc says what each does).
    out_dtype: result dtype (the accumulation is float32).
    interpret: run the Pallas unpack kernel in interpret mode (CPU).

  Returns:
    (M, N) array of ``out_dtype``.
  """
  check_operands(a, b)
  why = unsupported_reason(a, b, impl)
  if why:
    raise ValueError(f"fp4_matmul(impl={impl!r}): {why}; use impl='reference' (any format)")
  out_dtype = jnp.dtype(out_dtype)
  if impl == "reference":
    return matmul_reference(a, b, out_dtype)
  if impl == "blackwell":
    return _blackwell_matmul(a, b, out_dtype)
  if impl == "fp8_xla":
    return _fp8_xla_matmul(a, b, out_dtype, interpret)
  return _bf16_xla_matmul(a, b, out_dtype, interpret)


__all__ = ["BLOCK_SIZES", "IMPLS", "apply_tensor_scales", "blackwell_operands",
           "blackwell_pair", "check_operands", "fp4_matmul", "fp8_reference_codes",
           "matmul_reference", "pow2_f32", "unsupported_reason"]
