"""Fused quantize kernels: one read of a bf16/f32 matrix, packed codes + scales written.

Pallas kernels (Triton lowering on GPU, interpret mode on CPU) for 2D operands:

* MX formats with power-of-two scales (E8M0; every scale mode, block 16 or 32, any
  element of 4 or 8 bits), and NVFP4-style float block scales (UE4M3) with an FP32
  tensor scale;
* blocks along rows (``axis=-1``), along columns (``axis=-2``), or both from one read
  (:func:`quantize_both`: the forward GEMM wants A blocked along K, the weight gradient
  wants it blocked along M);
* nearest-even or stochastic rounding; the stochastic bits are
  :func:`fp4jax.prng.element_bits_words` of ``(seed, row-major element index)``, exactly
  what the reference draws, computed in the kernel;
* an optional random Hadamard transform along the blocked axis, fused before
  quantization (:func:`fp4jax.hadamard.rht_butterfly`, the same butterfly as the
  reference).

The kernel body calls the reference's own numerics (:mod:`fp4jax.scales`,
:mod:`fp4jax.rounding`, :mod:`fp4jax.bits`: integer operations on float bits), so kernel
and reference are the same function by construction, and the tests check it bit for
bit. The NVFP4 tensor scale is a separate XLA reduction (``max |x|`` over the tensor)
before the kernel, or the caller's value (e.g. last step's amax).

The reference is :func:`fp4jax.encode.quantize_reference` (what ``fp4jax.quantize``
runs with ``impl="xla"``); :func:`quantize_reference` names it here for the tests and the
benchmark. Which of the two runs for a call is decided in :mod:`fp4jax.dispatch`; the
``interpret`` argument (Pallas interpret mode, for CPUs) comes from there too.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from fp4jax import bits, hadamard, prng, scales, tensor_amax
from fp4jax import rounding as rounding_lib
from fp4jax.encode import quantize_reference as _quantize_xla
from fp4jax.qarray import QArray
from fp4jax.spec import QuantSpec

U32, I32 = jnp.uint32, jnp.int32

# What the kernels take (fp4jax.dispatch reads these through unsupported_reason).
BLOCK_SIZES = (16, 32)
ELEMENT_BITS = (4, 8)
INPUT_DTYPES = (jnp.float32, jnp.bfloat16)


class FloatScaleConstants(NamedTuple):
  """Layout of the per-tensor float32 vector the float-scale kernels read (one SMEM-sized
  operand instead of eleven): indices into it, see :func:`_float_scale_constants`."""

  TENSOR_SCALE: int = 0    # t (1 for one-level scales)
  INV_TENSOR_SCALE: int = 1  # fl(1 / t)
  AMAX_FACTOR: int = 2     # c = fl((1/t) / max(element)): block scale estimate amax * c
  RECIP_TABLE: int = 3     # D[m] = fl((1/t) / (8 + m)), m = 0..7, at RECIP_TABLE + m
  FAST_PATH_OK: int = 11   # 1.0 when the fast path's bounds hold for this tensor, else 0
  LENGTH: int = 16         # padded to a power of two


FSC = FloatScaleConstants()
E4M3_MANTISSAS = 8         # UE4M3 significands 8 + m, m = 0..7 (the reciprocal table's size)


def quantize_reference(x, spec, axis=-1, **kwargs) -> QArray:
  """The pure-JAX quantizer the kernels must equal (:func:`fp4jax.encode.quantize_reference`,
  which ``fp4jax.quantize(..., impl="xla")`` runs)."""
  return _quantize_xla(x, spec, axis, **kwargs)


def unsupported_reason(x_shape, dtype, spec: QuantSpec, axis: int) -> str | None:
  """Why the kernels cannot take this configuration (None: they can)."""
  if len(x_shape) != 2:
    return f"kernels take 2D operands, got rank {len(x_shape)}"
  if jnp.dtype(dtype) not in [jnp.dtype(d) for d in INPUT_DTYPES]:
    return f"kernels read float32 or bfloat16, got {jnp.dtype(dtype)}"
  if axis % 2 not in (0, 1):
    return f"axis {axis} is not an axis of a 2D operand"
  if spec.granularity != "block":
    return f"granularity {spec.granularity!r} (kernels do 1D blocks)"
  if spec.block_size not in BLOCK_SIZES:
    return f"block size {spec.block_size} (kernels do 16 and 32)"
  if spec.element.bits not in ELEMENT_BITS:
    return f"{spec.element.bits}-bit elements (kernels do 4 and 8 bits)"
  if spec.element.bits == 4 and not spec.packed:
    return "unpacked 4-bit codes"
  sfmt = spec.scale_format
  if not sfmt.is_pow2 and sfmt.storage_bits != 8:
    return f"scale format {sfmt.name} (kernels store 8-bit scales)"
  if x_shape[axis % 2] % spec.block_size:
    return (f"axis length {x_shape[axis % 2]} is not a multiple of the block size "
            f"{spec.block_size}")
  return None


def _f32_bits_of(x):
  """float32 bit patterns of a bf16/f32 tile, exact (bf16 is the top half of f32)."""
  if x.dtype == jnp.bfloat16:
    return lax.bitcast_convert_type(x, jnp.uint16).astype(U32) << 16
  return lax.bitcast_convert_type(x, U32)


class _BlockScales(NamedTuple):
  """Per-block results shared by every element of a block (shape: the block grid)."""

  scale_codes: jax.Array          # uint32 stored scale codes
  shift: jax.Array | None         # power-of-two scales: the exponent s (scale 2^s)
  nan_block: jax.Array | None     # power-of-two scales: the NaN scale code
  recip: jax.Array | None         # float scales: (1/t)/s, the multiplier of x
  mult: jax.Array | None          # E2M1 fast path: the multiplier of x (2^-s or recip)
  ok: jax.Array | None            # E2M1 fast path: the block is ordinary (see below)
  exact: Any = None               # float scales, fast path: thunk of the exact scales


def _block_scales(amax, spec: QuantSpec, ts, inv_ts, fconst=None) -> _BlockScales:
  """Scale codes and multipliers from block maxima (amax bit patterns, int32)."""
  elem, sfmt = spec.element, spec.scale_format
  fast = _fast_e2m1(spec)
  # Fast-path limits (see _e2m1_codes_fast): beyond them a subnormal x could reach a
  # nonzero code (nearest: x * m >= 0.25; stochastic: any chance of rounding up).
  m_limit = 124 if spec.rounding == "nearest" else 93
  if sfmt.is_pow2:
    code = scales.pow2_scale_code(amax, elem, sfmt, spec.scale_mode)
    shift = scales.pow2_scale_exponent(code, sfmt)
    nan_block = scales.pow2_scale_is_nan(code, sfmt)
    mult = ok = None
    if fast:
      # 2^-s as a normal float32: x * 2^-s is then exact wherever it is a normal number
      # (a NaN block's codes are replaced afterwards).
      ok = ((shift >= -m_limit) & (shift <= 126)) | nan_block
      mult = bits.pow2_f32(-jnp.clip(shift, -126, 126))
    return _BlockScales(code, shift, nan_block, None, mult, ok)
  def exact():
    s, code = scales.float_block_scale_and_code(amax, elem, sfmt, ts)
    recip = scales.float_scale_reciprocal(s, ts, inv_ts)
    return _BlockScales(code, None, None, recip, recip, None)

  if not (fast and fconst is not None and scales.is_e4m3fn(sfmt)):
    return exact()
  # Fast float scales (UE4M3, E2M1 elements). The reference's block scale is
  # E4M3(clamp(fl(fl(amax / 6) / t))); here v' = fl(amax * c) with c = fl(1/(6 t)) is
  # within 4 float32 ulps of that quotient, so its E4M3 rounding is the reference's
  # unless v' lies within 16 ulps of an E4M3 rounding midpoint (such blocks, about 3e-5
  # of all, send their tile the exact way). The reciprocal fl((1/t) / s) of
  # s = (8 + m) 2^(E - 10) is D[m] = fl((1/t) / (8 + m)) times 2^(10 - E), exact while
  # normal (D from the wrapper, once per tensor).
  c, table, tensor_ok = fconst
  vb = bits.f32_bits(bits.bits_f32(amax.astype(U32)) * c)
  low = (vb & U32(0xFFFFF)).astype(I32)
  near_midpoint = jnp.abs(low - 0x80000) <= 16
  lo = bits.f32_bits(np.float32(sfmt.min_normal))
  hi = bits.f32_bits(np.float32(sfmt.max_value))
  _, code = scales.e4m3_round_normal_bits(jnp.clip(vb, lo, hi))
  mant, e = code & U32(7), (code >> 3).astype(I32)
  d = table[0]
  for mm in range(1, 8):
    d = jnp.where(mant == mm, table[mm], d)
  db = bits.f32_bits(d)
  new_e = ((db >> 23) & U32(0xFF)).astype(I32) + 10 - e
  recip = bits.bits_f32((db & U32(0x807FFFFF)) | (jnp.clip(new_e, 1, 254).astype(U32) << 23))
  ok = (~near_midpoint & (amax < bits.F32_INF_BITS) & (new_e >= 1) & (new_e < 127 + m_limit)
        & tensor_ok)
  return _BlockScales(code, None, None, None, recip, ok, exact)


def _element_codes(parts, rparts, bsc: _BlockScales, spec: QuantSpec, expand):
  """Element codes (uint32) of each f32-bit array in ``parts`` (each a 3D view with one
  block axis; ``expand`` adds that axis to a per-block array) and the scale codes.

  E2M1 with nearest or stochastic rounding: if every block of the tile is ordinary, the
  fast path (:func:`_e2m1_codes_fast`); else the general integer path (with the scales
  recomputed exactly where the fast ones were estimates). Both give the reference's
  codes, so the choice (a ``lax.cond`` per tile) is invisible in the output.
  """
  elem = spec.element
  e2m1_nearest = rounding_lib.is_e2m1(elem) and spec.rounding == "nearest"

  def general():
    eb = bsc.exact() if bsc.exact is not None else bsc
    out = []
    for b3, rb3 in zip(parts, rparts):
      sp = bits.split_f32(b3)
      if eb.shift is not None:
        shift = expand(eb.shift)
        if e2m1_nearest:
          out.append(rounding_lib.e2m1_nearest_pow2(sp, shift))
        else:
          out.append(rounding_lib.encode(sp, elem, spec.rounding, rb3, spec.saturate,
                                         exp_shift=shift))
      elif e2m1_nearest:
        out.append(rounding_lib.e2m1_nearest_product(sp, bits.Split(
            *(expand(f) for f in bits.split_f32(bits.f32_bits(eb.recip))))))
      else:
        y = bits.mul_f32(bits.bits_f32(b3), expand(eb.recip))
        out.append(rounding_lib.encode(bits.split_f32(bits.f32_bits(y)), elem,
                                       spec.rounding, rb3, spec.saturate))
    return tuple(out) + (eb.scale_codes,)

  if _fast_e2m1(spec):
    def fast():
      return tuple(_e2m1_codes_fast(b3, expand(bsc.mult), spec.rounding, rb3)
                   for b3, rb3 in zip(parts, rparts)) + (bsc.scale_codes,)
    all_ok = jnp.min(bsc.ok.astype(I32)) == 1
    *codes, scale_codes = lax.cond(all_ok, fast, general)
  else:
    *codes, scale_codes = general()
  if bsc.nan_block is not None:
    nan = expand(bsc.nan_block)
    codes = [jnp.where(nan, U32(elem.nan_code or 0), c) for c in codes]
  return tuple(codes), scale_codes


def _quantize_rows(b, spec: QuantSpec, ts, inv_ts, fconst, rbits):
  """Quantizes a tile of f32 bit patterns with blocks along its last axis.

  Returns (element codes packed along the last axis, uint8 scale codes (rows, blocks)).
  The math is the reference's (fp4jax.quantize), on a (rows, blocks, block) view.
  """
  bs = spec.block_size
  r, c = b.shape
  b3 = b.reshape(r, c // bs, bs)
  amax = jnp.max(bits.abs_bits(b3), axis=-1)
  rb3 = None if rbits is None else rbits.reshape(r, c // bs, bs)
  bsc = _block_scales(amax, spec, ts, inv_ts, fconst)
  [codes], scale_codes = _element_codes([b3], [rb3], bsc, spec, lambda v: v[..., None])
  codes = codes.reshape(r, c)
  if spec.element.bits == 4:  # two codes per byte, the first in the low nibble (OCP order)
    lo, hi = jnp.unstack(codes.reshape(r, c // 2, 2), axis=-1)
    codes = lo | (hi << 4)
  return codes.astype(jnp.uint8), scale_codes.astype(jnp.uint8)


def _quantize_cols_even_odd(be, bo, spec: QuantSpec, ts, inv_ts, fconst, rbe, rbo):
  """Blocks along columns of a tile given as its even rows ``be`` and odd rows ``bo``
  (each (bm/2, bk), f32 bits): 4-bit codes packed two rows per byte (even row in the low
  nibble) and scale codes (bm/bs, bk), with no transpose (a transpose in a Triton kernel
  goes through shared memory, and next to the general path it made compiles take
  minutes). A block of ``bs`` rows is ``bs/2`` rows of each half."""
  bs = spec.block_size
  h, c = be.shape
  view = lambda v: None if v is None else v.reshape(h // (bs // 2), bs // 2, c)
  be3, bo3 = view(be), view(bo)
  amax = jnp.maximum(jnp.max(bits.abs_bits(be3), axis=1), jnp.max(bits.abs_bits(bo3), axis=1))
  bsc = _block_scales(amax, spec, ts, inv_ts, fconst)
  (ce, co), scale_codes = _element_codes([be3, bo3], [view(rbe), view(rbo)], bsc, spec,
                                         lambda v: v[:, None, :])
  codes = ce.reshape(h, c) | (co.reshape(h, c) << 4)
  return codes.astype(jnp.uint8), scale_codes.astype(jnp.uint8)


def _quantize_cols_phases(phases, spec: QuantSpec, ts, inv_ts, fconst, rphases):
  """Blocks along columns of a tile given as ``L`` row phases (phase r: rows r, r + L,
  r + 2L, ... of the tile; each (bm/L, bk) f32 bits; L a multiple of the block size),
  elementwise only: no transpose or reshape for Triton to lower.

  Returns (``L/2`` uint8 arrays: packed rows t, t + L/2, ... holding phases 2t (low
  nibble) and 2t + 1; ``L/bs`` uint8 arrays: scale rows q, q + L/bs, ...).
  """
  bs = spec.block_size
  codes_out, scales_out = [], []
  for q in range(len(phases) // bs):
    blk, rblk = phases[q * bs:(q + 1) * bs], rphases[q * bs:(q + 1) * bs]
    amax = functools.reduce(jnp.maximum, [bits.abs_bits(p) for p in blk])
    bsc = _block_scales(amax, spec, ts, inv_ts, fconst)
    codes, scale_codes = _element_codes(blk, rblk, bsc, spec, lambda v: v)
    codes_out += [(codes[2 * t] | (codes[2 * t + 1] << 4)).astype(jnp.uint8)
                  for t in range(bs // 2)]
    scales_out.append(scale_codes.astype(jnp.uint8))
  return codes_out, scales_out


def hadamard_phase_count(rht_block: int, spec: QuantSpec) -> int:
  """Row phases L of the column Hadamard path: a whole number of Hadamard blocks and of
  quantization blocks (the tile's rows must be a multiple)."""
  return max(rht_block, spec.block_size)


# The column Hadamard path unrolls every row phase (loads, butterfly, random bits, scales)
# into one Triton program, and its compile grows faster than the phase count: on an H200
# (jax 0.11.2) NVFP4 with stochastic rounding compiled in 80 s at 16 phases and did not
# finish in 440 s or (twice) 570 s at 32, while MXFP4 nearest at 32 phases took 40 s
# (kernels/results/test_gpu_nvidia_h200*.log, 2026-12-02/03). Compiled launches beyond 16
# phases therefore take only power-of-two scales with nearest rounding; interpret mode
# takes every configuration.
MAX_COMPILED_COLUMN_PHASES = 16


def column_hadamard_compile_reason(hadamard_block: int, spec: QuantSpec) -> str | None:
  """Why a compiled (not interpreted) column-Hadamard launch is refused (None: it is not)."""
  phases = hadamard_phase_count(hadamard_block, spec)
  if phases <= MAX_COMPILED_COLUMN_PHASES:
    return None
  if spec.scale_format.is_pow2 and spec.rounding == "nearest":
    return None
  smaller = (f"hadamard_block={MAX_COMPILED_COLUMN_PHASES}, "
             if spec.block_size <= MAX_COMPILED_COLUMN_PHASES else "")
  rounding = "stochastic rounding" if spec.rounding == "stochastic" else spec.rounding
  return (f"hadamard_block={hadamard_block} along columns with {spec.name or 'this spec'} "
          f"({rounding}, {spec.scale_format.name} scales) needs {phases} row phases in one "
          "program; compiled, such launches are refused (NVFP4 with stochastic rounding "
          "did not finish compiling in 9 minutes on an H200; the other non-MX-nearest "
          f"specs are untried); use {smaller}the transpose along rows, or the pure-JAX path "
          "(fp4jax.hadamard.rht, then fp4jax.quantize)")


def _fast_e2m1(spec: QuantSpec) -> bool:
  return rounding_lib.is_e2m1(spec.element) and spec.rounding in ("nearest", "stochastic")


def _e2m1_codes_fast(b3, mult, rounding, rb3):
  """E2M1 codes of ``x * mult`` (x: f32 bits; mult: a positive normal float32 per block,
  broadcast) from one hardware multiply and :func:`fp4jax.rounding.e2m1_magnitude_of_bits`.

  Exact where the callers allow it: the product of two normals is the IEEE product
  whenever it is normal, and a product below 2^-126 (flushed to zero or not) has code 0
  in the reference too; a subnormal x could be flushed by the backend, which the callers
  exclude by bounding mult (then ``x * mult`` is below every rounding threshold).
  """
  y = bits.bits_f32(b3 & U32(bits.ABS_MASK)) * mult
  mag = rounding_lib.e2m1_magnitude_of_bits(bits.f32_bits(y), rounding, rb3)
  return ((b3 >> 28) & U32(8)) | mag


def tile_rows_cols(i, j, bm, bk, *, rows=None, row_step=1, row_offset=0, transposed=False):
  """Row and column indices (uint32) of rows ``row_offset + row_step * r`` of tile (i, j);
  ``transposed``: laid out (bk, rows)."""
  rows = bm if rows is None else rows
  shape, (ra, ca) = ((bk, rows), (1, 0)) if transposed else ((rows, bk), (0, 1))
  row = (i * bm + row_offset + row_step * lax.broadcasted_iota(I32, shape, ra)).astype(U32)
  col = (j * bk + lax.broadcasted_iota(I32, shape, ca)).astype(U32)
  return row, col


def tile_counters(i, j, bm, bk, width, **where):
  """Row-major element indices (uint32) of tile (i, j) (``where`` as
  :func:`tile_rows_cols`) in a matrix ``width`` columns wide."""
  row, col = tile_rows_cols(i, j, bm, bk, **where)
  return row * U32(width) + col


def tile_random_bits(seed0, seed1, i, j, bm, bk, width, *, per_word=True, **where):
  """Stochastic-rounding words of tile (i, j) (:func:`fp4jax.prng.random_bits_for` at its
  elements, ``where`` as :func:`tile_rows_cols`). For a plain row-major tile whose columns
  group into whole words (``width`` and ``bk`` multiples of 4), one hash per four
  elements, interleaved in registers; otherwise (strided or transposed row phases, or
  ``per_word=False``) one per element. Word indices are counted per word wherever
  ``width`` is a multiple of 4 (as the reference does: no wrap below 2^34 elements)."""
  q = prng.ELEMENTS_PER_WORD
  if width % q:
    return prng.element_bits_words(seed0, seed1, tile_counters(i, j, bm, bk, width, **where))
  if not per_word or where or bk % q:
    row, col = tile_rows_cols(i, j, bm, bk, **where)
    return prng.word_lane_bits(seed0, seed1, row * U32(width // q) + (col >> U32(2)),
                               col & U32(q - 1))
  words = prng.counter_hash_words(seed0, seed1, tile_counters(i, j, bm, bk // q, width // q))
  return prng.interleave_lanes(words)


def _kernel(x_ref, seed_ref, fs_ref, *out_refs, spec, orient, bm, bk, width, rht_block):
  i, j = pl.program_id(0), pl.program_id(1)
  ts = inv_ts = fconst = None
  if fs_ref is not None:  # float scales: see _float_scale_constants
    if spec.tensor_scale is not None:
      ts, inv_ts = fs_ref[FSC.TENSOR_SCALE], fs_ref[FSC.INV_TENSOR_SCALE]
    fconst = (fs_ref[FSC.AMAX_FACTOR],
              [fs_ref[FSC.RECIP_TABLE + m] for m in range(E4M3_MANTISSAS)],
              fs_ref[FSC.FAST_PATH_OK] > 0)
  sr = spec.rounding == "stochastic"

  def random_bits(**where):
    if not sr:
      return None
    return tile_random_bits(seed_ref[0], seed_ref[1], i, j, bm, bk, width, **where)

  def hadamard_of(b):
    return bits.f32_bits(hadamard.rht_butterfly(bits.bits_f32(b), rht_block, seed_ref[2],
                                                seed_ref[3]))

  outs = iter(out_refs)
  if orient in ("rows", "both"):
    b = _f32_bits_of(x_ref[...])
    codes, sc = _quantize_rows(hadamard_of(b) if rht_block else b, spec, ts, inv_ts, fconst,
                               random_bits())
    next(outs)[...] = codes
    next(outs)[...] = sc
  if orient in ("cols", "both"):
    if spec.element.bits == 4 and not rht_block:
      # Even and odd rows as two strided loads (from L1/L2 when rows were loaded too):
      # a column block is bs/2 rows of each, and a packed byte is one even + one odd row.
      h = bm // 2
      be = _f32_bits_of(x_ref[pl.ds(0, h, stride=2), :])
      bo = _f32_bits_of(x_ref[pl.ds(1, h, stride=2), :])
      codes, sc = _quantize_cols_even_odd(
          be, bo, spec, ts, inv_ts, fconst, random_bits(rows=h, row_step=2),
          random_bits(rows=h, row_step=2, row_offset=1))
      next(outs)[...] = codes
      next(outs)[...] = sc
    elif spec.element.bits == 4:
      # A Hadamard transform along the columns: L strided row loads (the phases), the
      # butterfly between them and the column quantization, all elementwise, and strided
      # stores. (Through a transpose, as below, Triton took over 7 minutes to compile the
      # NVFP4 kernel on the H200.)
      phase_count = hadamard_phase_count(rht_block, spec)
      g = bm // phase_count
      phases = [bits.bits_f32(_f32_bits_of(x_ref[pl.ds(r, g, stride=phase_count), :]))
                for r in range(phase_count)]
      phases = [bits.f32_bits(v) for start in range(0, phase_count, rht_block)
                for v in hadamard.rht_butterfly_entries(phases[start:start + rht_block],
                                                        seed_ref[2], seed_ref[3])]
      rphases = [random_bits(rows=g, row_step=phase_count, row_offset=r)
                 for r in range(phase_count)]
      codes, scs = _quantize_cols_phases(phases, spec, ts, inv_ts, fconst, rphases)
      codes_ref, sc_ref = next(outs), next(outs)
      for t, c in enumerate(codes):
        codes_ref[pl.ds(t, g, stride=phase_count // 2), :] = c
      for q, sc in enumerate(scs):
        sc_ref[pl.ds(q, g, stride=phase_count // spec.block_size), :] = sc
    else:
      # 8-bit codes (with or without a Hadamard transform): through a transpose.
      bt = _f32_bits_of(x_ref[...].T)  # transpose the 2-byte input, not the widened bits
      codes, sc = _quantize_rows(hadamard_of(bt) if rht_block else bt, spec, ts, inv_ts, fconst,
                                 random_bits(transposed=True))
      next(outs)[...] = codes.T
      next(outs)[...] = sc.T


def round_up(n, m):
  return -(-n // m) * m


def largest_dividing(n: int, cap: int, floor: int) -> int | None:
  """The largest power of two in [floor, cap] dividing ``n`` (cap and floor powers of
  two), or None: the tile a kernel takes along an axis of length ``n``."""
  t = cap
  while t >= floor:
    if n % t == 0:
      return t
    t //= 2
  return None


def _tensor_scale(b_abs_max, spec):
  return scales.tensor_scale_from_amax(bits.bits_f32(b_abs_max.astype(U32)), spec.element,
                                       spec.scale_format)


@functools.partial(jax.jit, static_argnames=("spec", "orient", "bm", "bk", "interpret",
                                             "rht_block", "num_warps", "num_stages"))
def _quantize_call(x, seed, ts, *, spec, orient, bm, bk, interpret, rht_block, num_warps,
                   num_stages):
  m, k = x.shape
  mp, kp = round_up(m, bm), round_up(k, bk)
  xp = jnp.pad(x, ((0, mp - m), (0, kp - k))) if (mp, kp) != (m, k) else x
  bs = spec.block_size
  per_byte = 2 if spec.element.bits == 4 else 1
  out_shape, out_specs = [], []
  if orient in ("rows", "both"):
    out_shape += [jax.ShapeDtypeStruct((mp, kp // per_byte), jnp.uint8),
                  jax.ShapeDtypeStruct((mp, kp // bs), jnp.uint8)]
    out_specs += [pl.BlockSpec((bm, bk // per_byte), lambda i, j: (i, j)),
                  pl.BlockSpec((bm, bk // bs), lambda i, j: (i, j))]
  if orient in ("cols", "both"):
    out_shape += [jax.ShapeDtypeStruct((mp // per_byte, kp), jnp.uint8),
                  jax.ShapeDtypeStruct((mp // bs, kp), jnp.uint8)]
    out_specs += [pl.BlockSpec((bm // per_byte, bk), lambda i, j: (i, j)),
                  pl.BlockSpec((bm // bs, bk), lambda i, j: (i, j))]
  in_specs = [pl.BlockSpec((bm, bk), lambda i, j: (i, j)),
              pl.BlockSpec((4,), lambda i, j: (0,))]
  args = [xp, seed]
  if not spec.scale_format.is_pow2:
    in_specs.append(pl.BlockSpec((FSC.LENGTH,), lambda i, j: (0,)))
    args.append(_float_scale_constants(ts, spec))
  kernel = functools.partial(_kernel, spec=spec, orient=orient, bm=bm, bk=bk, width=k,
                             rht_block=rht_block)
  if spec.scale_format.is_pow2:
    kernel = functools.partial(_call_without_ts, kernel)
  extra = {}
  if not interpret:
    from jax.experimental.pallas import triton as pltriton
    extra["compiler_params"] = pltriton.CompilerParams(num_warps=num_warps,
                                                       num_stages=num_stages)
  outs = pl.pallas_call(kernel, out_shape=out_shape, grid=(mp // bm, kp // bk),
                        in_specs=in_specs, out_specs=out_specs, interpret=interpret,
                        name=f"fp4jax_quantize_{orient}", **extra)(*args)
  res = []
  outs = list(outs)
  if orient in ("rows", "both"):
    codes, sc = outs[:2]
    res.append((codes[:m, :k // per_byte], sc[:m, :k // bs]))
    outs = outs[2:]
  if orient in ("cols", "both"):
    codes, sc = outs[:2]
    res.append((codes[:m // per_byte, :k], sc[:m // bs, :k]))
  return res


def _float_scale_constants(ts, spec: QuantSpec):
  """Per-tensor float32 constants of the float-scale kernels, computed once (exactly):
  ``[t, 1/t, c = fl((1/t) / max(element)), D[m] = fl((1/t) / (8 + m)) for m < 8, ok]``
  (``t = 1`` for one-level scales). ``ok`` says the fast path's bounds hold for the
  tensor: every constant normal and ``c <= 2^118`` (so a subnormal amax stays below the
  smallest scale)."""
  one = np.float32(1.0)
  t = jnp.float32(1.0) if ts is None else ts.reshape(())
  inv_t = bits.div_f32(one, t)
  c = bits.div_f32(inv_t, np.float32(spec.element.max_value))
  table = [bits.div_f32(inv_t, np.float32(8 + m)) for m in range(E4M3_MANTISSAS)]
  consts = jnp.stack([t, inv_t, c] + table)  # indices TENSOR_SCALE .. RECIP_TABLE + 7
  e = (bits.f32_bits(consts) >> 23) & U32(0xFF)
  ok = jnp.all((e >= 1) & (e <= 254)) & (bits.f32_bits(c) <= bits.f32_bits(np.float32(2.0**118)))
  vec = jnp.concatenate([consts, jnp.where(ok, one, np.float32(0.0)).reshape(1)])
  assert vec.shape[0] == FSC.FAST_PATH_OK + 1
  return jnp.pad(vec, (0, FSC.LENGTH - vec.shape[0]))


def _call_without_ts(kernel, x_ref, seed_ref, *out_refs):
  return kernel(x_ref, seed_ref, None, *out_refs)


def _store_scales(codes_u8, spec):
  sfmt = spec.scale_format
  if sfmt.is_pow2:
    return scales.store_pow2_scale(codes_u8, sfmt)
  if sfmt.storage_dtype == jnp.float8_e4m3fn:
    return lax.bitcast_convert_type(codes_u8, jnp.float8_e4m3fn)
  return codes_u8


def _default_warps(orient, spec):
  # Measured on an H100 (kernels/results): power-of-two-scale rows kernels are faster with
  # 8 warps (1.46 vs 1.24 TB/s at 8192^2); float-scale kernels with 4 (1.02 vs 0.90).
  return 8 if orient == "rows" and spec.scale_format.is_pow2 else 4


def _default_tile(orient, spec):
  # Rows: wide tiles along the blocked axis; both/cols transpose in the kernel, so square.
  if orient == "rows":
    return 32, 256
  return 64, 64


def _prepare(x, spec, key, tensor_scale, rht_block, axis=-1):
  if spec.rounding == "stochastic" and key is None:
    raise ValueError("rounding='stochastic' needs key=jax.random.key(...)")
  seed = prng.seed_from_key(key) if key is not None else jnp.zeros(2, U32)
  hseed = jnp.zeros(2, U32)
  if rht_block:
    hseed = hadamard.sign_seed_words(key_for_signs(key))
  seed4 = jnp.concatenate([seed, hseed])
  ts = None
  if not spec.scale_format.is_pow2 and spec.tensor_scale is not None:
    if tensor_scale is None:
      # The global amax: one XLA reduction over the tensor (of the transformed tensor
      # when a Hadamard transform is fused) before the kernel.
      v = bits.to_f32_exact(x)
      if rht_block:
        v = hadamard.rht_butterfly(jnp.moveaxis(v, axis, -1), rht_block, hseed[0], hseed[1])
      magnitudes = bits.abs_bits(bits.f32_bits(v))
      if spec.tensor_scale == "finite_amax":
        magnitudes = tensor_amax.finite_abs_bits(magnitudes)
      ts = _tensor_scale(tensor_amax.reduce_amax_bits(jnp.max(magnitudes)), spec)
    else:
      ts = jnp.asarray(tensor_scale, jnp.float32).reshape(())
  return seed4, ts


def key_for_signs(key):
  """The key of the Hadamard signs: fold_in(key, 1) (the rounding bits use key itself)."""
  if key is None:
    raise ValueError("a fused random Hadamard transform needs key=")
  return jax.random.fold_in(key, 1)


def _qarray(codes, sc, ts, spec, axis, dtype):
  ts_store = None if ts is None else ts.reshape(1, 1)
  return QArray(codes, _store_scales(sc, spec), ts_store, spec, axis, (0, 0), dtype)


def quantize(x: jax.Array, spec: QuantSpec, axis: int = -1, key: jax.Array | None = None, *,
             tensor_scale: Any = None, hadamard_block: int | None = None,
             interpret: bool = False, tile: tuple[int, int] | None = None,
             num_warps: int | None = None, num_stages: int = 1) -> QArray:
  """Quantizes a 2D ``x`` with one kernel launch; equals ``fp4jax.quantize(x, spec,
  axis, key=key)`` bit for bit (with ``hadamard_block``: of the Hadamard-transformed x,
  see :func:`hadamard_quantize_reference`).

  Args:
    x: (M, K) float32 or bfloat16.
    spec: a supported :class:`QuantSpec` (see :func:`unsupported_reason`).
    axis: -1 (blocks along rows) or -2 / 0 (blocks along columns).
    key: for stochastic rounding and Hadamard signs.
    tensor_scale: FP32 tensor scale for two-level specs (default: from this tensor).
    hadamard_block: fuse a random Hadamard transform of this size (16 or 32).
    interpret: run the kernel in Pallas interpret mode (CPU).
    tile: (rows, cols) of a program's tile (powers of two, multiples of the block).
  """
  why = unsupported_reason(x.shape, x.dtype, spec, axis)
  if why:
    raise ValueError(f"fp4jax kernels: unsupported configuration: {why}")
  orient = "rows" if axis % 2 == 1 else "cols"
  seed4, ts = _prepare(x, spec, key, tensor_scale, hadamard_block, axis)
  bm, bk = tile or _default_tile(orient, spec)
  if hadamard_block and orient == "cols" and spec.element.bits == 4:
    phase_count = hadamard_phase_count(hadamard_block, spec)
    if bm % phase_count:
      raise ValueError(f"tile={tile}: with hadamard_block={hadamard_block} along columns "
                       f"the tile's rows must be a multiple of {phase_count}")
    why = None if interpret else column_hadamard_compile_reason(hadamard_block, spec)
    if why:
      raise ValueError(f"fp4jax kernels: unsupported configuration: {why}")
  num_warps = num_warps or _default_warps(orient, spec)
  [(codes, sc)] = _quantize_call(x, seed4, ts, spec=spec, orient=orient, bm=bm, bk=bk,
                                 interpret=interpret, rht_block=hadamard_block,
                                 num_warps=num_warps, num_stages=num_stages)
  # Hadamard-transformed values are float32 (as in the reference).
  return _qarray(codes, sc, ts, spec, axis % 2 - 2, jnp.dtype(jnp.float32) if hadamard_block else x.dtype)


def quantize_both(x: jax.Array, spec: QuantSpec, key: jax.Array | None = None, *,
                  tensor_scale: Any = None, interpret: bool = False,
                  tile: tuple[int, int] | None = None, num_warps: int | None = None,
                  num_stages: int = 1) -> tuple[QArray, QArray]:
  """``(quantize(x, spec, -1), quantize(x, spec, -2))`` from one read of ``x``."""
  for ax in (-1, -2):
    why = unsupported_reason(x.shape, x.dtype, spec, ax)
    if why:
      raise ValueError(f"fp4jax kernels: unsupported configuration: {why}")
  seed4, ts = _prepare(x, spec, key, tensor_scale, None)
  bm, bk = tile or _default_tile("both", spec)
  num_warps = num_warps or _default_warps("both", spec)
  (rc, rs), (cc, cs) = _quantize_call(x, seed4, ts, spec=spec, orient="both", bm=bm, bk=bk,
                                      interpret=interpret, rht_block=None,
                                      num_warps=num_warps, num_stages=num_stages)
  return _qarray(rc, rs, ts, spec, -1, x.dtype), _qarray(cc, cs, ts, spec, -2, x.dtype)


def hadamard_quantize_reference(x, spec, axis=-1, key=None, hadamard_block=16, **kw) -> QArray:
  """What the fused Hadamard kernel computes, in pure JAX: the butterfly RHT along
  ``axis`` with signs from ``fold_in(key, 1)``, then ``fp4jax.quantize``."""
  w = hadamard.sign_seed_words(key_for_signs(key))
  xt = jnp.moveaxis(bits.to_f32_exact(x), axis, -1)
  yt = hadamard.rht_butterfly(xt, hadamard_block, w[0], w[1])
  return _quantize_xla(jnp.moveaxis(yt, -1, axis), spec, axis, key=key, **kw)


__all__ = ["BLOCK_SIZES", "ELEMENT_BITS", "FSC", "FloatScaleConstants", "INPUT_DTYPES",
           "hadamard_quantize_reference", "key_for_signs", "quantize", "quantize_both",
           "quantize_reference", "unsupported_reason"]
