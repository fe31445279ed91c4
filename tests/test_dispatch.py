"""fp4jax/dispatch.py: the one place that looks at devices and chooses implementations."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fp4jax
from fp4jax import dispatch
from fp4jax.dispatch import DeviceFacts, GemmImpl, QuantizeImpl
from matmul_checks import MX, NV, operands

CPU, HOPPER, BLACKWELL = DeviceFacts("cpu"), DeviceFacts("gpu", 9, "H200"), DeviceFacts(
    "gpu", 10, "B200")


@pytest.mark.parametrize("name,facts,policy,expected", [
    ("mxfp4", CPU, "xla", GemmImpl.BF16_EXACT),
    ("mxfp4", CPU, "pallas", GemmImpl.FP8_XLA),          # kernels in interpret mode
    ("mxfp4", HOPPER, "auto", GemmImpl.FP8_XLA),
    ("mxfp4_short_k", HOPPER, "auto", GemmImpl.BF16_XLA),
    ("mxfp4_short_k", HOPPER, "pallas", GemmImpl.FP8_XLA),
    ("nvfp4", HOPPER, "auto", GemmImpl.BF16_XLA),
    ("nvfp4", HOPPER, "xla", GemmImpl.REFERENCE),        # tensor scales stay folded in
    ("mxfp4", BLACKWELL, "auto", GemmImpl.BLACKWELL),
    ("nvfp4", BLACKWELL, "auto", GemmImpl.BLACKWELL),
    ("mxfp8_e4m3", HOPPER, "auto", GemmImpl.BF16_EXACT),
    ("mxfp8_e4m3", BLACKWELL, "auto", GemmImpl.BF16_EXACT),
    ("int8_channel", HOPPER, "auto", GemmImpl.REFERENCE),
])
def test_choose_gemm_picks_the_documented_path(name, facts, policy, expected, rng):
  k = dispatch.FP8_MIN_K // 2 if name.endswith("_short_k") else dispatch.FP8_MIN_K
  spec = fp4jax.get_spec(name.removesuffix("_short_k"))
  a, b = operands(rng, 32, k, 32, spec, spec)
  choice = dispatch.choose_gemm(a, b, policy, facts=facts)
  assert choice.impl is expected
  assert choice.interpret == (expected.uses_kernels and not facts.on_gpu)


def test_a_contraction_the_unpack_kernel_cannot_tile_stays_on_bf16_tensor_cores(rng):
  # NVFP4's wgrad of 34 tokens pads M to 48: not a multiple of the unpack kernel's 32-wide
  # K tiles (found by the GPU test command: it used to reach the kernel and fail there).
  x = jnp.asarray(rng.standard_normal((48, 64)).astype(np.float32))
  a, b = fp4jax.quantize(x.T, NV, -1), fp4jax.quantize(x, NV, -2)
  choice = dispatch.choose_gemm(a, b, "auto", facts=HOPPER)
  assert choice.impl is GemmImpl.BF16_EXACT, choice
  assert "multiple of 32" in fp4jax.kernels.matmul.unsupported_reason(a, b, "bf16_xla")


def test_choose_gemm_without_quantized_operands_is_the_reference(rng):
  a, _ = operands(rng, 32, 64, 32, MX, MX)
  assert dispatch.choose_gemm(a, None, "auto", facts=HOPPER).impl is GemmImpl.REFERENCE


@pytest.mark.parametrize("facts,policy,shape,expected", [
    (CPU, "xla", (64, 128), QuantizeImpl.XLA),
    (CPU, "auto", (64, 128), QuantizeImpl.XLA),
    (CPU, "pallas", (64, 128), QuantizeImpl.PALLAS),
    (HOPPER, "auto", (64, 128), QuantizeImpl.PALLAS),
    (HOPPER, "auto", (2, 64, 128), QuantizeImpl.XLA),   # kernels take 2D operands
])
def test_choose_quantize(facts, policy, shape, expected):
  choice = dispatch.choose_quantize(shape, jnp.float32, MX, -1, policy, facts=facts)
  assert choice.impl is expected
  assert choice.interpret == (expected is QuantizeImpl.PALLAS and not facts.on_gpu)
  if expected is QuantizeImpl.XLA and policy != "xla":
    assert choice.reason  # a fallback always says why


def test_pallas_policy_names_the_unsupported_configuration():
  with pytest.raises(ValueError, match="granularity 'channel'.*impl='auto'"):
    dispatch.choose_quantize((64, 128), jnp.float32, fp4jax.get_spec("int8_channel"), -1,
                             "pallas", facts=HOPPER)
  with pytest.raises(ValueError, match="pad=True"):
    dispatch.choose_quantize((64, 128), jnp.float32, MX, -1, "pallas", pad=True, facts=CPU)
  with pytest.raises(ValueError, match="impl must be one of"):
    dispatch.choose_quantize((64, 128), jnp.float32, MX, -1, "triton", facts=CPU)


def test_policy_context_and_resolution():
  assert dispatch.current_policy() == "auto"
  with fp4jax.gemm_impl("xla"):
    assert dispatch.current_policy() == "xla"
    assert dispatch.resolve_policy(None, HOPPER) == "xla"
    assert dispatch.resolve_policy("pallas", HOPPER) == "pallas"
  assert dispatch.resolve_policy(None, HOPPER) == "auto"
  assert dispatch.resolve_policy(None, CPU) == "xla"   # off a GPU "auto" is the reference
  with pytest.raises(ValueError, match="impl must be one of"):
    with fp4jax.gemm_impl("cuda"):
      pass


def test_device_facts_describe_this_machine():
  facts = dispatch.device_facts()
  assert facts.platform == jax.devices()[0].platform
  assert facts.on_gpu == (facts.platform == "gpu")
  assert (facts.generation > 0) == facts.on_gpu
  assert " " not in facts.slug


def test_each_decision_is_logged_once(caplog, rng):
  dispatch._LOGGED.clear()
  a, b = operands(rng, 32, 64, 32, NV, NV)
  with caplog.at_level(logging.DEBUG, logger="fp4jax"):
    for _ in range(3):
      dispatch.choose_gemm(a, b, "auto", facts=HOPPER)
      dispatch.choose_quantize((64, 128), jnp.float32, MX, -1, "auto", facts=CPU)
  gemm = [m for m in caplog.messages if "GEMM" in m]
  quant = [m for m in caplog.messages if "quantize" in m]
  assert len(gemm) == 1 and "bf16_xla" in gemm[0], caplog.messages
  assert len(quant) == 1 and "not on a GPU" in quant[0], caplog.messages


def test_nothing_else_inspects_devices():
  # The dispatch is the only module of the library that asks JAX about devices.
  import pathlib
  root = pathlib.Path(fp4jax.__file__).parent
  offenders = []
  for path in root.rglob("*.py"):
    text = path.read_text()
    if path.name in ("dispatch.py", "distributed.py", "report.py"):
      continue  # distributed builds meshes from jax.devices(); report prints the platform
    for needle in ("default_backend()", "jax.devices()", "compute_capability"):
      if needle in text:
        offenders.append(f"{path.relative_to(root)}: {needle}")
  assert not offenders, offenders


def test_quantize_through_the_dispatch_equals_the_reference(rng):
  x = jnp.asarray(rng.standard_normal((64, 128)).astype(np.float32))
  for impl in ("xla", "auto", "pallas"):
    q = fp4jax.quantize(x, "nvfp4", impl=impl)
    ref = fp4jax.encode.quantize_reference(x, "nvfp4")
    np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(ref.codes))
    np.testing.assert_array_equal(np.asarray(q.scales.astype(jnp.float32)),
                                  np.asarray(ref.scales.astype(jnp.float32)))


@pytest.mark.parametrize("facts,policy,shape,n,dtype,want,why", [
    (CPU, "auto", (16, 256), 64, jnp.bfloat16, "DEQUANTIZE", "not on a GPU"),
    (HOPPER, "auto", (16, 256), 64, jnp.bfloat16, "KERNEL", None),
    (HOPPER, "auto", (256, 256), 64, jnp.bfloat16, "KERNEL", None),
    (HOPPER, "auto", (257, 256), 64, jnp.bfloat16, "DEQUANTIZE", "M = 257 > 256"),
    (HOPPER, "auto", (16, 256), 64, jnp.float32, "DEQUANTIZE", "float32 activations"),
    (HOPPER, "auto", (16, 256), 10, jnp.bfloat16, "DEQUANTIZE", "no tile divides"),
    (HOPPER, "xla", (16, 256), 64, jnp.bfloat16, "DEQUANTIZE", "the xla policy"),
    (HOPPER, "pallas", (16, 256), 64, jnp.bfloat16, "KERNEL", None),
    (CPU, "pallas", (16, 256), 64, jnp.bfloat16, "KERNEL", None),
    (HOPPER, "pallas", (16, 256), 10, jnp.bfloat16, "DEQUANTIZE", "no tile divides"),
])
def test_choose_weight_only(facts, policy, shape, n, dtype, want, why):
  w = fp4jax.quantize(jnp.ones((256, n)), "mxfp4", axis=-2)
  c = dispatch.choose_weight_only(shape, w, policy, strict=False, x_dtype=dtype, facts=facts)
  assert c.impl is dispatch.WeightOnlyImpl[want]
  assert (c.reason is None) if why is None else why in c.reason
  assert c.interpret == (want == "KERNEL" and facts is CPU)
  if why == "no tile divides" and policy == "pallas":
    with pytest.raises(ValueError, match="impl='pallas': no tile divides"):
      dispatch.choose_weight_only(shape, w, policy, facts=facts)


def test_hadamard_method_override_applies_inside_only():
  facts = dispatch.device_facts()
  before = facts.hadamard_method
  with dispatch.hadamard_method("dot_bf16"):
    assert dispatch.device_facts().hadamard_method == "dot_bf16"
    with dispatch.hadamard_method("butterfly"):
      assert facts.hadamard_method == "butterfly"
    assert facts.hadamard_method == "dot_bf16"
  assert facts.hadamard_method == before
  with pytest.raises(ValueError, match="method must be one of"):
    with dispatch.hadamard_method("fft"):
      pass


def test_hadamard_method_by_device():
  # BF16 tensor-core GEMMs on a GPU (kernels/NOTES.md, "fourth step"), the fixed-order
  # butterfly elsewhere.
  assert DeviceFacts("gpu", 9, "NVIDIA H200").hadamard_method == "dot_bf16"
  assert DeviceFacts("cpu").hadamard_method == "butterfly"
