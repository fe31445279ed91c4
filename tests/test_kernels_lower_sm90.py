"""The Pallas kernels whose in-kernel code changes most often lower to Triton IR for an
H200 (sm_90) on a machine without a GPU.

Interpret mode (what CPU runs test) checks a kernel's values, not whether Pallas' Triton
lowering accepts its operations (e.g. ``tt.join`` takes two operands stacked along the
last axis only). Exporting for ``platforms=["cuda"]`` runs that lowering in Python; only
``get_gpu_info`` needs a GPU, so it is answered with the H200's facts
(``kernels/NOTES.md``, "Checking that kernels lower for sm_90 without a GPU"). Triton's own
compilation to PTX still needs the GPU machine (``tools/test_gpu.sh``)."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from jax import export

# Private JAX modules (the only way to answer get_gpu_info without a GPU): if a JAX
# release moves them, this file is skipped with that reason rather than breaking the
# collection of the whole suite; the lowering is then checked on the GPU machine only.
_WHY = "JAX moved its Pallas Triton gpu_info; update this test's patch"
try:  # jax >= 0.12.1 keeps gpu_info beside the backends, 0.11-0.12.0 under pallas/triton
  from jax._src import gpu_info
except ImportError:
  gpu_info = pytest.importorskip("jax._src.pallas.triton.gpu_info", reason=_WHY)
pallas_call_registration = pytest.importorskip(
    "jax._src.pallas.triton.pallas_call_registration", reason=_WHY)

from fp4jax.kernels import operand as ko
from fp4jax.kernels import quantize as kq
from fp4jax.spec import get_spec

TRITON_CALL = "__gpu$xla.gpu.triton"
MX_SR = get_spec("mxfp4").replace(rounding="stochastic")
NV_SR = get_spec("nvfp4").replace(rounding="stochastic")


@pytest.fixture
def h200(monkeypatch):
  info = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H200)
  monkeypatch.setattr(pallas_call_registration.gpu_info_lib, "get_gpu_info", lambda: info)


def _triton_calls(fn, *shapes) -> int:
  exp = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[
      export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(*shapes)
  return exp.mlir_module().count(f"@{TRITON_CALL}")


X = jax.ShapeDtypeStruct((512, 1024), jnp.bfloat16)


def _operand(orient, spec, per_word):
  cfg = dataclasses.replace(ko.DEFAULT_CONFIG[orient], hash_per_word=per_word)
  key = jax.random.key(0)
  if orient == "both":
    return lambda x: ko.gemm_operand_both(x, spec, spec, key, key, config=cfg)
  return lambda x: ko.gemm_operand(x, spec, -1 if orient == "rows" else -2, key, config=cfg)


@pytest.mark.parametrize("orient", ["rows", "cols", "both"])
@pytest.mark.parametrize("rounding,per_word", [("nearest", True), ("stochastic", True),
                                               ("stochastic", False)])
def test_operand_kernel_lowers(h200, orient, rounding, per_word):
  spec = get_spec("mxfp4").replace(rounding=rounding)
  assert _triton_calls(_operand(orient, spec, per_word), X) == 1


@pytest.mark.parametrize("spec,axis,hadamard", [
    (MX_SR, -1, None), (MX_SR, -2, None), (NV_SR, -1, None),
    (MX_SR, -1, 32),                 # the fused Hadamard along rows
    (get_spec("mxfp4"), -2, 32)])    # along columns: row phases (SR there is refused)
def test_quantize_kernel_lowers(h200, spec, axis, hadamard):
  fn = lambda x: kq.quantize(x, spec, axis, jax.random.key(0), hadamard_block=hadamard).codes
  assert _triton_calls(fn, X) >= 1


def test_quantize_both_lowers(h200):
  fn = lambda x: kq.quantize_both(x, MX_SR, jax.random.key(0))
  assert _triton_calls(fn, X) == 1


@pytest.mark.parametrize("axis,hadamard", [(-1, None), (-2, None), (-2, 16)])
@pytest.mark.parametrize("spec", [get_spec("nvfp4"), NV_SR], ids=["nearest", "stochastic"])
def test_float_scale_operand_kernels_lower(h200, spec, axis, hadamard):
  from fp4jax.kernels import float_scale_operand as kf
  fn = lambda x: kf.gemm_operand(x, spec, axis, jax.random.key(0),
                                 hadamard_key=jax.random.key(1), hadamard_block=hadamard)[0]
  # The element pass, and with a transform the block-maxima pass too.
  assert _triton_calls(fn, X) == (2 if hadamard else 1)

