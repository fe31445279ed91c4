"""One launch of a fused quantize kernel at 8192^2 bf16, for Nsight Compute.

    ncu --clock-control none --kernel-name regex:fp4jax --launch-skip 1 --launch-count 1 \\
        --section SpeedOfLight --section ComputeWorkloadAnalysis \\
        --section InstructionStats --section WarpStateStats \\
        python -m kernels.profile_quantize --config mxfp4_floor_rows

The first launch compiles and warms up; ncu profiles the second (``--launch-skip 1``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from kernels import bench_quantize as bq

flags.DEFINE_string("config", "mxfp4_floor_rows", "a kernel configuration of bench_quantize")
flags.DEFINE_integer("n", 8192, "square matrix size")


def main(argv):
  del argv
  cfg, n = flags.FLAGS.config, flags.FLAGS.n
  x = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)).astype(np.float32))
  x = x.astype(jnp.bfloat16)
  f = jax.jit(lambda x, k: bq.run_kernel(x, cfg, k))
  for _ in range(2):
    jax.block_until_ready(f(x, jax.random.key(0)))
  print(f"ran {cfg} twice at {n}x{n} on {jax.devices()[0].device_kind}")


if __name__ == "__main__":
  app.run(main)
