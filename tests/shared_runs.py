"""Expensive test inputs computed once per pytest session, whichever xdist worker asks.

The experiment tests share tiny training runs through module-scoped fixtures; under
``pytest -n auto`` each worker that runs one of the module's tests would otherwise set the
fixture up again (the 8-device runs of ``test_experiments_distributed.py`` ran twice). The
first worker to ask computes the result in a directory both can see; the others wait on a
file lock and reuse it. A failed computation leaves no result, so the next asker retries
(and reports the failure in its own test).
"""

from __future__ import annotations

import fcntl
import json
import os
import pathlib
from typing import Any, Callable


def once(tmp_path_factory, name: str, make: Callable[[pathlib.Path], Any]
         ) -> tuple[pathlib.Path, Any]:
  """``(directory, make(directory))``: ``make`` runs once per session across xdist workers
  (it must return something JSON can hold); later callers get the stored result."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent          # pytest-N/, shared by the workers' popen-gwN/ folders
  directory = root / f"shared-{name}"
  with open(root / f"shared-{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)   # released when the file closes
    done = directory / "result.json"
    if done.exists():
      return directory, json.loads(done.read_text())
    directory.mkdir(parents=True, exist_ok=True)
    result = make(directory)
    done.write_text(json.dumps(result))
    return directory, result


class Completed:
  """What the tests read of a ``subprocess.CompletedProcess``, rebuilt from JSON."""

  def __init__(self, d: dict):
    self.returncode, self.stdout, self.stderr = d["returncode"], d["stdout"], d["stderr"]

  @staticmethod
  def record(p) -> dict:
    return {"returncode": p.returncode, "stdout": p.stdout, "stderr": p.stderr}
