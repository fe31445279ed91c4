r"""ViT training in FP4: BF16 against MXFP4, TetraJet (with and without Q-EMA / Q-Ramping),
NVFP4 and any other recipe or format, on real data that ships with scikit-learn.

    python -m experiments.vit_tetrajet --format=mxfp4 --compare=bf16        # TetraJet vs BF16
    python -m experiments.vit_tetrajet --compare=bf16,mxfp4,tetrajet,tetrajet+qema+qramp,nvfp4
    python -m experiments.vit_tetrajet --format=nvfp4 --block_size=32 --workdir=/tmp/nv32
    python -m experiments.vit_tetrajet --workdir=/tmp/run --resume          # continue a run
    python -m experiments.vit_tetrajet --compare=bf16,nvfp4,nvfp4+then_bf16@0.8 --seeds=3

A *run* is named ``<recipe>[+qema][+qramp][+then_<recipe>@<at>]``: a recipe of
:mod:`fp4jax.recipes` (or a
format preset of :mod:`fp4jax.spec`, used for all six GEMM operands), optionally with
TetraJet's Q-EMA (Chen et al. 2025, arXiv 2502.20853, Sec. 4.2: round each weight toward
its EMA) and Q-Ramping (Sec. 4.3: longer update intervals for oscillating weights). Every
linear layer of the encoder blocks is quantized; the patch embedding (K = patch^2 x
channels, 4 on digits) and the classifier head stay in high precision, as in TetraJet and
NVIDIA's recipe. Each run logs train loss, test loss / accuracy and, for quantized runs,
the weight oscillation metrics of :func:`fp4jax.optim.track_oscillation` (fraction of
weights whose quantized value flipped in the last step, fraction oscillating in a window).
``+then_bf16@0.8`` switches the run to BF16 GEMMs for the last 20% of the steps (NVIDIA's
precision schedule, arXiv 2509.25149 Sec. 5; ``--switch_recipe=bf16 --switch_at=0.8`` adds
it to every quantized run); the optimizer, its Q-EMA / Q-Ramping state and the
oscillation tracking carry on.

``--seeds=3`` repeats every run for seeds ``--seed`` .. ``--seed+2`` (initialisation, batch
order, rounding keys; the train/test split stays ``--seed``'s, so every seed is scored on
the same images): ``<run>/seed_<s>/`` per seed and a summary of mean ± std with gaps
paired by seed (:mod:`experiments.seeds`).

Outputs (``--workdir``): ``config.json``, ``<run>/metrics.jsonl``, ``<run>/checkpoints``,
``<run>/final.json``, ``accuracy.png``, ``loss.png``, ``oscillation.png``, ``summary.md``,
``final.json`` (every seed).
"""

from __future__ import annotations

import os
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from absl import app, flags
from absl import logging as absl_logging

import fp4jax
from experiments import common, data
from experiments import seeds as seeds_lib
from fp4jax.models import VIT_CONFIGS, ViT
from fp4jax import optim, recipes as recipes_lib
from fp4jax.optim.weights import path_str

MODELS = {"vit_digits": (2, 64, 4, 4, 256), **VIT_CONFIGS}  # (patch, width, depth, heads, mlp)
FORMAT_RECIPES = {"mxfp4": "tetrajet", "nvfp4": "nvfp4", "mxfp8": "mxfp8", "mxfp6": "mxfp6",
                  "fp8": "fp8", "bf16": "bf16"}

FLAGS = flags.FLAGS


def define_flags() -> None:
  """This script's absl flags (called under ``__main__``; see common.define_training_flags)."""
  flags.DEFINE_string("format", "mxfp4", "element format: mxfp4 (recipe tetrajet), nvfp4, mxfp8, "
                      "mxfp6, fp8, bf16, or any fp4jax.spec preset (all six operands)")
  flags.DEFINE_string("recipe", None, "fp4jax recipe (default: the format's; see fp4jax.recipes)")
  flags.DEFINE_integer("block_size", None, "override the block size of every block-scaled "
                       "operand (tiles become block_size x block_size)")
  flags.DEFINE_string("scale_mode", None, "override the scale rule (floor/ceil/even/rceil for "
                      "E8M0 scales, amax for float scales)")
  flags.DEFINE_bool("q_ema", False, "TetraJet Q-EMA: round weights toward their EMA")
  flags.DEFINE_float("q_ema_decay", 0.998, "Q-EMA decay")
  flags.DEFINE_bool("q_ramping", False, "TetraJet Q-Ramping of oscillating weights")
  flags.DEFINE_list("compare", [], "runs to train one after the other and plot together, e.g. "
                    "bf16,mxfp4,tetrajet,tetrajet+qema,tetrajet+qema+qramp,nvfp4; an explicit "
                    "--format/--recipe run is added to them")
  flags.DEFINE_string("model", "vit_digits", f"one of {', '.join(MODELS)}")
  flags.DEFINE_enum("dataset", "digits", list(data.VISION_DATASETS), "training data")
  flags.DEFINE_string("data_dir", None, "folder of cifar10 / imagefolder data")
  flags.DEFINE_integer("image_size", None, "resize the images to this side (bilinear), e.g. "
                       "224 for --model=vit_s16 on the digits")
  flags.DEFINE_bool("scan_layers", True, "compile one encoder block (nn.scan) instead of depth")
  common.define_training_flags(workdir="runs/vit_tetrajet", steps=600, batch_size=128,
                               batch_what="images", lr=2e-3, weight_decay=0.05, warmup=100,
                               eval_every=100, log_every=50, checkpoint_every=500)
  flags.adopt_module_key_flags(common)   # --help lists --steps, --lr, --workdir, ...




class RunSpec(NamedTuple):
  name: str
  recipe: recipes_lib.Recipe
  q_ema: bool
  q_ramping: bool
  switch: common.SwitchSpec | None = None


def parse_run(name: str, block_size=None, scale_mode=None) -> RunSpec:
  """``<recipe>[+qema][+qramp][+then_<recipe>@<at>]`` -> RunSpec."""
  parts = [p.strip() for p in name.split("+") if p.strip()]
  if not parts:
    raise ValueError(f"empty run name {name!r}")
  rest, switch = common.split_switch(parts[1:])
  extras = set(rest)
  unknown = extras - {"qema", "qramp"}
  if unknown:
    raise ValueError(f"run {name!r}: unknown option(s) {sorted(unknown)}; use +qema, +qramp, "
                     f"+{common.SWITCH_OPTION}<recipe>@<at>")
  recipe = common.build_recipe(parts[0], block_size, scale_mode)
  if recipe.is_identity and (extras or switch):
    raise ValueError(f"run {name!r}: Q-EMA / Q-Ramping / a precision switch need a "
                     "quantized recipe")
  return RunSpec(name, recipe, "qema" in extras, "qramp" in extras, switch)


def switch_phase_run(run: RunSpec, block_size=None, scale_mode=None) -> RunSpec | None:
  """The run a precision schedule switches to: the switch recipe's GEMMs with the run's
  Q-EMA / Q-Ramping (they belong to its optimizer, which carries on)."""
  if run.switch is None:
    return None
  if "+" in run.switch.recipe:
    raise ValueError(f"run {run.name!r}: switch to a plain recipe (e.g. then_bf16@0.8), not "
                     f"{run.switch.recipe!r}")
  recipe = common.build_recipe(run.switch.recipe, block_size, scale_mode)
  if recipe.name == run.recipe.name:
    raise ValueError(f"run {run.name!r} switches to its own recipe {recipe.name!r}")
  return run._replace(name=f"{run.name} (after the switch)", recipe=recipe, switch=None)


def runs_from_flags() -> list[RunSpec]:
  """``--compare``'s runs, then the ``--format``/``--recipe`` run (when given explicitly or
  without ``--compare``) unless it is in the list already."""
  recipe = FLAGS.recipe or FORMAT_RECIPES.get(FLAGS.format, FLAGS.format)
  name = recipe + ("+qema" if FLAGS.q_ema else "") + ("+qramp" if FLAGS.q_ramping else "")
  names = list(FLAGS.compare)
  explicit = FLAGS["format"].present or FLAGS["recipe"].present
  if (explicit or not names) and name not in names:
    names.append(name)
  names = common.with_switch_flags(names, FLAGS.switch_recipe, FLAGS.switch_at)
  return [parse_run(n, FLAGS.block_size, FLAGS.scale_mode) for n in names]


def check_model_fits(recipe: recipes_lib.Recipe, model: str) -> None:
  """Every quantized GEMM axis of the encoder blocks must hold whole blocks."""
  _, width, _, heads, mlp = MODELS[model]
  common.check_widths_fit(recipe, {"width": width, "MLP width": mlp, "QKV width": 3 * width},
                          model)


def quantized_weight_fn(recipe: recipes_lib.Recipe):
  """Weight spec function (fp4jax.optim.weights) for the encoder blocks' kernels."""
  spec = recipe.fwd_rhs
  if spec is not None and spec.rounding == "stochastic":
    spec = spec.replace(rounding="nearest")
  if spec is not None and spec.tensor_scale is not None:
    # NVFP4's FP32 tensor scale moves with the tensor's amax at every update, which would
    # count every weight as flipping; track codes times block scales instead.
    spec = spec.replace(tensor_scale=None)

  def fn(path, leaf):
    p = path_str(path)
    if spec is not None and p.endswith("kernel") and ("blocks" in p or "/block" in p
                                                      or p.startswith("block")):
      return spec, -2
    return None
  return fn


def make_optimizer(run: RunSpec, steps: int) -> optax.GradientTransformation:
  sched = optax.warmup_cosine_decay_schedule(0.0, FLAGS.lr, min(FLAGS.warmup, steps // 2),
                                             max(steps, 1), FLAGS.lr * 0.01)
  adamw = optax.adamw(sched, weight_decay=FLAGS.weight_decay)
  wfn = quantized_weight_fn(run.recipe)
  base = optim.q_ramping(adamw, weights=wfn) if run.q_ramping else adamw
  chain = [optax.clip_by_global_norm(1.0), base]
  if run.q_ema:
    chain.append(optim.q_ema(FLAGS.q_ema_decay, weights=wfn))
  if not run.recipe.is_identity:
    chain.append(optim.track_oscillation(weights=wfn, window=50))
  return optax.chain(*chain)


def build_model(run: RunSpec, num_classes: int) -> ViT:
  p, w, d, h, m = MODELS[FLAGS.model]
  return ViT(num_classes, p, w, d, h, m, recipe=None if run.recipe.is_identity else run.recipe,
             dtype=common.compute_dtype(FLAGS.dtype), scan_layers=FLAGS.scan_layers,
             quantize_embed=False)


def make_steps(model: ViT, tx, run: RunSpec, par: common.Parallel, state: common.TrainState):
  """The jitted train and eval steps (sharded over ``par``'s mesh, if any)."""
  def apply(params, opt_state, images, key):
    variables = {"params": params}
    if run.q_ema:
      variables["q_ema"] = optim.q_ema_reference(opt_state, params)
    return model.apply(variables, images, rngs={"quant": key})

  def loss_fn(params, opt_state, images, labels, key):
    logits = apply(params, opt_state, images, key)
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                           labels).mean()

  grad_fn = par.value_and_grad(loss_fn, batch_argnums=(1, 2), key_argnum=3)

  def train_step(state: common.TrainState, images, labels):
    key = jax.random.fold_in(state.key, state.step)
    loss, grads = grad_fn(state.params, state.opt_state, images, labels, key)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads)}
    if not run.recipe.is_identity:
      osc = optim.oscillation_metrics(opt_state)
      metrics["flip_rate"], metrics["oscillating"] = osc["flip_rate"], osc["oscillating"]
    return common.TrainState(state.step + 1, params, opt_state, state.key), metrics

  @jax.jit
  def eval_step(state: common.TrainState, images, labels):
    logits = apply(state.params, state.opt_state, images, jax.random.fold_in(state.key, 2**31 - 1))
    loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    return loss.sum(), (jnp.argmax(logits, -1) == labels).sum()

  return par.jit_train_step(train_step, state, (4, 1)), eval_step


def evaluate(eval_step, state, x, y, batch=512) -> dict[str, float]:
  tot_loss, correct = 0.0, 0
  for i in range(0, len(y), batch):
    l, c = eval_step(state, jnp.asarray(x[i:i + batch]), jnp.asarray(y[i:i + batch]))
    tot_loss += float(l)
    correct += int(c)
  return {"test_loss": tot_loss / len(y), "test_accuracy": correct / len(y)}


def run_mean(records, key: str, kind: str = "train") -> float | None:
  """The mean of ``key`` over a run's logged ``kind`` records (every ``--log_every``
  steps), or None."""
  vals = [r[key] for r in records if r.get("kind") == kind and r.get(key) is not None]
  return sum(vals) / len(vals) if vals else None


def prepare_run(run: RunSpec, switch_to: RunSpec | None, ds: data.ImageData, workdir: str,
                par: common.Parallel, seeded: bool):
  """What a run's seeds share (model, optimizer, the jitted steps: compiled once) ->
  ``train_seed(seed, stop) -> final metrics`` (:func:`common.train_runs`)."""
  model = build_model(run, len(ds.classes))
  tx = make_optimizer(run, FLAGS.steps)
  init = jax.jit(model.init)
  steps: dict[str, Any] = {}     # built at the first seed (shardings follow its state)

  def train_seed(seed: int, stop: common.StopRequested) -> dict[str, Any]:
    rdir = seeds_lib.run_dir(workdir, run.name, seed, seeded)
    init_key, quant_key = jax.random.split(jax.random.key(seed))
    params = init({"params": init_key, "quant": quant_key},
                  jnp.asarray(ds.train_x[:2]))["params"]
    state = par.place_state(
        common.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), quant_key))
    if not steps:
      steps["main"] = make_steps(model, tx, run, par, state)
      if switch_to is not None:
        # The switched model's GEMMs, the run's optimizer (Q-EMA, Q-Ramping, tracking).
        steps["switch"] = make_steps(build_model(switch_to, len(ds.classes)), tx, run, par,
                                     state)
    train_step, eval_step = steps["main"]
    switch = None
    if switch_to is not None:
      sw_eval = steps["switch"][1]
      switch = common.Phase(run.switch.step(FLAGS.steps), switch_to.recipe.name,
                            steps["switch"][0],
                            lambda st: evaluate(sw_eval, st, ds.test_x, ds.test_y))

    def get_batch(step):
      idx = data.batches(len(ds.train_y), FLAGS.batch_size, seed, step)
      return par.batch((ds.train_x[idx], ds.train_y[idx]))

    cfg = common.LoopConfig(FLAGS.steps, FLAGS.log_every, FLAGS.eval_every,
                            FLAGS.checkpoint_every, FLAGS.resume, FLAGS.stop_at, FLAGS.impl,
                            FLAGS.batch_size, FLAGS.tensorboard)
    out = common.train_loop(common.run_label(run.name, seed, seeded), rdir, state,
                            train_step, get_batch,
                            lambda st: evaluate(eval_step, st, ds.test_x, ds.test_y), cfg,
                            stop, switch)
    rec = out["records"]
    return common.write_final(rdir, common.final_record(
        run.name, seed, run.recipe.name, switch, par, out, q_ema=run.q_ema,
        q_ramping=run.q_ramping, test_loss=common.last(rec, "eval", "test_loss"),
        test_accuracy=common.last(rec, "eval", "test_accuracy"),
        oscillating=run_mean(rec, "oscillating"),
        oscillating_last=common.last(rec, "train", "oscillating")))

  return train_seed


METRICS = ("train_loss", "test_loss", "test_accuracy", "oscillating", "oscillating_last",
           "seconds")


def report(workdir: str, finals: dict[str, list[dict]], seeds: list[int],
           seeded: bool) -> None:
  histories = common.read_histories(workdir, finals, seeded)
  common.plot_curves(histories, "test_accuracy", os.path.join(workdir, "accuracy.png"),
                     f"{FLAGS.model} on {FLAGS.dataset}: test accuracy")
  common.plot_curves(histories, "loss", os.path.join(workdir, "loss.png"),
                     f"{FLAGS.model} on {FLAGS.dataset}: train loss", kind="train", logy=True)
  quantized = {k: v for k, v in histories.items()
               if any("flip_rate" in r for h in v for r in h)}
  if quantized:
    common.plot_curves(quantized, "oscillating", os.path.join(workdir, "oscillation.png"),
                       "weights oscillating (>= 2 reversals in a 50-step window)", kind="train")
  bf16 = common.first_run_with_recipe(finals, "bf16")
  base = lambda name: common.base_run(name, finals)
  rows = common.seed_rows(finals, METRICS, [
      ("accuracy_gap_to_bf16", "test_accuracy", lambda name: bf16),
      ("loss_gap_to_bf16", "test_loss", lambda name: bf16),
      ("accuracy_gap_to_base", "test_accuracy", base)])
  common.write_finals(workdir, finals, rows)
  cols = ["run", "steps", *(["seeds"] if seeded else []), "devices", "grad_comm",
          "train_loss", "test_loss", "test_accuracy", "accuracy_gap_to_bf16",
          "loss_gap_to_bf16",
          *(["accuracy_gap_to_base"] if any("accuracy_gap_to_base" in r for r in rows)
            else []), "oscillating", "seconds"]
  common.write_summary(
      workdir, f"vit_tetrajet: {FLAGS.model} on {FLAGS.dataset}, {FLAGS.steps} steps, "
      f"batch {FLAGS.batch_size}, {common.seeds_phrase(seeds, seeded)} "
      f"({common.device_description()})",
      rows, cols, notes="Gaps are the run minus BF16 (accuracy: fraction; loss: nats) or, "
      "`_to_base`, minus the run it extends by +options (tetrajet+qema against tetrajet, a "
      "precision switch against the run without it). `oscillating`: the run's mean "
      "(over its logged steps) of the fraction of quantized weights with >= 2 direction "
      "reversals of their quantized value in a 50-step window (final.json also keeps the "
      "last window's, `oscillating_last`, and the curve is plotted). "
      + common.seeds_note(seeded),
      plots=("accuracy.png", "loss.png", "oscillation.png"))


def main(argv):
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every checkpoint at INFO
  common.initialize_distributed(FLAGS)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if FLAGS.model not in MODELS:
    raise app.UsageError(f"--model={FLAGS.model!r} is unknown; choose one of {', '.join(MODELS)}")
  try:
    seeds = seeds_lib.parse_seeds(FLAGS.seeds, FLAGS.seed)
    runs = runs_from_flags()
    pars, switch_to = {}, {}
    for r in runs:
      check_model_fits(r.recipe, FLAGS.model)
      switch_to[r.name] = switch_phase_run(r, FLAGS.block_size, FLAGS.scale_mode)
      if switch_to[r.name] is not None:
        r.switch.step(FLAGS.steps)
        check_model_fits(switch_to[r.name].recipe, FLAGS.model)
      pars[r.name] = common.Parallel.from_flags(FLAGS.mesh, FLAGS.grad_comm, r.recipe,
                                                  FLAGS.spmd, FLAGS.impl)
      pars[r.name].check_batch(FLAGS.batch_size)
    # One train/test split (--seed's) for every seed: seeds are scored on the same images.
    ds = data.load_images(FLAGS.dataset, FLAGS.data_dir, FLAGS.image_size, FLAGS.seed)
  except ValueError as e:
    raise app.UsageError(str(e))
  seeded = seeds is not None
  seeds = seeds or [FLAGS.seed]
  patch = MODELS[FLAGS.model][0]
  if ds.train_x.shape[1] % patch or ds.train_x.shape[2] % patch:
    raise app.UsageError(f"images of {ds.train_x.shape[1]}x{ds.train_x.shape[2]} are not a "
                         f"multiple of --model={FLAGS.model}'s patch {patch}: pick another "
                         "--model or --image_size")
  if len({r.name for r in runs}) != len(runs):
    raise app.UsageError(f"--compare has repeated runs: {[r.name for r in runs]}")
  if not FLAGS.report_only:
    common.write_config(FLAGS.workdir, common.script_flag_values(),
                        runs=[{"name": r.name, "recipe": r.recipe.name, "q_ema": r.q_ema,
                               "q_ramping": r.q_ramping,
                               "switch": None if r.switch is None else
                               {"recipe": r.switch.recipe, "at_step": r.switch.step(FLAGS.steps)},
                               "parallel": pars[r.name].describe()}
                              for r in runs],
                        seeds=seeds,
                        data={"train": int(len(ds.train_y)), "test": int(len(ds.test_y)),
                              "image": list(ds.train_x.shape[1:])})
  print(f"vit_tetrajet: {len(runs)} run(s) [{', '.join(r.name for r in runs)}] x "
        f"{common.seeds_phrase(seeds, seeded)} of "
        f"{FLAGS.model} on {FLAGS.dataset} ({len(ds.train_y)} train / {len(ds.test_y)} test) "
        f"on {common.device_description()} ({pars[runs[0].name].describe()}); workdir "
        f"{FLAGS.workdir}", flush=True)
  finals, stopped = common.train_or_read(
      runs, lambda r: prepare_run(r, switch_to[r.name], ds, FLAGS.workdir, pars[r.name],
                                  seeded), seeds, seeded,
      FLAGS.workdir, FLAGS.report_only)
  report(FLAGS.workdir, finals, seeds, seeded)
  if stopped:
    sys.exit(130)


if __name__ == "__main__":
  define_flags()
  common.run_main(main)
