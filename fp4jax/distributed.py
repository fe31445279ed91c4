"""Data-parallel and FSDP training with ``jax.sharding``, and what quantization needs there.

fp4jax distributes with JAX's own machinery: a :class:`jax.sharding.Mesh` with axes
``("data", "fsdp")``, ``jax.jit`` with ``NamedSharding`` in/out shardings (XLA's SPMD
partitioner inserts the collectives), ``jax.shard_map`` where fp4jax must see the
gradient reduction itself (FP8 gradient communication), and
``jax.distributed.initialize`` for several hosts.

How quantization stays correct under sharding (the default, partitioner path):

* **Quantization is defined on the global tensor.** Inside ``jit`` every
  ``fp4jax.quantize`` sees the logical, unsharded array; the partitioner decides where
  each piece is computed. The results are therefore bit-identical to a one-device run
  (tested on 8 host devices): block maxima and the NVFP4 tensor amax are max-reductions
  (exact in any order; the tensor amax becomes a scalar all-reduce across shards, i.e. a
  global amax), and stochastic-rounding bits come from the counter hash of each element's
  *global* index (of its word of four: :mod:`fp4jax.prng`), so every shard draws
  different bits and the same bits as an unsharded run, reproducibly from the step's key.
* **Parameter shards hold whole scale blocks.** :func:`fsdp_partition` only shards a
  parameter dimension whose per-shard length is a multiple of :func:`recipe_alignment`
  (the least common multiple of the recipe's block sizes, tile sides and Hadamard
  sizes); the rest (biases, norms, odd shapes) stay replicated, and the batch is split
  into whole examples. A weight's blocks along its sharded dimension are then local to a
  device. Where a block does span devices (e.g. the wgrad operands' blocks along the
  tokens when a device holds fewer tokens than a block), the partitioner all-reduces the
  block maxima (integer bit patterns: exact), so the answer is still the global one.
* What the partitioner moves is its choice: on 8 host devices it keeps an FSDP weight
  sharded along the output features and all-gathers the (dequantized, float)
  activations rather than the weight. Moving packed FP4 codes instead would need the GEMM
  to take ``QArray`` operands across the all-gather; not done.
* Only GEMM accumulation and the gradient all-reduce change order with the device count,
  so losses agree within float-reduction tolerance, not bit for bit.

FP8 gradient communication (Peng et al. 2023, "FP8-LM: Training FP8 Large Language
Models", arXiv 2310.18313, used by Wang et al. 2025, arXiv 2501.17116, the Microsoft FP4
recipe): :func:`data_parallel_value_and_grad` computes each device's gradients on its
slice of the batch inside ``jax.shard_map``, quantizes every gradient tensor to FP8 with
one power-of-two scale shared by all devices (from the global amax, so nothing overflows
and the sum needs no rescaling) and averages them as a ring all-reduce does, in two
phases that move FP8 bytes: a reduce-scatter (``all_to_all``, sums in FP32) and an
all-gather of the re-encoded means (:func:`fp8_mean_over`).
Inside that manual region, fp4jax reduces its whole-tensor amaxes (NVFP4 tensor scales,
per-tensor scales) across the devices (:func:`amax_reduced_over`), so tensor scales stay
global; the stochastic-rounding key is folded with the device index, so devices draw
distinct bits. Scales along the tokens (the wgrad GEMM's blocks, per-channel scales of
its operands) are each device's own there, as in any data-parallel worker.

The same manual region with an FP32 ``pmean`` is how Pallas kernels run on a multi-GPU
mesh: XLA's partitioner cannot split a Pallas custom call, so the experiments use the
region whenever the GEMMs may take the kernels (``experiments.common.Parallel``).
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fp4jax import bits, formats, recipes as recipes_lib, scales, tensor_amax

MESH_AXES = ("data", "fsdp")
BATCH_AXES = MESH_AXES  # the batch is split over every axis (FSDP is data parallel too)
GRAD_COMMS = ("f32", "fp8_e4m3", "fp8_e5m2")



# ----------------------------------------------------------------------------- meshes

def parse_mesh_spec(spec: str | None, num_devices: int) -> dict[str, int]:
  """``"data:2,fsdp:4"`` -> ``{"data": 2, "fsdp": 4}``; every axis of :data:`MESH_AXES` is
  present (size 1 when not named). One size may be ``-1`` (the remaining devices); an
  empty or None spec is ``data:<all devices>``. The sizes multiply to at most
  ``num_devices`` (a smaller mesh takes the first devices, e.g. ``data:1`` for a
  one-device baseline on a bigger machine)."""
  sizes = {a: 1 for a in MESH_AXES}
  if spec is None or not spec.strip():
    sizes["data"] = num_devices
    return sizes
  seen, wildcard = set(), None
  for part in spec.split(","):
    name, sep, size = part.strip().partition(":")
    name = name.strip()
    if not sep or name not in MESH_AXES:
      raise ValueError(f"mesh spec {spec!r}: each entry must be <axis>:<size> with axis one of "
                       f"{', '.join(MESH_AXES)}, e.g. 'data:2,fsdp:4'; got {part.strip()!r}")
    if name in seen:
      raise ValueError(f"mesh spec {spec!r}: axis {name!r} is given twice")
    seen.add(name)
    try:
      n = int(size)
    except ValueError:
      raise ValueError(f"mesh spec {spec!r}: the size of {name!r} must be an integer, got "
                       f"{size!r}") from None
    if n == -1 and wildcard is None:
      wildcard = name
      continue
    if n < 1:
      raise ValueError(f"mesh spec {spec!r}: sizes must be >= 1 (or one -1 for 'the rest'), "
                       f"got {name}:{n}")
    sizes[name] = n
  known = math.prod(v for k, v in sizes.items() if k != wildcard)
  if wildcard is not None:
    if num_devices % known:
      raise ValueError(f"mesh spec {spec!r}: {num_devices} devices do not split into "
                       f"{known} x {wildcard}")
    sizes[wildcard] = num_devices // known
  if math.prod(sizes.values()) > num_devices:
    raise ValueError(f"mesh spec {spec!r} needs {math.prod(sizes.values())} devices but "
                     f"{num_devices} are available; make the sizes multiply to at most "
                     f"{num_devices} (or use -1 for one axis)")
  return sizes


def make_mesh(spec: str | None = None, devices: Sequence[Any] | None = None) -> Mesh:
  """A ``("data", "fsdp")`` mesh over ``devices`` (default: all, across hosts)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = parse_mesh_spec(spec, len(devices))
  shape = [sizes[a] for a in MESH_AXES]
  return Mesh(np.asarray(devices[:math.prod(shape)], dtype=object).reshape(shape), MESH_AXES)


def axis_size(mesh: Mesh, axis: str) -> int:
  return int(mesh.shape.get(axis, 1))


def batch_size_multiple(mesh: Mesh) -> int:
  """The global batch must be a multiple of this (every device gets whole examples)."""
  return math.prod(axis_size(mesh, a) for a in BATCH_AXES)


# -------------------------------------------------------------------- sharding rules

def recipe_alignment(recipe: Any) -> int:
  """:func:`fp4jax.recipes.alignment`: a shard boundary at a multiple of it never splits
  a scale block, a 2D tile or a Hadamard block of the recipe."""
  return recipes_lib.alignment(recipe)


def fsdp_partition(shape: Sequence[int], fsdp: int, alignment: int = 1) -> P:
  """The FSDP partition of one array: its largest dimension among the last two whose
  per-shard length is a multiple of ``alignment``; replicated when none is (or
  ``fsdp == 1``, or a scalar). Leading dimensions (e.g. a scanned layer axis) are never
  sharded, so a scan's per-layer slice stays local."""
  if fsdp < 1 or alignment < 1:
    raise ValueError(f"fsdp_partition: fsdp ({fsdp}) and alignment ({alignment}) must be >= 1")
  shape = tuple(int(d) for d in shape)
  if fsdp == 1 or not shape:
    return P()
  cands = [d for d in range(max(len(shape) - 2, 0), len(shape))
           if shape[d] % (fsdp * alignment) == 0]
  if not cands:
    return P()
  best = max(cands, key=lambda d: (shape[d], d))
  return P(*([None] * best + ["fsdp"]))


def _is_array(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic)) or hasattr(x, "shape")


def state_shardings(tree: Any, mesh: Mesh, alignment: int = 1) -> Any:
  """``NamedSharding`` for every array leaf of ``tree`` (parameters, optimizer state, keys,
  the step): :func:`fsdp_partition` over the mesh's ``fsdp`` axis, replicated over
  ``data``. Optimizer moments have their parameter's shape, so they are sharded alike."""
  fsdp = axis_size(mesh, "fsdp")

  def rule(x):
    if not _is_array(x):
      return None
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      return NamedSharding(mesh, P())
    return NamedSharding(mesh, fsdp_partition(x.shape, fsdp, alignment))
  return jax.tree.map(rule, tree)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """The leading (batch) dimension split over every mesh axis."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def shard_batch(arrays: Sequence[np.ndarray], mesh: Mesh) -> tuple[jax.Array, ...]:
  """Global host batches -> arrays sharded along the batch over the mesh. Each process
  materialises only its addressable shards (``jax.make_array_from_callback``), so the
  same call works on one host and on many (every host computes the same global batch,
  a pure function of the step)."""
  n = batch_size_multiple(mesh)
  out = []
  for a in arrays:
    a = np.asarray(a)
    if a.ndim == 0 or a.shape[0] % n:
      raise ValueError(f"shard_batch: the batch dimension ({a.shape[0] if a.ndim else 'scalar'}) "
                       f"must be a multiple of the mesh's {n} devices: use a batch size "
                       f"divisible by {n} or a mesh of fewer devices")
    out.append(jax.make_array_from_callback(a.shape, batch_sharding(mesh, a.ndim),
                                            lambda idx, a=a: a[idx]))
  return tuple(out)


def place(tree: Any, shardings: Any) -> Any:
  """``tree``'s arrays moved to ``shardings`` (a tree of the same structure)."""
  return jax.tree.map(lambda x, s: x if s is None else jax.device_put(x, s), tree, shardings)


def initialize_if_multihost(coordinator_address: str | None = None,
                            num_processes: int | None = None,
                            process_id: int | None = None) -> bool:
  """``jax.distributed.initialize`` when launched on several hosts: with explicit
  arguments, or when the environment says so (``JAX_COORDINATOR_ADDRESS``, or a SLURM /
  Open MPI launch of more than one task, which JAX detects itself). Returns whether it
  initialised. Must run before anything touches a device."""
  env = os.environ
  launched = (coordinator_address is not None or "JAX_COORDINATOR_ADDRESS" in env
              or int(env.get("SLURM_NTASKS", "1")) > 1
              or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)
  if not launched:
    return False
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  return True


# -------------------------------------------- amax reductions inside shard_map regions

# Whole-tensor amaxes inside shard_map regions: the hook lives with the numerics
# (fp4jax.tensor_amax); these are its names here, where users of meshes look for them.
amax_reduced_over = tensor_amax.reduced_over
reduce_amax_bits = tensor_amax.reduce_amax_bits


# ----------------------------------------------------------- FP8 gradient all-reduce

# Gradient communication formats: their dtypes and element formats (maxima from the table).
_FP8_COMMS = {"fp8_e4m3": (jnp.float8_e4m3fn, formats.E4M3),
              "fp8_e5m2": (jnp.float8_e5m2, formats.E5M2)}


def _fp8_dtype(fmt: str):
  """``(dtype, largest finite value)`` of an FP8 gradient format."""
  if fmt not in _FP8_COMMS:
    raise ValueError(f"grad_comm must be one of {', '.join(GRAD_COMMS)}, got {fmt!r}")
  dtype, element = _FP8_COMMS[fmt]
  return dtype, float(element.max_value)


def fp8_communication_scale(global_amax: jax.Array, fmt: str = "fp8_e4m3") -> jax.Array:
  """The shared power-of-two exponent ``e`` (int32) for sending a gradient in FP8: the
  smallest ``e`` with ``amax / 2^e <= max(FP8)``, so no element overflows.

  This is the ``rceil`` E8M0 rule of :func:`fp4jax.scales.pow2_scale_code` (exponent from
  the float bits, subnormal amaxes included), clamped to ``[-126, 126]`` so that ``2^-e``
  is a normal float32 (a zero or tiny amax gives -126). A non-finite amax gives 0: its
  NaN/Inf travels in the codes and poisons the sum, as it should."""
  _fp8_dtype(fmt)
  element = _FP8_COMMS[fmt][1]
  amax_bits = bits.abs_bits(bits.f32_bits(jnp.asarray(global_amax, jnp.float32)))
  code = scales.pow2_scale_code(amax_bits, element, formats.E8M0, "rceil")
  e = jnp.clip(scales.pow2_scale_exponent(code, formats.E8M0), -126, 126)
  return jnp.where(scales.pow2_scale_is_nan(code, formats.E8M0), 0, e).astype(jnp.int32)


def fp8_encode(g: jax.Array, e: jax.Array, fmt: str = "fp8_e4m3") -> jax.Array:
  """``g * 2^-e`` rounded to nearest-even FP8 (``e`` from :func:`fp8_communication_scale`)."""
  dt, _ = _fp8_dtype(fmt)
  return (g.astype(jnp.float32) * jnp.ldexp(jnp.float32(1), -e)).astype(dt)


def fp8_decode_sum(codes: jax.Array, e: jax.Array) -> jax.Array:
  """Sum over the leading (gathered-shard) axis of FP8 codes, in FP32, times ``2^e``."""
  return jnp.sum(codes.astype(jnp.float32), axis=0) * jnp.ldexp(jnp.float32(1), e)


def _to_bytes(codes: jax.Array) -> jax.Array:
  # Sent as their bytes: backends without FP8 collectives would otherwise widen them.
  return jax.lax.bitcast_convert_type(codes, jnp.uint8)


def _shared_exponent(v: jax.Array, axis_name, fmt: str) -> jax.Array:
  local = jnp.max(jnp.abs(v)) if v.size else jnp.float32(0)
  return fp8_communication_scale(jax.lax.pmax(local, axis_name), fmt)


def fp8_mean_over(grads: Any, axis_name: str | tuple[str, ...], fmt: str = "fp8_e4m3") -> Any:
  """Inside ``shard_map``: the mean over ``axis_name``'s ``n`` devices of every gradient
  leaf, communicated as FP8 bytes, in the two phases of a ring all-reduce:

  1. reduce-scatter: each tensor is encoded in FP8 with a power-of-two scale shared by all
     devices (:func:`fp8_communication_scale` of the global amax), cut into ``n`` chunks and
     exchanged (``all_to_all`` of bytes); each device sums the ``n`` copies of its chunk in
     FP32 and divides by ``n``;
  2. all-gather: each device's mean chunk is encoded again in FP8 with a fresh shared
     scale and all-gathered (bytes), then decoded.

  Each device sends ``2 (n-1)/n`` bytes per element, a quarter of an FP32 all-reduce, and
  the result is identical on every device. Two FP8 roundings (3 mantissa bits for E4M3):
  each element is off by at most ``2^-4`` of its tensor's largest magnitude per rounding.
  NaN/Inf anywhere in a tensor makes its mean NaN."""
  n = jax.lax.axis_size(axis_name)

  def one(g):
    if not jnp.issubdtype(g.dtype, jnp.floating) or g.size == 0:
      return g
    flat = g.reshape(-1).astype(jnp.float32)
    chunk = -(-flat.size // n)
    flat = jnp.pad(flat, (0, chunk * n - flat.size))
    e1 = _shared_exponent(flat, axis_name, fmt)
    codes = fp8_encode(flat, e1, fmt)
    recv = jax.lax.all_to_all(_to_bytes(codes).reshape(n, chunk), axis_name, 0, 0)
    mine = fp8_decode_sum(jax.lax.bitcast_convert_type(recv, codes.dtype), e1) / n
    e2 = _shared_exponent(mine, axis_name, fmt)
    sent = fp8_encode(mine, e2, fmt)
    got = jax.lax.all_gather(_to_bytes(sent), axis_name)  # (n, chunk)
    mean = jax.lax.bitcast_convert_type(got, sent.dtype).astype(jnp.float32) * \
        jnp.ldexp(jnp.float32(1), e2)
    return mean.reshape(-1)[:g.size].reshape(g.shape).astype(g.dtype)
  return jax.tree.map(one, grads)


def data_parallel_value_and_grad(loss_fn: Callable, mesh: Mesh, *, batch_argnums: Sequence[int],
                                 key_argnum: int | None = None, grad_comm: str = "fp8_e4m3",
                                 has_aux: bool = False,
                                 axes: Sequence[str] = BATCH_AXES) -> Callable:
  """``jax.value_and_grad(loss_fn)`` as explicit data parallelism (``jax.shard_map``
  manual over ``axes``): each device differentiates its slice of the batch, then the
  gradient mean over the devices is communicated in FP8 (see the module docstring) or in
  FP32.

  Parameters enter the region replicated: FSDP-sharded parameters are all-gathered at its
  boundary (whole, once per step) and the mean gradients leave replicated, to be sliced
  back to their shards by the caller's ``out_shardings``; optimizer state stays sharded.
  Inside, every array is a plain per-device array, so Pallas kernels (which XLA's
  partitioner cannot split) run on each device's own data.

  Args:
    loss_fn: ``(params, *args) -> loss`` (or ``(loss, aux)`` with ``has_aux``); the loss is
      a mean over the batch.
    mesh: a mesh from :func:`make_mesh`.
    batch_argnums: positions in ``args`` (after params) of arrays split along ``axes``.
    key_argnum: position in ``args`` of the quantization key, folded with the device's
      index so devices draw distinct stochastic-rounding bits.
    grad_comm: ``"fp8_e4m3"``, ``"fp8_e5m2"`` or ``"f32"`` (a ``pmean``).
    axes: the mesh axes the batch is split over (manual inside the region).
  Returns:
    ``(params, *args) -> (loss, grads)``, the loss averaged over devices.
  """
  if grad_comm != "f32":
    _fp8_dtype(grad_comm)
  batch_argnums, axes = tuple(batch_argnums), tuple(axes)
  unknown = set(axes) - set(mesh.axis_names)
  if unknown:
    raise ValueError(f"axes {sorted(unknown)} are not axes of the mesh {mesh.axis_names}")

  def wrapped(params, *args):
    specs = tuple(P(axes) if i in batch_argnums else P() for i in range(len(args)))

    def body(params, *args):
      args = list(args)
      if key_argnum is not None:
        args[key_argnum] = jax.random.fold_in(args[key_argnum], jax.lax.axis_index(axes))
      with amax_reduced_over(axes):
        out, grads = jax.value_and_grad(loss_fn, has_aux=has_aux)(params, *args)
      if grad_comm == "f32":
        grads = jax.tree.map(lambda g: jax.lax.pmean(g, axes), grads)
      else:
        grads = fp8_mean_over(grads, axes, grad_comm)
      out = jax.tree.map(lambda v: jax.lax.pmean(v, axes), out)
      return out, grads

    return jax.shard_map(body, mesh=mesh, in_specs=(P(),) + specs, out_specs=(P(), P()),
                         axis_names=set(axes), check_vma=False)(params, *args)
  return wrapped


def communicated_bytes(grads: Any, grad_comm: str, data: int) -> int:
  """Bytes each device sends for one gradient mean over ``data`` devices: a ring
  all-reduce of FP32 sends ``2 (n-1)/n * 4`` bytes per element; :func:`fp8_mean_over`
  sends ``2 (n-1)/n * 1`` (its reduce-scatter and all-gather phases) plus two 4-byte
  amaxes per tensor (their ``pmax``)."""
  if grad_comm != "f32":
    _fp8_dtype(grad_comm)  # names the valid choices
  if data <= 1:
    return 0
  leaves = [g for g in jax.tree.leaves(grads) if jnp.issubdtype(g.dtype, jnp.floating)]
  elems = sum(int(np.prod(g.shape)) for g in leaves)
  if grad_comm == "f32":
    return int(2 * (data - 1) / data * 4 * elems)
  return int(2 * (data - 1) / data * elems + 8 * len(leaves))


__all__ = ["BATCH_AXES", "GRAD_COMMS", "MESH_AXES", "amax_reduced_over", "axis_size",
           "batch_sharding", "batch_size_multiple", "communicated_bytes",
           "data_parallel_value_and_grad", "fp8_communication_scale", "fp8_decode_sum",
           "fp8_encode", "fp8_mean_over", "fsdp_partition", "initialize_if_multihost",
           "make_mesh", "parse_mesh_spec", "place", "recipe_alignment", "reduce_amax_bits",
           "replicated", "shard_batch", "state_shardings"]
