"""fp4jax.kernels.float_scale_operand: NVFP4's GEMM-ready operands from Pallas passes equal
the XLA reference bit for bit (interpret mode here; compiled on the GPU by
``kernels.bench_float_operand``, which checks before it times)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fp4jax import dispatch, hadamard, operand
from fp4jax.kernels import float_scale_operand as kf
from fp4jax.kernels.operand import OperandKernelConfig
from fp4jax.spec import get_spec

INTERPRET = dispatch.interpret_mode(dispatch.device_facts())
IEEE = dispatch.device_facts().keeps_subnormals   # the variant the dispatch runs here
NV = get_spec("nvfp4")
NV_SR = NV.replace(rounding="stochastic")


def _data(shape, dtype=jnp.bfloat16, seed=0):
  """Values over 40 binades with zeros of both signs, subnormals and a block at the top of
  NVFP4's range (so the tensor scale is not 1)."""
  rng = np.random.default_rng(seed)
  x = (rng.standard_normal(shape) * np.exp2(rng.integers(-20, 20, shape))).astype(np.float32)
  flat = x.reshape(-1)
  flat[:40] = 0.0
  flat[40:80] = -0.0
  flat[80:120] = rng.choice([1e-40, -3e-39, 2.0 ** -130, 1e-45], 40)
  flat[200:216] = 6.0 * 448.0 * 2.0 ** 12
  return jnp.asarray(x, dtype)


def _assert_same(got, want):
  g = np.asarray(jnp.asarray(got, jnp.float32))
  w = np.asarray(jnp.asarray(want, jnp.float32))
  assert g.shape == w.shape and g.dtype == w.dtype
  nan = np.isnan(g) & np.isnan(w)
  diff = (g.view(np.uint32) != w.view(np.uint32)) & ~nan
  assert not diff.any(), f"{diff.sum()} of {diff.size} differ, e.g. {g[diff][:4]} vs {w[diff][:4]}"


def _both(x, spec, axis, hadamard_block, dtype=jnp.bfloat16, config=None):
  key = jax.random.key(3) if spec.rounding == "stochastic" else None
  hkey = jax.random.key(4)
  got = kf.gemm_operand(x, spec, axis, key, dtype=dtype, hadamard_key=hkey,
                        hadamard_block=hadamard_block, interpret=INTERPRET, config=config,
                        ieee_subnormals=IEEE)
  want = kf.gemm_operand_reference(x, spec, axis, key, dtype=dtype, hadamard_key=hkey,
                                   hadamard_block=hadamard_block)
  return got, want


@pytest.mark.parametrize("axis,hadamard_block", [(-1, None), (-2, None), (-2, 16)],
                         ids=["rows", "cols", "cols_hadamard"])
@pytest.mark.parametrize("spec", [NV, NV_SR], ids=["nearest", "stochastic"])
def test_kernel_equals_reference(spec, axis, hadamard_block):
  x = _data((64, 128))
  (values, t), (want, want_t) = _both(x, spec, axis, hadamard_block)
  _assert_same(values, want)
  _assert_same(t, want_t)
  assert float(t) != 1.0   # the two-level path, not a degenerate tensor scale


@pytest.mark.parametrize("axis,hadamard_block", [(-1, None), (-2, 16)])
def test_float32_input_and_output(axis, hadamard_block):
  x = _data((32, 64), jnp.float32, seed=1)
  (values, t), (want, want_t) = _both(x, NV_SR, axis, hadamard_block, dtype=jnp.float32)
  assert values.dtype == jnp.float32
  _assert_same(values, want)
  _assert_same(t, want_t)


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_nan_and_inf_inputs_as_the_reference(bad):
  # A NaN anywhere makes the tensor scale NaN (every value NaN); an Inf makes it +Inf:
  # the reference's semantics (torchao's "amax" tensor scale), reproduced exactly.
  x = np.asarray(_data((32, 64)), np.float32)
  x[5, 7] = np.nan if bad == "nan" else np.inf
  x = jnp.asarray(x, jnp.bfloat16)
  for axis, block in [(-1, None), (-2, 16)]:
    (values, t), (want, want_t) = _both(x, NV, axis, block)
    _assert_same(values, want)
    _assert_same(t, want_t)
  assert np.isnan(np.asarray(t)) == (bad == "nan")


def test_leading_dims_and_tiles_that_do_not_divide():
  # (2, 48, 80): column blocks stay inside each leading index, and a 32 x 64 tile pads
  # both axes of the flattened (96, 80) operand and of its factors.
  x = _data((2, 48, 80), seed=2)
  cfg = OperandKernelConfig(32, 64, 4)
  for axis, block in [(-1, None), (-2, None), (-2, 16)]:
    (values, t), (want, want_t) = _both(x, NV_SR, axis, block, config=cfg)
    _assert_same(values, want)
    _assert_same(t, want_t)


def test_block_maxima_equal_the_transform_block_max():
  x = _data((64, 96), seed=3)
  signs = hadamard.random_signs(jax.random.key(4), 16)
  got = kf.block_maxima(x, NV, signs, interpret=INTERPRET)
  y = hadamard.rht(x, -2, jax.random.key(4), 16, method="butterfly", dtype=jnp.float32)
  from fp4jax import bits, blocks
  want = blocks.block_max(bits.abs_bits(operand.input_bits(y)),
                          blocks.block_extents(y.shape, NV, -2))
  assert got.shape == (4, 96) and got.dtype == jnp.uint32
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_several_operands_share_tables_and_equal_each_alone():
  xs = [_data((32, 64), seed=s) for s in range(3)]
  reqs = [kf.FloatScaleRequest(xs[0], NV, -1), kf.FloatScaleRequest(xs[1], NV_SR, -1,
                                                                       jax.random.key(1)),
          kf.FloatScaleRequest(xs[2], NV, -2, None, jax.random.key(2), 16)]
  together = kf.gemm_operands(reqs, interpret=INTERPRET, ieee_subnormals=IEEE)
  for r, (values, t) in zip(reqs, together):
    want, want_t = kf.gemm_operand_reference(r.x, r.spec, r.axis, r.key,
                                             hadamard_key=r.hadamard_key,
                                             hadamard_block=r.hadamard_block)
    _assert_same(values, want)
    _assert_same(t, want_t)


def test_stochastic_rounding_follows_its_key():
  x = jax.random.normal(jax.random.key(0), (32, 64), jnp.bfloat16)
  run = lambda k: kf.gemm_operand(x, NV_SR, -1, jax.random.key(k), interpret=INTERPRET)[0]
  a, b, c = run(7), run(7), run(8)
  _assert_same(a, b)
  assert (np.asarray(a, np.float32) != np.asarray(c, np.float32)).mean() > 0.1


@pytest.mark.parametrize("shape,dtype,spec,axis,block,fragment", [
    ((64,), jnp.bfloat16, NV, -1, None, "rank 1"),
    ((4, 64, 64), jnp.bfloat16, NV, 0, None, "axis 0"),
    ((64, 64), jnp.float16, NV, -1, None, "float16"),
    ((64, 64), jnp.bfloat16, get_spec("mxfp4"), -1, None, "power-of-two"),
    ((64, 64), jnp.bfloat16, NV.replace(tensor_scale="finite_amax"), -1, None, "finite_amax"),
    ((64, 64), jnp.bfloat16, NV, -1, 16, "along the rows"),
    ((64, 64), jnp.bfloat16, NV, -2, 32, "one transform per scale block"),
])
def test_unsupported_operands_are_named(shape, dtype, spec, axis, block, fragment):
  why = kf.unsupported_reason(shape, dtype, spec, axis, block)
  assert why is not None and fragment in why, why
  if len(shape) >= 2 and axis in (-1, -2):
    with pytest.raises(ValueError, match="unsupported operand"):
      kf.gemm_operand(jnp.zeros(shape, dtype), spec, axis, hadamard_block=block,
                      interpret=INTERPRET)


def test_bad_arguments_are_named():
  x = _data((32, 64))
  with pytest.raises(ValueError, match="stochastic rounding needs key"):
    kf.gemm_operand(x, NV_SR, -1, interpret=INTERPRET)
  with pytest.raises(ValueError, match="dtype must be bfloat16 or float32"):
    kf.gemm_operand(x, NV, -1, dtype=jnp.float16, interpret=INTERPRET)
  assert kf.orientation(-2, 2, 16) == "cols_hadamard" and kf.orientation(-1, 3, None) == "rows"



def test_transform_method_is_the_butterfly_only_where_the_kernels_apply_it():
  # NVFP4's wgrad transform (float scales, blocks of 16 along the columns, 16 points):
  # the butterfly on every device; anything else keeps the device's method.
  for method in ("butterfly", "dot", "dot_bf16"):
    assert kf.transform_method(NV_SR, -2, 3, 16, method) == "butterfly"
    assert kf.transform_method(NV, 1, 3, 16, method) == "butterfly"     # -2 of rank 3
    assert kf.transform_method(NV, -1, 3, 16, method) == method         # along the rows
    assert kf.transform_method(NV, -2, 3, 32, method) == method         # 32 points, 16-blocks
    assert kf.transform_method(get_spec("mxfp4"), -2, 3, 32, method) == method  # pow2 scales
    assert kf.transform_method(NV, -2, 3, None, method) == method
