"""fp4jax.ptq: real low-bit storage, RTN / Hadamard / GPTQ, evaluation from QArrays."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fp4jax
from experiments.training_tools import train_digits_mlp
from fp4jax import ptq


@functools.lru_cache(maxsize=None)
def _trained_digits_mlp():
  """A real small model: an MLP trained on scikit-learn's bundled digits (no download)."""
  m, v, x, y = train_digits_mlp(seed=0)
  return m, v, x[:1400], x[1400:], y[1400:]


@pytest.mark.parametrize("spec,bits", [("mxfp4", 4.25), ("nvfp4", 4.5)])
def test_rtn_storage_is_the_quantizer_and_its_bits(spec, bits, rng):
  params = {"dense": {"kernel": jnp.asarray(rng.standard_normal((256, 64)).astype(np.float32)),
                      "bias": jnp.zeros(64)}, "scale": jnp.ones(3)}
  q = ptq.quantize_params(params, spec, "rtn")
  k = q["dense"]["kernel"]
  assert isinstance(k, fp4jax.QArray) and q["dense"]["bias"] is params["dense"]["bias"]
  ref = fp4jax.quantize(params["dense"]["kernel"], spec, -2)
  np.testing.assert_array_equal(np.asarray(k.codes), np.asarray(ref.codes))
  tensor_scale_bits = 32 if spec == "nvfp4" else 0  # NVFP4's one FP32 tensor scale
  assert k.nbytes * 8 == bits * k.size + tensor_scale_bits
  assert ptq.nbytes(q) == k.nbytes + 64 * 4 + 3 * 4
  np.testing.assert_array_equal(np.asarray(ptq.dequantize_params(q)["dense"]["kernel"]),
                                np.asarray(fp4jax.dequantize(ref)))


def test_hadamard_rotation_is_inverted_on_dequantize(rng):
  w = jnp.asarray(rng.standard_normal((128, 32)).astype(np.float32))
  w = w.at[5, :].mul(40.0)  # an outlier input feature
  q = ptq.quantize_params({"kernel": w}, "mxfp8_e4m3", "rtn_hadamard", hadamard_block=32)
  assert isinstance(q["kernel"], ptq.RotatedQArray)
  back = ptq.dequantize_params(q)["kernel"]
  rel = float(jnp.linalg.norm(back - w) / jnp.linalg.norm(w))
  assert rel < 0.04, f"MXFP8 after rotation must be close, relative error {rel}"
  rot = fp4jax.hadamard.rht(w, 0, None, 32)
  np.testing.assert_allclose(fp4jax.hadamard.rht(rot, 0, None, 32, transpose=True), w,
                             atol=1e-4 * float(jnp.abs(w).max()))


@pytest.mark.parametrize("spec", ["mxfp4", "nvfp4"])
def test_gptq_beats_rtn_on_a_trained_model(spec):
  m, v, x_cal, x_test, y_test = _trained_digits_mlp()
  ref = m.apply(v, x_test)
  cal = ptq.collect_linen_inputs(m, v, x_cal[:512])
  assert set(cal) == {"fc1", "fc2", "head"} and cal["fc2"].shape == (512, 256)
  evaluate = jax.jit(lambda q, x: m.apply(ptq.dequantize_params(q), x))
  err = {}
  for method in ptq.METHODS:
    q = ptq.quantize_params(v, spec, method, calibration=cal, hadamard_block=16)
    out = evaluate(q, x_test)
    err[method] = float(jnp.mean((out - ref) ** 2))
    acc = float(jnp.mean(out.argmax(-1) == y_test))
    assert acc > 0.8, f"{spec} {method}: accuracy {acc}"
    assert ptq.nbytes(q) < 0.16 * ptq.nbytes(v), "4-bit weights: about 1/7 of float32"
  assert err["gptq"] <= err["rtn"], err
  assert err["gptq_hadamard"] <= err["rtn_hadamard"], err


def test_gptq_compensates_on_a_single_layer(rng):
  x = jnp.asarray(rng.standard_normal((512, 64)).astype(np.float32))
  x = x @ jnp.asarray(rng.standard_normal((64, 64)).astype(np.float32))  # correlated inputs
  w = jnp.asarray(rng.standard_normal((64, 32)).astype(np.float32))
  rtn = fp4jax.fake_quant(w, "mxfp4", 0)
  g = ptq.gptq_quantize(w, x, "mxfp4")
  stored = fp4jax.fake_quant(g, "mxfp4", 0)
  assert bool(jnp.all(stored == g)), "GPTQ values lie on the MXFP4 grid of their blocks"
  e = lambda wq: float(jnp.mean((x @ wq - x @ w) ** 2))
  assert e(g) < 0.7 * e(rtn), (e(g), e(rtn))


def test_bad_arguments(rng):
  params = {"fc": {"kernel": jnp.ones((64, 32))}}
  with pytest.raises(ValueError, match="method must be one of"):
    ptq.quantize_params(params, "mxfp4", "awq")
  with pytest.raises(ValueError, match="needs calibration inputs"):
    ptq.quantize_params(params, "mxfp4", "gptq")
  with pytest.raises(ValueError, match=r"no calibration inputs for \['fc'\]"):
    ptq.quantize_params(params, "mxfp4", "gptq", calibration={"other": jnp.ones((4, 64))})
  with pytest.raises(ValueError, match="not a multiple of the block size"):
    ptq.gptq_quantize(jnp.ones((40, 8)), jnp.ones((4, 40)), "mxfp4")


@pytest.mark.parametrize("calibration,match", [
    (np.ones((16, 48), np.float32), r"'fc' have shape \(16, 48\); the layer takes K = 64"),
    (np.ones((3, 7), np.float32), r"have shape \(3, 7\); .*must have shape \(\.\.\., 64\)"),
    (np.ones((0, 64), np.float32), "no rows"),
    (np.where(np.arange(64) == 5, np.nan, 1.0).reshape(1, 64).repeat(8, 0).astype(np.float32),
     "8 non-finite value"),
])
def test_gptq_calibration_inputs_are_checked_per_layer(calibration, match):
  params = {"fc": {"kernel": jnp.ones((64, 32))}}
  with pytest.raises(ValueError, match=match):
    ptq.quantize_params(params, "mxfp4", "gptq", calibration={"fc": jnp.asarray(calibration)})


def test_weight_only_apply_runs_the_kernel_where_it_can_and_equals_the_dequantized_model(
    monkeypatch):
  from fp4jax.kernels import weight_only as kernel_weight_only
  m, v, _, x_test, y_test = _trained_digits_mlp()
  q = ptq.quantize_params(v, "mxfp4", "rtn")
  x = jnp.asarray(x_test[:64])
  ref = np.asarray(m.apply(ptq.dequantize_params(q), x))
  # Dequantizing (XLA) is the reference's own arithmetic.
  np.testing.assert_allclose(np.asarray(ptq.weight_only_apply(m, q, x, impl="xla")), ref,
                             rtol=1e-5, atol=1e-5)
  launched = []
  real = kernel_weight_only.weight_only_matmul
  monkeypatch.setattr(kernel_weight_only, "weight_only_matmul",
                      lambda xx, w, **kw: launched.append(w.shape) or real(xx, w, **kw))
  got = np.asarray(ptq.weight_only_apply(m, q, x, impl="pallas"))
  # fc1 (64 x 256) and fc2 (256 x 128) through the kernel; the head's N = 10 has no tile,
  # so the dispatch dequantizes it.
  assert launched == [(64, 256), (256, 128)], launched
  # The kernel rounds activations to bf16 (one rounding per layer input).
  assert np.abs(got - ref).max() <= 2e-2 * np.abs(ref).max()
  assert np.mean(got.argmax(-1) == ref.argmax(-1)) >= 0.95


def test_weight_only_dot_names_what_the_kernel_cannot_take(rng):
  from fp4jax import gemm
  w = fp4jax.quantize(jnp.asarray(rng.standard_normal((128, 10)).astype(np.float32)),
                      "mxfp4", axis=-2)
  x = jnp.ones((4, 128))
  with pytest.raises(ValueError, match="impl='pallas': no tile divides K=128, N=10"):
    gemm.weight_only_dot(x, w, impl="pallas")
  np.testing.assert_allclose(np.asarray(gemm.weight_only_dot(x, w, impl="pallas", strict=False)),
                             np.asarray(x @ fp4jax.dequantize(w, jnp.float32)), rtol=1e-6)
  with pytest.raises(ValueError, match="do not contract"):
    gemm.weight_only_dot(jnp.ones((4, 64)), w)
  with pytest.raises(TypeError, match="must be a 2D QArray"):
    gemm.weight_only_dot(x, jnp.ones((128, 10)))


def test_weight_only_apply_dequantizes_what_is_not_a_plain_dense(rng, monkeypatch):
  # A 2D DenseGeneral kernel and a Dense subclass look like Dense kernels in the tree;
  # they are dequantized, not given to the weight-only GEMM (which would not match them).
  import flax.linen as nn

  class MyDense(nn.Dense):
    pass

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.DenseGeneral(64, name="general")(x)
      x = MyDense(64, name="sub")(x)
      return nn.Dense(32, name="plain")(inputs=x)

  x = jnp.asarray(rng.standard_normal((8, 64)).astype(np.float32))
  v = Net().init(jax.random.key(0), x)
  q = {"params": {k: {**p, "kernel": fp4jax.quantize(p["kernel"], "mxfp4", axis=-2)}
                  for k, p in v["params"].items()}}
  ref = Net().apply(ptq.dequantize_params(q), x)
  got = ptq.weight_only_apply(Net(), q, x, impl="xla")
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)
  from fp4jax.kernels import weight_only as kernel_weight_only
  launched = []
  real = kernel_weight_only.weight_only_matmul
  monkeypatch.setattr(kernel_weight_only, "weight_only_matmul",
                      lambda xx, w, **kw: launched.append(w.shape) or real(xx, w, **kw))
  got = ptq.weight_only_apply(Net(), q, x, impl="pallas")
  assert launched == [(64, 32)], launched       # the plain Dense only (inputs= by keyword)
  assert np.abs(np.asarray(got) - np.asarray(ref)).max() <= 2e-2 * np.abs(np.asarray(ref)).max()
