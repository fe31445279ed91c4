"""The training step every step benchmark times (``kernels.bench_step``,
``kernels.compile_scaling``): forward, backward and an optax update, jitted. A module
without flags, so that both benchmarks (each with its own absl flags) can import it; and :func:`compile_stats`, what ``kernels.compile_scaling`` measures."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import optax

import fp4jax
from fp4jax.models import ViT


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


def compile_stats(recipe: str, depth: int, width: int, batch: int, image: int, impl: str) -> dict:
  """Lower and compile (nothing runs: abstract inputs) one :func:`make_step` of an
  unrolled ViT of ``depth`` blocks of ``width`` (heads ``width / 64``, MLP ``4 width``)
  under ``recipe`` (or ``"bf16"``) and the ``fp4jax.gemm_impl`` policy ``impl``: the
  seconds of each and the line counts of the StableHLO and of the optimized HLO."""
  images = jax.ShapeDtypeStruct((batch, image, image, 3), jnp.bfloat16)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
  key = jax.random.key(1)
  tx = optax.adamw(1e-3)
  with fp4jax.gemm_impl(impl):
    model = ViT(1000, 16, width, depth, max(1, width // 64), 4 * width,
                recipe=None if recipe == "bf16" else recipe, dtype=jnp.bfloat16)
    params = jax.eval_shape(lambda: model.init({"params": jax.random.key(0), "quant": key},
                                               jnp.zeros((2,) + images.shape[1:], images.dtype)))
    opt_state = jax.eval_shape(tx.init, params)
    t0 = time.perf_counter()
    lowered = make_step(model, tx).lower(params, opt_state, images, labels, key)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
  return {"lower_s": t1 - t0, "compile_s": t2 - t1,
          "stablehlo_lines": lowered.as_text().count("\n"),
          "optimized_hlo_lines": compiled.as_text().count("\n")}
