r"""GEMM-ready operands (fp4jax.operand): bit-exactness on this device, and speed against
a copy and the naive fake quantization, in one run.

    python -m kernels.bench_operand [--size 16384] [--out kernels/results/operand_<gpu>.json]

1. Correctness, compiled for this device: :func:`fp4jax.operand.gemm_operand` against
   :func:`fp4jax.operand.gemm_operand_reference` bit for bit, for MXFP4 (every scale mode)
   and NVFP4 (1x16, 16x16), nearest and stochastic rounding, blocks along rows and
   columns, both variants (``ieee_subnormals`` False, and True where the device keeps
   subnormals), on every bf16 bit pattern and on wide-range float32 data with zero,
   subnormal, tiny and near-max blocks.
2. Speed on a ``size x size`` bf16 matrix, median of 5 runs of ``--reps`` calls: a copy
   (``-x``: one read, one write, the floor of any bf16 -> bf16 pass), the naive MXFP4 fake
   quantization of :mod:`kernels.naive`, ``gemm_operand`` per configuration (the variant
   the fused layers run on this device), the Pallas operand kernel
   (:mod:`fp4jax.kernels.operand`: rows, columns, and both from one read, whose bytes are
   1.5 copies'), and the Pallas quantize kernels (packed codes, ``--quantize_kernels``).
   "of copy" = copy time / time: the fraction of copy bandwidth reached for the same bytes
   (for "both", 1.5 x copy time / time; for packed outputs, the copy's bytes are more).
3. The Pallas operand kernel checked like (1), compiled, MX specs (its scope), both of its
   variants (the one-multiply ``ieee_subnormals=True`` is exact only if Triton's float32
   multiply keeps subnormals; the dispatch runs the other).
"""

from __future__ import annotations

import os
import pprint

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import fp4jax
from fp4jax import dispatch, operand
from fp4jax.kernels import operand as kernel_operand
from fp4jax.kernels import quantize as kernel_quantize
from kernels.naive import naive_fake_quant
from kernels.timing import median_time, write_json

FLAGS = flags.FLAGS
flags.DEFINE_integer("size", 16384, "square matrix side")
flags.DEFINE_integer("reps", 20, "timed calls per run (median of 5 runs)")
flags.DEFINE_bool("check", True, "run the bit-exactness checks first")
flags.DEFINE_bool("check_xla", True, "with --check: the XLA emitter's checks too (else the "
                  "operand kernel's only)")
flags.DEFINE_list("quantize_kernels", ["mxfp4_rows", "mxfp4_sr_rows"],
                  f"packed quantize kernels to time, of {sorted(['mxfp4_rows', 'mxfp4_sr_rows', 'nvfp4_rows', 'nvfp4_sr_rows', 'nvfp4_h16_rows'])} "
                  "(NVFP4 kernels compile for minutes under Triton)")
flags.DEFINE_bool("tune", False, "time the operand kernel's tiles against XLA's emitter and "
                  "write the fastest exact choice per orientation and rounding into "
                  "fp4jax/kernels/operand_tuning.py (what fp4jax.dispatch reads)")
flags.DEFINE_string("tuning_out", None, "also write the tuning module here")
flags.DEFINE_string("out", None, "JSON path (default kernels/results/operand_<gpu>.json)")
flags.DEFINE_list("configs", None, "XLA-emitter configurations to check and time (default: "
                  "all of CONFIGS, and the extra MX scale modes in the check)")
flags.DEFINE_bool("check_kernel", True, "with --check on a GPU: the operand kernel's checks")

MX = fp4jax.get_spec("mxfp4")
NV = fp4jax.get_spec("nvfp4")
SR = {"rounding": "stochastic"}
CONFIGS = {  # name -> (spec, axis)
    "mxfp4_rows": (MX, -1), "mxfp4_cols": (MX, -2), "mxfp4_rceil_rows": (MX.replace(
        scale_mode="rceil"), -1), "mxfp4_sr_rows": (MX.replace(**SR), -1),
    "mxfp4_sr_cols": (MX.replace(**SR), -2),
    "nvfp4_rows": (NV, -1), "nvfp4_cols": (NV, -2), "nvfp4_sr_rows": (NV.replace(**SR), -1),
    "nvfp4_2d": (fp4jax.get_spec("nvfp4_2d"), -1),
}


def _bits(x):
  return np.asarray(jax.lax.bitcast_convert_type(
      x, jnp.uint16 if x.dtype == jnp.bfloat16 else jnp.uint32))


def check_inputs(seed=0):
  """Every bf16 bit pattern (shuffled into (512, 128)) and wide-range float32 data."""
  rng = np.random.default_rng(seed)
  pats = rng.permutation(np.arange(65536, dtype=np.uint32))
  every = jnp.asarray((pats << 16).view(np.float32).reshape(512, 128)).astype(jnp.bfloat16)
  finite = np.asarray(every.astype(jnp.float32))
  finite = jnp.asarray(np.where(np.isfinite(finite), finite, 1.0)).astype(jnp.bfloat16)
  wide = (rng.standard_normal((256, 128)) * np.exp2(rng.integers(-30, 30, (256, 128))))
  wide = wide.astype(np.float32)
  wide[0, :32] = rng.standard_normal(32) * 1e-39
  wide[1, :32] = 0.0
  wide[2, :32] = rng.standard_normal(32) * 2.0 ** -124
  wide[3, :4] = [3.0e38, -2.0e38, 1e-45, -0.0]
  return {"every_bf16": every, "finite_bf16": finite, "wide_f32": jnp.asarray(wide)}


def check(key, ieee: bool, names=None) -> dict:
  """Mismatches per configuration (``names``: a subset of :data:`CONFIGS`; default all,
  with MXFP4's ceil and even scale modes)."""
  out = {}
  inputs = check_inputs()
  specs = dict(CONFIGS)
  specs.update({f"mxfp4_{m}_rows": (MX.replace(scale_mode=m), -1) for m in ("ceil", "even")})
  if names is not None:
    specs = {k: specs[k] for k in names}
  for name, (spec, axis) in specs.items():
    bad = 0
    for data_name, x in inputs.items():
      if data_name == "every_bf16" and not spec.scale_format.is_pow2:
        continue  # NaN/Inf make NVFP4's tensor scale NaN: every value is NaN (checked on CPU)
      got, t = jax.jit(lambda v: operand.gemm_operand(v, spec, axis, key,
                                                      ieee_subnormals=ieee))(x)
      ref, tr = jax.jit(lambda v: operand.gemm_operand_reference(v, spec, axis, key))(x)
      differ = _bits(got) != _bits(ref)
      bad += int(differ.sum())
      if differ.any():
        i = tuple(int(v[0]) for v in np.nonzero(differ))
        print(f"    {name} {data_name}: {int(differ.sum())} differ, first at {i}: x "
              f"{np.asarray(x[i], np.float32)!r} got {_bits(got)[i]:#x} want "
              f"{_bits(ref)[i]:#x}", flush=True)
      if t is not None and _bits(t) != _bits(tr):
        bad += 1
        print(f"    {name} {data_name}: tensor scale {_bits(t)!r} want {_bits(tr)!r}",
              flush=True)
    out[name] = bad
    print(f"check {name:18} ieee_subnormals={ieee!s:5}: "
          f"{'bit-exact' if bad == 0 else f'{bad} MISMATCHES'}", flush=True)
  return out


KERNEL_CONFIGS = {  # name -> (rows spec, cols spec): the operand kernel's scope, MX specs
    "mxfp4_rows": (MX, None), "mxfp4_cols": (None, MX), "mxfp4_both": (MX, MX),
    "mxfp4_sr_rows": (MX.replace(**SR), None), "mxfp4_sr_cols": (None, MX.replace(**SR)),
    "mxfp4_sr_both": (MX.replace(**SR), MX.replace(**SR)),
    "mxfp4_rceil_rows": (MX.replace(scale_mode="rceil"), None),
    "mxfp4_b16_cols": (None, MX.replace(block_size=16)),
}
QUANTIZE_KERNELS = {  # name -> (spec, hadamard block)
    "mxfp4_rows": (MX, None), "mxfp4_sr_rows": (MX.replace(**SR), None),
    "nvfp4_rows": (NV, None), "nvfp4_sr_rows": (NV.replace(**SR), None),
    "nvfp4_h16_rows": (NV, 16),
}


def _kernel_fn(rows, cols, key, ieee):
  def fn(v):
    if rows is not None and cols is not None:
      return kernel_operand.gemm_operand_both(v, rows, cols, key, key, ieee_subnormals=ieee)
    spec, axis = (rows, -1) if rows is not None else (cols, -2)
    return kernel_operand.gemm_operand(v, spec, axis, key, ieee_subnormals=ieee)
  return jax.jit(fn)


def _describe_mismatches(x, g, w, axis, bs, limit=4):
  """Where kernel and reference differ: how many are NaN against NaN (payload or sign
  only), and the first few with their block's input bits."""
  gb, wb = _bits(g), _bits(w)
  bad = gb != wb
  gf, wf = np.asarray(g, np.float32), np.asarray(w, np.float32)
  both_nan = bad & np.isnan(gf) & np.isnan(wf)
  lines = [f"{int(bad.sum())} differ, {int(both_nan.sum())} of them NaN vs NaN"]
  xb = _bits(x)
  for r, c in list(zip(*np.nonzero(bad & ~both_nan)))[:limit]:
    blk = (xb[r, c - c % bs:c - c % bs + bs] if axis == -1 else xb[r - r % bs:r - r % bs + bs, c])
    lines.append(f"  [{r},{c}] got {gb[r, c]:#06x} want {wb[r, c]:#06x} x {xb[r, c]:#x}; "
                 f"block max|bits| {int((blk.astype(np.uint32) & 0x7FFFFFFF).max()):#x}")
  return lines


def check_kernel(key, ieee: bool) -> dict:
  """Mismatches per configuration, strict bits (``"bits"``) and up to NaN payload/sign
  (``"non_nan"``, the number that says whether a value is wrong)."""
  out = {}
  inputs = check_inputs()
  for name, (rows, cols) in KERNEL_CONFIGS.items():
    bad = non_nan = 0
    notes = []
    for data_name, x in inputs.items():
      got = _kernel_fn(rows, cols, key, ieee)(x)
      got = got if isinstance(got, tuple) else (got,)
      specs = [(s, a) for s, a in ((rows, -1), (cols, -2)) if s is not None]
      for g, (s, a) in zip(got, specs):
        w = kernel_operand.gemm_operand_reference(x, s, a, key)
        n = int((_bits(g) != _bits(w)).sum())
        nn = int(((_bits(g) != _bits(w)) & ~(np.isnan(np.asarray(g, np.float32))
                                             & np.isnan(np.asarray(w, np.float32)))).sum())
        bad, non_nan = bad + n, non_nan + nn
        if n and len(notes) < 8:
          notes += [f"{data_name} axis {a}: " + line
                    for line in _describe_mismatches(x, g, w, a, s.block_size)]
    out[name] = {"bits": bad, "non_nan": non_nan}
    print(f"check kernel {name:16} ieee_subnormals={ieee!s:5}: "
          f"{'bit-exact' if bad == 0 else f'{bad} MISMATCHES ({non_nan} not NaN vs NaN)'}",
          flush=True)
    for line in notes:
      print("    " + line, flush=True)
  return out


TUNE_CANDIDATES = {  # (block_rows, block_cols, num_warps)
    "rows": [(32, 256, 8), (32, 256, 4), (16, 256, 4), (32, 128, 4), (64, 256, 8),
             (16, 512, 8), (32, 512, 8), (8, 512, 4)],
    "cols": [(32, 128, 4), (32, 128, 8), (64, 128, 8), (32, 256, 8), (64, 64, 4),
             (32, 64, 4), (64, 256, 8), (32, 256, 4)],
    "both": [(32, 128, 4), (32, 128, 8), (32, 64, 4), (64, 64, 4), (32, 256, 8),
             (64, 128, 8), (32, 64, 2)],
}


def tune(x, key, exact: dict, kernel_ieee: bool) -> dict:
  """Per orientation and rounding: the operand kernel's tiles (its ``kernel_ieee``
  variant) timed against XLA's emitter (and, for both, against two launches); the
  fastest exact one wins. ``exact``: rounding -> whether the kernel checks passed on this
  device."""
  ieee = dispatch.device_facts().keeps_subnormals
  table, timings = {}, {}
  for rounding in ("nearest", "stochastic"):
    spec = MX if rounding == "nearest" else MX.replace(**SR)
    xla = {"rows": jax.jit(lambda v: operand.gemm_operand(v, spec, -1, key,
                                                          ieee_subnormals=ieee)[0]),
           "cols": jax.jit(lambda v: operand.gemm_operand(v, spec, -2, key,
                                                          ieee_subnormals=ieee)[0]),
           "both": jax.jit(lambda v: (operand.gemm_operand(v, spec, -1, key,
                                                           ieee_subnormals=ieee)[0],
                                      operand.gemm_operand(v, spec, -2, key,
                                                           ieee_subnormals=ieee)[0]))}
    best_single = {}
    for orient in ("rows", "cols", "both"):
      key_name = f"{orient}/{rounding}"
      ms = {"xla": median_time(xla[orient], x, reps=FLAGS.reps, runs=3) * 1e3}
      for bm, bk, w in TUNE_CANDIDATES[orient]:
        cfg = kernel_operand.OperandKernelConfig(bm, bk, w)
        r, c = {"rows": (spec, None), "cols": (None, spec), "both": (spec, spec)}[orient]
        fn = jax.jit(lambda v, r=r, c=c, cfg=cfg: (
            kernel_operand.gemm_operand_both(v, r, c, key, key, config=cfg,
                                             ieee_subnormals=kernel_ieee)
            if orient == "both" else kernel_operand.gemm_operand(
                v, r or c, -1 if r is not None else -2, key, config=cfg,
                ieee_subnormals=kernel_ieee)))
        try:
          ms[f"{bm}x{bk}w{w}"] = median_time(fn, x, reps=FLAGS.reps, runs=3) * 1e3
        except Exception as e:  # a tile Triton cannot compile is skipped
          print(f"tune {key_name} {bm}x{bk}w{w}: {type(e).__name__}", flush=True)
      kernel_ms = {k: v for k, v in ms.items() if k != "xla"}
      best = min(kernel_ms, key=kernel_ms.get) if kernel_ms and exact[rounding] else None
      options = {"xla": ms["xla"]}
      if best:
        options["pallas"] = kernel_ms[best]
      if orient == "both":
        options["separate"] = best_single["rows"] + best_single["cols"]
      emitter = min(options, key=options.get)
      entry = {"emitter": emitter, "ms": {k: round(v, 4) for k, v in ms.items()}}
      if emitter == "pallas":
        bm, rest = best.split("x")
        bk, w = rest.split("w")
        entry["config"] = [int(bm), int(bk), int(w), 1]
      if orient != "both":
        best_single[orient] = min(options.values())
      table[key_name] = entry
      print(f"tune {key_name:18} xla {ms['xla']:.3f} ms, best kernel "
            f"{best or '-'} {kernel_ms.get(best, float('nan')):.3f} ms -> {emitter}", flush=True)
  return table


def write_tuning(kind: str, table: dict, path: str) -> None:
  """Merges this device's entries into fp4jax/kernels/operand_tuning.py."""
  from fp4jax.kernels import operand_tuning
  merged = dict(operand_tuning.TABLE)
  merged[kind] = table
  with open(operand_tuning.__file__) as f:
    head = f.read().split("TABLE: dict = ")[0]
  with open(path, "w") as f:
    f.write(head + "TABLE: dict = " + pprint.pformat(merged, sort_dicts=True) + "\n")
  print(f"wrote {path}")


def main(argv):
  del argv
  facts = dispatch.device_facts()
  out_path = FLAGS.out or os.path.join(os.path.dirname(__file__), "results",
                                       f"operand_{facts.slug}.json")
  key = jax.random.key(0)
  res = {"device": facts.kind, "jax": jax.__version__, "size": FLAGS.size, "timings_ms": {}}
  configs = FLAGS.configs
  known = set(CONFIGS) | {f"mxfp4_{m}_rows" for m in ("ceil", "even")}  # check-only extras
  unknown = sorted(set(configs or ()) - known)
  if unknown:
    raise app.UsageError(f"--configs: unknown {unknown}; choose from {sorted(known)}")
  ieee = facts.keeps_subnormals  # the variant fp4jax.qdot's fused path runs here
  res["ieee_subnormals"] = ieee
  if FLAGS.check:
    if FLAGS.check_xla:
      res["mismatches"] = {str(v): check(key, v, names=configs) for v in sorted({False, ieee})}
    if facts.on_gpu and FLAGS.check_kernel:
      res["kernel_mismatches"] = {str(v): check_kernel(key, v) for v in (False, True)}
  n = FLAGS.size
  x = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
  if FLAGS.tune and facts.on_gpu:
    km = res.get("kernel_mismatches", {}).get("False", {})
    exact = {rounding: bool(km) and all(
        v["non_nan"] == 0 for k, v in km.items() if ("_sr_" in k) == (rounding != "nearest"))
        for rounding in ("nearest", "stochastic")}
    kernel_ieee = bool(res.get("kernel_mismatches", {}).get("True")) and all(
        v["non_nan"] == 0 for v in res["kernel_mismatches"]["True"].values())
    res["tuning"] = tune(x, key, exact, kernel_ieee)
    res["tuning"]["kernel_ieee_subnormals"] = kernel_ieee
    res["tuning"]["generation"] = facts.generation  # what other kinds fall back on
    from fp4jax.kernels import operand_tuning
    for path in filter(None, [operand_tuning.__file__, FLAGS.tuning_out]):
      write_tuning(facts.kind, res["tuning"], path)
  fns = {"copy": jax.jit(lambda v: -v),
         "naive_mxfp4_rows": jax.jit(lambda v: naive_fake_quant(v, -1)),
         "naive_mxfp4_cols": jax.jit(lambda v: naive_fake_quant(v, -2))}
  for name, (spec, axis) in CONFIGS.items():
    if configs is not None and name not in configs:
      continue
    fns[name] = jax.jit(lambda v, spec=spec, axis=axis: operand.gemm_operand(
        v, spec, axis, key, ieee_subnormals=ieee)[0])
  interpret = dispatch.interpret_mode(facts)
  kernels_timed = not interpret and configs is None  # --configs: the XLA emitter only
  for name, (rows, cols) in KERNEL_CONFIGS.items():
    if kernels_timed:
      fns[f"kernel_{name}"] = _kernel_fn(rows, cols, key, False)
  if kernels_timed:
    fns["kernel_mxfp4_rows_ieee"] = _kernel_fn(MX, None, key, True)
    fns["kernel_mxfp4_both_ieee"] = _kernel_fn(MX, MX, key, True)
  for name in FLAGS.quantize_kernels:
    spec, h = QUANTIZE_KERNELS[name]
    fns[f"quantize_kernel_{name}"] = jax.jit(
        lambda v, spec=spec, h=h: kernel_quantize.quantize(v, spec, -1, key, hadamard_block=h,
                                                           interpret=interpret))
  t_copy = None
  for name, fn in fns.items():
    try:
      t = median_time(fn, x, reps=FLAGS.reps, runs=5)
    except Exception as e:  # a configuration that fails is recorded, the others still run
      res["timings_ms"][name] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
      print(name, res["timings_ms"][name], flush=True)
      continue
    t_copy = t if name == "copy" else t_copy
    copies = 1.5 if name.startswith("kernel_") and "_both" in name else 1.0
    res["timings_ms"][name] = {"ms": t * 1e3, "of_copy": copies * t_copy / t,
                               "GB_per_s_bf16_in_out": 4 * copies * n * n / t / 1e9}
    print(f"{name:32} {t * 1e3:8.3f} ms  {copies * t_copy / t:5.2f} of copy  "
          f"{4 * copies * n * n / t / 1e9:7.0f} GB/s (bf16 in + out)", flush=True)
  write_json(res, out_path)
  print(f"wrote {out_path}")


if __name__ == "__main__":
  app.run(main)
