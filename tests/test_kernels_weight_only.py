"""fp4jax/kernels/weight_only.py (and fp4jax.weight_only_matmul) against its reference."""

import jax.numpy as jnp
import numpy as np
import pytest

import fp4jax
from fp4jax.kernels import weight_only as wo
from matmul_checks import INTERPRET, MX


@pytest.mark.parametrize("name", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("m,splits", [(1, 1), (5, 2), (16, None), (40, 4)])
def test_weight_only_matches_reference(name, m, splits, rng):
  w = fp4jax.quantize(jnp.asarray(rng.standard_normal((512, 128)).astype(np.float32)), name, -2)
  x = jnp.asarray(rng.standard_normal((m, 512)).astype(np.float32))
  y = np.asarray(wo.weight_only_matmul(x, w, out_dtype=jnp.float32, tile=(16, 64, 128),
                                       splits=splits, interpret=INTERPRET), np.float64)
  ref = np.asarray(wo.weight_only_reference(x, w), np.float64)
  xb = np.abs(np.asarray(x.astype(jnp.bfloat16).astype(jnp.float32), np.float64))
  mag = xb @ np.abs(np.asarray(fp4jax.dequantize(w, jnp.float32), np.float64))
  assert y.shape == (m, 128)
  assert (np.abs(y - ref) <= 2.0**-20 * mag + 1e-30).all()


def test_public_weight_only_matmul_takes_interpret_from_the_device(rng):
  w = fp4jax.quantize(jnp.asarray(rng.standard_normal((256, 64)).astype(np.float32)), MX, -2)
  x = jnp.asarray(rng.standard_normal((3, 256)).astype(np.float32))
  y = fp4jax.weight_only_matmul(x, w, out_dtype=jnp.float32, tile=(16, 64, 128))
  np.testing.assert_allclose(np.asarray(y), np.asarray(wo.weight_only_reference(x, w)),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m,bm", [(1, 16), (16, 16), (17, 32), (40, 64), (64, 64), (300, 64)])
def test_weight_only_rows_tile_is_a_power_of_two(m, bm):
  assert wo.weight_only_rows_tile(m) == bm


@pytest.mark.parametrize("m,n,k,expected", [
    (16, 8192, 8192, 4),     # 128 output tiles of 64 columns: 4 K splits fill 2 per SM
    (64, 8192, 8192, 4),     # bm = 64: one row tile
    (256, 8192, 8192, 1),    # 4 x 128 tiles are enough
    (16, 8192, 512, 2),      # K / bk = 2 allows at most 2
])
def test_weight_only_splits_fill_the_gpu(m, n, k, expected):
  assert wo.weight_only_splits(m, n, k, wo.weight_only_rows_tile(m), 64, 256) == expected


def test_bad_weights_are_rejected_with_the_fix():
  a = fp4jax.quantize(jnp.ones((64, 128)), MX, -1)
  b = fp4jax.quantize(jnp.ones((128, 64)), MX, -2)
  with pytest.raises(ValueError, match="blocked along K"):
    wo.weight_only_matmul(jnp.ones((4, 128)), a)
  with pytest.raises(ValueError, match="do not contract"):
    wo.weight_only_matmul(jnp.ones((4, 96)), b)
  with pytest.raises(ValueError, match="packed E2M1 weights"):
    wo.weight_only_matmul(jnp.ones((4, 128)), fp4jax.quantize(jnp.ones((128, 64)), "mxfp8_e4m3", -2))
  with pytest.raises(ValueError, match="splits=3 must be >= 1 and divide"):
    wo.weight_only_matmul(jnp.ones((4, 128)), b, tile=(16, 64, 32), splits=3)
  with pytest.raises(ValueError, match="not a multiple of the tile"):
    wo.weight_only_matmul(jnp.ones((4, 128)), b, tile=(16, 48, 128))


def test_tile_scaled_weights_are_rejected():
  # nvfp4_2d has 16x16 tiles: its scales are (K/16, N/16), not the kernel's (K/16, N).
  w = fp4jax.quantize(jnp.ones((128, 64)), "nvfp4_2d", -2)
  with pytest.raises(ValueError, match="packed E2M1 weights"):
    wo.weight_only_matmul(jnp.ones((4, 128)), w)


def _run_ptx(asm, operands):
  """A tiny interpreter of the PTX in ``asm`` (the instructions it uses) over uint32
  registers: ``operands`` maps $i to values (the inputs); returns the registers."""
  import re
  import ml_dtypes
  regs = {f"${i}": np.uint32(v) for i, v in operands.items()}

  def val(tok):
    tok = tok.strip()
    return regs[tok] if (tok.startswith("$") or tok in regs) else np.uint32(int(tok, 0))

  def bf16x2(u):
    halves = np.array([u & 0xFFFF, u >> 16], np.uint16)
    return halves.view(ml_dtypes.bfloat16).astype(np.float64)

  for line in asm.splitlines():
    line = line.strip().rstrip(";")
    if not line or line in "{}" or line.startswith(".reg"):
      continue
    op, rest = line.split(None, 1)
    d, *src = [t.strip() for t in rest.split(",")]
    a = [val(t) for t in src]
    if op == "mov.b32":
      r = a[0]
    elif op == "and.b32":
      r = a[0] & a[1]
    elif op == "or.b32":
      r = a[0] | a[1]
    elif op == "shr.b32":
      r = a[0] >> a[1]
    elif op == "shl.b32":
      r = np.uint32((int(a[0]) << int(a[1])) & 0xFFFFFFFF)
    elif op == "prmt.b32":
      pool = int(a[0]) | (int(a[1]) << 32)          # bytes 0-3 from a, 4-7 from b
      out = 0
      for i in range(4):
        sel = (int(a[2]) >> (4 * i)) & 0xF
        assert sel < 8, "the decode uses prmt's copy mode only"
        out |= ((pool >> (8 * sel)) & 0xFF) << (8 * i)
      r = np.uint32(out)
    elif op == "fma.rn.bf16x2":
      x, y, z = bf16x2(a[0]), bf16x2(a[1]), bf16x2(a[2])
      res = (x * y + z).astype(np.float32).astype(ml_dtypes.bfloat16)  # exact: see DECODERS
      r = np.uint32(int(res.view(np.uint16)[0]) | (int(res.view(np.uint16)[1]) << 16))
    else:
      raise AssertionError(f"unknown instruction {op}")
    regs[d] = r
  return regs


def test_the_prmt_decode_ptx_equals_the_alu_decode_for_every_code_byte():
  # The inline PTX runs only on a GPU; here its text is interpreted instruction by
  # instruction and compared with decode_alu for all 256 code bytes, in Triton's packing
  # (4 bytes per register, 2 BF16 per register, element 0 low), under scales that reach
  # BF16's range ends: 2^-127 (a subnormal), 2^127, 448 (UE4M3's largest), a negative
  # zero-sign check through -0 products, and NaN.
  import ml_dtypes
  # The expected weights are the E2M1 table times the scale in float64, rounded to BF16
  # (exact: see wo.DECODERS); decode_alu equals them wherever XLA:CPU keeps subnormals.
  scales = np.array([1.0, 2.0**-127, 2.0**127, 448.0, 0.001953125, np.nan], np.float32)
  byte = np.arange(256, dtype=np.uint8)
  e2m1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])
  for s in scales:
    # Byte j of a register gets scale s * 2^-j (BF16-exact: 2^-130 is a BF16 subnormal):
    # each lane must take its own byte's scale.
    sb = (s * 2.0 ** -np.arange(4)).astype(np.float32).astype(ml_dtypes.bfloat16)
    lane = np.arange(256) % 4
    exact = lambda c: (e2m1[c] * sb[lane].astype(np.float64)).astype(
        np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)
    lo_ref, hi_ref = exact(byte & 15), exact(byte >> 4)
    if s == 1.0:
      alu = wo.decode_alu(jnp.asarray(byte), jnp.asarray(sb[lane]))
      assert [np.asarray(a).view(np.uint16).tolist() for a in alu] == [
          lo_ref.tolist(), hi_ref.tolist()]
    bits16 = sb.view(np.uint16).astype(np.int64)
    s01, s23 = int(bits16[0] | bits16[1] << 16), int(bits16[2] | bits16[3] << 16)
    for start in range(0, 256, 4):
      four = byte[start:start + 4]
      packed = int(four[0]) | int(four[1]) << 8 | int(four[2]) << 16 | int(four[3]) << 24
      lanes = lambda r: [int(r["$0"]) & 0xFFFF, int(r["$0"]) >> 16,
                         int(r["$1"]) & 0xFFFF, int(r["$1"]) >> 16]
      got_lo, got_hi = (lanes(_run_ptx(wo.PRMT_DECODE_ASM[half],
                                       {2: packed, 3: s01, 4: s23}))
                        for half in ("low", "high"))
      want_lo, want_hi = lo_ref[start:start + 4], hi_ref[start:start + 4]
      if np.isnan(s):        # any NaN payload: the positions must agree
        assert all((g & 0x7FFF) > 0x7F80 for g in got_lo + got_hi)
        continue
      assert got_lo == want_lo.tolist(), (s, start, [hex(g) for g in got_lo])
      assert got_hi == want_hi.tolist(), (s, start, [hex(g) for g in got_hi])


def test_the_prmt_decoder_is_refused_in_interpret_mode():
  w = fp4jax.quantize(jnp.ones((256, 64)), MX, -2)
  with pytest.raises(ValueError, match="runs on a GPU only"):
    wo.weight_only_matmul(jnp.ones((2, 256)), w, decoder="prmt", interpret=True)
  with pytest.raises(ValueError, match="decoder must be one of"):
    wo.weight_only_matmul(jnp.ones((2, 256)), w, decoder="lut")


@pytest.mark.parametrize("m,block", [(1, 32), (16, 32), (17, 16), (64, 16), (300, 32)])
def test_the_measured_default_tile(m, block):
  """128 x 128 (measured fastest at every M <= 64 for both formats); smaller powers of
  two where they do not divide N or K."""
  bm = wo.weight_only_rows_tile(m)
  assert wo.weight_only_tile(m, 8192, 8192, block) == (bm, 128, 128)
  assert wo.weight_only_tile(m, 8192, 192, block) == (bm, 64, 128)   # 128 does not divide 192
  assert wo.weight_only_tile(m, 96, 8192, block) == (bm, 128, 32)


def test_auto_takes_the_gemv_for_one_row_only():
  assert wo._resolve_algorithm("auto", 1, "f") == "gemv"
  assert wo._resolve_algorithm("auto", 2, "f") == "mma"


def _magnitude(x, w):
  xb = np.abs(np.asarray(x.astype(jnp.bfloat16).astype(jnp.float32), np.float64))
  return xb @ np.abs(np.asarray(fp4jax.dequantize(w, jnp.float32), np.float64))


@pytest.mark.parametrize("name", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("layout", ["kn", "nk"])
@pytest.mark.parametrize("algorithm,m,tile,splits", [
    ("gemv", 1, None, None), ("gemv", 3, None, 2), ("gemv", 4, (4, 64, 64), 1),
    ("mma", 5, (16, 64, 128), 2), ("mma", 16, None, None)])
def test_every_layout_and_algorithm_matches_the_reference(name, layout, algorithm, m, tile,
                                                          splits, rng):
  """Both weight layouts ((K, N) through weight_only_matmul, (N, K) through
  weight_only_linear, the same blocks) and both algorithms equal the float32 reference
  within float32 accumulation order; padded rows are dropped."""
  w32 = jnp.asarray(rng.standard_normal((512, 128)).astype(np.float32))
  w32 = w32.at[:32, :3].set(0.0)   # a zero block
  if name == "mxfp4":   # a NaN block (NVFP4's tensor scale would make every weight NaN)
    w32 = w32.at[40, 5].set(jnp.nan)
  w = fp4jax.quantize(w32, name, -2)
  x = jnp.asarray(rng.standard_normal((m, 512)).astype(np.float32))
  kw = dict(out_dtype=jnp.float32, tile=tile, splits=splits, interpret=INTERPRET,
            algorithm=algorithm)
  if layout == "kn":
    y = wo.weight_only_matmul(x, w, **kw)
  else:
    y = wo.weight_only_linear(x, fp4jax.quantize(w32.T, name, -1), **kw)
  y = np.asarray(y, np.float64)
  ref = np.asarray(wo.weight_only_reference(x, w), np.float64)
  assert y.shape == (m, 128)
  np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))
  ok = np.isfinite(ref)
  assert ok.sum() > 0 and (~ok).any() == (name == "mxfp4")
  assert (np.abs(y - ref)[ok] <= 2.0**-20 * _magnitude(x, w)[ok] + 1e-30).all()


def test_the_linear_layout_and_algorithm_are_checked_with_the_fix():
  kn = fp4jax.quantize(jnp.ones((128, 64)), MX, -2)
  nk = fp4jax.quantize(jnp.ones((64, 128)), MX, -1)
  with pytest.raises(ValueError, match="use weight_only_matmul"):
    wo.weight_only_linear(jnp.ones((4, 128)), kn)
  with pytest.raises(ValueError, match="use weight_only_linear"):
    wo.weight_only_matmul(jnp.ones((4, 128)), nk)
  with pytest.raises(ValueError, match=r"x @ w.T takes x \(M, K\) and w \(N, K\)"):
    wo.weight_only_linear(jnp.ones((4, 64)), nk)
  with pytest.raises(ValueError, match="algorithm='gemv' takes M <= 4"):
    wo.weight_only_linear(jnp.ones((5, 128)), nk, algorithm="gemv", interpret=True)
  with pytest.raises(ValueError, match="algorithm must be one of"):
    wo.weight_only_matmul(jnp.ones((2, 128)), kn, algorithm="simt", interpret=True)
  with pytest.raises(ValueError, match="tiles of at most 4 rows"):
    wo.weight_only_matmul(jnp.ones((2, 128)), kn, algorithm="gemv", tile=(16, 64, 64),
                          interpret=True)


@pytest.mark.parametrize("m,bm", [(1, 1), (2, 2), (3, 4), (4, 4)])
def test_gemv_rows_tile(m, bm):
  assert wo.gemv_rows_tile(m) == bm


def test_public_weight_only_linear_runs_loaded_gpt_oss_weights_as_stored(rng):
  """(out, in) MXFP4 weights from the gpt-oss layout go to x @ w.T without a transpose."""
  from fp4jax import interop
  blocks = jnp.asarray(rng.integers(0, 256, (64, 8, 16), dtype=np.uint8))   # (N, K/32, 16)
  scales = jnp.asarray(rng.integers(120, 130, (64, 8), dtype=np.uint8))
  w = interop.mxfp4_from_blocks(blocks, scales)                            # (64, 256) axis -1
  x = jnp.asarray(rng.standard_normal((3, 256)).astype(np.float32))
  y = fp4jax.weight_only_linear(x, w, out_dtype=jnp.float32)
  ref = np.asarray(wo.weight_only_reference(x, w.mT), np.float64)
  assert y.shape == (3, 64)
  assert (np.abs(np.asarray(y, np.float64) - ref) <= 2.0**-20 * _magnitude(x, w.mT)).all()
