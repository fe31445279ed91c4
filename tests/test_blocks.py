"""fp4jax/blocks.py: the one alignment rule (which lengths must be block multiples)."""

import pytest

import fp4jax
from fp4jax import blocks, recipes


@pytest.mark.parametrize("name,axis,expected", [
    ("mxfp4", -1, 32), ("mxfp4", -2, 32), ("nvfp4", -1, 16), ("int4_channel", -1, 1),
    ("fp8_e4m3_tensor", -1, 1)])
def test_required_multiple(name, axis, expected):
  assert blocks.required_multiple(fp4jax.get_spec(name), axis) == expected
  assert blocks.required_multiple(None, axis) == 1


def test_tiles_require_each_side_along_its_own_axis():
  spec = fp4jax.get_spec("nvfp4_2d").replace(tile=(8, 32))
  assert blocks.required_multiple(spec, -2) == 8 and blocks.required_multiple(spec, 0) == 8
  assert blocks.required_multiple(spec, -1) == 32
  assert blocks.alignment([spec]) == 32


def test_recipe_alignment_covers_blocks_tiles_and_hadamard_sizes():
  assert recipes.alignment("bf16") == 1
  assert recipes.alignment("mxfp4") == 32
  assert recipes.alignment("nvfp4") == 16                       # 1x16, 16x16, RHT-16
  assert recipes.alignment(recipes.get("nvfp4").replace(hadamard_wgrad=64)) == 64
  assert blocks.alignment([None, fp4jax.get_spec("nvfp4")], 24, None) == 48
  # fp4jax.distributed shards parameters on the same rule
  assert fp4jax.distributed.recipe_alignment("quartet") == recipes.alignment("quartet")
