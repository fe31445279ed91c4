"""fp4jax.checkpoint: orbax round trips with QArray leaves, keys, optax states; exact resume."""

import os
import subprocess
import sys

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


# --------------------------------------------------------------------- errors are loud

def _tiny(v=0.0):
  return {"w": jnp.full(4, v, jnp.float32), "n": jnp.int32(1)}


def test_saving_an_existing_or_an_older_step_raises_unless_forced(tmp_path):
  d = tmp_path / "ck"
  with checkpoint.Checkpointer(d, max_to_keep=None) as c:
    c.save(1, _tiny(1.0))
    with pytest.raises(ValueError, match=r"step 1 already exists.*force=True"):
      c.save(1, _tiny(2.0))
    np.testing.assert_array_equal(c.restore(_tiny())["w"], 1.0)  # the first state stays
    c.save(1, _tiny(2.0), force=True)
    np.testing.assert_array_equal(c.restore(_tiny())["w"], 2.0)
    c.save(5, _tiny(5.0))
    with pytest.raises(ValueError, match=r"step 3 is older than the latest .* step 5.*force"):
      c.save(3, _tiny(3.0))
    c.save(3, _tiny(3.0), force=True)
    assert c.all_steps() == [1, 3, 5] and c.latest_step() == 5
    np.testing.assert_array_equal(c.restore(_tiny(), step=3)["w"], 3.0)
  with pytest.raises(ValueError, match="already exists"):
    checkpoint.save(d, 5, _tiny(6.0))
  checkpoint.save(d, 5, _tiny(6.0), force=True, max_to_keep=None)
  np.testing.assert_array_equal(checkpoint.restore(d, _tiny())["w"], 6.0)


def test_restoring_into_another_dtype_shape_or_structure_raises(tmp_path):
  d = tmp_path / "ck"
  checkpoint.save(d, 1, _tiny())
  target = {"w": jnp.zeros(4, jnp.int8), "n": jnp.int32(0)}
  with pytest.raises(ValueError,
                     match=r"\['w'\]: stored dtype float32, target dtype int8 \(orbax would cast"):
    checkpoint.restore(d, target)
  with pytest.raises(ValueError, match=r"\['w'\]: stored shape \(4,\), target shape \(5,\)"):
    checkpoint.restore(d, {"w": jnp.zeros(5, jnp.float32), "n": jnp.int32(0)})
  with pytest.raises(ValueError, match=r"\['z'\]: in the target, not in the checkpoint"):
    checkpoint.restore(d, {**_tiny(), "z": jnp.zeros(2)})
  with pytest.raises(ValueError, match=r"stored leaf 'n': in the checkpoint, not in the target"):
    checkpoint.restore(d, {"w": jnp.zeros(4, jnp.float32)})


def test_corrupt_step_metadata_file_restores_with_a_warning(tmp_path):
  d = tmp_path / "ck"
  checkpoint.save(d, 1, _tiny(1.0))
  path = d / "1" / "_CHECKPOINT_METADATA"
  assert path.exists()
  path.write_text("{not json")
  with pytest.warns(UserWarning, match=f"{path}.* not valid JSON"):
    got = checkpoint.restore(d, _tiny())
  np.testing.assert_array_equal(got["w"], 1.0)


def test_an_unsavable_leaf_raises_and_the_process_still_exits(tmp_path):
  # One subprocess: the validated TypeError, then (validation bypassed) orbax's own error
  # from inside its save; after both it must exit (orbax used to leave a thread behind that
  # blocked the interpreter's exit).
  code = (
      "import sys\n"
      "import jax.numpy as jnp\n"
      "from fp4jax import checkpoint\n"
      "c = checkpoint.Checkpointer(sys.argv[1])\n"
      "state = {'w': jnp.ones(2), 'name': 'run-1'}\n"
      "try:\n"
      "  c.save(1, state)\n"
      "except TypeError as e:\n"
      "  print('TypeError:', e)\n"
      "checkpoint._check_savable = lambda s: None\n"
      "try:\n"
      "  c.save(1, state)\n"
      "except Exception as e:\n"
      "  print('orbax:', type(e).__name__)\n"
      "print('steps:', c.all_steps())\n")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
  p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ck")], env=env,
                     capture_output=True, text=True, timeout=60)
  assert p.returncode == 0, p.stderr[-3000:]
  assert "TypeError: cannot save these leaves:\n  ['name']: builtins.str" in p.stdout
  assert "jax / numpy arrays, Python int / float / bool and jax.random keys" in p.stdout
  assert "orbax: ValueError" in p.stdout and "steps: []" in p.stdout


def test_a_missing_step_or_an_empty_directory_says_what_exists(tmp_path):
  d = tmp_path / "ck"
  checkpoint.save(d, 1, _tiny())
  with pytest.raises(FileNotFoundError,
                     match=r"no checkpoint step 7 in .*ck; its steps are \[1\]"):
    checkpoint.restore(d, _tiny(), step=7)
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError,
                     match=r"no checkpoint in .*empty: it has no saved steps"):
    checkpoint.restore(tmp_path / "empty", _tiny())
  with pytest.raises(FileNotFoundError, match="does not exist"):
    checkpoint.restore(tmp_path / "absent", _tiny())
  assert not (tmp_path / "absent").exists()  # restoring creates nothing


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


@pytest.mark.parametrize("which", ["metadata", "arrays"])
def test_truncated_files_name_the_step_and_the_step_to_restore_instead(tmp_path, which):
  d = tmp_path / "ck"
  with checkpoint.Checkpointer(d, max_to_keep=None) as c:
    c.save(1, _tiny(1.0))
    c.save(2, _tiny(2.0))
  hit = []
  for root, _, files in os.walk(d / "2"):
    for f in files:
      # "_METADATA": the tree's JSON metadata; files under "d/": the array data (tensorstore).
      if (which == "metadata" and f == "_METADATA") or \
         (which == "arrays" and os.path.basename(root) == "d"):
        _truncate(os.path.join(root, f))
        hit.append(f)
  assert hit
  with pytest.raises(ValueError, match=r"cannot read checkpoint step 2 at .*ck/2 .*truncated "
                                       r"or corrupt.*step=1") as info:
    checkpoint.restore(d, _tiny())
  assert info.value.__cause__ is not None  # the raw orbax / tensorstore error is chained
  np.testing.assert_array_equal(checkpoint.restore(d, _tiny(), step=1)["w"], 1.0)


def test_a_file_or_an_unwritable_directory_is_named(tmp_path, monkeypatch):
  f = tmp_path / "file"
  f.write_text("")
  with pytest.raises(NotADirectoryError,
                     match=f"{f} is a file; Checkpointer needs a directory"):
    checkpoint.Checkpointer(f)
  d = tmp_path / "ro"
  checkpoint.save(d, 1, _tiny(1.0))
  os.chmod(d, 0o500)
  try:
    if os.geteuid() == 0:  # root writes anyway: let the check see what another user would
      real = os.access
      monkeypatch.setattr(os, "access", lambda p, mode, **kw:
                          False if os.fspath(p) == str(d) else real(p, mode, **kw))
    with checkpoint.Checkpointer(d) as c:
      with pytest.raises(PermissionError, match=f"cannot save checkpoints in {d}"):
        c.save(2, _tiny())
      np.testing.assert_array_equal(c.restore(_tiny())["w"], 1.0)  # reading still works
  finally:
    os.chmod(d, 0o700)
