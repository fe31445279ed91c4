"""fp4jax.checkpoint: orbax round trips with QArray leaves, keys, optax states; exact resume."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fp4jax
import fp4jax.linen as qnn
from fp4jax import checkpoint, optim, ptq


def _leaves_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.atleast_1d(np.asarray(x)).view(np.uint8),
                                  np.atleast_1d(np.asarray(y)).view(np.uint8))


def test_round_trip_of_quantized_and_optimizer_leaves(tmp_path, rng):
  params = {"kernel": jnp.asarray(rng.standard_normal((64, 32)).astype(np.float32)),
            "bias": jnp.zeros(32, jnp.bfloat16)}
  tx = optax.chain(optim.quantize_state(optax.adam(1e-2)), optim.q_ema(),
                   optim.track_oscillation())
  state = {"params": params, "opt": tx.init(params), "key": jax.random.key(5),
           "step": jnp.int32(3),
           "ptq": ptq.quantize_params({"a": {"kernel": params["kernel"]}}, "nvfp4", "rtn")}
  checkpoint.save(tmp_path / "run", 3, state)
  assert checkpoint.latest_step(tmp_path / "run") == 3
  back = checkpoint.restore(tmp_path / "run", state)
  assert jax.tree.structure(back) == jax.tree.structure(state)
  assert isinstance(back["ptq"]["a"]["kernel"], fp4jax.QArray)
  _leaves_equal(state, back)
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    checkpoint.restore(tmp_path / "empty", state)


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(qnn.QDense(64, recipe="tetrajet")(x))
    return qnn.QDense(32, recipe="tetrajet")(x)


def test_resume_is_bit_exact(tmp_path, rng):
  """Stochastic rounding (quant stream), Q-EMA, oscillation tracking and FP8 optimizer
  state: 6 steps straight equal 3 steps, checkpoint, restore in a fresh manager, 3 more."""
  x = jnp.asarray(rng.standard_normal((32, 32)).astype(np.float32))
  y = jnp.asarray(rng.standard_normal((32, 32)).astype(np.float32))
  m = Net()
  params = m.init(jax.random.key(0), x)["params"]
  tx = optax.chain(optim.quantize_state(optax.adamw(1e-2)), optim.q_ema(),
                   optim.track_oscillation())

  @jax.jit
  def step(state):
    key, sub = jax.random.split(state["key"])
    ref = optim.q_ema_reference(state["opt"], state["params"])
    loss = lambda p: jnp.mean((m.apply({"params": p, "q_ema": ref}, x,
                                       rngs={"quant": sub}) - y) ** 2)
    g = jax.grad(loss)(state["params"])
    u, opt = tx.update(g, state["opt"], state["params"])
    return {"params": optax.apply_updates(state["params"], u), "opt": opt, "key": key,
            "step": state["step"] + 1}

  init = {"params": params, "opt": tx.init(params), "key": jax.random.key(42),
          "step": jnp.int32(0)}
  straight = init
  for _ in range(6):
    straight = step(straight)
  part = init
  for _ in range(3):
    part = step(part)
  with checkpoint.Checkpointer(tmp_path / "ckpt", max_to_keep=2) as c:
    c.save(int(part["step"]), part)
  with checkpoint.Checkpointer(tmp_path / "ckpt") as c:
    resumed = c.restore(init)  # the target only supplies structure and dtypes
  assert int(resumed["step"]) == 3
  for _ in range(3):
    resumed = step(resumed)
  _leaves_equal(straight, resumed)


def test_background_saves_are_complete_after_close(tmp_path, rng):
  # The training loop saves with wait=False between its last and stop steps: every step
  # written that way restores exactly once the checkpointer is closed.
  states = [{"w": jnp.asarray(rng.standard_normal((64, 64)).astype(np.float32)),
             "step": jnp.asarray(i, jnp.int32)} for i in range(3)]
  c = checkpoint.Checkpointer(tmp_path / "ck", max_to_keep=None)
  for i, s in enumerate(states):
    c.save(i + 1, s, wait=False)
  c.close()
  c = checkpoint.Checkpointer(tmp_path / "ck", max_to_keep=None)
  assert c.all_steps() == [1, 2, 3]
  for i, s in enumerate(states):
    got = c.restore(s, step=i + 1)
    np.testing.assert_array_equal(np.asarray(got["w"]), np.asarray(s["w"]))
    assert int(got["step"]) == i
  c.close()
