r"""How a training step's compile time and graph size grow with depth, per recipe.

    python -m kernels.compile_scaling                                   # ViT width 384, depth 1, 2, 4
    python -m kernels.compile_scaling --recipes=nvfp4 --depths=1,2 --impl=fused

For each recipe and depth: an unrolled (unscanned) ViT of that many blocks, one
forward + backward + AdamW step, lowered and compiled (abstract inputs, nothing runs):
the seconds of each and the line counts of the StableHLO and of the optimized HLO. A
recipe whose compile time per block is large, or grows faster than linearly, is what
makes an unscanned model's first step slow (``kernels/NOTES.md``). ``--impl`` is the
``fp4jax.gemm_impl`` policy (``fused``: the GPU's fused operand path, on any device).
Results merge into ``kernels/results/compile_<device>.json``.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import optax
from absl import app, flags

import fp4jax
from fp4jax import dispatch
from fp4jax.models import ViT
from kernels.train_step import make_step
from kernels.timing import write_json

FLAGS = flags.FLAGS
flags.DEFINE_list("recipes", ["mxfp4", "nvfp4"], "fp4jax recipes (or bf16)")
flags.DEFINE_list("depths", ["1", "2", "4"], "ViT blocks, unrolled")
flags.DEFINE_integer("width", 384, "ViT width (heads: width / 64, MLP: 4 x width)")
flags.DEFINE_integer("batch", 8, "images")
flags.DEFINE_integer("image", 64, "image side (patches of 16)")
flags.DEFINE_string("impl", "fused", "fp4jax.gemm_impl policy")
flags.DEFINE_string("out", None, "JSON path (default kernels/results/compile_<device>.json)")


def measure(recipe: str, depth: int, width: int, batch: int, image: int, impl: str) -> dict:
  """Lower and compile one step of an unrolled ViT; seconds and graph sizes."""
  images = jax.ShapeDtypeStruct((batch, image, image, 3), jnp.bfloat16)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
  key = jax.random.key(1)
  tx = optax.adamw(1e-3)
  with fp4jax.gemm_impl(impl):
    model = ViT(1000, 16, width, depth, max(1, width // 64), 4 * width,
                recipe=None if recipe == "bf16" else recipe, dtype=jnp.bfloat16)
    params = jax.eval_shape(lambda: model.init({"params": jax.random.key(0), "quant": key},
                                               jnp.zeros((2,) + images.shape[1:], images.dtype)))
    opt_state = jax.eval_shape(tx.init, params)
    t0 = time.perf_counter()
    lowered = make_step(model, tx).lower(params, opt_state, images, labels, key)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
  return {"lower_s": t1 - t0, "compile_s": t2 - t1,
          "stablehlo_lines": lowered.as_text().count("\n"),
          "optimized_hlo_lines": compiled.as_text().count("\n")}


def main(argv):
  del argv
  facts = dispatch.device_facts()
  out_path = FLAGS.out or os.path.join(os.path.dirname(__file__), "results",
                                       f"compile_{facts.slug}.json")
  res = {"device": facts.kind or facts.platform, "jax": jax.__version__, "impl": FLAGS.impl,
         "width": FLAGS.width, "batch": FLAGS.batch, "image": FLAGS.image, "rows": {}}
  for recipe in FLAGS.recipes:
    for depth in (int(d) for d in FLAGS.depths):
      if depth < 1:
        raise app.UsageError(f"--depths must be positive block counts, got {depth}")
      row = measure(recipe, depth, FLAGS.width, FLAGS.batch, FLAGS.image, FLAGS.impl)
      res["rows"][f"{recipe}/depth{depth}"] = row
      print(f"{recipe:9} depth {depth}: lower {row['lower_s']:6.1f} s  compile "
            f"{row['compile_s']:6.1f} s  StableHLO {row['stablehlo_lines']:7d} lines  "
            f"optimized HLO {row['optimized_hlo_lines']:7d} lines", flush=True)
      write_json(res, out_path)
  print(f"wrote {out_path}")


if __name__ == "__main__":
  app.run(main)
