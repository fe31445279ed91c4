"""Where a GEMM-ready operand's time goes: one jitted :func:`fp4jax.operand.gemm_operand`
(optionally after the recipe's Hadamard transform) at ``n x n`` bf16, traced with
``jax.profiler``; prints every GPU kernel of a call, longest first.

    python -m kernels.profile_operand --spec=nvfp4 --axis=0 [--hadamard=16] [--n=16384]
    python -m kernels.profile_operand --stochastic --random_bits=given   # the hash's cost

Set ``XLA_FLAGS=--xla_dump_to=DIR`` to keep the optimized HLO beside it.
"""

from __future__ import annotations

import functools
import tempfile

import jax
import jax.numpy as jnp
from absl import app, flags

import fp4jax
from fp4jax import dispatch, hadamard, operand, prng
from kernels.trace_summary import summarize_trace

flags.DEFINE_string("spec", "nvfp4", "a spec name (fp4jax.get_spec)")
flags.DEFINE_integer("axis", -1, "the blocked axis")
flags.DEFINE_integer("hadamard", 0, "Hadamard block before the operand (0: none)")
flags.DEFINE_bool("stochastic", False, "stochastic rounding")
flags.DEFINE_enum("random_bits", "hash", ["hash", "given"], "stochastic rounding's bits: "
                  "hashed from the key in the element pass (what fp4jax does), or given "
                  "(precomputed, read from memory: what the hash costs, by difference)")
flags.DEFINE_integer("n", 16384, "matrix side")
flags.DEFINE_integer("calls", 5, "traced calls")


def main(argv):
  del argv
  f = flags.FLAGS
  facts = dispatch.device_facts()
  spec = fp4jax.get_spec(f.spec)
  if f.stochastic:
    spec = spec.replace(rounding="stochastic")
  key, hkey = jax.random.key(0), jax.random.key(1)

  given = f.stochastic and f.random_bits == "given"

  def fn(x, rbits):
    if f.hadamard:
      x = hadamard.rht(x, f.axis, hkey, f.hadamard, method=facts.hadamard_method,
                       dtype=jnp.float32)
    return operand.gemm_operand(x, spec, f.axis, None if given else key,
                                random_bits=rbits if given else None,
                                ieee_subnormals=facts.keeps_subnormals)[0]

  x = jax.random.normal(jax.random.key(2), (f.n, f.n), jnp.bfloat16)
  rbits = prng.random_bits_for(key, x.shape) if given else None  # None: an empty pytree
  fn = functools.partial(jax.jit(fn), rbits=rbits)
  jax.block_until_ready(fn(x))
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      for _ in range(f.calls):
        jax.block_until_ready(fn(x))
    s = summarize_trace(d, f.calls, top=30)
  print(f"{f.spec} axis {f.axis} hadamard {f.hadamard} sr {f.stochastic}"
        f"{' (' + f.random_bits + ' bits)' if f.stochastic else ''} {f.n}^2 on "
        f"{facts.kind}: {s['device_ms_per_step']:.3f} ms/call")
  for name, ms, calls in s["top_kernels"]:
    print(f"  {ms:8.3f} ms  x{calls:g}  {name}")


if __name__ == "__main__":
  app.run(main)
