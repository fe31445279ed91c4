r"""Byte-level GPT in FP4: recipes against BF16 on the Python standard library's sources.

    python -m experiments.gpt_fp4                                    # bf16, mxfp4, nvfp4
    python -m experiments.gpt_fp4 --compare=bf16,fp8,mxfp4,nvfp4,fp4_all_the_way,quartet,msfp4
    python -m experiments.gpt_fp4 --compare=nvfp4,nvfp4+nohad,nvfp4+nosr,nvfp4+no2d,nvfp4+nolastbf16
    python -m experiments.gpt_fp4 --compare=bf16,nvfp4,nvfp4+then_bf16@0.8 --seeds=3

A run is ``<recipe>[+nohad][+nosr][+no2d][+nolastbf16][+then_<recipe>@<at>]``: a recipe of
:mod:`fp4jax.recipes` with NVIDIA's ablations (NVIDIA, "Pretraining Large Language Models
with NVFP4", arXiv 2509.25149, Sec. 4-5): ``nohad`` drops the random Hadamard transforms,
``nosr`` rounds gradients to nearest instead of stochastically, ``no2d`` quantizes weights
in 1D 16-element blocks instead of 16x16 tiles, ``nolastbf16`` quantizes the last block
too (by default NVFP4 runs keep the last ``--bf16_last_blocks`` blocks in BF16, as the
paper keeps the final layers). The ``--no_hadamard``, ``--no_sr``, ``--no_2d_weights`` and
``--bf16_last_blocks=0`` flags apply the same to every run. ``+then_bf16@0.8`` is a
precision schedule (the same paper, Sec. 5): the last 20% of the steps train in BF16
(``--switch_recipe=bf16 --switch_at=0.8`` adds it to every quantized run).

Seeds: ``--seeds=3`` repeats every run for seeds ``--seed`` .. ``--seed+2`` (its own
initialisation, data order and rounding keys; the validation windows stay fixed) and
the summary reports mean ± std over seeds, gaps to BF16 paired by seed
(:mod:`experiments.seeds`).

Data: ``--dataset=stdlib`` (default: this interpreter's standard library ``.py`` files as a
byte stream, last 5% held out) or ``--dataset=text --data_dir=...`` (any text files).
Metrics: train loss, validation loss in nats per byte and bits per byte. Outputs as
``experiments.vit_tetrajet``: config.json, <run>/metrics.jsonl, checkpoints, final.json,
val_loss.png, loss.png, summary.md (with the loss gap to BF16 and, for an ablation or a
schedule, to the run it modifies), final.json (every seed).
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from absl import logging as absl_logging

from experiments import common, data
from experiments import seeds as seeds_lib
from fp4jax import qragged
from fp4jax.models import GPT, GPT_CONFIGS, MOE_AUX_LOSS
from fp4jax import recipes as recipes_lib

FLAGS = flags.FLAGS


def define_flags() -> None:
  """This script's absl flags (called under ``__main__``; see common.define_training_flags)."""
  flags.DEFINE_list("compare", ["bf16", "mxfp4", "nvfp4"],
                    "runs: <recipe>[+nohad][+nosr][+no2d][+nolastbf16], e.g. "
                    "bf16,fp8,mxfp4,nvfp4,fp4_all_the_way,quartet,msfp4")
  flags.DEFINE_bool("no_hadamard", False, "ablation for every run: no random Hadamard transforms")
  flags.DEFINE_bool("no_sr", False, "ablation for every run: nearest rounding for gradients")
  flags.DEFINE_bool("no_2d_weights", False, "ablation for every run: 1D weight blocks, not tiles")
  flags.DEFINE_integer("bf16_last_blocks", 1, "NVFP4 runs keep this many last blocks in BF16 "
                       "(0: the ablation 'no BF16 last layers')")
  flags.DEFINE_integer("block_size", None, "override every block size (tiles: block x block)")
  flags.DEFINE_string("model", "gpt_tiny", f"one of {', '.join(GPT_CONFIGS)} (*_moe: "
                      "mixture-of-experts MLPs, expert GEMMs quantized per expert)")
  flags.DEFINE_float("moe_aux_weight", 0.01, "MoE models: weight of the load-balancing loss "
                     "(Switch Transformer's; mean over blocks) in the training loss",
                     lower_bound=0.0)
  flags.DEFINE_enum("dataset", "stdlib", list(data.TEXT_DATASETS), "training text")
  flags.DEFINE_string("data_dir", None, "text files for --dataset=text (file, folder or list)")
  flags.DEFINE_integer("max_bytes", 4_000_000, "bytes of text to read", lower_bound=1)
  flags.DEFINE_integer("context", None, "sequence length (default: the model's context)",
                       lower_bound=1)
  flags.DEFINE_integer("eval_batches", 8, "validation batches (fixed windows)", lower_bound=1)
  flags.DEFINE_bool("scan_layers", False, "run the quantized blocks as one nn.scan (one "
                    "block compiled instead of depth: GPT-small compiles in seconds)")
  common.define_training_flags(workdir="runs/gpt_fp4", steps=600, batch_size=16,
                               batch_what="sequences", lr=2e-3, weight_decay=0.1, warmup=60,
                               eval_every=100, log_every=25, checkpoint_every=200)
  flags.adopt_module_key_flags(common)   # --help lists --steps, --lr, --workdir, ...


ABLATIONS = ("nohad", "nosr", "no2d", "nolastbf16")


class RunSpec(NamedTuple):
  name: str
  recipe: recipes_lib.Recipe
  bf16_last_blocks: int
  switch: common.SwitchSpec | None = None


def ablate(recipe: recipes_lib.Recipe, options: set[str]) -> recipes_lib.Recipe:
  """NVIDIA's ablations of a recipe (see the module docstring)."""
  changes: dict[str, Any] = {}
  if "nohad" in options:
    changes.update(hadamard_fwd=None, hadamard_dgrad=None, hadamard_wgrad=None)
  for op in common.OPERANDS:
    spec = changes.get(op, getattr(recipe, op))
    if spec is None:
      continue
    if "nosr" in options and spec.rounding == "stochastic":
      spec = spec.replace(rounding="nearest")
    if "no2d" in options and spec.granularity == "tile":
      spec = spec.replace(granularity="block", block_size=spec.tile[-1])
    changes[op] = spec
  return recipe.replace(**changes)


def parse_run(name: str, *, no_hadamard: bool = False, no_sr: bool = False,
              no_2d_weights: bool = False, bf16_last_blocks: int = 1,
              block_size: int | None = None) -> RunSpec:
  """``<recipe>[+nohad][+nosr][+no2d][+nolastbf16][+then_<recipe>@<at>]`` (and the flags'
  ablations) -> RunSpec."""
  parts = [p.strip() for p in name.split("+") if p.strip()]
  if not parts:
    raise ValueError(f"empty run name {name!r}")
  rest, switch = common.split_switch(parts[1:])
  options = set(rest)
  unknown = options - set(ABLATIONS)
  if unknown:
    raise ValueError(f"run {name!r}: unknown ablation(s) {sorted(unknown)}; use "
                     f"{', '.join('+' + a for a in ABLATIONS)}")
  options |= {o for o, on in (("nohad", no_hadamard), ("nosr", no_sr),
                              ("no2d", no_2d_weights)) if on}
  recipe = common.build_recipe(parts[0], block_size)
  if recipe.is_identity and (options or switch):
    raise ValueError(f"run {name!r}: ablations and a precision switch need a quantized "
                     "recipe")
  recipe = ablate(recipe, options)
  nvfp4_like = any(getattr(recipe, op) is not None and getattr(recipe, op).tensor_scale
                   for op in common.OPERANDS)
  last = 0 if recipe.is_identity or "nolastbf16" in options or not nvfp4_like \
      else bf16_last_blocks
  return RunSpec(name, recipe, last, switch)


def switch_phase_run(run: RunSpec, **flag_ablations) -> RunSpec | None:
  """The run a precision schedule switches to: the switch recipe with the flags'
  ablations, keeping the run's BF16 last blocks (so the parameters keep their layout)."""
  if run.switch is None:
    return None
  if "+" in run.switch.recipe:
    raise ValueError(f"run {run.name!r}: switch to a plain recipe (e.g. then_bf16@0.8), not "
                     f"{run.switch.recipe!r}")
  to = parse_run(run.switch.recipe, **flag_ablations)
  if to.recipe.name == run.recipe.name:
    raise ValueError(f"run {run.name!r} switches to its own recipe {to.recipe.name!r}")
  return to._replace(name=f"{run.name} (after the switch)", bf16_last_blocks=run.bf16_last_blocks)


def check_model_fits(run: RunSpec, model: str, context: int, batch: int) -> None:
  cfg = GPT_CONFIGS[model]
  width, depth, mlp = cfg.width, cfg.depth, cfg.mlp
  if run.bf16_last_blocks > depth:
    raise ValueError(f"--bf16_last_blocks={run.bf16_last_blocks} exceeds the depth {depth}")
  common.check_widths_fit(run.recipe, {"width": width, "MLP width": mlp,
                                       "tokens per batch": batch * context}, model)
  # An MoE's expert GEMMs contract the width (forward) and the MLP width (dgrad) per
  # expert; their tokens (wgrad) are padded per expert, so any batch fits. The recipe
  # must be one qragged_dot can keep per expert.
  why = None if not cfg.experts or run.recipe.is_identity else \
      qragged.unsupported_reason(run.recipe)
  if why is not None:
    raise ValueError(f"run {run.name!r} on {model}: the experts' grouped GEMMs cannot use "
                     f"recipe {run.recipe.name!r} ({why}); choose a block-scaled recipe "
                     "(e.g. mxfp4, nvfp4)")


def split_text(stream: np.ndarray, context: int) -> tuple[np.ndarray, np.ndarray]:
  n_val = max(len(stream) // 20, context + 1)
  if len(stream) - n_val < context + 1:
    raise ValueError(f"the text has {len(stream)} bytes: too few for --context={context} "
                     "(need at least 20x the context); add text or lower --context")
  return stream[:-n_val], stream[-n_val:]


def windows(stream: np.ndarray, starts: np.ndarray, context: int):
  idx = starts[:, None] + np.arange(context + 1)[None]
  seq = stream[idx].astype(np.int32)
  return seq[:, :-1], seq[:, 1:]


def make_steps(model: GPT, tx, par: common.Parallel, state: common.TrainState):
  """The jitted train and eval steps (sharded over ``par``'s mesh, if any)."""
  def loss_fn(params, x, y, key):
    logits = model.apply({"params": params}, x, rngs={"quant": key})
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def train_loss(params, x, y, key):
    if not model.experts:
      return loss_fn(params, x, y, key)
    # Mixture of experts: + the Switch load-balancing loss of every MoE block.
    logits, inter = model.apply({"params": params}, x, rngs={"quant": key},
                                mutable=["intermediates"])
    aux = sum(jnp.sum(v) for path, v in jax.tree_util.tree_leaves_with_path(inter)
              if MOE_AUX_LOSS in jax.tree_util.keystr(path))
    return (optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            + FLAGS.moe_aux_weight * aux / model.depth)

  grad_fn = par.value_and_grad(train_loss, batch_argnums=(0, 1), key_argnum=2)

  def train_step(state: common.TrainState, x, y):
    key = jax.random.fold_in(state.key, state.step)
    loss, grads = grad_fn(state.params, x, y, key)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return (common.TrainState(state.step + 1, optax.apply_updates(state.params, updates),
                              opt_state, state.key),
            {"loss": loss, "grad_norm": optax.global_norm(grads)})

  @jax.jit
  def eval_step(state: common.TrainState, x, y):
    return loss_fn(state.params, x, y, jax.random.fold_in(state.key, 2**31 - 1))

  return par.jit_train_step(train_step, state, (2, 2)), eval_step


def build_model(run: RunSpec) -> GPT:
  return GPT.from_name(FLAGS.model, recipe=None if run.recipe.is_identity else run.recipe,
                       dtype=common.compute_dtype(FLAGS.dtype),
                       high_precision_last=run.bf16_last_blocks, scan_layers=FLAGS.scan_layers)


def prepare_run(run: RunSpec, switch_to: RunSpec | None, train: np.ndarray, val: np.ndarray,
                context: int, workdir: str, par: common.Parallel, seeded: bool):
  """What a run's seeds share (model, optimizer, the jitted steps: compiled once) ->
  ``train_seed(seed, stop) -> final metrics`` (:func:`common.train_runs`)."""
  model = build_model(run)
  sched = optax.warmup_cosine_decay_schedule(0.0, FLAGS.lr, min(FLAGS.warmup, FLAGS.steps // 2),
                                             max(FLAGS.steps, 1), FLAGS.lr * 0.1)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(sched, b2=0.95, weight_decay=FLAGS.weight_decay))
  init = jax.jit(model.init)
  steps: dict[str, Any] = {}     # built at the first seed (shardings follow its state)
  val_starts = np.random.default_rng(12345).integers(
      0, len(val) - context - 1, (FLAGS.eval_batches, FLAGS.batch_size))

  def make_evaluate(eval_step):
    def evaluate(st):
      losses = [float(eval_step(st, *map(jnp.asarray, windows(val, s, context))))
                for s in val_starts]
      loss = float(np.mean(losses))
      return {"val_loss": loss, "val_bits_per_byte": loss / math.log(2)}
    return evaluate

  def train_seed(seed: int, stop: common.StopRequested) -> dict[str, Any]:
    init_key, quant_key = jax.random.split(jax.random.key(seed))
    params = init({"params": init_key, "quant": quant_key},
                  jnp.zeros((1, context), jnp.int32))["params"]
    state = par.place_state(
        common.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), quant_key))
    if not steps:
      steps["main"] = make_steps(model, tx, par, state)
      if switch_to is not None:
        steps["switch"] = make_steps(build_model(switch_to), tx, par, state)
    train_step, eval_step = steps["main"]
    switch = None
    if switch_to is not None:
      switch = common.Phase(run.switch.step(FLAGS.steps), switch_to.recipe.name,
                            steps["switch"][0], make_evaluate(steps["switch"][1]))

    def get_batch(step):
      starts = np.random.default_rng([seed, step]).integers(0, len(train) - context - 1,
                                                            FLAGS.batch_size)
      return par.batch(windows(train, starts, context))

    cfg = common.LoopConfig(FLAGS.steps, FLAGS.log_every, FLAGS.eval_every,
                            FLAGS.checkpoint_every, FLAGS.resume, FLAGS.stop_at, FLAGS.impl,
                            FLAGS.batch_size * context, FLAGS.tensorboard)
    rdir = seeds_lib.run_dir(workdir, run.name, seed, seeded)
    out = common.train_loop(common.run_label(run.name, seed, seeded), rdir, state, train_step,
                            get_batch, make_evaluate(eval_step), cfg, stop, switch)
    rec = out["records"]
    return common.write_final(rdir, common.final_record(
        run.name, seed, run.recipe.name, switch, par, out,
        bf16_last_blocks=run.bf16_last_blocks, val_loss=common.last(rec, "eval", "val_loss"),
        val_bits_per_byte=common.last(rec, "eval", "val_bits_per_byte")))

  return train_seed


METRICS = ("train_loss", "val_loss", "val_bits_per_byte", "seconds")


def main(argv):
  absl_logging.set_verbosity(absl_logging.WARNING)
  common.initialize_distributed(FLAGS)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if FLAGS.model not in GPT_CONFIGS:
    raise app.UsageError(f"--model={FLAGS.model!r} is unknown; choose one of "
                         f"{', '.join(GPT_CONFIGS)}")
  context = FLAGS.context or GPT_CONFIGS[FLAGS.model][4]
  if context > GPT_CONFIGS[FLAGS.model][4]:
    raise app.UsageError(f"--context={context} exceeds {FLAGS.model}'s {GPT_CONFIGS[FLAGS.model][4]}")
  ablations = dict(no_hadamard=FLAGS.no_hadamard, no_sr=FLAGS.no_sr,
                   no_2d_weights=FLAGS.no_2d_weights, bf16_last_blocks=FLAGS.bf16_last_blocks,
                   block_size=FLAGS.block_size)
  try:
    seeds = seeds_lib.parse_seeds(FLAGS.seeds, FLAGS.seed)
    names = common.with_switch_flags(FLAGS.compare, FLAGS.switch_recipe, FLAGS.switch_at)
    runs = [parse_run(n, **ablations) for n in names]
    if len({r.name for r in runs}) != len(runs):
      raise ValueError(f"--compare has repeated runs: {names}")
    pars, switch_to = {}, {}
    for r in runs:
      check_model_fits(r, FLAGS.model, context, FLAGS.batch_size)
      switch_to[r.name] = switch_phase_run(r, **ablations)
      if switch_to[r.name] is not None:
        r.switch.step(FLAGS.steps)
        check_model_fits(switch_to[r.name], FLAGS.model, context, FLAGS.batch_size)
      pars[r.name] = common.Parallel.from_flags(FLAGS.mesh, FLAGS.grad_comm, r.recipe,
                                                  FLAGS.spmd, FLAGS.impl)
      pars[r.name].check_batch(FLAGS.batch_size)
    train, val = split_text(data.load_bytes(FLAGS.dataset, FLAGS.data_dir, FLAGS.max_bytes),
                            context)
  except ValueError as e:
    raise app.UsageError(str(e))
  seeded = seeds is not None
  seeds = seeds or [FLAGS.seed]
  if not FLAGS.report_only:
    common.write_config(FLAGS.workdir, common.script_flag_values(),
                        runs=[{"name": r.name, "recipe": r.recipe.name,
                               "bf16_last_blocks": r.bf16_last_blocks,
                               "switch": None if r.switch is None else
                               {"recipe": r.switch.recipe, "at_step": r.switch.step(FLAGS.steps)},
                               "parallel": pars[r.name].describe()} for r in runs],
                        seeds=seeds,
                        data={"train_bytes": int(len(train)), "val_bytes": int(len(val))})
  print(f"gpt_fp4: {len(runs)} run(s) [{', '.join(r.name for r in runs)}] x "
        f"{common.seeds_phrase(seeds, seeded)} of {FLAGS.model} on "
        f"{FLAGS.dataset} ({len(train)} train / {len(val)} validation bytes) on "
        f"{common.device_description()} ({pars[runs[0].name].describe()}); workdir "
        f"{FLAGS.workdir}", flush=True)
  finals, stopped = common.train_or_read(
      runs, lambda r: prepare_run(r, switch_to[r.name], train, val, context, FLAGS.workdir,
                                  pars[r.name], seeded), seeds, seeded,
      FLAGS.workdir, FLAGS.report_only)
  histories = common.read_histories(FLAGS.workdir, finals, seeded)
  common.plot_curves(histories, "val_loss", os.path.join(FLAGS.workdir, "val_loss.png"),
                     f"{FLAGS.model} on {FLAGS.dataset}: validation loss", ylabel="nats/byte")
  common.plot_curves(histories, "loss", os.path.join(FLAGS.workdir, "loss.png"),
                     f"{FLAGS.model} on {FLAGS.dataset}: train loss", kind="train",
                     ylabel="nats/byte", logy=True)
  bf16 = common.first_run_with_recipe(finals, "bf16")
  gaps = [("val_loss_gap_to_bf16", "val_loss", lambda name: bf16),
          ("val_loss_gap_to_base", "val_loss", lambda name: common.base_run(name, finals))]
  rows = common.seed_rows(finals, METRICS, gaps)
  common.write_finals(FLAGS.workdir, finals, rows)
  columns = ["run", "steps", *(["seeds"] if seeded else []), "devices", "grad_comm",
             "bf16_last_blocks", "train_loss", "val_loss", "val_bits_per_byte",
             "val_loss_gap_to_bf16",
             *(["val_loss_gap_to_base"] if any("val_loss_gap_to_base" in r for r in rows)
               else []), "seconds"]
  common.write_summary(
      FLAGS.workdir, f"gpt_fp4: {FLAGS.model} on {FLAGS.dataset}, {FLAGS.steps} steps, batch "
      f"{FLAGS.batch_size}x{context} bytes, {common.seeds_phrase(seeds, seeded)} "
      f"({common.device_description()})",
      rows, columns,
      notes="Losses in nats per byte; a gap is the run minus BF16 (`_to_bf16`) or minus the "
      "run it extends by +options (`_to_base`: an ablation or a precision switch against the "
      "run without it). " + common.seeds_note(seeded),
      plots=("val_loss.png", "loss.png"))
  if stopped:
    sys.exit(130)


if __name__ == "__main__":
  define_flags()
  common.run_main(main)
