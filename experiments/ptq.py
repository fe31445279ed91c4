r"""Post-training quantization of a trained ViT to MXFP4 / NVFP4: RTN, RTN + Hadamard, GPTQ
(the FP-Quant workflow: Egiazarian et al. 2025, arXiv 2509.23202).

    python -m experiments.ptq                        # trains a BF16 ViT on digits first
    python -m experiments.ptq --from_workdir=runs/vit_bf16 --run=bf16
                                                     # a vit_tetrajet run (--noscan_layers)

The encoder blocks' kernels become packed FP4 storage (``fp4jax.ptq.quantize_params``);
the patch embedding and the head stay in high precision. GPTQ calibrates on
``--calibration`` training images. For every format x method the script reports test
accuracy and loss of the weight-quantized model, the output MSE against the BF16 model and
the measured bytes of the weights (``fp4jax.ptq.nbytes``: codes + scales), and writes
``results.json``, ``summary.md`` and ``ptq.png`` to ``--workdir``.

FP4 weights in and out (the gpt-oss MXFP4 layout, ``fp4jax.interop``):

    python -m experiments.ptq --export=runs/ptq/files     # also writes <format>_<method>.safetensors
    python -m experiments.ptq --evaluate_file=runs/ptq/files/mxfp4_gptq.safetensors

``--export`` writes each MXFP4 result of a plain method (rtn, gptq) as a safetensors file:
the quantized kernels as ``.blocks`` / ``.scales`` pairs, the rest in float, and the model
and data in the file's metadata. ``--evaluate_file`` reads one in a fresh process, rebuilds
the model and evaluates it with the packed weights through the weight-only GEMM path
(``fp4jax.ptq.weight_only_apply``; ``--impl=pallas`` for the kernel, ``auto`` lets the
dispatch choose), writing ``evaluate.json``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from absl import logging as absl_logging

import fp4jax
from experiments import common, data
from fp4jax.models import ViT
from experiments.vit_tetrajet import MODELS
from fp4jax import ptq

FLAGS = flags.FLAGS


def define_flags() -> None:
  """This script's absl flags (called under ``__main__``)."""
  flags.DEFINE_list("formats", ["mxfp4", "nvfp4"], "storage formats (fp4jax presets)")
  flags.DEFINE_list("methods", list(ptq.METHODS), f"PTQ methods: {', '.join(ptq.METHODS)}")
  flags.DEFINE_string("from_workdir", None, "a vit_tetrajet workdir holding a trained run "
                      "(trained with --noscan_layers); default: train a BF16 ViT here")
  flags.DEFINE_string("run", "bf16", "the run of --from_workdir to quantize")
  flags.DEFINE_string("model", "vit_digits", f"ViT to train when no --from_workdir: "
                      f"{', '.join(MODELS)}")
  flags.DEFINE_integer("train_steps", 600, "BF16 training steps when no --from_workdir",
                       lower_bound=1)
  flags.DEFINE_integer("calibration", 512, "training images for GPTQ's Hessians",
                       lower_bound=1)
  flags.DEFINE_integer("hadamard_block", 16, "Hadamard rotation block of the *_hadamard methods")
  flags.DEFINE_integer("seed", 0, "seed of training, data split and calibration sample")
  flags.DEFINE_string("workdir", "runs/ptq", "output directory")
  common.register_directory_validator("workdir")
  flags.DEFINE_string("export", None, "also write each MXFP4 rtn/gptq result to this "
                      "directory as <format>_<method>.safetensors (gpt-oss layout)")
  flags.register_validator("export", lambda v: v is None or
                           common.writable_directory_problem(v) is None,
                           "--export must be a directory this process can write")
  flags.DEFINE_string("evaluate_file", None, "evaluate one --export file (a fresh process: "
                      "no training, no quantization) through the weight-only GEMM path")
  flags.DEFINE_enum("impl", "auto", ["auto", "xla", "pallas"], "--evaluate_file's "
                    "weight-only GEMM: the dispatch's choice, dequantize, or the kernel")


def encoder_kernels(spec):
  """Weight spec function: the encoder blocks' kernels, blocked along K."""
  spec = fp4jax.get_spec(spec)

  def fn(path, leaf):
    p = fp4jax.optim.weights.path_str(path)
    return (spec, -2) if p.startswith("block") and p.endswith("kernel") else None
  return fn


def train_bf16(model: ViT, ds: data.ImageData, steps: int, seed: int):
  """AdamW (warmup + cosine) as experiments.vit_tetrajet's defaults; returns params."""
  sched = optax.warmup_cosine_decay_schedule(0.0, 2e-3, min(100, steps // 2), max(steps, 1), 2e-5)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.05))
  params = jax.jit(model.init)(jax.random.key(seed), jnp.asarray(ds.train_x[:2]))["params"]
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, x, y):
    g = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": p}, x), y).mean())(params)
    u, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, u), opt

  for i in range(steps):
    idx = data.batches(len(ds.train_y), 128, seed, i)
    params, opt = step(params, opt, jnp.asarray(ds.train_x[idx]), jnp.asarray(ds.train_y[idx]))
  return params


METADATA_PREFIX = "experiments.ptq."
EXPORTABLE_METHODS = ("rtn", "gptq")   # plain QArrays; the *_hadamard ones are rotated


SOURCE_KEYS = ("model", "dataset", "data_dir", "image_size", "seed")


def _source_metadata(source: dict[str, Any]) -> dict[str, str]:
  """What a file --export writes needs to rebuild its model and data (its metadata)."""
  return {METADATA_PREFIX + k: str(source.get(k)) for k in SOURCE_KEYS}


def evaluate_file(path: str) -> dict:
  """Reads an --export file, rebuilds its ViT and data, evaluates through the weight-only
  GEMM path; returns the scores."""
  from safetensors import safe_open
  from fp4jax import interop
  if not os.path.isfile(path):
    raise ValueError(f"--evaluate_file={path!r} does not exist")
  try:
    with safe_open(path, "np") as f:
      meta = f.metadata() or {}
  except Exception as e:   # safetensors raises its own SafetensorError for a bad header
    raise ValueError(f"--evaluate_file={path!r} is not a safetensors file ({e})") from None
  src = {k[len(METADATA_PREFIX):]: v for k, v in meta.items() if k.startswith(METADATA_PREFIX)}
  if "model" not in src or src["model"] not in MODELS:
    raise ValueError(f"--evaluate_file={path!r} has no {METADATA_PREFIX}model metadata naming "
                     f"one of {', '.join(MODELS)}: write it with --export")
  none = lambda v: None if v in (None, "None") else v
  size = none(src.get("image_size"))   # the data the model was trained on, resized alike
  ds = data.load_images(src.get("dataset", "digits"), none(src.get("data_dir")),
                        int(size) if size else None, int(src.get("seed", 0)))
  p, w, d, h, m = MODELS[src["model"]]
  model = ViT(len(ds.classes), p, w, d, h, m)
  params = interop.load_safetensors(path, dtype=jnp.float32)
  x, y = jnp.asarray(ds.test_x), jnp.asarray(ds.test_y)
  logits = jax.jit(lambda p, x: ptq.weight_only_apply(model, {"params": p}, x,
                                                      impl=FLAGS.impl))(params, x)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return {"file": path, "model": src["model"], "impl": FLAGS.impl,
          "test_accuracy": float(jnp.mean(logits.argmax(-1) == y)), "test_loss": float(loss),
          "weight_bytes": ptq.nbytes(params)}


def load_run(workdir: str, run: str):
  """(model, params, dataset, source) of a vit_tetrajet run, rebuilt from its config.json
  (source: the flags that rebuild model and data, :data:`SOURCE_KEYS`)."""
  cfg_path = os.path.join(workdir, "config.json")
  if not os.path.exists(cfg_path):
    raise ValueError(f"--from_workdir={workdir!r} has no config.json: point it at a "
                     "python -m experiments.vit_tetrajet --workdir")
  cfg = json.load(open(cfg_path))["flags"]
  if cfg.get("scan_layers"):
    raise ValueError(f"--from_workdir={workdir!r} was trained with scanned layers; GPTQ needs "
                     "each layer's inputs: train it with --noscan_layers")
  ds = data.load_images(cfg["dataset"], cfg.get("data_dir"), cfg.get("image_size"), cfg["seed"])
  p, w, d, h, m = MODELS[cfg["model"]]
  model = ViT(len(ds.classes), p, w, d, h, m)
  params = jax.jit(model.init)(jax.random.key(0), jnp.asarray(ds.train_x[:2]))["params"]
  ckpt = fp4jax.checkpoint.Checkpointer(os.path.join(workdir, run, "checkpoints"))
  if ckpt.latest_step() is None:
    raise ValueError(f"no checkpoint in {os.path.join(workdir, run, 'checkpoints')}")
  # The run's state is {step, params, opt_state, key}; restore only its params.
  restored = ckpt.restore(None)
  ckpt.close()
  params = jax.tree.map(lambda t, r: jnp.asarray(r, t.dtype), params, restored["params"])
  return model, params, ds, {k: cfg.get(k) for k in SOURCE_KEYS}


def main(argv):
  absl_logging.set_verbosity(absl_logging.WARNING)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if FLAGS.evaluate_file:
    try:
      scores = evaluate_file(FLAGS.evaluate_file)
    except (ValueError, FileNotFoundError) as e:
      raise app.UsageError(str(e))
    os.makedirs(FLAGS.workdir, exist_ok=True)
    with open(os.path.join(FLAGS.workdir, "evaluate.json"), "w") as f:
      json.dump(scores, f, indent=1)
    print(f"ptq: {FLAGS.evaluate_file}: accuracy {scores['test_accuracy']:.4f}, loss "
          f"{scores['test_loss']:.4f} ({scores['weight_bytes']} bytes of weights, "
          f"impl={FLAGS.impl})", flush=True)
    return
  try:
    for f in FLAGS.formats:
      fp4jax.get_spec(f)
    bad = [m for m in FLAGS.methods if m not in ptq.METHODS]
    if bad:
      raise ValueError(f"--methods has unknown {bad}; choose from {', '.join(ptq.METHODS)}")
    if FLAGS.from_workdir:
      model, params, ds, source = load_run(FLAGS.from_workdir, FLAGS.run)
    else:
      if FLAGS.model not in MODELS:
        raise ValueError(f"--model={FLAGS.model!r} is unknown; choose one of {', '.join(MODELS)}")
      ds = data.load_digits(FLAGS.seed)
      p, w, d, h, m = MODELS[FLAGS.model]
      model = ViT(len(ds.classes), p, w, d, h, m)
      params = None
      source = {"model": FLAGS.model, "dataset": "digits", "seed": FLAGS.seed}
    if FLAGS.calibration > len(ds.train_y):   # before any training: a usage error
      raise ValueError(f"--calibration={FLAGS.calibration} is more than the "
                       f"{len(ds.train_y)} training images; pass at most that many")
  except ValueError as e:
    raise app.UsageError(str(e))
  common.write_config(FLAGS.workdir, common.script_flag_values())
  if params is None:
    print(f"ptq: training a BF16 {FLAGS.model} for {FLAGS.train_steps} steps", flush=True)
    params = train_bf16(model, ds, FLAGS.train_steps, FLAGS.seed)
  x_test, y_test = jnp.asarray(ds.test_x), jnp.asarray(ds.test_y)
  apply = jax.jit(lambda p, x: model.apply({"params": ptq.dequantize_params(p)}, x))

  def scores(p, ref=None):
    logits = apply(p, x_test)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y_test).mean()
    out = {"test_accuracy": float(jnp.mean(jnp.argmax(logits, -1) == y_test)),
           "test_loss": float(loss)}
    if ref is not None:
      out["output_mse"] = float(jnp.mean((logits - ref) ** 2))
    return out, logits

  base, ref_logits = scores(params)
  rows = [{"format": "float", "method": "-", **base, "output_mse": 0.0,
           "weight_bytes": ptq.nbytes(params)}]
  cal_idx = np.random.default_rng(FLAGS.seed).choice(len(ds.train_y), FLAGS.calibration, False)
  cal = ptq.collect_linen_inputs(model, {"params": params}, jnp.asarray(ds.train_x[cal_idx]))
  for fmt in FLAGS.formats:
    for method in FLAGS.methods:
      q = ptq.quantize_params(params, fmt, method, weights=encoder_kernels(fmt),
                              calibration=cal, hadamard_block=FLAGS.hadamard_block)
      sc, _ = scores(q, ref_logits)
      rows.append({"format": fmt, "method": method, **sc, "weight_bytes": ptq.nbytes(q)})
      if FLAGS.export:
        _export(q, fmt, method, rows[-1], source)
      print(f"{fmt:6} {method:14} accuracy {sc['test_accuracy']:.4f}  loss "
            f"{sc['test_loss']:.4f}  output MSE {sc['output_mse']:.5f}  "
            f"{rows[-1]['weight_bytes']} bytes", flush=True)
  for r in rows:
    r["accuracy_gap"] = r["test_accuracy"] - base["test_accuracy"]
  with open(os.path.join(FLAGS.workdir, "results.json"), "w") as f:
    json.dump(rows, f, indent=1)
  _plot(rows, os.path.join(FLAGS.workdir, "ptq.png"))
  common.write_summary(
      FLAGS.workdir, f"ptq: {FLAGS.run if FLAGS.from_workdir else FLAGS.model} "
      f"({common.device_description()})", rows,
      ["format", "method", "test_accuracy", "accuracy_gap", "test_loss", "output_mse",
       "weight_bytes"],
      notes="Weights of the encoder blocks in packed FP4 (codes + scales, measured bytes of "
      "the whole parameter tree); embedding and head in float32. accuracy_gap: minus the "
      "float model. Plot: ptq.png.")


def _export(q, fmt: str, method: str, row: dict, source: dict[str, Any]) -> None:
  """Writes ``q`` to ``--export`` in the gpt-oss MXFP4 layout (MXFP4, plain methods)."""
  from fp4jax import interop
  spec = fp4jax.get_spec(fmt)
  mxfp4 = (spec.element.name, spec.scale_format.name, spec.block_size) == ("e2m1", "e8m0",
                                                                          interop.BLOCK)
  if method not in EXPORTABLE_METHODS or not mxfp4:
    print(f"ptq: --export: {fmt} {method} not written (the gpt-oss layout holds MXFP4 "
          f"weights quantized by {'/'.join(EXPORTABLE_METHODS)})", flush=True)
    return
  os.makedirs(FLAGS.export, exist_ok=True)
  path = os.path.join(FLAGS.export, f"{fmt}_{method}.safetensors")
  interop.save_safetensors(path, q, metadata=_source_metadata(source))
  row["file"] = path
  print(f"ptq: wrote {path}", flush=True)


def _plot(rows, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
  labels = [f"{r['format']}\n{r['method']}" for r in rows]
  ax.bar(range(len(rows)), [r["output_mse"] for r in rows], color="tab:blue")
  ax.set_xticks(range(len(rows)), labels, fontsize=6)
  ax.set_ylabel("output MSE vs float")
  ax.set_title("PTQ of the encoder weights")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


if __name__ == "__main__":
  define_flags()
  common.run_main(main)
