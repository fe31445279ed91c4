"""kernels/inkernel_matmul.py (the lab's in-kernel-decoding Triton GEMMs, kept for the
benchmarks' comparison) against the float32 product of the dequantized operands."""

import jax.numpy as jnp
import numpy as np
import pytest

import sweeps
from kernels import inkernel_matmul as im
from matmul_checks import INTERPRET, MX, NV, assert_close, operands, with_nan_scales

CASES = {
    "mxfp4_fp8": (MX, MX, "fp8"), "mxfp4_b16_fp8": (MX.replace(block_size=16),) * 2 + ("fp8",),
    "mxfp4_bf16": (MX, MX, "bf16"), "nvfp4_bf16": (NV, NV, "bf16"),
    "mxfp4_x_nvfp4_bf16": (MX, NV, "bf16"),
}


@pytest.mark.parametrize("case,data", sweeps.product(
    5, case=sorted(CASES), data=["random", "wide_spread"]))
def test_inkernel_matmul_matches_dequantized_product(case, data, rng):
  spec_a, spec_b, path = CASES[case]
  a, b = operands(rng, 64, 256, 64, spec_a, spec_b, spread=40 if data == "wide_spread" else 0)
  y = im.inkernel_matmul(a, b, path=path, out_dtype=jnp.float32, tile=(32, 32, 128),
                         interpret=INTERPRET)
  assert y.shape == (64, 64) and y.dtype == jnp.float32
  assert_close(y, a, b, f"{case}/{data}")


@pytest.mark.parametrize("path", ["fp8", "bf16"])
def test_nan_scales_poison_exactly_their_rows_and_columns(path, rng):
  a, b = with_nan_scales(*operands(rng, 64, 256, 64, MX, MX))
  y = np.asarray(im.inkernel_matmul(a, b, path=path, out_dtype=jnp.float32,
                                    tile=(32, 32, 128), interpret=INTERPRET))
  assert np.isnan(y[5]).all() and np.isnan(y[:, 40]).all()
  assert np.isfinite(np.delete(np.delete(y, 5, 0), 40, 1)).all()


def test_bad_operands_are_rejected(rng):
  a, b = operands(rng, 64, 128, 64, MX, MX)
  with pytest.raises(ValueError, match="not a multiple of the tile"):
    im.inkernel_matmul(a, b, path="fp8", tile=(48, 32, 128), interpret=True)
  nv_a, nv_b = operands(rng, 64, 128, 64, NV, NV)
  with pytest.raises(ValueError, match="E8M0 only"):
    im.inkernel_matmul(nv_a, nv_b, path="fp8")
