"""fp4jax.models: the ViT, GPT and MLP used by the experiments and kernels/bench_step.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fp4jax.models import GPT, MLP, ViT


@pytest.mark.parametrize("recipe", [None, "mxfp4"])
def test_vit_shapes_and_quantized_layers(recipe, rng):
  model = ViT.from_name("vit_tiny", 10, recipe=recipe)
  x = jnp.asarray(rng.standard_normal((2, 32, 32, 3)).astype(np.float32))
  # jit: one compile per function (op by op, every quantizer primitive compiles alone).
  params = jax.jit(model.init)({"params": jax.random.key(0), "quant": jax.random.key(1)}, x)
  y = jax.jit(model.apply)(params, x, rngs={"quant": jax.random.key(2)})
  assert y.shape == (2, 10) and np.isfinite(np.asarray(y)).all()
  # same parameter tree with and without quantization (checkpoints load both ways)
  plain_model = ViT.from_name("vit_tiny", 10)
  plain = jax.jit(plain_model.init)(jax.random.key(0), x)
  assert jax.tree.structure(params) == jax.tree.structure(plain)
  if recipe is not None:  # the quantized model computes something else than the plain one
    assert not np.allclose(np.asarray(y), np.asarray(jax.jit(plain_model.apply)(params, x)))


@pytest.mark.parametrize("recipe", [None, "mxfp4"])
def test_scanned_layers_compute_the_same_model(recipe, rng):
  x = jnp.asarray(rng.standard_normal((2, 32, 32, 3)).astype(np.float32))
  loop = ViT.from_name("vit_tiny", 10, recipe=recipe)
  scan = ViT.from_name("vit_tiny", 10, recipe=recipe, scan_layers=True)
  p_loop = jax.jit(loop.init)({"params": jax.random.key(0), "quant": jax.random.key(1)}, x)
  p_scan = jax.jit(scan.init)({"params": jax.random.key(0), "quant": jax.random.key(1)}, x)
  blocks = p_scan["params"]["blocks"]
  assert jax.tree.leaves(blocks)[0].shape[0] == 4, "parameters stacked along depth"
  # the loop model's parameters, stacked, give the scanned model the same function
  stacked = jax.tree.map(lambda *l: jnp.stack(l), *[p_loop["params"][f"block{i}"]
                                                     for i in range(4)])
  params = {k: v for k, v in p_loop["params"].items() if not k.startswith("block")}
  params["blocks"] = stacked
  assert jax.tree.structure(stacked) == jax.tree.structure(blocks)
  # the forward pass rounds to nearest (stochastic rounding is for gradients), so the
  # quantization keys, split differently by the scan, do not change the output
  rngs = {"quant": jax.random.key(2)}
  np.testing.assert_allclose(np.asarray(jax.jit(scan.apply)({"params": params}, x, rngs=rngs)),
                             np.asarray(jax.jit(loop.apply)(p_loop, x, rngs=rngs)), rtol=1e-5,
                             atol=1e-5)


def test_vit_rejects_bad_sizes():
  with pytest.raises(ValueError, match="not a multiple of the patch size"):
    ViT.from_name("vit_tiny", 10).init(jax.random.key(0), jnp.zeros((1, 30, 30, 3)))
  with pytest.raises(ValueError, match="unknown ViT"):
    ViT.from_name("vit_huge", 10)


def test_gpt_is_causal_and_keeps_last_blocks_high_precision(rng):
  m = GPT.from_name("gpt_tiny", recipe="mxfp4", high_precision_last=1)
  tok = jnp.asarray(rng.integers(0, 256, (2, 32)), jnp.int32)
  params = jax.jit(m.init)({"params": jax.random.key(0), "quant": jax.random.key(1)},
                           tok)["params"]
  assert "kernel" in params["block3"]["fc1"] and m.depth == 4
  apply = jax.jit(m.apply)
  out = apply({"params": params}, tok, rngs={"quant": jax.random.key(2)})
  assert out.shape == (2, 32, 256)
  changed = tok.at[:, 20].set((tok[:, 20] + 1) % 256)  # a later byte must not change earlier logits
  out2 = apply({"params": params}, changed, rngs={"quant": jax.random.key(2)})
  np.testing.assert_array_equal(np.asarray(out[:, :20]), np.asarray(out2[:, :20]))


def test_gpt_and_mlp_bad_input():
  with pytest.raises(ValueError, match="unknown GPT 'gpt_xl'"):
    GPT.from_name("gpt_xl")
  m = GPT.from_name("gpt_tiny")
  with pytest.raises(ValueError, match="exceeds the model's context 64"):
    m.init(jax.random.key(0), jnp.zeros((1, 65), jnp.int32))
  mlp = MLP(10, recipe="mxfp4")
  with pytest.raises(ValueError, match="not a multiple of 32"):  # K = 40: no whole blocks
    mlp.init({"params": jax.random.key(0), "quant": jax.random.key(1)}, jnp.zeros((4, 40)))
