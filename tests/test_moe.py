"""Mixture-of-experts layers: fp4jax.linen.GroupedDense, fp4jax.models.MoEMLP, and rules that
quantize the experts only."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import fp4jax
import fp4jax.linen as qnn
from fp4jax import rules
from fp4jax.models import GPT, MOE_AUX_LOSS, MoEMLP

E, D, H, TOP_K = 4, 64, 64, 2


def _tokens(seed=0, shape=(2, 16, D)):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def test_grouped_dense_is_ragged_dot_or_its_quantized_version():
  x = _tokens(shape=(20, D))
  sizes = jnp.asarray([7, 0, 13, 0], jnp.int32)
  layer = qnn.GroupedDense(E, 32)
  params = layer.init(jax.random.key(0), x, sizes)
  kernel = params["params"]["kernel"]
  assert kernel.shape == (E, D, 32)
  np.testing.assert_array_equal(np.asarray(layer.apply(params, x, sizes)),
                                np.asarray(lax.ragged_dot(x, kernel, sizes)))
  quantized = qnn.GroupedDense(E, 32, recipe="mxfp4").apply(params, x, sizes)
  np.testing.assert_array_equal(np.asarray(quantized),
                                np.asarray(fp4jax.qragged_dot(x, kernel, sizes, "mxfp4")))
  with pytest.raises(ValueError, match="unknown recipe"):
    qnn.GroupedDense(E, 32, recipe="mxfp5")
  with pytest.raises(ValueError, match="quant"):   # a stochastic recipe needs the stream
    qnn.GroupedDense(E, 32, recipe="nvfp4").apply(params, x, sizes)


def _dense_moe_reference(params, x):
  """Every token through its top-k experts one by one, densely (no sorting, no grouping)."""
  p = params["params"]
  tokens = x.reshape(-1, D)
  logits = tokens @ p["router"]["kernel"] + p["router"]["bias"]
  top, idx = lax.top_k(logits, TOP_K)
  gate = jax.nn.softmax(top, -1)
  w1, w2 = p["experts"]["fc1"]["kernel"], p["experts"]["fc2"]["kernel"]
  hp = lax.Precision.HIGHEST
  out = 0.0
  for j in range(TOP_K):
    h = nn.gelu(jnp.einsum("td,tdh->th", tokens, w1[idx[:, j]], precision=hp))
    out = out + gate[:, j:j + 1] * jnp.einsum("th,thd->td", h, w2[idx[:, j]], precision=hp)
  probs = jax.nn.softmax(logits, -1)
  frac = jnp.mean(jax.nn.one_hot(idx, E).sum(1), 0) / TOP_K
  return out.reshape(x.shape), E * jnp.sum(frac * probs.mean(0))


def test_moe_mlp_routes_each_token_to_its_top_k_experts():
  x = _tokens(1)
  moe = MoEMLP(D, H, E, TOP_K)
  params = moe.init(jax.random.key(0), x)
  y, inter = moe.apply(params, x, mutable=["intermediates"])
  ref, aux = _dense_moe_reference(params, x)
  np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(float(inter["intermediates"][MOE_AUX_LOSS][0]), float(aux),
                             rtol=1e-6)
  with pytest.raises(ValueError, match="top_k=5"):
    MoEMLP(D, H, E, 5).init(jax.random.key(0), x)


def test_rules_quantize_the_experts_only_and_gradients_flow():
  x = _tokens(2)
  plain = MoEMLP(D, H, E, TOP_K)
  params = plain.init(jax.random.key(0), x)
  q = fp4jax.quantize_model(plain, rules.RULE_SETS["moe_experts_mxfp4"])
  plan = q.dry_run(jax.random.key(0), x)
  kinds = {e.path: (e.kind, e.recipe) for e in plan.entries}
  assert kinds == {"router": ("dense", "bf16"), "experts/fc1": ("grouped", "mxfp4"),
                   "experts/fc2": ("grouped", "mxfp4")}
  # The same as the model built with quantized experts, and not the BF16 model.
  explicit = MoEMLP(D, H, E, TOP_K, recipe="mxfp4")
  np.testing.assert_array_equal(np.asarray(q.apply(params, x)),
                                np.asarray(explicit.apply(params, x)))
  assert float(jnp.max(jnp.abs(q.apply(params, x) - plain.apply(params, x)))) > 1e-4
  grads = jax.grad(lambda p: jnp.sum(q.apply(p, x) ** 2))(params)
  for leaf in jax.tree.leaves(grads["params"]["experts"]):
    assert np.all(np.isfinite(np.asarray(leaf))) and float(jnp.abs(leaf).max()) > 0
  # The rule set's pattern leaves a GPT's attention and router alone.
  gpt = GPT.from_name("gpt_tiny_moe")
  tokens = jnp.zeros((1, 8), jnp.int32)
  gplan = rules.plan(gpt, rules.RULE_SETS["moe_experts_mxfp4"], jax.random.key(0), tokens)
  quantized = sorted(e.path for e in gplan.entries if e.recipe != "bf16")
  assert quantized == sorted(f"block{i}/moe/experts/fc{j}" for i in range(4) for j in (1, 2))


def test_nnx_grouped_linear_and_rules():
  from flax import nnx
  import fp4jax.nnx as qnnx
  x = _tokens(3, shape=(20, D))
  sizes = jnp.asarray([7, 0, 13, 0], jnp.int32)

  class Block(nnx.Module):
    def __init__(self, rngs):
      self.router = nnx.Linear(D, E, rngs=rngs)
      self.experts = qnnx.GroupedLinear(E, D, 32, rngs=rngs)

    def __call__(self, x, sizes):
      return self.experts(x, sizes)

  model = Block(nnx.Rngs(0))
  kernel = model.experts.kernel[...]
  assert kernel.shape == (E, D, 32)
  np.testing.assert_array_equal(np.asarray(model(x, sizes)),
                                np.asarray(lax.ragged_dot(x, kernel, sizes)))
  q = fp4jax.quantize_model(model, rules.RULE_SETS["moe_experts_mxfp4"])
  plan = {e.path: (e.kind, e.recipe) for e in rules.plan(q, [rules.Rule(".*", None)]).entries}
  assert plan == {"router": ("dense", "bf16")}, plan   # the quantized experts are explicit now
  assert isinstance(q.experts, qnnx.GroupedLinear) and q.experts.recipe.name == "mxfp4"
  np.testing.assert_array_equal(
      np.asarray(nnx.jit(lambda m, x, s: m(x, s))(q, x, sizes)),
      np.asarray(fp4jax.qragged_dot(x, kernel, sizes, "mxfp4")))
  assert model.experts.recipe is None, "quantize_model copies; the original stays BF16"
  with pytest.raises(ValueError, match="quant"):
    qnnx.GroupedLinear(E, D, 32, recipe="nvfp4", rngs=nnx.Rngs(params=0))(x, sizes)


def test_plan_lists_each_scanned_layer_once():
  # nn.scan traces its body more than once; the plan has one entry per layer path.
  gpt = GPT.from_name("gpt_tiny_moe", scan_layers=True)
  tokens = jnp.zeros((1, 8), jnp.int32)
  plan = rules.plan(gpt, rules.RULE_SETS["moe_experts_mxfp4"], jax.random.key(0), tokens)
  paths = [e.path for e in plan.entries]
  assert len(paths) == len(set(paths)), paths
  assert sorted(p for p, e in zip(paths, plan.entries) if e.recipe != "bf16") == [
      "blocks/moe/experts/fc1", "blocks/moe/experts/fc2"]
