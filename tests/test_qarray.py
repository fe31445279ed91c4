"""fp4jax.qarray: QArray as a pytree under jit / vmap / grad / jax.tree, and its sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fp4jax


def test_bits_per_element_and_nbytes(rng):
  x = rng.standard_normal((64, 256)).astype(np.float32)
  q = fp4jax.quantize(x, "mxfp4")
  assert q.bits_per_element == 4.25
  assert q.nbytes == 64 * 128 + 64 * 8
  q = fp4jax.quantize(x, "nvfp4")
  assert q.bits_per_element == 4.5
  assert q.nbytes == 64 * 128 + 64 * 16 + 4
  assert fp4jax.get_spec("mxfp4").bits_per_element == 4.25
  assert fp4jax.get_spec("nvfp4").bits_per_element == 4.5
  assert fp4jax.quantize(x, "mxfp6_e2m3").bits_per_element == 6.25


def test_jit_roundtrip(rng):
  x = jnp.asarray(rng.standard_normal((16, 64)), jnp.bfloat16)
  q = jax.jit(lambda v: fp4jax.quantize(v, "nvfp4"))(x)
  assert isinstance(q, fp4jax.QArray)
  y_jit = jax.jit(fp4jax.dequantize)(q)
  np.testing.assert_array_equal(np.asarray(y_jit, np.float32),
                                np.asarray(fp4jax.fake_quant(x, "nvfp4"), np.float32))


def test_vmap_quantize_and_dequantize(rng):
  x = jnp.asarray(rng.standard_normal((4, 8, 64)), jnp.float32)
  # Under jit (one compile per function; op by op every primitive compiles alone).
  q = jax.jit(jax.vmap(lambda v: fp4jax.quantize(v, "mxfp4")))(x)
  assert q.shape == (4, 8, 64) and q.scales.shape == (4, 8, 2)
  y = jax.jit(jax.vmap(fp4jax.dequantize))(q)
  np.testing.assert_array_equal(y, jax.jit(lambda x: fp4jax.fake_quant(x, "mxfp4"))(x))
  np.testing.assert_array_equal(jax.jit(fp4jax.dequantize)(q), y)  # batched, outside vmap
  qn = jax.jit(jax.vmap(lambda v: fp4jax.quantize(v, "nvfp4")))(x)
  np.testing.assert_array_equal(jax.jit(fp4jax.dequantize)(qn),
                                jax.jit(jax.vmap(fp4jax.dequantize))(qn))


def test_tree_utilities_and_grad_as_data(rng):
  x = jnp.asarray(rng.standard_normal((8, 32)), jnp.float32)
  q = fp4jax.quantize(x, "nvfp4")
  leaves, treedef = jax.tree.flatten(q)
  assert len(leaves) == 3
  q2 = jax.tree.unflatten(treedef, leaves)
  np.testing.assert_array_equal(fp4jax.dequantize(q2), fp4jax.dequantize(q))
  shapes = jax.tree.map(lambda a: a.shape, q)
  assert shapes.codes == (8, 16)
  # A QArray can be an argument of a differentiated function (as non-differentiable data).
  w = jnp.ones((32, 4))
  g = jax.grad(lambda w, q: jnp.sum(fp4jax.dequantize(q) @ w))(w, q)
  np.testing.assert_allclose(g, jnp.broadcast_to(fp4jax.dequantize(q).sum(0)[:, None], (32, 4)),
                             rtol=1e-6, atol=1e-6)  # dot and sum add in different orders


def test_repr_and_dtype():
  q = fp4jax.quantize(jnp.ones((2, 32), jnp.bfloat16), "mxfp4")
  assert "mxfp4" in repr(q) and q.dtype == jnp.bfloat16
  assert fp4jax.dequantize(q).dtype == jnp.bfloat16
  assert q.dequantize(jnp.float32).dtype == jnp.float32


def test_dequantize_and_element_scales_reject_non_qarray():
  with pytest.raises(TypeError, match="QArray"):
    fp4jax.dequantize(jnp.ones(3))
  with pytest.raises(TypeError, match="QArray"):
    fp4jax.element_scales(jnp.ones(3))


@pytest.mark.parametrize("name", ["mxfp4", "nvfp4", "nvfp4_2d"])
def test_transpose_is_the_quantization_of_the_transpose(name, rng):
  # A 2D QArray blocked along K, transposed, is the transpose blocked along K again: the
  # same codes and scales, nothing re-encoded (qdot's dgrad / wgrad operands use it).
  spec = fp4jax.get_spec(name)
  if spec.granularity == "tile":
    spec = spec.replace(tile=(16, 32))
  x = jnp.asarray(rng.standard_normal((64, 96)).astype(np.float32))
  q = fp4jax.quantize(x, spec, -1)
  t = q.T
  assert t.shape == (96, 64) and t.axis == -2
  np.testing.assert_array_equal(np.asarray(fp4jax.dequantize(t)),
                                np.asarray(fp4jax.dequantize(q)).T)
  if spec.granularity == "tile":
    assert t.spec.tile == (32, 16)
  with pytest.raises(ValueError, match="2D arrays"):
    fp4jax.quantize(jnp.ones((2, 4, 32)), "mxfp4").transpose()


@pytest.mark.parametrize("name", ["mxfp4", "nvfp4", "mxfp8_e4m3", "mxfp8_e5m2"])
def test_scaled_matmul_operands_give_the_dequantized_product(name, rng):
  # jax.nn.scaled_matmul runs as XLA ops on CPU (cuDNN's block-scaled GEMM on sm_100):
  # the operands' product times the tensor scales is the product of the dequantized ones.
  a = fp4jax.quantize(jnp.asarray(rng.standard_normal((32, 128)).astype(np.float32)), name)
  b = fp4jax.quantize(jnp.asarray(rng.standard_normal((128, 48)).astype(np.float32)), name,
                      axis=-2)
  lhs, ls = a.scaled_matmul_operand()
  rhs, rs = b.scaled_matmul_operand()
  bs = a.spec.block_size
  assert lhs.shape == (32, 128) and rhs.shape == (48, 128)
  assert ls.shape == (32, 128 // bs) and rs.shape == (48, 128 // bs)
  assert lhs.dtype == {"mxfp4": jnp.float4_e2m1fn, "nvfp4": jnp.float4_e2m1fn,
                       "mxfp8_e4m3": jnp.float8_e4m3fn, "mxfp8_e5m2": jnp.float8_e5m2}[name]
  # Element values times their block scales are the dequantized values (exactly for MX;
  # NVFP4's dequantize multiplies the tensor scale in another order: one rounding).
  ts = 1.0 if a.tensor_scale is None else float(np.asarray(a.tensor_scale).reshape(()))
  vals = lhs.astype(jnp.float32) * jnp.repeat(ls.astype(jnp.float32), bs, axis=-1)
  np.testing.assert_allclose(np.asarray(vals) * np.float32(ts),
                             np.asarray(fp4jax.dequantize(a, jnp.float32)),
                             rtol=0 if a.tensor_scale is None else 2.0**-23, atol=0)
  y = jax.nn.scaled_matmul(lhs[None], rhs[None], ls[None], rs[None],
                           preferred_element_type=jnp.float32)[0]
  if a.tensor_scale is not None:
    y = y * a.tensor_scale.reshape(()) * b.tensor_scale.reshape(())
  want = fp4jax.dequantize(a, jnp.float32) @ fp4jax.dequantize(b, jnp.float32)
  np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-5, atol=1e-4)


def test_scaled_matmul_operand_names_what_cudnn_cannot_take():
  with pytest.raises(ValueError, match="int4_g32 has .*int4 elements|int4_g32 has .*blocks"):
    fp4jax.quantize(jnp.ones((4, 64)), "int4_g32").scaled_matmul_operand()
  with pytest.raises(ValueError, match="rank 4"):
    fp4jax.quantize(jnp.ones((2, 2, 4, 64)), "mxfp4").scaled_matmul_operand()


def test_matrix_transpose_needs_two_axes_and_transpose_names_it_for_batches():
  with pytest.raises(ValueError, match="matrix_transpose needs at least 2 axes"):
    fp4jax.quantize(jnp.ones((64,)), "mxfp4").mT
  with pytest.raises(ValueError, match=r"QArray.transpose takes 2D arrays.*\.mT"):
    fp4jax.quantize(jnp.ones((2, 4, 64)), "mxfp4").T
