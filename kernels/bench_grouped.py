r"""Speed of the quantized grouped (mixture-of-experts) GEMM against BF16 ``ragged_dot``.

    python -m kernels.bench_grouped [--experts=32 --tokens=4096 --top_k=4 --width=1440
                                     --hidden=1440] [--smoke]

The default shape is gpt-oss-like, scaled to one GPU: 32 experts, 4,096 tokens routed to
4 experts each (M = 16,384 rows), expert weights K x N = 1440 x 1440 (gpt-oss-20b's
2880 halved; 2880 / 4 = 720 is not a multiple of MXFP4's 32-blocks). Group sizes come
from a random routing (uneven, as real routers are).

Variants, each forward only and forward + backward (the layer's three GEMMs):

* ``bf16``: ``jax.lax.ragged_dot`` in BF16 with float32 accumulation (the baseline);
* ``naive_mxfp4``: what one writes by hand in plain JAX (:func:`kernels.naive.naive_ragged_dot`):
  every operand of the three GEMMs MXFP4-fake-quantized as a whole (log2/floor scales,
  a cast to ``float4_e2m1fn``, STE) before BF16 ``ragged_dot``s;
* ``fp4jax_<recipe>``: :func:`fp4jax.qragged_dot` under the dispatch's choice (``auto``):
  every operand of the three GEMMs quantized per expert.

Correctness first: ``qragged_dot`` with ``impl="auto"`` against ``impl="xla"`` (float32
GEMMs) on this device, forward and both gradients, as a multiple of the largest output.
Writes ``kernels/results/grouped_<gpu>.json``.
"""

from __future__ import annotations

import os
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax import lax

import fp4jax
from fp4jax import dispatch
from kernels.naive import naive_ragged_dot
from kernels.timing import median_time, write_json

FLAGS = flags.FLAGS
flags.DEFINE_integer("experts", 32, "experts G", lower_bound=1)
flags.DEFINE_integer("tokens", 4096, "tokens routed", lower_bound=1)
flags.DEFINE_integer("top_k", 4, "experts per token", lower_bound=1)
flags.DEFINE_integer("width", 1440, "contraction K of the expert GEMM", lower_bound=32)
flags.DEFINE_integer("hidden", 1440, "output width N of the expert GEMM", lower_bound=32)
flags.DEFINE_list("recipes", ["mxfp4", "nvfp4"], "fp4jax recipes to time")
flags.DEFINE_integer("reps", 10, "timed calls per run (median of 5 runs)")
flags.DEFINE_bool("smoke", False, "a small shape for a CPU smoke run")
flags.DEFINE_string("out", None, "JSON path (default kernels/results/grouped_<gpu>.json)")


def routing_sizes(rng, tokens: int, top_k: int, experts: int) -> np.ndarray:
  """Rows per expert of a random top-k routing (each token to top_k distinct experts,
  with expert popularity drawn from a Dirichlet, as unbalanced as early training)."""
  pop = rng.dirichlet(np.full(experts, 2.0))
  choice = np.stack([rng.choice(experts, top_k, replace=False, p=pop) for _ in range(tokens)])
  return np.bincount(choice.reshape(-1), minlength=experts).astype(np.int32)


def variants(recipes):
  """name -> function (x, w, sizes, cot, key) -> outputs; forward and forward+backward."""
  def fwd_bwd(f):
    def run(x, w, sizes, cot, key):
      y, vjp = jax.vjp(lambda x, w: f(x, w, sizes, key), x, w)
      return (y, *vjp(cot))
    return run

  bf16 = lambda x, w, s, key: lax.ragged_dot(x, w, s, preferred_element_type=jnp.float32
                                             ).astype(jnp.bfloat16)
  naive = lambda x, w, s, key: naive_ragged_dot(x, w, s)
  out = {"bf16": bf16, "naive_mxfp4": naive}
  for r in recipes:
    out[f"fp4jax_{r}"] = (lambda x, w, s, key, r=r: fp4jax.qragged_dot(
        x, w, s, r, key, preferred_element_type=jnp.bfloat16))
  timed = {}
  for name, f in out.items():
    timed[f"{name}/fwd"] = (lambda f: lambda x, w, s, cot, key: f(x, w, s, key))(f)
    timed[f"{name}/fwd+bwd"] = fwd_bwd(f)
  return timed


def check(x, w, sizes, cot, key, recipe) -> dict:
  """``impl="auto"`` against ``impl="xla"``: max |difference| / max |reference| per output."""
  def both(impl):
    f = lambda x, w: fp4jax.qragged_dot(x, w, sizes, recipe, key, impl=impl,
                                        preferred_element_type=jnp.float32)
    y, vjp = jax.vjp(f, x, w)
    return (y, *vjp(cot.astype(jnp.float32)))
  auto = jax.jit(lambda x, w: both("auto"))(x, w)
  ref = jax.jit(lambda x, w: both("xla"))(x, w)
  res = {}
  for name, a, b in zip(("forward", "dgrad", "wgrad"), auto, ref):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    res[name] = float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))
  res["choice"] = dispatch.choose_grouped_gemm(fp4jax.recipes.get(recipe)).impl.value
  return res


def main(argv):
  del argv
  facts = dispatch.device_facts()
  g, t, k_top, kk, nn = FLAGS.experts, FLAGS.tokens, FLAGS.top_k, FLAGS.width, FLAGS.hidden
  if FLAGS.smoke:
    g, t, k_top, kk, nn = 4, 64, 2, 64, 64
  rng = np.random.default_rng(0)
  sizes = routing_sizes(rng, t, k_top, g)
  m = int(sizes.sum())
  x = jnp.asarray(rng.standard_normal((m, kk)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((g, kk, nn)) / np.sqrt(kk), jnp.bfloat16)
  cot = jnp.asarray(rng.standard_normal((m, nn)), jnp.bfloat16)
  sizes_j, key = jnp.asarray(sizes), jax.random.key(0)
  out_path = FLAGS.out or os.path.join(os.path.dirname(__file__), "results",
                                       f"grouped_{facts.slug}.json")
  res = {"device": facts.kind, "jax": jax.__version__,
         "shape": {"experts": g, "tokens": t, "top_k": k_top, "rows": m, "K": kk, "N": nn,
                   "group_sizes_min_max": [int(sizes.min()), int(sizes.max())]},
         "checks": {}, "timings": {}}

  def save():
    write_json(res, out_path)

  print(f"{facts.kind}: {g} experts, {m} rows (sizes {sizes.min()}..{sizes.max()}), "
        f"K={kk} N={nn}", flush=True)
  for r in FLAGS.recipes:
    try:
      res["checks"][r] = check(x, w, sizes_j, cot, key, r)
    except Exception as e:
      res["checks"][r] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
      traceback.print_exc()
    print(f"check {r:8} {res['checks'][r]}", flush=True)
    save()
  flops = 2 * m * kk * nn
  for name, f in variants(FLAGS.recipes).items():
    fn = jax.jit(f)
    try:
      t0 = time.perf_counter()
      jax.block_until_ready(fn(x, w, sizes_j, cot, key))
      first = time.perf_counter() - t0
      s = median_time(fn, x, w, sizes_j, cot, key, reps=FLAGS.reps)
      gemms = 3 if name.endswith("fwd+bwd") else 1
      res["timings"][name] = {"ms": s * 1e3, "tflops": gemms * flops / s / 1e12,
                              "first_call_s": first}
    except Exception as e:
      res["timings"][name] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
      traceback.print_exc()
    save()
  for phase in ("fwd", "fwd+bwd"):
    base = res["timings"].get(f"bf16/{phase}")
    for name, r in res["timings"].items():
      if not name.endswith("/" + phase):
        continue
      if isinstance(r, dict) and isinstance(base, dict):
        print(f"  {name:28} {r['ms']:9.3f} ms {r['tflops']:7.1f} TFLOP/s "
              f"{base['ms'] / r['ms']:6.2f}x BF16 speed (first call {r['first_call_s']:.1f} s)",
              flush=True)
      else:
        print(f"  {name:28} {r}", flush=True)
  save()
  print(f"wrote {out_path}")


if __name__ == "__main__":
  app.run(main)
