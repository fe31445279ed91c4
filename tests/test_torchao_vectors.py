"""Bit-exact agreement with torchao's mx_formats on committed independent vectors.

The vectors (tests/vectors/torchao_mx_nvfp4.npz) were written by
tests/vectors/make_torchao_vectors.py from the pytorch/ao source; they cover every MX
element dtype x scale mode (floor/ceil/even/rceil; block 32, and 16 for floor/rceil),
NVFP4 one- and two-level, float32 and bfloat16 inputs, on ten input distributions.
For each case scales, element codes and the float32 dequantization must be identical.
Element codes inside a NaN-scale block carry no value (torchao's are
platform-dependent NaN encodings), so they are compared through the dequantization.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fp4jax
from conftest import bits_equal_or_both_nan

VECTORS = np.load(pathlib.Path(__file__).parent / "vectors" / "torchao_mx_nvfp4.npz")
MX_PRESET = {"e4m3": "mxfp8_e4m3", "e5m2": "mxfp8_e5m2", "e2m3": "mxfp6_e2m3",
             "e3m2": "mxfp6_e3m2", "e2m1": "mxfp4"}
CASES = sorted(k[: -len("/scale")] for k in VECTORS.files if k.endswith("/scale"))
# fp4jax deliberately keeps NVFP4's encode scale finite for tensors with amax < ~2e-33,
# where torchao overflows 1/t to Inf (documented in fp4jax.scales; tested in test_scales).
DEVIATIONS = {"subnormal/f32/nvfp4/two", "subnormal/bf16/nvfp4/two"}


def _input(dist, dt):
  xb = VECTORS[f"{dist}/{dt}/x_bits"]
  if dt == "f32":
    return jnp.asarray(xb.view(np.float32))
  return jax.lax.bitcast_convert_type(jnp.asarray(xb), jnp.bfloat16)


def test_vectors_cover_the_required_inputs():
  dists = {c.split("/")[0] for c in CASES}
  assert dists == {"normal", "laplace", "student_t2", "ties", "outliers", "wide_range",
                   "zero_blocks", "subnormal", "near_overflow", "special"}
  assert len(CASES) == 640


@pytest.mark.parametrize("case", [c for c in CASES if c not in DEVIATIONS])
def test_bit_exact_with_torchao(case):
  parts = case.split("/")
  dist, dt, kind = parts[:3]
  x = _input(dist, dt)
  if kind == "mx":
    elem, mode, bs = parts[3], parts[4], int(parts[5])
    spec = fp4jax.get_spec(MX_PRESET[elem]).replace(block_size=bs, scale_mode=mode,
                                                    packed=(elem == "e2m1"))
    q = fp4jax.quantize(x, spec, axis=-1)
  else:
    bs = 16
    q = fp4jax.quantize(x, "nvfp4", axis=-1, tensor_scale="amax" if parts[3] == "two" else None)
  scale = np.asarray(jax.lax.bitcast_convert_type(q.scales, jnp.uint8))
  ref_scale = VECTORS[f"{case}/scale"].reshape(scale.shape)
  scale_f = np.asarray(q.scales.astype(jnp.float32))
  nan_scale = np.isnan(scale_f)
  ok = (scale == ref_scale) | (nan_scale & ((ref_scale & 0x7F) == 0x7F) if kind == "nvfp4"
                               else nan_scale & (ref_scale == 0xFF))
  assert ok.all(), f"scales differ at {np.argwhere(~ok)[:4].tolist()}"

  deq = np.asarray(fp4jax.dequantize(q, jnp.float32))
  ref_deq = VECTORS[f"{case}/deq"].reshape(deq.shape)
  same = bits_equal_or_both_nan(deq, ref_deq)
  assert same.all(), (f"dequantized values differ at {np.argwhere(~same)[:4].tolist()}: "
                      f"{deq[~same][:4]} vs torchao {ref_deq[~same][:4]}")

  codes = np.asarray(q.codes)
  ref_codes = VECTORS[f"{case}/data"].reshape(codes.shape)
  nan_elems = np.isnan(ref_deq)
  if codes.shape[-1] != nan_elems.shape[-1]:  # packed two per byte
    nan_elems = nan_elems[..., ::2] | nan_elems[..., 1::2]
  same_codes = (codes == ref_codes) | nan_elems
  assert same_codes.all(), f"codes differ at {np.argwhere(~same_codes)[:4].tolist()}"
