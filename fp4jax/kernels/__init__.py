"""fp4jax's Pallas kernels, each beside the pure-JAX reference it must equal.

* :mod:`fp4jax.kernels.quantize`: fused quantize (MX, NVFP4; rows / columns / both from
  one read; stochastic rounding; a fused 16-point Hadamard). Reference:
  :func:`fp4jax.encode.quantize_reference`, bit for bit.
* :mod:`fp4jax.kernels.operand`: GEMM-ready values (BF16) of MX operands from one read
  (rows / columns / both). Reference: :func:`fp4jax.kernels.operand.gemm_operand_reference`,
  bit for bit (NaN payload aside); :mod:`fp4jax.kernels.operand_tuning` holds the measured
  tile and emitter choices the dispatch reads.
* :mod:`fp4jax.kernels.unpack`: packed E2M1 + 8-bit scales -> K-major E4M3 / BF16 GEMM
  operands. Reference: :func:`fp4jax.kernels.unpack.gemm_operand_reference`, bit for bit.
* :mod:`fp4jax.kernels.matmul`: FP4 GEMMs of two QArrays on Hopper (unpack + XLA's FP8 or
  BF16 GEMM) and Blackwell (cuDNN). Reference: :func:`fp4jax.kernels.matmul.matmul_reference`,
  within float32 accumulation order.
* :mod:`fp4jax.kernels.weight_only`: BF16 activations x packed FP4 weights. Reference:
  :func:`fp4jax.kernels.weight_only.weight_only_reference`, within accumulation order.

Kernels run what they are told: none of them looks at the device. Which one runs for a
call, and whether in interpret mode, is decided in :mod:`fp4jax.dispatch`.
"""
