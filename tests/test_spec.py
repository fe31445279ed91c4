"""fp4jax/spec.py: QuantSpec.with_block_size, the one meaning of a block size."""

import jax.numpy as jnp
import numpy as np
import pytest

import fp4jax
from fp4jax import spec as spec_lib


def test_with_block_size_for_every_granularity():
  assert fp4jax.get_spec("mxfp4").with_block_size(16).block_size == 16
  tiles = fp4jax.get_spec("nvfp4_2d").with_block_size(32)
  assert tiles.granularity == "tile" and tiles.tile == (32, 32)
  channel = fp4jax.get_spec("int4_channel").with_block_size(64)
  assert channel.granularity == "block" and channel.block_size == 64
  with pytest.raises(ValueError, match="one scale per tensor, no blocks"):
    fp4jax.get_spec("fp8_e4m3_tensor").with_block_size(32)
  for bad in (0, -16, 2.5, True):
    with pytest.raises(ValueError, match="block_size must be a positive int"):
      fp4jax.get_spec("mxfp4").with_block_size(bad)


def test_quantize_block_size_argument_uses_the_same_rule(rng):
  x = jnp.asarray(rng.standard_normal((64, 64)).astype(np.float32))
  q = fp4jax.quantize(x, "nvfp4_2d", block_size=32)   # a tile spec: 32x32 tiles
  assert q.spec.tile == (32, 32) and q.scales.shape == (2, 2)
  q = fp4jax.quantize(x, "int8_channel", block_size=16)
  assert q.spec.granularity == "block" and q.scales.shape == (64, 4)
  with pytest.raises(ValueError, match="no blocks"):
    fp4jax.quantize(x, "int8_tensor", block_size=16)


def test_resolve_spec_applies_overrides_and_keeps_the_rest():
  s = spec_lib.resolve_spec("nvfp4", block_size=32, rounding="stochastic")
  assert (s.block_size, s.rounding, s.tensor_scale) == (32, "stochastic", "amax")
  assert spec_lib.resolve_spec("mxfp4") is fp4jax.get_spec("mxfp4")
