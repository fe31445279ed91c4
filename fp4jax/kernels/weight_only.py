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


DECODERS = ("auto", "prmt", "alu")
"""How the kernel turns packed codes into BF16 weights:

- ``prmt``: inline PTX (:data:`PRMT_DECODE_ASM`): byte permutes look the E2M1 magnitudes
  of four codes up in an 8-entry table of BF16 high / low bytes and interleave them into
  BF16 pairs, shifts and masks move the signs in, and one ``fma.rn.bf16x2`` per pair
  applies the block scale: ~6 instructions per weight. GPU only.
- ``alu``: the same values from integer arithmetic on each nibble (E2M1 -> float32 bits,
  times the scale, rounded to BF16): ~17 instructions per weight (Nsight Compute, see
  kernels/NOTES.md); what interpret mode runs.
- ``auto``: ``prmt`` on a GPU, ``alu`` in interpret mode.

Both are exact: an E2M1 value (2 significant bits) times an E8M0 or UE4M3 block scale (1 or
4 significant bits) has at most 6 significant bits, so the BF16 product is the float32 one
(the range is float32's; E8M0's smallest scale, 2^-127, times 0.5 is a BF16 subnormal).
"""

# BF16 high and low bytes of the eight E2M1 magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6 (code
# 0..7), four per 32-bit word, entry 0 in the lowest byte: prmt's byte table.
_LUT_HIGH_0123, _LUT_HIGH_4567 = 0x3F3F3F00, 0x40404040
_LUT_LOW_0123, _LUT_LOW_4567 = 0xC0800000, 0xC0804000

def _prmt_decode_asm(half: str) -> str:
  """Inline PTX: four packed code bytes ($2; low nibble an even k, high nibble the next
  odd k) and their BF16 scales ($3: bytes 0-1, $4: bytes 2-3) -> the BF16 weights of one
  nibble of each byte (``half``: "low" or "high"; $0: bytes 0-1, $1: bytes 2-3).

  ``prmt.b32 d, a, b, c``: byte i of d is byte ``c.nibble[i]`` of the eight bytes {b, a}
  (0-3 from a); a selector nibble below 8 copies, so the magnitudes (code & 7) index the
  byte tables directly: ``and`` keeps them, two permutes fetch the high and the low BF16
  byte of four nibbles, a third interleaves them into two BF16 pairs. The sign (code bit
  3 or 7) goes to bit 15 of its lane; ``x * s + (-0)`` is ``x * s`` exactly, the sign of a
  zero included. Written for Triton's packing of ``pack=4``: four uint8 elements in one
  register, four BF16 results in two, element 0 in the low half."""
  interleave = "0x6240" if half == "low" else "0x7351"   # (L, H) of nibbles 0, 2 / 1, 3
  sign_shift = 4 if half == "low" else 0                  # bit 3 / 7 of a byte -> bit 15
  lines = [
      ".reg .b32 lh0, lh1, ll0, ll1, zero, negzero, sel, hi01, lo01, hi23, lo23, sx, tmp;",
      f"mov.b32 lh0, {_LUT_HIGH_0123:#010x};", f"mov.b32 lh1, {_LUT_HIGH_4567:#010x};",
      f"mov.b32 ll0, {_LUT_LOW_0123:#010x};", f"mov.b32 ll1, {_LUT_LOW_4567:#010x};",
      "mov.b32 zero, 0;", "mov.b32 negzero, 0x80008000;",
      "and.b32 sel, $2, 0x7777;",
      "prmt.b32 hi01, lh0, lh1, sel;", "prmt.b32 lo01, ll0, ll1, sel;",
      "shr.b32 sel, $2, 16;", "and.b32 sel, sel, 0x7777;",
      "prmt.b32 hi23, lh0, lh1, sel;", "prmt.b32 lo23, ll0, ll1, sel;",
      f"prmt.b32 $0, lo01, hi01, {interleave};", f"prmt.b32 $1, lo23, hi23, {interleave};",
  ]
  for reg, place in (("$0", "0x1404"), ("$1", "0x3424")):   # bytes (0, 1) / (2, 3) -> 1, 3
    lines += [f"prmt.b32 sx, $2, zero, {place};"]
    lines += [f"shl.b32 sx, sx, {sign_shift};"] if sign_shift else []
    lines += ["and.b32 tmp, sx, 0x80008000;", f"or.b32 {reg}, {reg}, tmp;"]
  lines += ["fma.rn.bf16x2 $0, $0, $3, negzero;", "fma.rn.bf16x2 $1, $1, $4, negzero;"]
  return "{\n" + "\n".join(lines) + "\n}"


PRMT_DECODE_ASM = {half: _prmt_decode_asm(half) for half in ("low", "high")}
"""The inline PTX of :func:`decode_prmt`, per nibble (see :func:`_prmt_decode_asm`)."""


def decode_prmt(codes, scales):
  """(low, high) BF16 weights of packed ``codes`` (uint8) times ``scales`` (BF16, the same
  shape) through :data:`PRMT_DECODE_ASM` (inside a Pallas Triton kernel)."""
  from jax.experimental.pallas import triton as pltriton
  out = jax.ShapeDtypeStruct(codes.shape, jnp.bfloat16)
  # One result per asm op: jax's Pallas Triton lowering of elementwise_inline_asm wraps
  # the op's results in a one-element list, so a two-result op fails to lower ("2 outvars
  # do not match 1 outvals"; jax 0.11.2 and 0.12). Delete the split (one op returning
  # both nibbles shares the table lookups) once the lowering returns every result.
  return tuple(pltriton.elementwise_inline_asm(
      PRMT_DECODE_ASM[half], args=[codes, scales], constraints="=r,=r,r,r,r", pack=4,
      result_shape_dtypes=[out])[0] for half in ("low", "high"))


def decode_alu(codes, scales):
  """:func:`decode_prmt` in integer arithmetic (any backend; interpret mode)."""
  b_lo, b_hi = halves(codes)
  s = scales.astype(jnp.float32)
  v = lambda c: (bits.bits_f32(rounding_lib.e2m1_f32_bits(c)) * s).astype(jnp.bfloat16)
  return v(b_lo), v(b_hi)


def _tile_reason(n, k, bn, bk, block) -> str | None:
  """Why the weight's (K, N) does not tile (None: it does); M needs no multiple (the
  kernel pads the activations' rows)."""
  if n % bn or k % bk:
    return (f"the weight's (K={k}, N={n}) is not a multiple of the tile's "
            f"(bk={bk}, bn={bn}); pad the weight or pass a smaller tile=")
  if bk % block:
    return f"bk={bk} is not a multiple of the block size {block}"
  return None


def _decoded_tile(bc, code, *, bs_b, pow2_b, decoder, layout):
  """BF16 (even k, odd k) weights of one tile of packed codes ``bc`` and its scale codes
  ``code`` (uint32, one per block): ``layout`` "kn" tiles are (hk, bn) with blocks along
  rows, "nk" tiles (bn, hk) with blocks along columns."""
  decode = decode_prmt if decoder == "prmt" else decode_alu
  sb = fu.scale_f32(code, pow2_b).astype(jnp.bfloat16)   # exact: 1 or 4 significant bits
  if layout == "kn":
    nb, bn = sb.shape
    sbe = jnp.broadcast_to(sb[:, None, :], (nb, bs_b // 2, bn)).reshape(bc.shape)
  else:
    bn, nb = sb.shape
    sbe = jnp.broadcast_to(sb[:, :, None], (bn, nb, bs_b // 2)).reshape(bc.shape)
  return decode(bc, sbe)


_NT = (((1,), (1,)), ((), ()))   # dot_general dimensions of a @ b.T


def _dot_nt(a, b):
  return lax.dot_general(a, b, _NT, preferred_element_type=jnp.float32)


def _weight_only_kernel(x_ref, bc_ref, bs_ref, o_ref, *, bk, bs_b, nk, pow2_b, decoder,
                        layout, algorithm):
  """One program: a (bm, bn) output tile ("kn") or its transpose (bn, bm) ("nk") over one
  K split, as float32 partial sums.

  ``algorithm`` "mma": two tensor-core dots per K tile (even and odd k); "nk" makes the
  decoded weights the dot's left operand (registers) and the activations the right one.
  "gemv": no dot; every weight times its activation accumulated elementwise in float32
  (one FMA per weight and row), summed across K once at the end: for M <= 4, where a
  16-row MMA wastes most of its rows and its operand layout costs a shared-memory trip."""
  hk = bk // 2
  nb = bk // bs_b
  if layout == "kn":
    bm, bn = o_ref.shape
  else:
    bn, bm = o_ref.shape
  tile = functools.partial(_decoded_tile, bs_b=bs_b, pow2_b=pow2_b, decoder=decoder,
                           layout=layout)

  def weights(kt):
    if layout == "kn":
      return tile(bc_ref[pl.ds(kt * hk, hk), :], bs_ref[pl.ds(kt * nb, nb), :].astype(U32))
    return tile(bc_ref[:, pl.ds(kt * hk, hk)], bs_ref[:, pl.ds(kt * nb, nb)].astype(U32))

  # even / odd k of the activations as two strided loads, matching the nibbles of w
  def acts(kt, rows):
    return (x_ref[rows, pl.ds(kt * bk, hk, stride=2)].astype(jnp.bfloat16),
            x_ref[rows, pl.ds(kt * bk + 1, hk, stride=2)].astype(jnp.bfloat16))

  if algorithm == "mma":
    def body(kt, acc):
      w_lo, w_hi = weights(kt)
      xe, xo = acts(kt, slice(None))
      if layout == "kn":
        return (acc + jnp.dot(xe, w_lo, preferred_element_type=jnp.float32)
                + jnp.dot(xo, w_hi, preferred_element_type=jnp.float32))
      return acc + _dot_nt(w_lo, xe) + _dot_nt(w_hi, xo)

    o_ref[...] = lax.fori_loop(0, nk, body, jnp.zeros(o_ref.shape, jnp.float32))
    return

  acc_shape = (hk, bn) if layout == "kn" else (bn, hk)

  def body(kt, accs):
    w_lo, w_hi = (w.astype(jnp.float32) for w in weights(kt))
    out = []
    for r in range(bm):
      xe, xo = (v.astype(jnp.float32).reshape(hk) for v in acts(kt, pl.ds(r, 1)))
      if layout == "kn":
        out.append(accs[r] + xe[:, None] * w_lo + xo[:, None] * w_hi)
      else:
        out.append(accs[r] + w_lo * xe[None, :] + w_hi * xo[None, :])
    return tuple(out)

  accs = lax.fori_loop(0, nk, body,
                       tuple(jnp.zeros(acc_shape, jnp.float32) for _ in range(bm)))
  for r, a in enumerate(accs):
    if layout == "kn":
      o_ref[pl.ds(r, 1), :] = jnp.sum(a, axis=0)[None, :]
    else:
      o_ref[:, pl.ds(r, 1)] = jnp.sum(a, axis=1)[:, None]


@functools.partial(jax.jit, static_argnames=("bm", "bn", "bk", "splits", "out_dtype",
                                             "interpret", "num_warps", "num_stages",
                                             "decoder", "layout", "algorithm"))
def _weight_only_call(x, w: QArray, *, bm, bn, bk, splits, out_dtype, interpret, num_warps,
                      num_stages, decoder, layout="kn", algorithm="mma"):
  m, k = x.shape
  n = w.shape[1] if layout == "kn" else w.shape[0]
  bs_b = w.spec.block_size
  mp = -(-m // bm) * bm
  xp = jnp.pad(x, ((0, mp - m), (0, 0))) if mp != m else x
  ks = k // splits  # each program reduces one K split; XLA adds the partials
  kernel = functools.partial(_weight_only_kernel, bk=bk, bs_b=bs_b, nk=ks // bk,
                             pow2_b=w.spec.scale_format.is_pow2, decoder=decoder,
                             layout=layout, algorithm=algorithm)
  extra = {}
  if not interpret:
    from jax.experimental.pallas import triton as pltriton
    extra["compiler_params"] = pltriton.CompilerParams(num_warps=num_warps,
                                                       num_stages=num_stages)
  if layout == "kn":
    specs = [pl.BlockSpec((bm, ks), lambda i, j, s: (i, s)),
             pl.BlockSpec((ks // 2, bn), lambda i, j, s: (s, j)),
             pl.BlockSpec((ks // bs_b, bn), lambda i, j, s: (s, j))]
    out_shape, out_spec = (splits, mp, n), pl.BlockSpec((None, bm, bn), lambda i, j, s: (s, i, j))
  else:
    specs = [pl.BlockSpec((bm, ks), lambda i, j, s: (i, s)),
             pl.BlockSpec((bn, ks // 2), lambda i, j, s: (j, s)),
             pl.BlockSpec((bn, ks // bs_b), lambda i, j, s: (j, s))]
    out_shape, out_spec = (splits, n, mp), pl.BlockSpec((None, bn, bm), lambda i, j, s: (s, j, i))
  part = pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct(out_shape, jnp.float32),
      grid=(mp // bm, n // bn, splits), in_specs=specs, out_specs=out_spec,
      interpret=interpret, name=f"fp4jax_matmul_weight_only_{layout}_{algorithm}", **extra,
  )(xp, w.codes, fu.scale_codes(w))
  y = jnp.sum(part, axis=0) if splits > 1 else part[0]
  if layout == "nk":
    y = y.T
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
# dot takes (16 on each side). Measured on the H200 (kernels/NOTES.md, "Issue 21 item 4,
# second step"; kernels.bench_weight_only --sweep): 128 columns x 128 K per program with a
# 5-stage pipeline beat the earlier 64 x 256 x 3 stages at every M <= 64 for both formats
# (MXFP4 M = 16: 0.0360 vs 0.0396 ms; M = 64: 0.0557 vs 0.0725 ms); bk = 256 holds two
# 128 x 128 BF16 halves in registers (253 per thread, 2 programs per SM) and bk = 512
# exceeds shared memory at M = 64.
DEFAULT_BN, DEFAULT_BK, MIN_TILE = 128, 128, 16
MMA_STAGES, GEMV_STAGES = 5, 3   # Triton pipeline stages (num_stages) per algorithm


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


ALGORITHMS = ("auto", "mma", "gemv")
"""How the kernel multiplies (:func:`weight_only_matmul`, :func:`weight_only_linear`):

- ``mma``: tensor-core dots on 16/32/64-row tiles of the activations (M padded);
- ``gemv``: CUDA-core FMAs, one per weight and row, accumulated elementwise in float32 and
  reduced across K once per program; for M <= :data:`GEMV_MAX_ROWS`;
- ``auto``: ``gemv`` for M <= :data:`GEMV_AUTO_MAX_ROWS`, else ``mma``.
"""
GEMV_MAX_ROWS = 4
# The largest M for which "auto" picks the GEMV. Measured on the H200 (K = N = 8192,
# kernels/NOTES.md): at M = 1 it is 1.31x / 1.11x BF16 (MXFP4 / NVFP4) where the MMA kernel
# is 1.13x / 0.89x; at M = 2 and 4 the MMA kernel is faster (FMAs grow with M).
GEMV_AUTO_MAX_ROWS = 1
# (bn, bk) of the GEMV: a (bk/2, bn) float32 accumulator per row stays in registers.
GEMV_TILE = {1: (128, 64), 2: (128, 64), 4: (64, 64)}


def gemv_rows_tile(m: int) -> int:
  """Rows per GEMV program: 1, 2 or 4 (powers of two; padded rows cost FMAs)."""
  return 1 if m <= 1 else 2 if m <= 2 else 4


def gemv_tile(m: int, k: int, n: int, block: int) -> tuple[int, int, int]:
  """The (bm, bn, bk) tile of the GEMV: :data:`GEMV_TILE`'s, or smaller powers of two that
  divide N and K (K's a multiple of the block); where none does, the default, which the
  caller's divisibility check then names."""
  bm = gemv_rows_tile(m)
  bn, bk = GEMV_TILE[bm]
  return (bm, largest_dividing(n, bn, MIN_TILE) or bn,
          largest_dividing(k, bk, max(MIN_TILE, block)) or bk)


def _resolve_algorithm(algorithm: str, m: int, fn: str, tile=None) -> str:
  if algorithm not in ALGORITHMS:
    raise ValueError(f"{fn}: algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
  if algorithm == "gemv" and m > GEMV_MAX_ROWS:
    raise ValueError(f"{fn}: algorithm='gemv' takes M <= {GEMV_MAX_ROWS} rows, got M={m}; "
                     "use algorithm='mma' (or 'auto')")
  if algorithm == "auto":   # an explicit tile of more rows than the GEMV takes means MMA
    small = m <= GEMV_AUTO_MAX_ROWS and (tile is None or tile[0] <= GEMV_MAX_ROWS)
    return "gemv" if small else "mma"
  return algorithm


def _check_weights(w: QArray, fn: str):
  if not _takes_weights(w):
    raise ValueError(f"{fn} takes packed E2M1 weights with 8-bit scales and blocks of "
                     f"16/32, got {w.spec.name}; dequantize and use jnp.dot")


def _run(x, w, *, layout, n, out_dtype, tile, splits, interpret, num_warps, num_stages,
         decoder, algorithm, fn):
  if decoder not in DECODERS:
    raise ValueError(f"{fn}: decoder must be one of {DECODERS}, got {decoder!r}")
  if decoder == "prmt" and interpret:
    raise ValueError(f"{fn}: decoder='prmt' is inline PTX and runs on a GPU only; in "
                     "interpret mode use decoder='alu' (or 'auto')")
  decoder = ("alu" if interpret else "prmt") if decoder == "auto" else decoder
  _check_weights(w, fn)
  m, k = x.shape
  algorithm = _resolve_algorithm(algorithm, m, fn, tile)
  block = w.spec.block_size
  if tile is None and algorithm == "gemv":
    tile = gemv_tile(m, k, n, block)
  bm, bn, bk = tile or weight_only_tile(m, k, n, block) or (
      weight_only_rows_tile(m), DEFAULT_BN, DEFAULT_BK)   # (the last: for the message)
  why = _tile_reason(n, k, bn, bk, block)
  if why:
    raise ValueError(f"{fn}: {why}")
  if algorithm == "gemv" and bm > GEMV_MAX_ROWS:
    raise ValueError(f"{fn}: algorithm='gemv' takes tiles of at most {GEMV_MAX_ROWS} rows, "
                     f"got bm={bm}")
  if splits is None:
    splits = weight_only_splits(m, n, k, bm, bn, bk)
  if num_stages is None:
    num_stages = GEMV_STAGES if algorithm == "gemv" else MMA_STAGES
  if splits < 1 or k % (splits * bk):
    raise ValueError(f"{fn}: splits={splits} must be >= 1 and divide K/bk = {k}/{bk}")
  return _weight_only_call(x, w, bm=bm, bn=bn, bk=bk, splits=splits,
                           out_dtype=jnp.dtype(out_dtype), interpret=interpret,
                           num_warps=num_warps, num_stages=num_stages, decoder=decoder,
                           layout=layout, algorithm=algorithm)


def weight_only_matmul(x: jax.Array, w: QArray, *, out_dtype: Any = jnp.bfloat16,
                       tile: tuple[int, int, int] | None = None,
                       splits: int | None = None, interpret: bool = False,
                       num_warps: int = 4, num_stages: int | None = None,
                       decoder: str = "auto", algorithm: str = "auto") -> jax.Array:
  """``x @ w`` for BF16/F32 activations ``x`` (M, K) and FP4 weights ``w`` (K, N), blocked
  along K: the weights are read packed (4.25-4.5 bits) and unpacked in the kernel, which
  is what pays on Hopper for skinny M (decoding, evaluation). ``x`` is rounded to bf16.

  tile: (bm, bn, bk), default :func:`weight_only_tile` (rows, columns and K tiles that
    divide the shape; :data:`GEMV_TILE` for the GEMV); M is padded to bm, K and N must
    be multiples; bm, bn, bk powers of two on a GPU.
  splits: K splits, each a program's float32 partial sum, added by XLA (default
    :func:`weight_only_splits`).
  num_warps, num_stages: Triton's (default 4 warps; :data:`MMA_STAGES` or
    :data:`GEMV_STAGES` pipeline stages).
  decoder: one of :data:`DECODERS` (``prmt``: inline PTX, GPU only; ``alu``; ``auto``).
  algorithm: one of :data:`ALGORITHMS` (tensor-core ``mma``, CUDA-core ``gemv``, ``auto``).
  """
  fn = "weight_only_matmul"
  if not isinstance(w, QArray) or w.ndim != 2 or w.axis % 2 != 0:
    raise ValueError(f"{fn}: w must be a 2D QArray blocked along K (axis=-2); for "
                     "(N, K) weights blocked along their last axis use weight_only_linear")
  if x.ndim != 2 or x.shape[1] != w.shape[0]:
    raise ValueError(f"{fn}: x {x.shape} and w {w.shape} do not contract")
  return _run(x, w, layout="kn", n=w.shape[1], out_dtype=out_dtype, tile=tile,
              splits=splits, interpret=interpret, num_warps=num_warps,
              num_stages=num_stages, decoder=decoder, algorithm=algorithm, fn=fn)


def weight_only_linear(x: jax.Array, w: QArray, *, out_dtype: Any = jnp.bfloat16,
                       tile: tuple[int, int, int] | None = None,
                       splits: int | None = None, interpret: bool = False,
                       num_warps: int = 4, num_stages: int | None = None,
                       decoder: str = "auto", algorithm: str = "auto") -> jax.Array:
  """``x @ w.T`` for activations ``x`` (M, K) and FP4 weights ``w`` (N, K) blocked along
  their last axis: the PyTorch ``Linear`` / gpt-oss orientation (what
  :func:`fp4jax.interop.load_safetensors` returns), read as stored, without the transpose
  :meth:`fp4jax.QArray.mT` would copy. The kernel computes ``(w @ x.T).T``: the decoded
  weight tile is the tensor-core dot's left operand (``bn`` rows of N) and the activations
  its right one. Arguments as :func:`weight_only_matmul`'s (``tile`` is (bm, bn, bk) with
  bn along N)."""
  fn = "weight_only_linear"
  if not isinstance(w, QArray) or w.ndim != 2 or w.axis % 2 != 1:
    raise ValueError(f"{fn}: w must be a 2D QArray (N, K) blocked along K (axis=-1); for "
                     "(K, N) weights blocked along axis -2 use weight_only_matmul")
  if x.ndim != 2 or x.shape[1] != w.shape[1]:
    raise ValueError(f"{fn}: x {x.shape} and w {w.shape} do not contract (x @ w.T takes "
                     "x (M, K) and w (N, K))")
  return _run(x, w, layout="nk", n=w.shape[0], out_dtype=out_dtype, tile=tile,
              splits=splits, interpret=interpret, num_warps=num_warps,
              num_stages=num_stages, decoder=decoder, algorithm=algorithm, fn=fn)


__all__ = ["ALGORITHMS", "DECODERS", "GEMV_AUTO_MAX_ROWS", "GEMV_MAX_ROWS", "GEMV_TILE",
           "PRMT_DECODE_ASM", "gemv_rows_tile", "gemv_tile", "weight_only_linear", "decode_alu", "decode_prmt", "halves",
           "DEFAULT_BK", "DEFAULT_BN", "GEMV_STAGES", "MMA_STAGES", "unsupported_reason", "weight_only_matmul", "weight_only_tile", "weight_only_reference", "weight_only_rows_tile",
           "weight_only_splits"]
