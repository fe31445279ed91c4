"""fp4jax.quantize: the public API, granularities, axes, dtypes, padding, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fp4jax
from fp4jax import rounding
from conftest import bits_equal_or_both_nan

PRESETS = sorted(fp4jax.PRESETS)


def _blockwise_reference(x, spec, axis):
  """An independent float64 re-derivation for E8M0 floor specs along ``axis``."""
  xm = np.moveaxis(np.asarray(x, np.float64), axis, -1)
  bs = spec.block_size
  b = xm.reshape(*xm.shape[:-1], -1, bs)
  amax = np.abs(b).max(-1, keepdims=True)
  e = np.where(amax > 0, np.floor(np.log2(np.where(amax > 0, amax, 1))), -127) - spec.element.emax
  e = np.clip(e, -127, 127)
  vals = np.asarray(rounding.round_to_format((b / np.exp2(e)).astype(np.float32), spec.element))
  return np.moveaxis((vals * np.exp2(e)).reshape(xm.shape), -1, axis)


@pytest.mark.parametrize("axis", [0, 1, -1, 2])
@pytest.mark.parametrize("preset", ["mxfp4", "mxfp6_e2m3", "mxfp8_e4m3", "mxint8"])
def test_any_axis_matches_float64_reference(preset, axis, rng):
  x = (rng.standard_normal((32, 64, 32)) * np.exp2(rng.integers(-8, 8, (32, 1, 1)))).astype(np.float32)
  spec = fp4jax.get_spec(preset)
  y = np.asarray(fp4jax.fake_quant(x, preset, axis=axis))
  np.testing.assert_array_equal(y, _blockwise_reference(x, spec, axis).astype(np.float32))


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_every_preset_every_dtype(preset, dtype, rng):
  x = jnp.asarray(rng.standard_normal((32, 256)).astype(np.float32)).astype(dtype)
  q = fp4jax.quantize(x, preset)
  y = fp4jax.dequantize(q)
  assert y.dtype == dtype and y.shape == x.shape and q.shape == x.shape and q.dtype == dtype
  x32, y32 = np.asarray(x, np.float32), np.asarray(y, np.float32)
  rel = np.linalg.norm(y32 - x32) / np.linalg.norm(x32)
  assert rel < 0.2, (preset, rel)
  # With power-of-two scales dequantized values are fixed points of fake_quant (the
  # block max keeps its binade). Float scales re-derive from a rounded amax, so not there.
  if dtype == jnp.float32 and fp4jax.get_spec(preset).scale_format.is_pow2:
    np.testing.assert_array_equal(fp4jax.fake_quant(y, preset), y)


def test_fake_quant_equals_dequantize_quantize(rng):
  x = jnp.asarray(rng.standard_normal((8, 64)), jnp.bfloat16)
  a = fp4jax.fake_quant(x, "nvfp4", axis=-1)
  b = fp4jax.dequantize(fp4jax.quantize(x, "nvfp4", axis=-1), x.dtype)
  assert a.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_the_documented_calls():
  x = jax.random.normal(jax.random.key(0), (16, 64))
  q = fp4jax.quantize(x, "mxfp4", axis=-1, block_size=None, scale_mode="floor",
                      rounding="nearest", key=None)
  assert fp4jax.dequantize(q, jnp.float32).dtype == jnp.float32
  assert fp4jax.quantize(x, "nvfp4", axis=-1).tensor_scale is not None
  assert fp4jax.quantize(x, "nvfp4", axis=-1, tensor_scale=None).tensor_scale is None
  fp4jax.quantize(x, "mxfp8_e4m3", axis=-1, scale_mode="floor")
  assert fp4jax.fake_quant(x, "mxfp4", axis=-1).shape == x.shape
  spec = fp4jax.get_spec("mxfp4").replace(block_size=16)
  assert fp4jax.quantize(x, spec).scales.shape == (16, 4)


def test_spec_overrides_for_sweeps(rng):
  x = rng.standard_normal((8, 128)).astype(np.float32)
  for bs in (8, 16, 32, 64, 128):
    assert fp4jax.quantize(x, "mxfp4", block_size=bs).scales.shape == (8, 128 // bs)
  q = fp4jax.quantize(x, fp4jax.get_spec("mxfp4").replace(scale_format="ue4m3", scale_mode="amax"))
  assert q.scales.dtype == jnp.float8_e4m3fn
  q = fp4jax.quantize(x, fp4jax.get_spec("nvfp4").replace(element="e2m3"))
  assert q.codes.shape == (8, 96)  # 6-bit codes, 4 per 3 bytes
  q = fp4jax.quantize(x, fp4jax.QuantSpec("e3m0", "e8m0", block_size=32))
  ratio = np.abs(np.asarray(fp4jax.dequantize(q))) / np.asarray(
      q.scales.astype(jnp.float32)).repeat(32, -1)
  # E3M0 elements are 0 or powers of two in [2^-2, 2^4].
  assert set(np.unique(ratio)) <= {0.0} | {2.0**e for e in range(-2, 5)}


def test_2d_tiles_share_one_scale_per_16x16(rng):
  w = rng.standard_normal((64, 48)).astype(np.float32)
  q = jax.jit(lambda w: fp4jax.quantize(w, "nvfp4_2d"))(w)
  assert q.scales.shape == (4, 3)
  # The same tile scale serves both orientations: quantizing w.T with axis -2 gives the
  # transposed values.
  qt = jax.jit(lambda w: fp4jax.quantize(w, "nvfp4_2d", axis=-2))(w.T.copy())
  deq = jax.jit(fp4jax.dequantize)
  np.testing.assert_array_equal(np.asarray(deq(qt)).T, deq(q))
  tile_max = np.abs(w).reshape(4, 16, 3, 16).max((1, 3))
  t = np.abs(w).max() / 2688.0
  s = np.asarray(q.scales, np.float32) * np.float32(t)
  assert (np.abs(tile_max / s / 6 - 1) < 0.07).all()  # e4m3 rounding of amax/6


def test_per_channel_and_per_tensor(rng):
  w = rng.standard_normal((64, 32)).astype(np.float32) * np.arange(1, 33, dtype=np.float32)
  q = fp4jax.quantize(w, "fp8_e4m3_channel", axis=0)  # one scale per output column
  assert q.scales.shape == (1, 32)
  np.testing.assert_allclose(np.asarray(q.scales)[0], np.abs(w).max(0) / 448, rtol=1e-6)
  q = fp4jax.quantize(w, "fp8_e4m3_tensor")
  assert q.scales.shape == (1, 1)
  assert float(q.scales[0, 0]) == np.float32(np.abs(w).max()) / np.float32(448)


@pytest.mark.parametrize("ndim", [1, 2, 3, 4])
def test_any_rank(ndim, rng):
  shape = (3, 5, 7, 64)[-ndim:]
  x = rng.standard_normal(shape).astype(np.float32)
  y = fp4jax.fake_quant(x, "mxfp4")
  assert y.shape == shape


def test_padding(rng):
  x = rng.standard_normal((5, 50)).astype(np.float32)
  q = fp4jax.quantize(x, "mxfp4", pad=True)
  assert q.shape == (5, 50) and q.padding == (0, 14) and q.scales.shape == (5, 2)
  y = np.asarray(fp4jax.dequantize(q))
  xp = np.pad(x, ((0, 0), (0, 14)))
  np.testing.assert_array_equal(y, np.asarray(fp4jax.fake_quant(xp, "mxfp4"))[:, :50])
  q = fp4jax.quantize(rng.standard_normal((20, 30)).astype(np.float32), "nvfp4_2d", pad=True)
  assert q.shape == (20, 30) and q.scales.shape == (2, 2)


def test_stochastic_rounding_through_quantize(rng):
  x = jnp.asarray(rng.standard_normal((16, 64)), jnp.float32)
  k = jax.random.key(0)
  a = fp4jax.quantize(x, "mxfp4", rounding="stochastic", key=k)
  b = fp4jax.quantize(x, "mxfp4", rounding="stochastic", key=k)
  c = fp4jax.quantize(x, "mxfp4", rounding="stochastic", key=jax.random.key(1))
  np.testing.assert_array_equal(a.codes, b.codes)
  assert (np.asarray(a.codes) != np.asarray(c.codes)).any()
  # Mean over keys approaches x far more closely than nearest rounding's error.
  ys = jax.jit(jax.vmap(lambda kk: fp4jax.fake_quant(x, "nvfp4", rounding="stochastic",
                                                     key=kk)))(
      jax.random.split(jax.random.key(2), 512))
  err_sr = float(jnp.abs(ys.mean(0) - x).mean())
  err_rn = float(jnp.abs(jax.jit(lambda x: fp4jax.fake_quant(x, "nvfp4"))(x) - x).mean())
  assert err_sr < err_rn / 4, (err_sr, err_rn)


def test_raw_and_traced_keys_and_tensor_scales_are_accepted():
  x = jnp.linspace(-3, 3, 128, dtype=jnp.float32).reshape(4, 32)
  a = fp4jax.quantize(x, "mxfp4", rounding="stochastic", key=jax.random.key(2))
  b = fp4jax.quantize(x, "mxfp4", rounding="stochastic", key=jax.random.PRNGKey(2))
  assert a.codes.shape == b.codes.shape
  # A traced tensor scale (e.g. the previous step's amax) is not checked at trace time.
  f = jax.jit(lambda x, t: fp4jax.quantize(x, "nvfp4", tensor_scale=t).codes)
  assert f(x, jnp.float32(0.5)).shape == (4, 16)


def test_random_bits_argument_matches_key():
  x = jnp.linspace(-3, 3, 64, dtype=jnp.float32).reshape(2, 32)
  from fp4jax import prng
  rb = prng.random_bits_for(jax.random.key(5), x.shape)
  a = fp4jax.quantize(x, "mxfp4", rounding="stochastic", key=jax.random.key(5))
  b = fp4jax.quantize(x, "mxfp4", rounding="stochastic", random_bits=rb)
  np.testing.assert_array_equal(a.codes, b.codes)


@pytest.mark.parametrize("call,err,match", [
    (lambda x: fp4jax.quantize(x[:, :30], "mxfp4"), ValueError, "pad=True"),
    (lambda x: fp4jax.quantize(x, "mxfp3"), ValueError, "valid names: .*mxfp4"),
    (lambda x: fp4jax.quantize(x.astype(jnp.int32), "mxfp4"), TypeError, "float32, bfloat16"),
    (lambda x: fp4jax.quantize(x, "mxfp4", rounding="stochastic"), ValueError, "key="),
    (lambda x: fp4jax.quantize(x, "mxfp4", block_size=0), ValueError, "block_size"),
    (lambda x: fp4jax.quantize(x, "mxfp4", block_size=-32), ValueError, "block_size"),
    (lambda x: fp4jax.quantize(x, "mxfp4", axis=2), ValueError, "axis=2 is out of range"),
    (lambda x: fp4jax.quantize(x, "nvfp4", scale_mode="floor"), ValueError, "scale_mode"),
    (lambda x: fp4jax.quantize(x, "mxfp4", rounding="up"), ValueError, "rounding"),
    (lambda x: fp4jax.quantize(x, "mxfp4", tensor_scale="amax"), ValueError, "float scale"),
    (lambda x: fp4jax.quantize(x, "nvfp4_2d", axis=0) if x.ndim == 3 else
     fp4jax.quantize(x[0], "nvfp4_2d"), ValueError, "rank >= 2"),
    (lambda x: fp4jax.quantize(x, "mxfp4", random_bits=jnp.zeros((3,), jnp.uint32),
                               rounding="stochastic"), ValueError, "random_bits"),
    (lambda x: fp4jax.quantize(x[0, 0], "mxfp4"), ValueError, "at least one dimension"),
    (lambda x: fp4jax.quantize(x, "mxfp4", rounding="stochastic", key=3), TypeError,
     r"key must be a jax.random key.*got int"),
    (lambda x: fp4jax.quantize(x, "nvfp4", tensor_scale=0.0), ValueError,
     "positive finite FP32 value, got 0.0"),
    (lambda x: fp4jax.quantize(x, "nvfp4", tensor_scale=float("inf")), ValueError,
     "positive finite"),
    (lambda x: fp4jax.quantize(x, "nvfp4", tensor_scale=-1.0), ValueError, "positive finite"),
    (lambda x: fp4jax.dequantize(fp4jax.quantize(x, "mxfp4"), jnp.int32), TypeError,
     "dtype must be a float type"),
    (lambda x: fp4jax.qmatmul(x, jnp.ones((64, 32)), "nvfp4", key=0), TypeError,
     "key must be a jax.random key"),
])
def test_bad_input_raises_clear_errors(call, err, match):
  x = jnp.ones((4, 64), jnp.float32)
  with pytest.raises(err, match=match):
    call(x)


def test_concrete_tensor_scale_closed_over_by_a_loop_body():
  """A concrete scale captured by a fori_loop body is checked without a jnp op (which the
  trace would stage, making it a tracer); a traced scale passes through unchecked."""
  x = jnp.ones((4, 64), jnp.float32)
  scale = jnp.float32(0.5)

  def body(i, acc):
    return acc + fp4jax.dequantize(fp4jax.quantize(x * i, "nvfp4", tensor_scale=scale))

  got = jax.lax.fori_loop(0, 2, body, jnp.zeros_like(x))
  want = fp4jax.dequantize(fp4jax.quantize(x, "nvfp4", tensor_scale=scale))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  bad = jnp.float32(0.0)
  with pytest.raises(ValueError, match="positive finite"):
    jax.lax.fori_loop(0, 2, lambda i, a: a + fp4jax.dequantize(
        fp4jax.quantize(x, "nvfp4", tensor_scale=bad)), jnp.zeros_like(x))


@pytest.mark.parametrize("preset", PRESETS)
def test_jit_compiles_in_seconds(preset):
  """Guards against XLA fusing block-level exact arithmetic into every element (it once
  took minutes to compile the two-level NVFP4 graph on CPU)."""
  import time
  x = jnp.ones((64, 256), jnp.bfloat16)
  f = jax.jit(lambda v, k: fp4jax.fake_quant(v, preset, rounding="stochastic", key=k))
  start = time.perf_counter()
  jax.block_until_ready(f(x, jax.random.key(0)))
  assert time.perf_counter() - start < 30.0


@pytest.mark.parametrize("tensor_scale", ["amax", None, 0.01])
def test_pallas_takes_tensor_scale_overrides_like_xla(tensor_scale, rng):
  # The kernels receive the resolved spec (one or two levels) and any explicit FP32 tensor
  # scale, so every override gives the pure-JAX path's bits.
  x = jnp.asarray(rng.standard_normal((32, 64)).astype(np.float32))
  got = fp4jax.quantize(x, "nvfp4", tensor_scale=tensor_scale, impl="pallas")
  want = fp4jax.quantize(x, "nvfp4", tensor_scale=tensor_scale, impl="xla")
  np.testing.assert_array_equal(np.asarray(got.codes), np.asarray(want.codes))
  np.testing.assert_array_equal(np.asarray(got.scales.astype(jnp.float32)),
                                np.asarray(want.scales.astype(jnp.float32)))
  assert (got.tensor_scale is None) == (want.tensor_scale is None) == (tensor_scale is None)


@pytest.mark.parametrize("impl", ["xla", "auto", "pallas"])
def test_axis_out_of_range_is_an_error_whatever_the_implementation(impl):
  with pytest.raises(ValueError, match="axis=5 is out of range"):
    fp4jax.quantize(jnp.ones((32, 64)), "mxfp4", axis=5, impl=impl)


@pytest.mark.parametrize("spec", ["mxfp4", "mxfp6_e2m3", "mxfp8_e4m3", "int4_g32"])
def test_empty_tensors_round_trip(spec):
  x = jnp.zeros((0, 32), jnp.float32)
  q = fp4jax.quantize(x, spec)
  assert fp4jax.dequantize(q).shape == (0, 32)


def test_empty_tensor_with_a_tensor_amax_needs_an_explicit_tensor_scale():
  x = jnp.zeros((0, 32), jnp.float32)
  with pytest.raises(ValueError, match="x is empty .* pass tensor_scale= explicitly"):
    fp4jax.quantize(x, "nvfp4")
  assert fp4jax.dequantize(fp4jax.quantize(x, "nvfp4", tensor_scale=1.0)).shape == (0, 32)


def test_qmatmul_of_an_empty_batch_is_empty_with_zero_gradients():
  w = jnp.ones((64, 32), jnp.float32)
  y = fp4jax.qmatmul(jnp.zeros((0, 64)), w, "nvfp4", key=jax.random.key(0))
  assert y.shape == (0, 32)
  g = jax.grad(lambda w: fp4jax.qmatmul(jnp.zeros((0, 64)), w, "mxfp4").sum())(w)
  np.testing.assert_array_equal(np.asarray(g), 0)


@pytest.mark.parametrize("name,match", [
    ("e5m4", "element format 'e5m4': .*at most 8 bits"),
    ("int0", "element format 'int0': .*bits must be >= 2"),
    ("e2m1x", "unknown element format"),
])
def test_generic_element_names_say_why_they_are_rejected(name, match):
  with pytest.raises(ValueError, match=match):
    fp4jax.QuantSpec(name, "e8m0")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nvfp4_finite_tensor_amax_confines_a_non_finite_element_to_its_block(bad):
  # tensor_scale="amax" (NVIDIA's / torchao's NVFP4): one NaN or Inf makes the tensor scale
  # non-finite, so every element dequantizes to NaN. "finite_amax" takes the amax of the
  # finite values: the scale stays finite, and only the bad element's block is touched
  # (NaN for a NaN; an Inf saturates within its block), as in the MX formats.
  x = np.asarray(jax.random.normal(jax.random.key(0), (4, 64)), np.float32)
  xb = x.copy()
  xb[1, 5] = bad
  whole = np.asarray(fp4jax.dequantize(fp4jax.quantize(jnp.asarray(xb), "nvfp4")))
  assert np.isnan(whole).all()
  q = fp4jax.quantize(jnp.asarray(xb), "nvfp4", tensor_scale="finite_amax")
  assert q.spec.tensor_scale == "finite_amax"
  d = np.asarray(fp4jax.dequantize(q))
  # Same as an explicit tensor scale from the finite amax, bit for bit.
  nv = fp4jax.get_spec("nvfp4")
  t = fp4jax.scales.tensor_scale_from_amax(np.abs(np.where(np.isfinite(xb), xb, 0)).max(),
                                           nv.element, nv.scale_format)
  explicit = fp4jax.quantize(jnp.asarray(xb), "nvfp4", tensor_scale=t)
  for u, v in zip(jax.tree.leaves(q), jax.tree.leaves(explicit)):
    assert np.array_equal(np.asarray(u).view(np.uint8), np.asarray(v).view(np.uint8))
  # Every other block equals the quantization of the finite tensor (block 16 along rows).
  clean = np.asarray(fp4jax.dequantize(fp4jax.quantize(jnp.asarray(np.where(
      np.isfinite(xb), xb, 0)), "nvfp4", tensor_scale=t)))
  others = np.ones_like(d, bool)
  others[1, 0:16] = False
  np.testing.assert_array_equal(d[others], clean[others])
  assert np.isfinite(d[others]).all()
  if np.isnan(bad):
    assert np.isnan(d[1, 0:16]).all()
  else:
    assert np.isfinite(d[1, 0:16]).all() and d[1, 5] == np.sign(bad) * np.abs(d[1, 0:16]).max()


@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_finite_tensor_amax_is_the_same_through_every_path(impl, rng):
  x = rng.standard_normal((64, 128)).astype(np.float32)
  x[3, 7], x[40, 100], x[9, 64] = np.nan, np.inf, -np.inf
  spec = fp4jax.get_spec("nvfp4").replace(tensor_scale="finite_amax")
  ref = fp4jax.encode.quantize_reference(jnp.asarray(x), spec)
  got = fp4jax.quantize(jnp.asarray(x), spec, impl=impl)
  for u, v in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
    assert np.array_equal(np.asarray(u).view(np.uint8), np.asarray(v).view(np.uint8))
  # The GEMM-ready emitter (fp4jax.operand) takes the same tensor scale and values.
  want, want_ts = fp4jax.operand.gemm_operand_reference(jnp.asarray(x), spec, -1,
                                                        dtype=jnp.float32)
  values, ts = fp4jax.operand.gemm_operand(jnp.asarray(x), spec, -1, dtype=jnp.float32)
  np.testing.assert_array_equal(np.asarray(ts), np.asarray(want_ts))
  np.testing.assert_array_equal(np.asarray(want_ts), np.asarray(ref.tensor_scale).reshape(()))
  assert bits_equal_or_both_nan(values, want).all()
  assert np.isnan(np.asarray(values)).sum() == 16   # the NaN's block only


def test_tensor_scale_names_are_checked():
  with pytest.raises(ValueError, match="tensor_scale must be one of .*finite_amax"):
    fp4jax.get_spec("nvfp4").replace(tensor_scale="finite")
  with pytest.raises(ValueError, match="'finite_amax', None or an FP32 value"):
    fp4jax.quantize(jnp.ones((4, 32)), "nvfp4", tensor_scale="max")
