"""Shared test helpers."""

import os
import random
import zlib

import numpy as np
import pytest

# CPU unless the caller chooses (the GPU machine runs the suite with "cuda,cpu").
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Eight host CPU devices (before JAX starts), so the sharding tests run real 8-device
# meshes; single-device code runs on the first, as before.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()


# One persistent compilation cache for the whole session, shared by xdist's workers and by
# the experiment tests' subprocesses (which run the same tiny configurations several
# times: straight, stopped, resumed): each executable is compiled once. Only compiles of
# 0.5 s or more are stored (the unit tests' many small ones would cost more to write).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit
  import shutil
  import tempfile
  _cache = tempfile.mkdtemp(prefix="fp4jax-test-jax-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
  atexit.register(shutil.rmtree, _cache, True)  # the controlling process made it

# The CPU subsets of slow sweeps (tests/sweeps.py) change from run to run; the seed is
# fixed here, in the controlling process, so that xdist's workers inherit it.
os.environ.setdefault("FP4JAX_SWEEP_SEED", str(random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
  full = os.environ.get("FP4JAX_FULL_SWEEPS", "") == "1"
  return (f"fp4jax sweeps: {'all combinations' if full else 'CPU subsets'}, "
          f"FP4JAX_SWEEP_SEED={os.environ['FP4JAX_SWEEP_SEED']}")


# Seconds per test in the GPU test command, measured there (tools/gpu_test_seconds.py).
_GPU_SECONDS_PATH = os.path.join(os.path.dirname(__file__), "gpu_test_seconds.json")
# A test the table lacks (new since the last GPU run) sorts like a typical kernel-compiling
# test; one marked long_gpu_compile like the multi-minute NVFP4 compiles.
_DEFAULT_SECONDS, _LONG_COMPILE_SECONDS = 10.0, 120.0


def pytest_collection_modifyitems(config, items):
  """Longest tests first (seconds measured on the GPU machine, ``gpu_test_seconds.json``):
  under the GPU test command's ``--dist load --maxschedchunk=1`` xdist hands out the first
  quarter of the tests round-robin and then one at a time as workers free up (each keeps
  one queued), so the long compiles start early and the short tests fill the end.

  Only for the GPU test command (``FP4JAX_FULL_SWEEPS=1``): elsewhere the collection order
  stays (module-scoped fixtures, such as the experiment tests' shared tiny runs, are set
  up once per module only while a module's tests run together), and only the
  ``long_gpu_compile`` tests go first."""
  if os.environ.get("FP4JAX_FULL_SWEEPS", "") != "1":
    items.sort(key=lambda item: item.get_closest_marker("long_gpu_compile") is None)
    return
  import json
  with open(_GPU_SECONDS_PATH) as f:
    seconds = json.load(f)["seconds"]

  def expected(item):
    if item.nodeid in seconds:
      return seconds[item.nodeid]
    long = item.get_closest_marker("long_gpu_compile") is not None
    return _LONG_COMPILE_SECONDS if long else _DEFAULT_SECONDS

  items.sort(key=lambda item: -expected(item))


def bits_equal_or_both_nan(a, b) -> np.ndarray:
  """Elementwise: identical float bit patterns, or both NaN (NaN sign/payload is
  platform-dependent and carries no value)."""
  a, b = np.asarray(a), np.asarray(b)
  w = {2: np.uint16, 4: np.uint32}[a.dtype.itemsize]
  return (a.view(w) == b.view(w)) | (np.isnan(a.astype(np.float32)) & np.isnan(b.astype(np.float32)))


@pytest.fixture
def rng(request):
  """A fresh numpy Generator per test, seeded from the test's id (crc32: the
  same seed in every process and run, unlike the salted str hash)."""
  return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def _fresh_dispatch_log():
  """fp4jax.dispatch logs each decision once per process; tests that read the log need
  every decision of their own to be logged."""
  from fp4jax import dispatch
  dispatch._LOGGED.clear()
  yield
