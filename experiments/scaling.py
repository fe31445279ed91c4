r"""Data-parallel scaling of the FP4 training step: one device against a mesh of several.

    python -m experiments.scaling --meshes="data:1;data:2" --models=vit_s16,gpt_small \
        --recipes=bf16,mxfp4 [--batch_per_device 128] [--spmd auto] [--grad_comms f32,fp8_e4m3]

For each model x recipe x gradient communication x mesh, the experiments' own train step
(``experiments.vit_tetrajet.make_steps`` / ``experiments.gpt_fp4.make_steps`` with
``experiments.common.Parallel``: FSDP-placed state, batch split over the mesh, AdamW)
runs on synthetic data at a fixed batch *per device* (weak scaling). Reports the median
step time, examples per second and the scaling efficiency
``throughput(N devices) / (N x throughput(1 device))`` against the first mesh of the
same model and recipe, and the step's loss (the same initial parameters and data on every
mesh, so the first-step losses agree within reduction order). Writes
``experiments/results/scaling_<gpu>.json`` and a bar plot beside it.
"""

from __future__ import annotations

import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("meshes", "data:1;data:2", "';'-separated meshes to compare (the first "
                      "is the base), e.g. 'data:1;data:2;data:2,fsdp:2'")
  flags.DEFINE_list("models", ["vit_s16", "gpt_small"], "ViT (experiments.vit_tetrajet.MODELS) "
                    "or GPT (fp4jax.models.GPT_CONFIGS) configurations")
  flags.DEFINE_list("recipes", ["bf16", "mxfp4"], "recipes")
  flags.DEFINE_list("grad_comms", ["f32"], "gradient communication (fp4jax.distributed)")
  flags.DEFINE_enum("spmd", "auto", ["auto", "partitioner", "shard_map"], "see experiments.common")
  flags.DEFINE_integer("batch_per_device", None, "examples per device per step (default: 128 "
                       "images for ViT, 8 sequences for GPT)")
  flags.DEFINE_integer("image", None, "ViT image side (default 224 for 16-pixel patches, else 8)")
  flags.DEFINE_integer("context", None, "GPT sequence length (default: the model's)")
  flags.DEFINE_integer("reps", 10, "timed steps per configuration (after two warm-up steps)")
  flags.DEFINE_string("dtype", "auto", "compute dtype (auto: bfloat16 on GPU)")
  flags.DEFINE_string("out", None, "JSON path (default experiments/results/scaling_<device>.json)")


def _model(name: str, recipe):
  """(kind "vit" or "gpt", the Flax model, an input for init)."""
  from experiments import common, vit_tetrajet
  from fp4jax.models import GPT, GPT_CONFIGS, ViT
  if name not in vit_tetrajet.MODELS and name not in GPT_CONFIGS:
    raise ValueError(f"--models: unknown model {name!r}; ViT: "
                     f"{', '.join(vit_tetrajet.MODELS)}; GPT: {', '.join(GPT_CONFIGS)}")
  dtype = common.compute_dtype(FLAGS.dtype)
  rec = None if recipe.is_identity else recipe
  if name in vit_tetrajet.MODELS:
    p, w, d, h, m = vit_tetrajet.MODELS[name]
    side = FLAGS.image or (224 if p == 16 else 8)
    model = ViT(10, p, w, d, h, m, recipe=rec, dtype=dtype, scan_layers=True,
                quantize_embed=False)
    return "vit", model, np.zeros((1, side, side, 3 if p == 16 else 1), np.float32)
  ctx = FLAGS.context or GPT_CONFIGS[name][4]
  return "gpt", GPT.from_name(name, recipe=rec, dtype=dtype), np.zeros((1, ctx), np.int32)


def _batch(kind: str, init_x: np.ndarray, batch: int, rng: np.random.Generator):
  """A synthetic batch of host arrays shaped like ``init_x``: (images, labels) or (x, y)."""
  if kind == "vit":
    x = rng.standard_normal((batch, *init_x.shape[1:])).astype(np.float32)
    return x, rng.integers(0, 10, batch).astype(np.int32)
  seq = rng.integers(0, 256, (batch, init_x.shape[1] + 1)).astype(np.int32)
  return seq[:, :-1], seq[:, 1:]


def measure(name: str, recipe_name: str, mesh: str, grad_comm: str) -> dict:
  """One configuration: median step time, throughput, first-step loss."""
  from experiments import common, gpt_fp4, vit_tetrajet
  recipe = common.build_recipe(recipe_name)
  par = common.Parallel.from_flags(mesh, grad_comm, recipe, FLAGS.spmd)
  kind, model, init_x = _model(name, recipe)
  per_dev = FLAGS.batch_per_device or (128 if kind == "vit" else 8)
  batch = per_dev * par.devices
  host = _batch(kind, init_x, batch, np.random.default_rng(1))
  init_key, quant_key = jax.random.split(jax.random.key(0))
  params = jax.jit(model.init)({"params": init_key, "quant": quant_key}, jnp.asarray(init_x))["params"]
  tx = optax.adamw(1e-4)
  if kind == "vit" and not recipe.is_identity:  # the ViT step reports oscillation metrics
    from fp4jax import optim
    tx = optax.chain(tx, optim.track_oscillation(
        weights=vit_tetrajet.quantized_weight_fn(recipe), window=50))
  state = par.place_state(
      common.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), quant_key))
  if kind == "vit":
    run = vit_tetrajet.RunSpec(recipe_name, recipe, False, False)
    step, _ = vit_tetrajet.make_steps(model, tx, run, par, state)
  else:
    step, _ = gpt_fp4.make_steps(model, tx, par, state)
  data = par.batch(host)
  t0 = time.perf_counter()
  state, m = step(state, *data)
  loss0 = float(m["loss"])
  compile_s = time.perf_counter() - t0
  state, m = step(state, *data)
  jax.block_until_ready(state)
  times = []
  for _ in range(FLAGS.reps):
    t = time.perf_counter()
    state, m = step(state, *data)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t)
  med = float(np.median(times))
  return {"model": name, "recipe": recipe_name, "mesh": mesh, "devices": par.devices,
          "grad_comm": grad_comm, "parallel": par.describe(), "batch": batch,
          "batch_per_device": per_dev, "step_ms": med * 1e3,
          "step_ms_min": float(np.min(times)) * 1e3, "examples_per_s": batch / med,
          "first_step_loss": loss0, "compile_and_first_step_s": compile_s}


def with_efficiency(rows: list[dict]) -> list[dict]:
  """Adds ``scaling_efficiency`` against the first row of each model and recipe (its first
  mesh with the first gradient communication: list f32 first to compare FP8 with it)."""
  base = {}
  for r in rows:
    key = (r["model"], r["recipe"])
    b = base.setdefault(key, r)
    r["scaling_efficiency"] = (r["examples_per_s"] / (r["devices"] / b["devices"]) /
                               b["examples_per_s"])
  return rows


def plot(rows: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  labels = [f"{r['model']}\n{r['recipe']} {r['grad_comm']}\n{r['mesh']}" for r in rows]
  fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows)), 4.0), dpi=120)
  ax.bar(range(len(rows)), [r["examples_per_s"] for r in rows], color="tab:blue")
  for i, r in enumerate(rows):
    ax.text(i, r["examples_per_s"], f"{100 * r['scaling_efficiency']:.0f}%", ha="center",
            va="bottom", fontsize=8)
  ax.set_xticks(range(len(rows)), labels, fontsize=7)
  ax.set_ylabel("examples / s")
  ax.set_title(f"data-parallel scaling ({rows[0]['device']}); labels: efficiency")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def main(argv):
  del argv
  dev = jax.devices()[0]
  slug = dev.device_kind.lower().replace(" ", "_")
  out = FLAGS.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                  f"scaling_{slug}.json")
  rows = []
  for name in FLAGS.models:
    for recipe in FLAGS.recipes:
      for comm in FLAGS.grad_comms:
        for mesh in [m.strip() for m in FLAGS.meshes.split(";") if m.strip()]:
          if comm != "f32" and mesh in ("data:1", "fsdp:1"):
            continue  # nothing to communicate on one device
          r = measure(name, recipe, mesh, comm)
          r["device"] = dev.device_kind
          rows.append(r)
          print(f"{name:10s} {recipe:8s} {comm:9s} {mesh:14s} {r['step_ms']:9.2f} ms  "
                f"{r['examples_per_s']:10.1f} ex/s  loss {r['first_step_loss']:.5f}",
                flush=True)
          write(out, dev, with_efficiency(rows))  # after every row: a time limit keeps them
  for r in rows:
    print(f"{r['model']} {r['recipe']} {r['grad_comm']} {r['mesh']}: efficiency "
          f"{100 * r['scaling_efficiency']:.1f}%")
  plot(rows, os.path.splitext(out)[0] + ".png")
  print(f"wrote {out}")


def write(out: str, dev, rows: list[dict]) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    json.dump({"device": dev.device_kind, "devices": jax.device_count(),
               "jax": jax.__version__, "python": platform.python_version(),
               "flags": {k: FLAGS[k].value for k in ("meshes", "models", "recipes",
                                                     "grad_comms", "spmd", "batch_per_device",
                                                     "reps")},
               "rows": rows}, f, indent=1)


if __name__ == "__main__":
  define_flags()
  from experiments import common as _common
  _common.run_main(main)
