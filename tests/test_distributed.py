"""fp4jax.distributed on 8 host CPU devices (conftest sets the device count): meshes, FSDP
rules, quantization identical sharded or not, global amax inside shard_map, FP8 gradient
communication, sharded checkpoints restored onto other device counts."""

import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import fp4jax
from fp4jax import distributed
from tests.conftest import bits_equal_or_both_nan

def test_eight_host_devices_are_present():
  assert jax.device_count() >= 8, "conftest should give the CPU 8 devices"


# ------------------------------------------------------------------------------ meshes

@pytest.mark.parametrize("spec,expected", [
    (None, {"data": 8, "fsdp": 1}),
    ("", {"data": 8, "fsdp": 1}),
    ("data:2,fsdp:4", {"data": 2, "fsdp": 4}),
    ("fsdp:8", {"data": 1, "fsdp": 8}),
    ("data:-1,fsdp:2", {"data": 4, "fsdp": 2}),
    ("data:1", {"data": 1, "fsdp": 1}),
    (" data : 2 ", {"data": 2, "fsdp": 1}),
])
def test_parse_mesh_spec(spec, expected):
  assert distributed.parse_mesh_spec(spec, 8) == expected


@pytest.mark.parametrize("spec,message", [
    ("model:2", "axis one of data, fsdp"),
    ("data2", "<axis>:<size>"),
    ("data:2,data:4", "given twice"),
    ("data:x", "must be an integer"),
    ("data:0", "sizes must be >= 1"),
    ("data:4,fsdp:4", "needs 16 devices but 8 are available"),
    ("data:-1,fsdp:3", "do not split"),
])
def test_parse_mesh_spec_rejects_bad_specs(spec, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    distributed.parse_mesh_spec(spec, 8)


def test_make_mesh_takes_the_first_devices_for_a_smaller_mesh():
  m = distributed.make_mesh("data:2")
  assert m.axis_names == ("data", "fsdp") and dict(m.shape) == {"data": 2, "fsdp": 1}
  assert list(m.devices.flat) == jax.devices()[:2]
  assert distributed.batch_size_multiple(distributed.make_mesh("data:2,fsdp:4")) == 8


# ------------------------------------------------------------------------ FSDP rules

@pytest.mark.parametrize("shape,fsdp,align,expected", [
    ((256, 1024), 4, 32, P(None, "fsdp")),       # the larger aligned dimension
    ((1024, 256), 4, 32, P("fsdp")),
    ((256, 96), 4, 32, P("fsdp")),               # 96/4 = 24: not whole blocks of 32
    ((96, 96), 4, 32, P()),                      # nothing aligned: replicated
    ((64,), 8, 16, P()),                         # 64/8 = 8 < a 16-block
    ((128,), 8, 16, P("fsdp")),
    ((4, 256, 512), 2, 32, P(None, None, "fsdp")),  # a scanned layer axis is never sharded
    ((8, 8), 8, 1, P(None, "fsdp")),             # a tie: the last dimension
    ((8, 12), 8, 1, P("fsdp")),
    ((), 8, 1, P()),
    ((256, 256), 1, 32, P()),                    # no fsdp axis
])
def test_fsdp_partition(shape, fsdp, align, expected):
  assert distributed.fsdp_partition(shape, fsdp, align) == expected


@pytest.mark.parametrize("recipe,align", [
    ("bf16", 1), ("mxfp4", 32), ("nvfp4", 16), ("quartet", 32), ("fp8", 1), ("msfp4", 1),
    ("tetrajet", 32), ("fp4_all_the_way", 16),
])
def test_recipe_alignment(recipe, align):
  assert distributed.recipe_alignment(recipe) == align


def test_state_shardings_shard_moments_like_their_parameters():
  mesh = distributed.make_mesh("data:2,fsdp:4")
  state = {"w": jnp.zeros((128, 256)), "b": jnp.zeros((256,)), "step": jnp.zeros((), jnp.int32),
           "mu": {"w": jnp.zeros((128, 256))}, "key": jax.random.key(0)}
  sh = distributed.state_shardings(state, mesh, alignment=32)
  assert sh["w"].spec == P(None, "fsdp") and sh["mu"]["w"].spec == sh["w"].spec
  assert sh["b"].spec == P("fsdp")  # 256 / 4 = 64: two whole 32-blocks a shard
  assert sh["step"].spec == P() and sh["key"].spec == P()
  placed = distributed.place(state, sh)
  assert placed["w"].sharding.shard_shape((128, 256)) == (128, 64)
  assert jax.random.key_data(placed["key"]).tolist() == jax.random.key_data(state["key"]).tolist()


def test_shard_batch_splits_whole_examples_and_rejects_ragged_batches(rng):
  mesh = distributed.make_mesh("data:2,fsdp:4")
  x = rng.standard_normal((16, 5)).astype(np.float32)
  (xs,) = distributed.shard_batch([x], mesh)
  assert xs.sharding.spec == P(("data", "fsdp"), None)
  assert xs.sharding.shard_shape(x.shape) == (2, 5)
  np.testing.assert_array_equal(np.asarray(xs), x)
  with pytest.raises(ValueError, match="multiple of the mesh's 8 devices"):
    distributed.shard_batch([x[:12]], mesh)


# ------------------------------------------- quantization identical sharded or unsharded

def _leaves_equal(q1, q2):
  for a, b in zip(jax.tree.leaves(q1), jax.tree.leaves(q2)):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype
    if a.dtype.kind == "f" or a.dtype in (ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e8m0fnu):
      assert bits_equal_or_both_nan(a.astype(np.float32), b.astype(np.float32)).all()
    else:
      np.testing.assert_array_equal(a, b)


def _adversarial(rng, shape):
  x = rng.standard_normal(shape).astype(np.float32) * np.exp2(
      rng.integers(-20, 20, shape)).astype(np.float32)
  flat = x.reshape(-1)
  flat[:7] = [0.0, -0.0, 1e-40, -3e38, 6.0, 448.0 * 6, 2.0**-140]
  flat[rng.integers(0, flat.size, 5)] = 0.0
  return x


@pytest.mark.parametrize("spec,axis,kw", [
    ("mxfp4", -1, {}),
    ("mxfp4", -2, {}),
    ("nvfp4", -1, {}),                                  # FP32 tensor scale: a global amax
    ("nvfp4", -1, {"rounding": "stochastic"}),          # SR bits from global indices
    (fp4jax.get_spec("nvfp4").replace(granularity="tile", tile=(16, 16)), -1, {}),
    ("mxfp8_e4m3", -1, {"rounding": "stochastic"}),
    ("fp8_e4m3_tensor", -1, {}),                        # one scale for the tensor
])
@pytest.mark.parametrize("mesh_spec,pspec", [
    ("data:8", P("data", None)),                        # rows over 8 devices
    ("data:2,fsdp:4", P("data", "fsdp")),               # both axes, shards of 32 columns
    ("fsdp:8", P(None, "fsdp")),                        # the block axis, 16 columns a shard
])
def test_quantize_is_identical_sharded_or_not(rng, spec, axis, kw, mesh_spec, pspec):
  x = _adversarial(rng, (64, 128))
  key = jax.random.key(int(rng.integers(1 << 30)))
  f = jax.jit(lambda v, k: fp4jax.quantize(v, spec, axis=axis, key=k, **kw))
  want = f(jnp.asarray(x), key)
  mesh = distributed.make_mesh(mesh_spec)
  xs = jax.device_put(x, NamedSharding(mesh, pspec))
  got = f(xs, key)
  assert len(got.codes.sharding.device_set) == 8
  _leaves_equal(want, got)


def test_qdot_forward_and_gradients_match_unsharded_within_accumulation_order(rng):
  x = rng.standard_normal((64, 128)).astype(np.float32)
  w = rng.standard_normal((128, 64)).astype(np.float32) * 0.1
  key = jax.random.key(3)

  def loss(w, x, key):
    y = fp4jax.qdot_general(x, w, (((1,), (0,)), ((), ())), recipe="nvfp4", key=key)
    return jnp.mean(jnp.tanh(y) ** 2)

  g = jax.jit(jax.value_and_grad(loss))
  want_l, want_g = g(jnp.asarray(w), jnp.asarray(x), key)
  mesh = distributed.make_mesh("data:2,fsdp:4")
  ws = jax.device_put(w, NamedSharding(mesh, distributed.fsdp_partition(w.shape, 4, 16)))
  (xs,) = distributed.shard_batch([x], mesh)
  got_l, got_g = g(ws, xs, key)
  np.testing.assert_allclose(got_l, want_l, rtol=1e-5)
  # FP4 re-quantization of a gradient can flip a code where partial sums round apart:
  # compare by the gradient's norm, not elementwise.
  assert float(jnp.linalg.norm(got_g - want_g) / jnp.linalg.norm(want_g)) < 2e-2


# ------------------------------------------------------- amax inside shard_map regions

@pytest.mark.parametrize("spec", ["nvfp4", "fp8_e4m3_tensor"])
def test_amax_reduced_over_makes_shard_map_quantization_global(rng, spec):
  x = rng.standard_normal((64, 64)).astype(np.float32)
  x[3, 5] = 900.0  # only shard 0 holds the tensor's amax
  mesh = distributed.make_mesh("data:8")
  want = fp4jax.quantize(jnp.asarray(x), spec)

  def body(v, reduce):
    if reduce:
      with distributed.amax_reduced_over(("data",)):
        q = fp4jax.quantize(v, spec)
    else:
      q = fp4jax.quantize(v, spec)
    return q.codes, q.scales

  def run(reduce):
    return jax.jit(jax.shard_map(lambda v: body(v, reduce), mesh=mesh, in_specs=P("data"),
                                 out_specs=(P("data"), P("data")), check_vma=False))(x)

  codes, scales = run(True)
  np.testing.assert_array_equal(np.asarray(codes), np.asarray(want.codes))
  scales, want_scales = np.asarray(scales), np.asarray(want.scales)
  if want_scales.shape[0] == 1:  # one scale per tensor: every shard holds the same copy
    scales = scales[:1] if (scales == scales[:1]).all() else scales
  np.testing.assert_array_equal(scales.view(np.uint8), want_scales.view(np.uint8))
  codes_local, _ = run(False)
  assert not np.array_equal(np.asarray(codes_local), np.asarray(want.codes)), \
      "without the reduction each shard should use its own (different) amax"


def test_reduce_amax_bits_is_identity_outside_a_region():
  a = jnp.asarray([3, 9, 1], jnp.int32)
  assert distributed.reduce_amax_bits(a) is a


# ------------------------------------------------------------------ FP8 communication

@pytest.mark.parametrize("fmt,fmax", [("fp8_e4m3", 448.0), ("fp8_e5m2", 57344.0)])
def test_fp8_communication_scale_is_the_smallest_power_of_two_that_fits(rng, fmt, fmax):
  amax = np.concatenate([
      np.abs(rng.standard_normal(2000)).astype(np.float32) * np.exp2(
          rng.integers(-100, 100, 2000)).astype(np.float32),
      np.float32([fmax, fmax * 2, fmax * 0.5, np.nextafter(np.float32(fmax), np.float32(0)),
                  np.nextafter(np.float32(fmax), np.float32(1e9)), 1.0, 2.0**-126, 3e38])])
  e = np.asarray(distributed.fp8_communication_scale(jnp.asarray(amax), fmt)).astype(np.int64)
  fits = amax.astype(np.float64) / np.exp2(e) <= fmax
  assert fits.all(), amax[~fits]
  inner = (e > -126)
  assert (amax[inner].astype(np.float64) / np.exp2(e[inner] - 1) > fmax).all(), \
      "a smaller exponent would also fit"


def test_fp8_communication_scale_special_values():
  e = distributed.fp8_communication_scale(jnp.float32([0.0, np.inf, np.nan, 1e-44, -448.0]))
  assert e.tolist() == [-126, 0, 0, -126, 0]


def _fp8_mean_reference(g, fmt, dt):
  """numpy: the two phases of fp8_mean_over on stacked per-device gradients g[device]."""
  n = g.shape[0]
  e1 = int(distributed.fp8_communication_scale(jnp.float32(np.abs(g).max()), fmt))
  codes = (g * np.float32(2.0 ** -e1)).astype(dt).astype(np.float32)
  mean = codes.sum(0, dtype=np.float32) * np.float32(2.0 ** e1) / np.float32(n)
  e2 = int(distributed.fp8_communication_scale(jnp.float32(np.abs(mean).max()), fmt))
  return (mean * np.float32(2.0 ** -e2)).astype(dt).astype(np.float32) * np.float32(2.0 ** e2)


@pytest.mark.parametrize("fmt,dt", [("fp8_e4m3", ml_dtypes.float8_e4m3fn),
                                     ("fp8_e5m2", ml_dtypes.float8_e5m2)])
@pytest.mark.parametrize("shape", [(64, 32), (13, 5)])  # 13 x 5 = 65: a ragged last chunk
def test_fp8_mean_over_matches_a_numpy_reference_and_sends_bytes(rng, fmt, dt, shape):
  mesh = distributed.make_mesh("data:8")
  g = (rng.standard_normal((8, *shape)) * np.exp2(rng.integers(-6, 6, (8, 1, 1)))).astype(
      np.float32)
  f = jax.jit(jax.shard_map(lambda v: distributed.fp8_mean_over(v[0], "data", fmt), mesh=mesh,
                            in_specs=P("data"), out_specs=P(), check_vma=False))
  got = np.asarray(f(g))
  want = _fp8_mean_reference(g, fmt, dt)
  # Summation order of the 8 copies may differ from numpy's; one FP8 step apart at most.
  ulp = np.float32(2.0 ** int(distributed.fp8_communication_scale(
      jnp.float32(np.abs(want).max()), fmt))) * {"fp8_e4m3": 2.0 ** -9, "fp8_e5m2": 2.0 ** -16}[fmt]
  close = np.isclose(got, want, rtol=0, atol=0) | (np.abs(got - want) <= np.maximum(
      np.abs(want) * 2.0 ** -2, ulp))
  assert close.all() and (got == want).mean() > 0.99, (got == want).mean()
  # Two FP8 roundings: within 2 x 2^-m of the largest magnitude per rounding.
  m = {"fp8_e4m3": 3, "fp8_e5m2": 2}[fmt]
  exact = g.mean(0)
  assert np.abs(got - exact).max() <= 2 * 2.0 ** -m * np.abs(g).max()
  hlo = f.lower(g).compile().as_text()
  comms = [l for l in hlo.splitlines() if re.search(r" (all-gather|all-to-all)\(", l)]
  kinds = {k for l in comms for k in ("all-gather", "all-to-all") if f" {k}(" in l}
  assert kinds == {"all-gather", "all-to-all"}, comms
  assert all(re.search(r"= \(?u8\[", l) for l in comms), comms  # bytes on the wire


def test_fp8_mean_over_propagates_nan():
  mesh = distributed.make_mesh("data:8")
  g = np.ones((8, 4), np.float32)
  g[2, 1] = np.nan
  f = jax.jit(jax.shard_map(lambda v: distributed.fp8_mean_over(v[0], "data"), mesh=mesh,
                            in_specs=P("data"), out_specs=P(), check_vma=False))
  assert np.isnan(np.asarray(f(g))).any()


def _mlp_loss(params, x, y, key, recipe="nvfp4"):
  h = fp4jax.qdot_general(x, params["w1"], (((1,), (0,)), ((), ())), recipe=recipe, key=key)
  out = jnp.tanh(h) @ params["w2"]
  return jnp.mean((out - y) ** 2)


def _mlp(rng, batch=128):
  params = {"w1": jnp.asarray(rng.standard_normal((64, 64)) * 0.2, jnp.float32),
            "w2": jnp.asarray(rng.standard_normal((64, 8)) * 0.2, jnp.float32)}
  x = rng.standard_normal((batch, 64)).astype(np.float32)
  y = rng.standard_normal((batch, 8)).astype(np.float32)
  return params, x, y


def _rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("mesh_spec", ["data:8", "data:2,fsdp:4"])
def test_data_parallel_f32_equals_value_and_grad_without_quantization(rng, mesh_spec):
  params, x, y = _mlp(rng)
  loss = lambda p, x, y, k: _mlp_loss(p, x, y, k, recipe="bf16")
  exact_l, exact_g = jax.jit(jax.value_and_grad(loss))(params, x, y, jax.random.key(0))
  mesh = distributed.make_mesh(mesh_spec)
  for comm, bound in (("f32", 1e-5), ("fp8_e4m3", 2.0 ** -4), ("fp8_e5m2", 2.0 ** -3)):
    f = distributed.data_parallel_value_and_grad(loss, mesh, batch_argnums=(0, 1),
                                                 key_argnum=2, grad_comm=comm)
    placed = distributed.place(params, distributed.state_shardings(params, mesh, 16))
    got_l, got_g = jax.jit(f)(placed, *distributed.shard_batch([x, y], mesh), jax.random.key(0))
    np.testing.assert_allclose(got_l, exact_l, rtol=1e-5)
    for k in params:  # FP8 keeps 3 (E4M3) / 2 (E5M2) mantissa bits: rel. error <= 2^-4 / 2^-3
      assert _rel(got_g[k], exact_g[k]) < bound, (comm, k, _rel(got_g[k], exact_g[k]))


@pytest.mark.parametrize("mesh_spec", ["data:8", "data:2,fsdp:4"])
def test_data_parallel_fp8_changes_nvfp4_gradients_only_by_fp8_rounding(rng, mesh_spec):
  params, x, y = _mlp(rng, batch=256)
  key = jax.random.key(0)
  mesh = distributed.make_mesh(mesh_spec)
  placed = distributed.place(params, distributed.state_shardings(params, mesh, 16))
  batch = distributed.shard_batch([x, y], mesh)
  out = {}
  for comm in ("f32", "fp8_e4m3"):
    f = distributed.data_parallel_value_and_grad(_mlp_loss, mesh, batch_argnums=(0, 1),
                                                 key_argnum=2, grad_comm=comm)
    out[comm] = jax.jit(f)(placed, *batch, key)
  assert float(out["f32"][0]) == float(out["fp8_e4m3"][0])  # same forward, same keys
  for k in params:
    assert _rel(out["fp8_e4m3"][1][k], out["f32"][1][k]) < 2.0 ** -4, k
  exact_l, _ = jax.jit(jax.value_and_grad(_mlp_loss))(params, x, y, key)
  np.testing.assert_allclose(out["f32"][0], exact_l, rtol=1e-2)  # only SR keys differ


def test_data_parallel_shards_draw_distinct_random_bits():
  mesh = distributed.make_mesh("data:8")

  def loss(p, x, key):  # d loss / d p = this shard's uniform draw (x is all ones)
    return jnp.sum(p * jax.random.uniform(key, p.shape)) * jnp.mean(x)

  p = jnp.zeros((256,))
  f = distributed.data_parallel_value_and_grad(loss, mesh, batch_argnums=(0,), key_argnum=1)
  _, g = jax.jit(f)(p, jnp.ones((8, 1)), jax.random.key(1))
  one = jax.random.uniform(jax.random.key(1), p.shape)
  # A mean of 8 distinct uniforms is far from any single draw and has a smaller spread.
  assert float(jnp.abs(g - one).max()) > 0.1
  assert float(jnp.std(g)) < 0.6 * float(jnp.std(one))


def test_data_parallel_value_and_grad_rejects_unknown_grad_comm_and_axes():
  mesh = distributed.make_mesh("data:8")
  with pytest.raises(ValueError, match="grad_comm must be one of f32, fp8_e4m3, fp8_e5m2"):
    distributed.data_parallel_value_and_grad(lambda p: p, mesh, batch_argnums=(),
                                             grad_comm="fp8")
  with pytest.raises(ValueError, match=re.escape("axes ['model'] are not axes of the mesh")):
    distributed.data_parallel_value_and_grad(lambda p: p, mesh, batch_argnums=(),
                                             axes=("data", "model"))


def test_data_parallel_over_the_data_axis_only_leaves_fsdp_to_the_partitioner(rng):
  params, x, y = _mlp(rng)
  loss = lambda p, x, y, k: _mlp_loss(p, x, y, k, recipe="bf16")
  exact_l, exact_g = jax.jit(jax.value_and_grad(loss))(params, x, y, jax.random.key(0))
  mesh = distributed.make_mesh("data:2,fsdp:4")
  f = distributed.data_parallel_value_and_grad(loss, mesh, batch_argnums=(0, 1), key_argnum=2,
                                               grad_comm="fp8_e4m3", axes=("data",))
  placed = distributed.place(params, distributed.state_shardings(params, mesh, 16))
  got_l, got_g = jax.jit(f)(placed, *distributed.shard_batch([x, y], mesh), jax.random.key(0))
  np.testing.assert_allclose(got_l, exact_l, rtol=1e-5)
  for k in params:
    assert _rel(got_g[k], exact_g[k]) < 2.0 ** -4, k


def test_communicated_bytes():
  g = {"w": jnp.zeros((100, 10)), "b": jnp.zeros((10,)), "i": jnp.zeros((3,), jnp.int32)}
  assert distributed.communicated_bytes(g, "f32", 1) == 0
  assert distributed.communicated_bytes(g, "f32", 2) == 4 * 1010
  assert distributed.communicated_bytes(g, "fp8_e4m3", 2) == 1010 + 16  # a quarter, + amaxes
  assert distributed.communicated_bytes(g, "fp8_e4m3", 8) * 4 < \
      distributed.communicated_bytes(g, "f32", 8) + 64


# --------------------------------------------------------------------- checkpoints

def test_checkpoint_written_on_8_devices_restores_on_1_and_on_another_mesh(tmp_path, rng):
  state = {"w": jnp.asarray(rng.standard_normal((64, 128)), jnp.float32),
           "q": fp4jax.quantize(jnp.asarray(rng.standard_normal((32, 64)), jnp.float32), "nvfp4"),
           "step": jnp.int32(7), "key": jax.random.key(5)}
  mesh8 = distributed.make_mesh("fsdp:8")
  saved = distributed.place(state, distributed.state_shardings(state, mesh8, 16))
  assert len(saved["w"].sharding.device_set) == 8
  assert saved["w"].sharding.shard_shape((64, 128)) == (64, 16)
  fp4jax.checkpoint.save(tmp_path / "ckpt", 7, saved)
  for spec in ("data:1", "data:2,fsdp:4"):
    mesh = distributed.make_mesh(spec)
    target = distributed.place(jax.tree.map(jnp.zeros_like, state),
                               distributed.state_shardings(state, mesh, 16))
    target["key"] = jax.device_put(jax.random.key(0), NamedSharding(mesh, P()))
    got = fp4jax.checkpoint.restore(tmp_path / "ckpt", target)
    assert got["w"].sharding == target["w"].sharding
    assert len(got["w"].sharding.device_set) == mesh.devices.size
    _leaves_equal({k: v for k, v in state.items() if k != "key"},
                  {k: v for k, v in got.items() if k != "key"})
    assert jax.random.key_data(got["key"]).tolist() == jax.random.key_data(state["key"]).tolist()


# --------------------------------------------------------------------- multi-host

@pytest.mark.parametrize("env,args,expected", [
    ({}, {}, None),                                                    # one host: nothing
    ({"SLURM_NTASKS": "1"}, {}, None),
    ({"SLURM_NTASKS": "4"}, {}, {"coordinator_address": None, "num_processes": None,
                                 "process_id": None}),                 # JAX reads SLURM itself
    ({"JAX_COORDINATOR_ADDRESS": "h:1234"}, {}, {"coordinator_address": None,
                                                 "num_processes": None, "process_id": None}),
    ({}, {"coordinator_address": "h:1", "num_processes": 2, "process_id": 1},
     {"coordinator_address": "h:1", "num_processes": 2, "process_id": 1}),
])
def test_initialize_if_multihost_calls_jax_distributed_only_when_launched(monkeypatch, env,
                                                                         args, expected):
  for k in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "JAX_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(k, raising=False)
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  assert distributed.initialize_if_multihost(**args) == (expected is not None)
  assert calls == ([] if expected is None else [expected])


@pytest.mark.parametrize("call", [
    lambda: distributed.fp8_communication_scale(jnp.float32(1.0), "fp8_e3m4"),
    lambda: distributed.fp8_encode(jnp.ones(3), jnp.int32(0), "fp8"),
    lambda: distributed.communicated_bytes({"w": jnp.zeros(4)}, "bf16", 2),
])
def test_fp8_helpers_reject_unknown_formats(call):
  with pytest.raises(ValueError, match="grad_comm must be one of f32, fp8_e4m3, fp8_e5m2"):
    call()


@pytest.mark.parametrize("fsdp,align", [(0, 1), (2, 0), (-1, 32)])
def test_fsdp_partition_rejects_non_positive_sizes(fsdp, align):
  with pytest.raises(ValueError, match="must be >= 1"):
    distributed.fsdp_partition((64, 64), fsdp, align)
