"""fp4jax.qdot_fused: the GEMM-ready-operand path of qdot equals the reference."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fp4jax
from fp4jax import dispatch, qdot_fused, recipes
from fp4jax.dispatch import DeviceFacts, OperandPath

FUSED_RECIPES = ["mxfp4", "tetrajet", "nvfp4", "fp4_all_the_way", "quartet"]


def _loss(recipe, key, c, impl, dtype=jnp.float32):
  def loss(x, w):
    y = fp4jax.qmatmul(x, w, recipe, key, impl=impl)
    return jnp.sum(y.astype(jnp.float32) * c)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


@pytest.mark.parametrize("recipe", FUSED_RECIPES)
@pytest.mark.parametrize("tokens", [40, 34])  # 34: wgrad pads the tokens to whole blocks
def test_fused_matches_reference_forward_and_gradients(recipe, tokens, rng, caplog):
  x = jnp.asarray(rng.standard_normal((2, tokens, 64)).astype(np.float32))
  w = jnp.asarray(rng.standard_normal((64, 96)).astype(np.float32) * 0.1)
  c = jnp.asarray(rng.standard_normal((2, tokens, 96)).astype(np.float32))
  key = jax.random.key(11)
  with caplog.at_level(logging.DEBUG, logger="fp4jax"):
    got, (gx, gw) = _loss(recipe, key, c, "fused")(x, w)
  assert any(f"layer: {recipe} (fused) via fused" in m for m in caplog.messages)
  want, (wx, ww) = _loss(recipe, key, c, "xla")(x, w)
  two_level = recipes.get(recipe).fwd_lhs.tensor_scale is not None
  for name, u, v in (("loss", got, want), ("dx", gx, wx), ("dw", gw, ww)):
    u, v = np.asarray(u), np.asarray(v)
    if not two_level:  # the same values, the same float32 GEMM on CPU: bit for bit
      np.testing.assert_array_equal(u, v, err_msg=f"{recipe}: {name}")
    else:  # t applied to the result instead of into each block scale
      np.testing.assert_allclose(u, v, rtol=0, atol=1e-5 * float(np.max(np.abs(v))),
                                 err_msg=f"{recipe}: {name}")


@pytest.mark.parametrize("method", ["dot", "dot_bf16"])
@pytest.mark.parametrize("recipe", ["nvfp4", "quartet"])
def test_fused_matches_reference_with_the_dot_hadamard(recipe, method, rng, monkeypatch):
  # The GPU's Hadamard methods (GEMMs, their own summation order) run in both paths, so
  # their operands still agree: CPU runs them here to check the plumbing.
  monkeypatch.setattr(DeviceFacts, "hadamard_method", property(lambda self: method))
  x = jnp.asarray(rng.standard_normal((2, 48, 64)).astype(np.float32))
  w = jnp.asarray(rng.standard_normal((64, 96)).astype(np.float32) * 0.1)
  c = jnp.asarray(rng.standard_normal((2, 48, 96)).astype(np.float32))
  key = jax.random.key(12)
  got, (gx, gw) = _loss(recipe, key, c, "fused")(x, w)
  want, (wx, ww) = _loss(recipe, key, c, "xla")(x, w)
  two_level = recipes.get(recipe).fwd_lhs.tensor_scale is not None
  for name, u, v in (("loss", got, want), ("dx", gx, wx), ("dw", gw, ww)):
    u, v = np.asarray(u), np.asarray(v)
    atol = 1e-5 * float(np.max(np.abs(v))) if two_level else 0
    np.testing.assert_allclose(u, v, rtol=0, atol=atol, err_msg=f"{recipe}: {name}")
  # ... and the dot method did run where it applies: its GEMMs are in the step (one to
  # three per transform). NVFP4's only transform (wgrad, along its float-scaled blocks)
  # is the butterfly under every device method (float_scale_operand.transform_method).
  dots = str(jax.make_jaxpr(_loss(recipe, key, c, "fused"))(x, w)).count("dot_general")
  monkeypatch.setattr(DeviceFacts, "hadamard_method", property(lambda self: "butterfly"))
  base = str(jax.make_jaxpr(_loss(recipe, key, c, "fused"))(x, w)).count("dot_general")
  if recipe == "nvfp4":
    assert dots == base, (dots, base)
  else:
    assert dots > base, (dots, base)


def test_fused_bf16_inputs_and_outputs_keep_their_dtypes(rng):
  x = jnp.asarray(rng.standard_normal((64, 64)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((64, 32)) * 0.1, jnp.bfloat16)
  c = jnp.asarray(rng.standard_normal((64, 32)), jnp.float32)
  got, (gx, gw) = _loss("tetrajet", jax.random.key(0), c, "fused")(x, w)
  want, (wx, ww) = _loss("tetrajet", jax.random.key(0), c, "xla")(x, w)
  assert gx.dtype == gw.dtype == jnp.bfloat16
  for u, v in ((got, want), (gx, wx), (gw, ww)):
    np.testing.assert_array_equal(np.asarray(u.astype(jnp.float32)),
                                  np.asarray(v.astype(jnp.float32)))


def test_nvfp4_reuses_the_forward_weight_for_dgrad():
  assert qdot_fused.reuses_forward_weight(recipes.get("nvfp4"))
  for name in ("mxfp4", "tetrajet", "fp4_all_the_way", "quartet"):
    assert not qdot_fused.reuses_forward_weight(recipes.get(name)), name


@pytest.mark.parametrize("recipe,kwargs,why", [
    ("msfp4", {}, "estimators"),
    ("mxfp8", {}, "not E2M1"),
    ("fp8", {}, "not E2M1"),
    ("mxfp4", {"has_reference": True}, "Q-EMA"),
    ("mxfp4", {"n": 48}, "output width 48"),
])
def test_unsupported_recipes_name_why(recipe, kwargs, why):
  assert why in qdot_fused.unsupported_reason(recipes.get(recipe), **kwargs)


def test_fused_policy_falls_back_to_the_reference_where_unsupported(rng):
  x = jnp.asarray(rng.standard_normal((32, 64)).astype(np.float32))
  w = jnp.asarray(rng.standard_normal((64, 32)).astype(np.float32))
  for recipe in ("mxfp8", "msfp4"):
    np.testing.assert_array_equal(np.asarray(fp4jax.qmatmul(x, w, recipe, impl="fused")),
                                  np.asarray(fp4jax.qmatmul(x, w, recipe, impl="xla")))
  ref = jnp.asarray(rng.standard_normal((64, 32)).astype(np.float32))
  np.testing.assert_array_equal(
      np.asarray(fp4jax.qmatmul(x, w, "mxfp4", impl="fused", rhs_reference=ref)),
      np.asarray(fp4jax.qmatmul(x, w, "mxfp4", impl="xla", rhs_reference=ref)))


@pytest.mark.parametrize("facts,policy,want", [
    (DeviceFacts("gpu", 9, "NVIDIA H200"), "auto", OperandPath.FUSED),
    (DeviceFacts("gpu", 10, "NVIDIA B200"), "auto", OperandPath.QARRAY),
    (DeviceFacts("gpu", 8, "NVIDIA A100"), "auto", OperandPath.QARRAY),
    (DeviceFacts("cpu"), "auto", OperandPath.QARRAY),
    (DeviceFacts("cpu"), "fused", OperandPath.FUSED),
    (DeviceFacts("gpu", 9, "NVIDIA H200"), "pallas", OperandPath.QARRAY),
    (DeviceFacts("gpu", 9, "NVIDIA H200"), "xla", OperandPath.QARRAY),
])
def test_operand_path_choice(facts, policy, want):
  choice = dispatch.choose_operand_path(recipes.get("nvfp4"), policy, facts=facts)
  assert choice.impl is want
  assert (choice.reason is None) == (want is OperandPath.FUSED)


def test_fused_layer_through_flax_and_gemm_impl(rng):
  import fp4jax.linen as qnn
  layer = qnn.QDense(features=32, recipe="nvfp4")
  x = jnp.asarray(rng.standard_normal((32, 64)).astype(np.float32))
  params = layer.init(jax.random.key(0), x)
  rngs = {"quant": jax.random.key(1)}
  with fp4jax.gemm_impl("fused"):
    y_fused = layer.apply(params, x, rngs=rngs)
  with fp4jax.gemm_impl("xla"):
    y_ref = layer.apply(params, x, rngs=rngs)
  np.testing.assert_allclose(np.asarray(y_fused), np.asarray(y_ref), rtol=0,
                             atol=1e-5 * float(jnp.max(jnp.abs(y_ref))))
