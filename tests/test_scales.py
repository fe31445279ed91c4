"""fp4jax.scales: the scale rules on zeros, subnormals, the top of the range, NaN, Inf."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import fp4jax
from fp4jax import bits, formats as F, scales
from conftest import bits_equal_or_both_nan

MODES = ["floor", "ceil", "even", "rceil"]


def _e8m0(q):
  return np.asarray(jax.lax.bitcast_convert_type(q.scales, jnp.uint8)).astype(int)


@pytest.mark.parametrize("mode", MODES)
def test_zero_block_gets_smallest_scale_and_stays_zero(mode):
  x = np.zeros((2, 32), np.float32)
  x[1] = np.linspace(-1, 1, 32)
  q = fp4jax.quantize(x, "mxfp4", scale_mode=mode)
  assert _e8m0(q)[0, 0] == 0  # 2^-127
  y = np.asarray(fp4jax.dequantize(q))
  assert (y[0] == 0).all() and np.isfinite(y).all()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("special", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_makes_only_its_block_nan(mode, special, rng):
  x = rng.standard_normal((3, 64)).astype(np.float32)
  x[1, 40] = special
  q = fp4jax.quantize(x, "mxfp8_e4m3", scale_mode=mode)
  s = _e8m0(q)
  assert s[1, 1] == 255 and (np.delete(s.ravel(), 3) != 255).all()
  y = np.asarray(fp4jax.dequantize(q))
  assert np.isnan(y[1, 32:]).all() and np.isfinite(np.delete(y.reshape(-1, 32), 3, 0)).all()


def test_subnormal_blocks_quantize_exactly_despite_flush_to_zero(rng):
  """Independent float64 reference: scale 2^-127 (clamped), elements x * 2^127 rounded
  by ml_dtypes, then times 2^-127."""
  x = (rng.standard_normal((4, 32)) * 1e-39).astype(np.float32)
  y = np.asarray(fp4jax.fake_quant(x, "mxfp8_e4m3"))
  scaled = (x.astype(np.float64) * 2.0**127).astype(np.float32)
  ref = (np.clip(scaled, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
         * 2.0**-127).astype(np.float32)
  np.testing.assert_array_equal(y.view(np.uint32), ref.view(np.uint32))
  assert (y != 0).mean() > 0.9  # would be all zero if subnormals were flushed


@pytest.mark.parametrize("mode,code,value", [
    ("floor", 125 + 127, 6 * 2.0**125),   # 3.99 * 2^126 / 2^125 = 7.99 saturates to 6
    ("ceil", 126 + 127, np.inf),          # 3.99 rounds to 4: 4 * 2^126 = 2^128 > FLT_MAX
    ("rceil", 126 + 127, np.inf),
    ("even", 255, np.nan)])               # amax rounds up to 2^128 = Inf: NaN (torchao)
def test_top_of_float32_range(mode, code, value):
  x = np.full((1, 32), np.finfo(np.float32).max, np.float32)
  q = fp4jax.quantize(x, "mxfp4", scale_mode=mode)
  assert _e8m0(q)[0, 0] == code
  y = np.asarray(fp4jax.dequantize(q))
  np.testing.assert_array_equal(y, np.float32(value))


def test_even_mode_rounding_into_inf_gives_nan_as_torchao():
  # amax = 1.9999 * 2^127 rounds (at E4M3's 3 mantissa bits) to 2^128 = Inf -> NaN scale.
  x = np.full((1, 32), 3.4e38, np.float32)
  assert _e8m0(fp4jax.quantize(x, "mxfp8_e4m3", scale_mode="even"))[0, 0] == 255


def test_floor_clips_and_rceil_does_not(rng):
  x = (rng.standard_normal((256, 32)) * np.exp2(rng.integers(-10, 10, (256, 1)))).astype(np.float32)
  for mode, clips in [("floor", True), ("rceil", False), ("ceil", False)]:
    q = fp4jax.quantize(x, "mxfp4", scale_mode=mode)
    scale = np.exp2(_e8m0(q) - 127.0)
    ratio = np.abs(x).reshape(256, 1, 32).max(-1) / scale
    assert (ratio > 6).any() == clips, mode


def test_scale_mode_formulas_against_float64(rng):
  """floor = floor(log2 amax) - emax; ceil = ceil(...); rceil = ceil(log2(amax / max))."""
  amax = np.abs(rng.standard_normal(4096) * np.exp2(rng.integers(-60, 60, 4096))).astype(np.float32)
  ab = bits.abs_bits(bits.f32_bits(amax))
  m, e = np.frexp(amax.astype(np.float64))  # float64 on the numpy side: exact here
  fl = (e - 1) - 2
  cl = np.where(m == 0.5, e - 1, e) - 2
  rc = np.ceil(np.log2(amax.astype(np.float64) / 6.0))
  for mode, ref in [("floor", fl), ("ceil", cl), ("rceil", rc)]:
    got = np.asarray(scales.pow2_scale_code(ab, F.E2M1, F.E8M0, mode)).astype(int) - 127
    np.testing.assert_array_equal(got, ref, err_msg=mode)


def test_nvfp4_inf_saturates_one_level():
  x = np.linspace(-1, 1, 32).astype(np.float32).reshape(2, 16)
  x[0, 3] = np.inf
  q = fp4jax.quantize(x, "nvfp4", tensor_scale=None)
  y = np.asarray(fp4jax.dequantize(q))
  assert y[0, 3] == 6 * 448 and np.isfinite(y).all()


def test_nvfp4_all_zero_tensor_stays_zero_two_level():
  """Deviation from torchao (which returns NaN here), as Transformer Engine."""
  q = fp4jax.quantize(np.zeros((4, 32), np.float32), "nvfp4")
  assert float(q.tensor_scale.ravel()[0]) == 1.0
  assert (np.asarray(fp4jax.dequantize(q)) == 0).all()


@pytest.mark.parametrize("magnitude", [1e-36, 1e-39, 1e-44])
def test_nvfp4_tiny_tensor_quantizes_like_any_other(magnitude, rng):
  """Deviation from torchao, whose 1/t overflows for amax < ~2e-33 (see fp4jax.scales)."""
  x = (rng.standard_normal((8, 32)) * magnitude).astype(np.float32)
  x[0, :5] = 0.0
  y = np.asarray(fp4jax.fake_quant(x, "nvfp4"))
  assert np.isfinite(y).all() and (y[0, :5] == 0).all()
  # Below ~2^-127 nothing is representable (0.5 * 2^-120 * 2^-6): only finiteness counts.
  if magnitude >= 1e-36:
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    rel = np.linalg.norm(y64 - x64) / np.linalg.norm(x64)
    assert rel < 0.25, rel


def test_nvfp4_explicit_tensor_scale(rng):
  x = rng.standard_normal((4, 32)).astype(np.float32)
  ts = scales.tensor_scale_from_amax(jnp.float32(np.abs(x).max()), F.E2M1, F.UE4M3)
  a = fp4jax.quantize(x, "nvfp4")
  b = fp4jax.quantize(x, "nvfp4", tensor_scale=ts)
  np.testing.assert_array_equal(a.codes, b.codes)
  np.testing.assert_array_equal(np.asarray(a.scales, np.float32), np.asarray(b.scales, np.float32))


def test_nvfp4_two_level_formula(rng):
  """Independent float64 check of the two-level scale: s = e4m3(amax_b/6/t)."""
  x = (rng.standard_normal((8, 64)) * 3).astype(np.float32)
  q = fp4jax.quantize(x, "nvfp4")
  t = np.float32(np.abs(x).max()) / np.float32(2688.0)
  amax_b = np.abs(x).reshape(8, 4, 16).max(-1)
  s = np.clip((amax_b / np.float32(6.0)) / t, 2**-6, 448).astype(ml_dtypes.float8_e4m3fn)
  np.testing.assert_array_equal(np.asarray(q.scales).view(np.uint8), s.view(np.uint8))
  assert np.float32(q.tensor_scale.ravel()[0]) == t


@pytest.mark.parametrize("sfmt", ["ue4m3", "bf16"])
@pytest.mark.parametrize("two_level", [False, True])
def test_block_scale_and_code_equals_the_general_path(rng, sfmt, two_level):
  # The kernels' per-block scale (an integer round for UE4M3) against float_block_scale
  # followed by the general encoder, on every class of amax.
  scale_format = F.get_scale_format(sfmt)
  n = 200_000
  a = rng.integers(0, 0x7FFFFFFF, n, dtype=np.int64).astype(np.int32)
  a[: n // 2] = np.abs(rng.standard_normal(n // 2).astype(np.float32)
                       * np.exp2(rng.integers(-140, 128, n // 2)).astype(np.float32)).view(np.int32)
  a[:6] = np.array([0, 1, 0x7F800000, 0x7FC00000, 0x7F7FFFFF, 0x00800000], np.int32)
  t = jnp.float32(rng.uniform(0.5, 2.0) * 2.0**-10) if two_level else None
  s, code = jax.jit(lambda a: scales.float_block_scale_and_code(a, F.E2M1, scale_format, t))(a)
  s_ref = scales.float_block_scale(a, F.E2M1, scale_format, t)
  code_ref = fp4jax.rounding.encode(bits.split_f32(bits.f32_bits(s_ref)), scale_format.element)
  assert (np.asarray(code) == np.asarray(code_ref)).all(), "scale codes differ"
  assert bits_equal_or_both_nan(np.asarray(s), np.asarray(s_ref)).all(), "scale values differ"


def _scale_code_recip_bits(out):
  s, c, r = (np.asarray(v) for v in out)
  return s.view(np.uint32), c.astype(np.uint32), r.view(np.uint32)


_NV = fp4jax.get_spec("nvfp4")
_REF_UE4M3 = jax.jit(lambda a, t: (lambda s, c: (s, c, scales.float_scale_reciprocal(s, t)))(
    *scales.float_block_scale_and_code(a, _NV.element, _NV.scale_format, t)))
_TABLES = jax.jit(lambda t: scales.ue4m3_tables(_NV.element, t))
_FROM_TABLES = jax.jit(lambda a, tab, t: scales.ue4m3_from_tables(a, tab, _NV.scale_format, t))


def _amaxes_around_thresholds(rng, thresholds):
  """Random amax bits, every threshold and its two neighbours each side, and the edges
  (0, the smallest subnormal, the largest finite, Inf, NaN)."""
  thr = np.clip(np.asarray(thresholds)[9:127].astype(np.int64), 0, 0x7F800000)
  near = (thr[None, :] + np.arange(-2, 3)[:, None]).ravel()
  a = np.concatenate([rng.integers(0, 0x7F800000, 2000), near,
                      [0, 1, 0x7F7FFFFF, 0x7F800000, 0x7FC00000]])
  return np.clip(a, 0, 0x7FC00000).astype(np.uint32)


def test_ue4m3_tables_equal_the_divisions_for_every_tensor_scale(rng):
  # t as tensor_scale_from_amax makes it: [2^-120, f32max / 2688], NaN, +Inf.
  ts = list(np.exp2(rng.uniform(-120, 116, 24)).astype(np.float32)) + [
      np.float32(2.0 ** -120), np.float32(1.0), np.float32(1 / 2688),
      np.float32(np.finfo(np.float32).max / 2688), np.float32(np.nan), np.float32(np.inf)]
  for t in ts:
    tab = _TABLES(t)
    a = _amaxes_around_thresholds(rng, tab.thresholds)
    want = _scale_code_recip_bits(_REF_UE4M3(a, t))
    got = _scale_code_recip_bits(_FROM_TABLES(a, tab, t))
    for name, u, v in zip(("scale", "code", "recip"), want, got):
      bad = u != v
      assert not bad.any(), f"t={t!r} {name}: {bad.sum()} differ, e.g. amax bits {a[bad][:3]}"


def test_ue4m3_tables_batched_over_tensor_scales_equal_one_at_a_time(rng):
  ts = np.concatenate([np.exp2(rng.uniform(-120, 116, 6)),
                       [2.0 ** -120, 1.0, np.inf, np.nan]]).astype(np.float32)
  batched = _TABLES(jnp.asarray(ts.reshape(2, 5)))
  assert batched.thresholds.shape == batched.recips.shape == (2, 5, 128)
  assert batched.inv_divisor.shape == (2, 5)
  for i, t in enumerate(ts):
    one = _TABLES(t)
    row = scales.tables_row(scales.tables_row(batched, i // 5), i % 5)
    for name, u, v in zip(one._fields, one, row):
      np.testing.assert_array_equal(np.asarray(u).view(np.uint32), np.asarray(v).view(np.uint32),
                                    err_msg=f"t={t!r} {name}")


def test_ue4m3_tables_one_level_and_thresholds_step_by_one_code(rng):
  a = np.concatenate([rng.integers(0, 0x7FC00001, 20000), [0, 1, 0x7F800000]]).astype(np.uint32)
  tab = scales.ue4m3_tables(_NV.element, None)
  s, c, r = jax.jit(lambda a: scales.ue4m3_from_tables(a, tab, _NV.scale_format))(a)
  s_ref, c_ref = scales.float_block_scale_and_code(a, _NV.element, _NV.scale_format)
  np.testing.assert_array_equal(np.asarray(s).view(np.uint32), np.asarray(s_ref).view(np.uint32))
  np.testing.assert_array_equal(np.asarray(c), np.asarray(c_ref))
  np.testing.assert_array_equal(np.asarray(r).view(np.uint32),
                                np.asarray(scales.float_scale_reciprocal(s_ref)).view(np.uint32))
  # At each threshold the code steps from c - 1 to c.
  thr = np.asarray(tab.thresholds)[9:127]
  _, below, _ = scales.ue4m3_from_tables(jnp.asarray(thr - 1), tab, _NV.scale_format)
  _, at, _ = scales.ue4m3_from_tables(jnp.asarray(thr), tab, _NV.scale_format)
  np.testing.assert_array_equal(np.asarray(at), np.arange(9, 127))
  np.testing.assert_array_equal(np.asarray(below), np.arange(8, 126))


def test_ue4m3_tables_refuse_other_formats():
  with pytest.raises(ValueError, match="element must be E2M1"):
    scales.ue4m3_tables(fp4jax.get_spec("mxfp8_e4m3").element, None)
  tab = scales.ue4m3_tables(_NV.element, None)
  with pytest.raises(ValueError, match="scale_format must be UE4M3"):
    scales.ue4m3_from_tables(jnp.zeros(4, jnp.uint32), tab, fp4jax.get_spec("mxfp4").scale_format)
