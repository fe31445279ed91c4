"""FP4 weights in and out: the OCP MX / gpt-oss MXFP4 layout and safetensors files.

**The gpt-oss layout.** A weight of logical shape ``(..., K)`` quantized to MXFP4 along its
last axis is stored as two tensors:

* ``<name>.blocks``: ``uint8`` of shape ``(..., K/32, 16)``: block ``b`` of a row holds its
  32 E2M1 codes, two per byte, element ``2i`` in the low nibble (the OCP MX packing, which
  is :class:`fp4jax.QArray`'s own, see :mod:`fp4jax.packing`);
* ``<name>.scales``: ``uint8`` of shape ``(..., K/32)``: the E8M0 exponent with bias 127
  (value ``2^(s - 127)``; 255 is NaN).

A QArray of :func:`fp4jax.get_spec("mxfp4") <fp4jax.get_spec>` blocked along its last axis
holds exactly these bytes (codes ``(..., K/2)``, scales ``float8_e8m0fnu (..., K/32)``), so
the conversions here reshape and reinterpret; they never decode or re-encode, and are
bit-exact both ways.

**Which axis is K.** gpt-oss (PyTorch convention) keeps a linear layer's weight as
``(out, in)`` (``(experts, out, in)`` for the MoE MLPs) with blocks along ``in``, the
contraction axis. A Flax ``Dense`` kernel is ``(in, out)``: use ``q.mT`` (the QArray of the
last two axes swapped, blocks then along axis -2, still no re-encoding, but a copy), e.g.
``fp4jax.weight_only_matmul(x, q.mT)`` for ``x @ W.T``; or run the weights as stored with
``fp4jax.weight_only_linear(x, q)`` (the same kernel reading the (out, in) layout).

**safetensors files.** :func:`save_safetensors` flattens a pytree of dicts (keys joined by
``.``, as checkpoint names are) whose leaves are arrays or MXFP4 QArrays; every QArray
becomes a ``.blocks`` / ``.scales`` pair. A QArray blocked along axis -2 (a Flax kernel
quantized along its input axis, as :func:`fp4jax.ptq.quantize_params` makes them) is
written transposed, in the gpt-oss orientation. The file's metadata (``fp4jax.qarrays``,
JSON) records each QArray's original dtype and orientation, so that
:func:`load_safetensors` returns it as it was; files from elsewhere have no such entry and
load as stored, dequantizing to the ``dtype`` asked for. :func:`load_safetensors` is the inverse:
each pair becomes a QArray, every other tensor (BF16, F32, ...) an array, nested by the
dots of the names. It needs the ``safetensors`` package (``pip install "fp4jax[interop]"``).
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fp4jax.qarray import QArray
from fp4jax.spec import QuantSpec, get_spec

BLOCK = 32                     # elements per MXFP4 block (OCP MX)
BYTES_PER_BLOCK = BLOCK // 2   # two E2M1 codes per byte
BLOCKS_SUFFIX, SCALES_SUFFIX = ".blocks", ".scales"
# safetensors metadata key: JSON {name: {"dtype": original dtype, "transposed": bool}} for
# the QArrays save_safetensors wrote (transposed: a Flax kernel (..., in, out) blocked along
# axis -2, stored as (..., out, in) blocked along the last axis, the gpt-oss orientation);
# load_safetensors restores both.
QARRAYS_KEY = "fp4jax.qarrays"


def _mxfp4_spec() -> QuantSpec:
  return get_spec("mxfp4")


def mxfp4_layout_reason(q: Any) -> str | None:
  """Why ``q`` cannot be written in the gpt-oss MXFP4 layout (None: it can)."""
  if not isinstance(q, QArray):
    return f"not a QArray but {type(q).__name__}"
  s = q.spec
  if s.element.name != "e2m1" or s.scale_format.name != "e8m0" or not s.packed:
    return (f"spec {s.name or 'custom'} has {s.element.name} elements with "
            f"{s.scale_format.name} scales{'' if s.packed else ', unpacked'}; the layout "
            "holds packed E2M1 codes with E8M0 scales (MXFP4)")
  if s.granularity != "block" or s.block_size != BLOCK:
    return f"blocks of {s.block_size} ({s.granularity}); the layout has blocks of {BLOCK}"
  if q.axis % q.ndim != q.ndim - 1:
    return (f"blocked along axis {q.axis}; the layout blocks the last axis (use .mT for a "
            "kernel blocked along axis -2)")
  if any(q.padding):
    return f"padded {q.padding}; the layout has no padding (K a multiple of {BLOCK})"
  if q.tensor_scale is not None:
    return "a tensor scale (two-level); MXFP4 has none"
  return None


def mxfp4_from_blocks(blocks: Any, scales: Any, *, dtype: Any = jnp.bfloat16) -> QArray:
  """The QArray of a gpt-oss-layout MXFP4 tensor (no decoding: the bytes are kept).

  Args:
    blocks: ``uint8`` ``(..., K/32, 16)``, two E2M1 codes per byte, low nibble first.
    scales: ``uint8`` ``(..., K/32)``, E8M0 (bias 127), or already ``float8_e8m0fnu``.
    dtype: the dtype :meth:`QArray.dequantize` returns by default.
  Returns:
    A QArray of logical shape ``(..., K)`` with spec ``mxfp4``, blocked along the last axis.
  """
  blocks, scales = jnp.asarray(blocks), jnp.asarray(scales)
  if blocks.dtype != jnp.uint8:
    raise TypeError(f"mxfp4_from_blocks: blocks must be uint8 (two E2M1 codes per byte), got "
                    f"{blocks.dtype}")
  if blocks.ndim < 2 or blocks.shape[-1] != BYTES_PER_BLOCK:
    raise ValueError(f"mxfp4_from_blocks: blocks must have shape (..., K/32, "
                     f"{BYTES_PER_BLOCK}), got {blocks.shape}")
  if scales.dtype == jnp.float8_e8m0fnu:
    scales = jax.lax.bitcast_convert_type(scales, jnp.uint8)
  if scales.dtype != jnp.uint8:
    raise TypeError(f"mxfp4_from_blocks: scales must be uint8 E8M0 exponents (bias 127), got "
                    f"{scales.dtype}")
  if scales.shape != blocks.shape[:-1]:
    raise ValueError(f"mxfp4_from_blocks: scales must have shape blocks.shape[:-1] = "
                     f"{blocks.shape[:-1]} (one per block), got {scales.shape}")
  codes = blocks.reshape(*blocks.shape[:-2], blocks.shape[-2] * BYTES_PER_BLOCK)
  e8m0 = jax.lax.bitcast_convert_type(scales, jnp.float8_e8m0fnu)
  return QArray(codes, e8m0, None, _mxfp4_spec(), -1, (0,) * codes.ndim, jnp.dtype(dtype))


def mxfp4_to_blocks(q: QArray) -> tuple[jax.Array, jax.Array]:
  """``(blocks, scales)`` of an MXFP4 QArray blocked along its last axis, in the gpt-oss
  layout (see the module doc): the QArray's own bytes, reshaped.

  Raises:
    ValueError: ``q`` is not MXFP4 blocked along its last axis without padding (the message
      says which; e.g. ``q.mT`` turns a Flax kernel blocked along axis -2 around).
  """
  why = mxfp4_layout_reason(q)
  if why:
    raise ValueError(f"mxfp4_to_blocks: {why}")
  codes = q.codes
  blocks = codes.reshape(*codes.shape[:-1], codes.shape[-1] // BYTES_PER_BLOCK,
                         BYTES_PER_BLOCK)
  return blocks, jax.lax.bitcast_convert_type(q.scales, jnp.uint8)


def _safetensors_numpy():
  try:
    import safetensors.numpy as st
  except ImportError:
    raise ImportError("fp4jax.interop's safetensors files need the safetensors package: pip "
                      "install 'fp4jax[interop]' (or pip install safetensors)") from None
  return st


def _flatten(tree: Any, prefix: str, out: dict[str, Any]) -> None:
  if isinstance(tree, Mapping):
    for k, v in tree.items():
      if not isinstance(k, str) or not k or "." in k:
        raise ValueError(f"save_safetensors: key {k!r} under {prefix or 'the root'!r} must be "
                         "a non-empty string without '.' (names are keys joined by '.')")
      _flatten(v, f"{prefix}.{k}" if prefix else k, out)
    return
  if not prefix:
    raise TypeError("save_safetensors: tree must be a dict (names come from its keys), got "
                    f"{type(tree).__name__}")
  out[prefix] = tree


def save_safetensors(path: str | os.PathLike, tree: Mapping[str, Any],
                     metadata: Mapping[str, str] | None = None) -> None:
  """Writes a pytree of dicts to a safetensors file: MXFP4 QArrays (blocked along their
  last axis) as ``<name>.blocks`` / ``<name>.scales`` in the gpt-oss layout, arrays as
  themselves (any dtype safetensors has, BF16 included).

  Raises:
    ValueError: a QArray that is not MXFP4 along its last axis (the leaf is named), a name
      that ends in ``.blocks`` / ``.scales`` for a plain array, or colliding names.
    TypeError: a leaf that is neither an array nor a QArray.
  """
  st = _safetensors_numpy()
  flat: dict[str, Any] = {}
  _flatten(tree, "", flat)
  tensors: dict[str, np.ndarray] = {}
  qarrays: dict[str, dict[str, Any]] = {}

  def put(name, value):
    if name in tensors:
      raise ValueError(f"save_safetensors: two leaves are both named {name!r}")
    tensors[name] = np.ascontiguousarray(np.asarray(value))

  for name, leaf in flat.items():
    if isinstance(leaf, QArray):
      transposed = leaf.ndim >= 2 and leaf.axis % leaf.ndim == leaf.ndim - 2
      if transposed:
        leaf = leaf.mT            # a kernel (in, out) blocked along `in`: stored (out, in)
      qarrays[name] = {"dtype": jnp.dtype(leaf.orig_dtype).name, "transposed": transposed}
      why = mxfp4_layout_reason(leaf)
      if why:
        raise ValueError(f"save_safetensors: {name!r} cannot be stored in the MXFP4 layout: "
                         f"{why}")
      blocks, scales = mxfp4_to_blocks(leaf)
      put(name + BLOCKS_SUFFIX, blocks)
      put(name + SCALES_SUFFIX, scales)
    elif isinstance(leaf, (jax.Array, np.ndarray, np.generic, int, float)):
      if name.endswith((BLOCKS_SUFFIX, SCALES_SUFFIX)):
        raise ValueError(f"save_safetensors: the array {name!r} would read back as half of "
                         "an MXFP4 pair; rename it")
      put(name, leaf)
    else:
      raise TypeError(f"save_safetensors: {name!r} is a {type(leaf).__name__}; leaves must be "
                      "arrays or MXFP4 QArrays")
  meta = dict(metadata or {})
  if QARRAYS_KEY in meta:
    raise ValueError(f"save_safetensors: metadata key {QARRAYS_KEY!r} is fp4jax's own")
  if qarrays:
    meta[QARRAYS_KEY] = json.dumps(qarrays, sort_keys=True)
  st.save_file(tensors, os.fspath(path), metadata=meta or None)


def load_safetensors(path: str | os.PathLike, *, dtype: Any = jnp.bfloat16,
                     nested: bool = True) -> dict[str, Any]:
  """Reads a safetensors file: each ``<name>.blocks`` / ``<name>.scales`` pair becomes an
  MXFP4 QArray (:func:`mxfp4_from_blocks`, dequantizing to ``dtype``, or to the dtype this
  module's :func:`save_safetensors` recorded), every other tensor a ``jax.Array``.

  Returns:
    A dict nested by the dots of the names (``nested=False``: flat, keyed by name).
  Raises:
    FileNotFoundError: no such file. ValueError: a ``.blocks`` without its ``.scales`` (or
    the reverse), or a pair whose shapes do not match (the name is given).
  """
  st = _safetensors_numpy()
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"load_safetensors: no file {path!r}")
  raw = st.load_file(path)
  with st.safe_open(path, "np") as f:
    meta = f.metadata() or {}
  try:
    qarrays = json.loads(meta.get(QARRAYS_KEY, "{}"))
  except json.JSONDecodeError as e:
    raise ValueError(f"load_safetensors: {path}: metadata {QARRAYS_KEY!r} is not JSON ({e})"
                     ) from None
  flat: dict[str, Any] = {}
  for name in sorted(raw):
    if name.endswith(BLOCKS_SUFFIX):
      base = name[:-len(BLOCKS_SUFFIX)]
      if base + SCALES_SUFFIX not in raw:
        raise ValueError(f"load_safetensors: {path}: {name!r} has no {base + SCALES_SUFFIX!r}")
      if base in raw:
        raise ValueError(f"load_safetensors: {path}: {base!r} is both a tensor and an "
                         f"MXFP4 pair ({name!r})")
      info = qarrays.get(base, {})
      try:
        flat[base] = mxfp4_from_blocks(raw[name], raw[base + SCALES_SUFFIX],
                                       dtype=info.get("dtype", dtype))
      except (TypeError, ValueError) as e:
        raise ValueError(f"load_safetensors: {path}: {base!r}: {e}") from None
      if info.get("transposed"):
        flat[base] = flat[base].mT
    elif name.endswith(SCALES_SUFFIX):
      if name[:-len(SCALES_SUFFIX)] + BLOCKS_SUFFIX not in raw:
        raise ValueError(f"load_safetensors: {path}: {name!r} has no "
                         f"{name[:-len(SCALES_SUFFIX)] + BLOCKS_SUFFIX!r}")
    else:
      flat[name] = jnp.asarray(raw[name])
  if not nested:
    return flat
  tree: dict[str, Any] = {}
  for name, leaf in flat.items():
    node = tree
    *parents, last = name.split(".")
    for p in parents:
      child = node.setdefault(p, {})
      if not isinstance(child, dict):
        raise ValueError(f"load_safetensors: {path}: {name!r} lies under the tensor "
                         f"{p!r}; use nested=False")
      node = child
    if last in node:
      raise ValueError(f"load_safetensors: {path}: {name!r} is both a tensor and a prefix; "
                       "use nested=False")
    node[last] = leaf
  return tree


__all__ = ["BLOCK", "QARRAYS_KEY", "load_safetensors", "mxfp4_from_blocks", "mxfp4_layout_reason",
           "mxfp4_to_blocks", "save_safetensors"]
