"""fp4jax.prng: the counter hash behind stochastic rounding, one word per four elements."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fp4jax import bits, prng, rounding
from fp4jax import formats as F


def test_reproducible_and_key_dependent():
  a = prng.random_bits_for(jax.random.key(0), (64, 64))
  b = prng.random_bits_for(jax.random.key(0), (64, 64))
  c = prng.random_bits_for(jax.random.key(1), (64, 64))
  np.testing.assert_array_equal(a, b)
  assert (np.asarray(a) != np.asarray(c)).mean() > 0.99


@pytest.mark.parametrize("shape", [(8, 64), (3, 5, 12), (7, 9), (13,)])
def test_layout_is_a_byte_of_the_word_for_index_over_4(shape):
  """Element i: byte i mod 4 (most significant first) of hash(i // 4), as the top byte,
  plus the centring bit; the same whether the last axis divides by 4 (words made once
  per four elements and expanded) or not (per element), and equal to the kernels' form."""
  key = jax.random.key(11)
  seed = np.asarray(prng.seed_from_key(key))
  got = np.asarray(prng.random_bits_for(key, shape)).reshape(-1).astype(np.uint64)
  i = np.arange(got.size, dtype=np.uint32)
  words = np.asarray(prng.counter_hash(seed, jnp.asarray(i // 4))).astype(np.uint64)
  want = ((words >> (24 - 8 * (i % 4)).astype(np.uint64)) & 0xFF) << 24 | 0x800000
  np.testing.assert_array_equal(got, want)
  kern = prng.element_bits_words(jnp.uint32(seed[0]), jnp.uint32(seed[1]),
                                 prng.element_counter(shape))
  np.testing.assert_array_equal(np.asarray(kern).reshape(-1), got)


def test_bytes_look_uniform_and_independent():
  r = np.asarray(prng.random_bits_for(jax.random.key(3), (1 << 16,)), np.uint64)
  assert ((r & 0xFFFFFF) == 0x800000).all()  # only the top byte is random
  top = (r >> 24).astype(np.int64)
  # Each of the 8 random bits is 1 half of the time (4 sigma over 65536 draws: 0.0078).
  frac = np.array([((top >> i) & 1).mean() for i in range(8)])
  assert np.abs(frac - 0.5).max() < 0.0078, frac
  # The byte histogram is flat (chi-square, 255 dof: mean 255, sd 22.6; bound at 5 sd).
  hist = np.bincount(top, minlength=256)
  chi2 = ((hist - hist.mean()) ** 2 / hist.mean()).sum()
  assert chi2 < 255 + 5 * 22.6, chi2
  # Neighbours are uncorrelated: the lanes of one word, and across words.
  u = top.astype(np.float64) / 256
  for lag in (1, 2, 3, 4):
    assert abs(np.corrcoef(u[:-lag], u[lag:])[0, 1]) < 4 / np.sqrt(len(u)), lag
  # The four lanes of a word are jointly uniform in their top bits (16 cells).
  cells = (top.reshape(-1, 4) >> 7) @ np.array([1, 2, 4, 8])
  hist = np.bincount(cells, minlength=16)
  chi2 = ((hist - hist.mean()) ** 2 / hist.mean()).sum()
  assert chi2 < 15 + 5 * np.sqrt(30), chi2


@pytest.mark.parametrize("shape", [(4,), (3, 32), (2, 5, 64)])
def test_interleave_lanes_equals_expand_words(shape):
  """The kernels' two-way-stack interleave is the reference's expansion."""
  w = prng.counter_hash(jnp.array([5, 9], jnp.uint32), prng.element_counter(shape))
  np.testing.assert_array_equal(prng.interleave_lanes(w), prng.expand_words(w))


def test_mix32_is_a_bijection_on_a_sample():
  x = np.arange(1 << 20, dtype=np.uint32)
  y = np.asarray(prng.mix32(x))
  assert len(np.unique(y)) == len(x)


def _every_byte():
  """The rounding word of each of the 256 byte values (the whole sample space)."""
  return prng.lane_bits(jnp.arange(256, dtype=jnp.uint32) << 24, jnp.uint32(0))


@pytest.mark.parametrize("name", ["e2m1", "e4m3"])
def test_expectation_over_every_byte_is_within_half_a_256th_of_a_step(name, rng):
  """Exhaustive, not statistical: for each x the mean over all 256 bytes is x within
  2^-9 of its grid step (eight random bits; the centring bit halves the 2^-8 of a plain
  truncated comparison), and within float rounding where x has at most 8 dropped bits."""
  fmt = F.get_element_format(name)
  grid = np.array(fmt.grid(), np.float64)
  # Random values, and in every grid interval the worst cases: half-way between two
  # multiples of 1/256 of the step (where the quantized probability is off by 2^-9).
  lo_pts, hi_pts = grid[:-1, None], grid[1:, None]
  worst = lo_pts + (hi_pts - lo_pts) * ((np.arange(256) + 0.5) / 256)
  x = np.concatenate([rng.uniform(0, 1, 4000) * fmt.max_value,
                      worst.reshape(-1)]).astype(np.float32)
  rb = _every_byte()
  out = jax.jit(jax.vmap(lambda r: rounding.round_to_format(x, fmt, "stochastic",
                                                             jnp.full(x.shape, r))))(rb)
  mean = np.asarray(out, np.float64).mean(0)
  ax = x.astype(np.float64)
  lo = grid[np.searchsorted(grid, ax, side="right") - 1]
  hi = grid[np.minimum(np.searchsorted(grid, ax, side="left"), len(grid) - 1)]
  step = np.where(hi > lo, hi - lo, 1.0)
  err = np.abs(mean - ax) / step
  assert err.max() <= 2.0 ** -9 + 1e-9, err.max()
  # Centred: the signed errors of the random values have no systematic direction.
  signed = ((mean - ax) / step)[:4000]
  assert abs(signed.mean()) < 2.0 ** -12, signed.mean()


def test_few_dropped_bits_round_exactly_unbiased():
  """A value whose dropped part has at most 8 significant bits is rounded up with exactly
  its probability: 2 + k/256, between E2M1's 2 and 3, over all 256 bytes."""
  fracs = np.arange(256) / 256.0
  x = jnp.asarray(2.0 + fracs * 1.0, jnp.float32)  # between 2 and 3: step 1
  out = jax.vmap(lambda r: rounding.round_to_format(x, F.E2M1, "stochastic",
                                                     jnp.full(x.shape, r)))(_every_byte())
  mean = np.asarray(out, np.float64).mean(0)
  np.testing.assert_array_equal(mean, 2.0 + fracs)
