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
