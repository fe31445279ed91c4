"""Which implementation runs for each quantize and each GEMM: the one place that looks at
devices.

A maintainer who asks "which code runs for this GEMM on this device?" reads this module.

Vocabulary
----------
* :data:`POLICIES`, what users set (``fp4jax.gemm_impl(...)``, ``quantize(impl=...)``,
  ``qdot_general(impl=...)``):

  - ``"xla"``: pure JAX, never a kernel; the reference, bit for bit.
  - ``"auto"`` (the default): the measured-fastest exact implementation for the device;
    off a GPU it is ``"xla"``.
  - ``"pallas"``: the Pallas kernels wherever they take the configuration, in interpret
    mode off a GPU (how CPU tests run them); an unsupported quantize is an error.
  - ``"fused"``: GEMM-ready operands emitted inside XLA's fusions
    (:mod:`fp4jax.qdot_fused`) wherever the recipe allows, on any device; the reference
    elsewhere. ``"auto"`` picks it on Hopper.

* :class:`OperandPath` (how a quantized layer's operands reach its GEMMs),
  :class:`QuantizeImpl` and :class:`GemmImpl`, what actually runs; each member's
  docstring says where its code is.

Invariants
----------
* Only :func:`device_facts` inspects devices. Kernels run what they are told (including
  ``interpret``); :mod:`fp4jax.quantization` asks :func:`choose_quantize` and
  :mod:`fp4jax.gemm` asks :func:`choose_gemm`, for ``fp4jax.quantize``, for every GEMM of
  ``qdot`` (so for every Flax layer) and for ``fp4jax.fp4_matmul``.
* Every implementation computes the reference's numbers: quantize kernels bit for bit,
  GEMMs up to float32 accumulation order (and, for tensor-scaled operands off the ``"xla"``
  policy, where the FP32 tensor scale is applied: one rounding per block scale).
* Each distinct decision is logged once, at DEBUG, on the ``"fp4jax"`` logger.
* Choices happen at trace time: a function jit-compiled before a policy change keeps the
  implementation it was traced with.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import enum
import logging
from typing import Any, Iterator, NamedTuple

import jax
import jax.numpy as jnp

from fp4jax import qdot_fused
from fp4jax.hadamard import HADAMARD_METHODS
from fp4jax import spec as spec_lib
from fp4jax.kernels import matmul as kernel_matmul
from fp4jax.kernels import operand as kernel_operand
from fp4jax.kernels import operand_tuning
from fp4jax.kernels import quantize as kernel_quantize
from fp4jax.kernels import weight_only as kernel_weight_only
from fp4jax.qarray import QArray
from fp4jax.spec import QuantSpec

log = logging.getLogger("fp4jax")

POLICIES = ("xla", "auto", "pallas", "fused")
# The contraction length from which "auto" takes the FP8 GEMM on Hopper: XLA's FP8 GEMM
# beats its BF16 one at K = 8192 (1.45x for the whole path, H100) but loses at ViT-S's
# K = 384 (0.30x against 0.79x): kernels/NOTES.md.
FP8_MIN_K = 2048
BLACKWELL_GENERATION = 10   # compute capability major of sm_100 (native FP4 GEMMs)
HOPPER_GENERATION = 9       # FP8 tensor cores (sm_90): the unpack-to-E4M3 GEMM pays from here


# ------------------------------------------------------------------------ device facts


@dataclasses.dataclass(frozen=True)
class DeviceFacts:
  """What the choices depend on, read once per call from the default device."""

  platform: str          # "cpu", "gpu", "tpu"
  generation: int = 0    # GPU compute capability major (9 Hopper, 10 Blackwell); 0 elsewhere
  kind: str = ""         # e.g. "NVIDIA H200"

  @property
  def on_gpu(self) -> bool:
    return self.platform == "gpu"

  @property
  def keeps_subnormals(self) -> bool:
    """Whether XLA's float32 multiply keeps subnormal operands and results here: XLA:GPU
    does by default (``xla_gpu_ftz=false``; ``kernels.bench_step`` measures it, True on the
    H200), XLA:CPU flushes them (seen with jax 0.12 on x86). Exact code may then use one
    hardware multiply where it would otherwise go through integers
    (:func:`fp4jax.operand.gemm_operand`)."""
    return self.platform == "gpu"

  @property
  def hadamard_method(self) -> str:
    """How :func:`fp4jax.hadamard.rht` runs the recipes' random Hadamard transforms here
    (every path of one device uses the same, so reference and fused operands agree bit for
    bit): ``"dot_bf16"`` on a GPU, where XLA materialises each level of a butterfly along
    the tokens and a GEMM reads the operand in place, on BF16 tensor cores (one GEMM for a
    bfloat16 operand, three for a float32 one) rather than as a float32 GEMM (``kernels.bench_hadamard``, ``kernels.bench_step --hadamard_methods``),
    else ``"butterfly"`` (a fixed summation order). :func:`hadamard_method` overrides it.
    One exception, in every path and on every device: a transform along a float-scaled
    operand's blocks (NVFP4's wgrad inputs) runs as the butterfly, the order the
    float-scale kernels reproduce in place
    (:func:`fp4jax.kernels.float_scale_operand.transform_method`)."""
    override = _HADAMARD_METHOD.get()
    if override is not None:
      return override
    return "dot_bf16" if self.platform == "gpu" else "butterfly"

  @property
  def bf16_dot(self) -> bool:
    """Whether XLA runs a BF16 x BF16 -> F32 dot natively (XLA:CPU has no such thunk)."""
    return self.platform != "cpu"

  @property
  def slug(self) -> str:
    """The device kind as a file-name part (``nvidia_h200``), for benchmark results."""
    return (self.kind or self.platform).lower().replace(" ", "_")


def device_facts() -> DeviceFacts:
  """The facts of JAX's default device (the one a jitted function runs on)."""
  try:
    dev = jax.devices()[0]
  except RuntimeError:
    return DeviceFacts("cpu")
  if dev.platform != "gpu":
    return DeviceFacts(dev.platform, 0, getattr(dev, "device_kind", ""))
  cc = str(getattr(dev, "compute_capability", "0"))
  return DeviceFacts("gpu", int(cc.split(".")[0] or 0), dev.device_kind)


# ----------------------------------------------------------------------------- policy

_POLICY = contextvars.ContextVar("fp4jax_gemm_impl", default="auto")
_HADAMARD_METHOD: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "fp4jax_hadamard_method", default=None)


@contextlib.contextmanager
def hadamard_method(method: str) -> Iterator[None]:
  """Runs the recipes' random Hadamard transforms traced inside with ``method`` (one of
  :data:`fp4jax.hadamard.HADAMARD_METHODS`) instead of the device's
  (:attr:`DeviceFacts.hadamard_method`), in every path alike (reference, fused, grouped),
  e.g. to time the methods against each other (``kernels.bench_step --hadamard_methods``)::

    with fp4jax.dispatch.hadamard_method("dot_bf16"):
      loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params, batch)

  The choice is read when a function is traced: a function jitted and traced before keeps
  the method it was traced with."""
  if method not in HADAMARD_METHODS:
    raise ValueError(f"hadamard_method: method must be one of {HADAMARD_METHODS}, "
                     f"got {method!r}")
  token = _HADAMARD_METHOD.set(method)
  try:
    yield
  finally:
    _HADAMARD_METHOD.reset(token)


@contextlib.contextmanager
def gemm_impl(impl: str) -> Iterator[None]:
  """Sets the policy of every :func:`fp4jax.qdot_general` traced inside (layers of
  :mod:`fp4jax.linen` / :mod:`fp4jax.nnx` included) that does not pass its own::

      with fp4jax.gemm_impl("xla"):       # the pure-JAX reference everywhere
        loss, grads = train_step(params, batch)   # traced (jit-compiled) in here

  It acts at trace time: a function jit-compiled before keeps the implementation it was
  traced with.
  """
  check_policy(impl, "gemm_impl")
  token = _POLICY.set(impl)
  try:
    yield
  finally:
    _POLICY.reset(token)


def check_policy(impl: Any, where: str) -> str:
  if impl not in POLICIES:
    raise ValueError(f"{where}: impl must be one of {POLICIES}, got {impl!r}")
  return impl


def current_policy() -> str:
  """The policy of the innermost :func:`gemm_impl` context ("auto" outside any)."""
  return _POLICY.get()


def resolve_policy(impl: str | None, facts: DeviceFacts | None = None) -> str:
  """``impl`` (None: the context's) with ``"auto"`` off a GPU turned into ``"xla"``."""
  impl = current_policy() if impl is None else check_policy(impl, "impl")
  facts = facts or device_facts()
  return "xla" if impl == "auto" and not facts.on_gpu else impl


# ---------------------------------------------------------------------- vocabulary


class QuantizeImpl(enum.Enum):
  """What runs for one ``fp4jax.quantize``."""

  XLA = "xla"
  """:func:`fp4jax.encode.quantize_reference`: pure JAX, integer operations on float bits."""

  PALLAS = "pallas"
  """:func:`fp4jax.kernels.quantize.quantize`: one fused kernel launch (Triton on a GPU,
  interpret mode elsewhere), bit-identical to XLA."""


class GemmImpl(enum.Enum):
  """What runs for one GEMM of quantized operands (forward, dgrad or wgrad)."""

  REFERENCE = "reference"
  """XLA float32 GEMM (``Precision.HIGHEST``) of the fake-quantized values: any format."""

  BF16_EXACT = "bf16_exact"
  """XLA BF16 GEMM with float32 accumulation of the dequantized operands, where
  ``element x block scale`` is exact in BF16 (:func:`fp4jax.spec.bf16_exact`: every MX
  format, NVFP4); FP32 tensor scales in the epilogue."""

  FP8_XLA = "fp8_xla"
  """:mod:`fp4jax.kernels.unpack` to E4M3 (per-row reference exponent) + XLA's FP8 GEMM:
  MXFP4 x MXFP4 on Hopper for K >= :data:`FP8_MIN_K` ("auto"), at any K ("pallas", also
  in interpret mode off a GPU)."""

  BF16_XLA = "bf16_xla"
  """:mod:`fp4jax.kernels.unpack` to BF16 + XLA's BF16 GEMM: E2M1 with 8-bit block
  scales (NVFP4, MXFP4 at short K) on Hopper."""

  BLACKWELL = "blackwell"
  """:func:`jax.nn.scaled_matmul` (cuDNN) on native FP4 tensor cores, sm_100+."""

  @property
  def uses_kernels(self) -> bool:
    """Whether it runs :func:`fp4jax.kernels.matmul.fp4_matmul` (2D QArray operands)."""
    return self in (GemmImpl.FP8_XLA, GemmImpl.BF16_XLA, GemmImpl.BLACKWELL)


class Choice(NamedTuple):
  """One decision: what runs, whether in Pallas interpret mode, and why (for a fallback,
  the reason the faster implementation was not taken; None when nothing was ruled out)."""

  impl: Any
  interpret: bool = False
  reason: str | None = None


_LOGGED: set = set()


def _log_once(what: str, detail: str, choice: Choice) -> None:
  key = (what, detail, choice.impl, choice.interpret, choice.reason)
  if key in _LOGGED:
    return
  _LOGGED.add(key)
  mode = " (interpret mode)" if choice.interpret else ""
  why = f" ({choice.reason})" if choice.reason else ""
  log.debug("fp4jax %s: %s via %s%s%s", what, detail, choice.impl.value, mode, why)


# --------------------------------------------------------------------------- quantize


def quantize_unsupported_reason(shape, dtype, spec: QuantSpec, axis: int, *, pad: bool = False,
                                random_bits: bool = False) -> str | None:
  """Why the quantize kernels cannot take this call (None: they can)."""
  why = kernel_quantize.unsupported_reason(tuple(shape), dtype, spec, axis)
  if why is None and random_bits:
    why = "explicit random_bits (kernels hash their own from key)"
  if why is None and pad:
    why = "pad=True"
  return why


def choose_quantize(shape, dtype, spec: QuantSpec, axis: int, impl: str, *, pad: bool = False,
                    random_bits: bool = False, strict: bool = True,
                    facts: DeviceFacts | None = None) -> Choice:
  """What runs for ``fp4jax.quantize(x, spec, axis, impl=impl, ...)``.

  ``strict=False`` (a GEMM operand, which must quantize whatever its shape): ``"pallas"``
  falls back to XLA where the kernels do not take the configuration instead of raising.

  Raises:
    ValueError: ``impl="pallas"``, ``strict``, and the kernels do not take the configuration.
  """
  check_policy(impl, "quantize")
  facts = facts or device_facts()
  detail = f"{spec.name or 'custom'} {tuple(shape)} axis {axis}"
  if impl in ("xla", "fused"):  # "fused" concerns layers' operands: a lone quantize is XLA's
    return Choice(QuantizeImpl.XLA)
  why = quantize_unsupported_reason(shape, dtype, spec, axis, pad=pad, random_bits=random_bits)
  if why is None and impl == "auto" and not facts.on_gpu:
    why = "not on a GPU"
  if why is not None:
    if impl == "pallas" and strict:
      raise ValueError(f"quantize(impl='pallas'): unsupported configuration: {why}; use "
                       "impl='auto' to fall back to the pure-JAX path")
    choice = Choice(QuantizeImpl.XLA, reason=why)
  else:
    choice = Choice(QuantizeImpl.PALLAS, interpret=not facts.on_gpu)
  _log_once("quantize", detail, choice)
  return choice


# -------------------------------------------------------------- a layer's operand path


class OperandPath(enum.Enum):
  """How the six operands of a quantized layer (:func:`fp4jax.qdot_general`) reach its
  three GEMMs."""

  QARRAY = "qarray"
  """Each operand is quantized to a :class:`~fp4jax.qarray.QArray` (packed codes and
  scales; :func:`choose_quantize`) and each GEMM multiplies two of them
  (:func:`choose_gemm`): the reference under ``"xla"``, the Pallas kernels under
  ``"pallas"``, and what Blackwell's native FP4 GEMMs read."""

  FUSED = "fused"
  """:mod:`fp4jax.qdot_fused`: each operand's quantized values are emitted in the GEMM's
  input dtype (:func:`fp4jax.operand.gemm_operand`) inside the XLA fusion that reads it,
  and BF16 tensor cores multiply them (float32 GEMMs on XLA:CPU). On the H200 this beats
  the QArray path's quantize, unpack and GEMM kernels at every shape of the training-step
  benchmark (``kernels/results/step_nvidia_h200.json``)."""


def choose_operand_path(recipe, policy: str, *, has_reference: bool = False,
                        n: int | None = None, facts: DeviceFacts | None = None) -> Choice:
  """Which :class:`OperandPath` runs a layer of ``recipe`` under a resolved ``policy``.

  ``"auto"`` takes :attr:`OperandPath.FUSED` on Hopper (FP8 but no FP4 tensor cores)
  where the recipe allows it; Blackwell keeps the QArray path for its native FP4 GEMMs.
  ``"fused"`` takes it on any device. ``has_reference`` and ``n`` as
  :func:`fp4jax.qdot_fused.unsupported_reason`."""
  facts = facts or device_facts()
  policy = resolve_policy(policy, facts)
  why = None
  if policy in ("xla", "pallas"):
    why = f"the {policy} policy quantizes to QArrays"
  elif policy == "auto" and not HOPPER_GENERATION <= facts.generation < BLACKWELL_GENERATION:
    why = (f"compute capability {facts.generation}.x: native FP4 GEMMs read packed operands"
           if facts.generation >= BLACKWELL_GENERATION else
           f"no FP8 tensor cores on compute capability {facts.generation}.x")
  if why is None:
    why = qdot_fused.unsupported_reason(recipe, has_reference=has_reference, n=n)
  choice = Choice(OperandPath.QARRAY, reason=why) if why else Choice(OperandPath.FUSED)
  _log_once("layer", f"{recipe.name} ({policy})", choice)
  return choice


class OperandEmitter(enum.Enum):
  """Which code emits a :attr:`OperandPath.FUSED` layer's GEMM-ready operands."""

  XLA = "xla"
  """:func:`fp4jax.operand.gemm_operand`, inside the XLA fusion that reads the operand
  (any device; every spec the fused path takes)."""

  PALLAS = "pallas"
  """:mod:`fp4jax.kernels.operand` for every operand with power-of-two scales in blocks of
  at least :attr:`fp4jax.qdot_fused.KernelEmit.min_elements` elements (activations,
  gradients, large weights, Hadamard-transformed float32 operands; one read and one write
  each, ``dY``'s two quantizations from one read where the table says so), XLA for the
  rest (float scales, tiles, small weights). Like every Pallas call, the kernel is not
  split by XLA's SPMD partitioner: under ``jit`` with sharded inputs it runs replicated,
  so sharded training runs the layers inside ``shard_map`` (as
  :mod:`fp4jax.distributed` and the experiments do) or takes ``gemm_impl("fused")``."""


def choose_operand_emitter(policy: str, facts: DeviceFacts | None = None) -> Choice:
  """The :class:`OperandEmitter` of a fused layer under a resolved ``policy``: the Pallas
  kernel under ``"auto"`` on a GPU (measured: ``kernels/results/step_<gpu>.json``), XLA
  under ``"fused"`` (which names XLA's fusions) and off GPUs."""
  facts = facts or device_facts()
  if policy == "auto" and facts.on_gpu:
    choice = Choice(OperandEmitter.PALLAS)
  else:
    choice = Choice(OperandEmitter.XLA, reason=f"policy {policy!r} on {facts.platform}")
  _log_once("operands", policy, choice)
  return choice


def measured_operand_table(facts: DeviceFacts, table: dict) -> dict:
  """``table``'s entries for this GPU kind, else those of the first measured kind (by
  name) of the same generation, else ``{}``. ``table`` maps device kinds to dicts (the
  layout of :data:`fp4jax.kernels.operand_tuning.TABLE`)."""
  if not isinstance(facts, DeviceFacts):
    raise TypeError("measured_operand_table: facts must be a DeviceFacts "
                    f"(fp4jax.dispatch.device_facts()), got {type(facts).__name__}")
  if not (isinstance(table, dict) and all(isinstance(v, dict) for v in table.values())):
    raise TypeError("measured_operand_table: table must map device kinds to dicts of "
                    "measured entries, as fp4jax.kernels.operand_tuning.TABLE does")
  if facts.kind in table:
    return table[facts.kind]
  if not (facts.on_gpu and facts.generation):
    return {}
  for kind in sorted(table):
    if table[kind].get("generation") == facts.generation:
      _log_once("operand table", facts.kind or "?", Choice(
          OperandEmitter.PALLAS, reason=f"not measured here: {kind}'s table, same generation"))
      return table[kind]
  return {}


def kernel_emit(choice: Choice, facts: DeviceFacts | None = None,
                table: dict | None = None) -> qdot_fused.KernelEmit | None:
  """What :func:`fp4jax.qdot_fused.qmatmul_for` takes for an emitter choice: per
  orientation and rounding, the emitter and tile measured fastest on this GPU kind
  (``table``, default :data:`fp4jax.kernels.operand_tuning.TABLE`, written by
  ``kernels.bench_operand --tune``), and the kernel's one-multiply variant where that
  table says it was bit-exact there. A kind it lacks takes the table of a measured kind of
  the same compute-capability generation (the first by name; logged), else the kernel's
  defaults and the variant exact on any backend."""
  if choice.impl is not OperandEmitter.PALLAS:
    return None
  facts = facts or device_facts()
  table = operand_tuning.TABLE if table is None else table
  measured = measured_operand_table(facts, table)
  choices = []
  for key, entry in sorted(measured.items()):
    if not (isinstance(entry, dict) and "emitter" in entry):
      continue
    cfg = entry.get("config")
    choices.append((key, (entry["emitter"], None if cfg is None
                          else kernel_operand.OperandKernelConfig(*cfg))))
  return qdot_fused.KernelEmit(interpret=interpret_mode(facts), choices=tuple(choices),
                               ieee_subnormals=bool(measured.get("kernel_ieee_subnormals")))


# ------------------------------------------------------------------------------- GEMM


def _tensor_scales_ok(q: QArray, policy: str) -> bool:
  # The reference path keeps tensor scales folded into the block scales (fake-quantized
  # values), so "xla" takes BF16 tensor cores only for operands without them (MX).
  if q.tensor_scale is None:
    return True
  return policy != "xla" and q.tensor_scale.size == 1




def _kernel_gemm(a: QArray, b: QArray, policy: str, facts: DeviceFacts) -> tuple[Choice | None, str]:
  """The kernel GEMM for a 2D pair in kernel layout (a (M, K), b (K, N), blocked along
  K), or None and the reason none fits."""
  if facts.on_gpu and facts.generation >= BLACKWELL_GENERATION:
    if kernel_matmul.unsupported_reason(a, b, "blackwell") is None:
      return Choice(GemmImpl.BLACKWELL), ""
  fp8_why = kernel_matmul.unsupported_reason(a, b, "fp8_xla")
  if facts.on_gpu and facts.generation < HOPPER_GENERATION:
    fp8_why = fp8_why or f"no FP8 tensor cores on compute capability {facts.generation}.x"
  long_k = a.shape[1] >= FP8_MIN_K
  if fp8_why is None and (long_k or policy == "pallas"):
    return Choice(GemmImpl.FP8_XLA, interpret=not facts.on_gpu), ""
  bf16_why = kernel_matmul.unsupported_reason(a, b, "bf16_xla")
  if bf16_why is None:
    reason = f"K = {a.shape[1]} < {FP8_MIN_K}: BF16 beats FP8 there" if fp8_why is None else None
    return Choice(GemmImpl.BF16_XLA, interpret=not facts.on_gpu, reason=reason), ""
  return None, bf16_why


def choose_gemm(xq: QArray | None, yq: QArray | None, policy: str, *,
                kernel_operands: tuple[QArray | None, QArray | None] | None = None,
                facts: DeviceFacts | None = None) -> Choice:
  """What runs for one GEMM of two quantized operands.

  Args:
    xq, yq: the operands' QArrays in the GEMM's own layout (None for an operand kept in
      high precision, or rounded toward a reference).
    policy: ``"xla"``, ``"auto"`` (resolved for the device: ``"xla"`` off a GPU) or
      ``"pallas"``.
    kernel_operands: the same QArrays as the kernels take them, 2D ``(M, K)`` blocked along
      K and ``(K, N)`` blocked along K (default ``(xq, yq)``).
  """
  facts = facts or device_facts()
  policy = resolve_policy(policy, facts)
  if policy == "fused":  # a QArray GEMM under "fused" (a layer it cannot take): the reference
    policy = "xla"
  kxq, kyq = kernel_operands or (xq, yq)
  detail = "x".join(q.spec.name or "custom" if q is not None else "float"
                    for q in (xq, yq))
  choice, kernel_why = None, "the xla policy runs no kernel" if policy == "xla" else ""
  if policy != "xla":
    if not (isinstance(kxq, QArray) and isinstance(kyq, QArray)):
      kernel_why = "an operand has no QArray (kept in high precision or reference-rounded)"
    elif kxq.ndim != 2 or kyq.ndim != 2:
      kernel_why = "the kernels take 2D operands (a batch of one)"
    else:
      choice, kernel_why = _kernel_gemm(kxq, kyq, policy, facts)
      detail += f" {kxq.shape[0]}x{kxq.shape[1]}x{kyq.shape[1]}"
  if choice is None:
    if xq is None or yq is None:
      why = "an operand is not quantized"
    elif not (spec_lib.bf16_exact(xq.spec) and spec_lib.bf16_exact(yq.spec)):
      why = "element x block scale is not exact in BF16"
    elif not (_tensor_scales_ok(xq, policy) and _tensor_scales_ok(yq, policy)):
      why = "the xla policy keeps FP32 tensor scales folded into the block scales"
    else:
      why = None
    choice = (Choice(GemmImpl.BF16_EXACT, reason=kernel_why or None) if why is None
              else Choice(GemmImpl.REFERENCE, reason="; ".join(r for r in (kernel_why, why) if r)))
  _log_once("GEMM", detail, choice)
  return choice


# ------------------------------------------------------------------------ weight-only


class WeightOnlyImpl(enum.Enum):
  """What runs for ``x @ w`` with float activations and stored FP4 weights (evaluation,
  decoding: :func:`fp4jax.gemm.weight_only_dot`)."""

  DEQUANTIZE = "dequantize"
  """``x @ dequantize(w)``: the weights decoded to ``x``'s dtype by XLA (fused into the
  GEMM's operand read where XLA can), then XLA's GEMM. Any spec, any shape."""

  KERNEL = "kernel"
  """:func:`fp4jax.kernels.weight_only.weight_only_matmul`: the packed weights read by
  the kernel and decoded in registers (Triton on a GPU, interpret mode elsewhere)."""


# The largest M for which "auto" takes the weight-only kernel: on the H200 it beat
# dequantize-then-GEMM at every M measured, 1 to 256 (K = N = 8192, kernels/NOTES.md); past
# that the one dequantization per call is amortised over more rows and XLA's GEMM wins.
WEIGHT_ONLY_AUTO_MAX_ROWS = 256


def choose_weight_only(x_shape, w: QArray, policy: str | None = None, *, strict: bool = True,
                       x_dtype: Any = jnp.bfloat16, facts: DeviceFacts | None = None) -> Choice:
  """What runs for a weight-only GEMM of ``x`` (M, K) and the QArray ``w`` (K, N).

  ``policy`` None means the :func:`gemm_impl` context's. ``"xla"`` / ``"fused"``
  dequantize. ``"pallas"`` takes the kernel wherever it can take the shapes and spec
  (raising where it cannot, unless ``strict=False``). ``"auto"`` takes the kernel on a GPU
  for BF16 activations and M <= :data:`WEIGHT_ONLY_AUTO_MAX_ROWS` where a tile divides the
  shape: the alternative with packed weights is decoding them every call, which measured
  5-14x slower on the H200 (M = 1..256, K = N = 8192). Neither reaches a BF16 GEMM on
  weights already stored in BF16 (the kernel: 0.74-0.97x at M <= 64); to run at BF16
  speed, dequantize once outside the step (:func:`fp4jax.ptq.dequantize_params`). Float32
  activations dequantize (the kernel rounds activations to BF16).

  Raises:
    ValueError: ``policy="pallas"``, ``strict`` and the kernel cannot take the GEMM.
  """
  policy = current_policy() if policy is None else check_policy(policy, "weight-only GEMM")
  facts = facts or device_facts()
  detail = f"{w.spec.name or 'custom'} {tuple(x_shape)} x {w.shape}"
  if policy in ("xla", "fused"):
    choice = Choice(WeightOnlyImpl.DEQUANTIZE, reason=f"the {policy} policy")
  elif policy == "auto":
    why = None if facts.on_gpu else "not on a GPU"
    if why is None and jnp.dtype(x_dtype) != jnp.bfloat16:
      why = f"{jnp.dtype(x_dtype)} activations (the kernel rounds them to BF16)"
    if why is None and x_shape[0] > WEIGHT_ONLY_AUTO_MAX_ROWS:
      why = f"M = {x_shape[0]} > {WEIGHT_ONLY_AUTO_MAX_ROWS} rows (decoding once is amortised)"
    if why is None:
      why = kernel_weight_only.unsupported_reason(tuple(x_shape), w)
    choice = (Choice(WeightOnlyImpl.KERNEL) if why is None
              else Choice(WeightOnlyImpl.DEQUANTIZE, reason=why))
  else:
    why = kernel_weight_only.unsupported_reason(tuple(x_shape), w)
    if why is not None and strict:
      raise ValueError(f"weight-only GEMM with impl='pallas': {why}; use impl='auto' to "
                       "dequantize instead")
    choice = (Choice(WeightOnlyImpl.DEQUANTIZE, reason=why) if why is not None
              else Choice(WeightOnlyImpl.KERNEL, interpret=not facts.on_gpu))
  _log_once("weight-only GEMM", detail, choice)
  return choice


# ---------------------------------------------------------------------- grouped GEMM


class GroupedGemmImpl(enum.Enum):
  """What multiplies the quantized operands of a grouped (mixture-of-experts) GEMM
  (:func:`fp4jax.qragged.qragged_dot`); every path quantizes them bit for bit alike."""

  REFERENCE = "reference"
  """``lax.ragged_dot`` of the float32 quantized values at ``Precision.HIGHEST``."""

  BF16 = "bf16"
  """``lax.ragged_dot`` of the quantized values in BF16 (exact: :func:`fp4jax.spec.bf16_exact`) with
  float32 accumulation, two-level tensor scales multiplying the float32 results; what
  runs on a GPU, on its BF16 tensor cores."""


def choose_grouped_gemm(recipe, policy: str | None = None,
                        facts: DeviceFacts | None = None) -> Choice:
  """The GEMM of :func:`fp4jax.qragged.qragged_dot` for ``recipe`` under ``policy``
  (None: the :func:`gemm_impl` context's): ``"xla"`` the float32 reference; otherwise BF16
  where the backend has a BF16 dot and every quantized operand is exact in BF16."""
  policy = current_policy() if policy is None else check_policy(policy, "grouped GEMM")
  facts = facts or device_facts()
  specs = [getattr(recipe, op) for op in ("fwd_lhs", "fwd_rhs", "dgrad_grad", "dgrad_rhs",
                                          "wgrad_lhs", "wgrad_grad")]
  if policy == "xla":
    choice = Choice(GroupedGemmImpl.REFERENCE, reason="the xla policy")
  elif not facts.bf16_dot:
    choice = Choice(GroupedGemmImpl.REFERENCE, reason="no BF16 dot on this backend")
  elif not all(sp is not None and spec_lib.bf16_exact(sp) for sp in specs):
    choice = Choice(GroupedGemmImpl.REFERENCE, reason="an operand's values are not exact "
                    "in BF16")
  else:
    choice = Choice(GroupedGemmImpl.BF16)
  _log_once("grouped GEMM", recipe.name, choice)
  return choice


def interpret_mode(facts: DeviceFacts | None = None) -> bool:
  """Whether a Pallas kernel asked for by name runs in interpret mode (off a GPU)."""
  return not (facts or device_facts()).on_gpu


__all__ = ["BLACKWELL_GENERATION", "Choice", "DeviceFacts", "FP8_MIN_K", "GemmImpl",
           "GroupedGemmImpl", "HOPPER_GENERATION", "OperandEmitter", "OperandPath", "POLICIES", "QuantizeImpl",
           "WEIGHT_ONLY_AUTO_MAX_ROWS", "WeightOnlyImpl", "check_policy", "choose_grouped_gemm", "choose_gemm", "choose_weight_only", "choose_operand_emitter", "choose_operand_path", "choose_quantize", "current_policy", "device_facts", "gemm_impl", "hadamard_method", "kernel_emit",
           "interpret_mode", "measured_operand_table", "quantize_unsupported_reason", "resolve_policy"]
