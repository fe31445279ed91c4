"""SIGKILL a training script at chosen points, then ``--resume`` it to the end (issue 20's
faults): what the experiment tests use to show that a killed run loses nothing.

A kill point is ``("step", run, n)``: once ``run``'s metrics log holds a train record at
step >= n; or ``("saving", run)``: as soon as a checkpoint write of ``run`` is under way
(a new orbax temporary directory appears in its ``checkpoints/``), i.e. mid-write. Each
point kills a fresh ``--resume`` process; a last one runs to the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POLL_SECONDS = 0.001   # orbax's writes of the tiny states take tens of milliseconds


def _tmp_entries(ckpt_dir: str) -> set[str]:
  if not os.path.isdir(ckpt_dir):
    return set()
  return {n for n in os.listdir(ckpt_dir) if "tmp" in n}


def _max_train_step(path: str) -> int:
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    lines = f.read().split("\n")[:-1]   # complete lines only
  steps = [json.loads(l)["step"] for l in lines if l.strip() and '"train"' in l]
  return max(steps, default=0)


def run_with_kills(module: str, workdir: str, args: list[str], kills: list[tuple],
                   timeout: float = 300) -> tuple[subprocess.CompletedProcess, list[str]]:
  """Runs ``python -m module --workdir=workdir --resume *args`` once per kill point,
  SIGKILLing it there, then once to the end. Returns (the last process, a description of
  each kill; a kill that landed during a checkpoint write says ``mid-write``).

  A ``"saving"`` point is checked with the process stopped (SIGSTOP): the kill lands
  mid-write only if the new temporary directory is still there; if the write finished
  first, the process continues and the next write is tried."""
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             # Killed processes only read the session's compilation cache: a kill during a
             # cache write would leave a truncated entry for every later process.
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1e9")
  cmd = [sys.executable, "-m", module, f"--workdir={workdir}", "--resume", *args]
  done = []
  for point in kills:
    run = point[1]
    ckpt = os.path.join(workdir, run, "checkpoints")
    before = _tmp_entries(ckpt)
    err_path = os.path.join(workdir, f"stderr_{len(done)}.txt")
    os.makedirs(workdir, exist_ok=True)
    with open(err_path, "w") as err:
      proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
      deadline, what = time.time() + timeout, None
      try:
        while what is None:
          if proc.poll() is not None:
            raise AssertionError(f"{module} ended (status {proc.returncode}) before the kill "
                                 f"point {point}: {open(err_path).read()[-2000:]}")
          if time.time() > deadline:
            raise AssertionError(f"{module}: kill point {point} not reached in {timeout} s")
          if point[0] == "saving":
            if _tmp_entries(ckpt) - before:
              proc.send_signal(signal.SIGSTOP)
              if _tmp_entries(ckpt) - before:       # still being written: kill it there
                what = "mid-write"
              else:                                 # finished meanwhile: try the next one
                before = _tmp_entries(ckpt)
                proc.send_signal(signal.SIGCONT)
          elif _max_train_step(os.path.join(workdir, run, "metrics.jsonl")) >= point[2]:
            what = "after a logged step"
          if what is None:
            time.sleep(POLL_SECONDS)
        proc.send_signal(signal.SIGKILL)
        contents = sorted(os.listdir(ckpt)) if os.path.isdir(ckpt) else []
      finally:
        if proc.poll() is None:
          proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, (point, proc.returncode)
    done.append(f"{point}: killed {what}; checkpoints {contents}")
  last = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT,
                                                 JAX_PLATFORMS="cpu"),
                        capture_output=True, text=True, timeout=timeout)
  return last, done


def assert_same_runs(straight: str, killed: str, runs, kills: list[str]) -> None:
  """Each run's metrics log and final metrics (all but the wall-clock seconds) in the
  killed-and-resumed workdir equal the uninterrupted one's."""
  def records(path):
    with open(path) as f:
      return [json.loads(line) for line in f]

  for run in runs:
    assert records(os.path.join(straight, run, "metrics.jsonl")) == \
        records(os.path.join(killed, run, "metrics.jsonl")), f"{run}: {kills}"
    finals = []
    for wd in (straight, killed):
      with open(os.path.join(wd, run, "final.json")) as f:
        finals.append({k: v for k, v in json.load(f).items() if k != "seconds"})
    assert finals[0] == finals[1], (run, finals)
