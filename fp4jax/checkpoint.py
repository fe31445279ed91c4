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

Nothing fails silently or hangs (orbax alone skips some saves without a word, casts
dtypes on restore, and can leave a thread that blocks the interpreter's exit):

- saving a step that exists, or one older than the latest, raises ``ValueError``
  (``force=True`` overwrites / writes it);
- a leaf that is not an array, a Python ``int`` / ``float`` / ``bool`` or a PRNG key
  raises ``TypeError`` naming its path before anything is written, and a failed save
  leaves no background work behind (the process still exits);
- restoring into a target whose leaf shapes, dtypes or structure differ from the stored
  ones raises ``ValueError`` naming the leaves (instead of casting);
- a missing step or an empty directory raises ``FileNotFoundError`` listing what exists;
  unreadable (truncated, corrupt) files raise ``ValueError`` naming the step and the other
  steps to fall back on; a corrupt ``_CHECKPOINT_METADATA`` (which orbax only logs; the
  arrays still restore) gives a ``UserWarning`` naming the file;
- a directory that is a file raises ``NotADirectoryError``; saving into one this process
  cannot write raises ``PermissionError`` (restoring from it works).
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# orbax writes step N to <directory>/N/ (its default step naming, which the manager here
# keeps); this JSON file there holds the step's save time and custom metadata.
_STEP_METADATA = "_CHECKPOINT_METADATA"
# Leaves a message names before "and N more" (a whole optimizer state can mismatch).
_MAX_NAMED = 8
# Leaf types a checkpoint holds (PRNG keys are jax.Arrays, stored as their key data).
_SAVABLE = (jax.Array, np.ndarray, np.number, np.bool_, bool, int, float)


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


# ------------------------------------------------------------------ message helpers

def _named(items: list[str]) -> str:
  """The first few of ``items``, one a line, then how many more."""
  lines = [f"  {s}" for s in items[:_MAX_NAMED]]
  if len(items) > _MAX_NAMED:
    lines.append(f"  ... and {len(items) - _MAX_NAMED} more")
  return "\n".join(lines)


def _first_line(err: BaseException, limit: int = 300) -> str:
  # tensorstore errors append a page-long JSON spec; the chained exception keeps it all.
  text = str(err).strip()
  text = text.splitlines()[0] if text else ""
  return text if len(text) <= limit else text[:limit] + "..."


def _orbax_key(path) -> tuple[str, ...]:
  """orbax's name for a leaf path (as ``orbax.checkpoint.tree.to_flat_dict`` spells it),
  which matches a target leaf with its stored metadata whatever the node types."""
  names = []
  for k in path:
    if isinstance(k, jax.tree_util.SequenceKey):
      names.append(str(k.idx))
    elif isinstance(k, jax.tree_util.DictKey):
      names.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      names.append(k.name)
    elif isinstance(k, jax.tree_util.FlattenedIndexKey):
      names.append(str(k.key))
    else:
      names.append(str(k))
  return tuple(names)


def _json_error(path: str) -> str | None:
  """Why the JSON file at ``path`` does not parse, or None (also when it is absent)."""
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      json.load(f)
  except (ValueError, OSError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
    return str(err)
  return None


# ------------------------------------------------------------------ checks

def _make_directory(directory: str) -> None:
  """Creates ``directory`` (and its parents). os.makedirs's own errors name neither the
  cause (FileExistsError for a file in the way) nor the fix."""
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise NotADirectoryError(
        f"checkpoint directory {directory} is a file; Checkpointer needs a directory: "
        "pass a directory path (it is created if missing), or move the file away")
  parent = directory
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise NotADirectoryError(f"cannot create checkpoint directory {directory}: {parent} "
                             "is a file, not a directory")
  try:
    os.makedirs(directory, exist_ok=True)
  except PermissionError as err:
    raise PermissionError(f"cannot create checkpoint directory {directory}: no permission "
                          f"to write in {parent}; choose a writable location") from err


def _check_savable(state: Any) -> None:
  """Raises (before orbax sees ``state``) unless every leaf is something a checkpoint can
  hold: orbax raises later, from inside a save it has already started."""
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  if not leaves:
    raise ValueError("the state to save has no leaves (an empty tree); a checkpoint needs "
                     "at least one array")
  if len(leaves) == 1 and not leaves[0][0]:
    raise TypeError(f"the state to save must be a pytree (dict, list, dataclass, ...) of "
                    f"arrays, not a single {type(state).__name__}: wrap it, e.g. {{'x': x}}")
  bad = []
  for path, x in leaves:
    # Arrays of strings or objects pass isinstance but tensorstore cannot store them.
    if isinstance(x, np.ndarray) and x.dtype.kind in "OUS":
      bad.append(f"{jax.tree_util.keystr(path)}: numpy array of dtype {x.dtype}")
    elif not isinstance(x, _SAVABLE):
      bad.append(f"{jax.tree_util.keystr(path)}: {type(x).__module__}.{type(x).__qualname__}")
  if bad:
    raise TypeError(
        "cannot save these leaves:\n" + _named(bad) + "\na checkpoint holds jax / numpy "
        "arrays, Python int / float / bool and jax.random keys; convert the others "
        "(e.g. jnp.asarray) or keep them out of the state (e.g. strings in a config file)")


def _check_target(where: str, abstract: Any, stored: dict[tuple[str, ...], Any]) -> None:
  """Raises unless ``abstract`` (the target's leaves as ShapeDtypeStructs) has the stored
  leaves with their shapes and dtypes: orbax would cast a different dtype silently."""
  problems, seen = [], set()
  for path, t in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    key, name = _orbax_key(path), jax.tree_util.keystr(path)
    seen.add(key)
    if key not in stored:
      problems.append(f"{name}: in the target, not in the checkpoint")
      continue
    s = stored[key]
    if not (hasattr(t, "shape") and hasattr(t, "dtype")):
      continue  # a Python scalar in the target takes the stored value as it is
    s_shape, s_dtype = getattr(s, "shape", None), getattr(s, "dtype", None)
    if s_shape is not None and tuple(s_shape) != tuple(t.shape):
      problems.append(f"{name}: stored shape {tuple(s_shape)}, target shape {tuple(t.shape)}")
    # A stored Python int / float / bool (ScalarMetadata) has no array dtype to keep.
    elif (s_dtype is not None and type(s).__name__ != "ScalarMetadata"
          and np.dtype(s_dtype) != np.dtype(t.dtype)):
      problems.append(f"{name}: stored dtype {np.dtype(s_dtype)}, target dtype "
                      f"{np.dtype(t.dtype)} (orbax would cast it silently)")
  problems += [f"stored leaf {'/'.join(k)!r}: in the checkpoint, not in the target"
               for k in stored if k not in seen]
  if problems:
    raise ValueError(
        f"checkpoint {where} does not match the restore target:\n" + _named(problems) +
        "\npass a target with the stored structure, shapes and dtypes (e.g. the freshly "
        "initialised state of the same configuration), or target=None for the tree as "
        "stored")


def _async_options(ocp):
  # orbax creates a step's directory in a background thread by default; when the save
  # then fails (e.g. on an unsupported leaf), nothing joins that thread and the interpreter
  # can hang at exit waiting for it. Creating directories synchronously costs a few mkdirs.
  try:
    return ocp.AsyncOptions(create_directories_asynchronously=False)
  except TypeError:  # an orbax without the option
    return None


class Checkpointer:
  """Numbered checkpoints in ``directory`` (an ``orbax.checkpoint.CheckpointManager``).

  Args:
    directory: where checkpoints live (created if needed; made absolute).
      ``NotADirectoryError`` if it is a file; ``PermissionError`` if it cannot be created.
    max_to_keep: keep the newest ``max_to_keep`` steps (None: all).
  """

  def __init__(self, directory: str | os.PathLike, max_to_keep: int | None = 3):
    import orbax.checkpoint as ocp
    self._ocp = ocp
    self.directory = os.path.abspath(os.fspath(directory))
    _make_directory(self.directory)
    # The handler given up front lets item_metadata read a step this manager did not write.
    self._mngr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             async_options=_async_options(ocp)),
        item_handlers=ocp.StandardCheckpointHandler())

  def save(self, step: int, state: Any, *, wait: bool = True, force: bool = False) -> None:
    """Writes ``state`` as checkpoint ``step`` (blocks until written unless ``wait=False``).

    Raises:
      TypeError: a leaf is not a jax / numpy array, Python int / float / bool or PRNG key
        (the message names its path and type), or ``state`` is a bare leaf. Nothing is
        written.
      ValueError: ``step`` exists already, or is older than the latest step (orbax would
        skip it silently). ``force=True`` overwrites the existing step (deletes it, then
        saves) or writes the older one (the latest step stays the latest).
      PermissionError: this process cannot write to the directory.

    Whatever fails, no background work is left pending, so the process can still exit.
    """
    step = int(step)
    _check_savable(state)
    self._check_writable()
    self._mngr.wait_until_finished()  # a step still being written counts as existing
    self._check_new_step(step, force)
    try:
      if step in self._mngr.all_steps():  # force=True (checked above)
        self._mngr.delete(step)
      # force: our checks replace orbax's should_save, which skips a step without a word.
      saved = self._mngr.save(step, args=self._ocp.args.StandardSave(_encode(state)),
                              force=True)
      if wait:
        self._mngr.wait_until_finished()
    except BaseException:
      self._drain()
      raise
    if not saved:
      raise RuntimeError(f"orbax did not save step {step} in {self.directory}")

  def latest_step(self) -> int | None:
    """The highest step, or None when there is none (orbax's own latest_step is the one
    saved last, which differs after ``save(older_step, force=True)``)."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def all_steps(self) -> list[int]:
    """The saved steps, in increasing order."""
    return sorted(self._mngr.all_steps())

  def restore(self, target: Any, step: int | None = None) -> Any:
    """Checkpoint ``step`` (default: the latest) restored into ``target``'s structure;
    ``target=None`` gives the tree as stored (plain arrays; keys as their key data, QArrays
    as their leaves), e.g. to read only the parameters of a training state.

    Raises:
      FileNotFoundError: the directory has no checkpoint, or no step ``step`` (the message
        lists the steps it has).
      ValueError: a target leaf's shape or dtype differs from the stored one, or a leaf is
        in only one of them (each named by its path; orbax would cast dtypes silently); or
        the step's files cannot be read (truncated or corrupt: the message names the step's
        path and the other steps to restore instead).

    Warns (``UserWarning``) when the step's ``_CHECKPOINT_METADATA`` is not valid JSON:
    orbax only logs that, and the arrays, stored elsewhere, still restore.
    """
    self._mngr.wait_until_finished()  # a step being written in the background is readable
    step = self._existing_step(step)
    metadata_error = _json_error(os.path.join(self._step_path(step), _STEP_METADATA))
    if target is None:
      restored = self._read(step, lambda: self._mngr.restore(
          step, args=self._ocp.args.StandardRestore()))
    else:
      abstract = _abstract(target)
      stored = self._read(step, lambda: self._stored_leaves(step))
      if stored is not None:  # None: this orbax gave no metadata; it checks shapes itself
        _check_target(f"step {step} in {self.directory}", abstract, stored)
      restored = _decode(self._read(step, lambda: self._mngr.restore(
          step, args=self._ocp.args.StandardRestore(abstract))), target)
    if metadata_error is not None:
      warnings.warn(
          f"{os.path.join(self._step_path(step), _STEP_METADATA)} is not valid JSON "
          f"({metadata_error}): step {step}'s arrays restored, but its metadata (save time, "
          "custom metadata) is lost; save the state again with force=True to rewrite it",
          stacklevel=2)
    return restored

  def wait(self) -> None:
    """Blocks until background saves are written (raises their errors)."""
    self._mngr.wait_until_finished()

  def close(self) -> None:
    """Waits for background saves, then releases the manager."""
    self._mngr.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  # ---------------------------------------------------------------- internals

  def _step_path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _check_writable(self) -> None:
    # orbax would fail deep inside tensorstore, after starting its background work.
    if not os.access(self.directory, os.W_OK | os.X_OK):
      raise PermissionError(
          f"cannot save checkpoints in {self.directory}: this process may not write to it "
          "(check its permissions and owner, or choose another directory)")

  def _check_new_step(self, step: int, force: bool) -> None:
    steps = self.all_steps()
    if force or not steps:
      return
    if step in steps:
      raise ValueError(f"checkpoint step {step} already exists in {self.directory}; "
                       "pass force=True to overwrite it")
    if step < steps[-1]:
      raise ValueError(
          f"step {step} is older than the latest checkpoint step {steps[-1]} in "
          f"{self.directory} (orbax would skip it silently); pass force=True to write it "
          f"anyway (step {steps[-1]} stays the latest), or save to a fresh directory")

  def _drain(self) -> None:
    # After a failed save: finish (or fail) whatever orbax started, so no background work
    # outlives the error. Its own error, if any, is secondary to the one propagating.
    try:
      self._mngr.wait_until_finished()
    except Exception:  # pylint: disable=broad-except
      pass

  def _existing_step(self, step: int | None) -> int:
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}: it has no saved steps")
    if step is None:
      return steps[-1]
    if int(step) not in steps:
      raise FileNotFoundError(f"no checkpoint step {step} in {self.directory}; its steps "
                              f"are {steps}")
    return int(step)

  def _stored_leaves(self, step: int) -> dict[tuple[str, ...], Any] | None:
    """The stored leaves' metadata (shape, dtype) by orbax key, or None if not given."""
    md = self._mngr.item_metadata(step)
    tree = getattr(md, "tree", md)  # TreeMetadata in newer orbax, the plain tree in older
    if tree is None:
      return None
    return {_orbax_key(p): m for p, m in jax.tree_util.tree_flatten_with_path(tree)[0]}

  def _read(self, step: int, fn):
    """``fn()``, its read errors (truncated JSON, tensorstore OUT_OF_RANGE / DATA_LOSS, ...)
    turned into one that names the step and the steps to fall back on."""
    try:
      return fn()
    except (ValueError, OSError) as err:
      others = [s for s in self.all_steps() if s != step]
      earlier = [s for s in others if s < step]
      if earlier:
        advice = (f"restore an earlier step instead, e.g. step={earlier[-1]} (available: "
                  f"{others})")
      elif others:
        advice = f"the other steps are {others}"
      else:
        advice = "there is no other step to restore"
      raise ValueError(
          f"cannot read checkpoint step {step} at {self._step_path(step)} "
          f"({type(err).__name__}: {_first_line(err)}); its files look truncated or corrupt "
          f"(e.g. an interrupted save or copy): {advice}") from err


def save(directory: str | os.PathLike, step: int, state: Any, max_to_keep: int | None = 3,
         *, force: bool = False) -> None:
  """One-shot :meth:`Checkpointer.save` (same errors; ``force`` overwrites / writes an
  older step)."""
  with Checkpointer(directory, max_to_keep) as c:
    c.save(step, state, force=force)


def restore(directory: str | os.PathLike, target: Any, step: int | None = None) -> Any:
  """One-shot :meth:`Checkpointer.restore` (same errors; a missing ``directory`` raises
  ``FileNotFoundError`` and is not created)."""
  if not os.path.exists(directory):
    raise FileNotFoundError(f"no checkpoint in {os.path.abspath(os.fspath(directory))}: "
                            "the directory does not exist")
  with Checkpointer(directory, None) as c:
    return c.restore(target, step)


def latest_step(directory: str | os.PathLike) -> int | None:
  """The newest checkpoint step in ``directory``, or None (also when it does not exist;
  ``NotADirectoryError`` if it is a file)."""
  if not os.path.exists(directory):
    return None
  with Checkpointer(directory, None) as c:
    return c.latest_step()


__all__ = ["Checkpointer", "latest_step", "restore", "save"]
