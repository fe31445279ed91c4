"""fp4jax.packing: OCP nibble order and FP6 4-in-3 packing along any axis."""

import jax.numpy as jnp
import numpy as np
import pytest

from fp4jax import packing


def test_nibble_layout_low_first():
  codes = jnp.asarray([[1, 2, 3, 4]], jnp.uint8)
  np.testing.assert_array_equal(packing.pack(codes, 4), [[0x21, 0x43]])


@pytest.mark.parametrize("bits", [4, 6, 8])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_roundtrip_any_axis(bits, axis, rng):
  codes = rng.integers(0, 1 << bits, (8, 12, 16)).astype(np.uint8)
  p = packing.pack(jnp.asarray(codes), bits, axis)
  assert p.shape[axis] == packing.packed_length(codes.shape[axis], bits)
  np.testing.assert_array_equal(packing.unpack(p, bits, axis), codes)


def test_fp6_bitstream():
  codes = jnp.asarray([0b000001, 0b000010, 0b000011, 0b111111], jnp.uint8)
  word = 1 | (2 << 6) | (3 << 12) | (63 << 18)
  np.testing.assert_array_equal(packing.pack(codes, 6), [word & 255, (word >> 8) & 255, word >> 16])


def test_odd_length_error_names_fix():
  with pytest.raises(ValueError, match="pad=True"):
    packing.pack(jnp.zeros((3,), jnp.uint8), 4)
