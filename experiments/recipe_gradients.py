r"""Which recipe distorts gradients least? Weight-gradient error of every recipe.

    python -m experiments.recipe_gradients [--tokens 512] [--d_model 256] [--keys 8]

A transformer MLP block ``y = gelu(x W1) W2`` (d_model -> 4 d_model -> d_model) with
LLM-like activations (Gaussian with a few outlier channels 20x larger) and a squared
error loss. For every recipe, inputs and weights are cast to bfloat16 (mixed-precision
training) and both GEMMs run through ``fp4jax.qmatmul``; the weight gradients are
compared with float32 gradients of the unquantized block:

  rel_err(dW) = ||dW - dW_f32|| / ||dW_f32||   (mean over --keys step keys)
  cos(dW)     = cosine similarity with dW_f32   (mean over keys)
  bias        = ||mean_k dW_k - dW_f32|| / ||dW_f32||  (what averaging over steps leaves)

and the CPU time of one jitted forward+backward (median of --repeats runs) relative to
the ``bf16`` recipe. Writes the table to stdout and, with --out, as JSON.
"""

from __future__ import annotations

import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import fp4jax
from experiments import common
from fp4jax import recipes

FLAGS = flags.FLAGS
flags.DEFINE_integer("tokens", 512, "tokens (rows of the activation matrix)")
flags.DEFINE_integer("d_model", 256, "model width (hidden width is 4x)")
flags.DEFINE_integer("keys", 8, "step keys to average over (stochastic recipes)")
flags.DEFINE_integer("repeats", 10, "timed runs per recipe")
flags.DEFINE_integer("seed", 0, "data seed")
flags.DEFINE_list("recipes", sorted(recipes.RECIPES), "recipes to compare")
flags.DEFINE_string("out", None, "optional JSON output path")


def make_problem(tokens: int, d: int, seed: int):
  r = np.random.default_rng(seed)
  x = r.standard_normal((tokens, d)).astype(np.float32)
  x[:, r.choice(d, 4, replace=False)] *= 20.0  # outlier channels
  w1 = (r.standard_normal((d, 4 * d)) / np.sqrt(d)).astype(np.float32)
  w2 = (r.standard_normal((4 * d, d)) / np.sqrt(4 * d)).astype(np.float32)
  target = r.standard_normal((tokens, d)).astype(np.float32)
  return jnp.asarray(x), (jnp.asarray(w1), jnp.asarray(w2)), jnp.asarray(target)


def loss_fn(params, x, target, recipe, key):
  w1, w2 = params
  k1, k2 = (None, None) if key is None else jax.random.split(key)
  h = jax.nn.gelu(fp4jax.qmatmul(x, w1, recipe, k1, preferred_element_type=jnp.float32))
  y = fp4jax.qmatmul(h.astype(x.dtype), w2, recipe, k2, preferred_element_type=jnp.float32)
  return jnp.mean((y - target) ** 2)


def reference_grads(params, x, target):
  def f32_loss(params):
    w1, w2 = params
    hi = jax.lax.Precision.HIGHEST
    h = jax.nn.gelu(jnp.dot(x, w1, precision=hi))
    return jnp.mean((jnp.dot(h, w2, precision=hi) - target) ** 2)
  return jax.grad(f32_loss)(params)


def study(names, tokens, d, n_keys, repeats, seed):
  x, params, target = make_problem(tokens, d, seed)
  ref = reference_grads(params, x, target)
  xb = x.astype(jnp.bfloat16)
  pb = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
  keys = jax.random.split(jax.random.key(seed + 1), n_keys)
  rows = []
  for name in names:
    r = recipes.get(name)
    step = jax.jit(jax.grad(lambda p, k: loss_fn(p, xb, target, r, k)))
    grads = [jax.tree.map(lambda g: np.asarray(g, np.float64), step(pb, k)) for k in keys]
    row = {"recipe": name}
    for i, layer in enumerate(("W1", "W2")):
      g_ref = np.asarray(ref[i], np.float64)
      gs = np.stack([g[i] for g in grads])
      nref = np.linalg.norm(g_ref)
      row[f"rel_err_{layer}"] = float(np.mean([np.linalg.norm(g - g_ref) / nref for g in gs]))
      row[f"cos_{layer}"] = float(np.mean([np.sum(g * g_ref) / (np.linalg.norm(g) * nref)
                                           for g in gs]))
      row[f"bias_{layer}"] = float(np.linalg.norm(gs.mean(0) - g_ref) / nref)
    jax.block_until_ready(step(pb, keys[0]))
    times = []
    for i in range(repeats):
      t = time.perf_counter()
      jax.block_until_ready(step(pb, keys[i % n_keys]))
      times.append(time.perf_counter() - t)
    row["ms"] = 1e3 * float(np.median(times))
    rows.append(row)
  base = next((r["ms"] for r in rows if r["recipe"] == "bf16"), None)
  for row in rows:
    row["time_vs_bf16"] = row["ms"] / base if base else float("nan")
  return rows


def format_rows(rows) -> str:
  head = ("recipe", "relerr dW1", "relerr dW2", "cos dW1", "cos dW2", "bias dW1", "bias dW2",
          "ms", "x bf16")
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    lines.append(f"| {r['recipe']} | {r['rel_err_W1']:.4f} | {r['rel_err_W2']:.4f} | "
                 f"{r['cos_W1']:.4f} | {r['cos_W2']:.4f} | {r['bias_W1']:.4f} | "
                 f"{r['bias_W2']:.4f} | {r['ms']:.1f} | {r['time_vs_bf16']:.2f} |")
  return "\n".join(lines)


def main(argv):
  del argv
  rows = study(FLAGS.recipes, FLAGS.tokens, FLAGS.d_model, FLAGS.keys, FLAGS.repeats,
               FLAGS.seed)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({platform.machine()}); "
        f"MLP block {FLAGS.tokens} tokens x {FLAGS.d_model} -> {4 * FLAGS.d_model}; "
        f"{FLAGS.keys} keys")
  print(format_rows(rows))
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump({"jax": jax.__version__, "device": jax.devices()[0].platform, "rows": rows}, f,
                indent=1)


if __name__ == "__main__":
  common.run_main(main)
