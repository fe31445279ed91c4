r"""Quantization error over a grid of formats, on real and synthetic tensors.

    python -m experiments.sweep                                  # default grid, ~2 min on CPU
    python -m experiments.sweep --elements=e2m1,e3m0 --block_sizes=8,16,32,64,128,channel

Grid: element format x block size (or ``channel``: one scale per row) x scale format
(``e8m0``; ``ue4m3`` with NVFP4's FP32 tensor scale; ``bf16``; ``fp32``) x E8M0 scale rule
x rounding (``nearest``, ``stochastic``), each quantizing along the last axis of:

* standard distributions: normal, Laplace, Student-t with 3 degrees of freedom (heavy
  tails), uniform;
* tensors of a ViT trained in BF16 on digits for ``--capture_steps`` steps: an encoder
  weight (``block1/fc1`` kernel), the activation entering ``block1/fc2`` (after GELU) and
  the gradient of the loss with respect to the ``block1/fc1`` kernel.

Metrics: SNR in dB (``10 log10(sum x^2 / sum (x - q)^2)``), MSE relative to the tensor's
mean square, and bits per element as stored (``QArray.bits_per_element``: codes + block
scales). Writes ``sweep.csv``, ``snr_<tensor>.png`` heatmaps (rows: element x scale
format x rule x rounding; columns: block size), ``pareto.png`` (SNR against bits per
element, the Pareto front per tensor) and ``summary.md`` (the best configuration per bit
budget) to ``--workdir``. ``--train`` also trains an MLP on digits per configuration (all
six GEMM operands in that format) and plots final test loss against bits per element
(``train.csv``, ``pareto_train.png``; for ``channel`` the bits are those of the first
tensor's rows).
"""

from __future__ import annotations

import csv
import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from absl import logging as absl_logging

import fp4jax
from experiments import common, data
from fp4jax.models import MLP, ViT
from fp4jax import recipes as recipes_lib
from experiments.vit_tetrajet import MODELS

FLAGS = flags.FLAGS
DISTRIBUTIONS = ("normal", "laplace", "student_t3", "uniform")
CAPTURED = ("weight", "activation", "gradient")
SCALE_FORMATS = ("e8m0", "ue4m3", "bf16", "fp32")


def define_flags() -> None:
  """This script's absl flags (called under ``__main__``)."""
  flags.DEFINE_list("elements", ["e2m1", "e2m3", "e3m2", "e4m3"], "element formats")

  flags.DEFINE_list("block_sizes", ["16", "32", "64", "channel"], "block sizes or 'channel'")
  flags.DEFINE_list("scale_formats", ["e8m0", "ue4m3", "bf16"],
                    f"scale formats: {', '.join(SCALE_FORMATS)} (ue4m3: with an FP32 tensor "
                    "scale, as NVFP4)")
  flags.DEFINE_list("scale_modes", ["floor", "rceil"], "E8M0 scale rules (float scales: amax)")
  flags.DEFINE_list("roundings", ["nearest", "stochastic"], "rounding modes")
  flags.DEFINE_list("tensors", list(DISTRIBUTIONS + CAPTURED), "tensors to quantize")
  for name in ("elements", "block_sizes", "scale_formats", "scale_modes", "roundings",
               "tensors"):
    flags.register_validator(name, bool, f"--{name} needs at least one value (an empty list "
                             "sweeps nothing)")
  flags.DEFINE_integer("rows", 256, "rows of each synthetic tensor (columns: 1024)",
                       lower_bound=1)
  flags.DEFINE_integer("capture_steps", 200, "BF16 training steps of the ViT whose tensors "
                       "are captured", lower_bound=1)
  flags.DEFINE_integer("seed", 0, "seed of the tensors, the model and stochastic rounding")
  flags.DEFINE_string("workdir", "runs/sweep", "output directory")
  common.register_directory_validator("workdir")
  flags.DEFINE_bool("train", False, "also train an MLP on digits with every configuration "
                    "(all six GEMM operands) and plot test loss against bits per element")
  flags.DEFINE_integer("train_steps", 300, "training steps per configuration (--train)")


def synthetic(name: str, rows: int, seed: int) -> np.ndarray:
  rng = np.random.default_rng([seed, DISTRIBUTIONS.index(name)])
  shape = (rows, 1024)
  x = {"normal": lambda: rng.standard_normal(shape),
       "laplace": lambda: rng.laplace(size=shape),
       "student_t3": lambda: rng.standard_t(3, shape),
       "uniform": lambda: rng.uniform(-1, 1, shape)}[name]()
  return x.astype(np.float32)


def captured(steps: int, seed: int) -> dict[str, np.ndarray]:
  """Weight, activation and weight gradient of ``block1/fc1``/``fc2`` of a ViT trained in
  BF16 (float32 on CPU) on digits for ``steps`` steps."""
  ds = data.load_digits(seed)
  p, w, d, h, m = MODELS["vit_digits"]
  model = ViT(10, p, w, d, h, m)
  params = jax.jit(model.init)(jax.random.key(seed), jnp.asarray(ds.train_x[:2]))["params"]
  tx = optax.adamw(2e-3, weight_decay=0.05)
  opt = tx.init(params)
  loss = lambda p, x, y: optax.softmax_cross_entropy_with_integer_labels(
      model.apply({"params": p}, x), y).mean()

  @jax.jit
  def step(params, opt, x, y):
    g = jax.grad(loss)(params, x, y)
    u, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, u), opt

  for i in range(steps):
    idx = data.batches(len(ds.train_y), 128, seed, i)
    params, opt = step(params, opt, jnp.asarray(ds.train_x[idx]), jnp.asarray(ds.train_y[idx]))
  x, y = jnp.asarray(ds.train_x[:128]), jnp.asarray(ds.train_y[:128])
  acts = fp4jax.ptq.collect_linen_inputs(model, {"params": params}, x)
  grads = jax.grad(loss)(params, x, y)
  return {"weight": np.asarray(params["block1"]["fc1"]["kernel"]).T,  # (N, K): rows along K
          "activation": np.asarray(acts["block1/fc2"]),
          "gradient": np.asarray(grads["block1"]["fc1"]["kernel"]).T}


def grid() -> list[dict]:
  """The configurations of the flags' grid (E8M0 rules only for E8M0 scales)."""
  out = []
  for el, bs, sf, rnd in itertools.product(FLAGS.elements, FLAGS.block_sizes,
                                           FLAGS.scale_formats, FLAGS.roundings):
    modes = FLAGS.scale_modes if sf == "e8m0" else ["amax"]
    for mode in modes:
      out.append({"element": el, "block": bs, "scale_format": sf, "scale_mode": mode,
                  "rounding": rnd})
  return out


def make_spec(cfg: dict) -> fp4jax.QuantSpec:
  channel = cfg["block"] == "channel"
  return fp4jax.QuantSpec(
      cfg["element"], cfg["scale_format"], "channel" if channel else "block",
      block_size=32 if channel else int(cfg["block"]), scale_mode=cfg["scale_mode"],
      rounding=cfg["rounding"], tensor_scale="amax" if cfg["scale_format"] == "ue4m3" else None)


def measure(x: jax.Array, spec: fp4jax.QuantSpec, key) -> dict[str, float]:
  q = fp4jax.quantize(x, spec, -1, key=key if spec.rounding == "stochastic" else None)
  err = fp4jax.dequantize(q, jnp.float32) - x
  sig, noise = float(jnp.sum(x * x)), float(jnp.sum(err * err))
  return {"snr_db": 10 * np.log10(sig / noise) if noise > 0 else float("inf"),
          "rel_mse": noise / sig, "bits_per_element": q.bits_per_element}


def train_config(spec: fp4jax.QuantSpec | None, ds: data.ImageData, steps: int,
                 seed: int) -> dict[str, float]:
  """Final test loss / accuracy of an MLP (64-256-128-10) on digits whose hidden layers
  quantize all six GEMM operands with ``spec`` (None: unquantized), Adam 3e-3, batch 128."""
  recipe = None if spec is None else recipes_lib.Recipe("sweep", *([spec] * 6))
  model = MLP(len(ds.classes), recipe=recipe)
  params = jax.jit(model.init)({"params": jax.random.key(seed), "quant": jax.random.key(seed + 1)},
                      jnp.asarray(ds.train_x[:2]))["params"]
  tx = optax.adam(3e-3)
  opt = tx.init(params)

  def loss_fn(p, x, y, k):
    logits = model.apply({"params": p}, x, rngs={"quant": k})
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(p, o, x, y, k):
    g = jax.grad(loss_fn)(p, x, y, k)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o

  key = jax.random.key(seed + 2)
  for i in range(steps):
    idx = data.batches(len(ds.train_y), 128, seed, i)
    params, opt = step(params, opt, jnp.asarray(ds.train_x[idx]), jnp.asarray(ds.train_y[idx]),
                       jax.random.fold_in(key, i))
  logits = model.apply({"params": params}, jnp.asarray(ds.test_x),
                       rngs={"quant": jax.random.fold_in(key, steps)})
  y = jnp.asarray(ds.test_y)
  return {"test_loss": float(optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()),
          "test_accuracy": float(jnp.mean(jnp.argmax(logits, -1) == y))}


def train_plot(rows: list[dict], base: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
  pts = [(r["bits_per_element"], r["test_loss"]) for r in rows]
  ax.scatter(*zip(*pts), s=10, alpha=0.5, label="configurations")
  front = pareto([(b, -l) for b, l in pts])
  ax.plot([b for b, _ in front], [-l for _, l in front], "-o", ms=3, color="tab:red",
          label="Pareto front")
  ax.axhline(base["test_loss"], color="k", ls="--", lw=1, label="float32")
  _finish_bits_plot(fig, ax, path, "test loss after training",
                    "MLP on digits, all GEMM operands quantized")


def _finish_bits_plot(fig, ax, path: str, ylabel: str, title: str) -> None:
  """Labels (x: bits per element), grid, legend; saves and closes the figure."""
  import matplotlib.pyplot as plt
  ax.set_xlabel("bits per element (codes + block scales)")
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def heatmap(rows: list[dict], tensor: str, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  sub = [r for r in rows if r["tensor"] == tensor]
  ylab = sorted({(r["element"], r["scale_format"], r["scale_mode"], r["rounding"]) for r in sub})
  xlab = list(dict.fromkeys(r["block"] for r in sub))
  z = np.full((len(ylab), len(xlab)), np.nan)
  for r in sub:
    z[ylab.index((r["element"], r["scale_format"], r["scale_mode"], r["rounding"])),
      xlab.index(r["block"])] = r["snr_db"]
  fig, ax = plt.subplots(figsize=(2.2 + 0.9 * len(xlab), 1.2 + 0.22 * len(ylab)), dpi=120)
  im = ax.imshow(z, aspect="auto", cmap="viridis")
  ax.set_xticks(range(len(xlab)), xlab)
  ax.set_yticks(range(len(ylab)), ["/".join(t) for t in ylab], fontsize=6)
  ax.set_xlabel("block size")
  ax.set_title(f"SNR (dB): {tensor}")
  for i in range(z.shape[0]):
    for j in range(z.shape[1]):
      if np.isfinite(z[i, j]):
        ax.text(j, i, f"{z[i, j]:.1f}", ha="center", va="center", fontsize=5, color="w")
  fig.colorbar(im)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
  """The (bits, snr) points no other point beats in both (fewer bits, higher SNR)."""
  front, best = [], -np.inf
  for b, s in sorted(points, key=lambda p: (p[0], -p[1])):
    if s > best:
      front.append((b, s))
      best = s
  return front


def pareto_plot(rows: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
  for tensor in dict.fromkeys(r["tensor"] for r in rows):
    pts = [(r["bits_per_element"], r["snr_db"]) for r in rows if r["tensor"] == tensor]
    b, s = zip(*pts)
    line = ax.scatter(b, s, s=6, alpha=0.35)
    fb, fs = zip(*pareto(pts))
    ax.plot(fb, fs, "-o", ms=3, color=line.get_facecolor()[0], label=tensor)
  _finish_bits_plot(fig, ax, path, "SNR (dB)", "quantization SNR against storage: Pareto fronts")


def main(argv):
  absl_logging.set_verbosity(absl_logging.WARNING)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  try:
    bad = [t for t in FLAGS.tensors if t not in DISTRIBUTIONS + CAPTURED]
    if bad:
      raise ValueError(f"--tensors has unknown {bad}; choose from "
                       f"{', '.join(DISTRIBUTIONS + CAPTURED)}")
    bad = [b for b in FLAGS.block_sizes if b != "channel" and not b.isdigit()]
    if bad:
      raise ValueError(f"--block_sizes has {bad}: give positive integers or 'channel'")
    bad = [s for s in FLAGS.scale_formats if s not in SCALE_FORMATS]
    if bad:
      raise ValueError(f"--scale_formats has unknown {bad}; choose from {', '.join(SCALE_FORMATS)}")
    configs = grid()
    specs = [make_spec(c) for c in configs]  # validates elements, modes, roundings
  except ValueError as e:
    raise app.UsageError(str(e))
  common.write_config(FLAGS.workdir, common.script_flag_values())
  tensors = {t: synthetic(t, FLAGS.rows, FLAGS.seed) for t in FLAGS.tensors if t in DISTRIBUTIONS}
  if any(t in CAPTURED for t in FLAGS.tensors):
    print(f"sweep: training a ViT on digits for {FLAGS.capture_steps} steps to capture tensors",
          flush=True)
    cap = captured(FLAGS.capture_steps, FLAGS.seed)
    tensors.update({t: cap[t] for t in FLAGS.tensors if t in CAPTURED})
  for name, x in tensors.items():
    for c in configs:
      if c["block"] != "channel" and x.shape[-1] % int(c["block"]):
        raise app.UsageError(f"block size {c['block']} does not divide the last axis "
                             f"{x.shape[-1]} of tensor {name!r}")
  print(f"sweep: {len(configs)} configurations x {len(tensors)} tensors", flush=True)
  rows = []
  key = jax.random.key(FLAGS.seed)
  for name, x in tensors.items():
    xj = jnp.asarray(x)
    for c, spec in zip(configs, specs):
      rows.append({"tensor": name, **c, **measure(xj, spec, key)})
  os.makedirs(FLAGS.workdir, exist_ok=True)
  with open(os.path.join(FLAGS.workdir, "sweep.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  for name in tensors:
    heatmap(rows, name, os.path.join(FLAGS.workdir, f"snr_{name}.png"))
  pareto_plot(rows, os.path.join(FLAGS.workdir, "pareto.png"))
  best = []
  for name in tensors:
    sub = [r for r in rows if r["tensor"] == name]
    for b, s in pareto([(r["bits_per_element"], r["snr_db"]) for r in sub]):
      r = next(r for r in sub if r["bits_per_element"] == b and r["snr_db"] == s)
      best.append({"tensor": name, "bits_per_element": b, "snr_db": s,
                   "config": f"{r['element']}/{r['block']}/{r['scale_format']}/"
                             f"{r['scale_mode']}/{r['rounding']}"})
  notes = ("config: element / block / scale format / scale rule / rounding. "
           "All rows: sweep.csv; heatmaps: snr_<tensor>.png; fronts: pareto.png.")
  if FLAGS.train:
    bad = [c["block"] for c in configs if c["block"] != "channel" and 64 % int(c["block"])]
    if bad:
      raise app.UsageError(f"--train: block sizes {sorted(set(bad))} do not divide the MLP's "
                           "input width 64")
    ds = data.load_digits(FLAGS.seed)
    base = train_config(None, ds, FLAGS.train_steps, FLAGS.seed)
    trained = []
    for c, spec in zip(configs, specs):
      r = {**c, "bits_per_element": next(
          x["bits_per_element"] for x in rows if x["tensor"] == rows[0]["tensor"]
          and all(x[k] == c[k] for k in c)), **train_config(spec, ds, FLAGS.train_steps,
                                                            FLAGS.seed)}
      r["test_loss_gap"] = r["test_loss"] - base["test_loss"]
      trained.append(r)
      print(f"train {'/'.join(str(c[k]) for k in c)}: test loss {r['test_loss']:.4f}, "
            f"accuracy {r['test_accuracy']:.4f}", flush=True)
    with open(os.path.join(FLAGS.workdir, "train.csv"), "w", newline="") as f:
      w = csv.DictWriter(f, fieldnames=list(trained[0]))
      w.writeheader()
      w.writerows(trained)
    train_plot(trained, base, os.path.join(FLAGS.workdir, "pareto_train.png"))
    for b, negl in pareto([(r["bits_per_element"], -r["test_loss"]) for r in trained]):
      r = next(r for r in trained if r["bits_per_element"] == b and r["test_loss"] == -negl)
      best.append({"tensor": "MLP training (test loss)", "bits_per_element": b,
                   "snr_db": None, "test_loss": r["test_loss"],
                   "test_loss_gap": r["test_loss_gap"],
                   "config": "/".join(str(r[k]) for k in ("element", "block", "scale_format",
                                                          "scale_mode", "rounding"))})
    notes += (f" Training: float32 MLP test loss {base['test_loss']:.4f}, accuracy "
              f"{base['test_accuracy']:.4f}; all runs: train.csv; plot: pareto_train.png.")
  common.write_summary(FLAGS.workdir, f"sweep: the Pareto front per tensor "
                       f"({len(configs)} configurations; {common.device_description()})",
                       best, ["tensor", "bits_per_element", "snr_db", "test_loss",
                              "test_loss_gap", "config"], notes=notes)


if __name__ == "__main__":
  define_flags()
  common.run_main(main)
