"""The training step every step benchmark times (``kernels.bench_step``,
``kernels.compile_scaling``): forward, backward and an optax update, jitted. A module
without flags, so that both benchmarks (each with its own absl flags) can import it."""

from __future__ import annotations

import jax
import optax


def make_step(model, tx):
  """``step(params, opt_state, inputs, labels, key) -> (params, opt_state, loss)``, jitted:
  softmax cross-entropy of ``model.apply`` (``key`` as its ``"quant"`` rng: stochastic
  rounding and Hadamard signs), its gradient, and ``tx``'s update."""
  def loss_fn(params, inputs, labels, key):
    logits = model.apply(params, inputs, rngs={"quant": key})
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  @jax.jit
  def step(params, opt_state, inputs, labels, key):
    loss, grads = jax.value_and_grad(loss_fn)(params, inputs, labels, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step
