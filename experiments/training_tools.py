r"""Figures for the Flax/optax integration: oscillation control, optimizer-state memory, PTQ.

    python -m experiments.training_tools [--steps 400] [--out experiments/results/training_tools_cpu.json]

1. Oscillation (TetraJet): least squares ``y = x W*`` towards weights off the MXFP4 grid,
   forward weights quantized (STE), plain SGD. Mean per-step flip rate of the quantized
   weights over the second half of training and the fraction oscillating (>= 2 direction
   reversals in the last 100-step window), for SGD, SGD + Q-EMA and SGD + Q-Ramping.
2. Optimizer-state memory of AdamW for a ViT-S/16-sized parameter set (shapes only,
   ``jax.eval_shape``): float32 moments, both in BF16, and the Microsoft FP8-LM formats
   (first moment FP8 E4M3 with a per-tensor scale, second moment FP16).
3. PTQ of an MLP trained on scikit-learn's digits: output MSE against the float model,
   test accuracy and weight bytes for RTN, RTN + Hadamard, GPTQ, GPTQ + Hadamard in MXFP4
   and NVFP4.
"""

from __future__ import annotations

import json
import platform

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

import fp4jax
from experiments import common
from fp4jax import optim, ptq

FLAGS = flags.FLAGS


def define_flags():
  """Flags are defined only when run as a script: tests import this module's helpers
  beside other experiments whose flag names overlap."""
  flags.DEFINE_integer("steps", 400, "SGD steps of the oscillation toy problem")
  flags.DEFINE_integer("seed", 0, "data seed")
  flags.DEFINE_string("out", None, "optional JSON output path")


def oscillation_run(kind: str, steps: int, seed: int) -> dict:
  k, n, batch = 64, 32, 128
  rng = np.random.default_rng(seed)
  w_true = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
  xs = jnp.asarray(rng.standard_normal((2048, k)), jnp.float32)
  ys = xs @ w_true
  params = {"kernel": w_true + 0.05 * jnp.asarray(rng.standard_normal((k, n)), jnp.float32)}
  sgd = optax.sgd(0.02)
  base = optim.q_ramping(sgd, "mxfp4", window=50, threshold=3) if kind == "q_ramping" else sgd
  tx = optax.chain(base, optim.q_ema(0.99) if kind == "q_ema" else optax.identity(),
                   optim.track_oscillation("mxfp4", window=100))
  state = tx.init(params)

  def loss(p, ref, x, y):
    pred = fp4jax.qdot_general(x, p["kernel"], (((1,), (0,)), ((), ())), "mxfp4",
                               rhs_reference=ref)
    return jnp.mean((pred - y) ** 2)

  @jax.jit
  def step(params, state, i):
    idx = (jnp.arange(batch) + i * batch) % xs.shape[0]
    ref = optim.q_ema_reference(state, params)["kernel"] if kind == "q_ema" else None
    g = jax.grad(loss)(params, ref, xs[idx], ys[idx])
    u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state

  rates = []
  for i in range(steps):
    params, state = step(params, state, i)
    rates.append(float(optim.oscillation_metrics(state)["flip_rate"]))
  m = optim.oscillation_metrics(state)
  return {"flip_rate": float(np.mean(rates[steps // 2:])),
          "oscillating_last_window": float(m["oscillating_last_window/kernel"]),
          "final_loss": float(loss(params, None, xs, ys))}


def vit_s16_shapes() -> dict:
  """Parameter shapes of ViT-S/16 (d=384, 12 blocks, MLP 1536, 224x224, 1000 classes)."""
  d, mlp, blocks = 384, 1536, 12
  f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  p = {"patch": {"kernel": f32(16, 16, 3, d), "bias": f32(d)}, "cls": f32(1, 1, d),
       "pos": f32(1, 197, d), "head": {"kernel": f32(d, 1000), "bias": f32(1000)},
       "norm": {"scale": f32(d), "bias": f32(d)}}
  for i in range(blocks):
    p[f"blocks_{i}"] = {
        "qkv": {"kernel": f32(d, 3 * d), "bias": f32(3 * d)},
        "proj": {"kernel": f32(d, d), "bias": f32(d)},
        "fc1": {"kernel": f32(d, mlp), "bias": f32(mlp)},
        "fc2": {"kernel": f32(mlp, d), "bias": f32(d)},
        "ln1": {"scale": f32(d), "bias": f32(d)}, "ln2": {"scale": f32(d), "bias": f32(d)}}
  return p


def state_memory() -> dict:
  shapes = vit_s16_shapes()
  n = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
  out = {"params": n}
  for name, tx in [("adamw_f32", optax.adamw(1e-3)),
                   ("adamw_bf16_moments", optim.quantize_state(optax.adamw(1e-3),
                                                               {"mu": "bf16", "nu": "bf16"})),
                   ("adamw_fp8_mu_fp16_nu", optim.quantize_state(optax.adamw(1e-3)))]:
    out[name] = optim.state_nbytes(jax.eval_shape(tx.init, shapes))
  return out


def train_digits_mlp(seed: int = 0, steps: int = 300):
  """An MLP (64 -> 256 -> 128 -> 10) trained with Adam on scikit-learn's bundled digits
  (the first 1400 images; the other 397 are held out). Returns (model, variables, x, y)."""
  import flax.linen as nn
  from sklearn.datasets import load_digits

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.gelu(nn.Dense(256, name="fc1")(x))
      x = nn.gelu(nn.Dense(128, name="fc2")(x))
      return nn.Dense(10, name="head")(x)

  d = load_digits()
  x = (d.data / 16.0).astype(np.float32)
  y = d.target.astype(np.int32)
  m = MLP()
  v = jax.jit(m.init)(jax.random.key(seed), x[:2])
  tx = optax.adam(3e-3)
  st = tx.init(v)

  @jax.jit
  def step(v, st, xb, yb):
    g = jax.grad(lambda v: optax.softmax_cross_entropy_with_integer_labels(
        m.apply(v, xb), yb).mean())(v)
    u, st = tx.update(g, st, v)
    return optax.apply_updates(v, u), st

  rng = np.random.default_rng(seed)
  for _ in range(steps):
    idx = rng.integers(0, 1400, 128)
    v, st = step(v, st, x[idx], y[idx])
  return m, v, x, y


def ptq_table(seed: int) -> list[dict]:
  m, v, x, y = train_digits_mlp(seed)
  x_test, y_test = x[1400:], y[1400:]
  ref = m.apply(v, x_test)
  rows = [{"spec": "float32", "method": "-", "mse": 0.0,
           "accuracy": float(jnp.mean(ref.argmax(-1) == y_test)), "bytes": ptq.nbytes(v)}]
  cal = ptq.collect_linen_inputs(m, v, x[:512])
  evaluate = jax.jit(lambda q, xx: m.apply(ptq.dequantize_params(q), xx))
  for spec in ("mxfp4", "nvfp4"):
    for method in ptq.METHODS:
      q = ptq.quantize_params(v, spec, method, calibration=cal, hadamard_block=16)
      out = evaluate(q, x_test)
      rows.append({"spec": spec, "method": method, "mse": float(jnp.mean((out - ref) ** 2)),
                   "accuracy": float(jnp.mean(out.argmax(-1) == y_test)),
                   "bytes": ptq.nbytes(q)})
  return rows


def main(argv):
  del argv
  results = {"machine": platform.machine(), "device": jax.devices()[0].device_kind,
             "jax": jax.__version__, "fp4jax": fp4jax.__version__}
  print("1. Oscillation toy problem (MXFP4 forward weights, SGD lr 0.02)")
  osc = {k: oscillation_run(k, FLAGS.steps, FLAGS.seed) for k in ("sgd", "q_ema", "q_ramping")}
  print(f"{'':10} {'flip rate':>10} {'oscillating':>12} {'final loss':>11}")
  for k, r in osc.items():
    print(f"{k:10} {r['flip_rate']:>10.4f} {r['oscillating_last_window']:>12.4f} "
          f"{r['final_loss']:>11.4f}")
  results["oscillation"] = osc
  print("\n2. AdamW state memory, ViT-S/16 parameter shapes")
  mem = state_memory()
  for k, b in mem.items():
    if k != "params":
      print(f"{k:24} {b / 2**20:8.2f} MiB  ({b / mem['adamw_f32']:.3f} of float32)")
  results["state_memory_bytes"] = mem
  print("\n3. PTQ of a digits MLP (output MSE vs float, test accuracy, weight bytes)")
  rows = ptq_table(FLAGS.seed)
  print(f"{'spec':8} {'method':14} {'mse':>9} {'accuracy':>9} {'bytes':>8}")
  for r in rows:
    print(f"{r['spec']:8} {r['method']:14} {r['mse']:>9.4f} {r['accuracy']:>9.4f} "
          f"{r['bytes']:>8}")
  results["ptq"] = rows
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(results, f, indent=1)
    print(f"\nwrote {FLAGS.out}")


if __name__ == "__main__":
  define_flags()
  common.run_main(main)
