"""fp4jax/kernels/quantize.py against the pure-JAX reference, bit for bit.

On CPU (CI) the kernels run in Pallas interpret mode; on a GPU they are compiled
(Triton): ``JAX_PLATFORMS=cuda,cpu pytest tests/test_kernels_quantize.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fp4jax
import sweeps
from fp4jax.kernels import quantize as kq

INTERPRET = not fp4jax.dispatch.device_facts().on_gpu
MX, NV = fp4jax.get_spec("mxfp4"), fp4jax.get_spec("nvfp4")
SPECS = {
    "mxfp4_floor": MX, "mxfp4_rceil": MX.replace(scale_mode="rceil"),
    "mxfp4_b16": MX.replace(block_size=16), "mxfp4_sr": MX.replace(rounding="stochastic"),
    "mxfp8_e4m3": fp4jax.get_spec("mxfp8_e4m3"), "nvfp4": NV,
    "nvfp4_sr": NV.replace(rounding="stochastic"), "nvfp4_one_level": NV.replace(tensor_scale=None),
}


def _equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert u.shape == v.shape and u.dtype == v.dtype, (u.shape, v.shape, u.dtype, v.dtype)
    uu, vv = np.atleast_1d(np.asarray(u)).view(np.uint8), np.atleast_1d(np.asarray(v)).view(np.uint8)
    assert np.array_equal(uu, vv), f"{int((uu != vv).sum())} bytes differ"


def _input(rng, shape, dtype, adversarial):
  x = rng.standard_normal(shape).astype(np.float32)
  if adversarial:
    x *= np.exp2(rng.integers(-30, 30, size=(shape[0], 1))).astype(np.float32)
    flat = x.reshape(-1)
    sp = np.asarray([0.0, -0.0, np.nan, np.inf, -np.inf, 1e-40, -3e-39, 3.0e38, -3.3e38,
                     6.0, 5.99, 448.0, 2.0**-133], np.float32)
    flat[rng.choice(flat.size, 48, replace=False)] = np.resize(sp, 48)
    x[:, 32:64] = 0.0
  return jnp.asarray(x).astype(dtype)


@pytest.mark.parametrize("name,axis,dtype,case", sweeps.product(
    16, name=sorted(SPECS), axis=[-1, -2], dtype={"bf16": jnp.bfloat16, "f32": jnp.float32},
    case={"tile_multiple": ((64, 256), False), "ragged_adversarial": ((96, 160), True)}))
def test_kernel_equals_reference(name, axis, dtype, case, rng):
  shape, adversarial = case
  spec = SPECS[name]
  x = _input(rng, shape, dtype, adversarial)
  key = jax.random.key(int(rng.integers(1 << 30)))
  got = kq.quantize(x, spec, axis, key, interpret=INTERPRET)
  want = kq.quantize_reference(x, spec, axis, key=key)
  _equal(got, want)


def _banded_input(rng, dtype):
  """Row bands that put tiles on both sides of the fast path's limits: ordinary values;
  blocks around 2^-126 (scales near 2^-124, subnormal elements); blocks around 2^-95
  with subnormal elements mixed in (the stochastic limit 2^-93); NaN/Inf in a few
  blocks only."""
  x = rng.standard_normal((128, 256)).astype(np.float32)
  x[32:64] *= np.exp2(rng.integers(-130, -116, size=(32, 1))).astype(np.float32)
  x[64:96] *= np.exp2(rng.integers(-98, -90, size=(32, 1))).astype(np.float32)
  x[64:96:3, ::5] = (rng.standard_normal((11, 52)) * 1e-39).astype(np.float32)
  x[96, 7], x[100, 130], x[120, 255] = np.nan, np.inf, -np.inf
  return jnp.asarray(x).astype(dtype)


@pytest.mark.parametrize("name,axis,dtype,data", sweeps.product(
    12, name=["mxfp4_floor", "mxfp4_rceil", "mxfp4_sr", "nvfp4", "nvfp4_sr"], axis=[-1, -2],
    dtype={"bf16": jnp.bfloat16, "f32": jnp.float32}, data=["banded", "tiny_tensor"]))
def test_fast_and_general_tiles_agree_with_reference(name, axis, dtype, data, rng):
  # Tiles of 32x64: some take the E2M1 fast path, some the general one (extreme scales,
  # subnormal-heavy blocks, non-finite values; for NVFP4 a tiny tensor makes 1/s huge).
  x = _banded_input(rng, dtype)
  if data == "tiny_tensor":
    x = (x.astype(jnp.float32) * np.float32(2.0**-128)).astype(dtype)
  spec, key = SPECS[name], jax.random.key(3)
  got = kq.quantize(x, spec, axis, key=key, tile=(32, 64), interpret=INTERPRET)
  _equal(got, fp4jax.quantize(x, spec, axis, key=key))


@pytest.mark.parametrize("name", ["nvfp4", "nvfp4_sr", "nvfp4_one_level"])
@pytest.mark.parametrize("axis", [-1, -2])
def test_nvfp4_block_maxima_at_e4m3_rounding_midpoints(name, axis, rng):
  # The fast NVFP4 scale is estimated as amax * fl(1/(6t)) and is only trusted away from
  # E4M3 rounding midpoints; block maxima a few ulps around 6 t * midpoint must come out
  # as in the reference (their tiles take the exact way).
  x = rng.uniform(-1.0, 1.0, (64, 256)).astype(np.float32)
  mids = np.array([1.0625, 1.1875, 3.25, 0.02734375, 13.0, 416.0 + 16.0], np.float64)
  offsets = np.arange(-24, 25, 3)
  t = 2.0**-3
  vals = [np.float32(6 * t * m * (1 + k * 2.0**-23)) for m in mids for k in offsets]
  blocks = x.reshape(-1, 16) if axis == -1 else x.T.reshape(-1, 16)
  for i, v in enumerate(vals):  # one crafted maximum per block, in the first half
    blocks[2 * i, 5] = v
  x = blocks.reshape(64, 256) if axis == -1 else blocks.reshape(256, 64).T
  kw = {} if name == "nvfp4_one_level" else {"tensor_scale": t}
  spec, key = SPECS[name], jax.random.key(5)
  got = kq.quantize(jnp.asarray(x), spec, axis, key=key, tile=(32, 64), interpret=INTERPRET, **kw)
  _equal(got, fp4jax.quantize(jnp.asarray(x), spec, axis, key=key, **kw))


@pytest.mark.parametrize("name", ["mxfp4_floor", "nvfp4_sr"])
def test_both_orientations_from_one_read(name, rng):
  spec = SPECS[name]
  x = _input(rng, (96, 160), jnp.bfloat16, True)
  key = jax.random.key(5)
  rows, cols = kq.quantize_both(x, spec, key, interpret=INTERPRET)
  _equal(rows, kq.quantize_reference(x, spec, -1, key=key))
  _equal(cols, kq.quantize_reference(x, spec, -2, key=key))


@pytest.mark.parametrize("name", ["mxfp4_floor", "nvfp4", "nvfp4_sr"])
@pytest.mark.parametrize("axis", [-1, -2])
def test_fused_hadamard(name, axis, rng):
  spec = SPECS[name]
  x = _input(rng, (64, 128), jnp.bfloat16, False)
  key = jax.random.key(9)
  got = kq.quantize(x, spec, axis, key, hadamard_block=16, interpret=INTERPRET)
  _equal(got, kq.hadamard_quantize_reference(x, spec, axis, key, 16))
  # The butterfly is the Hadamard transform of fp4jax.hadamard (up to summation order).
  w = fp4jax.hadamard.sign_seed_words(kq.key_for_signs(key))
  signs = jnp.stack(fp4jax.hadamard.butterfly_signs(16, w[0], w[1]))
  y = fp4jax.hadamard.rht_butterfly(x.astype(jnp.float32), 16, w[0], w[1])
  r = signs[:, None] * jnp.asarray(fp4jax.hadamard.hadamard_matrix(16))
  want = (x.astype(jnp.float32).reshape(64, 8, 16) @ r).reshape(64, 128)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,hadamard_block,tile", [
    ("nvfp4_sr", 32, None),         # 32 row phases: one Hadamard block, two scale blocks
    ("mxfp4_floor", 16, (32, 64)),  # 32 row phases: two Hadamard blocks, one scale block
])
def test_column_hadamard_row_phases(name, hadamard_block, tile, rng):
  # Along columns the kernel holds each block as strided row loads (no transpose).
  spec, key = SPECS[name], jax.random.key(4)
  x = _input(rng, (96, 128), jnp.float32, False)
  why = None if INTERPRET else kq.column_hadamard_compile_reason(hadamard_block, spec)
  if why:   # compiled: refused up front (a > 9-minute Triton compile), naming the way out
    with pytest.raises(ValueError, match="row phases in one program.*hadamard_block=16"):
      kq.quantize(x, spec, -2, key, hadamard_block=hadamard_block, tile=tile)
    return
  got = kq.quantize(x, spec, -2, key, hadamard_block=hadamard_block, tile=tile,
                    interpret=INTERPRET)
  _equal(got, kq.hadamard_quantize_reference(x, spec, -2, key, hadamard_block))


@pytest.mark.parametrize("name,hadamard_block,refused", [
    ("nvfp4_sr", 32, True), ("nvfp4", 32, True), ("nvfp4_sr", 16, False),
    ("mxfp4_floor", 16, False), ("mxfp4_floor", 32, False)])
def test_which_compiled_column_hadamard_launches_are_refused(name, hadamard_block, refused):
  why = kq.column_hadamard_compile_reason(hadamard_block, SPECS[name])
  assert (why is not None) == refused, why


def test_column_hadamard_tile_must_hold_whole_blocks(rng):
  x = _input(rng, (64, 128), jnp.float32, False)
  with pytest.raises(ValueError, match=r"tile=\(16, 64\).*multiple of 32"):
    kq.quantize(x, SPECS["nvfp4"], -2, jax.random.key(0), hadamard_block=32, tile=(16, 64),
                interpret=INTERPRET)


def test_explicit_tensor_scale_and_tiles(rng):
  x = _input(rng, (128, 256), jnp.float32, False)
  got = kq.quantize(x, NV, -1, tensor_scale=0.01, tile=(16, 128), interpret=INTERPRET)
  _equal(got, fp4jax.quantize(x, NV, -1, tensor_scale=0.01))


def test_dispatch_and_unsupported_configs(rng):
  x = _input(rng, (64, 128), jnp.float32, False)
  q = fp4jax.quantize(x, "mxfp4", -1, impl="pallas")
  _equal(q, fp4jax.quantize(x, "mxfp4", -1))
  auto = fp4jax.quantize(x, "mxfp4", -1, impl="auto")
  _equal(auto, fp4jax.quantize(x, "mxfp4", -1))
  assert kq.unsupported_reason((4, 64, 128), jnp.float32, MX, -1) is not None
  assert "granularity" in kq.unsupported_reason((64, 128), jnp.float32,
                                                fp4jax.get_spec("nvfp4_2d"), -1)
  assert "6-bit" in kq.unsupported_reason((64, 128), jnp.float32,
                                          fp4jax.get_spec("mxfp6_e2m3"), -1)
  with pytest.raises(ValueError, match="impl='pallas'.*granularity"):
    fp4jax.quantize(x, "fp8_e4m3_tensor", -1, impl="pallas")
  with pytest.raises(ValueError, match="impl must be"):
    fp4jax.quantize(x, "mxfp4", -1, impl="cuda")
  with pytest.raises(ValueError, match="stochastic.*needs key"):
    kq.quantize(x, SPECS["mxfp4_sr"], -1, interpret=True)


MXFP8_SR = fp4jax.get_spec("mxfp8_e4m3").replace(rounding="stochastic")


@pytest.mark.parametrize("spec,width", [
    (SPECS["mxfp4_sr"], 42), (SPECS["mxfp4_sr"], 160), (SPECS["nvfp4_sr"], 42),
    (MXFP8_SR, 42), (MXFP8_SR, 96)])   # 8-bit elements: the transposed tiles' bits
def test_stochastic_bits_along_columns_of_any_width(spec, width, rng):
  """Blocks along columns, ``width`` columns. These tiles draw one hash per element
  (strided row phases for 4-bit elements, transposed tiles for 8-bit ones): with word
  indices counted per word where the width is a multiple of 4 (160, 96), from the
  wrapped flat index where it is not (42), as the reference does; all equal it."""
  x = jnp.asarray(rng.standard_normal((64, width)).astype(np.float32))
  key = jax.random.key(9)
  _equal(kq.quantize(x, spec, 0, key, interpret=INTERPRET),
         kq.quantize_reference(x, spec, 0, key=key))
