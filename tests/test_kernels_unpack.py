"""fp4jax/kernels/unpack.py: the unpack kernel equals its pure-JAX reference bit for bit, its
values are the dequantized operand (exactly, in the documented range), and the K order
it writes is the same for both GEMM operands."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fp4jax
import sweeps

from fp4jax.kernels import unpack as fu
from fp4jax.quantization import dequantize

INTERPRET = not fp4jax.dispatch.device_facts().on_gpu
MX, NV = fp4jax.get_spec("mxfp4"), fp4jax.get_spec("nvfp4")
SPECS = {"mxfp4": MX, "mxfp4_b16": MX.replace(block_size=16), "nvfp4": NV,
         "nvfp4_one_level": NV.replace(tensor_scale=None)}


def _operand(rng, role, rows, k, spec, spread=10, nan_scale=False):
  shape = (rows, k) if role == "lhs" else (k, rows)
  x = rng.standard_normal(shape).astype(np.float32)
  x *= np.exp2(rng.integers(-spread, spread + 1, shape)).astype(np.float32)
  x[tuple(slice(0, 3) for _ in shape)] = 0.0
  q = fp4jax.quantize(jnp.asarray(x), spec, -1 if role == "lhs" else -2)
  if nan_scale and spec.scale_format.is_pow2:
    s = np.asarray(fu.scale_codes(q)).copy()
    s[1, 1] = 255
    q = q.__class__(q.codes, jax.lax.bitcast_convert_type(jnp.asarray(s), q.scales.dtype),
                    q.tensor_scale, q.spec, q.axis, q.padding, q.orig_dtype)
  return q


def _ref_codes(q, role):
  s = fu.scale_codes(q).astype(jnp.int32)
  return jnp.max(s, axis=1 if role == "lhs" else 0)


def _as_bits(y):
  return np.asarray(jax.lax.bitcast_convert_type(
      y, jnp.uint8 if y.dtype == jnp.float8_e4m3fn else jnp.uint16))


TARGETS = [(name, "bf16") for name in sorted(SPECS)] + [("mxfp4", "e4m3"),
                                                         ("mxfp4_b16", "e4m3")]


@pytest.mark.parametrize("target,role,shape", sweeps.product(
    10, target={f"{n}-{t}": (n, t) for n, t in TARGETS}, role=["lhs", "rhs"],
    shape={f"{r}x{k}": (r, k) for r, k in [(64, 256), (70, 96), (9, 2048)]}))
def test_kernel_equals_reference_bit_for_bit(target, role, shape, rng):
  (spec_name, to), (rows, k) = target, shape
  spec = SPECS[spec_name]
  q = _operand(rng, role, rows, k, spec, nan_scale=True)
  ref = _ref_codes(q, role) if to == "e4m3" else None
  y = fu.gemm_operand(q, role=role, to=to, ref_code=ref, interpret=INTERPRET, rows_tile=32)
  want = fu.gemm_operand_reference(q, role=role, to=to, ref_code=ref)
  assert y.shape == (rows, k) and y.dtype == want.dtype
  np.testing.assert_array_equal(_as_bits(y), _as_bits(want),
                                err_msg=f"{spec_name}/{role}/{to}: kernel != reference")


@pytest.mark.parametrize("spec_name", sorted(SPECS))
@pytest.mark.parametrize("role", ["lhs", "rhs"])
def test_bf16_values_are_the_dequantized_operand(spec_name, role, rng):
  spec = SPECS[spec_name]
  q = _operand(rng, role, 48, 256, spec, spread=30)
  y = np.asarray(fu.gemm_operand_reference(q, role=role, to="bf16").astype(jnp.float32))
  one_level = q.__class__(q.codes, q.scales, None, q.spec.replace(tensor_scale=None), q.axis,
                          q.padding, q.orig_dtype)  # tensor scales are the caller's
  d = dequantize(one_level, jnp.float32)
  d = np.asarray(d if role == "lhs" else d.T)
  np.testing.assert_array_equal(y, np.asarray(fu.permute_k(jnp.asarray(d))),
                                err_msg="value * scale must be exact in bf16")


@pytest.mark.parametrize("block", [16, 32])
def test_e4m3_values_are_exact_within_eight_binades(block, rng):
  spec = MX.replace(block_size=block)
  q = _operand(rng, "lhs", 40, 512, spec, spread=3)
  s = fu.scale_codes(q).astype(jnp.int32)
  r = jnp.max(s, axis=1)
  assert int(jnp.min(s - r[:, None])) >= -8, "test data must stay inside the exact range"
  y = np.asarray(fu.gemm_operand_reference(q, role="lhs", to="e4m3", ref_code=r)
                 .astype(jnp.float32))
  d = np.asarray(dequantize(q, jnp.float32)) * np.exp2(127.0 - np.asarray(r))[:, None]
  np.testing.assert_array_equal(y, np.asarray(fu.permute_k(jnp.asarray(d, jnp.float32))))


def test_both_roles_share_one_k_order(rng):
  a = _operand(rng, "lhs", 24, 384, MX, spread=2)
  b = _operand(rng, "rhs", 40, 384, MX, spread=2)
  a16 = fu.gemm_operand(a, role="lhs", to="bf16", interpret=INTERPRET)
  b16 = fu.gemm_operand(b, role="rhs", to="bf16", interpret=INTERPRET)
  y = jnp.dot(a16.astype(jnp.float32), b16.astype(jnp.float32).T, precision="highest")
  ref = jnp.dot(dequantize(a, jnp.float32), dequantize(b, jnp.float32), precision="highest")
  np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("k,t", [(256, 128), (96, 16), (192, 32), (2048, 128), (320, 32)])
def test_k_tile_bytes(k, t):
  assert fu.k_tile_bytes(k) == t


def test_bad_input_is_rejected_with_the_fix(rng):
  a = _operand(rng, "lhs", 16, 128, MX)
  nv = _operand(rng, "lhs", 16, 128, NV)
  with pytest.raises(ValueError, match="role must be one of"):
    fu.gemm_operand(a, role="left", to="bf16")
  with pytest.raises(ValueError, match="to must be one of"):
    fu.gemm_operand(a, role="lhs", to="fp16")
  with pytest.raises(ValueError, match="blocked along axis -2"):
    fu.gemm_operand(a, role="rhs", to="bf16")
  with pytest.raises(ValueError, match="use to='bf16'"):
    fu.gemm_operand(nv, role="lhs", to="e4m3", ref_code=jnp.zeros((16,), jnp.int32))
  with pytest.raises(ValueError, match=r"needs ref_code of shape \(16,\)"):
    fu.gemm_operand(a, role="lhs", to="e4m3")
  with pytest.raises(ValueError, match="packed, unpadded E2M1"):
    fu.gemm_operand(fp4jax.quantize(jnp.ones((16, 128)), "mxfp8_e4m3", -1), role="lhs",
                    to="bf16")
