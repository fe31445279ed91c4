"""fp4jax/kernels/weight_only.py (and fp4jax.weight_only_matmul) against its reference."""

import jax.numpy as jnp
import numpy as np
import pytest

import fp4jax
from fp4jax.kernels import weight_only as wo
from matmul_checks import INTERPRET, MX


@pytest.mark.parametrize("name", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("m,splits", [(1, 1), (5, 2), (16, None), (40, 4)])
def test_weight_only_matches_reference(name, m, splits, rng):
  w = fp4jax.quantize(jnp.asarray(rng.standard_normal((512, 128)).astype(np.float32)), name, -2)
  x = jnp.asarray(rng.standard_normal((m, 512)).astype(np.float32))
  y = np.asarray(wo.weight_only_matmul(x, w, out_dtype=jnp.float32, tile=(16, 64, 128),
                                       splits=splits, interpret=INTERPRET), np.float64)
  ref = np.asarray(wo.weight_only_reference(x, w), np.float64)
  xb = np.abs(np.asarray(x.astype(jnp.bfloat16).astype(jnp.float32), np.float64))
  mag = xb @ np.abs(np.asarray(fp4jax.dequantize(w, jnp.float32), np.float64))
  assert y.shape == (m, 128)
  assert (np.abs(y - ref) <= 2.0**-20 * mag + 1e-30).all()


def test_public_weight_only_matmul_takes_interpret_from_the_device(rng):
  w = fp4jax.quantize(jnp.asarray(rng.standard_normal((256, 64)).astype(np.float32)), MX, -2)
  x = jnp.asarray(rng.standard_normal((3, 256)).astype(np.float32))
  y = fp4jax.weight_only_matmul(x, w, out_dtype=jnp.float32, tile=(16, 64, 128))
  np.testing.assert_allclose(np.asarray(y), np.asarray(wo.weight_only_reference(x, w)),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m,bm", [(1, 16), (16, 16), (17, 32), (40, 64), (64, 64), (300, 64)])
def test_weight_only_rows_tile_is_a_power_of_two(m, bm):
  assert wo.weight_only_rows_tile(m) == bm


@pytest.mark.parametrize("m,n,k,expected", [
    (16, 8192, 8192, 4),     # 128 output tiles of 64 columns: 4 K splits fill 2 per SM
    (64, 8192, 8192, 4),     # bm = 64: one row tile
    (256, 8192, 8192, 1),    # 4 x 128 tiles are enough
    (16, 8192, 512, 2),      # K / bk = 2 allows at most 2
])
def test_weight_only_splits_fill_the_gpu(m, n, k, expected):
  assert wo.weight_only_splits(m, n, k, wo.weight_only_rows_tile(m), 64, 256) == expected


def test_bad_weights_are_rejected_with_the_fix():
  a = fp4jax.quantize(jnp.ones((64, 128)), MX, -1)
  b = fp4jax.quantize(jnp.ones((128, 64)), MX, -2)
  with pytest.raises(ValueError, match="blocked along K"):
    wo.weight_only_matmul(jnp.ones((4, 128)), a)
  with pytest.raises(ValueError, match="do not contract"):
    wo.weight_only_matmul(jnp.ones((4, 96)), b)
  with pytest.raises(ValueError, match="packed E2M1 weights"):
    wo.weight_only_matmul(jnp.ones((4, 128)), fp4jax.quantize(jnp.ones((128, 64)), "mxfp8_e4m3", -2))
  with pytest.raises(ValueError, match="splits=3 must be >= 1 and divide"):
    wo.weight_only_matmul(jnp.ones((4, 128)), b, tile=(16, 64, 32), splits=3)
  with pytest.raises(ValueError, match="not a multiple of the tile"):
    wo.weight_only_matmul(jnp.ones((4, 128)), b, tile=(16, 48, 128))


def test_tile_scaled_weights_are_rejected():
  # nvfp4_2d has 16x16 tiles: its scales are (K/16, N/16), not the kernel's (K/16, N).
  w = fp4jax.quantize(jnp.ones((128, 64)), "nvfp4_2d", -2)
  with pytest.raises(ValueError, match="packed E2M1 weights"):
    wo.weight_only_matmul(jnp.ones((4, 128)), w)
