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


def _numpy_butterfly(x, axis, signs, block, transpose):
  """rht's documented order on numpy float32 entries: the list butterfly the kernels run
  (hadamard.butterfly_entries), against rht's in-place reshapes."""
  xm = np.moveaxis(np.asarray(x, np.float32), axis, -1).copy()
  seg = xm.reshape(*xm.shape[:-1], -1, block)
  v = [seg[..., i] for i in range(block)]
  if not transpose:
    v = [c * np.float32(s) for c, s in zip(v, signs)]
  v = hadamard.butterfly_entries(v)
  v = [c * np.float32(1.0 / np.sqrt(block)) for c in v]
  if transpose:
    v = [c * np.float32(s) for c, s in zip(v, signs)]
  return np.moveaxis(np.stack(v, -1).reshape(xm.shape), -1, axis)


@pytest.mark.parametrize("axis,block,transpose", [(0, 16, False), (1, 16, True),
                                                  (1, 32, False), (0, 4, True)])
def test_butterfly_order_bit_exact(axis, block, transpose, rng):
  # Values over many binades, so float32 summation order shows in the bits.
  x = (rng.standard_normal((64, 96)) * np.exp2(rng.integers(-20, 20, (64, 96)))).astype(
      np.float32)
  k = jax.random.key(3)
  got = np.asarray(jax.jit(hadamard.rht, static_argnums=(1, 3, 4))(
      jnp.asarray(x), axis, k, block, transpose))
  signs = np.asarray(hadamard.random_signs(k, block))
  want = _numpy_butterfly(x, axis, signs, block, transpose)
  np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("block", [2, 16, 32])
def test_matches_matrix_product(axis, block, rng):
  x = jnp.asarray(rng.standard_normal((32, 64, 32)), jnp.float32)
  for key in (None, jax.random.key(5)):
    for transpose in (False, True):
      np.testing.assert_allclose(hadamard.rht(x, axis, key, block, transpose),
                                 hadamard.rht_reference(x, axis, key, block, transpose),
                                 rtol=1e-5, atol=1e-5)


def test_in_place_no_transpose():
  # Along a non-minor axis (wgrad's tokens) the transform is slices, adds and stacks:
  # nothing XLA lowers as a transpose copy.
  jaxpr = jax.make_jaxpr(lambda x: hadamard.rht(x, 0, jax.random.key(0), 16))(
      jnp.ones((64, 48), jnp.bfloat16))
  prims = {e.primitive.name for e in jaxpr.jaxpr.eqns}
  assert "transpose" not in prims and "dot_general" not in prims, prims


def test_bf16_in_bf16_out():
  y = hadamard.rht(jnp.ones((16, 8), jnp.bfloat16), 0, None, 16)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(y[0], np.float32), 4.0)
  np.testing.assert_array_equal(np.asarray(y[1:], np.float32), 0.0)


@pytest.mark.parametrize("method", ["dot", "dot_bf16"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_dot_method_matches_matrix_product(axis, dtype, method, rng):
  x = jnp.asarray(rng.standard_normal((32, 64, 32)), dtype)
  for key in (None, jax.random.key(6)):
    for transpose in (False, True):
      for block in (16, 32):
        got = hadamard.rht(x, axis, key, block, transpose, method=method, dtype=jnp.float32)
        assert got.dtype == jnp.float32
        want = hadamard.rht_reference(x.astype(jnp.float32), axis, key, block, transpose)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["dot", "dot_bf16"])
@pytest.mark.parametrize("axis", [0, 1])
def test_dot_method_same_bits_for_bf16_and_its_f32_copy(method, axis, rng):
  # The reference quantizes float32 copies of tensors the fused path keeps in bfloat16;
  # zero segments (sums of signed zeros) included.
  v = rng.standard_normal((64, 48)) * np.exp2(rng.integers(-30, 30, (64, 48)))
  v[:16, :4] = 0.0
  v[16:32, 4] = -0.0
  x = jnp.asarray(v, jnp.bfloat16)
  k = jax.random.key(7)
  fn = jax.jit(lambda x: hadamard.rht(x, axis, k, 16, method=method, dtype=jnp.float32))
  a, b = fn(x), fn(x.astype(jnp.float32))
  np.testing.assert_array_equal(np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32))


def test_bf16_pieces_sum_to_x_exactly(rng):
  # |x| in [2^-102, 2^128): every bit of x at least 2^-125, where the pieces are exact.
  x = (rng.choice([-1.0, 1.0], 20_000) * rng.uniform(1.0, 2.0, 20_000)
       * np.exp2(rng.integers(-102, 128, 20_000))).astype(np.float32)
  x[:6] = [0.0, -0.0, np.inf, -np.inf, np.finfo(np.float32).max, -np.finfo(np.float32).tiny]
  hi, mid, lo = (np.asarray(p.astype(jnp.float32)) for p in hadamard.bf16_pieces(jnp.asarray(x)))
  total = (hi + mid) + lo
  np.testing.assert_array_equal(total.view(np.uint32)[2:], x.view(np.uint32)[2:])
  assert (total[:2] == 0).all()
  nan = hadamard.bf16_pieces(jnp.asarray([np.nan], np.float32))
  assert np.isnan(float(nan[0][0])) and float(nan[1][0]) == float(nan[2][0]) == 0.0


def test_reference_and_entries_refuse_bad_blocks():
  with pytest.raises(ValueError, match="multiple of the Hadamard block size 16"):
    hadamard.rht_reference(jnp.ones((24, 4)), 0, None, 16)
  with pytest.raises(ValueError, match="block must be a power of two"):
    hadamard.rht_reference(jnp.ones((12, 4)), 0, None, 12)
  with pytest.raises(ValueError, match="not a power of two"):
    hadamard.butterfly_entries([jnp.ones(3)] * 12)


def test_bad_method_and_block():
  with pytest.raises(ValueError, match="method must be one of"):
    hadamard.rht(jnp.ones((16, 4)), 0, None, 16, method="fft")
  with pytest.raises(ValueError, match="block must be a power of two"):
    hadamard.rht(jnp.ones((12, 4)), 0, None, 12)


@pytest.mark.parametrize("method", ["dot", "dot_bf16"])
@pytest.mark.parametrize("block", [2, 4, 8, 16, 32, 64, 128, 256])
@pytest.mark.parametrize("transpose", [False, True])
def test_dot_method_exact_on_one_nonzero_per_segment(block, transpose, method, rng):
  # One nonzero per segment: no summation rounding, so dot and butterfly must agree bit
  # for bit (an inexact +-1 in the dot's matrix would show here).
  n = 4 * block
  x = np.zeros((n, 8), np.float32)
  for seg in range(4):
    x[seg * block + rng.integers(block), :] = rng.standard_normal(8).astype(np.float32)
  k = jax.random.key(8)
  for axis in (0, 1):
    xa = jnp.asarray(x if axis == 0 else np.ascontiguousarray(x.T))
    a = hadamard.rht(xa, axis, k, block, transpose, method=method)
    b = hadamard.rht(xa, axis, k, block, transpose)
    np.testing.assert_array_equal(np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32))


def test_dot_bf16_keeps_a_nan_with_a_low_payload():
  # A NaN whose payload is only in the low 16 bits must not truncate to Inf in the pieces.
  x = np.zeros((16, 2), np.uint32)
  x[0, 0] = 0x7F800001
  x[3, 1] = 0xFF80FFFF
  y = hadamard.rht(jnp.asarray(x.view(np.float32)), 0, None, 16, method="dot_bf16")
  assert np.isnan(np.asarray(y)).all()
