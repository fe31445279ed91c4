"""fp4jax.hadamard: orthonormal random Hadamard transforms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fp4jax import hadamard


@pytest.mark.parametrize("n", [1, 2, 16, 32, 128])
def test_orthonormal(n):
  h = hadamard.hadamard_matrix(n)
  np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-6)
  r = np.asarray(hadamard.rht_matrix(jax.random.key(n), n))
  np.testing.assert_allclose(r @ r.T, np.eye(n), atol=1e-6)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_exact_inverse(axis, rng):
  x = jnp.asarray(rng.standard_normal((32, 64)), jnp.float32)
  k = jax.random.key(0)
  y = hadamard.rht(x, axis, k, 16)
  np.testing.assert_allclose(hadamard.rht(y, axis, k, 16, transpose=True), x, atol=2e-6)
  assert float(jnp.abs(y - x).max()) > 0.1  # it did something


@pytest.mark.parametrize("block", [16, 32])
def test_product_preserved(block, rng):
  a = jnp.asarray(rng.standard_normal((48, 128)), jnp.float32)
  b = jnp.asarray(rng.standard_normal((128, 40)), jnp.float32)
  k = jax.random.key(1)
  at, bt = hadamard.rht(a, 1, k, block), hadamard.rht(b, 0, k, block)
  hi = jax.lax.Precision.HIGHEST
  np.testing.assert_allclose(jnp.dot(at, bt, precision=hi), jnp.dot(a, b, precision=hi),
                             rtol=1e-5, atol=5e-5)


def test_spreads_outliers(rng):
  x = np.zeros((1, 16), np.float32)
  x[0, 3] = 16.0
  y = np.asarray(hadamard.rht(jnp.asarray(x), 1, jax.random.key(0), 16))
  np.testing.assert_allclose(np.abs(y), 4.0, rtol=1e-6)


def test_bad_sizes():
  with pytest.raises(ValueError, match="power of two"):
    hadamard.hadamard_matrix(12)
  with pytest.raises(ValueError, match="multiple of the Hadamard block"):
    hadamard.rht(jnp.ones((4, 24)), 1, None, 16)


def test_butterfly_bad_block_and_length():
  w = jnp.zeros(2, jnp.uint32)
  with pytest.raises(ValueError, match="power of two"):
    hadamard.rht_butterfly(jnp.ones((2, 24)), 12, w[0], w[1])
  with pytest.raises(ValueError, match="not a multiple of the block size 16"):
    hadamard.rht_butterfly(jnp.ones((2, 24)), 16, w[0], w[1])
