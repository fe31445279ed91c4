r"""Correctness and speed of the fused quantize kernels, in one run.

    python -m kernels.bench_quantize [--sizes 4096,8192,16384] [--out kernels/results/quantize_<gpu>.json]

1. Correctness (compiled kernels on this device): every kernel configuration against the
   pure-JAX reference, bit for bit (codes, scales, tensor scale), on random and
   adversarial bf16/f32 inputs (zeros, subnormals, NaN, Inf, near-max; a zero block)
   at a shape that is not a multiple of the tile.
2. Speed on square bf16 matrices: a copy (negation: read + write), a naive XLA MXFP4 /
   NVFP4 quantizer (what one writes by hand: log2/floor scales, argmin over the grid),
   the fp4jax XLA reference, and each Pallas kernel. Effective bandwidth = ideal bytes
   (input read once, packed codes and scales written once) / median time.
"""

from __future__ import annotations

import os
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import fp4jax
from fp4jax import dispatch
from fp4jax.kernels import quantize as kq
from kernels.timing import median_time as bench, write_json

FLAGS = flags.FLAGS
flags.DEFINE_list("sizes", ["4096", "8192", "16384"], "square matrix sizes")
flags.DEFINE_string("out", None, "JSON path (default kernels/results/quantize_<gpu>.json)")
flags.DEFINE_integer("reps", 20, "timed repetitions per measurement (median of 5 runs)")
flags.DEFINE_bool("sweep", True, "try several tiles / warps for the main kernels at 8192")
flags.DEFINE_bool("check", True, "run the correctness checks first")
flags.DEFINE_list("configs", [], "kernel configurations to run (default: all)")
flags.DEFINE_bool("full_check", False, "check bf16 and f32, ragged and tile-multiple shapes")
flags.DEFINE_list("sweep_kernels", ["mxfp4_floor_rows", "mxfp4_both"], "kernels to tune")

MX = fp4jax.get_spec("mxfp4")
NV = fp4jax.get_spec("nvfp4")
SR = dict(rounding="stochastic")

# name -> (spec, orientation, hadamard block)
CONFIGS = {
    "mxfp4_floor_rows": (MX, "rows", None),
    "mxfp4_rceil_rows": (MX.replace(scale_mode="rceil"), "rows", None),
    "mxfp4_sr_rows": (MX.replace(**SR), "rows", None),
    "mxfp4_cols": (MX, "cols", None),
    "mxfp4_both": (MX, "both", None),
    "mxfp4_b16_rows": (MX.replace(block_size=16), "rows", None),
    "mxfp4_hadamard16_rows": (MX, "rows", 16),
    "nvfp4_rows": (NV, "rows", None),
    "nvfp4_sr_rows": (NV.replace(**SR), "rows", None),
    "nvfp4_cols": (NV, "cols", None),
    "nvfp4_both": (NV, "both", None),
    "nvfp4_hadamard16_rows": (NV, "rows", 16),
}
ALL_CONFIGS = dict(CONFIGS)


def _bytes_equal(a, b) -> bool:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  if jax.tree.structure(a) != jax.tree.structure(b) or len(la) != len(lb):
    return False
  for u, v in zip(la, lb):
    if u.shape != v.shape or u.dtype != v.dtype:
      return False
    if not np.array_equal(np.atleast_1d(np.asarray(u)).view(np.uint8),
                          np.atleast_1d(np.asarray(v)).view(np.uint8)):
      return False
  return True


def adversarial(rng, shape, dtype):
  x = rng.standard_normal(shape).astype(np.float32)
  x *= np.exp2(rng.integers(-20, 20, size=(shape[0], 1))).astype(np.float32)
  flat = x.reshape(-1)
  specials = [0.0, -0.0, np.nan, np.inf, -np.inf, 1e-40, -3e-39, 3.0e38, -3.3e38, 6.0, 5.99]
  idx = rng.choice(flat.size, 64, replace=False)
  flat[idx] = np.resize(np.asarray(specials, np.float32), 64)
  x[:, 32:64] = 0.0  # whole zero blocks
  return jnp.asarray(x).astype(dtype)


def run_kernel(x, name, key, tile=None, num_warps=None, num_stages=1):
  spec, orient, had = CONFIGS[name]
  interpret = not dispatch.device_facts().on_gpu  # a CPU smoke run interprets the kernels
  if orient == "both":
    return kq.quantize_both(x, spec, key, tile=tile, num_warps=num_warps,
                            num_stages=num_stages, interpret=interpret)
  return kq.quantize(x, spec, -1 if orient == "rows" else -2, key, hadamard_block=had,
                     tile=tile, num_warps=num_warps, num_stages=num_stages,
                     interpret=interpret)


def run_reference(x, name, key):
  spec, orient, had = CONFIGS[name]
  if had:
    return kq.hadamard_quantize_reference(x, spec, -1, key, had)
  if orient == "both":
    return (kq.quantize_reference(x, spec, -1, key=key),
            kq.quantize_reference(x, spec, -2, key=key))
  return kq.quantize_reference(x, spec, -1 if orient == "rows" else -2, key=key)


def check_all(rng, save=lambda results: None) -> dict:
  results = {}
  start = time.perf_counter()
  for name in CONFIGS:
    variants = ([(jnp.bfloat16, (192, 416)), (jnp.float32, (192, 416)),
                 (jnp.bfloat16, (256, 512)), (jnp.float32, (256, 512))]
                if FLAGS.full_check else [(jnp.bfloat16, (192, 416))])
    for dtype, shape in variants:
      x = adversarial(rng, shape, dtype) if shape[0] == 192 else jnp.asarray(
          rng.standard_normal(shape).astype(np.float32)).astype(dtype)
      key = jax.random.key(int(rng.integers(1 << 30)))
      label = f"{name}/{jnp.dtype(dtype).name}/{shape[0]}x{shape[1]}"
      try:
        got = jax.jit(lambda x, k: run_kernel(x, name, k))(x, key)
        want = jax.jit(lambda x, k: run_reference(x, name, k))(x, key)
        results[label] = bool(_bytes_equal(got, want))
      except Exception as e:  # report and go on: one config must not hide the others
        results[label] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
        traceback.print_exc()
      print(f"check {label:45} {results[label]}  "
            f"({time.perf_counter() - start:.0f} s)", flush=True)
      save(results)
  return results


def ideal_bytes(n, name):
  spec, orient, _ = ALL_CONFIGS[name]
  writes = n * n // 2 + n * n // spec.block_size
  return 2 * n * n + writes * (2 if orient == "both" else 1)


_E2M1_INDEX = jnp.asarray([0, 1, 2, 3, 4, 0, 5, 0, 6, 0, 0, 0, 7], jnp.uint8)  # by 2*value


def _naive_e2m1(y):
  """Round |y| onto the E2M1 grid with jnp.round (half to even) per binade; codes."""
  ay = jnp.abs(y)
  q = jnp.where(ay < 2, jnp.round(ay * 2) / 2, jnp.where(ay < 4, jnp.round(ay),
                                                          jnp.round(ay / 2) * 2))
  idx = _E2M1_INDEX[(jnp.minimum(q, 6.0) * 2).astype(jnp.int32)]
  return idx | ((y < 0).astype(jnp.uint8) << 3)


def naive_mxfp4(x):
  """MXFP4 as one writes it by hand in XLA (blocks of 32 along the last axis):
  log2/floor scales, per-binade jnp.round, a lookup for the codes."""
  m, k = x.shape
  xb = x.astype(jnp.float32).reshape(m, k // 32, 32)
  amax = jnp.max(jnp.abs(xb), axis=-1, keepdims=True)
  e = jnp.floor(jnp.log2(jnp.maximum(amax, 1e-38))) - 2.0
  code = _naive_e2m1(xb * jnp.exp2(-e)).reshape(m, k)
  packed = code[:, 0::2] | (code[:, 1::2] << 4)
  return packed, (e[..., 0] + 127).astype(jnp.uint8)


def naive_nvfp4(x):
  """NVFP4 by hand: global amax, E4M3 block scales via a dtype cast, jnp.round."""
  m, k = x.shape
  xf = x.astype(jnp.float32)
  t = jnp.max(jnp.abs(xf)) / (448.0 * 6.0)
  xb = xf.reshape(m, k // 16, 16)
  s = (jnp.max(jnp.abs(xb), axis=-1, keepdims=True) / 6.0 / t).astype(jnp.float8_e4m3fn)
  code = _naive_e2m1(xb / (s.astype(jnp.float32) * t)).reshape(m, k)
  return code[:, 0::2] | (code[:, 1::2] << 4), s[..., 0], t


def main(argv):
  del argv
  if FLAGS.configs:
    for name in list(CONFIGS):
      if name not in FLAGS.configs:
        del CONFIGS[name]
  facts = dispatch.device_facts()
  gpu = facts.slug
  out_path = FLAGS.out or os.path.join(os.path.dirname(__file__), "results",
                                       f"quantize_{gpu}.json")
  res = {"device": facts.kind, "jax": jax.__version__, "checks": {}, "timings": {},
         "sweep": {}}
  rng = np.random.default_rng(0)

  def save():  # after every measurement, so a run cut short keeps what it measured
    write_json(res, out_path)

  if FLAGS.check:
    res["checks"] = check_all(rng, save=lambda r: (res.__setitem__("checks", r), save()))
    save()
    ok = sum(v is True for v in res["checks"].values())
    print(f"checks: {ok} / {len(res['checks'])} bit-exact", flush=True)

  key = jax.random.key(0)
  tiles = {}
  if FLAGS.sweep:
    n = 8192
    x = jnp.asarray(rng.standard_normal((n, n)).astype(np.float32)).astype(jnp.bfloat16)
    for name, cands in {k: v for k, v in {
        "mxfp4_floor_rows": [(32, 256), (64, 128), (64, 256), (32, 512)],
        "nvfp4_rows": [(32, 256), (64, 128), (64, 256)],
        "mxfp4_both": [(32, 64), (64, 64), (32, 128)],
        "nvfp4_both": [(32, 64), (64, 64), (32, 128)],
    }.items() if k in FLAGS.sweep_kernels}.items():
      best = None
      for tile in cands:
        for warps in (4, 8):
          label = f"{name}/{tile[0]}x{tile[1]}/w{warps}"
          try:
            f = jax.jit(lambda x, k, tile=tile, warps=warps: run_kernel(
                x, name, k, tile=tile, num_warps=warps))
            t = bench(f, x, key, reps=FLAGS.reps)
            bw = ideal_bytes(n, name) / t / 1e12
            res["sweep"][label] = {"ms": t * 1e3, "tb_s": bw}
            print(f"sweep {label:32} {t * 1e3:8.3f} ms {bw:6.3f} TB/s", flush=True)
            if best is None or t < best[0]:
              best = (t, tile, warps)
          except Exception as e:
            res["sweep"][label] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            print(f"sweep {label:32} {res['sweep'][label]}", flush=True)
      if best:
        tiles[name] = (best[1], best[2])
    res["chosen_tiles"] = {k: list(v[0]) + [v[1]] for k, v in tiles.items()}

  for n in [int(s) for s in FLAGS.sizes]:
    x = jnp.asarray(rng.standard_normal((n, n)).astype(np.float32)).astype(jnp.bfloat16)
    row = {}
    t = bench(jax.jit(lambda x: -x), x, reps=FLAGS.reps)
    copy_bw = 2 * 2 * n * n / t / 1e12
    row["copy"] = {"ms": t * 1e3, "tb_s": copy_bw}
    mx_bytes = ideal_bytes(n, "mxfp4_floor_rows")
    nv_bytes = ideal_bytes(n, "nvfp4_rows")
    for label, fn, nbytes in [
        ("naive_xla_mxfp4", jax.jit(naive_mxfp4), mx_bytes),
        ("naive_xla_nvfp4", jax.jit(naive_nvfp4), nv_bytes),
        ("fp4jax_xla_mxfp4", jax.jit(lambda x: fp4jax.quantize(x, MX, -1)), mx_bytes),
        ("fp4jax_xla_nvfp4", jax.jit(lambda x: fp4jax.quantize(x, NV, -1)), nv_bytes)]:
      try:
        t = bench(fn, x, reps=max(2, FLAGS.reps // 4))
        row[label] = {"ms": t * 1e3, "tb_s": nbytes / t / 1e12}
      except Exception as e:
        row[label] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    for name in CONFIGS:
      base = name.replace("_sr", "").replace("_rceil", "_floor").replace("_b16", "_floor")
      base = base.replace("_hadamard16", "").replace("mxfp4_rows", "mxfp4_floor_rows")
      tile, warps = tiles.get(name, tiles.get(base, (None, None)))
      tile = tuple(tile) if tile else None
      try:
        f = jax.jit(lambda x, k, name=name, tile=tile, warps=warps: run_kernel(
            x, name, k, tile=tile, num_warps=warps))
        t0 = time.perf_counter()
        jax.block_until_ready(f(x, key))
        compile_s = time.perf_counter() - t0
        t = bench(f, x, key, reps=FLAGS.reps)
        row[name] = {"ms": t * 1e3, "tb_s": ideal_bytes(n, name) / t / 1e12,
                     "tile": list(tile) if tile else None, "warps": warps,
                     "first_call_s": compile_s}
        print(f"  {name:26} {t * 1e3:9.3f} ms {row[name]['tb_s']:7.3f} TB/s "
              f"(first call {compile_s:.1f} s)", flush=True)
        res["timings"][str(n)] = row
        save()
      except Exception as e:
        row[name] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    res["timings"][str(n)] = row
    print(f"\n{n}x{n} bf16 on {facts.kind}  (copy {copy_bw:.3f} TB/s)")
    naive = {"mxfp4": row.get("naive_xla_mxfp4"), "nvfp4": row.get("naive_xla_nvfp4")}
    for label, v in row.items():
      if isinstance(v, dict):
        fam = "nvfp4" if "nvfp4" in label else "mxfp4"
        nv = naive[fam]
        speedup = (nv["ms"] / v["ms"]) if isinstance(nv, dict) else float("nan")
        print(f"  {label:26} {v['ms']:9.3f} ms {v['tb_s']:7.3f} TB/s "
              f"{v['tb_s'] / copy_bw:6.2f} x copy {speedup:6.2f} x naive")
      else:
        print(f"  {label:26} {v}")
  save()
  print(f"wrote {out_path}")


if __name__ == "__main__":
  app.run(main)
