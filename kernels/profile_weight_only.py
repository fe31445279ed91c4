"""Two launches of the weight-only FP4 GEMM (BF16 activations x packed FP4 weights), for
Nsight Compute.

    ncu --clock-control none --kernel-name regex:fp4jax_matmul_weight_only --launch-skip 1 \\
        --launch-count 1 --section SpeedOfLight --section ComputeWorkloadAnalysis \\
        --section InstructionStats --section WarpStateStats --section MemoryWorkloadAnalysis \\
        python -m kernels.profile_weight_only --m 16 --format mxfp4

The first launch compiles and warms up; ncu profiles the second (``--launch-skip 1``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import fp4jax


flags.DEFINE_integer("m", 16, "activation rows (skinny M)")
flags.DEFINE_integer("k", 8192, "contraction size")
flags.DEFINE_integer("n", 8192, "output columns")
flags.DEFINE_enum("format", "mxfp4", ["mxfp4", "nvfp4"], "weight format")


def main(argv):
  del argv
  f = flags.FLAGS
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((f.m, f.k)).astype(np.float32)).astype(jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((f.k, f.n)).astype(np.float32)).astype(jnp.bfloat16)
  wq = fp4jax.quantize(w, fp4jax.get_spec(f.format), -2)
  g = jax.jit(fp4jax.weight_only_matmul)
  for _ in range(2):
    jax.block_until_ready(g(x, wq))
  print(f"ran weight-only {f.format} {f.m}x{f.k}x{f.n} twice on {jax.devices()[0].device_kind}")


if __name__ == "__main__":
  app.run(main)
