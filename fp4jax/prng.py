"""Counter-based random bits for stochastic rounding.

Stochastic rounding needs one uniform 32-bit word per element. fp4jax derives it from
a hash of ``(seed, element index)`` rather than from ``jax.random.bits`` directly, so
that a Pallas kernel (which has no PRNG on the Triton path) can compute exactly the
same bits in-kernel from the same two seed words and its element indices: the
reference and the kernel then agree bit for bit.

The hash is two rounds of the ``lowbias32`` integer finalizer (C. Wellons, "Hash
function prospector", 2018; shifts 16/15/15, multipliers 0x21f0aaad / 0x735a2d97),
each a bijection of uint32::

    bits[i] = mix(mix(i ^ seed0) + seed1)

The seed words come from a ``jax.random`` key, so a run is reproducible from its keys.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

U32 = jnp.uint32


def mix32(h: jax.Array) -> jax.Array:
  """The lowbias32 finalizer: a bijection of uint32 with good avalanche."""
  h = h.astype(U32)
  h = h ^ (h >> 16)
  h = h * U32(0x21F0AAAD)
  h = h ^ (h >> 15)
  h = h * U32(0x735A2D97)
  return h ^ (h >> 15)


def counter_hash(seed: jax.Array, counter: jax.Array) -> jax.Array:
  """Uniform uint32 bits for element indices ``counter`` under ``seed`` (2 uint32 words)."""
  seed = jnp.asarray(seed, U32)
  return counter_hash_words(seed[0], seed[1], counter)


def counter_hash_words(seed0: jax.Array, seed1: jax.Array, counter: jax.Array) -> jax.Array:
  """:func:`counter_hash` with the seed as two scalars (the form kernels load)."""
  return mix32(mix32(counter.astype(U32) ^ seed0.astype(U32)) + seed1.astype(U32))


def seed_from_key(key: jax.Array) -> jax.Array:
  """Two uint32 seed words from a ``jax.random`` key (typed or raw uint32[2])."""
  return jax.random.bits(key, (2,), U32)


def element_counter(shape: tuple[int, ...]) -> jax.Array:
  """Row-major flat index of every element (uint32; wraps above 2^32 elements)."""
  n = 1
  for d in shape:
    n *= d
  return jnp.arange(n, dtype=U32).reshape(shape)


def random_bits_for(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """The stochastic-rounding bits fp4jax uses for a tensor of ``shape`` under ``key``."""
  return counter_hash(seed_from_key(key), element_counter(shape))
