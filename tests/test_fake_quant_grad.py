"""fake_quant is differentiable: a surrogate derivative from the estimator registry
(straight-through by default), the exact quantized values forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fp4jax
from conftest import bits_equal_or_both_nan

E2M1_GRID = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def _grad(fn, x):
  return np.asarray(jax.grad(lambda v: jnp.sum(fn(v)))(x))


def _wide(rng, shape):
  return jnp.asarray((rng.standard_normal(shape) * np.exp2(rng.integers(-4, 4, shape)))
                     .astype(np.float32))


@pytest.mark.parametrize("spec", ["mxfp4", "nvfp4", "mxfp8_e4m3", "int4_g32"])
def test_forward_is_the_quantized_value_bit_for_bit(spec, rng):
  x = _wide(rng, (8, 64))
  key = jax.random.key(0)
  got = fp4jax.fake_quant(x, spec)
  want = fp4jax.dequantize(fp4jax.quantize(x, spec), x.dtype)
  assert bits_equal_or_both_nan(got, want).all()
  sr = fp4jax.fake_quant(x, spec, rounding="stochastic", key=key)
  want_sr = fp4jax.dequantize(fp4jax.quantize(x, spec, rounding="stochastic", key=key), x.dtype)
  assert bits_equal_or_both_nan(sr, want_sr).all()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_default_is_straight_through(dtype, rng):
  x = _wide(rng, (4, 64)).astype(dtype)
  g = jax.grad(lambda v: jnp.sum(fp4jax.fake_quant(v, "mxfp4") * 3.0))(x)
  assert g.dtype == dtype
  np.testing.assert_array_equal(np.asarray(g, np.float32), 3.0)


def test_estimator_none_is_the_true_derivative_zero_almost_everywhere(rng):
  # The hard quantizer is a step function: finite differences inside an interval are 0,
  # and so is the derivative JAX computes through it.
  x = _wide(rng, (2, 32))
  g = _grad(lambda v: fp4jax.fake_quant(v, "mxfp4", estimator=None), x)
  np.testing.assert_array_equal(g, 0.0)
  h = 1e-4
  fq = lambda v: np.asarray(fp4jax.fake_quant(v, "mxfp4", estimator=None))
  fd = (fq(x + h) - fq(x - h)) / (2 * h)
  # Away from the grid's rounding midpoints (where the step jumps) the difference is 0.
  scaled = np.asarray(x) / np.asarray(fp4jax.element_scales(fp4jax.quantize(x, "mxfp4")))
  mids = (E2M1_GRID[1:] + E2M1_GRID[:-1]) / 2
  far = np.min(np.abs(np.abs(scaled)[..., None] - mids), axis=-1) > 1e-2
  assert far.mean() > 0.9
  np.testing.assert_array_equal(fd[far], 0.0)


def test_clipped_ste_is_zero_where_the_block_value_was_clipped():
  # floor E8M0 scales: a block amax of 7 gets scale 2^(2 - 2) = 1, so 7 is clipped to 6.
  x = jnp.full((1, 32), 1.0, jnp.float32).at[0, 0].set(7.0).at[0, 1].set(-7.0)
  g = _grad(lambda v: fp4jax.fake_quant(v, "mxfp4", estimator="clipped_ste"), x)
  assert g[0, 0] == 0.0 and g[0, 1] == 0.0
  np.testing.assert_array_equal(g[0, 2:], 1.0)
  np.testing.assert_array_equal(_grad(lambda v: fp4jax.fake_quant(v, "mxfp4"), x), 1.0)


def _interval(av):
  """(u, delta) of |v| on the E2M1 grid: the fraction of the way to the next point."""
  lo_idx = np.clip(np.searchsorted(E2M1_GRID, av, side="right") - 1, 0, len(E2M1_GRID) - 2)
  lo, hi = E2M1_GRID[lo_idx], E2M1_GRID[lo_idx + 1]
  return np.clip((av - lo) / (hi - lo), 0.0, 1.0)


def _block_of_values(values):
  # One block with amax 6 (scale 2^0 under floor scales): the scaled values are the values.
  x = np.full((1, 32), 0.0, np.float32)
  x[0, 0] = 6.0
  x[0, 1:1 + len(values)] = values
  return jnp.asarray(x)


VALUES = [0.1, 0.3, 0.7, 1.2, 1.8, 2.4, 3.3, 4.6, 5.5, -0.9, -2.7]


def test_dge_matches_its_closed_form():
  # Wang et al. 2025, eq. 10: (1/k) |2u - 1|^(1/k - 1), clipped at max_grad.
  k, clip = 5.0, 3.0
  x = _block_of_values(VALUES)
  g = _grad(lambda v: fp4jax.fake_quant(v, "mxfp4", estimator="dge",
                                        estimator_params={"k": k, "max_grad": clip}), x)
  u = _interval(np.abs(np.array(VALUES)))
  want = np.minimum((1 / k) * np.abs(2 * u - 1) ** (1 / k - 1), clip)
  np.testing.assert_allclose(g[0, 1:1 + len(VALUES)], want, rtol=1e-5)


def test_smooth_matches_its_closed_form():
  t = 4.0
  x = _block_of_values(VALUES)
  g = _grad(lambda v: fp4jax.fake_quant(v, "mxfp4", estimator="smooth",
                                        estimator_params=(("temperature", t),)), x)
  u = _interval(np.abs(np.array(VALUES)))
  want = t / np.cosh(t * (u - 0.5)) ** 2 / (2 * np.tanh(t / 2))
  np.testing.assert_allclose(g[0, 1:1 + len(VALUES)], want, rtol=1e-5)


def test_registered_estimators_are_used():
  @fp4jax.estimators.register_estimator("test_half")
  def half(v, element, scale=0.5, **params):
    return jnp.full_like(v, scale, jnp.float32)
  try:
    x = jnp.ones((2, 32))
    g = _grad(lambda v: fp4jax.fake_quant(v, "mxfp4", estimator="test_half",
                                          estimator_params={"scale": 0.25}), x)
    np.testing.assert_array_equal(g, 0.25)
  finally:
    del fp4jax.estimators.ESTIMATORS["test_half"]


def test_under_jit_vmap_remat_and_with_keys(rng):
  x = _wide(rng, (3, 4, 64))
  key = jax.random.key(3)

  def loss(v, k):
    return jnp.sum(fp4jax.fake_quant(v, "nvfp4", rounding="stochastic", key=k) ** 2)

  g_jit = jax.jit(jax.grad(loss))(x, key)
  g = jax.grad(loss)(x, key)
  np.testing.assert_array_equal(np.asarray(g_jit), np.asarray(g))
  # STE: d/dx sum(fq(x)^2) = 2 fq(x).
  np.testing.assert_allclose(np.asarray(g), 2 * np.asarray(
      fp4jax.fake_quant(x, "nvfp4", rounding="stochastic", key=key)), rtol=1e-6)
  g_vmap = jax.vmap(jax.grad(lambda v: jnp.sum(fp4jax.fake_quant(v, "mxfp4",
                                                                 estimator="dge"))))(x)
  g_loop = np.stack([_grad(lambda v: fp4jax.fake_quant(v, "mxfp4", estimator="dge"), xi)
                     for xi in x])
  np.testing.assert_allclose(np.asarray(g_vmap), g_loop, rtol=1e-6)
  g_remat = jax.grad(jax.checkpoint(lambda v: jnp.sum(fp4jax.fake_quant(v, "mxfp4") * v)))(x)
  np.testing.assert_allclose(np.asarray(g_remat), np.asarray(
      fp4jax.fake_quant(x, "mxfp4") + x), rtol=1e-6)
  # The random bits as an explicit array take the same route (no gradient for them).
  bits = jax.random.bits(key, x.shape, jnp.uint32)
  g_bits = jax.grad(lambda v: jnp.sum(fp4jax.fake_quant(v, "mxfp4", rounding="stochastic",
                                                        random_bits=bits)))(x)
  np.testing.assert_array_equal(np.asarray(g_bits), 1.0)


def test_bad_estimators_are_named():
  with pytest.raises(ValueError, match="unknown estimator 'magic'.*register_estimator"):
    fp4jax.fake_quant(jnp.ones((2, 32)), "mxfp4", estimator="magic")
  with pytest.raises(TypeError, match="estimator must be a registered name or None"):
    fp4jax.fake_quant(jnp.ones((2, 32)), "mxfp4", estimator=lambda v, e: v)


def test_vmap_over_keys_remat_with_estimator_residuals_and_padding(rng):
  x = _wide(rng, (4, 48))                      # 48: padded to 64 with pad=True
  keys = jax.random.split(jax.random.key(5), 4)

  def f(v, k):
    return jnp.sum(fp4jax.fake_quant(v, "mxfp4", rounding="stochastic", key=k, pad=True,
                                     estimator="clipped_ste"))

  g = jax.vmap(jax.grad(f))(x, keys)            # one key per row
  g_loop = np.stack([np.asarray(jax.grad(f)(x[i], keys[i])) for i in range(4)])
  np.testing.assert_array_equal(np.asarray(g), g_loop)
  assert g.shape == x.shape
  # remat recomputes the forward, residual multipliers included: the same gradient.
  h = lambda v: jnp.sum(fp4jax.fake_quant(v, "mxfp4", estimator="dge", pad=True) * v)
  np.testing.assert_allclose(np.asarray(jax.grad(jax.checkpoint(h))(x)),
                             np.asarray(jax.grad(h)(x)), rtol=1e-6)
  # A traced tensor scale gets no gradient and does not break the estimator's path.
  gt = jax.grad(lambda t: jnp.sum(fp4jax.fake_quant(x, "nvfp4", tensor_scale=t, pad=True)))(
      jnp.float32(0.02))
  assert float(gt) == 0.0
