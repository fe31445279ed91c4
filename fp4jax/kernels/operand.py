"""GEMM-ready operands from one read: a Pallas kernel that writes fake-quantized values.

The kernel twin of :func:`fp4jax.operand.gemm_operand` for operands with power-of-two
block scales (MXFP4 and its E8M0 scale modes; E2M1 elements, blocks of 16 or 32, nearest
or stochastic rounding): each program loads one tile of the input once, takes the block
maxima in registers and writes the values ``q * 2^s`` in the GEMM's input dtype (BF16,
exact: :func:`fp4jax.spec.bf16_exact`). XLA's own fusion of the same math reads the input
twice (once for the block maxima, once for the elements) and, fused into a reduction,
spends its element math where it parallelises badly (``kernels/NOTES.md``); the kernel
moves the ideal bytes, one read and one write.

Orientations of a 2D ``(M, K)`` operand: blocks along rows (``"rows"``, the forward's
activations and dgrad's ``dY``), along columns (``"cols"``, wgrad's activations and
``dY``), or both from one read (``"both"``: ``dY`` feeds dgrad and wgrad, each with its
own spec and key). Leading dimensions are flattened; a column block never crosses them
because the blocked length divides into whole blocks.

The per-block and per-element math is the XLA emitter's own
(:func:`fp4jax.operand.block_factors`, :func:`fp4jax.operand.element_value_bits`), so
kernel and reference are the same function by construction; the tests compare
:func:`gemm_operand` with :func:`gemm_operand_reference` bit for bit (interpret mode on
CPU, compiled on the GPU by the GPU test command and ``kernels.bench_operand``).
Stochastic rounding draws :func:`fp4jax.prng.random_bits_for`'s words at the tile's
elements in the kernel (one hash per four elements: :func:`fp4jax.kernels.quantize.
tile_random_bits`), the bits the
reference. Float (UE4M3) block scales need the tensor's amax first (two reads) and take
:mod:`fp4jax.kernels.float_scale_operand`, whose element pass reads the block factors XLA
makes (an exact per-block division in Triton is what made NVFP4 kernels compile for
minutes).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from fp4jax import bits, operand, prng
from fp4jax.kernels.quantize import largest_dividing, round_up, tile_random_bits
from fp4jax.spec import QuantSpec

U32, I32 = jnp.uint32, jnp.int32
ORIENTATIONS = ("rows", "cols", "both")
BLOCK_SIZES = (16, 32)
OUTPUT_DTYPES = (jnp.bfloat16, jnp.float32)
SEED_WORDS = 4          # the seed operand: rows' (seed0, seed1), then columns'
_ROWS_SEED, _COLS_SEED = 0, 2


@dataclasses.dataclass(frozen=True)
class OperandKernelConfig:
  """Tuning knobs of one launch (powers of two; a tile holds whole blocks)."""

  block_rows: int = 32
  block_cols: int = 256
  num_warps: int = 8
  num_stages: int = 1
  # Stochastic rounding: one hash per four elements, interleaved in registers (False: one
  # hash per element of its word; the same bits, the measured alternative).
  hash_per_word: bool = True

  def __post_init__(self):
    if not isinstance(self.hash_per_word, bool):
      raise ValueError("OperandKernelConfig: hash_per_word must be True or False, got "
                       f"{self.hash_per_word!r}")
    for name in ("block_rows", "block_cols", "num_warps"):
      v = getattr(self, name)
      if not (isinstance(v, int) and v > 0 and v & (v - 1) == 0):
        raise ValueError(f"OperandKernelConfig: {name} must be a power of two, got {v!r}")


# Measured defaults are in kernels/NOTES.md ("Operand kernel"); tiles shrink to divide the
# operand (a padded launch would add a copy on each side).
DEFAULT_CONFIG = {"rows": OperandKernelConfig(32, 256, 8),
                  "cols": OperandKernelConfig(64, 128, 4),
                  "both": OperandKernelConfig(64, 128, 4)}


def gemm_operand_reference(x: jax.Array, spec: QuantSpec, axis: int = -1,
                           key: jax.Array | None = None, *, dtype: Any = jnp.bfloat16
                           ) -> jax.Array:
  """What :func:`gemm_operand` must equal: ``dequantize(quantize_reference(x))`` in
  ``dtype`` (:func:`fp4jax.operand.gemm_operand_reference`)."""
  values, _ = operand.gemm_operand_reference(x, spec, axis, key, dtype=dtype)
  return values


def tiled_operand_reason(shape: tuple[int, ...], dtype: Any, spec: QuantSpec | None,
                         axis: int) -> str | None:
  """What every operand kernel needs (None: met): ``axis`` -1 (rows) or -2 (columns) of an
  array of rank >= 2 in bf16 / f32, and a spec that the XLA emitter takes
  (:func:`fp4jax.operand.unsupported_reason`)."""
  if len(shape) < 2:
    return f"rank {len(shape)} (2D tiles)"
  if axis not in (-1, -2, len(shape) - 1, len(shape) - 2):
    return f"axis {axis}: blocks along one of the last two axes only"
  why = operand.unsupported_reason(spec, tuple(shape), axis)
  if why is not None:
    return why
  if jnp.dtype(dtype) not in [jnp.dtype(d) for d in (jnp.bfloat16, jnp.float32)]:
    return f"input dtype {jnp.dtype(dtype).name} (bfloat16 or float32)"
  return None


def unsupported_reason(shape: tuple[int, ...], dtype: Any, spec: QuantSpec | None,
                       axis: int) -> str | None:
  """Why the kernel cannot emit this operand (None: it can): :func:`tiled_operand_reason`,
  and power-of-two scales in blocks of 16 or 32."""
  why = tiled_operand_reason(shape, dtype, spec, axis)
  if why is not None:
    return why
  if not spec.scale_format.is_pow2:
    return f"float block scales ({spec.scale_format.name}): the XLA emitter"
  if spec.granularity != "block" or spec.block_size not in BLOCK_SIZES:
    return f"{spec.granularity} of {spec.block_size} (blocks of {BLOCK_SIZES})"
  return None


def _tile_for(m: int, k: int, orient: str, bs: int, config: OperandKernelConfig | None):
  """The launch's tile: the config's (grown to one block along a blocked axis), shrunk to
  a power of two that divides the operand, else the config's with padding."""
  cfg = config or DEFAULT_CONFIG[orient]
  # Rows: no narrower than 8 (e.g. 8 x 197 tokens would otherwise give 1-row tiles).
  row_floor = bs if orient in ("cols", "both") else min(8, cfg.block_rows)
  col_floor = bs if orient in ("rows", "both") else 16
  rows_cap, cols_cap = max(cfg.block_rows, row_floor), max(cfg.block_cols, col_floor)
  bm = largest_dividing(m, rows_cap, row_floor) or rows_cap
  bk = largest_dividing(k, cols_cap, col_floor) or cols_cap
  return bm, bk, cfg


def _values(b3, rb3, spec: QuantSpec, block_axis: int, ieee: bool, dtype):
  """Values of a 3D view whose axis ``block_axis`` runs along the blocks."""
  amax = jnp.max(bits.abs_bits(b3), axis=block_axis)
  factors = operand.block_factors(amax, spec, None)
  expand = lambda v: None if v is None else jnp.expand_dims(v, block_axis)
  out = operand.element_value_bits(b3, operand.BlockFactors(*(expand(f) for f in factors)),
                                   spec, rb3, ieee)
  return operand.emit(out, dtype)


def _kernel(x_ref, seed_ref, *out_refs, rows_spec, cols_spec, bm, bk, width, ieee, dtype,
            hash_per_word):
  i, j = pl.program_id(0), pl.program_id(1)
  b = operand.input_bits(x_ref[...])
  outs = iter(out_refs)

  def random_bits(spec, word):
    if spec.rounding != "stochastic":
      return None
    return tile_random_bits(seed_ref[word], seed_ref[word + 1], i, j, bm, bk, width,
                            per_word=hash_per_word)

  if rows_spec is not None:
    bs = rows_spec.block_size
    view = lambda v: None if v is None else v.reshape(bm, bk // bs, bs)
    v = _values(view(b), view(random_bits(rows_spec, _ROWS_SEED)), rows_spec, 2, ieee, dtype)
    next(outs)[...] = v.reshape(bm, bk)
  if cols_spec is not None:
    bs = cols_spec.block_size
    view = lambda v: None if v is None else v.reshape(bm // bs, bs, bk)
    v = _values(view(b), view(random_bits(cols_spec, _COLS_SEED)), cols_spec, 1, ieee, dtype)
    next(outs)[...] = v.reshape(bm, bk)


@functools.partial(jax.jit, static_argnames=("rows_spec", "cols_spec", "bm", "bk", "ieee",
                                             "dtype", "interpret", "num_warps", "num_stages",
                                             "hash_per_word"))
def _operand_call(x, seed, *, rows_spec, cols_spec, bm, bk, ieee, dtype, interpret,
                  num_warps, num_stages, hash_per_word=True):
  m, k = x.shape
  mp, kp = round_up(m, bm), round_up(k, bk)
  xp = jnp.pad(x, ((0, mp - m), (0, kp - k))) if (mp, kp) != (m, k) else x
  n_out = (rows_spec is not None) + (cols_spec is not None)
  tile = pl.BlockSpec((bm, bk), lambda i, j: (i, j))
  extra = {}
  if not interpret:
    from jax.experimental.pallas import triton as pltriton
    extra["compiler_params"] = pltriton.CompilerParams(num_warps=num_warps,
                                                       num_stages=num_stages)
  kernel = functools.partial(_kernel, rows_spec=rows_spec, cols_spec=cols_spec, bm=bm, bk=bk,
                             width=k, ieee=ieee, dtype=dtype, hash_per_word=hash_per_word)
  outs = pl.pallas_call(
      kernel, out_shape=[jax.ShapeDtypeStruct((mp, kp), dtype)] * n_out,
      grid=(mp // bm, kp // bk), in_specs=[tile, pl.BlockSpec((SEED_WORDS,), lambda i, j: (0,))],
      out_specs=[tile] * n_out, interpret=interpret, name="fp4jax_gemm_operand",
      **extra)(xp, seed)
  return [o[:m, :k] for o in outs]


def _seed(spec: QuantSpec | None, key: jax.Array | None, name: str) -> jax.Array:
  if spec is None or spec.rounding != "stochastic":
    return jnp.zeros(2, U32)
  if key is None:
    raise ValueError(f"fp4jax.kernels.operand: stochastic rounding needs {name}="
                     "jax.random.key(...)")
  return prng.seed_from_key(key)


def _check(x, spec, axis, where):
  why = unsupported_reason(x.shape, x.dtype, spec, axis)
  if why is not None:
    raise ValueError(f"fp4jax.kernels.operand.{where}: unsupported operand ({why}); "
                     "fp4jax.operand.gemm_operand (XLA) takes more")


def _launch(x, rows_spec, cols_spec, seed, dtype, interpret, config, ieee_subnormals):
  if jnp.dtype(dtype) not in [jnp.dtype(d) for d in OUTPUT_DTYPES]:
    raise ValueError(f"fp4jax.kernels.operand: dtype must be bfloat16 or float32, got {dtype}")
  orient = ("both" if rows_spec is not None and cols_spec is not None
            else "rows" if rows_spec is not None else "cols")
  bs = max(s.block_size for s in (rows_spec, cols_spec) if s is not None)
  x2 = x.reshape(-1, x.shape[-1])
  bm, bk, cfg = _tile_for(*x2.shape, orient, bs, config)
  outs = _operand_call(x2, seed, rows_spec=rows_spec, cols_spec=cols_spec, bm=bm, bk=bk,
                       ieee=bool(ieee_subnormals), dtype=jnp.dtype(dtype), interpret=interpret,
                       num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                       hash_per_word=cfg.hash_per_word)
  return [o.reshape(x.shape) for o in outs]


def gemm_operand(x: jax.Array, spec: QuantSpec, axis: int = -1, key: jax.Array | None = None,
                 *, dtype: Any = jnp.bfloat16, interpret: bool = False,
                 config: OperandKernelConfig | None = None,
                 ieee_subnormals: bool = False) -> jax.Array:
  """The values of ``x`` quantized by ``spec`` along ``axis`` (-1 or -2), ``x.shape`` in
  ``dtype``, from one kernel launch; equal bit for bit to :func:`gemm_operand_reference`.

  Args:
    x: (..., M, K) bfloat16 / float32; the blocked axis divides into whole blocks.
    spec: a spec :func:`unsupported_reason` accepts (power-of-two block scales).
    axis: -1 (blocks along K) or -2 (blocks along M, never across leading dimensions).
    key: ``jax.random`` key for stochastic rounding (the reference's bits).
    dtype: bfloat16 (the GEMM's input) or float32.
    interpret: Pallas interpret mode (CPU).
    config: tile and warps (default :data:`DEFAULT_CONFIG`).
    ieee_subnormals: the kernel's float32 multiply keeps subnormals: one multiply per
      element instead of the exact-on-any-backend integer detour
      (:func:`fp4jax.operand.element_value_bits`).
  """
  _check(x, spec, axis, "gemm_operand")
  rows = axis in (-1, x.ndim - 1)
  seed = jnp.concatenate([_seed(spec, key, "key")] * 2)
  [out] = _launch(x, spec if rows else None, None if rows else spec, seed, dtype, interpret,
                  config, ieee_subnormals)
  return out


def gemm_operand_both(x: jax.Array, rows_spec: QuantSpec, cols_spec: QuantSpec,
                      rows_key: jax.Array | None = None, cols_key: jax.Array | None = None,
                      *, dtype: Any = jnp.bfloat16, interpret: bool = False,
                      config: OperandKernelConfig | None = None,
                      ieee_subnormals: bool = False) -> tuple[jax.Array, jax.Array]:
  """``(gemm_operand(x, rows_spec, -1, rows_key), gemm_operand(x, cols_spec, -2,
  cols_key))`` from one read of ``x`` (e.g. ``dY`` for dgrad and wgrad)."""
  _check(x, rows_spec, -1, "gemm_operand_both")
  _check(x, cols_spec, -2, "gemm_operand_both")
  seed = jnp.concatenate([_seed(rows_spec, rows_key, "rows_key"),
                          _seed(cols_spec, cols_key, "cols_key")])
  rows, cols = _launch(x, rows_spec, cols_spec, seed, dtype, interpret, config,
                       ieee_subnormals)
  return rows, cols


__all__ = ["BLOCK_SIZES", "DEFAULT_CONFIG", "ORIENTATIONS", "OUTPUT_DTYPES",
           "OperandKernelConfig", "gemm_operand", "gemm_operand_both",
           "gemm_operand_reference", "tiled_operand_reason", "unsupported_reason"]
