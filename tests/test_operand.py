"""fp4jax.operand: GEMM-ready values equal the reference bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sweeps
from fp4jax import dispatch, operand
from fp4jax.spec import get_spec


def _u(x):
  x = jnp.asarray(x)
  if x.dtype == jnp.bfloat16:
    return np.asarray(jax.lax.bitcast_convert_type(x, jnp.uint16))
  return np.asarray(jax.lax.bitcast_convert_type(x, jnp.uint32))


def _every_bf16(shape, seed, specials=True):
  """Every finite bf16 bit pattern (and, with ``specials``, NaN/Inf), shuffled, with each
  row of 32 rescaled by a random power of two so blocks span the whole exponent range."""
  rng = np.random.default_rng(seed)
  pats = np.arange(65536, dtype=np.uint32)
  finite = ((pats >> 7) & 0xFF) != 0xFF
  pats = pats if specials else pats[finite]
  n = int(np.prod(shape))
  pats = rng.choice(pats, n, replace=n > pats.size)
  x = (pats << 16).view(np.float32).reshape(shape)
  return jnp.asarray(x).astype(jnp.bfloat16)


def _wide(shape, seed, dtype, tiny=False):
  """Normal data over 40 binades plus zero, subnormal, near-max and tiny blocks."""
  rng = np.random.default_rng(seed)
  x = (rng.standard_normal(shape) * np.exp2(rng.integers(-20, 20, shape))).astype(np.float32)
  flat = x.reshape(-1)
  flat[:32] = rng.standard_normal(32) * 1e-39     # a subnormal block
  flat[32:64] = 0.0                               # a zero block
  flat[64:96] = rng.standard_normal(32) * 2.0 ** -124  # a tiny block (scale 2^-127)
  flat[96:100] = [6.0, -7.0, 0.25, 0.75]          # a grid edge, a tie, the midpoints
  flat[100:104] = [3.0e38, -2.0e38, 1e-45, -0.0]
  if tiny:
    x = x * np.float32(1e-30)
  return jnp.asarray(x).astype(dtype)


KEEPS_SUBNORMALS = dispatch.device_facts().keeps_subnormals
SPECS = [("mxfp4", m) for m in ("floor", "ceil", "even", "rceil")] + [
    ("nvfp4", "amax"), ("nvfp4_2d", "amax")]


@pytest.mark.parametrize("spec_mode,rounding,axis,data", sweeps.product(
    24, spec_mode={f"{n}-{m}": (n, m) for n, m in SPECS}, rounding=["nearest", "stochastic"],
    axis=[-1, -2], data=["every_bf16", "wide_f32", "wide_bf16", "tiny_f32", "specials_f32"]))
def test_gemm_operand_equals_reference(spec_mode, rounding, axis, data):
  name, mode = spec_mode
  sp = get_spec(name).replace(scale_mode=mode, rounding=rounding)
  shape = (96, 128)
  if data == "every_bf16":
    x = _every_bf16(shape, 1, specials=sp.scale_format.is_pow2)
  elif data == "specials_f32":
    x = np.asarray(_wide(shape, 2, jnp.float32)).copy()
    x[5, 7], x[40, 3], x[70, 100] = np.nan, np.inf, -np.inf
    x = jnp.asarray(x)
  else:
    x = _wide(shape, 3, jnp.bfloat16 if data == "wide_bf16" else jnp.float32,
              tiny=data == "tiny_f32")
  key = jax.random.key(7)
  # The IEEE variant (one multiply) is exact only where the backend keeps subnormals
  # (XLA:GPU); on XLA:CPU it is checked on normal data below.
  for dtype, ieee in [(jnp.bfloat16, False), (jnp.float32, False)] + (
      [(jnp.bfloat16, True), (jnp.float32, True)] if KEEPS_SUBNORMALS else []):
    got, t = jax.jit(lambda x: operand.gemm_operand(x, sp, axis, key, dtype=dtype,
                                                    ieee_subnormals=ieee))(x)
    ref, tr = jax.jit(lambda x: operand.gemm_operand_reference(x, sp, axis, key,
                                                               dtype=dtype))(x)
    assert got.dtype == ref.dtype == dtype and got.shape == x.shape
    np.testing.assert_array_equal(_u(got), _u(ref))
    assert (t is None) == (tr is None)
    if t is not None:
      np.testing.assert_array_equal(_u(t), _u(tr))


def test_gemm_operand_times_tensor_scale_is_the_quantized_value():
  sp = get_spec("nvfp4")
  x = _wide((32, 64), 4, jnp.float32)
  v, t = operand.gemm_operand(x, sp, -1, dtype=jnp.float32)
  from fp4jax import fake_quant
  ref = fake_quant(x, sp, -1)
  # q * (t * s) against (q * s) * t: one float32 rounding apart at most.
  np.testing.assert_allclose(np.asarray(v * t), np.asarray(ref), rtol=2 ** -23, atol=0)


def test_gemm_operand_explicit_tensor_scale_and_random_bits():
  sp = get_spec("nvfp4").replace(rounding="stochastic")
  x = _wide((16, 32), 5, jnp.float32)
  rb = jax.random.bits(jax.random.key(0), x.shape, jnp.uint32)
  t = jnp.float32(0.01)
  got, tg = operand.gemm_operand(x, sp, -1, random_bits=rb, tensor_scale=t)
  ref, tr = operand.gemm_operand_reference(x, sp, -1, random_bits=rb, tensor_scale=t)
  np.testing.assert_array_equal(_u(got), _u(ref))
  assert float(tg) == float(tr) == np.float32(0.01)


def test_gemm_operands_of_a_layer_equal_each_reference():
  # A mix as one layer's backward emits them: NVFP4 rows, columns (1x16 and 16x16) and
  # stochastic rows with derived tensor scales (batched: one table computation), one with
  # an explicit tensor scale, a tensor holding NaN (t = NaN), an all-zero tensor (t = 1),
  # and an MXFP4 operand (no tensor scale) among them.
  nv, mx = get_spec("nvfp4"), get_spec("mxfp4")
  x = _wide((64, 128), 11, jnp.float32)
  xn = np.asarray(_wide((64, 128), 12, jnp.float32)).copy()
  xn[3, 5] = np.nan
  reqs = [operand.OperandRequest(x, nv, -1),
          operand.OperandRequest(_wide((64, 128), 13, jnp.bfloat16), nv, -2),
          operand.OperandRequest(x * 1e-30, get_spec("nvfp4_2d"), -1),
          operand.OperandRequest(x, nv.replace(rounding="stochastic"), -2, jax.random.key(3)),
          operand.OperandRequest(x, nv, -1, tensor_scale=jnp.float32(0.03)),
          operand.OperandRequest(jnp.asarray(xn), nv, -1),
          operand.OperandRequest(jnp.zeros((64, 128), jnp.float32), nv, -2),
          operand.OperandRequest(x, mx, -2)]
  got = jax.jit(lambda: operand.gemm_operands(reqs, dtype=jnp.float32))()
  assert len(got) == len(reqs)
  for i, (r, (v, t)) in enumerate(zip(reqs, got)):
    ref, tr = operand.gemm_operand_reference(r.x, r.spec, r.axis, r.key, dtype=jnp.float32,
                                             tensor_scale=r.tensor_scale)
    np.testing.assert_array_equal(_u(v), _u(ref), err_msg=f"operand {i}")
    assert (t is None) == (tr is None), i
    if t is not None:
      np.testing.assert_array_equal(_u(t), _u(tr), err_msg=f"tensor scale {i}")


def test_gemm_operands_bad_arguments_are_named():
  nv = get_spec("nvfp4")
  x = jnp.ones((32, 64), jnp.float32)
  assert operand.gemm_operands([]) == []
  with pytest.raises(ValueError, match="dtype must be bfloat16 or float32"):
    operand.gemm_operands([operand.OperandRequest(x, nv, -1)], dtype=jnp.float16)
  with pytest.raises(ValueError, match="axis -1 has length 60, not a multiple of its block 16"):
    operand.gemm_operands([operand.OperandRequest(x, nv, -1),
                           operand.OperandRequest(jnp.ones((32, 60)), nv, -1)])
  with pytest.raises(ValueError, match="stochastic rounding needs key="):
    operand.gemm_operands([operand.OperandRequest(x, nv.replace(rounding="stochastic"), -1)])


def test_gemm_operands_share_the_per_tensor_graph():
  # What the batching is for: three NVFP4 operands cost about one operand's scalar graph
  # (tensor scales and UE4M3 tables), not three (compile time, small GPU kernels).
  nv = get_spec("nvfp4")
  xs = [jnp.ones((32, 64), jnp.bfloat16) * (i + 1) for i in range(3)]

  def size(f):
    def count(j):
      return sum(1 + sum(count(s.jaxpr if hasattr(s, "jaxpr") else s)
                         for p in e.params.values()
                         for s in (p if isinstance(p, (list, tuple)) else [p])
                         if hasattr(s, "eqns") or hasattr(getattr(s, "jaxpr", None), "eqns"))
                 for e in j.eqns)
    return count(jax.make_jaxpr(f)(xs).jaxpr)

  one = size(lambda xs: operand.gemm_operand(xs[0], nv, -1))
  together = size(lambda xs: operand.gemm_operands([operand.OperandRequest(x, nv, -1)
                                                    for x in xs]))
  apart = size(lambda xs: [operand.gemm_operand(x, nv, -1) for x in xs])
  assert apart == 3 * one
  assert together < 1.6 * one, (one, together, apart)


def test_gemm_operand_stochastic_is_unbiased():
  sp = get_spec("mxfp4").replace(rounding="stochastic")
  x = jnp.full((1, 32), 0.3, jnp.float32).at[0, 0].set(5.0)  # scale 1: 0.3 between 0 and 0.5
  vals = jnp.stack([operand.gemm_operand(x, sp, -1, jax.random.key(i), dtype=jnp.float32)[0]
                    for i in range(200)])
  mean = float(vals[:, 0, 1:].mean())
  assert abs(mean - 0.3) < 0.01, mean
  assert set(np.unique(np.asarray(vals[:, 0, 1:]))) == {0.0, 0.5}


@pytest.mark.parametrize("spec,why", [
    (get_spec("mxfp8_e4m3"), "not E2M1"), (get_spec("fp8_e4m3_tensor"), "not E2M1"),
    (get_spec("mxfp4").replace(rounding="toward_zero"), "rounding"),
    (get_spec("mxfp4").replace(saturate=False), "saturate"), (None, "not quantized")])
def test_unsupported_reason_names_the_cause(spec, why):
  assert why in operand.unsupported_reason(spec)
  if spec is not None:
    with pytest.raises(ValueError, match="unsupported operand"):
      operand.gemm_operand(jnp.ones((4, 32)), spec, -1)


def test_bad_arguments_are_named():
  sp = get_spec("mxfp4")
  with pytest.raises(ValueError, match="not a multiple of its block 32"):
    operand.gemm_operand(jnp.ones((4, 48)), sp, -1)
  with pytest.raises(ValueError, match="dtype must be bfloat16 or float32"):
    operand.gemm_operand(jnp.ones((4, 32)), sp, -1, dtype=jnp.float16)
  with pytest.raises(ValueError, match="needs key"):
    operand.gemm_operand(jnp.ones((4, 32)), sp.replace(rounding="stochastic"), -1)
  with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
    operand.gemm_operand(jnp.ones((4, 32), jnp.int32), sp, -1)


@pytest.mark.parametrize("name,mode", SPECS)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_ieee_variant_equals_reference_on_normal_data(name, mode, rounding):
  # Normal inputs whose blocks have scales >= 2^-126: no subnormal operand or result for
  # a flushing backend to touch, so the one-multiply variant is exact on CPU too.
  sp = get_spec(name).replace(scale_mode=mode, rounding=rounding)
  rng = np.random.default_rng(9)
  x = (rng.standard_normal((64, 128)) * np.exp2(rng.integers(-20, 20, (64, 128))))
  x[0, :4] = [6.0, -7.0, 0.0, -0.0]
  x = jnp.asarray(x.astype(np.float32))
  key = jax.random.key(2)
  for axis in (-1, -2):
    got, _ = operand.gemm_operand(x, sp, axis, key, ieee_subnormals=True)
    ref, _ = operand.gemm_operand_reference(x, sp, axis, key)
    np.testing.assert_array_equal(_u(got), _u(ref))
