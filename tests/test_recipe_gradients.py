"""experiments.recipe_gradients: the study runs and orders recipes sensibly (tiny size)."""

from experiments import recipe_gradients


def test_tiny_study_runs_and_ranks():
  rows = recipe_gradients.study(["bf16", "fp8", "mxfp4"], tokens=64, d=32, n_keys=2,
                                repeats=1, seed=0)
  by = {r["recipe"]: r for r in rows}
  assert by["bf16"]["rel_err_W1"] < 0.01 and by["bf16"]["time_vs_bf16"] == 1.0
  assert by["bf16"]["rel_err_W2"] < by["fp8"]["rel_err_W2"] < by["mxfp4"]["rel_err_W2"] < 0.5
  assert all(0.9 < r["cos_W1"] <= 1.0 + 1e-9 for r in rows)
  table = recipe_gradients.format_rows(rows)
  assert table.count("\n") == 4 and "mxfp4" in table
