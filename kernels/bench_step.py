r"""One training step of ViT-S/16 (batch 256, 224x224, bf16 compute): BF16 against FP4 recipes.

    python -m kernels.bench_step [--batch 256] [--recipes mxfp4,tetrajet,nvfp4] [--model vit_s16]

For each recipe the step (forward, backward with all six GEMM operands of every linear
layer quantized, AdamW update) runs twice: through fp4jax's pure-JAX path
(``gemm_impl("xla")``) and through the kernels (``gemm_impl("auto")``: fused quantize
kernels + FP4 GEMM kernels). Reports the median step time and its ratio to the BF16 step;
first checks that the kernel step's loss equals the XLA step's within float32
accumulation differences. Writes ``kernels/results/step_<gpu>.json``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

import fp4jax
from fp4jax import dispatch
from fp4jax.models import ViT
from kernels.timing import median_time
from kernels.trace_summary import summarize_trace

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 256, "images per step")
flags.DEFINE_integer("image", 224, "image side")
flags.DEFINE_string("model", "vit_s16", "ViT configuration (fp4jax.models.VIT_CONFIGS)")
flags.DEFINE_list("recipes", ["mxfp4", "tetrajet", "nvfp4"], "FP4 recipes to time")
flags.DEFINE_list("impls", ["xla", "auto"], "GEMM implementations (fp4jax.gemm_impl)")
flags.DEFINE_bool("scan_layers", True, "scan the encoder blocks (compiles one block, not 12)")
flags.DEFINE_integer("reps", 5, "timed steps per run (median of 3 runs)")
flags.DEFINE_string("out", None, "JSON path (default kernels/results/step_<gpu>.json)")
flags.DEFINE_bool("profile", True, "trace 2 steps per run with jax.profiler and record where the "
                  "GPU time goes (kernels.trace_summary: GEMMs, quantize kernels, fusions)")
flags.DEFINE_string("trace_dir", None, "keep the raw traces here (default: a temporary directory)")


def make_step(model, tx):
  def loss_fn(params, images, labels, key):
    logits = model.apply(params, images, rngs={"quant": key})
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  @jax.jit
  def step(params, opt_state, images, labels, key):
    loss, grads = jax.value_and_grad(loss_fn)(params, images, labels, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def time_step(step, params, opt_state, images, labels, key, reps):
  """(median step time in seconds, the step's loss, first call's seconds: compilation)."""
  t0 = time.perf_counter()
  loss = float(step(params, opt_state, images, labels, key)[2])
  first = time.perf_counter() - t0
  t = median_time(step, params, opt_state, images, labels, key, reps=reps, runs=3)
  return t, loss, first


def profile_step(step, params, opt_state, images, labels, key, trace_dir, steps=2):
  """GPU time per step by kernel category (kernels.trace_summary) over ``steps`` traced steps."""
  jax.block_until_ready(step(params, opt_state, images, labels, key))
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(steps):
      jax.block_until_ready(step(params, opt_state, images, labels, key))
  return summarize_trace(trace_dir, steps, top=12)


def main(argv):
  del argv
  facts = dispatch.device_facts()
  gpu = facts.slug
  out_path = FLAGS.out or os.path.join(os.path.dirname(__file__), "results", f"step_{gpu}.json")
  rng = np.random.default_rng(0)
  b, s = FLAGS.batch, FLAGS.image
  images = jnp.asarray(rng.standard_normal((b, s, s, 3)).astype(np.float32)).astype(jnp.bfloat16)
  labels = jnp.asarray(rng.integers(0, 1000, b))
  key = jax.random.key(1)
  tx = optax.adamw(1e-3)
  res = {"device": facts.kind, "jax": jax.__version__, "model": FLAGS.model, "batch": b,
         "steps": {}}

  def save():
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    with open(out_path, "w") as f:
      json.dump(res, f, indent=1)

  base = None
  for recipe in ["bf16"] + FLAGS.recipes:
    model = ViT.from_name(FLAGS.model, 1000, recipe=recipe, dtype=jnp.bfloat16,
                          scan_layers=FLAGS.scan_layers)
    params = jax.jit(model.init)({"params": jax.random.key(0), "quant": key}, images[:2])
    opt_state = tx.init(params)
    losses = {}
    for impl in (["xla"] if recipe == "bf16" else FLAGS.impls):
      label = recipe if recipe == "bf16" else f"{recipe}/{impl}"
      try:
        with fp4jax.gemm_impl(impl):
          step = make_step(model, tx)
          t, loss, first = time_step(step, params, opt_state, images, labels, key,
                                     FLAGS.reps)
        losses[impl] = loss
        base = t if recipe == "bf16" else base
        res["steps"][label] = {"ms": t * 1e3, "loss": loss,
                               "x_bf16": t / base if base else None, "first_call_s": first}
        print(f"{label:20} {t * 1e3:9.2f} ms  loss {loss:.5f}  "
              f"{t / base if base else float('nan'):5.2f} x bf16  (first call {first:.0f} s)",
              flush=True)
        if FLAGS.profile:
          tdir = os.path.join(FLAGS.trace_dir or tempfile.mkdtemp(), label.replace("/", "_"))
          prof = profile_step(step, params, opt_state, images, labels, key, tdir)
          res["steps"][label]["profile"] = prof
          print("    GPU ms/step " + f"{prof['device_ms_per_step']:.2f}: " + ", ".join(
              f"{k} {v:.2f}" for k, v in prof["by_category_ms"].items()), flush=True)
          for name, ms, n in prof["top_kernels"][:6]:
            print(f"      {ms:7.3f} ms  x{n:g}  {name[:90]}", flush=True)
      except Exception as e:
        res["steps"][label] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
        print(f"{label:20} {res['steps'][label]}", flush=True)
      save()
    if "xla" in losses and len(losses) > 1:  # the kernels' loss against the XLA path's
      for impl, loss in losses.items():
        if impl != "xla":
          res["steps"][f"{recipe}/loss_diff_{impl}_vs_xla"] = abs(loss - losses["xla"])
          print(f"{recipe}: |loss({impl}) - loss(xla)| = {abs(loss - losses['xla']):.2e}")
  save()
  print(f"wrote {out_path}")


if __name__ == "__main__":
  app.run(main)
