"""The committed notebooks carry their outputs and still execute without errors."""

import os
import sys

import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import make_notebooks  # noqa: E402


@pytest.mark.parametrize("name", ["quickstart", "recipes"])
def test_notebook_is_committed_with_outputs_and_executes(name, tmp_path):
  path = os.path.join(ROOT, "notebooks", f"{name}.ipynb")
  committed = nbformat.read(path, as_version=4)
  code = [c for c in committed.cells if c.cell_type == "code"]
  assert code and all(c.get("execution_count") for c in code), f"{name}: a cell was not run"
  images = [o for c in code for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
  assert images, f"{name}: the committed notebook has no plot output"
  copy = tmp_path / f"{name}.ipynb"
  nbformat.write(committed, copy)
  ran = make_notebooks.execute(str(copy))  # raises CellExecutionError on any failure
  kinds = lambda nb: [sorted({o["output_type"] for o in c.get("outputs", [])})
                      for c in nb.cells if c.cell_type == "code"]
  assert kinds(ran) == kinds(committed), f"{name}: outputs changed shape"
  assert not any(o["output_type"] == "error" for c in ran.cells for o in c.get("outputs", []))
