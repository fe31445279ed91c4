"""FP4/FP8 training recipes as data: one spec per operand of the three GEMMs.

A linear layer ``Y = A W`` (A: M x K activations, W: K x N weights) costs three GEMMs:

* forward  ``Y  = A W``         contracts K: operands ``fwd_lhs`` (A) and ``fwd_rhs`` (W)
* dgrad    ``dA = dY W^T``      contracts N: operands ``dgrad_grad`` (dY) and ``dgrad_rhs`` (W)
* wgrad    ``dW = A^T dY``      contracts M: operands ``wgrad_lhs`` (A) and ``wgrad_grad`` (dY)

Each operand is quantized with its own :class:`~fp4jax.spec.QuantSpec` (``None`` keeps it
in high precision), always blocked along that GEMM's contraction axis. Accumulation is
float32. The other fields choose the estimator of the forward quantizers, TetraJet's
double quantization, random Hadamard transforms per GEMM, Microsoft's outlier
clamping/compensation and asymmetric activations, and which layers a model rewrite
keeps in BF16 by default.

``fp4jax.recipes.get(name)`` returns a frozen :class:`Recipe`; build variants with
``recipe.replace(...)`` (e.g. NVIDIA's ablations: ``hadamard_wgrad=None``).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Iterator

from fp4jax import blocks
from fp4jax.spec import QuantSpec, get_spec

OPERANDS = ("fwd_lhs", "fwd_rhs", "dgrad_grad", "dgrad_rhs", "wgrad_lhs", "wgrad_grad")


@dataclasses.dataclass(frozen=True)
class Recipe:
  """How each operand of the forward, dgrad and wgrad GEMMs is quantized.

  Attributes:
    name: recipe name.
    fwd_lhs, fwd_rhs, dgrad_grad, dgrad_rhs, wgrad_lhs, wgrad_grad: operand specs (None =
      high precision). Stochastic rounding is a spec's ``rounding="stochastic"``.
    lhs_estimator, rhs_estimator: surrogate derivative of the forward quantizers
      (:mod:`fp4jax.estimators`), ``estimator_params`` its keyword arguments.
    double_quant: the backward GEMMs re-quantize the *forward-quantized* A and W along
      their new contraction axis (TetraJet), instead of the original A and W.
    hadamard_fwd, hadamard_dgrad, hadamard_wgrad: random Hadamard block size applied to
      both operands of that GEMM along its contraction axis, or None.
    occ_quantile: outlier clamping and compensation of A at this quantile, or None.
    lhs_asymmetric: quantize A with a per-block shift (Microsoft's asymmetric variant).
    keep_high_precision: module-path regexes a model rewrite leaves in BF16 by default.
    reference: the paper, and where fp4jax deviates from it.
  """

  name: str
  fwd_lhs: QuantSpec | None = None
  fwd_rhs: QuantSpec | None = None
  dgrad_grad: QuantSpec | None = None
  dgrad_rhs: QuantSpec | None = None
  wgrad_lhs: QuantSpec | None = None
  wgrad_grad: QuantSpec | None = None
  lhs_estimator: str = "ste"
  rhs_estimator: str = "ste"
  estimator_params: tuple[tuple[str, float], ...] = ()
  double_quant: bool = False
  hadamard_fwd: int | None = None
  hadamard_dgrad: int | None = None
  hadamard_wgrad: int | None = None
  occ_quantile: float | None = None
  lhs_asymmetric: bool = False
  keep_high_precision: tuple[str, ...] = ()
  reference: str = ""

  def __post_init__(self):
    for op in OPERANDS:
      v = getattr(self, op)
      if v is not None:
        object.__setattr__(self, op, get_spec(v))
    from fp4jax.estimators import get_estimator  # validates the names
    get_estimator(self.lhs_estimator)
    get_estimator(self.rhs_estimator)
    for h in (self.hadamard_fwd, self.hadamard_dgrad, self.hadamard_wgrad):
      if h is not None and (h < 1 or h & (h - 1)):
        raise ValueError(f"Hadamard block sizes must be powers of two, got {h}")

  def replace(self, **changes) -> "Recipe":
    return dataclasses.replace(self, **changes)

  @property
  def is_identity(self) -> bool:
    """No quantization and no transform at all: exactly ``lax.dot_general``."""
    return (all(getattr(self, op) is None for op in OPERANDS) and self.occ_quantile is None
            and not self.lhs_asymmetric
            and self.hadamard_fwd is None and self.hadamard_dgrad is None
            and self.hadamard_wgrad is None)

  @property
  def needs_key(self) -> bool:
    """Stochastic rounding or a random Hadamard transform needs a ``jax.random`` key."""
    sr = any(getattr(self, op) is not None and getattr(self, op).rounding == "stochastic"
             for op in OPERANDS)
    return sr or any(h is not None for h in (self.hadamard_fwd, self.hadamard_dgrad,
                                             self.hadamard_wgrad))


def _sr(name: str, **kw) -> QuantSpec:
  return get_spec(name).replace(rounding="stochastic", **kw)


_MX4, _NV4, _NV4_2D = get_spec("mxfp4"), get_spec("nvfp4"), get_spec("nvfp4_2d")
_E4M3_T, _E5M2_T = get_spec("fp8_e4m3_tensor"), get_spec("fp8_e5m2_tensor")
_MX8 = get_spec("mxfp8_e4m3").replace(scale_mode="rceil")
_MX6_E2M3, _MX6_E3M2 = get_spec("mxfp6_e2m3"), get_spec("mxfp6_e3m2")
_FP4_CHANNEL = QuantSpec("e2m1", "fp32", "channel", scale_mode="amax", name="fp4_channel")
_FP8_CHANNEL = get_spec("fp8_e4m3_channel")

RECIPES: dict[str, Recipe] = {
    "bf16": Recipe(
        "bf16", reference="No quantization: exactly jax.lax.dot_general, bit for bit."),
    "fp8": Recipe(
        "fp8", _E4M3_T, _E4M3_T, _E5M2_T, _E4M3_T, _E4M3_T, _E5M2_T,
        reference="FP8 current scaling (Micikevicius et al. 2022, 'FP8 Formats for Deep "
        "Learning'; Transformer Engine): per-tensor FP32 scale amax/max, E4M3 for "
        "activations and weights, E5M2 for gradients."),
    "mxfp8": Recipe(
        "mxfp8", _MX8, _MX8, _MX8, _MX8, _MX8, _MX8,
        reference="MXFP8 (OCP MX v1.0; NVIDIA/torchao MXFP8 training): E4M3 elements for all "
        "six operands, 32-element blocks, E8M0 scales rounded up (rceil)."),
    "mxfp6": Recipe(
        "mxfp6", _MX6_E2M3, _MX6_E2M3, _MX6_E3M2, _MX6_E2M3, _MX6_E2M3, _MX6_E3M2,
        reference="MXFP6 (OCP MX v1.0): E2M3 for activations and weights, E3M2 (more range) "
        "for gradients, 32-element blocks, E8M0 floor scales; the middle rung of "
        "heterogeneous MXFP8/MXFP6/MXFP4 models."),
    "mxfp4": Recipe(
        "mxfp4", _MX4, _MX4, _MX4, _MX4, _MX4, _MX4,
        reference="Plain OCP MXFP4 for all six operands: E2M1, 32-blocks, E8M0 floor scales, "
        "nearest-even rounding, straight-through estimator."),
    "tetrajet": Recipe(
        "tetrajet", _MX4, _MX4, _sr("mxfp4"), _MX4, _MX4, _sr("mxfp4"), double_quant=True,
        reference="TetraJet (Chen et al. 2025, 'Oscillation-Reduced MXFP4 Training for "
        "Vision Transformers', arXiv 2502.20853): MXFP4 in all three GEMMs; the backward "
        "GEMMs re-quantize the forward-quantized activations and weights along their new "
        "contraction axis (double quantization); gradients use stochastic rounding. Q-EMA "
        "and Q-Ramping are optimizer-side (fp4jax.optim)."),
    "nvfp4": Recipe(
        "nvfp4", _NV4, _NV4_2D, _sr("nvfp4"), _NV4_2D, _NV4, _sr("nvfp4"),
        hadamard_wgrad=16, keep_high_precision=(r"(^|/)(head|lm_head|output|final)",),
        reference="NVIDIA, 'Pretraining Large Language Models with NVFP4' (arXiv 2509.25149): "
        "NVFP4 (E2M1, 16-blocks, E4M3 block scale, FP32 tensor scale); 16x16 2D tiles for "
        "weights, so the same quantized W serves forward and dgrad; 16-point random "
        "Hadamard transform on the wgrad inputs; stochastic rounding on gradients; the "
        "last layers stay in BF16 (keep_high_precision; the paper also keeps the first "
        "blocks' last layers, set by rules). fp4jax draws Hadamard signs per step from "
        "the key rather than once per run."),
    "fp4_all_the_way": Recipe(
        "fp4_all_the_way", _NV4, _NV4, _sr("nvfp4"), _sr("nvfp4"), _sr("nvfp4"), _sr("nvfp4"),
        reference="Chmiel et al. 2025, 'FP4 All the Way: Fully Quantized Training of LLMs' "
        "(arXiv 2505.19115): NVFP4 block 16 with E4M3 scales for all operands, "
        "nearest rounding forward, stochastic rounding for the backward operands."),
    "quartet": Recipe(
        "quartet", _MX4, _MX4, _sr("mxfp4"), _sr("mxfp4"), _sr("mxfp4"), _sr("mxfp4"),
        hadamard_fwd=32, hadamard_dgrad=32, hadamard_wgrad=32,
        reference="Castro et al. 2025, 'Quartet: Native FP4 Training Can Be Optimal for "
        "LLMs' (arXiv 2505.14669): block-32 Hadamard + MXFP4 on both operands of every "
        "GEMM, nearest rounding forward, stochastic rounding backward. Deviation: the "
        "forward uses plain E8M0 floor scales, not QuEST's RMS-based clipping."),
    "msfp4": Recipe(
        "msfp4", _FP4_CHANNEL, _FP4_CHANNEL, _FP8_CHANNEL, _FP8_CHANNEL, _FP8_CHANNEL,
        _FP8_CHANNEL, rhs_estimator="dge", estimator_params=(("k", 5.0), ("max_grad", 3.0)),
        occ_quantile=0.99,
        reference="Wang et al. 2025, 'Optimizing Large Language Model Training Using FP4 "
        "Quantization' (arXiv 2501.17116): E2M1 with absmax FP32 scales per token "
        "(activations) and per output channel (weights), the DGE estimator (k=5, clip 3) "
        "for weights, outlier clamping at the 0.99 quantile with a high-precision sparse "
        "residual; backward GEMMs in FP8 E4M3 per-channel (the paper's mixed-precision "
        "setting). The asymmetric variant is 'msfp4_asym'."),
}
RECIPES["msfp4_asym"] = RECIPES["msfp4"].replace(name="msfp4_asym", lhs_asymmetric=True)


def alignment(recipe: str | Recipe) -> int:
  """The least common multiple of a recipe's block sizes, tile sides and Hadamard sizes
  (:func:`fp4jax.blocks.alignment`; 1 for an unquantized recipe). Every GEMM axis the
  recipe blocks (K, N, and the tokens M of wgrad, which qdot pads) and every FSDP shard
  boundary that is a multiple of it holds whole blocks."""
  r = get(recipe)
  return blocks.alignment([getattr(r, op) for op in OPERANDS], r.hadamard_fwd,
                          r.hadamard_dgrad, r.hadamard_wgrad)


def get(name: str | Recipe) -> Recipe:
  """A recipe by name (or the recipe itself)."""
  if isinstance(name, Recipe):
    return name
  if not isinstance(name, str):
    raise TypeError(f"recipe must be a name or a Recipe, got {type(name).__name__}")
  try:
    return RECIPES[name.lower()]
  except KeyError:
    raise ValueError(f"unknown recipe {name!r}; valid: {', '.join(sorted(RECIPES))}") from None


# ------------------------------------------------------------------- recipe override

_NO_OVERRIDE = object()
_OVERRIDE = contextvars.ContextVar("fp4jax_recipe_override", default=_NO_OVERRIDE)


@contextlib.contextmanager
def recipe_override(recipe: "str | Recipe | None") -> Iterator[None]:
  """Every quantized GEMM traced inside (:func:`fp4jax.qdot_general`, and so every layer
  of :mod:`fp4jax.linen` / :mod:`fp4jax.nnx`, convolutions included) uses ``recipe``
  instead of its own; ``None`` (or ``"bf16"``) runs them in high precision, exactly
  ``lax.dot_general``::

      eval_bf16 = jax.jit(lambda p, b: eval_step(p, b))   # a function of its own
      with fp4jax.recipe_override(None):          # evaluate without FP4
        metrics = eval_bf16(params, batch)        # first traced in here: BF16

  Like :func:`fp4jax.gemm_impl` it acts at **trace time**, and JAX's jit cache does not
  see it: a jitted function already traced (with the same input shapes) keeps the recipes
  it was first traced with, inside the context or not. Give the overridden computation a
  jitted function of its own, first called inside the context (as above). An override
  that rounds stochastically needs the layers' ``"quant"`` keys.
  """
  value = RECIPES["bf16"] if recipe is None else get(recipe)
  token = _OVERRIDE.set(value)
  try:
    yield
  finally:
    _OVERRIDE.reset(token)


def effective(recipe: "str | Recipe") -> Recipe:
  """``recipe`` resolved, or the active :func:`recipe_override`."""
  override = _OVERRIDE.get()
  return get(recipe) if override is _NO_OVERRIDE else override

