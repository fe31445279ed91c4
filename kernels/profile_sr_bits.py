"""What stochastic rounding's random bits cost in a GEMM-ready operand, per way of making
them: one jitted :func:`fp4jax.operand.gemm_operand` at ``n x n`` bf16 for each variant,
traced with ``jax.profiler`` (GPU time per call, all kernels) in one run.

    python -m kernels.profile_sr_bits [--spec=nvfp4] [--axis=-1] [--n=16384]

On a GPU each row is the traced GPU time per call; every row also has the wall-clock
median (:func:`kernels.timing.median_time`), which is what a CPU run reports (the Pallas
rows are GPU-only: interpret mode times the interpreter).

Variants (the rounding is the same; only where its bits come from differs):

* ``nearest``: no random bits (the floor).
* ``hash32``: one 32-bit hash per element, fused into the element pass (fp4jax's bits up
  to the fourteenth session).
* ``hash8_fused``: one 32-bit hash per 4 consecutive elements, a byte each, left to XLA
  to fuse (it may recompute the hash per element).
* ``hash8_materialized``: the same bits with the words materialised first (an
  ``optimization_barrier``: a quarter-size kernel) and expanded in the element pass.
* ``given32`` / ``given8``: precomputed bits read from memory (4 bytes or 1 byte per
  element): the read's cost without any hashing.
* ``copy`` (``-x``: one read, one write, the floor of any bf16 -> bf16 pass) and
  ``naive_mxfp4`` (:func:`kernels.naive.naive_fake_quant`, nearest: the plain-JAX fake
  quantization a user writes): every row also prints its time as a fraction of the copy
  and against the naive row, all measured in this run.
* ``jax_random_bits``: SR with one ``jax.random.bits`` word per element (threefry: the
  bits a user would draw with JAX's PRNG).
* ``key``: what fp4jax does now (``gemm_operand(..., key)``: :func:`fp4jax.prng.
  random_bits_for`); must equal ``hash8_fused`` bit for bit.
* ``pallas_*`` (power-of-two scales only): the Pallas operand kernel, nearest and
  stochastic with one hash per element or per four (``OperandKernelConfig.hash_per_word``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile

import jax
import jax.numpy as jnp
from absl import app, flags

import fp4jax
from fp4jax import dispatch, operand, prng
from fp4jax.kernels import operand as kernel_operand
from kernels.naive import naive_fake_quant
from kernels.timing import median_time
from kernels.trace_summary import summarize_trace

flags.DEFINE_string("spec", "nvfp4", "a spec name (fp4jax.get_spec)")
flags.DEFINE_integer("axis", -1, "the blocked axis")
flags.DEFINE_integer("n", 16384, "matrix side")
flags.DEFINE_integer("calls", 5, "traced calls per variant")
flags.DEFINE_string("out", "", "write the rows as JSON here (default: print only)")

U32 = jnp.uint32
VARIANTS = ("copy", "naive_mxfp4", "jax_random_bits", "nearest", "hash32", "hash8_fused",
            "hash8_materialized", "given32", "given8",
            "key", "pallas_nearest", "pallas_hash_per_element", "pallas_hash_per_word")


def _seed():
  return prng.seed_from_key(jax.random.key(0))


def hash32_bits(shape):
  """One hashed word per element (row-major index)."""
  s = _seed()
  return prng.counter_hash_words(s[0], s[1], prng.element_counter(shape))


def hash8_words(shape):
  """One hashed word per 4 row-major elements (shape's last axis divisible by 4)."""
  s = _seed()
  return prng.counter_hash_words(s[0], s[1],
                                 prng.element_counter(shape[:-1] + (shape[-1] // 4,)))


def main(argv):
  del argv
  f = flags.FLAGS
  facts = dispatch.device_facts()
  nearest = fp4jax.get_spec(f.spec)
  sr = nearest.replace(rounding="stochastic")
  x = jax.random.normal(jax.random.key(2), (f.n, f.n), jnp.bfloat16)
  given32 = jax.block_until_ready(jax.jit(hash32_bits, static_argnums=0)(x.shape))
  given8 = jax.block_until_ready(jax.jit(hash8_words, static_argnums=0)(x.shape))

  def op(x, spec, rbits):
    return operand.gemm_operand(x, spec, f.axis, random_bits=rbits,
                                ieee_subnormals=facts.keeps_subnormals)[0]

  def pallas(x, spec, per_word=True):
    cfg = kernel_operand.DEFAULT_CONFIG["rows" if f.axis in (-1, 1) else "cols"]
    return kernel_operand.gemm_operand(
        x, spec, f.axis, jax.random.key(0), ieee_subnormals=facts.keeps_subnormals,
        config=dataclasses.replace(cfg, hash_per_word=per_word))

  fns = {
      "copy": lambda x: -x,
      "naive_mxfp4": lambda x: naive_fake_quant(x, f.axis),
      "jax_random_bits": lambda x: op(x, sr, jax.random.bits(jax.random.key(0), x.shape,
                                                            jnp.uint32)),
      "nearest": lambda x: op(x, nearest, None),
      "hash32": lambda x: op(x, sr, hash32_bits(x.shape)),
      "hash8_fused": lambda x: op(x, sr, prng.expand_words(hash8_words(x.shape))),
      "hash8_materialized": lambda x: op(
          x, sr, prng.expand_words(jax.lax.optimization_barrier(hash8_words(x.shape)))),
      "given32": lambda x, b=given32: op(x, sr, b),
      "given8": lambda x, b=given8: op(x, sr, prng.expand_words(b)),
      "key": lambda x: operand.gemm_operand(x, sr, f.axis, jax.random.key(0),
                                            ieee_subnormals=facts.keeps_subnormals)[0],
      "pallas_nearest": lambda x: pallas(x, nearest),
      "pallas_hash_per_element": lambda x: pallas(x, sr, False),
      "pallas_hash_per_word": lambda x: pallas(x, sr, True),
  }
  pallas_ok = (facts.on_gpu and
               kernel_operand.unsupported_reason(x.shape, x.dtype, sr, f.axis) is None)
  rows = []
  ref = None
  for name in VARIANTS:
    if name.startswith("pallas") and not pallas_ok:
      continue
    fn = jax.jit(fns[name])
    out = jax.block_until_ready(fn(x))
    if name == "hash8_fused":
      ref = out
    if name in ("hash8_materialized", "given8", "key", "pallas_hash_per_element",
                "pallas_hash_per_word"):  # the same bits: the same operand
      assert bool(jnp.all(out.view(jnp.uint16) == ref.view(jnp.uint16))), name
    row = {"variant": name, "wall_ms": 1e3 * median_time(fn, x, reps=f.calls, runs=3)}
    if facts.on_gpu:
      with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
          for _ in range(f.calls):
            jax.block_until_ready(fn(x))
        s = summarize_trace(d, f.calls, top=6)
      row |= {"gpu_ms": s["device_ms_per_step"],
              "kernels": [(k, round(ms, 4)) for k, ms, _ in s["top_kernels"]]}
    # Ratios from the GPU time where there is one (else wall time), to this run's rows.
    row["ms"] = row.get("gpu_ms", row["wall_ms"])
    base = {r["variant"]: r["ms"] for r in rows} | {name: row["ms"]}
    row["of_copy"] = base["copy"] / row["ms"]
    row["time_over_naive"] = row["ms"] / base.get("naive_mxfp4", row["ms"])
    rows.append(row)
    print(f"{f.spec} axis {f.axis} {f.n}^2 {name:24s} wall {row['wall_ms']:8.3f} ms  "
          f"{row['of_copy']:5.2f} of copy  {row['time_over_naive']:5.2f} of naive's time"
          + (f"  gpu {row['gpu_ms']:.3f} ms  " + ", ".join(
              f"{k[:40]} {ms:.3f}" for k, ms in row["kernels"][:3]) if facts.on_gpu else ""),
          flush=True)
  if f.out:
    os.makedirs(os.path.dirname(f.out) or ".", exist_ok=True)
    with open(f.out, "w") as fh:
      json.dump({"device": facts.kind, "spec": f.spec, "axis": f.axis, "n": f.n,
                 "rows": rows}, fh, indent=1)


if __name__ == "__main__":
  app.run(main)
