"""fp4jax.optim: oscillation metrics, Q-EMA, Q-Ramping, low-precision states, FP8 comms."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fp4jax
from fp4jax import optim


def test_flip_metrics_by_hand():
  a = jnp.asarray([0.0, 1.0, 2.0, 3.0])
  b = jnp.asarray([0.0, 1.5, 2.0, 2.0])
  assert float(optim.flip_rate(a, b)) == 0.5
  np.testing.assert_array_equal(optim.flip_direction(a, b), [0, 1, 0, -1])


def test_tracker_counts_reversals_by_hand():
  # Kernels block along K (axis -2): one 32-element column block whose element 1 is walked
  # across the 2|3 rounding boundary and back; element 0 = 6 pins the scale to 1.
  base = np.zeros((32, 2), np.float32)
  base[0, :] = 6.0
  path = [2.4, 2.6, 2.4, 2.6, 2.4]  # rounds 2, 3, 2, 3, 2
  tx = optim.track_oscillation("mxfp4", window=100, min_reversals=2)
  params = {"kernel": jnp.asarray(base).at[1, 0].set(path[0])}
  st = tx.init(params)
  rates = []
  for v in path[1:]:
    new = params["kernel"].at[1, 0].set(v)
    _, st = tx.update({"kernel": new - params["kernel"]}, st, params)
    params = {"kernel": new}
    rates.append(float(optim.oscillation_metrics(st)["flip_rate"]))
  assert rates == [1 / 64] * 4, f"one of 64 weights flips every step, got {rates}"
  m = optim.oscillation_metrics(st)
  assert float(m["oscillating/kernel"]) == 1 / 64, "3 reversals >= 2: oscillating"
  assert int(st.flips["kernel"][1, 0]) == 4 and int(st.reversals["kernel"][1, 0]) == 3
  with pytest.raises(ValueError, match="track_oscillation"):
    optim.oscillation_metrics(optax.sgd(0.1).init(params))


def test_mean_boundary_distance():
  col = np.concatenate([[6.0, 2.5], np.full(30, 3.0)]).astype(np.float32)
  w = jnp.asarray(np.stack([col, col], 1))  # (32, 2): blocks along axis -2
  d = optim.mean_boundary_distance({"kernel": w}, "mxfp4")
  assert abs(float(d["kernel"]) - (31 * 0.5 + 0.0) / 32) < 1e-7


def test_q_ema_and_q_ramping_reduce_oscillation():
  # The toy problem of experiments.training_tools: least squares towards weights off the
  # MXFP4 grid, forward weights quantized (STE), plain SGD; it oscillates without help.
  from experiments.training_tools import oscillation_run
  base = oscillation_run("sgd", 400, 0)["flip_rate"]
  ema = oscillation_run("q_ema", 400, 0)["flip_rate"]
  ramp = oscillation_run("q_ramping", 400, 0)["flip_rate"]
  assert base > 0.05, f"the toy problem must oscillate without help (flip rate {base})"
  assert ema < 0.5 * base, f"Q-EMA flip rate {ema} vs {base}"
  assert ramp < 0.5 * base, f"Q-Ramping flip rate {ramp} vs {base}"


def test_q_ramping_ramps_oscillating_weights_only():
  # Element 1 of a pinned block (scale 1) is pushed across the 2|3 boundary and back.
  base = np.zeros((32, 2), np.float32)
  base[0, :] = 6.0
  params = {"kernel": jnp.asarray(base).at[1, 0].set(2.45)}
  tx = optim.q_ramping(optax.sgd(1.0), "mxfp4", window=8, threshold=3, max_factor=4)
  st = tx.init(params)
  seen = []
  for i in range(16):
    g = jnp.zeros((32, 2)).at[1, 0].set(-0.1 if i % 2 == 0 else 0.1)
    u, st = tx.update({"kernel": g}, st, params)
    params = optax.apply_updates(params, u)
    seen.append(float(fp4jax.fake_quant(params["kernel"], "mxfp4", 0)[1, 0]))
    if i == 7:
      f = optim.ramp_factors(st)["kernel"]
      assert int(f[1, 0]) == 2, "8 flips in the first window: factor 1 -> 2"
      assert int(jnp.sum(f)) == 64 + 1, "steady weights keep factor 1"
  assert seen[:8] == [3.0, 2.0] * 4
  # Ramped, the two opposite updates accumulate into one (zero) update: no more flips,
  # and a window without flips halves the factor again.
  assert seen[8:] == [2.0] * 8
  assert int(optim.ramp_factors(st)["kernel"][1, 0]) == 1


def test_q_ema_reference_warmup_and_average():
  params = {"kernel": jnp.ones((32, 32)), "bias": jnp.zeros(32)}
  tx = optax.chain(optax.sgd(1.0), optim.q_ema(decay=0.5))
  st = tx.init(params)
  g = {"kernel": -jnp.ones((32, 32)), "bias": jnp.ones(32)}
  for _ in range(3):
    u, st = tx.update(g, st, params)
    params = optax.apply_updates(params, u)
  # weights 2, 3, 4; EMA(0.5) from 1: 1.5, 2.25, 3.125
  assert float(optim.find_state(st, optim.QEmaState).ema["kernel"][0, 0]) == 3.125
  before = optim.q_ema_reference(st, params, warmup_steps=10)
  after = optim.q_ema_reference(st, params, warmup_steps=3)
  assert float(before["kernel"][0, 0]) == 4.0 and float(after["kernel"][0, 0]) == 3.125
  assert float(after["bias"][0]) == float(params["bias"][0]), "non-weights pass through"
  with pytest.raises(ValueError, match="decay"):
    optim.q_ema(decay=1.0)


@pytest.mark.parametrize("fmts", [{"mu": "fp8_e4m3_tensor", "nu": "fp16"},
                                  {"mu": "bf16", "nu": "bf16"},
                                  {"mu": "mxfp8_e4m3", "nu": "fp16"}])
def test_quantized_state_is_exactly_dequantize_update_requantize(fmts, rng):
  params = {"w": jnp.asarray(rng.standard_normal((96, 64)).astype(np.float32)),
            "b": jnp.asarray(rng.standard_normal(64).astype(np.float32))}
  inner = optax.adam(1e-2)
  tx = optim.quantize_state(inner, fmts)
  st = tx.init(params)
  update = jax.jit(tx.update)
  for i in range(3):
    g = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape).astype(np.float32)),
                     params)
    # The reference: dequantize the stored state, run adam, quantize again.
    # The reference: dequantize the stored state, run adam on it, quantize again.
    full = jax.jit(lambda stored: jax.tree.map(
        lambda x: optim.low_precision._load(x) if optim.low_precision._stored(x) else x,
        stored, is_leaf=optim.low_precision._stored))(st.inner_state)
    u_ref, new_ref = jax.jit(inner.update)(g, full, params)
    u, st = update(g, st, params)
    for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(u_ref)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    adam = st.inner_state[0]
    mu_ref = fmts["mu"]
    want_mu = (new_ref[0].mu["w"].astype(jnp.bfloat16) if mu_ref == "bf16"
               else fp4jax.fake_quant(new_ref[0].mu["w"], mu_ref, -1))
    got_mu = optim.low_precision._load(adam.mu["w"])
    np.testing.assert_array_equal(np.asarray(got_mu, np.float32), np.asarray(want_mu, np.float32))
    params = optax.apply_updates(params, u)
  saved = optim.state_nbytes(st)
  full_bytes = optim.state_nbytes(inner.init(params))
  assert saved < 0.8 * full_bytes, f"{saved} bytes vs {full_bytes} for float32 states"


def test_quantized_state_bad_format():
  with pytest.raises(ValueError, match="neither one of"):
    optim.quantize_state(optax.adam(1e-3), {"mu": "fp7"})


def test_quantize_gradients_is_per_tensor_fp8(rng):
  g = {"w": jnp.asarray(rng.standard_normal((16, 32)).astype(np.float32)),
       "s": jnp.float32(0.3)}
  u, _ = optim.quantize_gradients().update(g, optax.EmptyState())
  np.testing.assert_array_equal(np.asarray(u["w"]),
                                np.asarray(fp4jax.fake_quant(g["w"], "fp8_e5m2_tensor", -1)))
  assert float(u["s"]) == np.float32(0.3), "scalars are left alone"


def test_fp8_all_reduce_mean(rng):
  gs = jnp.asarray(rng.standard_normal((4, 100)).astype(np.float32))
  gs = gs.at[:, :10].set(0.0)
  red = jax.vmap(lambda g: optim.fp8_all_reduce_mean(g, "d"), axis_name="d")(gs)
  assert all(bool(jnp.all(red[0] == red[i])) for i in range(4)), "every device gets the same"
  s = float(jnp.max(jnp.abs(gs))) / 57344.0
  codes = fp4jax.round_to_format(gs / s, fp4jax.E5M2)
  np.testing.assert_allclose(red[0], codes.sum(0) * (s / 4), rtol=1e-6)
  assert bool(jnp.all(red[0, :10] == 0))
  # E5M2 keeps 2 mantissa bits: each code within 2^-3 relative of its value.
  err = jnp.abs(red[0] - gs.mean(0))
  assert bool(jnp.all(err <= jnp.abs(gs).sum(0) / 4 * 2.0 ** -3 + 1e-12))
  zero = jax.vmap(lambda g: optim.fp8_all_reduce_mean(g, "d"), axis_name="d")(jnp.zeros((2, 8)))
  assert bool(jnp.all(zero == 0))


def test_bad_arguments_of_the_transforms():
  params = {"kernel": jnp.ones((32, 2))}
  with pytest.raises(ValueError, match="window and min_reversals"):
    optim.track_oscillation(window=0)
  with pytest.raises(ValueError, match="max_factor a power of two"):
    optim.q_ramping(optax.sgd(0.1), max_factor=3)
  for tx in (optim.track_oscillation(), optim.q_ema(), optim.q_ramping(optax.sgd(0.1))):
    st = tx.init(params)
    with pytest.raises(ValueError, match="needs params"):
      tx.update(params, st)
  with pytest.raises(ValueError, match="no q_ema state"):
    optim.q_ema_reference(optax.sgd(0.1).init(params), params)
  with pytest.raises(ValueError, match="no q_ramping state"):
    optim.ramp_factors(optax.sgd(0.1).init(params))


def test_quantize_gradients_keeps_finite_entries_next_to_an_inf_and_skips_integers():
  tx = fp4jax.optim.quantize_gradients()
  g = {"w": jnp.array([1.0, jnp.inf, 2.0, -3.0, jnp.nan, 0.5], jnp.float32),
       "step": jnp.array([7], jnp.int32)}
  out, _ = tx.update(g, tx.init(g))
  want_finite, _ = tx.update({"w": jnp.array([1.0, 2.0, -3.0, 0.5], jnp.float32)}, None)
  w = np.asarray(out["w"])
  # The finite entries are what they would be without the inf and the NaN (the scale
  # comes from the finite values); the non-finite ones pass through.
  np.testing.assert_array_equal(w[[0, 2, 3, 5]], np.asarray(want_finite["w"]))
  assert np.all(w[[0, 2, 3, 5]] != 0)
  assert w[1] == np.inf and np.isnan(w[4])
  assert out["step"].dtype == jnp.int32 and int(out["step"][0]) == 7


def test_fp8_all_reduce_mean_outside_a_mapped_axis_says_where_to_call_it():
  with pytest.raises(ValueError, match="inside jax.shard_map / jax.pmap"):
    fp4jax.optim.fp8_all_reduce_mean({"g": jnp.ones(4)}, "data")
