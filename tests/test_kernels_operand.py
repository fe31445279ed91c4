"""fp4jax.kernels.operand: the Pallas operand kernel equals the reference bit for bit
(interpret mode on CPU, compiled on a GPU), and the fused layer gives the same numbers
through it as through XLA's emitter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sweeps
from fp4jax import dispatch, qdot_fused, recipes
from fp4jax.kernels import operand as ko
from fp4jax.kernels import float_scale_operand as kf
from fp4jax.spec import get_spec
from conftest import bits_equal_or_both_nan
from test_operand import _every_bf16, _u, _wide

INTERPRET = dispatch.interpret_mode()
MODES = ("floor", "ceil", "even", "rceil")


def _data(kind, shape):
  if kind == "col_specials_f32":   # _wide's special blocks laid along columns
    return jnp.asarray(np.ascontiguousarray(np.asarray(_wide(shape[::-1], 15, jnp.float32)).T))
  if kind == "every_bf16":
    return _every_bf16(shape, 11)
  if kind == "specials_f32":
    x = np.asarray(_wide(shape, 12, jnp.float32)).copy()
    x[1, 7], x[20, 3], x[-1, -1] = np.nan, np.inf, -np.inf
    return jnp.asarray(x)
  return _wide(shape, 13, jnp.bfloat16 if kind == "wide_bf16" else jnp.float32,
               tiny=kind == "tiny_f32")


def _spec(mode, rounding, block):
  return get_spec("mxfp4").replace(scale_mode=mode, rounding=rounding, block_size=block)


DATA = ("every_bf16", "wide_bf16", "wide_f32", "tiny_f32", "specials_f32", "col_specials_f32")
# The one-multiply variant is exact where the kernel's multiply keeps subnormals (checked
# compiled on the GPU); interpret mode on XLA:CPU flushes them.
IEEE = [False] + ([True] if dispatch.device_facts().keeps_subnormals else [])


# float32 values are what the fused layers emit off GPUs (no BF16 dot): CPU runs cover them,
# the GPU test command the BF16 ones (halving its share of the call).
OUTPUTS = {"bf16": jnp.bfloat16} | ({} if dispatch.device_facts().on_gpu else {"f32": jnp.float32})


def _assert_same(got, want):
  # Bit for bit, NaN payload and sign aside (a NaN block's values are NaN; Triton's NaN
  # bits differ from XLA's, and they carry no value: conftest.bits_equal_or_both_nan).
  assert got.dtype == want.dtype and got.shape == want.shape
  ok = bits_equal_or_both_nan(got, want)
  assert ok.all(), f"{int((~ok).sum())} values differ; first at {np.argwhere(~ok)[:3].tolist()}"


@pytest.mark.parametrize("mode,rounding,block,orient,out", sweeps.product(
    10, mode=MODES, rounding=["nearest", "stochastic"], block=[16, 32],
    orient=["rows", "cols", "both"], out=OUTPUTS))
def test_kernel_equals_reference(mode, rounding, block, orient, out):
  sp = _spec(mode, rounding, block)
  k_rows, k_cols = jax.random.key(1), jax.random.key(2)
  for data in DATA:
    x = _data(data, (96, 160))           # 160 columns: the tile shrinks to divide them
    for ieee in IEEE:
      if orient == "both":
        got = ko.gemm_operand_both(x, sp, sp, k_rows, k_cols, dtype=out, interpret=INTERPRET,
                                   ieee_subnormals=ieee)
        want = (ko.gemm_operand_reference(x, sp, -1, k_rows, dtype=out),
                ko.gemm_operand_reference(x, sp, -2, k_cols, dtype=out))
      else:
        axis = -1 if orient == "rows" else -2
        got = (ko.gemm_operand(x, sp, axis, k_rows, dtype=out, interpret=INTERPRET,
                               ieee_subnormals=ieee),)
        want = (ko.gemm_operand_reference(x, sp, axis, k_rows, dtype=out),)
      for g, w in zip(got, want):
        assert g.dtype == jnp.dtype(out), (data, ieee)
        _assert_same(g, w)


@pytest.mark.parametrize("shape,axis,config", [
    ((3, 64, 96), -1, None),                          # leading dims flattened
    ((2, 64, 48), -2, None),                          # column blocks never cross them
    ((64, 40), -2, None),                             # no power-of-two tile divides 40: padded
    ((128, 256), -1, ko.OperandKernelConfig(16, 64, 4)),
    ((128, 256), -2, ko.OperandKernelConfig(32, 32, 2)),
    ((64, 96), -1, ko.OperandKernelConfig(hash_per_word=False)),  # one hash per element
    ((64, 42), -2, None),                             # 42 columns: not whole words
    ((64, 96), -2, ko.OperandKernelConfig(64, 128, 4, hash_per_word=False))])
def test_shapes_tiles_and_padding(shape, axis, config, rng):
  sp = _spec("floor", "stochastic", 32)
  x = jnp.asarray(rng.standard_normal(shape).astype(np.float32))
  key = jax.random.key(4)
  got = ko.gemm_operand(x, sp, axis, key, interpret=INTERPRET, config=config)
  _assert_same(got, ko.gemm_operand_reference(x, sp, axis, key))


def test_ieee_variant_on_normal_data(rng):
  # One multiply per element: exact wherever the kernel's multiply keeps subnormals, and
  # on data whose products and results stay normal on any backend.
  sp = _spec("floor", "nearest", 32)
  x = jnp.asarray(rng.standard_normal((64, 128)).astype(np.float32))
  got = ko.gemm_operand(x, sp, -1, interpret=INTERPRET, ieee_subnormals=True)
  np.testing.assert_array_equal(_u(got), _u(ko.gemm_operand_reference(x, sp, -1)))


def test_stochastic_rounding_is_unbiased_and_reproducible():
  sp = _spec("floor", "stochastic", 32)
  x = jnp.full((32, 64), 0.3, jnp.float32).at[:, ::32].set(5.0)  # scale 1: 0.3 in (0, 0.5)
  f = jax.jit(lambda k: ko.gemm_operand(x, sp, -1, k, dtype=jnp.float32,
                                        interpret=INTERPRET))
  vals = np.stack([np.asarray(f(jax.random.key(i))) for i in range(24)])
  np.testing.assert_array_equal(vals[0], np.asarray(f(jax.random.key(0))))
  inner = np.concatenate([vals[:, :, 1:32], vals[:, :, 33:]], axis=-1)
  assert set(np.unique(inner)) == {0.0, 0.5}
  assert abs(inner.mean() - 0.3) < 0.01, inner.mean()


@pytest.mark.parametrize("call,match", [
    (lambda x: ko.gemm_operand(x, get_spec("nvfp4"), -1), "float block scales"),
    (lambda x: ko.gemm_operand(jnp.ones((32, 32, 64)), get_spec("mxfp4"), 0), "last two axes"),
    (lambda x: ko.gemm_operand(x[0, 0], get_spec("mxfp4"), -1), "rank 1"),
    (lambda x: ko.gemm_operand(x[..., :40], get_spec("mxfp4"), -1), "not a multiple of its block"),
    (lambda x: ko.gemm_operand(x.astype(jnp.float16), get_spec("mxfp4"), -1), "float16"),
    (lambda x: ko.gemm_operand(x, get_spec("mxfp4").replace(rounding="stochastic"), -1),
     "needs key="),
    (lambda x: ko.gemm_operand(x, get_spec("mxfp4"), -1, dtype=jnp.float16), "dtype must be"),
])
def test_bad_input_is_named(call, match):
  x = jnp.ones((2, 32, 64), jnp.float32)
  with pytest.raises(ValueError, match=match):
    call(x)


_SMALL = ("pallas", ko.OperandKernelConfig(16, 64, 4))
TABLES = {"default": (), "separate": (("both/nearest", ("separate", None)),
                                      ("both/stochastic", ("separate", None)),
                                      ("rows/nearest", _SMALL), ("cols/stochastic", ("xla", None))),
          "xla_both": (("both/nearest", ("xla", None)), ("both/stochastic", ("xla", None)),
                       ("cols/nearest", _SMALL)),
          # A table that measured XLA faster for every float-scale operand.
          "float_xla": tuple((f"float_{o}/{r}", ("xla", None)) for o in kf.ORIENTATIONS
                             for r in ("nearest", "stochastic"))}


def _kernel_launches(fn, *args, name: str = "fp4jax_gemm_operand") -> int:
  """How many pallas_call equations whose name starts with ``name`` the traced ``fn``
  holds (nested jaxprs included)."""
  def count(jaxpr):
    n = 0
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "pallas_call":
        info = eqn.params.get("name_and_src_info", eqn.params.get("name", ""))
        n += str(getattr(info, "name", info)).startswith(name)
      for v in eqn.params.values():
        for sub in (v if isinstance(v, (tuple, list)) else (v,)):
          if hasattr(sub, "eqns"):
            n += count(sub)
          elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
            n += count(sub.jaxpr)
    return n
  return count(jax.make_jaxpr(fn)(*args).jaxpr)


# (recipe, table, (B, M, K, N), power-of-two kernel launches in forward + backward, and
# float-scale ones). mxfp4: forward A and W, backward dY (both orientations in one launch,
# or two: "separate"), W for dgrad, A for wgrad. nvfp4: float scales, so the float-scale
# kernels: A (forward), dY for dgrad, and A and dY for wgrad through the 16-point Hadamard
# (two passes each; under the butterfly method, this machine's); the 16x16 weight in XLA.
# M = 40: the wgrad tokens are padded to 64, so dY takes two launches (no "both").
@pytest.mark.parametrize("recipe,table,dims,launches", [
    ("mxfp4", "default", (1, 64, 128, 64), (5, 0)), ("mxfp4", "separate", (1, 64, 128, 64), (6, 0)),
    ("mxfp4", "default", (2, 40, 128, 64), (6, 0)), ("tetrajet", "default", (1, 64, 128, 64), None),
    ("tetrajet", "xla_both", (1, 64, 128, 64), None), ("quartet", "default", (1, 64, 128, 64), None),
    ("nvfp4", "default", (1, 64, 128, 64), (0, 6)), ("nvfp4", "float_xla", (1, 64, 128, 64), (0, 0))])
# The variant the dispatch runs on this device (both variants: test_kernel_equals_reference).
@pytest.mark.parametrize("ieee", IEEE[-1:])
def test_fused_layer_through_the_kernel_equals_xla_emitter(recipe, table, dims, launches,
                                                           ieee, rng):
  # Same operands bit for bit, same GEMMs: the loss and both gradients agree exactly, and
  # the kernel did run where the recipe has power-of-two scales.
  r = recipes.get(recipe)
  b, m, k, n = dims
  gemm_dtype = jnp.bfloat16 if dispatch.device_facts().bf16_dot else jnp.float32
  a = jnp.asarray(rng.standard_normal((b, m, k)).astype(np.float32))
  w = jnp.asarray(rng.standard_normal((b, k, n)).astype(np.float32) * 0.1)
  c = jnp.asarray(rng.standard_normal((b, m, n)).astype(np.float32))
  kd = jax.random.key_data(jax.random.key(5))
  kernel = qdot_fused.KernelEmit(interpret=INTERPRET, min_elements=0, choices=TABLES[table],
                                 ieee_subnormals=ieee)

  def value_and_grads(emit):
    def loss(a, w):
      qmatmul = qdot_fused.qmatmul_for(r, jnp.float32, gemm_dtype, False, emit,
                                       hadamard_method=dispatch.device_facts().hadamard_method)
      return jnp.sum(qmatmul(a, w, kd) * c)
    return jax.value_and_grad(loss, argnums=(0, 1))

  got = value_and_grads(kernel)(a, w)
  want = value_and_grads(None)(a, w)
  for name, u, v in zip(("loss", "da", "dw"), jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v), err_msg=f"{recipe}: {name}")
  count = (_kernel_launches(value_and_grads(kernel), a, w),
           _kernel_launches(value_and_grads(kernel), a, w, name="fp4jax_float_scale"))
  assert _kernel_launches(value_and_grads(None), a, w, name="fp4jax_") == 0
  if launches is None:
    assert count[0] > 0, f"{recipe}: the kernel never ran"
  else:
    assert count == launches, f"{recipe} ({table}): {count} kernel launches, expected {launches}"


def test_xla_both_choice_keeps_dy_in_xla(rng):
  # A table that measured XLA faster for dY's pair sends both of its emits to XLA.
  r = recipes.get("mxfp4")
  a = jnp.ones((1, 64, 128), jnp.float32)
  w = jnp.ones((1, 128, 64), jnp.float32)
  kd = jax.random.key_data(jax.random.key(5))

  def grads(choices):
    emit = qdot_fused.KernelEmit(interpret=INTERPRET, min_elements=0, choices=choices)
    qmatmul = qdot_fused.qmatmul_for(r, jnp.float32, jnp.float32, False, emit,
                                     hadamard_method="butterfly")  # mxfp4: no transform
    return jax.grad(lambda a, w: jnp.sum(qmatmul(a, w, kd)), argnums=(0, 1))

  assert _kernel_launches(grads(TABLES["xla_both"]), a, w) == 4   # fwd A, W; dgrad W; wgrad A


@pytest.mark.parametrize("rows,cols", [("nearest-32", "stochastic-32"),
                                       ("stochastic-16", "nearest-32")])
def test_both_with_different_specs(rows, cols):
  # dgrad's and wgrad's dY specs may differ (rounding, block size): each output is its own
  # spec's reference, with its own key (a zero seed for a nearest side).
  def spec(s):
    rounding, block = s.split("-")
    return _spec("floor", rounding, int(block))
  rs, cs = spec(rows), spec(cols)
  x = _data("wide_bf16", (64, 96))
  kr, kc = jax.random.key(8), jax.random.key(9)
  got_r, got_c = ko.gemm_operand_both(x, rs, cs, kr, kc, interpret=INTERPRET)
  _assert_same(got_r, ko.gemm_operand_reference(x, rs, -1, kr))
  _assert_same(got_c, ko.gemm_operand_reference(x, cs, -2, kc))


def test_dispatch_reads_the_measured_table():
  hopper = dispatch.DeviceFacts("gpu", 9, "NVIDIA H200")
  table = {"NVIDIA H200": {"rows/nearest": {"emitter": "pallas", "config": [16, 128, 4, 1]},
                           "both/stochastic": {"emitter": "separate", "ms": {"xla": 1.0}},
                           "kernel_ieee_subnormals": True}}
  emit = dispatch.kernel_emit(dispatch.choose_operand_emitter("auto", hopper), hopper, table)
  assert emit.choice("rows", "nearest") == ("pallas", ko.OperandKernelConfig(16, 128, 4, 1))
  assert emit.choice("both", "stochastic") == ("separate", None)
  assert emit.choice("cols", "nearest") == ("pallas", None)      # not measured: defaults
  assert emit.ieee_subnormals
  # An unmeasured kind takes a measured one of its generation, if the table says which.
  sibling = dispatch.DeviceFacts("gpu", 9, "NVIDIA H100 80GB HBM3")
  emit = dispatch.kernel_emit(dispatch.choose_operand_emitter("auto", sibling), sibling, table)
  assert emit.choices == () and not emit.ieee_subnormals        # no generation: defaults
  table["NVIDIA H200"]["generation"] = 9
  emit = dispatch.kernel_emit(dispatch.choose_operand_emitter("auto", sibling), sibling, table)
  assert emit.choice("rows", "nearest") == ("pallas", ko.OperandKernelConfig(16, 128, 4, 1))
  assert emit.ieee_subnormals
  # A measured kind keeps its own table over a sibling's; between siblings, the first by name.
  table["NVIDIA H100 80GB HBM3"] = {"rows/nearest": {"emitter": "xla"}, "generation": 9}
  emit = dispatch.kernel_emit(dispatch.choose_operand_emitter("auto", sibling), sibling, table)
  assert emit.choice("rows", "nearest") == ("xla", None) and not emit.ieee_subnormals
  gh200 = dispatch.DeviceFacts("gpu", 9, "NVIDIA GH200 480GB")
  assert dispatch.measured_operand_table(gh200, table) is table["NVIDIA H100 80GB HBM3"]
  blackwell = dispatch.DeviceFacts("gpu", 10, "NVIDIA B200")
  emit = dispatch.kernel_emit(dispatch.choose_operand_emitter("auto", blackwell), blackwell,
                              table)
  assert emit.choices == () and not emit.ieee_subnormals        # unmeasured: exact anywhere


def test_measured_operand_table_names_bad_arguments():
  h100 = dispatch.DeviceFacts("gpu", 9, "NVIDIA H100 80GB HBM3")
  with pytest.raises(TypeError, match="facts must be a DeviceFacts"):
    dispatch.measured_operand_table("NVIDIA H100", {})
  with pytest.raises(TypeError, match="table must map device kinds to dicts"):
    dispatch.measured_operand_table(h100, {"NVIDIA H200": [("rows/nearest", "xla")]})
  with pytest.raises(TypeError, match="table must map device kinds to dicts"):
    dispatch.measured_operand_table(h100, [("NVIDIA H200", {})])


def test_the_shipped_table_covers_hopper_kinds():
  h100 = dispatch.DeviceFacts("gpu", 9, "NVIDIA H100 80GB HBM3")
  from fp4jax.kernels import operand_tuning
  assert dispatch.measured_operand_table(h100, operand_tuning.TABLE) is \
      operand_tuning.TABLE["NVIDIA H200"]
  emit = dispatch.kernel_emit(dispatch.choose_operand_emitter("auto", h100), h100)
  assert emit.ieee_subnormals and emit.choice("rows", "nearest")[0] == "pallas"


def test_dispatch_takes_the_kernel_under_auto_on_gpus_only():
  hopper = dispatch.DeviceFacts("gpu", 9, "NVIDIA H200")
  assert dispatch.choose_operand_emitter("auto", hopper).impl is dispatch.OperandEmitter.PALLAS
  assert dispatch.choose_operand_emitter("fused", hopper).impl is dispatch.OperandEmitter.XLA
  cpu = dispatch.DeviceFacts("cpu")
  assert dispatch.choose_operand_emitter("fused", cpu).impl is dispatch.OperandEmitter.XLA
  assert dispatch.kernel_emit(dispatch.choose_operand_emitter("fused", cpu), cpu) is None
  emit = dispatch.kernel_emit(dispatch.choose_operand_emitter("auto", hopper), hopper)
  assert emit.interpret is False and emit.min_elements > 0


@pytest.mark.parametrize("kwargs,match", [
    ({"block_rows": 24}, "block_rows must be a power of two"),
    ({"num_warps": 0}, "num_warps must be a power of two"),
    ({"hash_per_word": "no"}, "hash_per_word must be True or False")])
def test_bad_kernel_config_is_named(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ko.OperandKernelConfig(**kwargs)
