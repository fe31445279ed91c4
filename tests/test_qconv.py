"""Quantized convolution as an implicit GEMM (fp4jax.qconv)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import fp4jax
from fp4jax import recipes
from fp4jax.qconv import qconv_general_dilated

# An identity recipe still goes through the im2col path: it checks the layout.
NOQUANT = recipes.Recipe("noquant")
CASES = [  # lhs, rhs, strides, padding, lhs_dil, rhs_dil, groups, dimension numbers
    ((2, 9, 9, 6), (3, 3, 6, 8), (1, 1), "SAME", None, None, 1, ("NHWC", "HWIO", "NHWC")),
    ((2, 9, 9, 6), (3, 3, 3, 8), (2, 1), "VALID", None, (2, 1), 2, ("NHWC", "HWIO", "NHWC")),
    ((2, 6, 9, 9), (8, 6, 3, 3), (1, 2), [(1, 2), (0, 1)], (1, 2), None, 1,
     ("NCHW", "OIHW", "NCHW")),
    ((2, 11, 4), (3, 4, 5), (1,), "SAME", None, None, 1, ("NWC", "WIO", "NWC")),
    ((1, 5, 6, 7, 4), (2, 3, 2, 4, 6), (1, 2, 1), "SAME", None, None, 1,
     ("NDHWC", "DHWIO", "NDHWC")),
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_layout_matches_lax_conv(case, rng):
  xs, ws, strides, pad, ld, rd, g, dn = case
  x = jnp.asarray(rng.standard_normal(xs).astype(np.float32))
  w = jnp.asarray(rng.standard_normal(ws).astype(np.float32))
  want = lax.conv_general_dilated(x, w, strides, pad, ld, rd, dn, feature_group_count=g,
                                  precision=lax.Precision.HIGHEST)
  # The identity recipe is exactly lax.dot_general at the default precision, which on a
  # GPU rounds f32 operands to TF32: compare layouts at full float32 precision.
  with jax.default_matmul_precision("float32"):
    got = qconv_general_dilated(x, w, strides, pad, ld, rd, dn, g, recipe=NOQUANT)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("recipe", ["mxfp4", "nvfp4", "tetrajet"])
def test_quantized_conv_is_qdot_on_tap_major_patches(recipe, rng):
  # Blocks must divide every contraction: K = 4 taps x 32, M = 2 x 4 x 4, N = 32.
  x = jnp.asarray(rng.standard_normal((2, 5, 5, 32)).astype(np.float32))
  w = jnp.asarray(rng.standard_normal((2, 2, 32, 32)).astype(np.float32))
  key = jax.random.key(4)
  conv = lambda w: qconv_general_dilated(x, w, (1, 1), "VALID",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                         recipe=recipe, key=key)
  got, g = jax.jit(lambda w: (conv(w), jax.grad(lambda w: conv(w).sum())(w)))(w)
  # Hand-built im2col with K ordered (tap, channel), the kernel's own row order.
  cols = [x[:, i:i + 4, j:j + 4, :] for i in range(2) for j in range(2)]
  p = jnp.stack(cols, axis=3).reshape(1, 2 * 4 * 4, 4 * 32)
  want = jax.jit(lambda p, w: fp4jax.qdot_general(
      p, w.reshape(1, 128, 32), (((2,), (1,)), ((0,), (0,))), recipe, key))(p, w)
  want = want.reshape(2, 4, 4, 32)
  assert bool(jnp.all(got == want)), "conv must be exactly the quantized GEMM on its patches"
  assert g.shape == w.shape and bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0


def test_bad_groups_and_batch_groups():
  x, w = jnp.ones((1, 4, 4, 6)), jnp.ones((3, 3, 4, 8))
  dn = ("NHWC", "HWIO", "NHWC")
  with pytest.raises(ValueError, match="feature_group_count"):
    qconv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn, feature_group_count=2)
  with pytest.raises(NotImplementedError, match="batch_group_count"):
    qconv_general_dilated(x, jnp.ones((3, 3, 6, 8)), (1, 1), "SAME", dimension_numbers=dn,
                          batch_group_count=2)
