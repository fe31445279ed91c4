"""Random Hadamard transforms (RHT) along one axis, block-diagonal with block size b.

``R = diag(signs) @ H_b / sqrt(b)`` with ``H_b`` the Sylvester Hadamard matrix (b a power
of two) and ``signs`` a random +-1 vector drawn from a key; ``R`` is orthonormal, so
applying ``R`` to the contraction axis of one GEMM operand and ``R`` (transposed side)
to the other leaves the product unchanged, ``(A R)(R^T B) = A B``, while spreading
outliers across each block before quantization (NVIDIA's NVFP4 recipe applies a 16x16
RHT to the weight-gradient GEMM inputs; Quartet, Castro et al. 2025, to every GEMM).

``rht(x, axis, key, block)`` computes ``x R`` along ``axis`` (each length-b segment ``r``
becomes ``r @ R``); ``rht(x, ..., transpose=True)`` computes ``x R^T`` and is the exact
inverse (up to float rounding).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


@functools.lru_cache(maxsize=None)
def hadamard_matrix(n: int) -> np.ndarray:
  """The orthonormal Sylvester Hadamard matrix of size n (a power of two), float32."""
  if n < 1 or n & (n - 1):
    raise ValueError(f"Hadamard block size must be a power of two, got {n}")
  h = np.ones((1, 1))
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  return (h / np.sqrt(n)).astype(np.float32)


def random_signs(key: jax.Array, n: int) -> jax.Array:
  """n random +-1.0 (float32) from ``key``."""
  return jnp.where(jax.random.bernoulli(key, 0.5, (n,)), 1.0, -1.0).astype(jnp.float32)


def rht_matrix(key: jax.Array | None, block: int) -> jax.Array:
  """``R = diag(signs) H / sqrt(b)``; plain Hadamard when key is None."""
  h = jnp.asarray(hadamard_matrix(block))
  if key is None:
    return h
  return random_signs(key, block)[:, None] * h


HADAMARD_METHODS = ("butterfly", "dot", "dot_bf16")


def _checked_axis(x: jax.Array, axis: int, block: int) -> tuple[int, int]:
  """``(axis, its length)`` for a transform in blocks of ``block`` along ``axis`` of x;
  ValueError naming the fix for a block that is not a power of two or does not divide."""
  axis = axis % x.ndim
  n = x.shape[axis]
  if block < 1 or block & (block - 1):
    raise ValueError(f"Hadamard transform: block must be a power of two, got {block}")
  if n % block:
    raise ValueError(f"Hadamard transform: axis {axis} has length {n}, not a multiple of "
                     f"the Hadamard block size {block}; choose a block that divides it")
  return axis, n


def rht(x: jax.Array, axis: int, key: jax.Array | None, block: int = 16,
        transpose: bool = False, *, method: str = "butterfly", dtype=None) -> jax.Array:
  """Applies the block-diagonal RHT ``R`` (or ``R^T``) along ``axis`` of ``x``, in place
  (no transpose, whichever axis it runs along).

  ``x R`` per length-``block`` segment ``r`` of ``axis`` is ``((r * signs) H) / sqrt(b)``
  and ``x R^T`` is ``((r H) / sqrt(b)) * signs`` (``H`` symmetric, entries +-1). Methods:

  * ``"butterfly"``: ``r H`` as the fast Walsh-Hadamard butterfly ``(a, c) -> (a + c,
    a - c)`` at distances 1, 2, 4, ... (the order of :func:`rht_butterfly`), in float32,
    each level a view of the axis as ``(groups, 2, h)``: a fixed summation order, the same
    bits on every backend that keeps float32 IEEE (the reference's definition).
  * ``"dot"``: ``r (diag(signs) H)`` (``x R^T``: ``r (H diag(signs))``), entries exactly
    +-1, as one float32 GEMM (HIGHEST precision), the axis
    viewed as ``(segments, block)`` (a batched ``block x block`` product when the axis is
    not the minor one), then ``/ sqrt(b)``. The same transform up to float32 summation
    order, which the backend's GEMM decides: deterministic on one device, not bit-equal
    across backends. A butterfly along a non-minor axis makes XLA materialise each level
    (``kernels/NOTES.md``); the GEMM reads the operand once.
  * ``"dot_bf16"``: the same product on BF16 tensor cores: a bfloat16 ``x`` in one GEMM,
    any other ``x`` (as float32) split exactly into three bfloat16 pieces ``x = hi + mid +
    lo`` (:func:`bf16_pieces`) and ``((hi H + mid H) + lo H)``, each GEMM accumulating in
    float32. Every product is exact (the entries are +-1), so this is the float32
    transform again up to rounding: for a bfloat16 input the GEMM's float32 summation, for
    a float32 one three such sums and two additions (3 x block terms, three roundings) -
    at a third (or less) of the float32 GEMM's tensor-core work. A bfloat16 tensor and its float32 copy give the same bits: the
    copy's ``mid`` and ``lo`` are zero and add exact zeros (zero results are +0 in both).

  The axis length must be a multiple of ``block`` (a power of two). Returns ``dtype``
  (default: x's).
  """
  if method not in HADAMARD_METHODS:
    raise ValueError(f"Hadamard transform: method must be one of {HADAMARD_METHODS}, "
                     f"got {method!r}")
  axis, n = _checked_axis(x, axis, block)
  out_dtype = x.dtype if dtype is None else dtype
  signs = None if key is None else random_signs(key, block)
  if method in ("dot", "dot_bf16"):
    return _rht_dot(x, axis, signs, block, transpose, method == "dot_bf16").astype(out_dtype)
  lead, trail = x.shape[:axis], x.shape[axis + 1:]
  # (..., n // block, block, ...): the segment index, then the position in the segment.
  v = x.astype(jnp.float32).reshape(*lead, n // block, block, *trail)
  pos = axis + 1
  sign_shape = (block,) + (1,) * len(trail)
  if signs is not None and not transpose:
    v = v * signs.reshape(sign_shape)
  h = 1
  while h < block:
    w = v.reshape(*lead, n // block, block // (2 * h), 2, h, *trail)
    a = lax.index_in_dim(w, 0, pos + 1, keepdims=False)
    c = lax.index_in_dim(w, 1, pos + 1, keepdims=False)
    v = jnp.stack([a + c, a - c], axis=pos + 1).reshape(v.shape)
    h *= 2
  v = v * jnp.float32(1.0 / math.sqrt(block))
  if signs is not None and transpose:
    v = v * signs.reshape(sign_shape)
  return v.reshape(x.shape).astype(out_dtype)


def _truncate_bf16(x: jax.Array) -> jax.Array:
  """float32 ``x`` with its low 16 bits cleared, as bfloat16 (exact: the top half)."""
  b = lax.bitcast_convert_type(x, jnp.uint32) >> 16
  return lax.bitcast_convert_type(b.astype(jnp.uint16), jnp.bfloat16)


def bf16_pieces(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Three bfloat16 arrays whose float32 sum ``(hi + mid) + lo`` is float32 ``x``.

  ``hi`` is ``x`` truncated to bfloat16 (8 significant bits), so ``x - hi`` is exact in
  float32 and has at most 16 significant bits; ``mid`` truncates that and ``lo`` is the
  rest (at most 8 bits: exact in bfloat16). Exact for finite ``|x| >= 2^-102``; below, a
  subnormal remainder can lose bits under 2^-133 in ``lo`` (and a backend that flushes
  subnormals, XLA:CPU, drops a subnormal remainder altogether). An infinite or NaN ``x``
  is all in ``hi`` (``mid = lo = 0``; a NaN stays NaN whatever its payload bits)."""
  x = x.astype(jnp.float32)
  # A NaN whose payload is in the low 16 bits alone would truncate to +-Inf.
  hi = jnp.where(jnp.isnan(x), jnp.bfloat16(jnp.nan), _truncate_bf16(x))
  rest = jnp.where(jnp.isfinite(x), x - hi.astype(jnp.float32), jnp.float32(0.0))
  mid = _truncate_bf16(rest)
  lo = (rest - mid.astype(jnp.float32)).astype(jnp.bfloat16)
  return hi, mid, lo


def _rht_dot(x, axis, signs, block, transpose, bf16_gemms=False):
  """The ``"dot"`` (float32 GEMM) and ``"dot_bf16"`` (BF16 GEMMs) methods of :func:`rht`
  (float32 result)."""
  # Exactly +-1 (hadamard_matrix's entries 1/sqrt(b), rounded to float32, times sqrt(b)
  # are 0.99999994 for odd powers of two), so every product with x is exact.
  h = jnp.asarray(np.where(hadamard_matrix(block) > 0, 1.0, -1.0).astype(np.float32))
  if signs is not None:
    # x R = (x diag(s)) H: the signs scale H's rows; x R^T = x H diag(s): its columns.
    h = h * (signs[None, :] if transpose else signs[:, None])
  n = x.shape[axis]
  lead = math.prod(x.shape[:axis])
  trail = math.prod(x.shape[axis + 1:])

  def product(v, hm, precision):
    if trail == 1:
      return jnp.dot(v.reshape(-1, block), hm, precision=precision,
                     preferred_element_type=jnp.float32)
    # y[q, i, t] = sum_j H[j, i] x[q, j, t], q the segments: a batched product whose
    # operands are already in the GEMM's layout (H broadcast over q is block^2 per segment).
    q = lead * (n // block)
    hb = jnp.broadcast_to(hm.T, (q, block, block))
    return jnp.einsum("qij,qjt->qit", hb, v.reshape(q, block, trail), precision=precision,
                      preferred_element_type=jnp.float32)

  if not bf16_gemms:
    # float32 at HIGHEST precision whatever x's dtype, so a bfloat16 tensor and its
    # float32 copy (the reference's residuals) give the same bits.
    y = product(x.astype(jnp.float32), h, lax.Precision.HIGHEST)
  else:
    hm = h.astype(jnp.bfloat16)  # +-1: exact
    if x.dtype == jnp.bfloat16:
      y = product(x, hm, None)
    else:
      hi, mid, lo = bf16_pieces(x)
      y = (product(hi, hm, None) + product(mid, hm, None)) + product(lo, hm, None)
    # A float32 copy of bfloat16 data adds +0 twice, turning a -0 sum into +0: zeros are
    # +0 on both sides.
    y = jnp.where(y == 0, jnp.float32(0.0), y)
  return (y * jnp.float32(1.0 / math.sqrt(block))).reshape(x.shape)


def rht_reference(x: jax.Array, axis: int, key: jax.Array | None, block: int = 16,
                  transpose: bool = False) -> jax.Array:
  """:func:`rht` as a float32 matrix product with ``R`` (HIGHEST precision): the same
  transform up to float32 summation order (tests compare the two within that bound)."""
  axis, n = _checked_axis(x, axis, block)
  r = rht_matrix(key, block)
  if transpose:
    r = r.T
  xm = jnp.moveaxis(x, axis, -1).astype(jnp.float32)
  xb = xm.reshape(*xm.shape[:-1], n // block, block)
  yb = jnp.einsum("...i,ij->...j", xb, r, precision=jax.lax.Precision.HIGHEST)
  return jnp.moveaxis(yb.reshape(xm.shape), -1, axis).astype(x.dtype)


def sign_seed_words(key: jax.Array) -> jax.Array:
  """Two uint32 words that seed :func:`rht_butterfly`'s random signs (from a key)."""
  from fp4jax import prng
  return prng.seed_from_key(key)


def butterfly_signs(block: int, seed0: jax.Array, seed1: jax.Array) -> list[jax.Array]:
  """``block`` float32 scalars +-1: bit 0 of the counter hash of each position."""
  from fp4jax import prng
  out = []
  for i in range(block):
    h = prng.counter_hash_words(seed0, seed1, jnp.uint32(i))
    out.append(jnp.where((h & jnp.uint32(1)) == 1, jnp.float32(-1.0), jnp.float32(1.0)))
  return out


def _columns(y: jax.Array, n: int) -> list[jax.Array]:
  """The ``n`` trailing-axis entries of ``y`` as separate arrays, in index order, by
  repeated splits of a trailing axis of 2 (what Triton lowers: tt.split)."""
  if n == 1:
    return [y.reshape(y.shape[:-1])]
  even, odd = jnp.unstack(y.reshape(*y.shape[:-1], n // 2, 2), axis=-1)
  out = [None] * n
  out[0::2], out[1::2] = _columns(even, n // 2), _columns(odd, n // 2)
  return out


def _stack_columns(cols: list[jax.Array]) -> jax.Array:
  """Inverse of :func:`_columns` (tt.join of trailing pairs)."""
  n = len(cols)
  if n == 1:
    return cols[0].reshape(*cols[0].shape, 1)
  even, odd = _stack_columns(cols[0::2]), _stack_columns(cols[1::2])
  return jnp.stack([even, odd], axis=-1).reshape(*even.shape[:-1], n)


def rht_butterfly(x: jax.Array, block: int, seed0: jax.Array, seed1: jax.Array) -> jax.Array:
  """Block-diagonal random Hadamard transform along the last axis, as butterflies.

  ``y = (x * signs) H / sqrt(block)`` per block of ``block`` consecutive elements (H in
  Sylvester order, the matrix of :func:`hadamard_matrix` times sqrt(block)): an
  in-place fast Walsh-Hadamard transform, ``(a, b) -> (a + b, a - b)`` at distances 1,
  2, 4, ..., on the block's entries held as separate arrays. The float32 additions run
  in the same order wherever this traces (XLA or a Pallas kernel), and the sign and
  ``1/sqrt(block)`` products are exact for block 16 (0.25), so the kernel and the
  reference agree bit for bit (up to subnormal flushing of the platform).
  """
  if block < 2 or block & (block - 1):
    raise ValueError(f"Hadamard block must be a power of two >= 2, got {block}")
  n = x.shape[-1]
  if n % block:
    raise ValueError(f"Hadamard transform: last axis has length {n}, not a multiple of "
                     f"the block size {block}")
  lead = x.shape[:-1]
  v = _columns(x.astype(jnp.float32).reshape(*lead, n // block, block), block)
  return _stack_columns(rht_butterfly_entries(v, seed0, seed1)).reshape(*lead, n)


def butterfly_entries(entries: list) -> list:
  """``r H`` (``H`` the unnormalised Sylvester Hadamard matrix) of one block held as
  ``len(entries)`` arrays (entry i: position i): ``(a, c) -> (a + c, a - c)`` at distances
  1, 2, 4, ..., in that order (the order :func:`rht` computes in place). Any arrays with
  ``+`` and ``-`` (jax, numpy)."""
  v = list(entries)
  block = len(v)
  if block < 1 or block & (block - 1):
    raise ValueError(f"Hadamard butterfly: the block holds {block} entries, not a power "
                     "of two; pass one array per position of a power-of-two block")
  h = 1
  while h < block:
    for start in range(0, block, 2 * h):
      for i in range(start, start + h):
        v[i], v[i + h] = v[i] + v[i + h], v[i] - v[i + h]
    h *= 2
  return v


def rht_butterfly_entries(entries: list[jax.Array], seed0: jax.Array,
                          seed1: jax.Array) -> list[jax.Array]:
  """The butterfly of :func:`rht_butterfly` on one Hadamard block held as ``block =
  len(entries)`` float32 arrays of one shape (entry i: position i of every block).

  Elementwise only, so a kernel can hold a block along any axis (e.g. strided row
  loads of a tile for a transform along columns) and get the reference's bits.
  """
  block = len(entries)
  v = butterfly_entries([c * s for c, s in zip(entries, butterfly_signs(block, seed0, seed1))])
  scale = jnp.float32(1.0 / math.sqrt(block))
  return [c * scale for c in v]
