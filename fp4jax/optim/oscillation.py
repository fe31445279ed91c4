"""Weight-oscillation metrics (TetraJet, Chen et al. 2025, arXiv 2502.20853, Sec. 3).

In low-precision training a latent weight near a rounding boundary makes its quantized
value flip between the two neighbouring grid points, back and forth, without the latent
weight moving much: an *oscillation*. These pure functions measure it, and
:func:`track_oscillation` is an optax transform (identity on the updates) that keeps the
counters in its state so an experiment can log them:

* flip rate: fraction of a layer's weights whose quantized value changed this step;
* oscillating fraction: fraction of weights whose quantized value changed direction
  (up then down, or down then up) at least ``min_reversals`` times in the current window
  of ``window`` steps;
* rounding-boundary distance: ``|w/s - midpoint| / spacing`` in [0, 0.5] (0 = about to
  flip), from :func:`fp4jax.reference_rounding.boundary_distance`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fp4jax.optim.weights import as_weight_spec_fn, path_str, quantized_weights
from fp4jax.reference_rounding import boundary_distance


def flip_rate(previous: jax.Array, current: jax.Array) -> jax.Array:
  """Fraction of elements whose quantized value differs between two steps."""
  return jnp.mean((previous != current).astype(jnp.float32))


def flip_direction(previous: jax.Array, current: jax.Array) -> jax.Array:
  """int8 per element: +1 quantized value went up, -1 down, 0 unchanged."""
  return jnp.sign(current - previous).astype(jnp.int8)


def mean_boundary_distance(params: Any, weights: Any = "mxfp4") -> dict[str, jax.Array]:
  """Per weight leaf, the mean distance of its elements to their rounding boundary."""
  fn = as_weight_spec_fn(weights)
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    sa = fn(path, leaf)
    if sa is not None:
      out[path_str(path)] = jnp.mean(boundary_distance(jnp.asarray(leaf, jnp.float32), *sa))
  return out


class OscillationState(NamedTuple):
  """Counters per weight leaf (None for other leaves)."""

  step: jax.Array               # int32, steps seen
  quantized: Any                # last quantized weights (float32)
  last_direction: Any           # int8, direction of each element's last change
  flips: Any                    # int32, changes in the current window
  reversals: Any                # int32, direction reversals in the current window
  last_flip_rate: Any           # float32 scalar per leaf: this step's flip rate
  window_oscillating: Any       # float32 scalar per leaf: fraction oscillating, last window


class _Leaf(NamedTuple):
  last_direction: jax.Array
  flips: jax.Array
  reversals: jax.Array
  rate: jax.Array


def _leaf_update(prev_q, last_dir, flips, revs, q, reset):
  d = flip_direction(prev_q, q)
  changed = d != 0
  reversal = changed & (last_dir != 0) & (d != last_dir)
  flips = jnp.where(reset, 0, flips) + changed.astype(jnp.int32)
  revs = jnp.where(reset, 0, revs) + reversal.astype(jnp.int32)
  last_dir = jnp.where(changed, d, last_dir)
  return _Leaf(last_dir, flips, revs, flip_rate(prev_q, q))


def track_oscillation(weights: Any = "mxfp4", window: int = 100,
                      min_reversals: int = 2) -> optax.GradientTransformation:
  """Optax transform that leaves updates unchanged and counts weight oscillations.

  Place it last in an ``optax.chain`` so that it sees the weights after this step's
  update (``params + updates``). Read the counters with :func:`oscillation_metrics`.

  Args:
    weights: a spec/preset for the ``kernel`` leaves, or a weight spec function
      (:mod:`fp4jax.optim.weights`).
    window: steps per counting window.
    min_reversals: direction reversals within a window that make a weight oscillating.
  """
  fn = as_weight_spec_fn(weights)
  if window < 1 or min_reversals < 1:
    raise ValueError(f"window and min_reversals must be >= 1, got {window}, {min_reversals}")

  def init(params):
    q = quantized_weights(params, fn)
    like = lambda dt: jax.tree.map(lambda a: jnp.zeros(a.shape, dt), q)
    scal = jax.tree.map(lambda a: jnp.zeros((), jnp.float32), q)
    return OscillationState(jnp.zeros((), jnp.int32), q, like(jnp.int8), like(jnp.int32),
                            like(jnp.int32), scal, scal)

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("track_oscillation needs params: call tx.update(grads, state, params)")
    q = quantized_weights(optax.apply_updates(params, updates), fn)
    reset = (state.step % window) == 0
    # Fraction oscillating over the window that just ended (before the reset).
    ended = jax.tree.map(
        lambda r, w: jnp.where(reset & (state.step > 0),
                               jnp.mean((r >= min_reversals).astype(jnp.float32)), w),
        state.reversals, state.window_oscillating)
    leaves = jax.tree.map(lambda pq, ld, f, r, qq: _leaf_update(pq, ld, f, r, qq, reset),
                          state.quantized, state.last_direction, state.flips,
                          state.reversals, q)
    pick = lambda i: jax.tree.map(lambda t: t[i], leaves,
                                  is_leaf=lambda t: isinstance(t, _Leaf))
    return updates, OscillationState(state.step + 1, q, pick(0), pick(1), pick(2), pick(3),
                                     ended)

  return optax.GradientTransformation(init, update)


def find_state(opt_state: Any, kind: type) -> Any:
  """The first state of type ``kind`` inside a (chained, wrapped) optax state."""
  if isinstance(opt_state, kind):
    return opt_state
  if isinstance(opt_state, (tuple, list)):
    for s in opt_state:
      found = find_state(s, kind)
      if found is not None:
        return found
  if hasattr(opt_state, "inner_state"):
    return find_state(opt_state.inner_state, kind)
  return None


def oscillation_metrics(opt_state: Any, min_reversals: int = 2) -> dict[str, jax.Array]:
  """Scalar metrics per weight leaf from the :class:`OscillationState` found in
  ``opt_state``: ``flip_rate/<path>`` (last step), ``oscillating/<path>`` (current window
  so far), ``oscillating_last_window/<path>``, and ``flip_rate`` / ``oscillating``
  averaged over all weights (weighted by size)."""
  st = find_state(opt_state, OscillationState)
  if st is None:
    raise ValueError("no track_oscillation state in opt_state: add "
                     "fp4jax.optim.track_oscillation(...) to the optax chain")
  out, n_tot, f_tot, o_tot = {}, 0, 0.0, 0.0
  flat = jax.tree_util.tree_flatten_with_path(st.reversals)[0]
  rates = jax.tree.leaves(st.last_flip_rate)
  lastw = jax.tree.leaves(st.window_oscillating)
  for (path, revs), rate, lw in zip(flat, rates, lastw):
    p = path_str(path)
    osc = jnp.mean((revs >= min_reversals).astype(jnp.float32))
    out[f"flip_rate/{p}"] = rate
    out[f"oscillating/{p}"] = osc
    out[f"oscillating_last_window/{p}"] = lw
    n_tot += revs.size
    f_tot = f_tot + rate * revs.size
    o_tot = o_tot + osc * revs.size
  if n_tot:
    out["flip_rate"] = f_tot / n_tot
    out["oscillating"] = o_tot / n_tot
  return out
