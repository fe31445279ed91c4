"""fp4jax.estimators: the surrogate-derivative registry."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fp4jax import estimators, formats as F


def _v(rng, fmt, n=4000, over=1.3):
  return jnp.asarray(rng.uniform(-over, over, n) * fmt.max_value, jnp.float32)


def test_ste_is_identity(rng):
  v = _v(rng, F.E2M1)
  np.testing.assert_array_equal(estimators.get_estimator("ste")(v, F.E2M1), np.ones(v.shape))


@pytest.mark.parametrize("fmt", [F.E2M1, F.E4M3, F.INT4])
def test_clipped_ste_zero_outside_range(fmt, rng):
  v = _v(rng, fmt)
  d = np.asarray(estimators.get_estimator("clipped_ste")(v, fmt))
  np.testing.assert_array_equal(d, (np.abs(np.asarray(v)) <= fmt.max_value).astype(np.float32))


def _dge_surrogate(v, fmt, k=5.0):
  """f(x) = lo + delta/2 (1 + sign(2u-1)|2u-1|^(1/k)), u the position in the interval."""
  u, delta = estimators.interval_position(v, fmt)
  lo = jnp.abs(v) - u * delta
  s = 2 * u - 1
  return jnp.sign(v) * (lo + delta / 2 * (1 + jnp.sign(s) * jnp.abs(s) ** (1 / k)))


def test_dge_closed_form_and_finite_differences(rng):
  fmt = F.E2M1
  v = _v(rng, fmt, over=0.99)
  d = np.asarray(estimators.get_estimator("dge")(v, fmt, k=5.0, max_grad=3.0))
  u, _ = estimators.interval_position(v, fmt)
  closed = np.minimum(0.2 * np.abs(2 * np.asarray(u) - 1) ** (-0.8), 3.0)
  np.testing.assert_allclose(d, closed, rtol=1e-5)
  # Finite differences of the surrogate, away from interval ends and the clipped region.
  ok = (np.asarray(u) > 0.05) & (np.asarray(u) < 0.95) & (np.abs(2 * np.asarray(u) - 1) > 0.2)
  h = 1e-3
  fd = (_dge_surrogate(v + h, fmt) - _dge_surrogate(v - h, fmt)) / (2 * h)
  np.testing.assert_allclose(np.asarray(fd)[ok], d[ok], rtol=2e-2)
  # The surrogate passes through the grid points (it approximates the step).
  grid = jnp.asarray(fmt.grid()[:-1], jnp.float32)
  np.testing.assert_allclose(_dge_surrogate(grid, fmt), grid, atol=1e-6)
  over = jnp.asarray([6.5, -7.0], jnp.float32)
  np.testing.assert_array_equal(estimators.get_estimator("dge")(over, fmt), [0.0, 0.0])


def test_smooth_tends_to_ste_as_temperature_goes_to_zero(rng):
  v = _v(rng, F.E2M1, over=0.99)
  est = estimators.get_estimator("smooth")
  errs = [float(jnp.max(jnp.abs(est(v, F.E2M1, temperature=t) - 1))) for t in (4.0, 1.0, 0.1, 0.01)]
  assert errs == sorted(errs, reverse=True) and errs[-1] < 1e-4, errs
  # Larger temperature concentrates the derivative at the interval midpoint.
  u, _ = estimators.interval_position(v, F.E2M1)
  sharp = est(v, F.E2M1, temperature=20.0)
  assert float(sharp[jnp.argmin(jnp.abs(u - 0.5))]) > 5.0


def test_register_a_new_estimator(rng):
  @estimators.register_estimator("test_half")
  def half(v, element, **params):
    return 0.5 * jnp.ones_like(v)

  from fp4jax import recipes
  import fp4jax
  r = recipes.get("mxfp4").replace(name="mxfp4_half", lhs_estimator="test_half")
  a = jnp.asarray(rng.standard_normal((32, 32)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((32, 32)), jnp.float32)
  ga = jax.grad(lambda a: fp4jax.qmatmul(a, w, r).sum())(a)
  g0 = jax.grad(lambda a: fp4jax.qmatmul(a, w, "mxfp4").sum())(a)
  np.testing.assert_allclose(ga, 0.5 * g0, rtol=1e-6)
  del estimators.ESTIMATORS["test_half"]


def test_unknown_estimator_lists_registered():
  with pytest.raises(ValueError, match="registered"):
    estimators.get_estimator("nope")
