r"""Whole training steps: BF16, a hand-written naive MXFP4 fake quantization, and fp4jax's
FP4 recipes, in the same run.

    python -m kernels.bench_step                              # ViT-S/16, B=256, 224^2
    python -m kernels.bench_step --model=gpt_small            # GPT-small, 8 x 1024 tokens
    python -m kernels.bench_step --model=vit_tiny --batch=8 --image=32 --reps=1   # smoke test

Every step is forward, backward with all six GEMM operands of every linear layer
quantized (the classifier / LM head stays high precision), and an AdamW update. Rows:

* ``bf16``: the same model with plain ``flax.linen.Dense`` layers;
* ``naive_mxfp4``: what a user writes in twenty lines of plain JAX (:mod:`kernels.naive`):
  for each GEMM operand, blocks of 32 along its contraction axis, amax per block, E8M0
  floor scale ``2^(floor(log2 amax) - 2)``, ``x / s`` cast to ``float4_e2m1fn`` and back,
  times ``s``, a straight-through gradient and a BF16 ``dot``;
* ``<recipe>/<impl>`` for each recipe and ``fp4jax.gemm_impl`` policy (``auto``: what a
  user gets; on Hopper the fused GEMM-ready-operand path of :mod:`fp4jax.qdot_fused`
  with the Pallas operand kernel for MX operands; ``fused``: the same path with every
  operand emitted inside XLA's fusions).

For each: the median step time (3 runs of ``--reps`` steps), its ratio to the BF16 step
of the same run and scan setting, the first call's seconds (tracing + compilation + one
step), and, with ``--profile``, the GPU time per kernel category from a ``jax.profiler``
trace. ``--scan`` runs the blocks unrolled, scanned (``nn.scan``: one compiled block),
or both. ``--check`` first compares each recipe's ``auto`` step with the pure-JAX
reference (``gemm_impl("xla")``) on a tiny model of the same family, beside the
reference's own sensitivity to a one-ulp nudge of its inputs
(:func:`check_against_reference` says why). Results merge into
``kernels/results/step_<gpu>.json`` under ``runs["<model>/<scan>"]``.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import subprocess
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

import fp4jax
from fp4jax import dispatch
from fp4jax.models import GPT, GPT_CONFIGS, VIT_CONFIGS, ViT
from kernels.naive import naive_dot_general
from kernels.train_step import make_step
from kernels.timing import median_time, write_json
from kernels.trace_summary import summarize_trace

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "vit_s16", f"one of {sorted(VIT_CONFIGS) + sorted(GPT_CONFIGS)}")
flags.DEFINE_integer("batch", None, "images (ViT, default 256) or sequences (GPT, default 8)")
flags.DEFINE_integer("image", 224, "ViT image side")
flags.DEFINE_integer("seq", None, "GPT tokens per sequence (default: the model's context)")
flags.DEFINE_list("recipes", ["mxfp4", "tetrajet", "nvfp4"],
                  "fp4jax recipes to time (each with every --impls), or recipe/impl rows")
flags.DEFINE_list("impls", ["auto"], "fp4jax.gemm_impl policies per recipe")
flags.DEFINE_list("scan", ["unscanned", "scanned"], "block layouts: unscanned, scanned")
flags.DEFINE_bool("naive", True, "time the hand-written naive MXFP4 row")
flags.DEFINE_list("hadamard_methods", [], "also time each FP4 recipe with these Hadamard "
                  "methods (fp4jax.dispatch.hadamard_method; rows labelled recipe/impl+method); "
                  "default: the device's only")
flags.DEFINE_bool("check", True, "check each recipe's auto step against the xla reference "
                  "on a tiny model first")
flags.DEFINE_integer("reps", 5, "timed steps per run (median of 3 runs)")
flags.DEFINE_string("out", None, "JSON path (default kernels/results/step_<gpu>.json)")
flags.DEFINE_bool("profile", True, "trace 2 steps per row with jax.profiler and record the GPU "
                  "time per kernel category (kernels.trace_summary)")
flags.DEFINE_integer("profile_top", 12, "kernels listed per profiled row, longest first")
flags.DEFINE_string("trace_dir", None, "keep the raw traces here (default: a temporary directory)")


# ------------------------------------------------------------------------------ steps


def _is_gpt(name: str) -> bool:
  return name in GPT_CONFIGS


def build(name: str, recipe, scan: bool):
  """The model of ``name`` with ``recipe`` (a name, None, or a dot_general callable)."""
  if _is_gpt(name):
    return GPT.from_name(name, recipe=recipe, dtype=jnp.bfloat16, scan_layers=scan)
  return ViT.from_name(name, 1000, recipe=recipe, dtype=jnp.bfloat16, scan_layers=scan)


def batch_for(name: str, batch: int | None, image: int, seq: int | None, seed: int = 0):
  """(inputs, labels) of one step: bf16 images and class labels, or byte tokens and
  next-token targets."""
  rng = np.random.default_rng(seed)
  if _is_gpt(name):
    b, t = batch or 8, seq or GPT_CONFIGS[name][4]
    tokens = rng.integers(0, 256, (b, t + 1))
    return jnp.asarray(tokens[:, :-1]), jnp.asarray(tokens[:, 1:])
  b = batch or 256
  images = jnp.asarray(rng.standard_normal((b, image, image, 3)).astype(np.float32))
  return images.astype(jnp.bfloat16), jnp.asarray(rng.integers(0, 1000, b))


def init_state(model, tx, inputs, key):
  params = jax.jit(model.init)({"params": jax.random.key(0), "quant": key}, inputs[:2])
  return params, tx.init(params)


def time_step(step, state, inputs, labels, key, reps):
  """(median step time in seconds, the step's loss, first call's seconds)."""
  t0 = time.perf_counter()
  loss = float(step(*state, inputs, labels, key)[2])
  first = time.perf_counter() - t0
  t = median_time(step, *state, inputs, labels, key, reps=reps, runs=3)
  return t, loss, first


def profile_step(step, state, inputs, labels, key, trace_dir, steps=2):
  """GPU time per step by kernel category over ``steps`` traced steps."""
  jax.block_until_ready(step(*state, inputs, labels, key))
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(steps):
      jax.block_until_ready(step(*state, inputs, labels, key))
  return summarize_trace(trace_dir, steps, top=FLAGS.profile_top)


def check_against_reference(family_tiny: str, recipes, key) -> dict:
  """|loss(auto) - loss(xla)| and the largest relative gradient difference for each recipe
  on a tiny model, beside the same two numbers for the reference against itself with 1%
  of the inputs nudged by one ulp (images) or one token changed (GPT).

  Why the baseline: the auto path equals the reference per layer up to float32
  accumulation order (the tests), but FP4 rounding is discontinuous, so a last-bit
  difference in one layer's output flips some elements' FP4 codes in the next, and a
  whole model amplifies that (on the CPU, nudging 1% of a ViT's input pixels by one bf16
  ulp moves its FP4 logits by 13-23% of their largest, BF16's by 1%). Auto against xla
  is sound when its differences are of the nudge's size, not when they are zero."""
  out = {}
  inputs, labels = batch_for(family_tiny, 4, 32, 64)
  if jnp.issubdtype(inputs.dtype, jnp.floating):
    mask = jax.random.bernoulli(jax.random.key(5), 0.01, inputs.shape)
    nudged = jnp.where(mask, jnp.nextafter(inputs, jnp.asarray(jnp.inf, inputs.dtype)), inputs)
  else:
    nudged = inputs.at[0, 0].set((inputs[0, 0] + 1) % 256)
  for recipe in recipes:
    model = build(family_tiny, recipe, scan=True)
    params = jax.jit(model.init)({"params": jax.random.key(0), "quant": key}, inputs[:2])

    def loss_fn(p, x):
      logits = model.apply(p, x, rngs={"quant": key})
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    got = {}
    for label, impl, x in (("auto", "auto", inputs), ("xla", "xla", inputs),
                           ("xla_nudged", "xla", nudged)):
      with fp4jax.gemm_impl(impl):
        got[label] = jax.jit(jax.value_and_grad(loss_fn))(params, x)

    def diffs(u, v):
      (la, ga), (lx, gx) = u, v
      rel = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))
                      / (float(jnp.max(jnp.abs(b.astype(jnp.float32)))) or 1.0))
                for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gx)))
      return abs(float(la) - float(lx)), rel

    dl, rel = diffs(got["auto"], got["xla"])
    ndl, nrel = diffs(got["xla_nudged"], got["xla"])
    out[recipe] = {"loss_auto": float(got["auto"][0]), "loss_xla": float(got["xla"][0]),
                   "abs_loss_diff": dl, "max_rel_grad_diff": rel,
                   "nudged_abs_loss_diff": ndl, "nudged_max_rel_grad_diff": nrel}
    print(f"check {family_tiny} {recipe:10}: auto vs xla: |loss diff| {dl:.2e}, max rel. "
          f"gradient diff {rel:.2e}; xla vs xla with nudged inputs: {ndl:.2e}, {nrel:.2e}",
          flush=True)
  return out


def subnormal_arithmetic_is_ieee() -> bool:
  """Whether the default device's float32 multiply keeps subnormals (no flush)."""
  x = jnp.asarray(np.float32(2.0 ** -130))
  return float(jax.jit(lambda v: v * np.float32(2.0 ** 10))(x)) == 2.0 ** -120


def _git_commit() -> str:
  try:
    return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                          text=True, cwd=os.path.dirname(__file__), check=False).stdout.strip()
  except OSError:
    return ""


def _has_hadamard(recipe: str) -> bool:
  r = fp4jax.recipes.get(recipe)
  return any(h is not None for h in (r.hadamard_fwd, r.hadamard_dgrad, r.hadamard_wgrad))


def _rows(recipes, impls, naive):
  rows = [("bf16", None)]
  if naive:
    rows.append(("naive_mxfp4", naive_dot_general))
  for recipe in recipes:
    if "/" in recipe:  # "nvfp4/auto": that one row
      rows.append((recipe, recipe.split("/")[0]))
      continue
    for impl in impls:
      rows.append((f"{recipe}/{impl}", recipe))
  return rows


def main(argv):
  del argv
  facts = dispatch.device_facts()
  out_path = FLAGS.out or os.path.join(os.path.dirname(__file__), "results",
                                       f"step_{facts.slug}.json")
  res = {}
  if os.path.exists(out_path):
    with open(out_path) as f:
      res = json.load(f)
  if res.get("device") != facts.kind or "runs" not in res:
    res = {"device": facts.kind, "runs": {}}

  def save():
    write_json(res, out_path)

  key = jax.random.key(1)
  meta = {"jax": jax.__version__, "commit": _git_commit(),
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "subnormal_arithmetic_ieee": subnormal_arithmetic_is_ieee()}
  print(f"{facts.kind or facts.platform}, jax {jax.__version__}; float32 subnormals kept: "
        f"{meta['subnormal_arithmetic_ieee']}", flush=True)
  if FLAGS.check:
    meta["check"] = check_against_reference("gpt_tiny" if _is_gpt(FLAGS.model) else "vit_tiny",
                                            sorted({r.split("/")[0] for r in FLAGS.recipes}),
                                            key)
  inputs, labels = batch_for(FLAGS.model, FLAGS.batch, FLAGS.image, FLAGS.seq)
  tx = optax.adamw(1e-3)
  for scan_name in FLAGS.scan:
    if scan_name not in ("unscanned", "scanned"):
      raise app.UsageError(f"--scan takes unscanned and/or scanned, got {scan_name!r}")
    run = {**meta, "model": FLAGS.model, "inputs": list(inputs.shape), "steps": {}}
    res["runs"][f"{FLAGS.model}/{scan_name}"] = run
    base = None
    rows = list(_rows(FLAGS.recipes, FLAGS.impls, FLAGS.naive))
    rows += [(f"{label}+{m}", recipe) for m in FLAGS.hadamard_methods
             for label, recipe in rows if "/" in label and _has_hadamard(recipe)]
    for label, recipe in rows:
      impl = label.split("/")[1].split("+")[0] if "/" in label else "auto"
      method = label.split("+")[1] if "+" in label else None
      try:
        with fp4jax.gemm_impl(impl), (dispatch.hadamard_method(method) if method
                                      else contextlib.nullcontext()):
          model = build(FLAGS.model, recipe, scan_name == "scanned")
          state = init_state(model, tx, inputs, key)
          step = make_step(model, tx)
          t, loss, first = time_step(step, state, inputs, labels, key, FLAGS.reps)
        base = t if label == "bf16" else base
        row = {"ms": t * 1e3, "loss": loss, "x_bf16": t / base if base else None,
               "first_call_s": first}
        run["steps"][label] = row
        print(f"{FLAGS.model}/{scan_name:9} {label:18} {t * 1e3:9.2f} ms  "
              f"{row['x_bf16'] or float('nan'):5.2f} x bf16  loss {loss:.4f}  "
              f"(first call {first:.1f} s)", flush=True)
        if FLAGS.profile and facts.on_gpu:
          tdir = os.path.join(FLAGS.trace_dir or tempfile.mkdtemp(),
                              f"{FLAGS.model}_{scan_name}_{label.replace('/', '_')}")
          prof = profile_step(step, state, inputs, labels, key, tdir)
          row["profile"] = prof
          print("    GPU ms/step " + f"{prof['device_ms_per_step']:.2f}: " + ", ".join(
              f"{k} {v:.2f}" for k, v in prof["by_category_ms"].items())
              + f"; {prof['kernels_per_step']:.0f} kernels, {prof['small_kernels_per_step']:.0f}"
              f" under 8 us ({prof['small_kernels_ms_per_step']:.2f} ms)", flush=True)
          for name, ms, n in prof["top_kernels"][:5]:
            print(f"      {ms:7.3f} ms  x{n:g}  {name[:90]}", flush=True)
      except Exception as e:  # a row that fails is recorded, the others still run
        run["steps"][label] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
        print(f"{label:18} {run['steps'][label]}", flush=True)
      save()
  save()
  print(f"wrote {out_path}")


if __name__ == "__main__":
  app.run(main)
