"""fp4jax: 4-bit (and 6/8-bit) block-scaled floating point for JAX.

>>> import fp4jax, jax.numpy as jnp
>>> q = fp4jax.quantize(jnp.ones((4, 64)), "mxfp4", axis=-1)
>>> y = fp4jax.dequantize(q)

The public namespace is curated here: functions at the top (``fp4jax.quantize`` is the
function), concepts as modules (``fp4jax.formats``, ``fp4jax.recipes``,
``fp4jax.dispatch``, ...). No function shares its name with a module of the package, so
``import fp4jax.<module>`` always means the module. Modules that need Flax or optax
(``linen``, ``nnx``, ``rules``, ``optim``, ``ptq``, ``checkpoint``, ``models``) load on
first use, so the numerics import without them.
"""

from fp4jax import (blocks, dispatch, distributed, encode, estimators, formats, hadamard,
                    recipes, scales)
from fp4jax import spec as spec_lib
from fp4jax.dispatch import gemm_impl
from fp4jax.recipes import recipe_override
from fp4jax.formats import (BF16_SCALE, E2M1, E2M3, E3M2, E4M3, E5M2, E8M0, FP32_SCALE, INT4,
                            INT8, MXINT8, UE4M3, ElementFormat, ScaleFormat, exmy, intn,
                            pow2_scale)
from fp4jax.gemm import fp4_matmul, weight_only_linear, weight_only_matmul
from fp4jax.qarray import QArray
from fp4jax.qdot import qdot_general, qeinsum, qmatmul
from fp4jax.qragged import qragged_dot
from fp4jax.quantization import dequantize, element_scales, fake_quant, quantize
from fp4jax.rounding import round_to_format
from fp4jax.spec import PRESETS, QuantSpec, get_spec

__version__ = "0.1.0"

# Flax/optax-facing modules load on first use, so the numerics import without Flax.
_LAZY = {"quantize_model": ("fp4jax.rules", "quantize_model"), "Rule": ("fp4jax.rules", "Rule"),
         "linen": ("fp4jax.linen", None), "nnx": ("fp4jax.nnx", None),
         "rules": ("fp4jax.rules", None), "optim": ("fp4jax.optim", None),
         "ptq": ("fp4jax.ptq", None), "checkpoint": ("fp4jax.checkpoint", None),
         "models": ("fp4jax.models", None), "interop": ("fp4jax.interop", None)}


def __getattr__(name):
  if name in _LAZY:
    import importlib
    mod_name, attr = _LAZY[name]
    mod = importlib.import_module(mod_name)
    return mod if attr is None else getattr(mod, attr)
  raise AttributeError(f"module 'fp4jax' has no attribute {name!r}")


__all__ = [
    "BF16_SCALE", "E2M1", "E2M3", "E3M2", "E4M3", "E5M2", "E8M0", "FP32_SCALE", "INT4", "INT8",
    "MXINT8", "UE4M3", "ElementFormat", "PRESETS", "QArray", "QuantSpec", "ScaleFormat",
    "blocks", "dequantize", "dispatch", "distributed", "element_scales", "encode",
    "estimators", "exmy", "fake_quant", "formats", "fp4_matmul", "gemm_impl", "get_spec", "recipe_override",
    "hadamard", "intn", "pow2_scale", "qdot_general", "qeinsum", "qmatmul", "qragged_dot", "quantize",
    "recipes", "round_to_format", "scales", "weight_only_linear", "weight_only_matmul", "quantize_model", "Rule",
    "linen", "nnx", "rules", "optim", "ptq", "checkpoint", "models", "interop",
]
