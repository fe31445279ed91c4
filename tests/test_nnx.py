"""fp4jax.nnx layers: nnx's parameter state, the functional qdot path, the quant stream."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fp4jax
import fp4jax.nnx as qnnx
from fp4jax.qconv import qconv_general_dilated


def _pure(state):
  fn = getattr(nnx, "to_pure_dict", None)
  return fn(state) if fn is not None else state.to_pure_dict()


def _cases():
  return [
      ("linear", lambda r: nnx.Linear(64, 32, rngs=r),
       lambda r: qnnx.QLinear(64, 32, recipe="tetrajet", rngs=r), (32, 64)),
      ("linear_general", lambda r: nnx.LinearGeneral(64, (2, 16), rngs=r),
       lambda r: qnnx.QLinearGeneral(64, (2, 16), recipe="mxfp4", rngs=r), (32, 64)),
      ("einsum", lambda r: nnx.Einsum("ab,bc->ac", (64, 32), (32,), rngs=r),
       lambda r: qnnx.QEinsum("ab,bc->ac", (64, 32), (32,), recipe="mxfp4", rngs=r), (32, 64)),
      ("conv", lambda r: nnx.Conv(32, 32, (3,), rngs=r),
       lambda r: qnnx.QConv(32, 32, (3,), recipe="mxfp4", rngs=r), (32, 2, 32)),
  ]


def _functional(kind, m, x, key, ref=None):
  k, b, r = m.kernel[...], m.bias[...], m.recipe
  if kind == "linear":
    return fp4jax.qmatmul(x, k, r, key, rhs_reference=ref) + b
  if kind == "linear_general":
    return fp4jax.qdot_general(x, k, (((1,), (0,)), ((), ())), r, key, rhs_reference=ref) + b
  if kind == "einsum":
    return fp4jax.qeinsum("ab,bc->ac", x, k, r, key, rhs_reference=ref) + b
  return qconv_general_dilated(x, k, (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC"),
                               recipe=r, key=key, rhs_reference=ref) + b


@pytest.mark.parametrize("kind,mk,mkq,shape", _cases(), ids=[c[0] for c in _cases()])
def test_parameters_are_nnx_and_output_is_qdot(kind, mk, mkq, shape, rng):
  x = jnp.asarray(rng.standard_normal(shape).astype(np.float32))
  plain, quant = mk(nnx.Rngs(1)), mkq(nnx.Rngs(1, quant=5))
  sp, sq = _pure(nnx.state(plain, nnx.Param)), _pure(nnx.state(quant, nnx.Param))
  assert jax.tree.structure(sp) == jax.tree.structure(sq)
  assert all(bool(jnp.all(a == b)) for a, b in zip(jax.tree.leaves(sp), jax.tree.leaves(sq)))
  key = jax.random.key(11)
  y = quant(x, key=key)
  want = _functional(kind, quant, x, key if quant.recipe.needs_key else None)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(want.reshape(y.shape)))
  # The layer's own stream: two calls draw different keys, a copy replays them.
  if quant.recipe.needs_key:
    twin = mkq(nnx.Rngs(1, quant=5))
    cot = jnp.asarray(rng.standard_normal(y.shape).astype(np.float32))
    grad = nnx.jit(lambda m: nnx.grad(lambda m: (m(x) * cot).sum())(m))
    g1, g2, g1_twin = grad(quant), grad(quant), grad(twin)
    leaves = lambda g: jax.tree.leaves(g)
    assert all(bool(jnp.all(a == b)) for a, b in zip(leaves(g1), leaves(g1_twin))), \
        "the same quant seed must reproduce the gradients"
    assert not all(bool(jnp.all(a == b)) for a, b in zip(leaves(g1), leaves(g2))), \
        "the stream must advance between steps"
  # Parameters move across: a plain layer's state loads into the quantized one.
  nnx.update(quant, nnx.state(plain, nnx.Param))
  np.testing.assert_array_equal(np.asarray(quant.kernel[...]), np.asarray(plain.kernel[...]))


def test_quantized_copy_shares_parameters_and_kernel_references(rng):
  lin = nnx.Linear(64, 32, rngs=nnx.Rngs(0))
  q = qnnx.quantized_copy(lin, "mxfp4")
  assert isinstance(q, qnnx.QLinear) and q.kernel is lin.kernel
  x = jnp.asarray(rng.standard_normal((32, 64)).astype(np.float32))
  ema = lin.kernel[...] + 0.02 * jnp.asarray(rng.standard_normal((64, 32)).astype(np.float32))
  qnnx.set_kernel_references(q, {"kernel": ema, "bias": lin.bias[...]})
  want = fp4jax.qmatmul(x, lin.kernel[...], "mxfp4", rhs_reference=ema) + lin.bias[...]
  np.testing.assert_array_equal(np.asarray(q(x)), np.asarray(want))
  with pytest.raises(TypeError, match="no quantized counterpart"):
    qnnx.quantized_copy(nnx.LayerNorm(4, rngs=nnx.Rngs(0)), "mxfp4")


def test_nvfp4_layer_whose_rngs_lack_a_quant_stream_says_how_to_add_it(rng):
  # Issue 20: this raised KeyError "No RngStream named 'quant'" from inside flax.
  layer = qnnx.QLinear(64, 32, recipe="nvfp4", rngs=nnx.Rngs(params=0))
  x = jnp.asarray(rng.standard_normal((32, 64)).astype(np.float32))
  with pytest.raises(ValueError, match=r"recipe 'nvfp4' rounds stochastically.*"
                                       r"rngs=nnx.Rngs\(\.\.\., quant=\.\.\.\)"):
    layer(x)
  assert layer(x, key=jax.random.key(0)).shape == (32, 32)   # or a key per call


def test_stochastic_recipe_without_rngs_is_an_error(rng):
  lin = nnx.Linear(64, 32, rngs=nnx.Rngs(0))
  q = qnnx.quantized_copy(lin, "tetrajet")  # no rngs given
  x = jnp.asarray(rng.standard_normal((32, 64)).astype(np.float32))
  with pytest.raises(ValueError, match="quant"):
    q(x)
