"""experiments.ptq end to end: train-then-quantize, load a vit_tetrajet run, bad flags."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(module, *args, timeout=600):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_train_then_quantize(tmp_path):
  wd = str(tmp_path / "ptq")
  p = _run("experiments.ptq", "--train_steps=30", "--calibration=64", f"--workdir={wd}")
  assert p.returncode == 0, p.stderr[-3000:]
  rows = json.load(open(os.path.join(wd, "results.json")))
  assert [(r["format"], r["method"]) for r in rows][:3] == [("float", "-"), ("mxfp4", "rtn"),
                                                            ("mxfp4", "rtn_hadamard")]
  assert len(rows) == 1 + 2 * 4
  float_bytes = rows[0]["weight_bytes"]
  for r in rows[1:]:
    assert r["weight_bytes"] < float_bytes / 4, "encoder weights should shrink ~7x"
    assert r["output_mse"] > 0.0 and 0.0 <= r["test_accuracy"] <= 1.0
  by = {(r["format"], r["method"]): r for r in rows}
  for fmt in ("mxfp4", "nvfp4"):  # GPTQ minimises the output error RTN leaves
    assert by[(fmt, "gptq")]["output_mse"] < by[(fmt, "rtn")]["output_mse"], fmt
  assert by[("nvfp4", "rtn")]["weight_bytes"] > by[("mxfp4", "rtn")]["weight_bytes"], \
      "NVFP4 (4.5 bits) stores more than MXFP4 (4.25 bits)"
  assert open(os.path.join(wd, "ptq.png"), "rb").read(4) == b"\x89PNG"
  assert "| mxfp4 | gptq |" in open(os.path.join(wd, "summary.md")).read()


def test_quantizes_a_vit_tetrajet_run(tmp_path):
  src = str(tmp_path / "vit")
  p = _run("experiments.vit_tetrajet", "--format=bf16", "--noscan_layers", "--steps=4",
           "--log_every=2", "--eval_every=4", f"--workdir={src}")
  assert p.returncode == 0, p.stderr[-3000:]
  wd = str(tmp_path / "ptq")
  p = _run("experiments.ptq", f"--from_workdir={src}", "--run=bf16", "--formats=nvfp4",
           "--methods=rtn", f"--workdir={wd}")
  assert p.returncode == 0, p.stderr[-3000:]
  rows = json.load(open(os.path.join(wd, "results.json")))
  final = json.load(open(os.path.join(src, "bf16", "final.json")))
  # The float row evaluates the restored parameters: the run's own test accuracy.
  assert rows[0]["test_accuracy"] == pytest.approx(final["test_accuracy"])


@pytest.mark.parametrize("args,message", [
    (["--methods=rtn,awq"], "unknown ['awq']"),
    (["--formats=fp5"], "fp5"),
    (["--from_workdir=/nonexistent/run"], "has no config.json"),
    (["--model=vit_giant"], "is unknown"),
    (["--calibration=100000"], "--calibration=100000 is more than the 1438 training images"),
])
def test_bad_flags_exit_with_a_clear_message(tmp_path, args, message):
  p = _run("experiments.ptq", f"--workdir={tmp_path}", *args, timeout=120)
  assert p.returncode != 0
  assert message in p.stderr + p.stdout, (p.stderr + p.stdout)[-2000:]
