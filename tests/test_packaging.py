"""The wheel ships ``fp4jax`` only, and the installed library works beside a user's own
top-level package named ``kernels`` (a common name: the library must never import a
top-level ``kernels``)."""

import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
  # Built from a copy of the tree (the library, the lab, the experiments, the tools, so that
  # their absence from the wheel is the configuration's doing): setuptools writes build/
  # and egg-info beside the sources, which must not race between xdist workers or leave
  # stale files in the checkout.
  src = tmp_path_factory.mktemp("src")
  skip = shutil.ignore_patterns("__pycache__", "results", "*.egg-info", "build")
  for name in ("fp4jax", "kernels", "experiments", "tools"):
    shutil.copytree(ROOT / name, src / name, ignore=skip)
  for name in ("pyproject.toml", "README.md", "LICENSE"):
    shutil.copy(ROOT / name, src / name)
  out = tmp_path_factory.mktemp("wheel")
  p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                      "-q", "-w", str(out), str(src)], capture_output=True, text=True,
                     timeout=300)
  assert p.returncode == 0, p.stdout + p.stderr
  [whl] = out.glob("fp4jax-*.whl")
  return whl


def test_wheel_ships_only_the_fp4jax_package(wheel):
  names = zipfile.ZipFile(wheel).namelist()
  top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
  assert top == {"fp4jax"}, f"the wheel's top-level names: {sorted(top)}"
  assert "fp4jax/kernels/quantize.py" in names, "the Pallas kernels ship with the library"
  assert not any(n.startswith(("experiments/", "kernels/", "tests/", "tools/")) for n in names)


def test_wheel_metadata_declares_what_the_library_imports(wheel):
  zf = zipfile.ZipFile(wheel)
  [meta] = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
  text = zf.read(meta).decode()
  requires = {line.split(":", 1)[1].strip().split(";")[0].split(">")[0].split("=")[0].strip()
              for line in text.splitlines() if line.startswith("Requires-Dist:")}
  for dist in ("jax", "flax", "optax", "orbax-checkpoint", "absl-py", "numpy", "ml_dtypes",
               "opt_einsum"):
    assert dist in requires, f"{dist} is imported by fp4jax but not declared: {sorted(requires)}"
  assert "chex" not in requires, "chex is declared but imported nowhere"
  assert "License-Expression: Apache-2.0" in text or "License: Apache-2.0" in text
  assert any(n.endswith("licenses/LICENSE") for n in zf.namelist()), "the LICENSE file ships"
  extras = [line for line in text.splitlines() if line.startswith("Requires-Dist:")
            and "extra == \"test\"" in line]
  for dist in ("pytest", "scikit-learn", "matplotlib", "nbclient"):
    assert any(dist in line for line in extras), f"the test extra lacks {dist}"
  assert any("scikit-learn" in line and "extra == \"experiments\"" in line
             for line in text.splitlines()), "fp4jax.report needs the experiments extra"


def test_every_import_of_the_library_is_declared():
  # What fp4jax/ imports at top level from outside the standard library and itself.
  import ast
  declared = {"jax", "jaxlib", "flax", "optax", "orbax", "absl", "numpy", "ml_dtypes",
              "opt_einsum",
              "sklearn",       # fp4jax.report only, imported lazily: the experiments extra
              "safetensors"}   # fp4jax.interop's files, imported lazily: the interop extra
  found = set()
  for path in (ROOT / "fp4jax").rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        found |= {a.name.split(".")[0] for a in node.names}
      elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        found.add(node.module.split(".")[0])
  third_party = {m for m in found - set(sys.stdlib_module_names) if m not in ("fp4jax",)}
  assert third_party <= declared, f"undeclared imports in fp4jax/: {sorted(third_party - declared)}"


def test_installed_wheel_works_beside_a_user_package_named_kernels(wheel, tmp_path):
  site = tmp_path / "site"
  p = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                      "--target", str(site), str(wheel)], capture_output=True, text=True,
                     timeout=300)
  assert p.returncode == 0, p.stdout + p.stderr
  user = tmp_path / "user_project"
  (user / "kernels").mkdir(parents=True)
  (user / "kernels" / "__init__.py").write_text("WHO = 'the user project'\n")
  code = """
import sys, jax, jax.numpy as jnp, numpy as np
import fp4jax, kernels
assert fp4jax.__file__.startswith(sys.argv[1]), fp4jax.__file__   # the installed wheel
assert kernels.WHO == 'the user project'
x = jax.random.normal(jax.random.key(0), (32, 64))
q = fp4jax.quantize(x, 'mxfp4', impl='pallas')          # interpret mode off a GPU
r = fp4jax.quantize(x, 'mxfp4', impl='xla')
assert np.array_equal(np.asarray(q.codes), np.asarray(r.codes))
y = fp4jax.qmatmul(x, jnp.ones((64, 32)), 'mxfp4', impl='pallas')
print('ok', y.shape)
"""
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env.update(PYTHONPATH=str(site), JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-c", code, str(site)], cwd=user, env=env,
                     capture_output=True, text=True, timeout=300)
  assert p.returncode == 0 and "ok (32, 32)" in p.stdout, p.stdout + p.stderr
