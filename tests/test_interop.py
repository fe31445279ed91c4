"""fp4jax.interop: the gpt-oss / OCP MX MXFP4 layout and safetensors files, checked bit for
bit both ways and against an independent numpy decoder written here."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy as st   # the [interop] extra (in the test extra too)

import fp4jax
from fp4jax import interop

# The E2M1 values of codes 0..15 (OCP MX v1.0, table of FP4 E2M1): sign bit 3.
FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                       -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float64)


def numpy_decode(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
  """gpt-oss MXFP4 to float64, from the layout's definition alone: low nibble first, 32
  codes per block, value = FP4[code] * 2^(scale - 127), scale 255 = NaN."""
  lo, hi = blocks & 0x0F, blocks >> 4
  codes = np.stack([lo, hi], axis=-1).reshape(*blocks.shape[:-1], 32)
  vals = FP4_VALUES[codes] * np.exp2(scales.astype(np.float64) - 127)[..., None]
  vals = np.where((scales == 255)[..., None], np.nan, vals)
  return vals.reshape(*blocks.shape[:-2], blocks.shape[-2] * 32)


def _same_bytes(a, b):
  a, b = np.asarray(a), np.asarray(b)
  assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
  np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


def _random_layout(rng, lead, k, scale_lo=100, scale_hi=140):
  blocks = rng.integers(0, 256, size=(*lead, k // 32, 16), dtype=np.uint8)
  scales = rng.integers(scale_lo, scale_hi, size=(*lead, k // 32), dtype=np.uint8)
  return blocks, scales


@pytest.mark.parametrize("lead", [(), (5,), (4, 3)])
def test_bytes_to_qarray_to_the_same_bytes(lead, rng):
  blocks, scales = _random_layout(rng, lead, 128, 0, 256)   # every scale code, NaN too
  q = interop.mxfp4_from_blocks(blocks, scales)
  assert q.shape == (*lead, 128) and q.spec.name == "mxfp4" and q.axis == -1
  b2, s2 = interop.mxfp4_to_blocks(q)
  _same_bytes(b2, blocks)
  _same_bytes(s2, scales)


@pytest.mark.parametrize("shape", [(64, 96), (3, 32, 64)])
def test_qarray_to_bytes_to_the_same_qarray(shape, rng):
  x = jnp.asarray(rng.standard_normal(shape).astype(np.float32) * 4)
  q = fp4jax.quantize(x, "mxfp4")
  q2 = interop.mxfp4_from_blocks(*interop.mxfp4_to_blocks(q), dtype=q.orig_dtype)
  for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(q2)):
    _same_bytes(a, b)
  assert (q2.spec, q2.axis, q2.padding) == (q.spec, q.axis, q.padding)


def test_decoding_equals_an_independent_numpy_decoder(rng):
  blocks, scales = _random_layout(rng, (2, 8), 96, 110, 140)
  scales[0, 3, 1] = 255                                       # a NaN block
  got = np.asarray(interop.mxfp4_from_blocks(blocks, scales).dequantize(jnp.float32))
  want = numpy_decode(blocks, scales)
  np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
  ok = ~np.isnan(want)
  np.testing.assert_array_equal(got[ok], want[ok].astype(np.float32))


def test_a_gpt_oss_style_file_written_by_safetensors_reads_as_its_values(tmp_path, rng):
  # Names and shapes as gpt-oss's MoE checkpoints (scaled down): expert MLP weights
  # (experts, out, in) in MXFP4 blocks along `in`, a BF16 router and norm, an f32 bias.
  e, hidden, inter = 4, 64, 96
  mlp1 = _random_layout(rng, (e, 2 * inter), hidden)
  mlp2 = _random_layout(rng, (e, hidden), inter)
  router = rng.standard_normal((e, hidden)).astype(ml_dtypes.bfloat16)
  bias = rng.standard_normal((e, 2 * inter)).astype(np.float32)
  path = str(tmp_path / "model.safetensors")
  st.save_file({"block.0.mlp.mlp1_weight.blocks": mlp1[0], "block.0.mlp.mlp1_weight.scales": mlp1[1],
                "block.0.mlp.mlp2_weight.blocks": mlp2[0], "block.0.mlp.mlp2_weight.scales": mlp2[1],
                "block.0.mlp.gate.weight": router, "block.0.mlp.mlp1_bias": bias}, path)
  tree = interop.load_safetensors(path)
  mlp = tree["block"]["0"]["mlp"]
  w1, w2 = mlp["mlp1_weight"], mlp["mlp2_weight"]
  assert isinstance(w1, fp4jax.QArray) and w1.shape == (e, 2 * inter, hidden)
  assert w2.shape == (e, hidden, inter)
  for q, (b, s) in ((w1, mlp1), (w2, mlp2)):
    np.testing.assert_array_equal(np.asarray(q.dequantize(jnp.float32)),
                                  numpy_decode(b, s).astype(np.float32))
  assert mlp["gate"]["weight"].dtype == jnp.bfloat16
  _same_bytes(mlp["gate"]["weight"], router)
  _same_bytes(mlp["mlp1_bias"], bias)
  flat = interop.load_safetensors(path, nested=False)
  assert sorted(flat) == ["block.0.mlp.gate.weight", "block.0.mlp.mlp1_bias",
                          "block.0.mlp.mlp1_weight", "block.0.mlp.mlp2_weight"]


def test_save_then_load_is_the_same_tree(tmp_path, rng):
  w = fp4jax.quantize(jnp.asarray(rng.standard_normal((3, 64, 128)).astype(np.float32)), "mxfp4")
  tree = {"layers": {"0": {"w": w, "norm": jnp.ones(128, jnp.bfloat16)}},
          "embed": jnp.asarray(rng.standard_normal((10, 128)).astype(np.float32))}
  path = tmp_path / "out.safetensors"
  interop.save_safetensors(path, tree, metadata={"format": "mxfp4"})
  with st.safe_open(str(path), "np") as f:
    assert sorted(f.keys()) == ["embed", "layers.0.norm", "layers.0.w.blocks",
                                "layers.0.w.scales"]
    assert f.metadata()["format"] == "mxfp4"
    assert f.get_tensor("layers.0.w.blocks").shape == (3, 64, 4, 16)
  back = interop.load_safetensors(path)       # float32: recorded in the metadata
  assert jax.tree.structure(back) == jax.tree.structure(tree)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):
    _same_bytes(a, b)


def test_matrix_transpose_turns_the_gpt_oss_layout_into_a_flax_kernel(rng):
  # gpt-oss keeps (experts, out, in) blocked along `in`; .mT is the (experts, in, out)
  # kernel blocked along axis -2, with no element re-encoded.
  blocks, scales = _random_layout(rng, (2, 64), 256, 120, 130)
  q = interop.mxfp4_from_blocks(blocks, scales)
  k = q.mT
  assert k.shape == (2, 256, 64) and k.axis == -2
  np.testing.assert_array_equal(np.asarray(k.dequantize(jnp.float32)),
                                np.swapaxes(np.asarray(q.dequantize(jnp.float32)), -1, -2))
  _same_bytes(k.mT.codes, q.codes)
  # One expert's kernel through the weight-only GEMM: x @ W.T.
  x = jnp.asarray(rng.standard_normal((16, 256)).astype(np.float32)).astype(jnp.bfloat16)
  w0 = interop.mxfp4_from_blocks(blocks[0], scales[0]).mT
  got = fp4jax.weight_only_matmul(x, w0)
  want = x.astype(jnp.float32) @ w0.dequantize(jnp.float32)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("make,match", [
    (lambda x: fp4jax.quantize(x, "nvfp4"), "e2m1 elements with ue4m3 scales"),
    (lambda x: fp4jax.quantize(x, "mxfp4", axis=-2), "blocked along axis -2; .*use .mT"),
    (lambda x: fp4jax.quantize(x, "mxfp4", block_size=16), "blocks of 16"),
    (lambda x: fp4jax.quantize(x[:, :48], "mxfp4", pad=True), "padded"),
])
def test_what_the_layout_cannot_hold_is_named(make, match, tmp_path):
  q = make(jnp.ones((64, 64), jnp.float32))
  with pytest.raises(ValueError, match=f"mxfp4_to_blocks: .*{match}"):
    interop.mxfp4_to_blocks(q)
  if q.axis == -2:   # a Flax kernel: save_safetensors stores it transposed instead
    return
  with pytest.raises(ValueError, match=f"'model.w' cannot be stored in the MXFP4 layout: .*{match}"):
    interop.save_safetensors(tmp_path / "x.safetensors", {"model": {"w": q}})


def test_flax_kernels_are_stored_in_the_gpt_oss_orientation_and_come_back(tmp_path, rng):
  # ptq.quantize_params quantizes Dense kernels (in, out) along `in` (axis -2): the file
  # holds (out, in) blocked along `in`, as gpt-oss does, and says so in its metadata.
  k = fp4jax.quantize(jnp.asarray(rng.standard_normal((128, 64)).astype(np.float32)),
                      "mxfp4", axis=-2)
  experts = fp4jax.quantize(jnp.asarray(rng.standard_normal((3, 64, 32)).astype(np.float32)),
                            "mxfp4", axis=-2)
  path = tmp_path / "kernels.safetensors"
  interop.save_safetensors(path, {"dense": {"kernel": k}, "moe": {"w": experts}})
  with st.safe_open(str(path), "np") as f:
    assert f.get_tensor("dense.kernel.blocks").shape == (64, 4, 16)      # (out, in/32, 16)
    assert f.get_tensor("moe.w.blocks").shape == (3, 32, 2, 16)
    assert json.loads(f.metadata()[interop.QARRAYS_KEY]) == {
        "dense.kernel": {"dtype": "float32", "transposed": True},
        "moe.w": {"dtype": "float32", "transposed": True}}
  back = interop.load_safetensors(path)      # the recorded dtype, not the bf16 default
  for got, want in ((back["dense"]["kernel"], k), (back["moe"]["w"], experts)):
    assert got.shape == want.shape and got.axis == -2
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      _same_bytes(a, b)
  # A reader that knows only the gpt-oss layout decodes (out, in) from the raw tensors.
  raw = st.load_file(str(path))
  np.testing.assert_array_equal(
      numpy_decode(raw["dense.kernel.blocks"], raw["dense.kernel.scales"]).astype(np.float32),
      np.asarray(k.dequantize(jnp.float32)).T)


def test_bad_files_and_arguments_are_named(tmp_path, rng):
  blocks, scales = _random_layout(rng, (4,), 64)
  with pytest.raises(TypeError, match="blocks must be uint8"):
    interop.mxfp4_from_blocks(blocks.astype(np.int32), scales)
  with pytest.raises(ValueError, match=r"blocks must have shape \(..., K/32, 16\)"):
    interop.mxfp4_from_blocks(blocks.reshape(4, 32), scales)
  with pytest.raises(ValueError, match="scales must have shape blocks.shape"):
    interop.mxfp4_from_blocks(blocks, scales[:, :1])
  path = str(tmp_path / "half.safetensors")
  st.save_file({"w.blocks": blocks}, path)
  with pytest.raises(ValueError, match="'w.blocks' has no 'w.scales'"):
    interop.load_safetensors(path)
  st.save_file({"w": blocks, "w.blocks": blocks, "w.scales": scales}, path)
  with pytest.raises(ValueError, match="'w' is both a tensor and an MXFP4 pair"):
    interop.load_safetensors(path)
  with pytest.raises(FileNotFoundError, match="no file"):
    interop.load_safetensors(tmp_path / "missing.safetensors")
  with pytest.raises(ValueError, match="read back as half of an MXFP4 pair"):
    interop.save_safetensors(tmp_path / "y.safetensors", {"w": {"scales": jnp.ones(3)}})
  with pytest.raises(ValueError, match="without '.'"):
    interop.save_safetensors(tmp_path / "y.safetensors", {"a.b": jnp.ones(3)})
  with pytest.raises(TypeError, match="leaves must be arrays or MXFP4 QArrays"):
    interop.save_safetensors(tmp_path / "y.safetensors", {"a": "text"})
