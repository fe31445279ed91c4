r"""How a training step's compile time and graph size grow with depth, per recipe.

    python -m kernels.compile_scaling                                   # ViT width 384, depth 1, 2, 4
    python -m kernels.compile_scaling --recipes=nvfp4 --depths=1,2 --impl=fused

For each recipe and depth: an unrolled (unscanned) ViT of that many blocks, one
forward + backward + AdamW step, lowered and compiled (abstract inputs, nothing runs):
the seconds of each and the line counts of the StableHLO and of the optimized HLO. A
recipe whose compile time per block is large, or grows faster than linearly, is what
makes an unscanned model's first step slow (``kernels/NOTES.md``). ``--impl`` is the
``fp4jax.gemm_impl`` policy (``fused``: the GPU's fused operand path, on any device).
Results go to ``kernels/results/compile_<device>.json``.
"""

from __future__ import annotations

import os

import jax
from absl import app, flags

from fp4jax import dispatch
from kernels.train_step import compile_stats
from kernels.timing import write_json

FLAGS = flags.FLAGS
flags.DEFINE_list("recipes", ["mxfp4", "nvfp4"], "fp4jax recipes (or bf16)")
flags.DEFINE_list("depths", ["1", "2", "4"], "ViT blocks, unrolled")
flags.DEFINE_integer("width", 384, "ViT width (heads: width / 64, MLP: 4 x width)")
flags.DEFINE_integer("batch", 8, "images")
flags.DEFINE_integer("image", 64, "image side (patches of 16)")
flags.DEFINE_string("impl", "fused", "fp4jax.gemm_impl policy")
flags.DEFINE_string("out", None, "JSON path (default kernels/results/compile_<device>.json)")


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
      row = compile_stats(recipe, depth, FLAGS.width, FLAGS.batch, FLAGS.image, FLAGS.impl)
      res["rows"][f"{recipe}/depth{depth}"] = row
      print(f"{recipe:9} depth {depth}: lower {row['lower_s']:6.1f} s  compile "
            f"{row['compile_s']:6.1f} s  StableHLO {row['stablehlo_lines']:7d} lines  "
            f"optimized HLO {row['optimized_hlo_lines']:7d} lines", flush=True)
      write_json(res, out_path)
  print(f"wrote {out_path}")


if __name__ == "__main__":
  app.run(main)
