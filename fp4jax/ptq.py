"""Post-training quantization of a parameter tree into real low-bit storage.

:func:`quantize_params` replaces each weight leaf (by default every ``kernel`` with
``ndim >= 2``, blocked along its contraction axis ``-2``) with a :class:`~fp4jax.QArray`:
packed codes plus scales, 4.25 bits per element for MXFP4 and 4.5 for NVFP4 (measured by
``QArray.nbytes``). Methods:

* ``"rtn"``: round to nearest (the quantizer itself).
* ``"rtn_hadamard"``: rotate ``W' = R^T W`` along K with the orthonormal block Hadamard
  ``R`` first (outliers spread over a block), store ``W'``; the layer computes
  ``(x R)(R^T W) = x W``, which :func:`dequantize_params` realises as ``R deq(W')``.
* ``"gptq"`` (Frantar et al. 2023, arXiv 2210.17323), with block scales as in FP-Quant
  (Egiazarian et al. 2025, "Bridging the Gap Between Promise and Performance for
  Microscaling FP4 Quantization", arXiv 2509.23202): rows of ``W`` (input features) are
  rounded one at a time and the rounding error is spread over the not-yet-rounded rows
  through the Cholesky factor of ``H^{-1}``, ``H = X^T X + damp``; each block's scales
  are fixed from the error-updated weights when the block is reached. Needs calibration
  inputs ``X`` per layer (:func:`collect_linen_inputs`).
* ``"gptq_hadamard"``: GPTQ on the rotated problem (``X R``, ``R^T W``).

The quantized tree evaluates directly: ``model.apply(dequantize_params(qparams), x)``
under ``jit`` keeps only the packed weights as inputs and dequantizes inside the graph.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fp4jax import hadamard
from fp4jax.optim.weights import as_weight_spec_fn, path_str
from fp4jax.qarray import QArray
from fp4jax.quantization import dequantize, element_scales, quantize
from fp4jax.rounding import round_to_format
from fp4jax.scales import tensor_scale_from_amax
from fp4jax.spec import QuantSpec, get_spec

METHODS = ("rtn", "rtn_hadamard", "gptq", "gptq_hadamard")


@jax.tree_util.register_pytree_node_class
class RotatedQArray:
  """A weight stored as ``W' = R^T W`` (block Hadamard ``R`` along ``axis``), quantized."""

  def __init__(self, q: QArray, block: int, axis: int):
    self.q, self.block, self.axis = q, block, axis

  def tree_flatten(self):
    return (self.q,), (self.block, self.axis)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(children[0], *aux)

  @property
  def nbytes(self) -> int:
    return self.q.nbytes

  @property
  def shape(self):
    return self.q.shape

  def dequantize(self, dtype=None) -> jax.Array:
    w = dequantize(self.q, jnp.float32)
    return hadamard.rht(w, self.axis, None, self.block, transpose=True).astype(
        dtype or self.q.orig_dtype)


def _is_q(x) -> bool:
  return isinstance(x, (QArray, RotatedQArray))


def dequantize_params(tree: Any, dtype: Any = None) -> Any:
  """Floats again: every QArray / RotatedQArray leaf dequantized (to its original dtype
  or ``dtype``), other leaves unchanged."""
  def deq(x):
    if isinstance(x, QArray):
      return dequantize(x, dtype)
    if isinstance(x, RotatedQArray):
      return x.dequantize(dtype)
    return x
  return jax.tree.map(deq, tree, is_leaf=_is_q)


def nbytes(tree: Any) -> int:
  """Bytes of a parameter tree; quantized leaves count their codes and scales."""
  total = 0
  for x in jax.tree.leaves(tree, is_leaf=_is_q):
    total += x.nbytes if _is_q(x) else int(np.prod(np.shape(x))) * jnp.dtype(x.dtype).itemsize
  return total


def module_path(leaf_path: str) -> str:
  """``params/blocks_0/mlp/kernel`` -> ``blocks_0/mlp`` (the key of calibration inputs)."""
  p = re.sub(r"^params/", "", leaf_path)
  return p.rsplit("/", 1)[0] if "/" in p else ""


def _hessian(x: jax.Array, k: int) -> jax.Array:
  x = jnp.asarray(x, jnp.float32).reshape(-1, k)
  return jnp.einsum("nk,nl->kl", x, x, precision=lax.Precision.HIGHEST) / x.shape[0]


def _check_calibration(x: Any, k: int, where: str) -> jax.Array:
  """Calibration inputs as (rows, K) float32, or an error naming the layer: a wrong
  width would otherwise be reshaped into other rows, no rows make ``H = X^T X / 0`` NaN,
  and one non-finite input makes every weight NaN."""
  x = jnp.asarray(x, jnp.float32)
  if x.ndim == 0 or x.shape[-1] != k:
    raise ValueError(f"gptq: calibration inputs for {where} have shape {x.shape}; the layer "
                     f"takes K = {k} features, so they must have shape (..., {k}) (the inputs "
                     "of that layer, not of another)")
  x = x.reshape(-1, k)
  if x.shape[0] == 0:
    raise ValueError(f"gptq: calibration inputs for {where} have no rows (shape "
                     f"{x.shape}); pass at least one input row per layer")
  if not isinstance(x, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(x))):
    bad = int(jnp.sum(~jnp.isfinite(x)))
    raise ValueError(f"gptq: calibration inputs for {where} hold {bad} non-finite value(s) "
                     "(NaN or inf), which would make every GPTQ weight NaN; drop or fix "
                     "those rows")
  return x


def gptq_quantize(w: jax.Array, x: jax.Array, spec: str | QuantSpec, damp: float = 0.01,
                  hadamard_block: int | None = None, *, where: str = "this layer") -> jax.Array:
  """GPTQ-rounded weights for ``y = x @ w`` (``w``: (K, N), ``x``: (..., K)), float32,
  on the grid of ``spec`` blocked along K (rotated by ``R^T`` when ``hadamard_block``).
  ``where`` names the layer in errors about ``x`` (its width, no rows, non-finite values).

  The final storage re-quantizes these values with :func:`fp4jax.quantize`, so what is
  stored is always a valid QArray of ``spec``.
  """
  spec = get_spec(spec)
  w = jnp.asarray(w, jnp.float32)
  if w.ndim != 2:
    raise ValueError(f"gptq_quantize expects a 2D weight (K, N), got shape {w.shape}")
  k, n = w.shape
  x = _check_calibration(x, k, where)
  if hadamard_block:
    w = hadamard.rht(w, 0, None, hadamard_block)
    x = hadamard.rht(x, 1, None, hadamard_block)
  if spec.granularity != "block":
    raise ValueError(f"gptq_quantize supports block granularity specs, got "
                     f"{spec.granularity!r} ({spec.name}); use method='rtn' for it")
  bs = spec.block_size
  if k % bs:
    raise ValueError(f"gptq_quantize: K={k} is not a multiple of the block size {bs}")
  h = _hessian(x, k)
  dead = jnp.diag(h) == 0
  h = h.at[jnp.diag_indices(k)].set(jnp.where(dead, 1.0, jnp.diag(h)))
  w = jnp.where(dead[:, None], 0.0, w)
  h = h + damp * jnp.mean(jnp.diag(h)) * jnp.eye(k, dtype=jnp.float32)
  hinv = jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(h), True), jnp.eye(k))
  u = jnp.linalg.cholesky(hinv).T  # upper: H^-1 = U^T U
  ts = None
  if spec.tensor_scale is not None:
    finite = spec.tensor_scale == "finite_amax"
    mags = jnp.where(jnp.isfinite(w), jnp.abs(w), 0.0) if finite else jnp.abs(w)
    ts = tensor_scale_from_amax(jnp.max(mags), spec.element, spec.scale_format)
  elem = spec.element

  def block_step(b, w):
    wb = lax.dynamic_slice_in_dim(w, b * bs, bs, axis=0)
    kw = {} if ts is None else {"tensor_scale": ts}
    s = element_scales(quantize(wb, spec, 0, rounding="nearest", **kw))  # (bs, N)

    def row_step(i, w):
      r = b * bs + i
      row = lax.dynamic_index_in_dim(w, r, 0, keepdims=False)
      si = lax.dynamic_index_in_dim(s, i, 0, keepdims=False)
      q = round_to_format(row / si, elem, saturate=True) * si
      q = jnp.where(jnp.isfinite(q), q, row)
      err = (row - q) / u[r, r]
      # Row r becomes q exactly up to rounding; later rows absorb the error.
      w = w - u[r][:, None] * err[None, :]
      return lax.dynamic_update_index_in_dim(w, q, r, 0)

    return lax.fori_loop(0, bs, row_step, w)

  return lax.fori_loop(0, k // bs, block_step, w)


def quantize_params(params: Any, spec: str | QuantSpec = "mxfp4", method: str = "rtn", *,
                    weights: Any = None, calibration: dict[str, jax.Array] | None = None,
                    hadamard_block: int = 32, damp: float = 0.01,
                    skip: tuple[str, ...] = ()) -> Any:
  """Quantizes the weight leaves of ``params`` into QArray storage.

  Args:
    params: a parameter tree (linen ``variables["params"]`` or a pure dict of an nnx
      model's ``nnx.Param`` state).
    spec: the storage format (preset or QuantSpec), e.g. ``"mxfp4"``, ``"nvfp4"``.
    method: one of :data:`METHODS`.
    weights: which leaves and along which axis (weight spec function); default: every
      ``kernel`` with ``ndim >= 2`` along axis ``-2`` with ``spec``.
    calibration: for GPTQ: module path (``"blocks_0/mlp"``) -> inputs of that layer,
      shape ``(..., K)`` (see :func:`collect_linen_inputs`).
    hadamard_block: block of the Hadamard rotation for the ``*_hadamard`` methods.
    damp: GPTQ dampening, relative to the mean diagonal of ``H``.
    skip: regexes of leaf paths to keep in high precision (e.g. ``("head",)``).

  Returns:
    The tree with weight leaves replaced by QArray / RotatedQArray.
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  spec = get_spec(spec)
  fn = as_weight_spec_fn(spec if weights is None else weights)
  rotate = hadamard_block if method.endswith("hadamard") else None
  if method.startswith("gptq") and not calibration:
    raise ValueError("method='gptq' needs calibration inputs: calibration={module_path: X}; "
                     "get them with fp4jax.ptq.collect_linen_inputs(model, variables, x)")
  missing = []

  def q(path, leaf):
    p = path_str(path)
    sa = fn(path, leaf)
    if sa is None or any(re.search(s, p) for s in skip):
      return leaf
    lspec, axis = sa
    w = jnp.asarray(leaf)
    ax = axis % w.ndim
    if method.startswith("gptq"):
      mp = module_path(p)
      if mp not in calibration:
        missing.append(mp)
        return leaf
      if w.ndim != 2 or ax != 0:
        raise ValueError(f"gptq: {p} has shape {w.shape} blocked along axis {axis}; GPTQ "
                         "supports 2D (K, N) kernels blocked along K")
      wq = gptq_quantize(w, calibration[mp], lspec, damp, rotate,
                         where=repr(mp)).astype(w.dtype)
    else:
      wq = hadamard.rht(w, ax, None, rotate) if rotate else w
    qa = quantize(wq, lspec, ax, pad=True)
    return RotatedQArray(qa, rotate, ax) if rotate else qa

  out = jax.tree_util.tree_map_with_path(q, params)
  if missing:
    raise ValueError(f"gptq: no calibration inputs for {sorted(set(missing))}; calibration "
                     f"has {sorted(calibration)}")
  return out


def collect_linen_inputs(model, variables, *args, **kwargs) -> dict[str, jax.Array]:
  """The input of every ``nn.Dense`` (and last-axis ``nn.DenseGeneral``) of a linen model
  on ``args``, flattened to ``(rows, K)``, keyed by module path."""
  import flax.linen as nn
  seen: dict[str, jax.Array] = {}

  def record(next_fun, a, kw, context):
    m = context.module
    if context.method_name == "__call__" and isinstance(m, (nn.Dense, nn.DenseGeneral)):
      x = a[0]
      seen["/".join(m.path)] = jnp.asarray(x).reshape(-1, x.shape[-1])
    return next_fun(*a, **kw)

  with nn.intercept_methods(record):
    model.apply(variables, *args, **kwargs)
  return seen


def _plain_dense(m) -> bool:
  """An ``nn.Dense`` itself (no subclass, no injected dot_general: fp4jax.linen layers and
  QAT models compute otherwise), i.e. one whose product weight_only_apply may replace."""
  import flax.linen as nn
  return (type(m) is nn.Dense and getattr(m, "dot_general", None) is None
          and getattr(m, "dot_general_cls", None) is None)


def weight_only_apply(model, variables: dict, *args, impl: str | None = None, **kwargs):
  """``model.apply(variables, *args, **kwargs)`` for a linen model whose parameters hold
  quantized weights (:func:`quantize_params`, or a file read by
  :func:`fp4jax.interop.load_safetensors`), with every plain ``nn.Dense`` whose kernel is a
  QArray (K, N) blocked along K computed by :func:`fp4jax.gemm.weight_only_dot`: the packed
  weights go to the weight-only GEMM that :func:`fp4jax.dispatch.choose_weight_only` picks
  for ``impl`` (None: the :func:`fp4jax.gemm_impl` context's), the kernel or ``x @
  dequantize(w)``. Every other quantized leaf (Hadamard-rotated, ``DenseGeneral``, conv,
  ``Dense`` subclasses or ``Dense`` with an injected ``dot_general``) is dequantized first.
  Equals ``model.apply`` on :func:`dequantize_params` within the GEMMs' accumulation order
  (the kernel rounds activations to bf16); ``nn.Dense``'s ``precision`` does not apply to
  the weight-only GEMM."""
  import flax.linen as nn
  from fp4jax import gemm

  # Which modules are plain Dense layers: one abstract trace of the dequantized model.
  dense_paths: set[tuple[str, ...]] = set()

  def record(next_fun, a, kw, context):
    if context.method_name == "__call__" and _plain_dense(context.module):
      dense_paths.add(tuple(context.module.path))
    return next_fun(*a, **kw)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda v: model.apply(v, *args, **kwargs),
                   dequantize_params(dict(variables)))

  def prepare(path, leaf):
    keys = tuple(str(getattr(k, "key", k)) for k in path)
    if (isinstance(leaf, QArray) and leaf.ndim == 2 and leaf.axis == -2 and len(keys) >= 2
        and keys[0] == "params" and keys[-1] == "kernel" and keys[1:-1] in dense_paths):
      return leaf
    if isinstance(leaf, QArray):
      return dequantize(leaf)
    if isinstance(leaf, RotatedQArray):
      return leaf.dequantize()
    return leaf

  variables = jax.tree_util.tree_map_with_path(prepare, dict(variables), is_leaf=_is_q)

  def dense(next_fun, a, kw, context):
    m = context.module
    if context.method_name == "__call__" and _plain_dense(m):
      kernel = m.get_variable("params", "kernel")
      if isinstance(kernel, QArray):
        x = a[0] if a else kw["inputs"]
        bias = m.get_variable("params", "bias") if m.use_bias else None
        # flax's promote_dtype: the module's dtype, else that of inputs, kernel and bias.
        dtype = m.dtype or jnp.result_type(x.dtype, kernel.orig_dtype,
                                           *(() if bias is None else (bias.dtype,)))
        y = gemm.weight_only_dot(jnp.asarray(x, dtype), kernel, impl=impl, out_dtype=dtype,
                                 strict=False)
        return y if bias is None else y + jnp.asarray(bias, dtype)
    return next_fun(*a, **kw)

  with nn.intercept_methods(dense):
    return model.apply(variables, *args, **kwargs)


__all__ = ["METHODS", "RotatedQArray", "collect_linen_inputs", "dequantize_params",
           "gptq_quantize", "module_path", "nbytes", "quantize_params", "weight_only_apply"]
