"""fp4jax.prng: the counter hash behind stochastic rounding."""

import jax
import numpy as np

from fp4jax import prng


def test_reproducible_and_key_dependent():
  a = prng.random_bits_for(jax.random.key(0), (64, 64))
  b = prng.random_bits_for(jax.random.key(0), (64, 64))
  c = prng.random_bits_for(jax.random.key(1), (64, 64))
  np.testing.assert_array_equal(a, b)
  assert (np.asarray(a) != np.asarray(c)).mean() > 0.99


def test_bits_look_uniform_and_independent():
  r = np.asarray(prng.random_bits_for(jax.random.key(3), (1 << 16,)), np.uint64)
  # Each bit is 1 half of the time (4 sigma over 65536 draws: 0.0078).
  frac = np.array([((r >> i) & 1).mean() for i in range(32)])
  assert np.abs(frac - 0.5).max() < 0.0078, frac
  # Top-byte histogram is flat (chi-square, 255 dof: mean 255, sd 22.6; bound at 5 sd).
  hist = np.bincount((r >> 24).astype(int), minlength=256)
  chi2 = ((hist - hist.mean()) ** 2 / hist.mean()).sum()
  assert chi2 < 255 + 5 * 22.6, chi2
  # Neighbouring counters are uncorrelated.
  u = r.astype(np.float64) / 2**32
  assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 4 / np.sqrt(len(u))


def test_mix32_is_a_bijection_on_a_sample():
  x = np.arange(1 << 20, dtype=np.uint32)
  y = np.asarray(prng.mix32(x))
  assert len(np.unique(y)) == len(x)
