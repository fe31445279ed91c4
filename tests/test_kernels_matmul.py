"""fp4jax/kernels/matmul.py (and fp4jax.fp4_matmul, which dispatches to it) against the
float32 product of the dequantized operands; bounds in tests/matmul_checks.py."""

import jax.numpy as jnp
import numpy as np
import pytest

import fp4jax
import sweeps
from fp4jax.kernels import matmul as fm
from matmul_checks import INTERPRET, MX, NV, TOL, assert_close, operands, with_nan_scales

CASES = {
    "mxfp4_reference": (MX, MX, "reference"),
    "mxfp4_fp8_xla": (MX, MX, "fp8_xla"),
    "mxfp4_b16_fp8_xla": (MX.replace(block_size=16),) * 2 + ("fp8_xla",),
    "nvfp4_bf16_xla": (NV, NV, "bf16_xla"), "mxfp4_bf16_xla": (MX, MX, "bf16_xla"),
    "nvfp4_one_level_bf16_xla": (NV.replace(tensor_scale=None),) * 2 + ("bf16_xla",),
    "mxfp4_x_nvfp4_bf16_xla": (MX, NV, "bf16_xla"),
}


@pytest.mark.parametrize("case,data", sweeps.product(
    10, case=sorted(CASES), data=["random", "wide_spread", "zero_blocks"]))
def test_matmul_matches_dequantized_product(case, data, rng):
  spec_a, spec_b, impl = CASES[case]
  a, b = operands(rng, 64, 256, 64, spec_a, spec_b, spread=40 if data == "wide_spread" else 0,
                  zero_blocks=data == "zero_blocks")
  y = fm.fp4_matmul(a, b, impl=impl, out_dtype=jnp.float32, interpret=INTERPRET)
  assert y.shape == (64, 64) and y.dtype == jnp.float32
  assert_close(y, a, b, f"{case}/{data}")


@pytest.mark.parametrize("impl", ["fp8_xla", "bf16_xla"])
def test_nan_scales_poison_exactly_their_rows_and_columns(impl, rng):
  a, b = with_nan_scales(*operands(rng, 64, 256, 64, MX, MX))
  y = np.asarray(fm.fp4_matmul(a, b, impl=impl, out_dtype=jnp.float32, interpret=INTERPRET))
  assert np.isnan(y[5]).all() and np.isnan(y[:, 40]).all()
  assert np.isfinite(np.delete(np.delete(y, 5, 0), 40, 1)).all()
  assert_close(y, a, b, f"nan scales/{impl}")


@pytest.mark.parametrize("name,impl", [("mxfp4", "fp8_xla"), ("nvfp4", "bf16_xla")])
def test_output_dtype_bf16_rounds_the_float32_result(name, impl, rng):
  # fp8_xla rounds its GEMM's result to bf16 before the power-of-two epilogue: the same
  # rounding, as long as results stay in bf16's normal range (they do here)
  a, b = operands(rng, 32, 128, 32, fp4jax.get_spec(name), fp4jax.get_spec(name))
  y32 = fm.fp4_matmul(a, b, out_dtype=jnp.float32, interpret=INTERPRET, impl=impl)
  y16 = fm.fp4_matmul(a, b, out_dtype=jnp.bfloat16, interpret=INTERPRET, impl=impl)
  assert y16.dtype == jnp.bfloat16
  if INTERPRET:  # one accumulation order: bf16 output is the float32 result, rounded
    np.testing.assert_array_equal(np.asarray(y16), np.asarray(y32.astype(jnp.bfloat16)))
  else:  # cuBLAS may pick another algorithm (accumulation order) for a bf16 output
    y32r = np.asarray(y32.astype(jnp.bfloat16).astype(jnp.float32))
    y16f = np.asarray(y16.astype(jnp.float32))
    ulp = np.abs(y32r) * 2.0**-7 + 1e-30  # one bf16 ulp at most, above the bound
    da = np.asarray(fp4jax.dequantize(a, jnp.float32))
    db = np.asarray(fp4jax.dequantize(b, jnp.float32))
    mag = np.abs(da) @ np.abs(db)
    bad = ~(np.abs(y16f - y32r) <= ulp + TOL * mag)
    assert not bad.any(), (f"{name}/{impl}: bf16 output differs at {np.argwhere(bad)[:3]}: "
                           f"{y16f[bad][:3]} vs {y32r[bad][:3]} (bound {(ulp + TOL * mag)[bad][:3]})")


@pytest.mark.parametrize("name", ["mxfp4", "nvfp4"])
def test_blackwell_operands_through_scaled_matmul(name, rng):
  # jax.nn.scaled_matmul runs (as XLA ops) on CPU: the operand conversion of the Blackwell
  # path is checked here; the cuDNN kernel itself needs an sm_100 GPU.
  spec = fp4jax.get_spec(name)
  a, b = operands(rng, 32, 128, 48, spec, spec)
  lhs, rhs, ls, rs = fm.blackwell_operands(a, b)
  assert lhs.dtype == jnp.float4_e2m1fn and rhs.shape == (1, 48, 128)
  assert ls.dtype == (jnp.float8_e8m0fnu if name == "mxfp4" else jnp.float8_e4m3fn)
  y = fm.fp4_matmul(a, b, impl="blackwell", out_dtype=jnp.float32)
  assert_close(y, a, b, f"blackwell operands/{name}")


def test_public_fp4_matmul_runs_the_dispatched_path(rng):
  a, b = operands(rng, 128, 128, 128, MX, MX)
  for impl in ("auto", "xla", "pallas", "reference", "bf16_xla"):
    y = fp4jax.fp4_matmul(a, b, impl=impl, out_dtype=jnp.float32)
    assert_close(y, a, b, f"fp4jax.fp4_matmul(impl={impl!r})")
  with pytest.raises(ValueError, match="unknown impl 'fp4'"):
    fp4jax.fp4_matmul(a, b, impl="fp4")


def test_bad_operands_are_rejected_with_the_fix(rng):
  a, b = operands(rng, 64, 128, 64, MX, MX)
  with pytest.raises(ValueError, match="blocked along the contraction axis"):
    fm.fp4_matmul(fp4jax.quantize(jnp.ones((64, 128)), MX, -2), b, impl="reference")
  with pytest.raises(ValueError, match="contraction lengths differ"):
    fm.fp4_matmul(a, fp4jax.quantize(jnp.ones((64, 64)), MX, -2), impl="reference")
  with pytest.raises(TypeError, match="must be a QArray"):
    fm.fp4_matmul(jnp.ones((64, 128)), b, impl="reference")
  nv_a, nv_b = operands(rng, 64, 128, 64, NV, NV)
  with pytest.raises(ValueError, match="E8M0 scales on both operands"):
    fm.fp4_matmul(nv_a, nv_b, impl="fp8_xla")
  with pytest.raises(ValueError, match="unknown impl"):
    fm.fp4_matmul(a, b, impl="fp4")
  mx8 = fp4jax.quantize(jnp.ones((64, 128)), "mxfp8_e4m3", -1)
  with pytest.raises(ValueError, match="not packed E2M1.*impl='reference'"):
    fm.fp4_matmul(mx8, b, impl="bf16_xla")
  with pytest.raises(ValueError, match="blackwell takes MXFP4 x MXFP4 or NVFP4 x NVFP4"):
    fm.fp4_matmul(a, nv_b, impl="blackwell")
  with pytest.raises(ValueError, match="blocked along the contraction axis"):
    fm.blackwell_operands(b, b)
