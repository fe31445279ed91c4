"""Q-Ramping (TetraJet, Chen et al. 2025, arXiv 2502.20853, Sec. 4.3) as an optax wrapper.

Oscillating weights get a longer update interval: each weight element has a ramp factor
``r`` in {1, 2, 4, ..., max_factor}; its updates from the inner optimizer accumulate and
are applied every ``r`` steps as their sum, i.e. ``r`` times the batch size and ``r``
times the learning rate for that element, while the others update every step.

Detection (per element, over windows of ``window`` steps): the quantized weight (forward
spec) is compared after every applied update; an element whose quantized value changed
at least ``threshold`` times in the window is oscillating and its factor doubles (up to
``max_factor``); an element that did not change at all in the window halves its factor
(down to 1). fp4jax's doubling/halving schedule is its own reading of the paper's
"adaptively ramp up the accumulation of oscillating weights"; the paper's exact schedule
is not published as code.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fp4jax.optim.weights import as_weight_spec_fn, quantized_weights


class QRampingState(NamedTuple):
  step: jax.Array     # int32
  accumulated: Any    # float32 per weight leaf: updates not yet applied
  since: Any          # int32 per element: steps since the last applied update
  factor: Any         # int32 per element: current ramp factor
  quantized: Any      # float32: last quantized weights
  flips: Any          # int32 per element: quantized-value changes in this window
  inner_state: Any


def q_ramping(inner: optax.GradientTransformation, weights: Any = "mxfp4",
              window: int = 100, threshold: int = 4,
              max_factor: int = 16) -> optax.GradientTransformation:
  """Wraps ``inner`` (e.g. ``optax.adamw(...)``) with Q-Ramping of oscillating weights.

  Args:
    inner: the optimizer whose updates are ramped.
    weights: which leaves are quantized weights and how (spec/preset or spec function).
    window: steps per detection window.
    threshold: quantized-value changes per window that mark an element as oscillating.
    max_factor: largest accumulation factor (a power of two).
  """
  fn = as_weight_spec_fn(weights)
  if window < 1 or threshold < 1 or max_factor < 1 or max_factor & (max_factor - 1):
    raise ValueError("window, threshold >= 1 and max_factor a power of two >= 1 required, "
                     f"got {window}, {threshold}, {max_factor}")

  def init(params):
    q = quantized_weights(params, fn)
    zeros = lambda dt: jax.tree.map(lambda a: jnp.zeros(a.shape, dt), q)
    return QRampingState(jnp.zeros((), jnp.int32), zeros(jnp.float32), zeros(jnp.int32),
                         jax.tree.map(lambda a: jnp.ones(a.shape, jnp.int32), q), q,
                         zeros(jnp.int32), inner.init(params))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("q_ramping needs params: call tx.update(grads, state, params)")
    u, inner_state = inner.update(updates, state.inner_state, params)
    flat_u, treedef = jax.tree_util.tree_flatten_with_path(u)
    like = treedef.flatten_up_to  # None where a leaf is not a quantized weight
    acc_l, since_l, fac_l = like(state.accumulated), like(state.since), like(state.factor)
    out, acc_n, since_n = [], [], []
    for (path, ui), acc, since, fac in zip(flat_u, acc_l, since_l, fac_l):
      if acc is None:
        out.append(ui)
        acc_n.append(None)
        since_n.append(None)
        continue
      acc = acc + ui.astype(jnp.float32)
      since = since + 1
      due = since >= fac
      out.append(jnp.where(due, acc, 0.0).astype(ui.dtype))
      acc_n.append(jnp.where(due, 0.0, acc))
      since_n.append(jnp.where(due, 0, since))
    applied = jax.tree_util.tree_unflatten(treedef, out)
    q = quantized_weights(optax.apply_updates(params, applied), fn)
    flips = jax.tree.map(lambda f, a, b: f + (a != b).astype(jnp.int32), state.flips,
                         state.quantized, q)
    end = (state.step + 1) % window == 0

    def ramp(f, n):
      up = jnp.minimum(f * 2, max_factor)
      down = jnp.maximum(f // 2, 1)
      return jnp.where(end, jnp.where(n >= threshold, up, jnp.where(n == 0, down, f)), f)

    factor = jax.tree.map(ramp, state.factor, flips)
    flips = jax.tree.map(lambda n: jnp.where(end, 0, n), flips)
    keep_none = lambda leaves: jax.tree_util.tree_unflatten(treedef, leaves)
    return applied, QRampingState(state.step + 1, keep_none(acc_n), keep_none(since_n),
                                  factor, q, flips, inner_state)

  return optax.GradientTransformation(init, update)


def ramp_factors(opt_state: Any) -> Any:
  """The per-element ramp factors of the :class:`QRampingState` in ``opt_state``."""
  from fp4jax.optim.oscillation import find_state
  st = find_state(opt_state, QRampingState)
  if st is None:
    raise ValueError("no q_ramping state in opt_state")
  return st.factor
