"""orbax-checkpoint save/restore of training state with fp4jax leaves.

Any pytree of arrays works: parameters (including :class:`~fp4jax.QArray` and
``ptq.RotatedQArray`` leaves, whose codes and scales are stored as their integer / float
arrays), optax states (including fp4jax's oscillation, Q-EMA, Q-Ramping and quantized
states), typed ``jax.random`` keys (stored as their key data and re-wrapped with the
target's PRNG implementation) and the step. Restoring needs a *target* of the same
structure (e.g. the freshly initialised state), which supplies shapes, dtypes and the
static parts of QArrays (spec, axis, padding).

Resume is bit-exact: restore then continue equals an uninterrupted run (tested).

>>> ckpt = fp4jax.checkpoint.Checkpointer("/tmp/run", max_to_keep=3)
>>> ckpt.save(step, {"params": params, "opt_state": opt_state, "key": key})
>>> state = ckpt.restore({"params": params, "opt_state": opt_state, "key": key})
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _is_key(x) -> bool:
  return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _encode(tree: Any) -> Any:
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _decode(tree: Any, target: Any) -> Any:
  def dec(x, t):
    if _is_key(t):
      return jax.random.wrap_key_data(jnp.asarray(x), impl=jax.random.key_impl(t))
    return x
  return jax.tree.map(dec, tree, target)


def _abstract(target: Any) -> Any:
  def ab(x):
    x = jax.random.key_data(x) if _is_key(x) else x
    if isinstance(x, (jax.Array, np.ndarray, np.generic)):
      sharding = getattr(x, "sharding", None)
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    return x
  return jax.tree.map(ab, target)


class Checkpointer:
  """Numbered checkpoints in ``directory`` (an ``orbax.checkpoint.CheckpointManager``).

  Args:
    directory: where checkpoints live (created if needed; made absolute).
    max_to_keep: keep the newest ``max_to_keep`` steps (None: all).
  """

  def __init__(self, directory: str | os.PathLike, max_to_keep: int | None = 3):
    import orbax.checkpoint as ocp
    self._ocp = ocp
    self.directory = os.path.abspath(os.fspath(directory))
    os.makedirs(self.directory, exist_ok=True)
    self._mngr = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                                             create=True))

  def save(self, step: int, state: Any, *, wait: bool = True) -> None:
    """Writes ``state`` as checkpoint ``step`` (blocks until written unless ``wait=False``)."""
    self._mngr.save(int(step), args=self._ocp.args.StandardSave(_encode(state)))
    if wait:
      self._mngr.wait_until_finished()

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def restore(self, target: Any, step: int | None = None) -> Any:
    """Checkpoint ``step`` (default: the latest) restored into ``target``'s structure;
    ``target=None`` gives the tree as stored (plain arrays; keys as their key data, QArrays
    as their leaves), e.g. to read only the parameters of a training state."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    if target is None:
      return self._mngr.restore(int(step), args=self._ocp.args.StandardRestore())
    restored = self._mngr.restore(int(step),
                                  args=self._ocp.args.StandardRestore(_abstract(target)))
    return _decode(restored, target)

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def save(directory: str | os.PathLike, step: int, state: Any, max_to_keep: int | None = 3):
  """One-shot :meth:`Checkpointer.save`."""
  with Checkpointer(directory, max_to_keep) as c:
    c.save(step, state)


def restore(directory: str | os.PathLike, target: Any, step: int | None = None) -> Any:
  """One-shot :meth:`Checkpointer.restore`."""
  with Checkpointer(directory, None) as c:
    return c.restore(target, step)


def latest_step(directory: str | os.PathLike) -> int | None:
  """The newest checkpoint step in ``directory``, or None."""
  if not os.path.isdir(directory):
    return None
  with Checkpointer(directory, None) as c:
    return c.latest_step()


__all__ = ["Checkpointer", "latest_step", "restore", "save"]
