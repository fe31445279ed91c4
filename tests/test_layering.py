"""The house's one-way flow, checked on the source (every import, lazy ones included):
no import cycles in the library; the numerics import neither training infrastructure
(distributed, Flax, optax) nor anything outside the package; the kernel lab never imports
the experiments."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
NUMERICS = ["formats", "bits", "rounding", "scales", "spec", "blocks", "packing", "prng",
            "tensor_amax", "qarray", "encode", "decode", "kernels.quantize", "kernels.unpack",
            "kernels.matmul", "kernels.weight_only", "dispatch", "quantization", "gemm",
            "hadamard", "estimators", "qdot", "recipes"]


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def _imports(path: pathlib.Path) -> set[str]:
  """Every module ``path`` imports, at any depth of the file (functions included)."""
  tree = ast.parse(path.read_text())
  pkg = _module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else _module_name(path)
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(pkg.split(".")[:len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
      out.add(base)
      out.update(f"{base}.{a.name}" for a in node.names)  # `from fp4jax import bits`
  return out


def _graph(top: str) -> dict[str, set[str]]:
  mods = {_module_name(p): p for p in (ROOT / top).rglob("*.py")}
  return {m: {i for i in _imports(p) if i in mods and i != m} for m, p in mods.items()}


def test_the_library_has_no_import_cycles():
  graph = _graph("fp4jax")
  # Package __init__ files re-export; a module importing its package's __init__ is normal.
  graph = {m: {i for i in deps if not (m.startswith(i + ".") )} for m, deps in graph.items()}
  graph.pop("fp4jax", None)
  for deps in graph.values():
    deps.discard("fp4jax")
  state, cycles = {}, []

  def visit(m, stack):
    state[m] = 1
    for d in graph.get(m, ()):
      if state.get(d) == 1:
        cycles.append(stack[stack.index(d):] + [d])
      elif d not in state:
        visit(d, stack + [d])
    state[m] = 2

  for m in sorted(graph):
    if m not in state:
      visit(m, [m])
  assert not cycles, f"import cycles: {cycles}"


def test_the_numerics_import_no_training_infrastructure():
  for name in NUMERICS:
    path = ROOT / "fp4jax" / (name.replace(".", "/") + ".py")
    bad = {i for i in _imports(path)
           if i.split(".")[0] in ("flax", "optax", "orbax", "experiments", "kernels")
           or i.startswith("fp4jax.distributed") or i.startswith("fp4jax.linen")
           or i.startswith("fp4jax.nnx") or i.startswith("fp4jax.optim")}
    assert not bad, f"fp4jax/{name} imports {sorted(bad)}"


def test_the_library_imports_nothing_outside_the_package():
  for path in (ROOT / "fp4jax").rglob("*.py"):
    bad = {i for i in _imports(path) if i.split(".")[0] in ("experiments", "kernels", "tools")}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_the_kernel_lab_does_not_import_the_experiments():
  for path in (ROOT / "kernels").rglob("*.py"):
    bad = {i for i in _imports(path) if i.split(".")[0] == "experiments"}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
