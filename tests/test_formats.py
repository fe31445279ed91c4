"""fp4jax.formats: the format table and generic ExMy / INT formats."""

import math

import ml_dtypes
import numpy as np
import pytest

import fp4jax
from fp4jax import formats as F

ML_DTYPES = {"e2m1": ml_dtypes.float4_e2m1fn, "e2m3": ml_dtypes.float6_e2m3fn,
             "e3m2": ml_dtypes.float6_e3m2fn, "e4m3": ml_dtypes.float8_e4m3fn,
             "e5m2": ml_dtypes.float8_e5m2}


@pytest.mark.parametrize("name", sorted(ML_DTYPES))
def test_every_code_decodes_like_ml_dtypes(name):
  fmt = F.get_element_format(name)
  dt = ML_DTYPES[name]
  for code in range(1 << fmt.bits):
    ours = fmt.code_to_float(code)
    ref = float(np.array([code], np.uint8).view(dt)[0])
    assert (math.isnan(ours) and math.isnan(ref)) or ours == ref, (name, code, ours, ref)


@pytest.mark.parametrize("name,max_value,emax", [
    ("e2m1", 6.0, 2), ("e2m3", 7.5, 2), ("e3m2", 28.0, 4), ("e4m3", 448.0, 8),
    ("e5m2", 57344.0, 15), ("int4", 7.0, 2), ("int8", 127.0, 6), ("mxint8", 127 / 64, 0)])
def test_spec_constants(name, max_value, emax):
  fmt = F.get_element_format(name)
  assert fmt.max_value == max_value
  assert fmt.emax == emax  # OCP MX 'emax': floor(log2(max normal))


def test_generic_exmy_research_formats():
  e1m2 = F.get_element_format("e1m2")
  assert e1m2.grid() == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5]
  e3m0 = F.get_element_format("e3m0")
  assert e3m0.grid() == [0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0]
  fn = F.exmy(3, 2, special="fn")
  assert fn.nan_code == 31 and fn.max_value == 24.0


def test_int_formats_are_uniform_grids():
  assert F.INT4.grid() == [float(i) for i in range(8)]
  assert F.MXINT8.grid() == [i / 64 for i in range(128)]


@pytest.mark.parametrize("bad,match", [
    (dict(ebits=0, mbits=3), "ebits"), (dict(ebits=5, mbits=3), "at most 8 bits"),
    (dict(ebits=3, mbits=0, special="fn"), "mbits >= 1")])
def test_invalid_formats_raise(bad, match):
  with pytest.raises(ValueError, match=match):
    F.exmy(**bad)


def test_elements_wider_than_8_bits_are_rejected_by_specs():
  with pytest.raises(ValueError, match="at most 8 bits"):
    fp4jax.QuantSpec(F.BF16_GRID, "e8m0")


def test_unknown_names_list_valid_ones():
  with pytest.raises(ValueError, match="valid names"):
    F.get_element_format("fp5")
  with pytest.raises(ValueError, match="valid names"):
    F.get_scale_format("e9m9")


def test_scale_formats():
  assert F.E8M0.min_exp == -127 and F.E8M0.max_exp == 127 and F.E8M0.nan_code == 255
  assert F.UE4M3.max_value == 448.0 and F.UE4M3.min_normal == 2.0**-6
  assert F.get_scale_format("e5m0").max_exp == 15
