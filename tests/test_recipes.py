"""fp4jax.recipe_override: every quantized layer traced inside runs another recipe."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fp4jax


def test_recipe_override_runs_layers_in_another_recipe_under_jit(rng):
  # Transformer Engine users evaluate without FP4 through a context; here it acts at trace
  # time, like gemm_impl: a function traced inside uses the override.
  import flax.linen as nn
  import fp4jax.linen as qnn

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.relu(qnn.QDense(64, recipe="mxfp4", name="inner")(x))
      return qnn.QDense(32, recipe="nvfp4", name="outer")(h)

  class Plain(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(32, name="outer")(nn.relu(nn.Dense(64, name="inner")(x)))

  x = jnp.asarray(rng.standard_normal((8, 64)).astype(np.float32))
  net = Net()
  params = net.init({"params": jax.random.key(0), "quant": jax.random.key(1)}, x)
  with fp4jax.recipe_override(None):     # no "quant" key needed: nothing is quantized
    y_bf16 = jax.jit(net.apply)(params, x)
  np.testing.assert_array_equal(np.asarray(y_bf16), np.asarray(Plain().apply(params, x)))
  with fp4jax.recipe_override("mxfp4"):
    y_mx = jax.jit(lambda p, v: net.apply(p, v))(params, x)
  p = params["params"]
  h = jax.nn.relu(fp4jax.qmatmul(x, p["inner"]["kernel"], "mxfp4") + p["inner"]["bias"])
  want = fp4jax.qmatmul(h, p["outer"]["kernel"], "mxfp4") + p["outer"]["bias"]
  np.testing.assert_allclose(np.asarray(y_mx), np.asarray(want), rtol=1e-6, atol=1e-6)
  # Outside the context the layers' own recipes are back (nvfp4 needs its key again).
  with pytest.raises(ValueError, match="rngs="):
    net.apply(params, x)
  with pytest.raises(ValueError, match="unknown recipe"):
    with fp4jax.recipe_override("mxfp5"):
      pass


def test_recipe_override_reaches_nnx_layers(rng):
  from flax import nnx
  import fp4jax.nnx as qnnx
  layer = qnnx.QLinear(64, 32, recipe="nvfp4", rngs=nnx.Rngs(params=0, quant=1))
  x = jnp.asarray(rng.standard_normal((4, 64)).astype(np.float32))
  with fp4jax.recipe_override(None):
    y = layer(x)
  want = x @ layer.kernel[...] + layer.bias[...]
  np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-6, atol=1e-6)
  assert not np.allclose(np.asarray(layer(x)), np.asarray(want), rtol=1e-3)  # FP4 again


def test_recipe_override_needs_no_key_for_bf16_and_reaches_einsum_layers(rng):
  import flax.linen as nn
  from flax import nnx
  import fp4jax.linen as qnn
  import fp4jax.nnx as qnnx
  x = jnp.asarray(rng.standard_normal((4, 64)).astype(np.float32))
  # nnx, no "quant" stream: an override that needs keys names itself; BF16 needs none.
  layer = qnnx.QLinear(64, 32, recipe="mxfp4", rngs=nnx.Rngs(params=0))
  with fp4jax.recipe_override("nvfp4"):
    with pytest.raises(ValueError, match="'nvfp4' rounds stochastically"):
      layer(x)
  with fp4jax.recipe_override(None):
    np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(x @ layer.kernel[...]
                                                               + layer.bias[...]), rtol=1e-6)
  # An einsum layer, explicit and through rules (einsum_call), without "quant" keys.
  ein = qnn.QEinsum((64, 32), "bk,kn->bn", recipe="tetrajet")
  plain = nn.Einsum((64, 32), "bk,kn->bn")
  params = plain.init(jax.random.key(0), x)
  ruled = fp4jax.quantize_model(plain, "tetrajet")
  fn = jax.jit(lambda p, v: (ein.apply(p, v), ruled.apply(p, v)))   # first traced inside
  with fp4jax.recipe_override(None):
    a, b = fn(params, x)
  want = plain.apply(params, x)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(want))
  np.testing.assert_array_equal(np.asarray(b), np.asarray(want))
