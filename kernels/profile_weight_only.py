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
flags.DEFINE_enum("layout", "kn", ["kn", "nk"], "weights (K, N) through weight_only_matmul "
                  "or (N, K) through weight_only_linear")
flags.DEFINE_enum("algorithm", "auto", ["auto", "mma", "gemv"], "the kernel's algorithm")


def main(argv):
  del argv
  f = flags.FLAGS
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((f.m, f.k)).astype(np.float32)).astype(jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((f.k, f.n)).astype(np.float32)).astype(jnp.bfloat16)
  from fp4jax.kernels import weight_only as wo
  if f.layout == "kn":
    wq = fp4jax.quantize(w, fp4jax.get_spec(f.format), -2)
    g = jax.jit(lambda x, w: wo.weight_only_matmul(x, w, algorithm=f.algorithm))
  else:
    wq = fp4jax.quantize(w.T, fp4jax.get_spec(f.format), -1)
    g = jax.jit(lambda x, w: wo.weight_only_linear(x, w, algorithm=f.algorithm))
  for _ in range(2):
    jax.block_until_ready(g(x, wq))
  print(f"ran weight-only {f.layout} {f.algorithm} {f.format} {f.m}x{f.k}x{f.n} twice on {jax.devices()[0].device_kind}")


if __name__ == "__main__":
  app.run(main)
