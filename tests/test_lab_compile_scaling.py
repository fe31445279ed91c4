"""kernels.train_step.compile_stats (what kernels.compile_scaling prints): compile time and
graph size per recipe and depth."""

import pytest

from kernels import train_step


def test_measure_reports_sizes_that_grow_with_depth():
  rows = [train_step.compile_stats("mxfp4", d, width=64, batch=2, image=32, impl="fused")
          for d in (1, 2)]
  for row in rows:
    assert set(row) == {"lower_s", "compile_s", "stablehlo_lines", "optimized_hlo_lines"}
    assert row["compile_s"] > 0 and row["stablehlo_lines"] > 100
  # One more unrolled block: a larger graph, by less than a second copy of everything.
  assert rows[0]["stablehlo_lines"] < rows[1]["stablehlo_lines"] < 2 * rows[0]["stablehlo_lines"]


def test_unknown_recipe_is_named():
  with pytest.raises((KeyError, ValueError), match="nvfp3"):
    train_step.compile_stats("nvfp3", 1, width=64, batch=2, image=32, impl="fused")
