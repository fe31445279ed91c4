"""Writes tests/vectors/torchao_mx_nvfp4.npz: independent reference vectors from torchao.

Run on the side, in a Python 3.11 venv that is *not* a dependency of fp4jax. The
vectors follow the current pytorch/ao source (commit recorded in ``meta/torchao_commit``;
the one used: 36027d82d1ad9949597ea16002ff4940374b1b94, 2026-08-21), whose Python runs
on top of the released wheel's environment:

    python3 -m venv /tmp/tvenv && /tmp/tvenv/bin/pip install torch==2.13.0 torchao numpy
    git -C <pytorch/ao clone> archive <commit> torchao | tar -x -C /tmp/aohead
    TORCHAO_COMMIT=<commit> PYTHONPATH=/tmp/aohead \
        /tmp/tvenv/bin/python tests/vectors/make_torchao_vectors.py

Why not the released torchao 0.18.0 alone: its ``to_mx`` divides by an E8M0 scale
clamped to 2^-126 while ``to_dtype`` multiplies by 2^-127 (tiny blocks come back
halved), and it gives blocks holding an Inf a finite scale; the current source (and
fp4jax) use 2^-127 consistently and map Inf and NaN blocks to the NaN scale 0xFF.

Inputs are drawn per distribution (normal, Laplace, Student-t(2), tie-heavy, outliers,
wide-range, all-zero blocks, subnormals, near-overflow, NaN/Inf), in float32 and
bfloat16. For every MX element dtype x scale mode the script stores torchao's
``to_mx`` scale bytes, element bytes and ``to_dtype`` float32 dequantization; for
NVFP4 one- and two-level it stores ``nvfp4_quantize``'s scale bytes and packed codes
and the ``NVFP4Tensor`` float32 dequantization.
"""

import os
import sys

import numpy as np
import torch
from torchao.prototype.mx_formats.config import ScaleCalculationMode
from torchao.prototype.mx_formats.constants import DTYPE_FP6_E2M3, DTYPE_FP6_E3M2
from torchao.prototype.mx_formats.mx_tensor import to_dtype, to_mx
from torchao.prototype.mx_formats.nvfp4_tensor import (NVFP4Tensor, nvfp4_quantize,
                                                       per_tensor_amax_to_scale)

ROWS, COLS = 16, 64
rng = np.random.default_rng(20261123)

F4_GRID = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float32)


def distributions():
  n = (ROWS, COLS)
  out = {}
  out["normal"] = rng.standard_normal(n)
  out["laplace"] = rng.laplace(size=n)
  out["student_t2"] = rng.standard_t(2, size=n)
  # Midpoints of the FP4 / FP6 / FP8 grids at random binades: every rounding is a tie.
  mids = np.concatenate([(F4_GRID[1:] + F4_GRID[:-1]) / 2, np.arange(0, 8, 0.0625) + 0.03125])
  t = rng.choice(mids, size=n) * np.exp2(rng.integers(-6, 6, size=(ROWS, 1)))
  t *= rng.choice([-1, 1], size=n)
  t[:, ::32] = 6.0 * np.exp2(rng.integers(-6, 6, size=(ROWS, COLS // 32)))  # pin block max
  out["ties"] = t
  o = rng.standard_normal(n)
  o[rng.random(n) < 0.02] *= 1000.0
  out["outliers"] = o
  out["wide_range"] = rng.choice([-1, 1], size=n) * np.exp2(rng.uniform(-120, 120, size=n))
  z = rng.standard_normal(n)
  z[::2, :32] = 0.0
  z[1::4, :] = 0.0
  z[3::4, 5] = -0.0
  out["zero_blocks"] = z
  # float32 subnormals (and a few tiny normals) in every block.
  s = rng.standard_normal(n) * 1e-39
  s[:, ::7] = rng.standard_normal((ROWS, len(range(0, COLS, 7)))) * 1e-44
  s[::3, ::11] = rng.standard_normal((len(range(0, ROWS, 3)), len(range(0, COLS, 11)))) * 1e-36
  out["subnormal"] = s
  big = rng.uniform(0.5, 1.0, size=n) * 3.4e38 * rng.choice([-1, 1], size=n)
  big[::2] *= np.exp2(-rng.integers(0, 8, size=(ROWS // 2, 1)))
  out["near_overflow"] = big
  sp = rng.standard_normal(n)
  sp[0, 3] = np.nan
  sp[1, 40] = np.inf
  sp[2, 10] = -np.inf
  sp[3, 33] = np.nan
  out["special"] = sp
  return {k: v.astype(np.float32) for k, v in out.items()}


MX_ELEMS = {
    "e4m3": torch.float8_e4m3fn,
    "e5m2": torch.float8_e5m2,
    "e2m3": DTYPE_FP6_E2M3,
    "e3m2": DTYPE_FP6_E3M2,
    "e2m1": torch.float4_e2m1fn_x2,
}
MODES = {"floor": ScaleCalculationMode.FLOOR, "ceil": ScaleCalculationMode.CEIL,
         "even": ScaleCalculationMode.EVEN, "rceil": ScaleCalculationMode.RCEIL}


def main(path):
  arrays = {}
  for dist, x32 in distributions().items():
    for dt_name, tdt in (("f32", torch.float32), ("bf16", torch.bfloat16)):
      x = torch.from_numpy(x32).to(tdt)
      tag = f"{dist}/{dt_name}"
      if tdt == torch.bfloat16:
        arrays[f"{tag}/x_bits"] = x.view(torch.int16).numpy().view(np.uint16)
      else:
        arrays[f"{tag}/x_bits"] = x.numpy().view(np.uint32)
      for e_name, edt in MX_ELEMS.items():
        for m_name, mode in MODES.items():
          for bs in (32, 16):
            if bs == 16 and m_name not in ("floor", "rceil"):
              continue
            scale, data = to_mx(x.clone(), edt, bs, mode)
            deq = to_dtype(data, scale, edt, bs, torch.float32)
            key = f"{tag}/mx/{e_name}/{m_name}/{bs}"
            arrays[f"{key}/scale"] = scale.view(torch.uint8).numpy()
            arrays[f"{key}/data"] = data.view(torch.uint8).numpy()
            arrays[f"{key}/deq"] = deq.float().numpy()
      for level in ("one", "two"):
        pts = None
        if level == "two":
          pts = per_tensor_amax_to_scale(torch.amax(torch.abs(x.float())))
        scale, data = nvfp4_quantize(x.clone(), 16, pts)
        t = NVFP4Tensor.to_nvfp4(x.clone(), 16, pts)
        deq = t.dequantize(torch.float32)
        key = f"{tag}/nvfp4/{level}"
        arrays[f"{key}/scale"] = scale.view(torch.uint8).numpy()
        arrays[f"{key}/data"] = data.view(torch.uint8).numpy()
        arrays[f"{key}/deq"] = deq.numpy()
  arrays["meta/torch"] = np.array(torch.__version__)
  import torchao
  arrays["meta/torchao"] = np.array(torchao.__version__)
  arrays["meta/torchao_commit"] = np.array(os.environ.get("TORCHAO_COMMIT", "release"))
  np.savez_compressed(path, **arrays)
  print(f"wrote {len(arrays)} arrays to {path}")


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else "tests/vectors/torchao_mx_nvfp4.npz")
