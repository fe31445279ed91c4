"""Q-EMA (TetraJet, Chen et al. 2025, arXiv 2502.20853, Sec. 4.2) as an optax transform.

The transform keeps ``ema_{t+1} = decay * ema_t + (1 - decay) * W_{t+1}`` of the latent
weights (the weights after this step's update) and leaves the updates unchanged. The
forward pass then quantizes ``W`` with ``W``'s block scales but rounds each element to
the grid neighbour nearest to the EMA (:func:`fp4jax.reference_rounding.
round_toward_reference`): a weight hovering at a rounding boundary no longer flips with
every small update. The paper uses decay 0.998 and switches Q-EMA on after 10 steps.

Usage (linen)::

    tx = optax.chain(optax.adamw(1e-3), fp4jax.optim.q_ema())
    ...
    ref = fp4jax.optim.q_ema_reference(opt_state, params)
    logits = model.apply({"params": params, "q_ema": ref}, x, rngs={"quant": key})

(nnx: ``fp4jax.nnx.set_kernel_references(model, ref)`` before the step.)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fp4jax.optim.oscillation import find_state
from fp4jax.optim.weights import as_weight_spec_fn


class QEmaState(NamedTuple):
  count: jax.Array  # int32: updates seen
  ema: Any          # float32 EMA of the weight leaves (None elsewhere)


def q_ema(decay: float = 0.998, weights: Any = "mxfp4") -> optax.GradientTransformation:
  """EMA of the weight leaves for Q-EMA rounding; identity on the updates.

  Place it last in an ``optax.chain`` (it averages ``params + updates``).

  Args:
    decay: EMA decay (TetraJet: 0.998).
    weights: which leaves are quantized weights (a spec/preset for ``kernel`` leaves or
      a weight spec function, :mod:`fp4jax.optim.weights`).
  """
  if not 0.0 <= decay < 1.0:
    raise ValueError(f"decay must be in [0, 1), got {decay}")
  fn = as_weight_spec_fn(weights)

  def select(params):
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.asarray(x, jnp.float32) if fn(p, x) is not None else None, params)

  def init(params):
    return QEmaState(jnp.zeros((), jnp.int32), select(params))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("q_ema needs params: call tx.update(grads, state, params)")
    new = select(optax.apply_updates(params, updates))
    ema = jax.tree.map(lambda e, w: decay * e + (1.0 - decay) * w, state.ema, new)
    return updates, QEmaState(state.count + 1, ema)

  return optax.GradientTransformation(init, update)


def q_ema_reference(opt_state: Any, params: Any, warmup_steps: int = 10) -> Any:
  """The rounding reference for the next forward pass: the EMA for weight leaves once
  ``warmup_steps`` updates have been averaged, else the weights themselves (which makes
  Q-EMA rounding identical to plain rounding). Same tree structure as ``params``."""
  st = find_state(opt_state, QEmaState)
  if st is None:
    raise ValueError("no q_ema state in opt_state: add fp4jax.optim.q_ema() to the chain")
  on = st.count >= warmup_steps

  def pick(p, e):
    return p if e is None else jnp.where(on, e, jnp.asarray(p, jnp.float32)).astype(p.dtype)

  return jax.tree.map(pick, params, st.ema, is_leaf=lambda x: x is None)
