r"""NVFP4's random Hadamard transform and the wgrad operand it feeds: each method of
:func:`fp4jax.hadamard.rht` against a copy, alone and followed by the NVFP4 GEMM-ready
operand (:func:`fp4jax.operand.gemm_operand`), in one run.

    python -m kernels.bench_hadamard [--shapes=50432x384,50432x1536,16384x16384]
        [--out kernels/results/hadamard_<gpu>.json]

For each bf16 ``(M, K)`` input (the defaults: ViT-S/16 at batch 256, 197 tokens per
image, the attention and MLP widths; and the 16384^2 square of the quantize targets) and
each axis (0: along the tokens, as wgrad's operands in NVIDIA's recipe; 1: along the
rows' minor axis), the median of 5 runs of ``--reps`` calls of:

* ``copy`` (``-x``): one bf16 read and write, the floor of any pass;
* ``rht_<method>``: the transform alone (float32 out: what the quantization reads), for
  ``reference`` (the float32 matrix product after moving the axis last, what fp4jax ran
  before), ``butterfly`` and ``dot``;
* ``rht_<method>+nvfp4``: the transform then NVFP4's operand along the same axis, in one
  jit (what the wgrad GEMM's operand costs), and ``nvfp4`` alone for scale.

Before timing it checks every method against ``rht_reference`` (max abs difference over
the max abs value), on this device. "of copy" is copy time / time.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import fp4jax
from fp4jax import dispatch, hadamard, operand
from kernels.timing import median_time, write_json

FLAGS = flags.FLAGS
flags.DEFINE_list("shapes", ["50432x384", "50432x1536", "16384x16384"], "MxK bf16 inputs")
flags.DEFINE_list("axes", ["0", "1"], "the transform's axis")
flags.DEFINE_integer("block", 16, "Hadamard block")
flags.DEFINE_integer("reps", 10, "timed calls per run (median of 5 runs)")
flags.DEFINE_string("out", None, "JSON path (default kernels/results/hadamard_<gpu>.json)")

METHODS = {"reference": lambda x, a, k, b: hadamard.rht_reference(x.astype(jnp.float32), a, k, b),
           "butterfly": lambda x, a, k, b: hadamard.rht(x, a, k, b, dtype=jnp.float32),
           "dot": lambda x, a, k, b: hadamard.rht(x, a, k, b, method="dot",
                                                 dtype=jnp.float32),
           "dot_bf16": lambda x, a, k, b: hadamard.rht(x, a, k, b, method="dot_bf16",
                                                      dtype=jnp.float32),
           # A float32 input (the backward's dA, dW): three BF16 GEMMs instead of one.
           "dot_bf16_f32_input": lambda x, a, k, b: hadamard.rht(
               x.astype(jnp.float32), a, k, b, method="dot_bf16")}


def main(argv):
  del argv
  facts = dispatch.device_facts()
  out_path = FLAGS.out or os.path.join(os.path.dirname(__file__), "results",
                                       f"hadamard_{facts.slug}.json")
  spec = fp4jax.get_spec("nvfp4")
  key = jax.random.key(0)
  hkey = jax.random.key(1)
  block = FLAGS.block
  res = {"device": facts.kind, "jax": jax.__version__, "block": block, "rows": {}}
  for shape_s in FLAGS.shapes:
    m, k = (int(v) for v in shape_s.split("x"))
    x = jax.random.normal(jax.random.key(2), (m, k), jnp.bfloat16)
    for axis in (int(a) for a in FLAGS.axes):
      tag = f"{m}x{k}/axis{axis}"
      row = res["rows"][tag] = {}
      want = jax.jit(METHODS["reference"], static_argnums=(1, 3))(x, axis, hkey, block)
      top = float(jnp.abs(want).max())
      for name, fn in METHODS.items():
        got = jax.jit(fn, static_argnums=(1, 3))(x, axis, hkey, block)
        row[f"rel_diff_{name}"] = float(jnp.abs(got - want).max()) / top
      fns = {"copy": jax.jit(lambda v: -v),
             "nvfp4": jax.jit(lambda v, axis=axis: operand.gemm_operand(
                 v, spec, axis, key, ieee_subnormals=facts.keeps_subnormals)[0])}
      for name, fn in METHODS.items():
        fns[f"rht_{name}"] = jax.jit(lambda v, fn=fn, axis=axis: fn(v, axis, hkey, block))
        fns[f"rht_{name}+nvfp4"] = jax.jit(
            lambda v, fn=fn, axis=axis: operand.gemm_operand(
                fn(v, axis, hkey, block), spec, axis, key,
                ieee_subnormals=facts.keeps_subnormals)[0])
      t_copy = None
      for name, fn in fns.items():
        try:
          t = median_time(fn, x, reps=FLAGS.reps, runs=5)
        except Exception as e:  # a failing variant is recorded; the others still run
          row[name] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
          print(tag, name, row[name], flush=True)
          continue
        t_copy = t if name == "copy" else t_copy
        row[name] = {"ms": t * 1e3, "of_copy": t_copy / t}
        print(f"{tag:22} {name:24} {t * 1e3:8.3f} ms  {t_copy / t:5.2f} of copy", flush=True)
      print(f"{tag:22} max |method - reference| / max |reference|: " + ", ".join(
          f"{n} {row[f'rel_diff_{n}']:.1e}" for n in METHODS), flush=True)
  write_json(res, out_path)
  print(f"wrote {out_path}")


if __name__ == "__main__":
  app.run(main)
