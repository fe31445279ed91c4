"""fp4jax.prng: the counter hash behind stochastic rounding, one word per four elements."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fp4jax import bits, prng, rounding
from fp4jax import formats as F


def test_reproducible_and_key_dependent():
  a = prng.random_bits_for(jax.random.key(0), (64, 64))
  b = prng.random_bits_for(jax.random.key(0), (64, 64))
  c = prng.random_bits_for(jax.random.key(1), (64, 64))
  np.testing.assert_array_equal(a, b)
  assert (np.asarray(a) != np.asarray(c)).mean() > 0.99


@pytest.mark.parametrize("shape", [(8, 64), (3, 5, 12), (7, 9), (13,)])
def test_layout_is_a_byte_of_the_word_for_index_over_4(shape):
  """Element i: byte i mod 4 (most significant first) of hash(i // 4), as the top byte,
  then the centring constant less the partner byte's lowest bit; the same whether the last axis divides by 4 (words made once
  per four elements and expanded) or not (per element), and equal to the kernels' form."""
  key = jax.random.key(11)
  seed = np.asarray(prng.seed_from_key(key))
  got = np.asarray(prng.random_bits_for(key, shape)).reshape(-1).astype(np.uint64)
  i = np.arange(got.size, dtype=np.uint32)
  words = np.asarray(prng.counter_hash(seed, jnp.asarray(i // 4))).astype(np.uint64)
  byte = (words >> (24 - 8 * (i % 4)).astype(np.uint64)) & 0xFF
  tie = (words >> (24 - 8 * ((i % 4) ^ 1)).astype(np.uint64)) & 1   # the partner's lsb
  want = byte << 24 | (0x800000 - tie)
  np.testing.assert_array_equal(got, want)
  kern = prng.element_bits_words(jnp.uint32(seed[0]), jnp.uint32(seed[1]),
                                 prng.element_counter(shape))
  np.testing.assert_array_equal(np.asarray(kern).reshape(-1), got)


def test_bytes_look_uniform_and_independent():
  r = np.asarray(prng.random_bits_for(jax.random.key(3), (1 << 16,)), np.uint64)
  low = r & 0xFFFFFF                          # the centring constant less the tie bit
  assert np.isin(low, [0x800000, 0x7FFFFF]).all()
  assert abs((low == 0x7FFFFF).mean() - 0.5) < 0.0078
  top = (r >> 24).astype(np.int64)
  # Each of the 8 random bits is 1 half of the time (4 sigma over 65536 draws: 0.0078).
  frac = np.array([((top >> i) & 1).mean() for i in range(8)])
  assert np.abs(frac - 0.5).max() < 0.0078, frac
  # The byte histogram is flat (chi-square, 255 dof: mean 255, sd 22.6; bound at 5 sd).
  hist = np.bincount(top, minlength=256)
  chi2 = ((hist - hist.mean()) ** 2 / hist.mean()).sum()
  assert chi2 < 255 + 5 * 22.6, chi2
  # Neighbours are uncorrelated: the lanes of one word, and across words.
  u = top.astype(np.float64) / 256
  for lag in (1, 2, 3, 4):
    assert abs(np.corrcoef(u[:-lag], u[lag:])[0, 1]) < 4 / np.sqrt(len(u)), lag
  # The four lanes of a word are jointly uniform in their top bits (16 cells).
  cells = (top.reshape(-1, 4) >> 7) @ np.array([1, 2, 4, 8])
  hist = np.bincount(cells, minlength=16)
  chi2 = ((hist - hist.mean()) ** 2 / hist.mean()).sum()
  assert chi2 < 15 + 5 * np.sqrt(30), chi2


@pytest.mark.parametrize("shape", [(4,), (3, 32), (2, 5, 64)])
def test_interleave_lanes_equals_expand_words(shape):
  """The kernels' two-way-stack interleave is the reference's expansion."""
  w = prng.counter_hash(jnp.array([5, 9], jnp.uint32), prng.element_counter(shape))
  np.testing.assert_array_equal(prng.interleave_lanes(w), prng.expand_words(w))


def test_mix32_is_a_bijection_on_a_sample():
  x = np.arange(1 << 20, dtype=np.uint32)
  y = np.asarray(prng.mix32(x))
  assert len(np.unique(y)) == len(x)


def _every_word():
  """The rounding word of each (byte, tie bit) pair: the whole sample space of one
  element (its byte and its partner's lowest bit are independent bits of the hash)."""
  byte = np.arange(256, dtype=np.uint32)
  words = np.concatenate([(byte << 24) | 0x800000, (byte << 24) | 0x7FFFFF])
  # lane_bits makes exactly these: lane 0 of words whose partner byte's lsb is 0 or 1.
  src = np.concatenate([byte << 24, (byte << 24) | (1 << 16)]).astype(np.uint32)
  np.testing.assert_array_equal(prng.lane_bits(jnp.asarray(src), jnp.uint32(0)), words)
  return jnp.asarray(words)


def _mean_over_words(x, fmt):
  out = jax.jit(jax.vmap(lambda r: rounding.round_to_format(x, fmt, "stochastic",
                                                             jnp.full(x.shape, r))))(
      _every_word())
  return np.asarray(out, np.float64).mean(0)


def _neighbours(ax, fmt):
  grid = np.array(fmt.grid(), np.float64)
  lo = grid[np.searchsorted(grid, ax, side="right") - 1]
  hi = grid[np.minimum(np.searchsorted(grid, ax, side="left"), len(grid) - 1)]
  return lo, np.where(hi > lo, hi - lo, 1.0)


@pytest.mark.parametrize("name", ["e2m1", "e4m3"])
def test_expectation_over_every_word_is_within_half_a_256th_of_a_step(name, rng):
  """Exhaustive, not statistical: for each x the mean over all 512 (byte, tie) words is
  x within 2^-9 of its grid step, and exactly x at the half-way points between multiples
  of 1/256 of a step (the tie bit) and at those multiples."""
  fmt = F.get_element_format(name)
  grid = np.array(fmt.grid(), np.float64)
  frac = lambda f: (grid[:-1, None] + (grid[1:] - grid[:-1])[:, None] * f).reshape(-1)
  halfway = frac((np.arange(256) + 0.5) / 256)
  multiples = frac(np.arange(256) / 256)
  x = np.concatenate([rng.uniform(0, 1, 4000) * fmt.max_value, halfway, multiples])
  x = x.astype(np.float32)
  ax = x.astype(np.float64)
  mean = _mean_over_words(x, fmt)
  lo, step = _neighbours(ax, fmt)
  err = (mean - ax) / step
  assert np.abs(err).max() <= 2.0 ** -9, np.abs(err).max()
  exact = slice(4000, None)
  np.testing.assert_array_equal(mean[exact], ax[exact])
  # No systematic sign over the random values.
  assert abs(err[:4000].mean()) < 2.0 ** -12, err[:4000].mean()


def test_bf16_inputs_have_no_systematic_error_per_binade():
  """Every positive bf16 value of each binade of [2^-9, 6) (E2M1, scale 1, as under a
  power-of-two block scale): exact from 1/8 up (the dropped part is a multiple of 2^-9
  of a step), and below it the errors cancel over each binade."""
  for e in range(-9, 3):
    m = np.arange(128, 256, dtype=np.float64)
    ax = m * 2.0 ** (e - 7)
    ax = ax[ax < 6].astype(np.float32)
    mean = _mean_over_words(jnp.asarray(ax), F.E2M1)
    lo, step = _neighbours(ax.astype(np.float64), F.E2M1)
    err = (mean - ax) / step
    assert np.abs(err).max() <= 2.0 ** -9, (e, np.abs(err).max())
    if e >= -3:
      np.testing.assert_array_equal(mean, ax.astype(np.float64), err_msg=f"binade 2^{e}")
    else:
      assert abs(err.sum()) < 1e-9, (e, err.sum())


def test_below_2_to_the_minus_9_of_a_step_rounds_to_zero():
  """The price of eight bits, documented in fp4jax.prng: p < 2^-9 never rounds up; p =
  2^-9 (a half-way point) does with probability p exactly."""
  step = 0.5   # E2M1 below 1
  x = jnp.asarray([step * 2.0 ** -10, step * 2.0 ** -9.5, step * 2.0 ** -9], jnp.float32)
  mean = _mean_over_words(x, F.E2M1)
  np.testing.assert_array_equal(mean[:2], [0.0, 0.0])
  assert mean[2] == step * 2.0 ** -9


def _quantized_probability(rem: int, s: int) -> float:
  """The mean round-up probability over all (byte, tie) words of a remainder ``rem`` of
  ``s`` bits (9 <= s <= 31), from the formula fp4jax.prng states."""
  y = rem * 256 / 2 ** s
  if y == np.floor(y) + 0.5:
    return (np.floor(y) + 0.5) / 256
  return max(0.0, np.ceil(y - 0.5)) / 256


def test_s_above_31_is_the_truncated_remainders_probability():
  """Values below 2^-9 (E2M1's first step 0.5): the shift exceeds 31 and round_shift_right
  first truncates the significand; the mean over every word is then exactly the
  truncated remainder's quantized probability, within 2^-9 + 2^-31 of the input."""
  mant = np.array([1, 3, 0x2AAAAA, 0x7FFFFF, 0x400001], np.uint32)
  exps = np.array([117, 116, 112, 110, 100], np.uint32)   # 2^-10 ... 2^-27: shifts 32..49
  xb = (exps << 23) | mant
  x = jnp.asarray(xb.view(np.float32))
  mean = _mean_over_words(x, F.E2M1)
  for v, e, m, got in zip(np.asarray(x, np.float64), exps, mant, mean):
    sh = 149 - int(e)                    # rounding._e2m1_low_code_stochastic's shift
    q = (int(m) | 1 << 23) >> (sh - 31)
    p = _quantized_probability(q & (2 ** 31 - 1), 31)
    assert got == 0.5 * p, (v, got, 0.5 * p)
    assert abs(got - v) / 0.5 <= 2.0 ** -9 + 2.0 ** -31, (v, got)


def test_words_are_left_to_fuse_on_every_platform():
  """random_bits_for does not materialise the word array on any platform (measured
  slower on the H100 and the CPU: kernels/NOTES.md, "Issue 18, seventh step")."""
  from jax import export
  fn = jax.jit(lambda k: prng.random_bits_for(k, (64, 128)))
  # Exported for both platforms at once, a per-platform choice would keep both branches
  # (a single-platform export inlines the surviving one); jax.random's own key
  # derivation lowers per platform too, so only the barrier is looked for.
  text = export.export(fn, platforms=["cuda", "cpu"])(jax.random.key(0)).mlir_module()
  assert "optimization_barrier" not in text


def test_derived_seeds_equal_one_derivation_per_index():
  # One batched fold_in and draw for a layer: the keys and seed words of fold_in each.
  key = jax.random.key(11)
  keys, seeds = prng.derived_seeds(key, [0, 2, 5, 8])
  for j, i in enumerate([0, 2, 5, 8]):
    one = jax.random.fold_in(key, i)
    np.testing.assert_array_equal(np.asarray(jax.random.key_data(keys[j])),
                                  np.asarray(jax.random.key_data(one)))
    np.testing.assert_array_equal(np.asarray(prng.seed_from_key(seeds[j])),
                                  np.asarray(prng.seed_from_key(one)))
  # SeedWords stand in for their key wherever rounding bits are drawn: the same words.
  np.testing.assert_array_equal(
      np.asarray(prng.random_bits_for(seeds[1], (8, 12))),
      np.asarray(prng.random_bits_for(jax.random.fold_in(key, 2), (8, 12))))
