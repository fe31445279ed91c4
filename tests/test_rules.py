"""quantize_model by ordered path rules, for linen and nnx, and its dry-run plan."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fp4jax
import fp4jax.linen as qnn
import fp4jax.nnx as qnnx
from fp4jax.rules import Rule, keep_blocks_in_bf16, plan, quantize_model


class Block(nn.Module):
  recipes: tuple = (None, None)  # for the hand-built reference model

  @nn.compact
  def __call__(self, x):
    mk = lambda f, name, r: (nn.Dense(f, name=name) if r is None
                             else qnn.QDense(f, name=name, recipe=r))
    h = mk(64, "attn", self.recipes[0])(x)
    return x + mk(32, "mlp", self.recipes[1])(nn.gelu(h))


class Net(nn.Module):
  recipes: tuple = ((None, None),) * 3 + (None,)

  @nn.compact
  def __call__(self, x):
    for i in range(3):
      x = Block(self.recipes[i], name=f"blocks_{i}")(x)
    head = self.recipes[3]
    return (nn.Dense(32, name="head") if head is None
            else qnn.QDense(32, name="head", recipe=head))(x)


X = (32, 32)


def test_linen_first_match_wins_and_equals_hand_built_model(rng):
  x = jnp.asarray(rng.standard_normal(X).astype(np.float32))
  rules = [Rule(r"^blocks_0/", None), Rule(r"mlp$", "mxfp6"), Rule(r"attn", "mxfp8"),
           Rule(r".*", "mxfp4")]
  q = quantize_model(Net(), rules)
  v = Net().init(jax.random.key(0), x)
  assert jax.tree.structure(q.init(jax.random.key(0), x)) == jax.tree.structure(v)
  hand = Net(((None, None), ("mxfp8", "mxfp6"), ("mxfp8", "mxfp6"), "mxfp4"))
  got = jax.jit(q.apply)(v, x)
  want = jax.jit(hand.apply)(v, x)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  p = q.dry_run(jax.random.key(0), x)
  by_path = {e.path: e.recipe for e in p.entries}
  assert by_path == {"blocks_0/attn": "bf16", "blocks_0/mlp": "bf16", "blocks_1/attn": "mxfp8",
                     "blocks_1/mlp": "mxfp6", "blocks_2/attn": "mxfp8", "blocks_2/mlp": "mxfp6",
                     "head": "mxfp4"}
  text = str(p)
  assert "blocks_1/mlp" in text and "mxfp6" in text and "bits per parameter" in text
  # bits: attn kernels 32x64 at 8.25, mlp kernels 64x32 at 6.25, head 32x32 at 4.25, rest 16.
  n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(v))
  qbits = 2 * 2048 * 8.25 + 2 * 2048 * 6.25 + 1024 * 4.25
  want_bits = (qbits + 16 * (n - 4 * 2048 - 1024)) / n
  assert abs(p.bits_per_param - want_bits) < 1e-9


def test_recipe_keep_high_precision_and_nvidia_block_rules(rng):
  x = jnp.asarray(rng.standard_normal(X).astype(np.float32))
  rules = keep_blocks_in_bf16("nvfp4", n_blocks=3, first=1, last=1)
  p = plan(Net(), rules, jax.random.key(0), x)
  got = {e.path: e.recipe for e in p.entries}
  assert got["blocks_0/attn"] == got["blocks_2/mlp"] == "bf16"
  assert got["blocks_1/attn"] == got["blocks_1/mlp"] == "nvfp4"
  assert got["head"] == "bf16", "NVFP4 keeps its output head in BF16 (keep_high_precision)"
  forced = plan(Net(), [Rule(".*", "nvfp4", honor_keep_high_precision=False)],
                jax.random.key(0), x)
  assert {e.path: e.recipe for e in forced.entries}["head"] == "nvfp4"


def test_moe_experts_only(rng):
  class MoE(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.Dense(32, name="router")(x)
      for i in range(2):
        h = h + nn.Dense(32, name=f"experts_{i}")(x)
      return nn.Dense(32, name="out")(h)

  x = jnp.asarray(rng.standard_normal(X).astype(np.float32))
  p = plan(MoE(), fp4jax.rules.RULE_SETS["moe_experts_mxfp4"], jax.random.key(0), x)
  assert {e.path: e.recipe for e in p.entries} == {
      "router": "bf16", "experts_0": "mxfp4", "experts_1": "mxfp4", "out": "bf16"}


def test_bad_rules():
  with pytest.raises(ValueError, match="unknown recipe"):
    Rule(".*", "mxfp3")
  with pytest.raises(ValueError, match="not a valid regular expression"):
    Rule("blocks_(", "mxfp4")
  with pytest.raises(ValueError, match="unknown kinds"):
    Rule(".*", "mxfp4", layers=("lstm",))
  with pytest.raises(TypeError, match="Rule.fullmatch must be True or False, got 'yes'"):
    Rule(".*", "mxfp4", fullmatch="yes")
  with pytest.raises(TypeError, match="honor_keep_high_precision must be True or False"):
    Rule(".*", "mxfp4", honor_keep_high_precision=None)
  with pytest.raises(TypeError, match="module_path must be a regular expression string"):
    Rule(3, "mxfp4")
  with pytest.raises(ValueError, match="rules is empty"):
    quantize_model(Net(), [])
  with pytest.raises(TypeError, match="linen or flax.nnx Module"):
    quantize_model(object(), "mxfp4")


def test_rule_matching_nothing_warns(rng):
  x = jnp.asarray(rng.standard_normal(X).astype(np.float32))
  q = quantize_model(Net(), [Rule("decoder", "mxfp4"), Rule(".*", "mxfp4")])
  with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    q.init(jax.random.key(0), x)
  msgs = [str(m.message) for m in w]
  assert any("'decoder' matched no quantizable layer" in m for m in msgs), msgs


class NBlock(nnx.Module):
  def __init__(self, rngs):
    self.attn = nnx.Linear(32, 64, rngs=rngs)
    self.mlp = nnx.Linear(64, 32, rngs=rngs)

  def __call__(self, x):
    return x + self.mlp(nnx.gelu(self.attn(x)))


class NNet(nnx.Module):
  def __init__(self, rngs):
    self.blocks = nnx.List([NBlock(rngs) for _ in range(3)])
    self.head = nnx.Linear(32, 32, rngs=rngs)

  def __call__(self, x):
    for b in self.blocks:
      x = b(x)
    return self.head(x)


def test_nnx_replacement(rng, capsys):
  x = jnp.asarray(rng.standard_normal(X).astype(np.float32))
  model = NNet(nnx.Rngs(0))
  rules = keep_blocks_in_bf16("tetrajet", 3, 1, 1, block_pattern="blocks/{}")
  with pytest.raises(ValueError, match="rngs=nnx.Rngs"):
    quantize_model(model, rules)
  q = quantize_model(model, rules, rngs=nnx.Rngs(quant=1), dry_run=True)
  out = capsys.readouterr().out
  assert "blocks/1/attn" in out and "tetrajet" in out
  assert type(q.blocks[0].attn) is nnx.Linear and type(q.blocks[2].mlp) is nnx.Linear
  assert isinstance(q.blocks[1].attn, qnnx.QLinear) and isinstance(q.blocks[1].mlp, qnnx.QLinear)
  assert type(model.blocks[1].attn) is nnx.Linear, "the original model is left alone"
  ref = fp4jax.qmatmul(x, model.blocks[0].attn.kernel[...], "bf16")
  np.testing.assert_array_equal(np.asarray(q.blocks[0].attn(x)),
                                np.asarray(ref + model.blocks[0].attn.bias[...]))
  h = jnp.asarray(rng.standard_normal((32, 32)).astype(np.float32))
  want = fp4jax.qmatmul(h, model.blocks[1].attn.kernel[...], "tetrajet", jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(q.blocks[1].attn(h, key=jax.random.key(0))),
                                np.asarray(want + model.blocks[1].attn.bias[...]))
  params = lambda m: jax.tree.leaves(nnx.state(m, nnx.Param))
  assert all(bool(jnp.all(a == b)) for a, b in zip(params(model), params(q)))


def test_top_level_exports_load_flax_lazily():
  import subprocess
  import sys
  code = ("import sys, fp4jax; assert 'flax' not in sys.modules, 'numerics import Flax'; "
          "from fp4jax.rules import quantize_model; "
          "assert fp4jax.quantize_model is quantize_model and fp4jax.Rule is not None")
  subprocess.run([sys.executable, "-c", code], check=True)


def test_fullmatch_rules_keep_qwix_semantics():
  # qwix matches module_path with re.fullmatch; fp4jax's default is re.search.
  searched = Rule("fc", "mxfp4")
  full = Rule("fc", "mxfp4", fullmatch=True)
  assert searched.matches("block_0/fc1", "dense")
  assert not full.matches("block_0/fc1", "dense") and not full.matches("fc1", "dense")
  assert full.matches("fc", "dense")
  assert Rule(r".*/fc\d", "mxfp4", fullmatch=True).matches("block_0/fc1", "dense")
  assert not Rule(r".*/fc\d", "mxfp4", fullmatch=True).matches("block_0/fc1/inner", "dense")
  from fp4jax import rules
  assert rules.resolve((full, Rule(".*", "nvfp4")), "block_0/fc1", "dense")[1] == 1


def test_quantized_linen_model_is_a_module_that_nests_and_trains(rng):
  # qwix / TE users compose the quantized model like any other module.
  import optax
  import flax.linen as nn
  x = jnp.asarray(rng.standard_normal(X).astype(np.float32))
  q = quantize_model(Net(), [Rule(r".*", "mxfp4")])
  assert isinstance(q, nn.Module)

  class Outer(nn.Module):
    body: nn.Module

    @nn.compact
    def __call__(self, v):
      return nn.Dense(4, name="readout")(self.body(v))

  outer = Outer(q)
  v = jax.jit(outer.init)(jax.random.key(0), x)
  # The same variable tree as with the unquantized model inside.
  assert jax.tree.structure(v) == jax.tree.structure(
      jax.eval_shape(Outer(Net()).init, jax.random.key(0), x))
  # The inner layers are quantized: equal to the quantized model applied on its own, and
  # not to the unquantized one.
  y = jax.jit(outer.apply)(v, x)
  assert not np.allclose(np.asarray(y), np.asarray(jax.jit(Outer(Net()).apply)(v, x)))
  inner = {"params": v["params"]["body"]}
  np.testing.assert_array_equal(
      np.asarray(y), np.asarray(jax.jit(lambda v, x: nn.Dense(4).apply(
          {"params": v["params"]["readout"]}, q.apply(inner, x)))(v, x)))
  tx = optax.adam(1e-2)
  params, opt = v["params"], tx.init(v["params"])
  loss = jax.jit(lambda p: jnp.mean(outer.apply({"params": p}, x) ** 2))
  grad = jax.jit(jax.grad(loss))
  first = float(loss(params))
  for _ in range(5):
    g = grad(params)
    upd, opt = tx.update(g, opt, params)
    params = optax.apply_updates(params, upd)
  assert float(loss(params)) < first


def test_quantized_linen_model_takes_method_and_rule_pairs(rng):
  class TwoMethods(nn.Module):
    def setup(self):
      self.a, self.b = nn.Dense(32), nn.Dense(32)

    def __call__(self, x):
      return self.b(self.a(x))

    def features(self, x):          # a second method, for apply(..., method=)
      return self.a(x)

  x = jnp.asarray(rng.standard_normal(X).astype(np.float32))
  q = fp4jax.rules.QuantizedLinenModel(TwoMethods(), [(r".*", "mxfp4")])   # pairs normalised
  v = TwoMethods().init(jax.random.key(0), x)
  got = q.apply(v, x, method="features")
  a = v["params"]["a"]
  np.testing.assert_array_equal(np.asarray(got), np.asarray(
      fp4jax.qmatmul(x, a["kernel"], "mxfp4") + a["bias"]))
  np.testing.assert_array_equal(np.asarray(q.apply(v, x, method=TwoMethods.features)),
                                np.asarray(got))
