"""fp4jax.bits: exact float32 arithmetic from bit patterns, independent of FTZ/DAZ."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fp4jax import bits
from conftest import bits_equal_or_both_nan


def _adversarial_f32(rng, n):
  """Random bit patterns (every class: NaN, Inf, subnormal, normal) mixed with values
  of ordinary and subnormal magnitude."""
  x = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32).view(np.float32).copy()
  x[: n // 4] = (rng.standard_normal(n // 4) * 1e-39).astype(np.float32)
  x[n // 4: n // 2] = rng.standard_normal(n // 4).astype(np.float32)
  x[:8] = [0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1e-45, np.finfo(np.float32).max]
  return x


def test_cpu_backend_flushes_subnormals():
  """The reason this module exists: XLA:CPU multiplies subnormals as zero."""
  cpu = jax.devices("cpu")[0]
  y = jax.jit(lambda v: v * 2.0**100)(jax.device_put(jnp.float32(1e-40), cpu))
  assert float(y) == 0.0, "XLA:CPU no longer flushes subnormals; bits.py is still exact"


@pytest.mark.parametrize("op,ref", [(bits.mul_f32, np.multiply), (bits.div_f32, np.divide)])
def test_mul_div_match_ieee(rng, op, ref):
  a, b = _adversarial_f32(rng, 50_000), _adversarial_f32(rng, 50_000)[::-1].copy()
  with np.errstate(all="ignore"):
    expected = ref(a, b)
  out = np.asarray(jax.jit(op)(a, b))
  ok = bits_equal_or_both_nan(out, expected)
  assert ok.all(), f"{(~ok).sum()} mismatches, first: {a[~ok][:3]} op {b[~ok][:3]} -> " \
                   f"{out[~ok][:3]}, expected {expected[~ok][:3]}"


def test_compose_rounds_once_to_nearest_even(rng):
  q = rng.integers(0, 2**29, 50_000).astype(np.uint32)
  t = rng.integers(-200, 140, 50_000).astype(np.int32)
  sign = rng.integers(0, 2, 50_000).astype(np.uint32)
  out = np.asarray(jax.jit(bits.compose_f32)(sign, q, t))
  with np.errstate(over="ignore"):
    expected = (np.where(sign == 1, -1.0, 1.0) * q * np.exp2(t.astype(np.float64))).astype(np.float32)
  assert bits_equal_or_both_nan(out, expected).all()


def test_split_compose_roundtrip_is_identity(rng):
  x = _adversarial_f32(rng, 20_000)
  x = x[np.isfinite(x)]
  sp = bits.split_f32(bits.f32_bits(x))
  y = np.asarray(bits.compose_f32(sp.sign, sp.M, sp.k))
  assert (y.view(np.uint32) == x.view(np.uint32)).all()


def test_bf16_widening_keeps_subnormals():
  x = jnp.asarray(np.array([1e-40, -3e-39, 1.0, 0.0], np.float32)).astype(jnp.bfloat16)
  y = np.asarray(bits.to_f32_exact(x))
  expected = np.asarray(x).astype(np.float32)
  assert (y.view(np.uint32) == expected.view(np.uint32)).all()
  assert y[0] != 0.0


def test_f16_widening_is_exact():
  h = np.arange(0, 2**16, dtype=np.uint32).astype(np.uint16).view(np.float16)
  y = np.asarray(bits.to_f32_exact(jnp.asarray(h)))
  assert bits_equal_or_both_nan(y, h.astype(np.float32)).all()


def test_abs_bits_max_propagates_nan_and_orders_subnormals():
  x = np.array([1e-45, 3e-40, 2e-40, -5e-40], np.float32)
  m = jnp.max(bits.abs_bits(bits.f32_bits(x)))
  assert bits.bits_f32(m.astype(jnp.uint32)) == np.float32(5e-40)
  x2 = np.array([1.0, np.nan, np.inf], np.float32)
  m2 = bits.bits_f32(jnp.max(bits.abs_bits(bits.f32_bits(x2))).astype(jnp.uint32))
  assert np.isnan(float(m2))


def test_unknown_rounding_is_rejected():
  with pytest.raises(ValueError, match="unknown rounding"):
    bits.round_shift_right(jnp.uint32(5), jnp.int32(1), "up")


@pytest.mark.parametrize("divisor_shape", [(), (1,), (64, 1)])
def test_div_by_broadcast_divisor_is_exact_under_jit(rng, divisor_shape):
  # XLA turns `x / broadcast(d)` into `x * (1/d)` (an ulp off about half the time);
  # div_f32 must stay IEEE when the divisor broadcasts (NVFP4's amax / 6, amax / 448).
  a = rng.standard_normal((64, 128)).astype(np.float32)
  d = (np.abs(rng.standard_normal(divisor_shape)) + 0.5).astype(np.float32)
  if divisor_shape == ():
    d = np.float32(448.0)
  got = np.asarray(jax.jit(bits.div_f32)(jnp.asarray(a), jnp.asarray(d)))
  want = a / d
  assert (got.view(np.uint32) == want.view(np.uint32)).all(), \
      f"{int((got != want).sum())} quotients differ from IEEE division"
  got_c = np.asarray(jax.jit(lambda a: bits.div_f32(a, jnp.float32(6.0)))(jnp.asarray(a)))
  assert (got_c.view(np.uint32) == (a / np.float32(6.0)).view(np.uint32)).all()


def test_per_tensor_fp32_scale_is_the_ieee_quotient(rng):
  import fp4jax
  x = jnp.asarray(rng.standard_normal((96, 64)).astype(np.float32) * 0.01)
  q = jax.jit(lambda x: fp4jax.quantize(x, "fp8_e4m3_tensor", -1))(x)
  want = np.float32(np.max(np.abs(np.asarray(x)))) / np.float32(448.0)
  assert np.asarray(q.scales).reshape(()).view(np.uint32) == np.asarray(want).view(np.uint32)


@pytest.mark.parametrize("rel_error", [-2.0**-20, -3 * 2.0**-23, 2.0**-23, 2.0**-20])
def test_div_is_exact_with_an_approximate_hardware_quotient(rng, monkeypatch, rel_error):
  # div_f32 takes only an estimate from float division (Triton's `/` is approximate,
  # XLA may use a reciprocal); an estimate off by up to 2^-20 must still give IEEE a / b.
  exact_estimate = bits._quotient_estimate
  monkeypatch.setattr(bits, "_quotient_estimate",
                      lambda r, d: exact_estimate(r, d) * np.float32(1.0 + rel_error))
  a, b = _adversarial_f32(rng, 20_000), _adversarial_f32(rng, 20_000)[::-1].copy()
  with np.errstate(all="ignore"):
    expected = a / b
  out = np.asarray(jax.jit(bits.div_f32)(a, b))
  ok = bits_equal_or_both_nan(out, expected)
  assert ok.all(), f"{(~ok).sum()} quotients differ from IEEE with a {rel_error:+.2e} estimate"
