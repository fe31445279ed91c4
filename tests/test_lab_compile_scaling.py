"""kernels.train_step.compile_stats (what kernels.compile_scaling prints): compile time and
graph size per recipe and depth."""

import pytest

from kernels import train_step


def test_measure_reports_sizes_that_grow_with_depth():
  # 48^2 images (9 tokens), not 32^2 (5): on an AMD EPYC without AVX-512, XLA:CPU's LLVM
  # aborts compiling the 5-token attention's bf16 transpose ("Cannot select: v8bf16 =
  # X86ISD::VBROADCAST", as llvm/llvm-project#91005 did for f16; seen with jax 0.12.1 on
  # 2026-12-08). Back to 32 once jaxlib's LLVM selects it.
  rows = [train_step.compile_stats("mxfp4", d, width=64, batch=2, image=48, impl="fused")
          for d in (1, 2)]
  for row in rows:
    assert set(row) == {"lower_s", "compile_s", "stablehlo_lines", "optimized_hlo_lines"}
    assert row["compile_s"] > 0 and row["stablehlo_lines"] > 100
  # One more unrolled block: a larger graph, by less than a second copy of everything.
  assert rows[0]["stablehlo_lines"] < rows[1]["stablehlo_lines"] < 2 * rows[0]["stablehlo_lines"]


def test_unknown_recipe_is_named():
  with pytest.raises((KeyError, ValueError), match="nvfp3"):
    train_step.compile_stats("nvfp3", 1, width=64, batch=2, image=32, impl="fused")
