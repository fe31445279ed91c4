"""fp4jax.linen layers: Flax's parameter trees, the functional qdot path, RNG streams."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fp4jax
import fp4jax.linen as qnn
from fp4jax.qconv import qconv_general_dilated

X = (32, 64)


def _pairs():
  return [
      ("dense", nn.Dense(32), qnn.QDense(32, recipe="tetrajet"), X),
      ("dense_general", nn.DenseGeneral((2, 16), axis=-1),
       qnn.QDenseGeneral((2, 16), axis=-1, recipe="nvfp4"), X),
      ("einsum", nn.Einsum((64, 32), "ab,bc->ac"),
       qnn.QEinsum((64, 32), "ab,bc->ac", recipe="mxfp4"), X),
      ("conv", nn.Conv(32, (3,)), qnn.QConv(32, (3,), recipe="mxfp4"), (32, 2, 32)),
  ]


def _functional(kind, params, x, recipe, key, ref=None):
  k, b = params["params"]["kernel"], params["params"]["bias"]
  if kind == "dense":
    return fp4jax.qmatmul(x, k, recipe, key, rhs_reference=ref) + b
  if kind == "dense_general":
    return fp4jax.qdot_general(x, k, (((1,), (0,)), ((), ())), recipe, key,
                               rhs_reference=ref) + b
  if kind == "einsum":
    return fp4jax.qeinsum("ab,bc->ac", x, k, recipe, key, rhs_reference=ref) + b
  return qconv_general_dilated(x, k, (1,), [(1, 1)], (1,), (1,), ("NWC", "WIO", "NWC"),
                               recipe=recipe, key=key, rhs_reference=ref) + b


@pytest.mark.parametrize("kind,plain,quant,shape", _pairs(), ids=[p[0] for p in _pairs()])
def test_parameters_are_flax_and_output_is_qdot(kind, plain, quant, shape, rng):
  x = jnp.asarray(rng.standard_normal(shape).astype(np.float32))
  p_plain = plain.init(jax.random.key(1), x)
  p_quant = quant.init(jax.random.key(1), x)
  assert jax.tree.structure(p_plain) == jax.tree.structure(p_quant)
  assert all(bool(jnp.all(a == b)) for a, b in zip(jax.tree.leaves(p_plain),
                                                   jax.tree.leaves(p_quant))), \
      "a quantized layer must initialise exactly like the Flax layer"
  step = jax.random.key(7)
  key = None
  recipe = fp4jax.recipes.get(quant.recipe)
  run = jax.jit(lambda p, x, s: quant.apply(p, x, rngs={"quant": s}))
  y = run(p_plain, x, step)
  assert bool(jnp.all(y == run(p_plain, x, step))), "same quant key, same output"
  if recipe.needs_key:  # stochastic rounding lives in the backward GEMMs
    cot = jnp.asarray(rng.standard_normal(y.shape).astype(np.float32))
    grad = jax.jit(jax.grad(lambda p, s: (quant.apply(p, x, rngs={"quant": s}) * cot).sum()))
    g7, g8 = grad(p_plain, step), grad(p_plain, jax.random.key(8))
    assert not all(bool(jnp.all(a == b)) for a, b in zip(jax.tree.leaves(g7),
                                                         jax.tree.leaves(g8))), \
        "a stochastic recipe's gradients must depend on the quant key"
    # The key a layer receives: make_rng("quant") of its hook submodule.
    key = _captured_key(quant, p_plain, x, step)
  want = jax.jit(lambda p, x: _functional(kind, p, x, recipe, key))(p_plain, x)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(want.reshape(y.shape)))
  # A BF16-trained plain checkpoint loads into the quantized layer and back.
  back = plain.apply(quant.init(jax.random.key(1), x), x)
  np.testing.assert_array_equal(np.asarray(back), np.asarray(plain.apply(p_plain, x)))


def _captured_key(layer, params, x, step):
  keys = []
  orig = qnn.quant_key

  def spy(module, recipe):
    k = orig(module, recipe)
    keys.append(k)
    return k

  qnn.quant_key = spy
  try:
    layer.apply(params, x, rngs={"quant": step})
  finally:
    qnn.quant_key = orig
  assert len(keys) == 1
  return keys[0]


def test_q_ema_collection_sets_rounding_reference(rng):
  x = jnp.asarray(rng.standard_normal(X).astype(np.float32))
  layer = qnn.QDense(32, recipe="mxfp4")
  v = layer.init(jax.random.key(0), x)
  k = v["params"]["kernel"]
  same = layer.apply({**v, "q_ema": v["params"]}, x)
  np.testing.assert_array_equal(np.asarray(same), np.asarray(layer.apply(v, x)))
  ema = {"kernel": k + 0.02 * jnp.asarray(rng.standard_normal(k.shape).astype(np.float32)),
         "bias": v["params"]["bias"]}
  got = layer.apply({**v, "q_ema": ema}, x)
  want = fp4jax.qmatmul(x, k, "mxfp4", rhs_reference=ema["kernel"]) + v["params"]["bias"]
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert not bool(jnp.all(got == same))


def test_stochastic_recipe_without_quant_rng_is_an_error(rng):
  x = jnp.asarray(rng.standard_normal(X).astype(np.float32))
  layer = qnn.QDense(32, recipe="tetrajet")
  v = layer.init(jax.random.key(0), x)  # init works without a "quant" stream
  with pytest.raises(ValueError, match="rngs=\\{'quant'"):
    layer.apply(v, x)


def test_bad_arguments():
  with pytest.raises(ValueError, match="unknown recipe"):
    qnn.QDense(4, recipe="fp3").init(jax.random.key(0), jnp.ones((32, 32)))
  with pytest.raises(ValueError, match="dot_general is set"):
    qnn.QDense(4, dot_general=jax.lax.dot_general)


def test_training_step_in_a_model(rng):
  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(qnn.QDense(64, recipe="quartet")(x))
      return qnn.QDense(32, recipe="mxfp4")(x)

  x = jnp.asarray(rng.standard_normal(X).astype(np.float32))
  m = MLP()
  v = m.init(jax.random.key(0), x)
  loss = lambda p, k: jnp.mean(m.apply(p, x, rngs={"quant": k}) ** 2)
  g = jax.jit(jax.grad(loss))(v, jax.random.key(3))
  assert jax.tree.structure(g) == jax.tree.structure(v)
  assert all(bool(jnp.all(jnp.isfinite(t))) and float(jnp.abs(t).max()) > 0
             for t in jax.tree.leaves(g))


def test_quant_dot_general_injected_into_a_plain_flax_layer(rng):
  # AQT's route (README): nn.Dense(dot_general_cls=QuantDotGeneral) equals QDense.
  import functools
  x = jnp.asarray(rng.standard_normal((4, 64)).astype(np.float32))
  layer = nn.Dense(32, dot_general_cls=functools.partial(qnn.QuantDotGeneral, recipe="mxfp4"))
  params = layer.init(jax.random.key(0), x)
  want = qnn.QDense(32, recipe="mxfp4").apply(params, x)
  np.testing.assert_array_equal(np.asarray(layer.apply(params, x)), np.asarray(want))
