"""fp4jax.qdot: forward, dgrad and wgrad of every recipe against a hand-written reference."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fp4jax
from fp4jax import estimators, gemm, hadamard, qdot, recipes

RECIPES = sorted(recipes.RECIPES)
OPS = recipes.OPERANDS
HI = jax.lax.Precision.HIGHEST


def _mm(a, b, eq):
  """The same batched float32 einsum the core uses, on a batch of one."""
  ins, out = eq.split("->")
  eq = ",".join("b" + t for t in ins.split(",")) + "->b" + out
  return jnp.einsum(eq, a[None], b[None], precision=HI,
                    preferred_element_type=jnp.float32)[0]


def reference(a, w, g, recipe, key):
  """y, dA, dW for y = A W written out from the recipe's definition (2D operands)."""
  r = recipes.get(recipe)
  k = lambda i: jax.random.fold_in(key, i)

  def fq(x, spec, axis, op, asym=False):
    x = x.astype(jnp.float32)
    if spec is None:
      return x
    kk = k(OPS.index(op)) if spec.rounding == "stochastic" else None
    if asym:
      return fp4jax.asymmetric.asymmetric_fake_quant(x, spec, axis, key=kk)
    return fp4jax.fake_quant(x, spec, axis, key=kk).astype(jnp.float32)

  def h(x, axis, block, i, transpose=False):
    x = x.astype(jnp.float32)
    # The device's method, as qdot's reference runs it (dot on GPU, butterfly on CPU).
    return x if block is None else hadamard.rht(
        x, axis, k(i), block, transpose,
        method=fp4jax.dispatch.device_facts().hadamard_method)

  def est(x, spec, axis, name):
    if spec is None or name == "ste":
      return 1.0
    q = fp4jax.quantize(x, spec.replace(rounding="nearest"), axis)
    return estimators.get_estimator(name)(x / fp4jax.element_scales(q), spec.element,
                                          **dict(r.estimator_params))

  resid = 0.0
  if r.occ_quantile is not None:
    t = jnp.quantile(jnp.abs(a), r.occ_quantile)
    a, resid_a = jnp.clip(a, -t, t), a - jnp.clip(a, -t, t)
    resid = _mm(resid_a, w, "mk,kn->mn")
  a1, w1 = h(a, 1, r.hadamard_fwd, 6), h(w, 0, r.hadamard_fwd, 6)
  aq = fq(a1, r.fwd_lhs, 1, "fwd_lhs", r.lhs_asymmetric)
  wq = fq(w1, r.fwd_rhs, 0, "fwd_rhs")
  y = _mm(aq, wq, "mk,kn->mn") + resid
  a_src, w_src = (aq, wq) if r.double_quant else (a1, w1)
  da = _mm(fq(h(g, 1, r.hadamard_dgrad, 7), r.dgrad_grad, 1, "dgrad_grad"),
           fq(h(w_src, 1, r.hadamard_dgrad, 7), r.dgrad_rhs, 1, "dgrad_rhs"), "mn,kn->mk")
  da = h(da * est(a1, r.fwd_lhs, 1, r.lhs_estimator), 1, r.hadamard_fwd, 6, True)
  dw = _mm(fq(h(a_src, 0, r.hadamard_wgrad, 8), r.wgrad_lhs, 0, "wgrad_lhs"),
           fq(h(g, 0, r.hadamard_wgrad, 8), r.wgrad_grad, 0, "wgrad_grad"), "mk,mn->kn")
  dw = h(dw * est(w1, r.fwd_rhs, 0, r.rhs_estimator), 0, r.hadamard_fwd, 6, True)
  if r.occ_quantile is not None:  # the residual path's gradients, in high precision
    mask = jnp.abs(resid_a) > 0
    da = jnp.where(mask, _mm(g, w, "mn,kn->mk"), da)
    dw = dw + _mm(resid_a, g, "mk,mn->kn")
  return y, da, dw


@functools.lru_cache(maxsize=None)
def _operands(seed=0, m=64, k=128, n=96):
  r = np.random.default_rng(seed)
  a = r.standard_normal((m, k)).astype(np.float32)
  a[r.random((m, k)) < 0.01] *= 20.0  # outliers
  w = (r.standard_normal((k, n)) * 0.1).astype(np.float32)
  g = r.standard_normal((m, n)).astype(np.float32)
  return jnp.asarray(a), jnp.asarray(w), jnp.asarray(g)


@pytest.mark.parametrize("name", [n for n in RECIPES if n != "bf16"])  # bf16: next test
def test_forward_and_vjp_match_reference(name):
  a, w, g = _operands()
  key = jax.random.key(42)

  @jax.jit
  def ours(a, w, g, key):
    # impl="xla": the reference math bit for bit (the kernels' equality up to accumulation
    # order is test_kernel_impl_matches_xla_forward_and_gradients).
    f = lambda a, w: fp4jax.qdot_general(a, w, (((1,), (0,)), ((), ())), name, key,
                                         impl="xla")
    y, vjp = jax.vjp(f, a, w)
    return (y, *vjp(g))

  y, da, dw = ours(a, w, g, key)
  ry, rda, rdw = jax.jit(reference, static_argnums=3)(a, w, g, name, key)
  if fp4jax.dispatch.device_facts().bf16_dot:
    # On a GPU "xla" multiplies MX operands on BF16 tensor cores (every product exact,
    # fp4jax.gemm.einsum_bf16_exact): equal up to float32 accumulation order.
    np.testing.assert_allclose(y, ry, rtol=1e-6, atol=1e-6, err_msg="forward")
  else:
    np.testing.assert_array_equal(y, ry, err_msg="forward")
  np.testing.assert_allclose(da, rda, rtol=1e-6, atol=1e-6, err_msg="dgrad")
  np.testing.assert_allclose(dw, rdw, rtol=1e-6, atol=1e-6, err_msg="wgrad")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_bf16_recipe_is_lax_dot_general_bit_for_bit(dtype):
  a, w, g = (v.astype(dtype) for v in _operands())
  dims = (((1,), (0,)), ((), ()))
  y, vjp = jax.vjp(lambda a, w: fp4jax.qdot_general(a, w, dims, "bf16"), a, w)
  ry, rvjp = jax.vjp(lambda a, w: jax.lax.dot_general(a, w, dims), a, w)
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(ry, np.float32))
  for x, rx in zip(vjp(g.astype(dtype)), rvjp(g.astype(dtype))):
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(rx, np.float32))


def test_general_dimension_numbers_and_einsum():
  r = np.random.default_rng(1)
  x = jnp.asarray(r.standard_normal((4, 32, 64)), jnp.float32)   # (batch, tokens, K)
  wb = jnp.asarray(r.standard_normal((4, 64, 16)), jnp.float32)  # (batch, K, N)
  y = jax.jit(lambda x, wb: fp4jax.qeinsum("btk,bkn->btn", x, wb, "mxfp4"))(x, wb)
  ref = jax.jit(lambda x, wb: jnp.stack([fp4jax.qmatmul(x[i], wb[i], "mxfp4")
                                         for i in range(4)]))(x, wb)
  np.testing.assert_array_equal(y, ref)
  # Output order differing from dot_general's is transposed back.
  y2 = jax.jit(lambda x, wb: fp4jax.qeinsum("btk,bkn->bnt", x, wb, "mxfp4"))(x, wb)
  np.testing.assert_array_equal(y2, jnp.swapaxes(y, 1, 2))
  # Contracting the first axis of the lhs (x^T w) quantizes along that axis.
  w = jnp.asarray(r.standard_normal((32, 16)), jnp.float32)
  z = fp4jax.qdot_general(x[0], w, (((0,), (0,)), ((), ())), "mxfp4")
  zr = fp4jax.fake_quant(x[0], "mxfp4", axis=0).T @ fp4jax.fake_quant(w, "mxfp4", axis=0)
  np.testing.assert_allclose(z, zr, rtol=1e-6, atol=1e-6)
  assert fp4jax.qmatmul(x, jnp.ones((64, 8)), "mxfp4").shape == (4, 32, 8)


def test_output_dtype():
  a, w, _ = _operands()
  assert fp4jax.qmatmul(a.astype(jnp.bfloat16), w.astype(jnp.bfloat16), "mxfp4").dtype == jnp.bfloat16
  y = fp4jax.qmatmul(a.astype(jnp.bfloat16), w.astype(jnp.bfloat16), "mxfp4",
                     preferred_element_type=jnp.float32)
  assert y.dtype == jnp.float32


def test_double_quantization_changes_the_backward_only():
  a, w, g = _operands()
  key = jax.random.key(0)
  plain = recipes.get("tetrajet").replace(double_quant=False)
  outs = {}
  for r in (recipes.get("tetrajet"), plain):
    def fwd_bwd(a, w, g, r=r):
      y, vjp = jax.vjp(lambda a, w: fp4jax.qmatmul(a, w, r, key), a, w)
      return (y, *vjp(g))
    outs[r.double_quant] = jax.jit(fwd_bwd)(a, w, g)
  np.testing.assert_array_equal(outs[True][0], outs[False][0])
  assert not np.array_equal(outs[True][2], outs[False][2])


def _sr_samples(r, n_keys=400):
  a, w, g = _operands(m=32, k=64, n=32)

  def dgrad(key):
    return jax.vjp(lambda a: fp4jax.qmatmul(a, w, r, key), a)[1](g)[0]

  keys = jax.random.split(jax.random.key(1), n_keys)
  samples = jax.jit(jax.vmap(dgrad))(keys)
  expected = np.asarray(g) @ np.asarray(w).T
  mean, sem = samples.mean(0), samples.std(0) / np.sqrt(n_keys)
  return dgrad, keys, np.abs(mean - expected) / np.maximum(sem, 1e-6)


def test_stochastic_gradients_are_unbiased_and_reproducible():
  """With scales that never clip (E8M0 rceil), E[Q_sr(dY) Q_sr(W)^T] = dY W^T."""
  sr = fp4jax.get_spec("mxfp4").replace(scale_mode="rceil", rounding="stochastic")
  r = recipes.get("mxfp4").replace(name="mxfp4_sr_rceil", dgrad_grad=sr, dgrad_rhs=sr)
  dgrad, keys, z = _sr_samples(r)
  np.testing.assert_array_equal(dgrad(keys[0]), dgrad(keys[0]))
  assert (z < 5).mean() > 0.999 and z.max() < 6.5, z.max()


def test_stochastic_rounding_is_biased_where_the_block_max_saturates():
  """NVFP4's E4M3 block scale rounds amax/6 to nearest, sometimes below it; the block
  maximum then saturates at 6 and SR cannot be unbiased there (nor can E8M0 floor)."""
  _, _, z = _sr_samples(recipes.get("fp4_all_the_way"))
  assert z.max() > 8


def test_composes_with_jit_grad_vmap_remat_and_scan():
  r = np.random.default_rng(3)
  ws = jnp.asarray(r.standard_normal((3, 64, 64)) * 0.1, jnp.float32)
  x = jnp.asarray(r.standard_normal((4, 32, 64)), jnp.float32)  # per example: 32 tokens

  def layer(h, wk):
    w, k = wk
    return jnp.tanh(fp4jax.qmatmul(h, w, "tetrajet", k)), None

  def loss(ws, x, key):
    keys = jax.random.split(key, ws.shape[0])
    h, _ = jax.lax.scan(jax.checkpoint(layer), x, (ws, keys))
    return jnp.mean(h**2)

  def loss_unrolled(ws, x, key):  # no scan, no remat: the same function
    keys = jax.random.split(key, ws.shape[0])
    h = x
    for i in range(ws.shape[0]):
      h, _ = layer(h, (ws[i], keys[i]))
    return jnp.mean(h**2)

  key = jax.random.key(0)
  g1 = jax.jit(jax.grad(loss))(ws, x, key)
  g2 = jax.jit(jax.grad(loss_unrolled))(ws, x, key)
  np.testing.assert_allclose(g1, g2, rtol=1e-5, atol=1e-7)
  per_example = jax.jit(jax.vmap(lambda xi: jax.grad(loss)(ws, xi[None], key)))(x)
  assert per_example.shape == (4, 3, 64, 64) and np.isfinite(per_example).all()


@pytest.mark.parametrize("call,err,match", [
    (lambda a, w: fp4jax.qmatmul(a, w, "mxfp5"), ValueError, "valid: .*mxfp4"),
    (lambda a, w: fp4jax.qmatmul(a[:, :100], w, "mxfp4"), ValueError, "sizes differ"),
    (lambda a, w: fp4jax.qmatmul(a[:, :100], w[:100], "mxfp4"), ValueError,
     "K = 100 is not a multiple of 32.*pad the operands"),
    (lambda a, w: jax.grad(lambda w: fp4jax.qmatmul(a, w, "mxfp4").sum())(w[:, :40]),
     ValueError, "output width N .* = 40 is not a multiple of 32"),
    (lambda a, w: fp4jax.qmatmul(a, w, "nvfp4"), ValueError, "key="),
    (lambda a, w: fp4jax.qmatmul(a.astype(jnp.int32), w, "mxfp4"), TypeError, "float"),
    (lambda a, w: fp4jax.qeinsum("mk,kn", a, w), ValueError, "explicit output"),
    (lambda a, w: recipes.get("mxfp4").replace(hadamard_fwd=12), ValueError, "powers of two"),
    (lambda a, w: recipes.get("mxfp4").replace(lhs_estimator="magic"), ValueError, "registered"),
    (lambda a, w: fp4jax.qmatmul(a, w[None], "mxfp4"), ValueError, "2D weight"),
    (lambda a, w: fp4jax.qeinsum("mk,kn,nj->mj", a, w), ValueError, "exactly two"),
    (lambda a, w: fp4jax.qeinsum("bmk,kn->bmn", a, w), ValueError, "operand ranks"),
    (lambda a, w: fp4jax.qeinsum("mk,jn->mn", a, w), ValueError, "one operand only"),
    (lambda a, w: fp4jax.qeinsum("ii,in->n", a[:, :64], w), ValueError,
     r"repeats index 'i' within the lhs \('ii'\).*jnp.einsum\('ii->i', lhs\)"),
    (lambda a, w: fp4jax.qeinsum("mk,kn->mnz", a, w), ValueError, "'z' .* in neither operand"),
    (lambda a, w: fp4jax.qeinsum("mk,kn->mm", a, w), ValueError, "repeats an index"),
    (lambda a, w: fp4jax.qdot_general(a, w, (((1,), (0, 1)), ((), ()))), ValueError, "pair up"),
    (lambda a, w: fp4jax.qdot_general(a, w, (((5,), (0,)), ((), ()))), ValueError,
     "lhs contracting dimension 5 is out of range for a rank-2 lhs"),
    (lambda a, w: fp4jax.qdot_general(a, w, (((1,), (2,)), ((), ()))), ValueError,
     "rhs contracting dimension 2 is out of range"),
    (lambda a, w: fp4jax.qdot_general(a, w, (((1, 1), (0, 0)), ((), ()))), ValueError,
     "repeat a dimension"),
    (lambda a, w: fp4jax.qdot_general(a, w, (((1,), (0,)), ((1,), (0,)))), ValueError,
     "both contracting and batch"),
    (lambda a, w: fp4jax.qmatmul(a, w, recipes.get("msfp4").replace(occ_quantile=1.5)),
     ValueError, "quantile"),
])
def test_bad_input_raises_clear_errors(call, err, match):
  a, w, _ = _operands()
  with pytest.raises(err, match=match):
    call(a, w)


_SLOW = pytest.mark.long_gpu_compile  # NVFP4 quantize kernels: ~2 min of Triton compile each


@pytest.mark.parametrize("recipe", ["mxfp4", "tetrajet", pytest.param("nvfp4", marks=_SLOW),
                                    "quartet", pytest.param("fp4_all_the_way", marks=_SLOW)])
def test_kernel_impl_matches_xla_forward_and_gradients(recipe, rng, caplog):
  # impl="pallas" runs the fused quantize kernels and the FP4 GEMM kernels (interpret mode
  # on CPU): the same quantized values as impl="xla", so outputs and gradients agree up
  # to float32 accumulation order.
  import logging
  x = jnp.asarray(rng.standard_normal((32, 64)).astype(np.float32))
  w = jnp.asarray(rng.standard_normal((64, 32)).astype(np.float32) * 0.1)
  c = jnp.asarray(rng.standard_normal((32, 32)).astype(np.float32))
  key = jax.random.key(7)

  def loss(x, w, impl):
    y = fp4jax.qdot_general(x, w, (((1,), (0,)), ((), ())), recipe, key, impl=impl)
    return jnp.sum(y * c)

  # jit: one compile per path (op-by-op dispatch compiles every primitive separately,
  # ~10x slower on CPU); the dispatch logs its choices while tracing.
  vg = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
  with caplog.at_level(logging.DEBUG, logger="fp4jax"):
    got, (gx, gw) = vg(x, w, "pallas")
  want, (wx, ww) = vg(x, w, "xla")
  for name, u, v in (("loss", got, want), ("dx", gx, wx), ("dw", gw, ww)):
    scale = float(jnp.max(jnp.abs(v)))
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=0, atol=1e-5 * scale,
                               err_msg=f"{recipe}: {name} differs between impl='pallas' and 'xla'")
  gemm_lines = [r for r in caplog.messages if "via fp8_xla" in r or "via bf16_xla" in r]
  assert len(gemm_lines) >= 1, "no GEMM went through the FP4 kernels"


def test_unknown_impl_is_rejected():
  with pytest.raises(ValueError, match="impl must be"):
    fp4jax.qdot_general(jnp.ones((4, 32)), jnp.ones((32, 4)), (((1,), (0,)), ((), ())),
                        "mxfp4", impl="triton")


def test_gemm_impl_context_reaches_flax_layers(rng, caplog):
  import logging
  import fp4jax.linen as qnn
  layer = qnn.QDense(features=32, recipe="mxfp4")
  x = jnp.asarray(rng.standard_normal((32, 64)).astype(np.float32))
  params = layer.init(jax.random.key(0), x)
  with caplog.at_level(logging.DEBUG, logger="fp4jax"):
    with fp4jax.gemm_impl("pallas"):
      y_kernels = layer.apply(params, x)
  assert any("via fp8_xla" in m or "via bf16_xla" in m for m in caplog.messages)
  y_xla = layer.apply(params, x)
  np.testing.assert_allclose(np.asarray(y_kernels), np.asarray(y_xla), rtol=0,
                             atol=1e-5 * float(jnp.max(jnp.abs(y_xla))))
  with pytest.raises(ValueError, match="impl must be one of"):
    with fp4jax.gemm_impl("cuda"):
      pass


# ("nvfp4", "pallas") reaches the kernels on CPU. On a GPU it is left out to keep the GPU
# test command inside its call (an NVFP4 kernel compile takes ~150 s there); since "auto" now
# takes the fused operand path on Hopper, that case is then covered by interpret mode only.
@pytest.mark.parametrize("recipe,impl", [("mxfp4", None), ("nvfp4", None), ("quartet", None)] + (
    [] if fp4jax.dispatch.device_facts().on_gpu else [("nvfp4", "pallas")]))
def test_wgrad_pads_token_counts_that_are_not_block_multiples(recipe, impl, rng):
  # 34 tokens: the wgrad GEMM contracts them in blocks of 16/32 (and Hadamard blocks);
  # zero padding must give the gradient of the unpadded product's quantized version,
  # i.e. the same as padding the inputs by hand (zero rows change no gradient).
  x = jnp.asarray(rng.standard_normal((34, 64)).astype(np.float32))
  w = jnp.asarray(rng.standard_normal((64, 32)).astype(np.float32) * 0.1)
  c = jnp.asarray(rng.standard_normal((34, 32)).astype(np.float32))
  key = jax.random.key(2)
  # impl="pallas": the kernels (interpret mode on CPU) meet the padded wgrad contraction
  # (48 tokens for NVFP4), which the unpack kernel's 32-wide K tiles do not divide.
  f = lambda x, w, c: jnp.sum(fp4jax.qmatmul(x, w, recipe, key, impl=impl) * c)
  grad_w = jax.jit(jax.grad(f, argnums=1))
  gw = grad_w(x, w, c)
  xp, cp = jnp.pad(x, ((0, 30), (0, 0))), jnp.pad(c, ((0, 30), (0, 0)))
  gw_padded = grad_w(xp, w, cp)
  assert np.isfinite(np.asarray(gw)).all()
  # Same operands after padding to 64 rows, except rounding randomness tied to shapes:
  # deterministic recipes must agree exactly.
  if not fp4jax.recipes.get(recipe).needs_key:
    np.testing.assert_array_equal(np.asarray(gw), np.asarray(gw_padded))


@pytest.mark.parametrize("name,bits", [
    ("mxfp4", 2), ("mxfp6_e2m3", 4), ("mxfp6_e3m2", 3), ("mxfp8_e4m3", 4), ("mxfp8_e5m2", 3),
    ("mxint8", 7), ("nvfp4", 6), ("nvfp4_2d", 6), ("int4_g32", None), ("int4_g128", 11),
    ("fp8_e4m3_channel", None)])
def test_significand_bits_and_bf16_exactness(name, bits):
  spec = fp4jax.get_spec(name)
  assert fp4jax.spec_lib.significand_bits(spec) == bits, f"{name}: expected {bits} significant bits"
  assert fp4jax.spec_lib.bf16_exact(spec) == (bits is not None and bits <= 8)


def _wide_operand(rng, shape):
  """Random normal values times per-row powers of two from 2^-60 to 2^60, zeros, and
  values at the top of the element range."""
  x = rng.standard_normal(shape).astype(np.float32)
  x *= np.exp2(rng.integers(-60, 61, (shape[0], 1))).astype(np.float32)
  x[rng.random(shape) < 0.05] = 0.0
  x[0, :] = 0.0  # a whole zero row: zero blocks
  return jnp.asarray(x)


@pytest.mark.parametrize("name", ["mxfp4", "mxfp6_e2m3", "mxfp8_e4m3", "mxint8", "nvfp4",
                                  "nvfp4_2d"])
def test_bf16_exact_specs_dequantize_exactly_to_bf16(name, rng):
  # The claim _mm_bf16_exact rests on: element x block scale (tensor scale left out) is a
  # bfloat16, bit for bit, on random data with a wide per-row exponent spread.
  spec = fp4jax.get_spec(name)
  x = _wide_operand(rng, (64, 128))
  q = fp4jax.quantize(x, spec, -1)
  if q.tensor_scale is not None:
    q = dataclasses.replace(q, tensor_scale=None)
  f32 = fp4jax.dequantize(q, jnp.float32)
  via_bf16 = fp4jax.dequantize(q, jnp.bfloat16).astype(jnp.float32)
  np.testing.assert_array_equal(np.asarray(via_bf16), np.asarray(f32),
                                err_msg=f"{name}: element x block scale is not exact in bf16")


@pytest.mark.parametrize("name", ["mxfp4", "mxfp8_e4m3", "nvfp4", "nvfp4_2d"])
def test_bf16_exact_gemm_matches_f32_gemm_of_fake_quantized_values(name, rng):
  # MX (no tensor scale): the same products, so equal up to accumulation order (exactly
  # equal on CPU, where both are the same f32 GEMM). NVFP4: tensor scales move to the epilogue; bound 2^-22 sum|x y|.
  spec = fp4jax.get_spec(name)
  x, w = _wide_operand(rng, (32, 128)), jnp.asarray(rng.standard_normal((128, 48)),
                                                     jnp.float32)
  xq, wq = fp4jax.quantize(x, spec, -1), fp4jax.quantize(w, spec, -2)
  xv, wv = fp4jax.dequantize(xq, jnp.float32), fp4jax.dequantize(wq, jnp.float32)
  got = np.asarray(gemm.einsum_bf16_exact(xq, xv.shape, wq, wv.shape, "mk,kn->mn"))
  want = np.asarray(gemm.einsum_f32(xv, wv, "mk,kn->mn"))
  bound = 2.0 ** -22 * np.asarray(gemm.einsum_f32(jnp.abs(xv), jnp.abs(wv), "mk,kn->mn"))
  assert np.all(np.abs(got - want) <= bound), (
      f"{name}: worst |got - want| / bound = {np.max(np.abs(got - want) / (bound + 1e-300))}")
  if spec.tensor_scale is None and jax.default_backend() == "cpu":  # GPU: cuBLAS's order
    np.testing.assert_array_equal(got, want, err_msg=f"{name}: same products, same sum")


@pytest.mark.parametrize("recipe", ["nvfp4", "mxfp4"])
def test_default_impl_is_auto_and_off_gpu_equals_the_reference_bit_for_bit(recipe, rng):
  assert fp4jax.dispatch.current_policy() == "auto", "the default GEMM impl should be 'auto'"
  x = jnp.asarray(rng.standard_normal((32, 64)).astype(np.float32))
  w = jnp.asarray(rng.standard_normal((64, 64)).astype(np.float32) * 0.1)
  key = jax.random.key(3)

  def f(x, w, impl):
    y = fp4jax.qdot_general(x, w, (((1,), (0,)), ((), ())), recipe, key, impl=impl)
    return jnp.sum(jnp.sin(y))

  vg = jax.jit(jax.value_and_grad(f, argnums=(0, 1)), static_argnums=2)
  got, want = vg(x, w, None), vg(x, w, "xla")
  if jax.default_backend() != "gpu":
    for name, u, v in zip(("loss", "dx", "dw"), jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(np.asarray(u), np.asarray(v),
                                    err_msg=f"{recipe}: default impl differs from 'xla' ({name})")
  else:  # on a GPU, the kernels: equal up to accumulation order
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=2e-2)
