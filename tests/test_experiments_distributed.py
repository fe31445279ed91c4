"""The experiments on several devices (--mesh, --grad_comm), as a user runs them: 8 host CPU
devices (tests/conftest.py sets XLA_FLAGS, inherited by the subprocesses). One-device and
8-device runs give the same loss curve within reduction-order tolerance; a checkpoint
written on 8 devices resumes on 1; FP8 gradient communication trains; bad flags fail
clearly."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import shared_runs
from experiments import common
from shared_runs import Completed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPT_TINY = ["--steps=6", "--log_every=1", "--eval_every=3", "--checkpoint_every=3",
            "--warmup=2", "--lr=3e-3", "--batch_size=16", "--context=32", "--eval_batches=1",
            "--max_bytes=200000"]


def _run(module, *args, devices=8, timeout=900):
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                 os.environ.get("XLA_FLAGS", ""))
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}".strip())
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _curve(workdir, run, kind="train", key="loss"):
  with open(os.path.join(workdir, run, "metrics.jsonl")) as f:
    recs = [json.loads(line) for line in f]
  return {r["step"]: r[key] for r in recs if r["kind"] == kind}


@pytest.fixture(scope="module")
def gpt_runs(tmp_path_factory):
  """bf16 and mxfp4 on one device and on a data:2,fsdp:4 mesh (stopped at step 4, then
  resumed in a one-device process without --mesh); computed once per session
  (:func:`shared_runs.once`: xdist's other worker reuses it)."""
  def make(base):
    one, eight = str(base / "one"), str(base / "eight")
    p1 = _run("experiments.gpt_fp4", "--compare=bf16,mxfp4", "--mesh=data:1",
              f"--workdir={one}", *GPT_TINY)
    assert p1.returncode == 0, p1.stderr[-3000:]
    p8 = _run("experiments.gpt_fp4", "--compare=bf16,mxfp4", "--mesh=data:2,fsdp:4",
              "--stop_at=4", f"--workdir={eight}", *GPT_TINY)
    assert p8.returncode == 0, p8.stderr[-3000:]
    stopped = {r: _curve(eight, r) for r in ("bf16", "mxfp4")}
    pr = _run("experiments.gpt_fp4", "--compare=bf16,mxfp4", "--resume", f"--workdir={eight}",
              *GPT_TINY, devices=1)
    assert pr.returncode == 0, pr.stderr[-3000:]
    return {"p8": Completed.record(p8), "pr": Completed.record(pr), "stopped": stopped}

  base, res = shared_runs.once(tmp_path_factory, "gpt_mesh", make)
  stopped = {r: {int(k): v for k, v in c.items()} for r, c in res["stopped"].items()}
  return (str(base / "one"), str(base / "eight"), Completed(res["p8"]), Completed(res["pr"]),
          stopped)


def test_one_and_eight_devices_give_the_same_loss_curve(gpt_runs):
  one, _, p8, _, stopped = gpt_runs
  assert "(mesh data:2,fsdp:4, blocks aligned to 1, partitioner, gradients f32)" in p8.stdout  # bf16
  for run, rtol in (("bf16", 1e-4), ("mxfp4", 2e-2)):
    a, b = _curve(one, run), stopped[run]
    assert sorted(b) == [1, 2, 3, 4]
    # Step 1 starts from the same parameters: only GEMM / gradient reduction order differ.
    assert b[1] == pytest.approx(a[1], rel=1e-5), (run, a[1], b[1])
    np.testing.assert_allclose([b[s] for s in b], [a[s] for s in b], rtol=rtol, err_msg=run)


def test_checkpoint_from_eight_devices_resumes_on_one(gpt_runs):
  one, eight, _, pr, stopped = gpt_runs
  assert "resumed from step 4" in pr.stdout
  with open(os.path.join(eight, "config.json")) as f:
    cfg = json.load(f)
  assert cfg["device"].endswith("x1")  # the resumed process had one device
  assert [r["parallel"] for r in cfg["runs"]] == ["one device"] * 2
  for run in ("bf16", "mxfp4"):
    resumed = _curve(eight, run)
    assert {s: resumed[s] for s in stopped[run]} == stopped[run], "history kept up to step 4"
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    a = _curve(one, run)
    np.testing.assert_allclose([resumed[s] for s in (5, 6)], [a[s] for s in (5, 6)],
                               rtol=1e-4 if run == "bf16" else 5e-2, err_msg=run)
    final = json.load(open(os.path.join(eight, run, "final.json")))
    assert final["steps"] == 6 and final["devices"] == 1


def test_fp8_gradient_communication_trains_like_f32(tmp_path):
  wd = str(tmp_path / "fp8")
  p = _run("experiments.gpt_fp4", "--compare=bf16", "--mesh=data:8", "--grad_comm=fp8_e4m3",
           f"--workdir={wd}", *GPT_TINY)
  assert p.returncode == 0, p.stderr[-3000:]
  assert "shard_map, gradients fp8_e4m3" in p.stdout
  final = json.load(open(os.path.join(wd, "bf16", "final.json")))
  assert final["grad_comm"] == "fp8_e4m3" and final["devices"] == 8
  curve = _curve(wd, "bf16")
  assert curve[6] < curve[1], curve
  summary = open(os.path.join(wd, "summary.md")).read()
  assert "| bf16 | 6 | 8 | fp8_e4m3 |" in summary, summary


def test_vit_trains_on_an_fsdp_mesh(tmp_path):
  wd = str(tmp_path / "vit")
  p = _run("experiments.vit_tetrajet", "--compare=tetrajet", "--mesh=data:2,fsdp:4",
           f"--workdir={wd}", "--steps=6", "--log_every=2", "--eval_every=6",
           "--checkpoint_every=6", "--warmup=2", "--lr=3e-3", "--batch_size=64")
  assert p.returncode == 0, p.stderr[-3000:]
  curve = _curve(wd, "tetrajet")
  assert curve[6] < curve[2], curve
  final = json.load(open(os.path.join(wd, "tetrajet", "final.json")))
  assert final["devices"] == 8 and final["test_accuracy"] is not None


@pytest.mark.parametrize("args,message", [
    (["--mesh=model:2"], "axis one of data, fsdp"),
    (["--mesh=data:16"], "needs 16 devices but 8 are available"),
    (["--grad_comm=fp8_e4m3"], "needs a --mesh"),
    (["--mesh=data:1", "--grad_comm=fp8_e4m3"], "needs a mesh of 2 or more devices"),
    (["--mesh=data:8", "--grad_comm=fp8_e4m3", "--spmd=partitioner"], "use --spmd=shard_map"),
    (["--mesh=data:8", "--batch_size=12"], "does not split over the 8 devices"),
])
def test_bad_mesh_flags_exit_with_a_clear_message(tmp_path, args, message):
  p = _run("experiments.gpt_fp4", f"--workdir={tmp_path}", "--compare=bf16", *args,
           timeout=120)
  assert p.returncode != 0
  assert message in p.stderr + p.stdout, (p.stderr + p.stdout)[-2000:]


def test_parallel_without_a_mesh_is_the_one_device_program():
  par = common.Parallel.from_flags(None, "f32", "mxfp4")
  assert par.mesh is None and par.devices == 1 and par.describe() == "one device"
  par.check_batch(7)  # any batch size
  with pytest.raises(ValueError, match="needs a --mesh"):
    common.Parallel.from_flags(None, "fp8_e4m3", "mxfp4")


def test_overlay_plots_runs_from_different_workdirs(gpt_runs, tmp_path):
  one, eight, *_ = gpt_runs
  out = str(tmp_path / "o" / "loss.png")
  p = _run("experiments.overlay", f"--runs=1 device={one}/bf16;8 devices={eight}/bf16",
           "--key=loss", "--kind=train", f"--out={out}", devices=1, timeout=120)
  assert p.returncode == 0, p.stderr[-2000:]
  assert open(out, "rb").read(4) == b"\x89PNG"
  assert "1 device: loss" in p.stdout and "8 devices: loss" in p.stdout


@pytest.mark.parametrize("spec,message", [
    ("nolabel", "must be label=<run directory>"),
    ("a=/nonexistent", "has no metrics.jsonl"),
    (";", "--runs is empty"),
])
def test_overlay_rejects_bad_runs(spec, message):
  from experiments import overlay
  with pytest.raises(ValueError, match=message):
    overlay.parse_runs(spec)
