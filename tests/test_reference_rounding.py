"""Q-EMA rounding toward a reference (fp4jax.reference_rounding) and its qdot wiring."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fp4jax
from fp4jax import reference_rounding as rr
from conftest import bits_equal_or_both_nan

SPECS = ["mxfp4", "nvfp4", "mxfp6_e2m3", "mxfp8_e4m3", "int4_g32", "fp8_e4m3_tensor"]


def _adversarial(rng, shape):
  x = rng.standard_normal(shape).astype(np.float32)
  flat = x.reshape(-1)
  flat[:8] = [0.0, -0.0, 1e-40, -1e-41, 3.0e38, -3.0e38, 2.5, 0.75]  # zeros, subnormals, top
  flat[40:72] = 0.0  # a whole zero block
  return x


@pytest.mark.parametrize("spec", SPECS)
def test_reference_equal_to_x_is_the_plain_quantizer(spec, rng):
  x = jnp.asarray(_adversarial(rng, (8, 64)))
  got = rr.round_toward_reference(x, x, spec, -1)
  want = fp4jax.fake_quant(x, spec, -1).astype(jnp.float32)
  assert bits_equal_or_both_nan(got, want).all(), "reference == x must give quantize(x) bit for bit"


@pytest.mark.parametrize("spec", SPECS)
def test_choice_is_the_neighbour_nearest_the_reference(spec, rng):
  x = jnp.asarray(rng.standard_normal((8, 64)).astype(np.float32))
  ref = x + jnp.asarray(rng.standard_normal((8, 64)).astype(np.float32)) * 0.5
  n = rr.grid_neighbours(x, spec, -1)
  got = rr.round_toward_reference(x, ref, spec, -1)
  lo, hi = jnp.minimum(n.nearest, n.other) * n.scale, jnp.maximum(n.nearest, n.other) * n.scale
  # Every result is one of x's two neighbours ...
  assert bool(jnp.all((got == lo) | (got == hi))), "result must be a grid neighbour of x"
  # ... x lies between them (unless it saturates: then both are the top grid value) ...
  between = ((n.value >= jnp.minimum(n.nearest, n.other))
             & (n.value <= jnp.maximum(n.nearest, n.other)))
  top = jnp.abs(n.nearest) == jnp.max(jnp.asarray(rr.signed_grid(fp4jax.get_spec(spec).element)))
  assert bool(jnp.all(between | (top & (n.other == n.nearest))))
  # ... and the chosen one is no farther from the reference than the other.
  other = jnp.where(got == lo, hi, lo)
  assert bool(jnp.all(jnp.abs(got - ref) <= jnp.abs(other - ref) + 1e-6 * jnp.abs(ref)))
  changed = float(jnp.mean(got != fp4jax.fake_quant(x, spec, -1)))
  assert changed > 0.05, f"a noisy reference should flip some roundings, flipped {changed}"


def test_far_reference_saturates_to_the_far_neighbour():
  x = jnp.asarray([[6.0] + [2.4] * 31], jnp.float32)  # scale 1: 2.4 lies between 2 and 3
  up = rr.round_toward_reference(x, x.at[0, 1:].set(100.0), "mxfp4", -1)
  down = rr.round_toward_reference(x, x.at[0, 1:].set(-100.0), "mxfp4", -1)
  assert float(up[0, 1]) == 3.0 and float(down[0, 1]) == 2.0
  assert float(up[0, 0]) == 6.0, "an element on the grid has one candidate"


def test_boundary_distance_range_and_grid_points(rng):
  x = jnp.asarray(rng.standard_normal((4, 64)).astype(np.float32))
  d = jax.jit(rr.boundary_distance, static_argnums=1)(x, "mxfp4")
  assert bool(jnp.all((d >= 0) & (d <= 0.5)))
  on_grid = fp4jax.fake_quant(x, "mxfp4")
  assert bool(jnp.all(jax.jit(rr.boundary_distance, static_argnums=1)(on_grid, "mxfp4") == 0.5)), \
      "grid points are as far from a boundary as possible"
  mid = jnp.asarray([[6.0, 2.5] + [0.0] * 30], jnp.float32)  # 2.5: midpoint of 2 and 3
  assert float(rr.boundary_distance(mid, "mxfp4")[0, 1]) == 0.0


def test_reference_shape_mismatch_is_an_error():
  with pytest.raises(ValueError, match="reference must have x's shape"):
    rr.round_toward_reference(jnp.ones((2, 32)), jnp.ones((2, 16)), "mxfp4")


@pytest.mark.parametrize("recipe", ["mxfp4", "nvfp4", "tetrajet", "quartet"])
def test_qdot_rhs_reference(recipe, rng):
  x = jnp.asarray(rng.standard_normal((32, 64)).astype(np.float32))
  w = jnp.asarray(rng.standard_normal((64, 32)).astype(np.float32))
  ref = w + 0.3 * jnp.asarray(rng.standard_normal(w.shape).astype(np.float32))
  key = jax.random.key(1)
  dims = (((1,), (0,)), ((), ()))

  @jax.jit
  def run(w, ref):
    f = lambda w, r: fp4jax.qdot_general(x, w, dims, recipe, key, rhs_reference=r).sum()
    f0 = lambda w: fp4jax.qdot_general(x, w, dims, recipe, key).sum()
    return (fp4jax.qdot_general(x, w, dims, recipe, key),
            fp4jax.qdot_general(x, w, dims, recipe, key, rhs_reference=w),
            fp4jax.qdot_general(x, w, dims, recipe, key, rhs_reference=ref),
            jax.grad(f, argnums=(0, 1))(w, ref), jax.grad(f0)(w))

  plain, same, moved, (gw, gr), gw0 = run(w, ref)
  assert bool(jnp.all(plain == same)), "rhs_reference == rhs must not change the result"
  assert not bool(jnp.all(moved == plain))
  assert bool(jnp.all(gr == 0)), "no gradient flows into the reference"
  if recipe != "tetrajet":  # double quantization re-quantizes the Q-EMA weights
    assert bool(jnp.all(gw == gw0)), "the weight gradient is the straight-through one"
  with pytest.raises(ValueError, match="rhs_reference must have rhs's shape"):
    fp4jax.qdot_general(x, w, dims, recipe, key, rhs_reference=w[:2])
