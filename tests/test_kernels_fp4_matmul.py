"""kernels/fp4_matmul.py against the float32 product of the dequantized operands.

Products are exact in every path (see the module doc); only the accumulation differs,
so results must agree within ``TOL * sum_k |a_ik b_kj|``: 2^-20 in interpret mode (CPU,
float32 accumulation in another order), 2^-10 compiled on Hopper (its FP8 tensor cores
accumulate tile sums with a shortened mantissa). NaN positions must match exactly.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fp4jax
from fp4jax.quantize import dequantize
from kernels import fp4_matmul as fm
from kernels.quantize import on_gpu

INTERPRET = not on_gpu()
TOL = 2.0**-20 if INTERPRET else 2.0**-10


def _assert_close(y, a, b, what):
  da, db = np.asarray(dequantize(a, jnp.float32)), np.asarray(dequantize(b, jnp.float32))
  with np.errstate(all="ignore"):
    ref = da.astype(np.float64) @ db.astype(np.float64)
    mag = np.abs(da).astype(np.float64) @ np.abs(db).astype(np.float64)
  y = np.asarray(y, np.float64)
  assert (np.isnan(y) == np.isnan(ref)).all(), f"{what}: NaN positions differ from the reference"
  fin = np.isfinite(ref) & np.isfinite(mag)
  err = np.abs(y - ref)[fin]
  bound = TOL * mag[fin] + 1e-30
  worst = np.max(err / bound) if err.size else 0.0
  assert (err <= bound).all(), f"{what}: error up to {worst:.2f}x the bound TOL*sum|ab|"


def _operands(rng, m, k, n, spec_a, spec_b, spread=0, zero_blocks=False):
  x = rng.standard_normal((m, k)).astype(np.float32)
  w = rng.standard_normal((k, n)).astype(np.float32)
  if spread:  # a different power of two per 32-block: scale exponents far apart
    x *= np.exp2(rng.integers(-spread, spread + 1, (m, k // 32))).repeat(32, 1).astype(np.float32)
    w *= np.exp2(rng.integers(-spread, spread + 1, (k // 32, n))).repeat(32, 0).astype(np.float32)
  if zero_blocks:
    x[:, 32:64] = 0.0
    w[64:96, :] = 0.0
  return fp4jax.quantize(jnp.asarray(x), spec_a, -1), fp4jax.quantize(jnp.asarray(w), spec_b, -2)


MX, NV = fp4jax.get_spec("mxfp4"), fp4jax.get_spec("nvfp4")
CASES = {
    "mxfp4_fp8": (MX, MX, "fp8"), "mxfp4_b16_fp8": (MX.replace(block_size=16),) * 2 + ("fp8",),
    "mxfp4_bf16": (MX, MX, "bf16"), "nvfp4_bf16": (NV, NV, "bf16"),
    "nvfp4_one_level_bf16": (NV.replace(tensor_scale=None),) * 2 + ("bf16",),
    "mxfp4_x_nvfp4_bf16": (MX, NV, "bf16"), "mxfp4_xla": (MX, MX, "xla"),
    "mxfp4_fp8_xla": (MX, MX, "fp8_xla"), "mxfp4_b16_fp8_xla": (MX.replace(block_size=16),) * 2
    + ("fp8_xla",), "nvfp4_bf16_xla": (NV, NV, "bf16_xla"), "mxfp4_bf16_xla": (MX, MX, "bf16_xla"),
    "mxfp4_x_nvfp4_bf16_xla": (MX, NV, "bf16_xla"),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("data", ["random", "wide_spread", "zero_blocks"])
def test_matmul_matches_dequantized_product(case, data, rng):
  spec_a, spec_b, impl = CASES[case]
  a, b = _operands(rng, 64, 256, 64, spec_a, spec_b, spread=40 if data == "wide_spread" else 0,
                   zero_blocks=data == "zero_blocks")
  y = fm.fp4_matmul(a, b, impl=impl, out_dtype=jnp.float32, tile=(32, 32, 128),
                    interpret=INTERPRET)
  assert y.shape == (64, 64) and y.dtype == jnp.float32
  _assert_close(y, a, b, f"{case}/{data}")


@pytest.mark.parametrize("impl", ["fp8", "bf16", "fp8_xla", "bf16_xla"])
def test_nan_scales_poison_exactly_their_rows_and_columns(impl, rng):
  a, b = _operands(rng, 64, 256, 64, MX, MX)
  sa = np.asarray(jax.lax.bitcast_convert_type(a.scales, jnp.uint8)).copy()
  sb = np.asarray(jax.lax.bitcast_convert_type(b.scales, jnp.uint8)).copy()
  sa[5, 3] = 255   # E8M0 NaN: row 5 of the product is NaN
  sb[1, 40] = 255  # column 40
  a = a.__class__(a.codes, jax.lax.bitcast_convert_type(jnp.asarray(sa), jnp.float8_e8m0fnu),
                  a.tensor_scale, a.spec, a.axis, a.padding, a.orig_dtype)
  b = b.__class__(b.codes, jax.lax.bitcast_convert_type(jnp.asarray(sb), jnp.float8_e8m0fnu),
                  b.tensor_scale, b.spec, b.axis, b.padding, b.orig_dtype)
  y = np.asarray(fm.fp4_matmul(a, b, impl=impl, out_dtype=jnp.float32, tile=(32, 32, 128),
                               interpret=INTERPRET))
  assert np.isnan(y[5]).all() and np.isnan(y[:, 40]).all()
  assert np.isfinite(np.delete(np.delete(y, 5, 0), 40, 1)).all()
  _assert_close(y, a, b, f"nan scales/{impl}")


@pytest.mark.parametrize("name,impl", [("mxfp4", "fp8"), ("nvfp4", "bf16"),
                                       ("mxfp4", "fp8_xla"), ("nvfp4", "bf16_xla")])
def test_output_dtype_bf16_rounds_the_float32_result(name, impl, rng):
  # fp8_xla rounds its GEMM's result to bf16 before the power-of-two epilogue: the same
  # rounding, as long as results stay in bf16's normal range (they do here)
  a, b = _operands(rng, 32, 128, 32, fp4jax.get_spec(name), fp4jax.get_spec(name))
  y32 = fm.fp4_matmul(a, b, out_dtype=jnp.float32, tile=(32, 32, 64), interpret=INTERPRET,
                      impl=impl)
  y16 = fm.fp4_matmul(a, b, out_dtype=jnp.bfloat16, tile=(32, 32, 64), interpret=INTERPRET,
                      impl=impl)
  assert y16.dtype == jnp.bfloat16
  if INTERPRET:  # one accumulation order: bf16 output is the float32 result, rounded
    np.testing.assert_array_equal(np.asarray(y16), np.asarray(y32.astype(jnp.bfloat16)))
  else:  # cuBLAS may pick another algorithm (accumulation order) for a bf16 output
    y32r = np.asarray(y32.astype(jnp.bfloat16).astype(jnp.float32))
    y16f = np.asarray(y16.astype(jnp.float32))
    ulp = np.abs(y32r) * 2.0**-7 + 1e-30  # one bf16 ulp at most, above the bound
    da, db = np.asarray(dequantize(a, jnp.float32)), np.asarray(dequantize(b, jnp.float32))
    mag = np.abs(da) @ np.abs(db)
    bad = ~(np.abs(y16f - y32r) <= ulp + TOL * mag)
    assert not bad.any(), (f"{name}/{impl}: bf16 output differs at {np.argwhere(bad)[:3]}: "
                           f"{y16f[bad][:3]} vs {y32r[bad][:3]} (bound {(ulp + TOL * mag)[bad][:3]})")


@pytest.mark.parametrize("name", ["mxfp4", "nvfp4"])
def test_blackwell_operands_through_scaled_matmul(name, rng):
  # jax.nn.scaled_matmul runs (as XLA ops) on CPU: the operand conversion of the Blackwell
  # path is checked here; the cuDNN kernel itself needs an sm_100 GPU.
  spec = fp4jax.get_spec(name)
  a, b = _operands(rng, 32, 128, 48, spec, spec)
  lhs, rhs, ls, rs = fm.blackwell_operands(a, b)
  assert lhs.dtype == jnp.float4_e2m1fn and rhs.shape == (1, 48, 128)
  assert ls.dtype == (jnp.float8_e8m0fnu if name == "mxfp4" else jnp.float8_e4m3fn)
  y = fm._blackwell_matmul(a, b, jnp.float32)
  _assert_close(y, a, b, f"blackwell operands/{name}")


@pytest.mark.parametrize("name,device,expected", [
    ("mxfp4", ("cpu", 0), "xla"), ("mxfp4", ("gpu", 9), "fp8_xla"),
    ("mxfp4_short_k", ("gpu", 9), "bf16_xla"), ("nvfp4", ("gpu", 9), "bf16_xla"),
    ("mxfp4", ("gpu", 10), "blackwell"), ("nvfp4", ("gpu", 10), "blackwell"),
    ("mxfp8_e4m3", ("gpu", 9), "xla"), ("mxfp8_e4m3", ("gpu", 10), "xla"),
    ("int8_channel", ("gpu", 9), "xla"),
])
def test_dispatch_picks_the_documented_path(name, device, expected, rng):
  k = fm.FP8_MIN_K // 2 if name.endswith("_short_k") else fm.FP8_MIN_K
  spec = fp4jax.get_spec(name.removesuffix("_short_k"))
  a, b = _operands(rng, 32, k, 32, spec, spec)
  assert fm.choose_impl(a, b, device) == expected


def test_auto_runs_the_dispatched_path(rng):
  a, b = _operands(rng, 128, 128, 128, MX, MX)
  y = fm.fp4_matmul(a, b, out_dtype=jnp.float32)  # xla on CPU, fp8_xla on Hopper
  _assert_close(y, a, b, "auto")


@pytest.mark.parametrize("name", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("m,splits", [(1, 1), (5, 2), (16, None), (40, 4)])
def test_weight_only_matches_reference(name, m, splits, rng):
  w = fp4jax.quantize(jnp.asarray(rng.standard_normal((512, 128)).astype(np.float32)), name, -2)
  x = jnp.asarray(rng.standard_normal((m, 512)).astype(np.float32))
  y = np.asarray(fm.weight_only_matmul(x, w, out_dtype=jnp.float32, tile=(16, 64, 128),
                                       splits=splits, interpret=INTERPRET), np.float64)
  ref = np.asarray(fm.weight_only_reference(x, w), np.float64)
  xb = np.abs(np.asarray(x.astype(jnp.bfloat16).astype(jnp.float32), np.float64))
  mag = xb @ np.abs(np.asarray(dequantize(w, jnp.float32), np.float64))
  assert y.shape == (m, 128)
  assert (np.abs(y - ref) <= 2.0**-20 * mag + 1e-30).all()


@pytest.mark.parametrize("m,bm", [(1, 16), (16, 16), (17, 32), (40, 64), (64, 64), (300, 64)])
def test_weight_only_rows_tile_is_a_power_of_two(m, bm):
  assert fm.weight_only_rows_tile(m) == bm


@pytest.mark.parametrize("m,n,k,expected", [
    (16, 8192, 8192, 4),     # 128 output tiles of 64 columns: 4 K splits fill 2 per SM
    (64, 8192, 8192, 4),     # bm = 64: one row tile
    (256, 8192, 8192, 1),    # 4 x 128 tiles are enough
    (16, 8192, 512, 2),      # K / bk = 2 allows at most 2
])
def test_weight_only_splits_fill_the_gpu(m, n, k, expected):
  assert fm.weight_only_splits(m, n, k, fm.weight_only_rows_tile(m), 64, 256) == expected


def test_bad_operands_are_rejected_with_the_fix(rng):
  a, b = _operands(rng, 64, 128, 64, MX, MX)
  with pytest.raises(ValueError, match="blocked along the contraction axis"):
    fm.fp4_matmul(fp4jax.quantize(jnp.ones((64, 128)), MX, -2), b)
  with pytest.raises(ValueError, match="contraction lengths differ"):
    fm.fp4_matmul(a, fp4jax.quantize(jnp.ones((64, 64)), MX, -2))
  with pytest.raises(TypeError, match="must be a QArray"):
    fm.fp4_matmul(jnp.ones((64, 128)), b)
  with pytest.raises(ValueError, match="not a multiple of the tile"):
    fm.fp4_matmul(a, b, impl="fp8", tile=(48, 32, 128), interpret=True)
  nv_a, nv_b = _operands(rng, 64, 128, 64, NV, NV)
  with pytest.raises(ValueError, match="E8M0 only"):
    fm.fp4_matmul(nv_a, nv_b, impl="fp8")
  with pytest.raises(ValueError, match="unknown impl"):
    fm.fp4_matmul(a, b, impl="fp4")
  with pytest.raises(ValueError, match="blocked along K"):
    fm.weight_only_matmul(jnp.ones((4, 128)), a)
  with pytest.raises(ValueError, match="do not contract"):
    fm.weight_only_matmul(jnp.ones((4, 96)), b)
  with pytest.raises(ValueError, match="packed E2M1 weights"):
    fm.weight_only_matmul(jnp.ones((4, 128)), fp4jax.quantize(jnp.ones((128, 64)), "mxfp8_e4m3", -2))
  with pytest.raises(ValueError, match="splits=3 must be >= 1 and divide"):
    fm.weight_only_matmul(jnp.ones((4, 128)), b, tile=(16, 64, 32), splits=3)
  with pytest.raises(ValueError, match="E8M0 only"):
    fm.fp4_matmul(nv_a, nv_b, impl="fp8_xla")
  with pytest.raises(ValueError, match="blocked along the contraction axis"):
    fm.blackwell_operands(b, b)
