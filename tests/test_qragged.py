"""fp4jax.qragged_dot: the per-expert quantized grouped GEMM of mixture-of-experts layers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import fp4jax
from fp4jax import dispatch, qdot, qragged, recipes
from fp4jax.qragged import qragged_dot

M, K, N, G = 50, 64, 32, 3
# An empty expert and sizes that are not block multiples (wgrad's padded-group layout);
# two distinct non-empty sizes keep the per-expert loop to two compiles.
SIZES = np.array([17, 0, 33], np.int32)
KEY = jax.random.key(3)
DIMS = (((1,), (0,)), ((), ()))


def _data(seed=0, m=M, sizes=SIZES):
  rng = np.random.default_rng(seed)
  a = rng.standard_normal((m, K)).astype(np.float32)
  a[3, :5] = [0.0, 1e-30, -7.0, 448.0, 3e-3]        # a zero, a tiny and some large values
  w = (rng.standard_normal((len(sizes), K, N)) * 0.1).astype(np.float32)
  cot = rng.standard_normal((m, N)).astype(np.float32)
  return jnp.asarray(a), jnp.asarray(w), jnp.asarray(cot)


def _nearest(name):
  """The recipe with nearest rounding everywhere: deterministic, so the grouped GEMM's
  operands equal the per-expert loop's bit for bit (the Hadamard signs come from the key
  and are the same)."""
  r = recipes.get(name)
  changes = {op: getattr(r, op).replace(rounding="nearest") for op in recipes.OPERANDS
             if getattr(r, op) is not None}
  return r.replace(name=f"{name}_nearest", **changes)


def _loop(a, w, recipe, key, sizes=SIZES):
  """The per-expert reference: qdot_general on each expert's rows (XLA, float32)."""
  outs, off = [], 0
  for g, s in enumerate(sizes):
    outs.append(qdot.qdot_general(a[off:off + s], w[g], DIMS, recipe, key, impl="xla"))
    off += int(s)
  return jnp.concatenate(outs)


def _value_and_grads(fn, a, w, cot):
  return jax.jit(jax.value_and_grad(lambda a, w: jnp.sum(fn(a, w) * cot), (0, 1)))(a, w), \
      jax.jit(fn)(a, w)


def _close(x, y, what):
  # float32 accumulation order (and, for two-level scales, the tensor scale applied to the
  # products rather than to each block scale): a few ulps of the largest term.
  x, y = np.asarray(x), np.asarray(y)
  bound = 1e-5 * max(float(np.max(np.abs(y))), 1.0)
  err = float(np.max(np.abs(x - y))) if x.size else 0.0
  assert err <= bound, f"{what}: max |grouped - loop| = {err} > {bound}"


@pytest.mark.parametrize("name", ["mxfp4", "nvfp4", "quartet", "tetrajet"])
def test_forward_and_both_gradients_match_a_per_expert_loop_of_qdot_general(name):
  # nvfp4: per-expert FP32 tensor scales, 16x16 weight tiles, the wgrad Hadamard;
  # quartet: Hadamard transforms in all three GEMMs; tetrajet: double quantization.
  recipe = _nearest(name)
  a, w, cot = _data()
  sizes = jnp.asarray(SIZES)
  (v1, (da1, dw1)), y1 = _value_and_grads(
      lambda a, w: qragged_dot(a, w, sizes, recipe, KEY, impl="xla"), a, w, cot)
  (v2, (da2, dw2)), y2 = _value_and_grads(lambda a, w: _loop(a, w, recipe, KEY), a, w, cot)
  _close(y1, y2, "forward")
  _close(da1, da2, "dgrad")
  _close(dw1, dw2, "wgrad")
  assert np.all(np.asarray(dw1[1]) == 0), "an expert with no tokens gets a zero gradient"
  # The quantization is real: the product differs from the unquantized one.
  exact = lax.ragged_dot(a, w, sizes, precision=lax.Precision.HIGHEST)
  assert float(jnp.max(jnp.abs(y1 - exact))) > 1e-3


def test_two_level_scales_are_per_expert():
  # One expert's rows 1000x larger than the other's: with one tensor scale for the whole
  # grouped operand the small expert's rows would be quantized on a 1000x coarser grid;
  # per expert they match the loop, each within its own rows' bound.
  recipe = _nearest("nvfp4")
  a, w, _ = _data(1)
  a = a.at[:17].multiply(1000.0)
  sizes = jnp.asarray(SIZES)
  y = jax.jit(lambda a, w: qragged_dot(a, w, sizes, recipe, KEY, impl="xla"))(a, w)
  ref = jax.jit(lambda a, w: _loop(a, w, recipe, KEY))(a, w)
  _close(y[:17], ref[:17], "the large expert")
  _close(y[17:], ref[17:], "the small expert")
  # ... and one whole-tensor scale would not: the small expert's product moves.
  whole = fp4jax.dequantize(fp4jax.quantize(a, recipe.fwd_lhs), jnp.float32)
  assert float(jnp.max(jnp.abs(whole[17:] - fp4jax.dequantize(
      fp4jax.quantize(a[17:], recipe.fwd_lhs), jnp.float32)))) > 0


@pytest.mark.parametrize("name", ["mxfp4", "nvfp4"])
def test_bf16_gemm_path_equals_the_float32_reference(name):
  # The GPU path (BF16 operands, FP32 accumulation, tensor scales on the products) on
  # this backend: the operands are exact in BF16, so only accumulation order may differ.
  recipe = recipes.get(name)
  a, w, cot = _data(2)
  sizes = jnp.asarray(SIZES)
  kd = qdot.step_key_data(KEY, recipe)
  f32, bf16 = (qragged._qragged_for(recipe, jnp.dtype(jnp.float32), jnp.dtype(d))
               for d in (jnp.float32, jnp.bfloat16))
  (v1, g1), y1 = _value_and_grads(lambda a, w: f32(a, w, sizes, kd), a, w, cot)
  (v2, g2), y2 = _value_and_grads(lambda a, w: bf16(a, w, sizes, kd), a, w, cot)
  _close(y2, y1, "forward")
  _close(g2[0], g1[0], "dgrad")
  _close(g2[1], g1[1], "wgrad")


def test_dispatch_takes_bf16_gemms_on_a_gpu_where_the_values_are_exact():
  gpu, cpu = dispatch.DeviceFacts("gpu", 9, "NVIDIA H200"), dispatch.DeviceFacts("cpu")
  for name in ("mxfp4", "nvfp4", "mxfp8", "quartet"):
    assert dispatch.choose_grouped_gemm(recipes.get(name), "auto", gpu).impl is \
        dispatch.GroupedGemmImpl.BF16
    assert dispatch.choose_grouped_gemm(recipes.get(name), "auto", cpu).impl is \
        dispatch.GroupedGemmImpl.REFERENCE
    assert dispatch.choose_grouped_gemm(recipes.get(name), "xla", gpu).impl is \
        dispatch.GroupedGemmImpl.REFERENCE
  # E2M1 with BF16 block scales: 2 + 8 significand bits do not fit BF16's 8.
  bf16_scaled = fp4jax.QuantSpec("e2m1", "bf16", "block", block_size=32, scale_mode="amax")
  r = recipes.get("mxfp4").replace(name="e2m1_bf16_scales", fwd_lhs=bf16_scaled)
  choice = dispatch.choose_grouped_gemm(r, "auto", gpu)
  assert choice.impl is dispatch.GroupedGemmImpl.REFERENCE and "BF16" in choice.reason


def test_stochastic_rounding_is_reproducible_and_unbiased():
  # tetrajet rounds dgrad's and wgrad's gradient operand stochastically; with E8M0 floor
  # scales a block's largest values may saturate (a bias by design), so the check takes
  # scales rounded up (rceil), under which stochastic rounding never clips.
  base = recipes.get("tetrajet")
  sr = base.dgrad_grad.replace(scale_mode="rceil")
  recipe = base.replace(name="tetrajet_rceil_grads", dgrad_grad=sr, wgrad_grad=sr)
  a, w, cot = _data(3)
  sizes = jnp.asarray(SIZES)

  def grads(key, r=recipe):
    return jax.grad(lambda a, w: jnp.sum(qragged_dot(a, w, sizes, r, key, impl="xla") * cot),
                    (0, 1))(a, w)

  keys = jax.random.split(jax.random.key(7), 64)
  da, dw = jax.jit(lambda ks: lax.map(grads, ks))(keys)   # ragged_dot has no vmap rule
  again = jax.jit(grads)(keys[0])
  np.testing.assert_array_equal(np.asarray(again[0]), np.asarray(da[0]))
  assert float(jnp.max(jnp.abs(da[0] - da[1]))) > 0, "different keys, different roundings"
  # E[Q_sr(dY)] = dY: the mean over keys approaches the gradient with dY unquantized.
  exact = recipe.replace(name="tetrajet_exact_grads", dgrad_grad=None, wgrad_grad=None)
  da_ref, dw_ref = jax.jit(lambda k: grads(k, exact))(keys[0])
  for est, ref in ((da, da_ref), (dw, dw_ref)):
    one = float(jnp.sqrt(jnp.mean((est[0] - ref) ** 2)))
    mean = float(jnp.sqrt(jnp.mean((est.mean(0) - ref) ** 2)))
    # Unbiased: the error of the mean of 64 falls like 1/sqrt(64) = 1/8 (allow 1/4).
    assert mean < one / 4, (mean, one)


@pytest.mark.parametrize("sizes, message", [
    ([18, -1, 33], "non-negative"),
    ([17, 0, 20], "sum to 37"),
    ([17, 0, 33, 0], "shape (3,)"),
])
def test_bad_group_sizes_raise_naming_the_problem(sizes, message):
  a, w, _ = _data()
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    qragged_dot(a, w, jnp.asarray(sizes, jnp.int32), "mxfp4")
  with pytest.raises(TypeError, match="integer"):
    qragged_dot(a, w, jnp.asarray(SIZES, jnp.float32), "mxfp4")


def test_invalid_traced_group_sizes_give_nan_not_a_wrong_product():
  a, w, cot = _data()
  f = jax.jit(jax.value_and_grad(
      lambda a, w, s: jnp.sum(qragged_dot(a, w, s, "mxfp4") * cot), (0, 1)))
  ok = f(a, w, jnp.asarray(SIZES))
  assert np.isfinite(float(ok[0])) and np.all(np.isfinite(np.asarray(ok[1][1])))
  for bad in ([17, 0, 34], [18, -1, 33], [17, 0, 30]):   # sum > M, negative, sum < M
    v, (da, dw) = f(a, w, jnp.asarray(bad, jnp.int32))
    assert np.isnan(float(v)) and np.all(np.isnan(np.asarray(da)))
    assert np.all(np.isnan(np.asarray(dw)))


def test_unsupported_recipes_and_shapes_raise():
  a, w, _ = _data()
  sizes = jnp.asarray(SIZES)
  for name, why in (("fp8", "'tensor' scales"), ("msfp4", "outlier")):
    with pytest.raises(NotImplementedError, match=why):
      qragged_dot(a, w, sizes, name, KEY)
  with pytest.raises(ValueError, match="contraction length K = 48 is not a multiple of 32"):
    qragged_dot(a[:, :48], w[:, :48], sizes, "mxfp4")
  with pytest.raises(ValueError, match="disagree on K"):
    qragged_dot(a, w[:, :32], sizes, "mxfp4")
  with pytest.raises(ValueError, match="rhs .G, K, N."):
    qragged_dot(a, w[0], sizes, "mxfp4")
  with pytest.raises(ValueError, match="key="):
    qragged_dot(a, w, sizes, "nvfp4")
  with pytest.raises(ValueError, match="output width N"):    # dgrad contracts N = 24
    jax.grad(lambda w: qragged_dot(a, w, sizes, "mxfp4").sum())(w[..., :24])


def test_identity_recipe_is_exactly_lax_ragged_dot():
  a, w, _ = _data()
  sizes = jnp.asarray(SIZES)
  np.testing.assert_array_equal(np.asarray(qragged_dot(a, w, sizes, "bf16")),
                                np.asarray(lax.ragged_dot(a, w, sizes)))


def test_public_name_and_fp4jax_namespace():
  assert fp4jax.qragged_dot is qragged_dot
