"""fp4jax.rounding: encode/decode on every grid; nearest-even, toward-zero, stochastic."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from fp4jax import bits, formats as F, prng, rounding

ML = {"e2m1": ml_dtypes.float4_e2m1fn, "e2m3": ml_dtypes.float6_e2m3fn,
      "e3m2": ml_dtypes.float6_e3m2fn, "e4m3": ml_dtypes.float8_e4m3fn,
      "e5m2": ml_dtypes.float8_e5m2}
ALL = ["e2m1", "e2m3", "e3m2", "e4m3", "e5m2", "int4", "int8", "mxint8", "e1m2", "e3m0"]


def _encode(x, fmt, **kw):
  return np.asarray(rounding.encode(bits.split_f32(bits.f32_bits(jnp.asarray(x, jnp.float32))),
                                    fmt, **kw))


@pytest.mark.parametrize("name", ALL)
def test_every_code_roundtrips(name):
  fmt = F.get_element_format(name)
  if fmt.is_int:  # two's complement codes, excluding the unused most negative one
    codes = np.array([c for c in range(1 << fmt.bits) if c != 1 << (fmt.bits - 1)], np.uint32)
  else:
    codes = np.arange(1 << fmt.bits, dtype=np.uint32)
  vals = np.asarray(rounding.decode_to_f32(jnp.asarray(codes), fmt))
  back = _encode(vals, fmt)
  finite = np.isfinite(vals)
  # Every finite code comes back to itself, except -0 which may come back as -0 or +0.
  same = (back == codes) | ((vals == 0) & (np.abs(vals) == 0) & ~np.isnan(vals))
  assert same[finite].all(), codes[finite & ~same]
  expected = np.array([fmt.code_to_float(int(c)) if not fmt.is_int else
                       (int(c) - (1 << fmt.bits) if c >> (fmt.bits - 1) else int(c)) * 2.0 **
                       -fmt.frac_bits for c in codes])
  np.testing.assert_array_equal(vals, expected.astype(np.float32))


@pytest.mark.parametrize("name", sorted(ML))
def test_nearest_even_matches_ml_dtypes(name, rng):
  fmt = F.get_element_format(name)
  grid = np.array(fmt.grid(), np.float32)
  mids = (grid[1:] + grid[:-1]) / 2  # exact ties
  x = np.concatenate([rng.uniform(-fmt.max_value, fmt.max_value, 20_000), mids, -mids,
                      grid, rng.standard_normal(500) * 1e-39]).astype(np.float32)
  out = np.asarray(rounding.round_to_format(x, fmt))
  ref = x.astype(ML[name]).astype(np.float32)
  np.testing.assert_array_equal(out.view(np.uint32), ref.view(np.uint32))


def test_ties_go_to_even_code():
  # e2m1 grid 0, .5, 1, 1.5, 2, 3, 4, 6: ties 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2,
  # 3.5->4, 5->4.
  x = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], np.float32)
  out = np.asarray(rounding.round_to_format(x, F.E2M1))
  np.testing.assert_array_equal(out, [0, 1, 1, 2, 2, 4, 4])


@pytest.mark.parametrize("name", ALL)
def test_saturation(name):
  fmt = F.get_element_format(name)
  x = np.array([fmt.max_value * 1.01, fmt.max_value * 1e6, np.inf, -np.inf, 3e38], np.float32)
  out = np.asarray(rounding.round_to_format(x, fmt))
  np.testing.assert_array_equal(out, np.float32(fmt.max_value) * np.sign(x))


def test_non_saturating_overflow_uses_inf_or_nan():
  x = np.array([1e6, -1e6], np.float32)
  e5 = np.asarray(rounding.round_to_format(x, F.E5M2, saturate=False))
  np.testing.assert_array_equal(e5, [np.inf, -np.inf])
  e4 = np.asarray(rounding.round_to_format(x, F.E4M3, saturate=False))
  assert np.isnan(e4).all()
  # 460 rounds to 448 (below the 464 tie with the NaN code); 470 overflows.
  e4b = np.asarray(rounding.round_to_format(np.float32([460, 470]), F.E4M3, saturate=False))
  assert e4b[0] == 448 and np.isnan(e4b[1])


def test_nan_encodes_to_nan_code_where_it_exists():
  nan = np.array([np.nan], np.float32)
  assert _encode(nan, F.E4M3)[0] == 0x7F
  assert _encode(nan, F.E5M2)[0] == 0x7F
  assert _encode(nan, F.E2M1)[0] == 0  # no NaN in E2M1: MX scales carry NaN instead


def test_toward_zero_truncates():
  x = np.array([1.9, -1.9, 5.9, 0.49], np.float32)
  out = np.asarray(rounding.round_to_format(x, F.E2M1, rounding="toward_zero"))
  np.testing.assert_array_equal(out, [1.5, -1.5, 4.0, 0.0])


@pytest.mark.parametrize("name", ["e2m1", "e4m3", "int4"])
def test_stochastic_rounding_only_neighbours_and_unbiased(name, rng):
  fmt = F.get_element_format(name)
  grid = np.array(fmt.grid(), np.float64)
  x = rng.uniform(-0.9, 0.9, 64).astype(np.float32) * np.float32(fmt.max_value)
  n_keys = 2000
  keys = jax.random.split(jax.random.key(7), n_keys)

  def one(k):
    rb = prng.random_bits_for(k, x.shape)
    return rounding.round_to_format(x, fmt, "stochastic", rb)

  samples = np.asarray(jax.jit(jax.vmap(one))(keys)).astype(np.float64)
  # Only the two neighbouring grid points ever appear.
  ax = np.abs(x.astype(np.float64))
  lo = grid[np.searchsorted(grid, ax, side="right") - 1]
  hi = grid[np.minimum(np.searchsorted(grid, ax, side="left"), len(grid) - 1)]
  mag = np.abs(samples)
  assert ((mag == lo) | (mag == hi)).all()
  # Mean within 4 sigma of x for every element, plus the bias eight random bits allow
  # (2^-9 of a step: fp4jax.prng).
  p = np.where(hi > lo, (ax - lo) / np.where(hi > lo, hi - lo, 1), 0)
  sigma = (hi - lo) * np.sqrt(p * (1 - p) / n_keys)
  err = np.abs(samples.mean(0) - x)
  bound = 4 * sigma + 2.0 ** -9 * (hi - lo) + 1e-12
  assert (err <= bound).all(), (err / bound).max()


def test_stochastic_rounding_is_reproducible():
  x = jnp.linspace(-5, 5, 101, dtype=jnp.float32)
  rb = prng.random_bits_for(jax.random.key(3), x.shape)
  a = rounding.round_to_format(x, F.E2M1, "stochastic", rb)
  b = rounding.round_to_format(x, F.E2M1, "stochastic", rb)
  np.testing.assert_array_equal(a, b)


def test_canonical_rounding_names():
  assert rounding.canonical_rounding("RNE") == "nearest"
  assert rounding.canonical_rounding("sr") == "stochastic"
  with pytest.raises(ValueError, match="valid"):
    rounding.canonical_rounding("banker")


def _nonnegative_f32_patterns(rng):
  """Every non-negative bf16-grid float32 (0 to +Inf) with zero, tie, tie+-1 and random
  low halves, plus 2M random non-negative finite patterns."""
  hi = np.arange(0, 0x7F81, dtype=np.uint32) << 16
  low = [0, 0x8000, 0x7FFF, 0x8001, rng.integers(0, 1 << 16, hi.size)]
  pats = [hi | np.asarray(v, np.uint32) for v in low]
  pats.append(rng.integers(0, 0x7F800001, 2_000_000).astype(np.uint32))
  pats = np.concatenate(pats)
  return pats[pats <= 0x7F800000]  # NaN patterns excluded (the kernels take NaN blocks apart)


def _rounding_words(kind, rng, n):
  """uint32 rounding words of a kind: uniform, all zeros, all ones, or fp4jax's own
  (fp4jax.prng: a byte, then 0x800000 or 0x7FFFFF)."""
  if kind == "prng":
    return np.asarray(prng.random_bits_for(jax.random.key(int(rng.integers(1 << 30))), (n,)))
  return {"random": rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32),
          "zeros": np.zeros(n, np.uint32), "ones": np.full(n, 0xFFFFFFFF, np.uint32)}[kind]


STOCHASTIC_WORDS = [("stochastic", k) for k in ("random", "zeros", "ones", "prng")]


@pytest.mark.parametrize("mode,bits_kind", [("nearest", None)] + STOCHASTIC_WORDS)
def test_e2m1_magnitude_of_bits_equals_encode(rng, mode, bits_kind):
  ab = _nonnegative_f32_patterns(rng)
  rb = None if bits_kind is None else _rounding_words(bits_kind, rng, ab.size)
  want = np.asarray(jax.jit(lambda a, r: rounding.encode(bits.split_f32(a), F.E2M1, mode, r) & 7)(ab, rb))
  got = np.asarray(jax.jit(lambda a, r: rounding.e2m1_magnitude_of_bits(a, mode, r))(ab, rb))
  subnormal = ((ab >> 23) == 0) & (ab != 0)
  bad = (got != want) & ~subnormal
  assert not bad.any(), (f"{bad.sum()} codes differ from encode, e.g. bits "
                         f"{[hex(v) for v in ab[bad][:4]]}: {got[bad][:4]} != {want[bad][:4]}")
  # A subnormal a is a flushed-or-not product: every such a must give the code of 0 (the
  # reference's code for it, too).
  assert (got[subnormal] == 0).all() and (want[subnormal] == 0).all()


def test_e2m1_stochastic_low_step_at_its_thresholds(rng):
  """Below 1 (the step 0.5) the fast path decides "up" by a float product instead of
  round_shift_right's variable shifts: every word at and around each value's threshold
  ``rem << (32 - s)`` (truncated past a 31-bit shift) must give encode's code."""
  ab = np.concatenate([rng.integers(0x00800000, 0x3F800000, 300_000, dtype=np.uint32),
                       np.arange(0x3A800000, 0x3C000000, 4099, dtype=np.uint32),  # shifts 29-32
                       np.arange(0x2D000000, 0x3A800000, 65537, dtype=np.uint32),  # 33-59
                       np.array([0x00800000, 0x3E800000, 0x3F000000, 0x3F3FFFFF,
                                 0x3F400000, 0x3F7FFFFF], np.uint32)])
  e = (ab >> 23).astype(np.int64)
  m = (ab & 0x7FFFFF).astype(np.int64) | 0x800000
  sh = 149 - e
  q = m >> np.clip(sh - 31, 0, 31)
  s = np.minimum(sh, 31)
  threshold = (q & ((1 << s) - 1)) << (32 - s)
  for d in (-2, -1, 0, 1, 2):
    rb = np.clip(threshold + d, 0, 2**32 - 1).astype(np.uint32)
    want = np.asarray(jax.jit(lambda a, r: rounding.encode(
        bits.split_f32(a), F.E2M1, "stochastic", r) & 7)(ab, rb))
    got = np.asarray(jax.jit(lambda a, r: rounding.e2m1_magnitude_of_bits(
        a, "stochastic", r))(ab, rb))
    bad = got != want
    assert not bad.any(), (d, [hex(v) for v in ab[bad][:4]], got[bad][:4], want[bad][:4])
    assert set(np.unique(got)) <= {0, 1, 2}


def test_e2m1_magnitude_of_bits_rejects_other_roundings():
  with pytest.raises(ValueError, match="nearest or stochastic"):
    rounding.e2m1_magnitude_of_bits(jnp.uint32(0), "toward_zero")
  with pytest.raises(ValueError, match="random_bits"):
    rounding.e2m1_magnitude_of_bits(jnp.uint32(0), "stochastic")


def test_e2m1_f32_bits_equals_decode():
  codes = np.arange(16, dtype=np.uint32)
  got = np.asarray(rounding.e2m1_f32_bits(codes)).view(np.float32)
  want = np.asarray(rounding.decode_to_f32(codes, F.E2M1))
  np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("rounding,words", [("nearest", "random"), ("stochastic", "random"),
                                           ("stochastic", "prng")])
def test_e2m1_grid_bits_equals_code_then_decode(rounding, words):
  from fp4jax import rounding as R
  rng = np.random.default_rng(5)
  a = np.concatenate([rng.integers(0, 0x41800000, 200_000, dtype=np.uint32),
                      np.arange(0x3E000000, 0x3E000000 + 2 ** 22, 61, dtype=np.uint32),
                      np.array([0, 1, 0x3E800000, 0x3F400000, 0x3F800000, 0x40C00000,
                                0x40E00000, 0x7F800000, 0x7F7FFFFF], np.uint32)])
  rb = jnp.asarray(_rounding_words(words, rng, a.size))
  a = jnp.asarray(a)
  got = R.e2m1_grid_bits(a, rounding, rb)
  want = R.e2m1_f32_bits(R.e2m1_magnitude_of_bits(a, rounding, rb))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  with pytest.raises(ValueError, match="nearest or stochastic"):
    R.e2m1_grid_bits(a, "toward_zero")
