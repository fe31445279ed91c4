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


def rht(x: jax.Array, axis: int, key: jax.Array | None, block: int = 16,
        transpose: bool = False) -> jax.Array:
  """Applies the block-diagonal RHT ``R`` (or ``R^T``) along ``axis`` of ``x``.

  The axis length must be a multiple of ``block``. Computed in float32 (HIGHEST
  precision), returned in x's dtype.
  """
  axis = axis % x.ndim
  n = x.shape[axis]
  if n % block:
    raise ValueError(f"Hadamard transform: axis {axis} has length {n}, not a multiple of "
                     f"the Hadamard block size {block}; choose a block that divides it")
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


def butterfly_signs(block: int, seed0: jax.Array, seed1: jax.Array) -> jax.Array:
  """float32 +-1 of length ``block``: bit 0 of the counter hash of each position."""
  from fp4jax import prng
  h = prng.counter_hash_words(seed0, seed1, lax.broadcasted_iota(jnp.int32, (block,), 0))
  return jnp.where((h & jnp.uint32(1)) == 1, jnp.float32(-1.0), jnp.float32(1.0))


def rht_butterfly(x: jax.Array, block: int, seed0: jax.Array, seed1: jax.Array) -> jax.Array:
  """Block-diagonal random Hadamard transform along the last axis, as butterflies.

  ``y = (x * signs) H / sqrt(block)`` per block of ``block`` consecutive elements,
  computed with ``log2(block)`` constant-geometry stages ``(a, b) -> (a + b, a - b)``
  on adjacent pairs, whose outputs go to the first and second half. Every stage is the
  same sequence of float32 additions wherever it runs (XLA or a Pallas kernel), and the
  sign and ``1/sqrt(block)`` products are exact for block 16 (0.25), so kernel and
  reference agree bit for bit (up to subnormal flushing of the platform).
  """
  if block < 2 or block & (block - 1):
    raise ValueError(f"Hadamard block must be a power of two >= 2, got {block}")
  n = x.shape[-1]
  if n % block:
    raise ValueError(f"Hadamard transform: last axis has length {n}, not a multiple of "
                     f"the block size {block}")
  lead = x.shape[:-1]
  y = x.astype(jnp.float32).reshape(*lead, n // block, block)
  y = y * butterfly_signs(block, seed0, seed1)
  for _ in range(int(math.log2(block))):
    a, b = jnp.unstack(y.reshape(*lead, n // block, block // 2, 2), axis=-1)
    y = jnp.concatenate([a + b, a - b], axis=-1)
  y = y * jnp.float32(1.0 / math.sqrt(block))
  return y.reshape(*lead, n)
